#!/usr/bin/env bash
# fs-tests/fulldisk.sh: a datastore on a small loop-mounted ext4 (256 MiB) filled to the brim.
#
# Protects: writes and fsync fail with ENOSPC when the disk is full; what was fsynced before
# stays intact; the datastore stays consistent; deleting files and compacting (in the
# background, through the space reserve even though the disk is full) gives the space back,
# after which writes work again with nothing lost; unmount and fsck are clean.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 is required"
[ "$(id -u)" = 0 ] || fail "needs root (loop mount)"

make_tmp
IMG=$TEST_TMP/small.img
SMALL=$TEST_TMP/small
MNT=$TEST_TMP/mnt
DS=$SMALL/ds
MiB=$((1024 * 1024))
truncate -s 256M "$IMG"
mkfs.ext4 -q -F -m 0 "$IMG"
mkdir -p "$SMALL"
mount -o loop "$IMG" "$SMALL"
EXTRA_UNMOUNTS+=("$SMALL")
avail() { df -B1 --output=avail "$SMALL" | tail -n 1; }

tessera init "$DS" >/dev/null
start_mount "$DS" "$MNT" --gc-interval 1 --gc-rate 0
[ -f "$DS/reserve" ] || fail "no space reserve was set aside"
log "disk: $(avail) bytes available with the reserve ($(stat -c %s "$DS/reserve") bytes) set aside"

step "fill the disk: writes and fsync fail with ENOSPC"
head -c $((16 * MiB)) /dev/urandom >"$TEST_TMP/keep.bin"
cp "$TEST_TMP/keep.bin" "$MNT/keep.raw"
python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)" "$MNT/keep.raw"
python3 - "$MNT/fill.raw" <<'PY' || fail "filling the disk did not end in ENOSPC"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
written = 0
try:
    while written < (1 << 30):
        os.write(fd, os.urandom(1 << 20))
        written += 1 << 20
        if written % (16 << 20) == 0:
            os.fsync(fd)
    sys.exit("wrote 1 GiB onto a 256 MiB disk without an error")
except OSError as e:
    assert e.errno == errno.ENOSPC, e
    print(f"ENOSPC after {written >> 20} MiB", file=sys.stderr)
PY
python3 - "$MNT/more.raw" <<'PY' || fail "a write + fsync on the full disk did not fail with ENOSPC"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
try:
    os.write(fd, os.urandom(4 << 20))
    os.fsync(fd)
    sys.exit("4 MiB written and fsynced on a full disk")
except OSError as e:
    assert e.errno == errno.ENOSPC, e
PY
cmp "$TEST_TMP/keep.bin" "$MNT/keep.raw" || fail "keep.raw changed when the disk filled"
log "ok: ENOSPC on write/fsync, keep.raw intact"

step "delete, and the space comes back by itself"
rm -f -- "$MNT/fill.raw" "$MNT/more.raw"
before=$(avail)
deadline=$((SECONDS + 90))
until [ "$(avail)" -gt $((before + 100 * MiB)) ]; do
    [ $SECONDS -lt $deadline ] || fail "space did not come back within 90 s (available $(avail), was $before)"
    sleep 1
done
log "ok: available $before -> $(avail) bytes"
head -c $((32 * MiB)) /dev/urandom >"$TEST_TMP/after.bin"
cp "$TEST_TMP/after.bin" "$MNT/after.raw"
python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)" "$MNT/after.raw" || fail "fsync after freeing space"
cmp "$TEST_TMP/keep.bin" "$MNT/keep.raw" || fail "keep.raw changed"
cmp "$TEST_TMP/after.bin" "$MNT/after.raw" || fail "after.raw reads differently"
stop_mount "$MNT"
tessera fsck "$DS" >/dev/null || fail "fsck after the full-disk episode"
[ -f "$DS/reserve" ] || fail "the space reserve was not set aside again"
umount "$SMALL"
log "ok: writes work again, nothing lost, fsck clean, reserve back"
