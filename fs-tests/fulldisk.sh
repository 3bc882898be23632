#!/usr/bin/env bash
# fs-tests/fulldisk.sh: a datastore on a small loop-mounted ext4 (256 MiB) filled to the brim.
#
# Protects: the space reserve is 5 % of the disk clamped to 16..256 MiB (computed from
# statvfs); writes and fsync fail with ENOSPC when the disk is full; "acknowledged data is
# never lost to ENOSPC": every byte an fsync covered while the disk filled (fill.raw up to its
# last successful fsync, sha256 recorded at write time, and keep.raw) reads back intact on the
# full disk, again after a kill -9 of the daemon and a remount on the full disk, and keep.raw and
# after.raw once more after the final remount; the datastore stays consistent; deleting files
# and compacting (in the background, through the space reserve even though the disk is full)
# gives the space back, after which writes work again with nothing lost; unmount and fsck are
# clean.
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
# 5 % of the disk (statvfs: f_blocks * f_frsize), at least 16 MiB, at most 256 MiB
want=$(python3 -c 'import os,sys; s=os.statvfs(sys.argv[1]); print(min(max(s.f_blocks*s.f_frsize//20, 16<<20), 256<<20))' "$SMALL")
have=$(stat -c %s "$DS/reserve")
[ "$have" = "$want" ] || fail "reserve is $have bytes; expected $want (5 % of the disk, clamped to 16..256 MiB)"
[ $(( $(stat -c %b "$DS/reserve") * $(stat -c %B "$DS/reserve") )) -ge "$want" ] || fail "the reserve is sparse: it holds no space"
log "disk: $(avail) bytes available with the reserve ($have bytes, as expected) set aside"

step "fill the disk: writes and fsync fail with ENOSPC"
head -c $((16 * MiB)) /dev/urandom >"$TEST_TMP/keep.bin"
cp "$TEST_TMP/keep.bin" "$MNT/keep.raw"
python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)" "$MNT/keep.raw"
# fill.sum gets "BYTES SHA256" of fill.raw's prefix covered by its last successful fsync
python3 - "$MNT/fill.raw" "$TEST_TMP/fill.sum" <<'PY' || fail "filling the disk did not end in ENOSPC"
import errno, hashlib, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
written = 0
h = hashlib.sha256()
synced = (0, h.hexdigest())
try:
    while written < (1 << 30):
        buf = os.urandom(1 << 20)
        os.write(fd, buf)
        h.update(buf)
        written += 1 << 20
        if written % (16 << 20) == 0:
            os.fsync(fd)
            synced = (written, h.hexdigest())
    sys.exit("wrote 1 GiB onto a 256 MiB disk without an error")
except OSError as e:
    assert e.errno == errno.ENOSPC, e
    print(f"ENOSPC after {written >> 20} MiB, {synced[0] >> 20} MiB of it fsynced", file=sys.stderr)
with open(sys.argv[2], "w") as f:
    f.write("%d %s\n" % synced)
PY
read -r fill_synced fill_sha <"$TEST_TMP/fill.sum"
[ "$fill_synced" -ge $((64 * MiB)) ] || fail "only $fill_synced bytes of fill.raw were fsynced before ENOSPC: the disk filled too early"
# check_acked WHEN: every fsynced byte reads back (the prefix of fill.raw, keep.raw)
check_acked() {
    local got
    got=$(tmo head -c "$fill_synced" -- "$MNT/fill.raw" | sha256sum | awk '{ print $1 }') \
        || fail "$1: reading the $fill_synced fsynced bytes of fill.raw failed"
    [ "$got" = "$fill_sha" ] || fail "$1: the $fill_synced fsynced bytes of fill.raw read back differently (lost to ENOSPC?)"
    cmp "$TEST_TMP/keep.bin" "$MNT/keep.raw" || fail "$1: keep.raw changed"
    log "ok ($1): fill.raw's $((fill_synced / MiB)) fsynced MiB and keep.raw read back intact"
}
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
log "ok: ENOSPC on write/fsync"
check_acked "on the full disk"
# A clean unmount cannot flush the unsynced tail of fill.raw (the daemon exits 1: "final flush
# failed: no space left"); a crash of the daemon on the full disk must keep what was fsynced.
kill9_mount "$MNT"
start_mount "$DS" "$MNT" --gc-interval 1 --gc-rate 0
check_acked "full disk, after kill -9 and a remount"

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
start_mount "$DS" "$MNT"
cmp "$TEST_TMP/keep.bin" "$MNT/keep.raw" || fail "keep.raw changed across the last remount"
cmp "$TEST_TMP/after.bin" "$MNT/after.raw" || fail "after.raw changed across the last remount"
stop_mount "$MNT"
umount "$SMALL"
log "ok: writes work again, nothing lost, fsck clean, reserve back"
