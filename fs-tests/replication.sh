#!/usr/bin/env bash
# fs-tests/replication.sh: snapshots replicated between two datastores through a pipe, as a
# user runs it (`tessera send ... | tessera receive ...`), served and not served.
#
# Protects: a full stream of a VM folder from a served datastore (NFS + FUSE) into an unserved
# one, byte for byte; the stream about the stored size, not the logical one; an incremental
# stream after 1 % of the disk changed carrying about that 1 %, into the other datastore while it
# is served (FUSE), applied in place; the replica read-only (EROFS) until `tessera promote`; a
# stream cut short refused with a one-line error and leaving nothing behind; a second receive of
# the same stream refused; through a file (send > FILE, receive < FILE); fsck clean on both.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 is required"

make_tmp
A=$TEST_TMP/a
B=$TEST_TMP/b
MA=$TEST_TMP/ma
MB=$TEST_TMP/mb
W=$TEST_TMP/work
mkdir -p "$W"
MiB=$((1024 * 1024))

tessera init "$A" >/dev/null
tessera init "$B" >/dev/null
start_serve "$A" --mount "$MA" --gc-interval 0

step "a VM folder on A: a 64 MiB half-compressible disk, a config, a symlink"
mkdir -p "$MA/vms/desk01"
python3 - "$W/disk" <<'PY'
import random, sys
rng = random.Random(11)
with open(sys.argv[1], "wb") as f:
    for i in range(4096):                      # 4096 x 16 KiB = 64 MiB
        half = rng.randbytes(8192)
        f.write(half + bytes(8192))             # compresses about 2x
PY
cp "$W/disk" "$MA/vms/desk01/disk.raw"
echo "memsize = 4096" >"$MA/vms/desk01/desk01.vmx"
ln -s disk.raw "$MA/vms/desk01/current"
tessera snapshot create "$MA/vms/desk01" s1 >/dev/null

step "full: A (served) | B (not served)"
tmo "$TESSERA" send "$MA/vms/desk01@s1" 2>"$W/send.err" | tmo "$TESSERA" receive "$B" >"$W/recv.out" ||
    fail "send | receive: $(cat "$W/send.err" "$W/recv.out")"
grep -q "received /vms/desk01@s1: 3 entries\|received /vms/desk01@s1: 4 entries" "$W/recv.out" || fail "receive said: $(cat "$W/recv.out")"
stream_mb=$(sed -n 's/.*MiB as stored), \([0-9.]*\) MiB stream.*/\1/p' "$W/send.err")
log "send: $(cat "$W/send.err")"
python3 -c "import sys; s=float('$stream_mb'); sys.exit(0 if 28 <= s <= 40 else 1)" ||
    fail "the full stream is $stream_mb MiB: expected about the stored size (32 MiB of 64 MiB logical)"

step "incremental: 1 % of the disk changes; A | B (served, FUSE)"
start_mount "$B" "$MB"
[ "$(sha "$MB/vms/desk01/disk.raw")" = "$(sha "$W/disk")" ] || fail "the replica's disk differs"
[ "$(readlink "$MB/vms/desk01/current")" = disk.raw ] || fail "symlink lost"
ino_before=$(stat -c %i "$MB/vms/desk01/disk.raw")
head -c $((640 * 1024)) /dev/urandom >"$W/patch"    # 40 chunks of 4096 = ~1 %
dd if="$W/patch" of="$MA/vms/desk01/disk.raw" bs=64K seek=100 conv=notrunc status=none
echo "memsize = 8192" >"$MA/vms/desk01/desk01.vmx"
cp "$MA/vms/desk01/disk.raw" "$W/disk2"
tessera snapshot create "$MA/vms/desk01" s2 >/dev/null
tmo "$TESSERA" send "$MA/vms/desk01@s2" --from s1 --json 2>"$W/inc.json" | tmo "$TESSERA" receive "$MB" >"$W/recv2.out" ||
    fail "incremental send | receive: $(cat "$W/inc.json" "$W/recv2.out")"
bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stream_bytes"])' "$W/inc.json")
[ "$bytes" -le $((900 * 1024)) ] || fail "the incremental stream is $bytes bytes for 640 KiB changed"
[ "$(sha "$MB/vms/desk01/disk.raw")" = "$(sha "$W/disk2")" ] || fail "the replica's disk differs after the incremental"
[ "$(cat "$MB/vms/desk01/desk01.vmx")" = "memsize = 8192" ] || fail "config not updated"
[ "$(stat -c %i "$MB/vms/desk01/disk.raw")" = "$ino_before" ] || fail "the incremental replaced the disk's inode"
[ "$(sha "$MB/.snapshots/vms/desk01@s1/disk.raw")" = "$(sha "$W/disk")" ] || fail "snapshot s1 changed on B"
log "ok: incremental stream $bytes bytes"

step "the replica is read-only until promoted"
out=$(dd if=/dev/zero of="$MB/vms/desk01/disk.raw" bs=4k count=1 conv=notrunc 2>&1) && fail "wrote into a replica"
echo "$out" | grep -qi 'read-only' || fail "writing a replica: $out"
expect_error "was received before" sh -c "'$TESSERA' send '$MA/vms/desk01@s2' --from s1 2>/dev/null | '$TESSERA' receive '$MB'"

step "a cut stream is refused and leaves nothing"
tmo "$TESSERA" send "$MA/vms/desk01@s2" >"$W/full.stream" 2>/dev/null
head -c $(( $(stat -c %s "$W/full.stream") / 2 )) "$W/full.stream" >"$W/cut.stream"
expect_error "cut" tessera receive "$MB/vms/copy" <"$W/cut.stream"
[ ! -e "$MB/vms/copy" ] || fail "a cut stream left a replica"
tessera receive "$MB/vms/copy" <"$W/full.stream" >/dev/null
[ "$(sha "$MB/vms/copy/disk.raw")" = "$(sha "$W/disk2")" ] || fail "receive from a file"

step "promote: writable"
tessera promote "$MB/vms/desk01" | grep -q "is writable now" || fail "promote"
echo "changed on B" >"$MB/vms/desk01/desk01.vmx" || fail "a promoted replica is not writable"
expect_error "not a replica" tessera promote "$MB/vms/desk01"

stop_mount "$MB"
stop_serve
tessera fsck "$A" >/dev/null || fail "fsck A"
tessera fsck "$B" >/dev/null || fail "fsck B"
log "all replication checks passed"
