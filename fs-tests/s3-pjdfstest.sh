#!/usr/bin/env bash
# fs-tests/s3-pjdfstest.sh: fs-tests/pjdfstest.sh, whole, on an S3-backed datastore (moto on
# loopback) with a 1 MiB disk cache, smaller than the data (8 MiB written first, read back at
# the end; checked in the bucket).
# Protects: POSIX semantics of the FUSE mount over the object-store tier (issue 12). Same
# pinned result as the local run.
export TESSERA_S3=1 S3_CACHE=${S3_CACHE:-1M} PJD_LOG=${PJD_LOG:-/var/tmp/tessera-pjdfstest-s3.log}
exec "$(dirname -- "$0")/pjdfstest.sh" "$@"
