#!/usr/bin/env bash
# fs-tests/s3-nfs.sh: fs-tests/nfs.sh, whole, on an S3-backed datastore (moto on loopback) whose
# disk cache (16 MiB) is smaller than the data the suite writes, so its reads come back from the
# bucket. Protects: the NFS export behaves the same over the object-store tier (issue 12).
export TESSERA_S3=1 S3_CACHE=${S3_CACHE:-16M}
exec "$(dirname -- "$0")/nfs.sh" "$@"
