#!/usr/bin/env bash
# fs-tests/trust.sh: the failures found by trying the mount as users and hostile users would,
# each reproduced as it was reported, on a real FUSE mount.
#
# Protects:
# (1) an unaligned copy_file_range of 200 MiB (larger than the 96 MiB write-back buffer)
#     completes, copies the right bytes, and the rest of the mount keeps answering meanwhile
#     (it deadlocked the whole datastore: the copy held the files' flush locks while writing);
# (2) punching or zeroing a 1 TiB and a 1 PiB range of a sparse file keeps the daemon's memory
#     bounded (RSS < 512 MiB; it grew to 3.7 GiB for 1 TiB and aborted for 1 PiB) and keeps
#     the data outside the range;
# (3) metadata operations that returned (mkdir, create, rename, chmod, symlink, link, unlink,
#     rmdir, truncate, xattr) survive a kill -9 of the daemon 0.2 s later, with no fsync (they
#     were lost when done within a few seconds of the crash);
# and that fsck is clean after each.
#
# Env: TRUST_PARTS ("1 2 3": which checks run), TESSERA, KEEP_TMP.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
tessera init "$DS" >/dev/null || fail "tessera init failed"
want() { [[ " ${TRUST_PARTS:-1 2 3} " == *" $1 "* ]]; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
daemon_pid() { echo "${MOUNT_PID[$(abs "$MNT")]}"; }

start_mount "$DS" "$MNT"
if want 1; then
step "(1) unaligned copy_file_range of 200 MiB out of a 210 MiB file"
python3 - "$MNT/src.raw" <<'EOF' || fail "cannot write the 210 MiB source"
import os, sys, random
rng = random.Random(8)
block = rng.randbytes(1 << 20)
with open(sys.argv[1], "wb") as f:
    for i in range(210):
        # distinct 1 MiB blocks (a counter in front), so a misplaced byte shows
        f.write(i.to_bytes(8, "little") + block[8:])
    f.flush()
    os.fsync(f.fileno())
EOF
echo small >"$MNT/other.txt"
python3 - "$MNT/src.raw" "$MNT/dst.raw" >"$TEST_TMP/copy.out" 2>&1 <<'EOF' &
import os, sys
src = os.open(sys.argv[1], os.O_RDONLY)
dst = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)
want, done = 200 << 20, 0
while done < want:
    n = os.copy_file_range(src, dst, want - done, 1 + done, done)
    if n == 0:
        sys.exit("copy_file_range returned 0 before the end")
    done += n
os.fsync(dst)
print("copied", done)
EOF
cpid=$!
BG_PIDS+=("$cpid")
# The rest of the mount answers while the copy runs.
for _ in 1 2 3; do
    sleep 1
    timeout 10 cat "$MNT/other.txt" >/dev/null || fail "the mount stopped answering during the copy"
    timeout 10 ls "$MNT" >/dev/null || fail "the mount stopped answering during the copy (ls)"
done
if ! wait_pid_exit "$cpid" 180; then
    grep -E '^State' "/proc/$cpid/status" >&2 || true
    fail "copy_file_range still running after 180 s (hang: state above)"
fi
reap "$cpid"
[ "$REAPED" = 0 ] || { cat "$TEST_TMP/copy.out" >&2; fail "copy_file_range failed (status $REAPED)"; }
python3 - "$MNT/src.raw" "$MNT/dst.raw" <<'EOF' || fail "the copied bytes differ from the source at offset 1"
import sys, hashlib
a = open(sys.argv[1], "rb"); a.seek(1)
b = open(sys.argv[2], "rb")
left = 200 << 20
while left:
    n = min(left, 4 << 20)
    if a.read(n) != b.read(n):
        sys.exit("differ")
    left -= n
if b.read(1):
    sys.exit("destination longer than 200 MiB")
EOF
log "ok: 200 MiB copied from offset 1, byte for byte; the mount answered throughout"
rm -f "$MNT/src.raw" "$MNT/dst.raw"
fi

if want 2; then
step "(2) punch and zero 1 TiB and 1 PiB ranges of sparse files: bounded memory"
pid=$(daemon_pid)
peak=0
for size in 1T 1P; do
    f=$MNT/sparse-$size
    truncate -s "$size" "$f" || fail "truncate -s $size"
    printf 'head' | dd of="$f" conv=notrunc status=none
    printf 'tail' | dd of="$f" bs=1 seek=$(( $(stat -c %s "$f") - 4 )) conv=notrunc status=none
    tmo fallocate -p -o 4096 -l $(( $(stat -c %s "$f") - 8192 )) "$f" || fail "punch of $size failed"
    tmo fallocate -z -o 65536 -l $(( $(stat -c %s "$f") - 131072 )) "$f" || fail "zero range of $size failed"
    [ "$(head -c 4 "$f")" = head ] || fail "punch of $size lost the data before the range"
    [ "$(tail -c 4 "$f")" = tail ] || fail "punch of $size lost the data after the range"
    r=$(rss_kib "$pid")
    [ "$r" -gt "$peak" ] && peak=$r
done
pid_running "$pid" || fail "the daemon died punching"
[ "$peak" -lt $((512 * 1024)) ] || fail "daemon RSS $((peak / 1024)) MiB after the punches (bound: 512 MiB)"
log "ok: 1 TiB and 1 PiB punches and zero ranges, daemon RSS $((peak / 1024)) MiB"
rm -f "$MNT"/sparse-*
fi
stop_mount "$MNT"
tessera fsck "$DS" >/dev/null || fail "fsck after (1) and (2)"

want 3 && step "(3) metadata operations survive a kill -9 0.2 s later, without fsync"
want 3 && for round in 1 2 3; do
    start_mount "$DS" "$MNT"
    m=$MNT/meta$round
    mkdir "$m" "$m/d1" "$m/d2" "$m/gone"
    echo "$round" >"$m/f1"
    : >"$m/f2"
    mv "$m/f1" "$m/d1/renamed"
    chmod 640 "$m/d1/renamed"
    ln -s ../d1/renamed "$m/d2/link"
    ln "$m/d1/renamed" "$m/d2/hard"
    rm "$m/f2"
    rmdir "$m/gone"
    truncate -s 12345 "$m/d2/hard"
    python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.vm", sys.argv[2].encode())' "$m/d1/renamed" "desk-$round"
    sleep 0.2
    kill9_mount "$MNT"
    tessera fsck "$DS" >"$TEST_TMP/fsck-$round.log" 2>&1 || { cat "$TEST_TMP/fsck-$round.log" >&2; fail "round $round: fsck after the kill"; }
    start_mount "$DS" "$MNT"
    for d in "$m" "$m/d1" "$m/d2"; do [ -d "$d" ] || fail "round $round: mkdir $d lost by the crash"; done
    [ ! -e "$m/gone" ] || fail "round $round: rmdir lost by the crash"
    [ ! -e "$m/f1" ] && [ -f "$m/d1/renamed" ] || fail "round $round: rename lost by the crash"
    [ ! -e "$m/f2" ] || fail "round $round: unlink lost by the crash"
    [ "$(stat -c %a "$m/d1/renamed")" = 640 ] || fail "round $round: chmod lost by the crash"
    [ "$(readlink "$m/d2/link")" = ../d1/renamed ] || fail "round $round: symlink lost by the crash"
    [ "$(stat -c %h "$m/d1/renamed")" = 2 ] || fail "round $round: hard link lost by the crash"
    [ "$(stat -c %s "$m/d2/hard")" = 12345 ] || fail "round $round: truncate lost by the crash"
    # the file's content was written (not fsynced) before the truncate; truncate makes the
    # whole file durable: "$round\n" then zeros
    [ "$(head -c 2 "$m/d2/hard" | od -An -c | tr -d ' ')" = "$round\\n" ] ||
        fail "round $round: content before the truncate lost"
    [ "$(python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.vm").decode())' "$m/d1/renamed")" = "desk-$round" ] ||
        fail "round $round: xattr lost by the crash"
    stop_mount "$MNT"
    log "ok: round $round, every metadata operation kept"
done
tessera fsck "$DS" >/dev/null || fail "fsck at the end"
log "all trust checks passed"
