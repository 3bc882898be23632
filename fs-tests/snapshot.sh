#!/usr/bin/env bash
# fs-tests/snapshot.sh: snapshots as a user drives them, on a datastore served over NFS with the
# FUSE mount beside it.
#
# Protects: `tessera snapshot create` of a VM folder on a live mount (the snapshot taken while
# a writer keeps writing: it holds what was written before it, whole); the snapshot readable
# under MNT/.snapshots/<path>@<name> and over NFS, absent from `ls -a MNT`; every change to it
# refused (EROFS through FUSE: write, truncate, create, rm, mv, chmod; NFS3ERR_ROFS over NFS);
# `list` (table and --json), `list --du` (unique bytes = the bytes changed since); `rollback`
# (files back byte for byte, added files gone, newer snapshots kept) and an NFS file handle
# still valid after it; `restore` to a writable copy; `prune --keep-last`; one-line errors for
# an unknown snapshot, an existing name, a bad name; snapshots surviving kill -9 of the server
# and a restart; `schedule` taking snapshots in the serving process; `delete` then gc giving the
# space back; fsck clean at the end.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
for c in nfs-cat python3; do
    command -v "$c" >/dev/null || fail "$c is required (make deps)"
done

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
W=$TEST_TMP/work
mkdir -p "$W"
URL=nfs://$NFS_HOST/ds
MiB=$((1024 * 1024))

tessera init "$DS" >/dev/null
start_serve "$DS" --mount "$MNT" --gc-interval 0

step "a VM folder with a 32 MiB disk"
mkdir -p "$MNT/vms/desk01"
head -c $((32 * MiB)) /dev/urandom >"$W/disk.v1"
cp "$W/disk.v1" "$MNT/vms/desk01/disk.raw"
echo "nvram v1" >"$MNT/vms/desk01/nvram"
sync "$MNT/vms/desk01/disk.raw"

step "snapshot create while a writer appends to a log in the folder"
python3 - "$MNT/vms/desk01/app.log" "$W/log.done" <<'PY' &
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
n = 0
end = time.time() + 3
while time.time() < end:
    os.write(fd, b"line %08d\n" % n)
    n += 1
os.fsync(fd)
os.close(fd)
open(sys.argv[2], "w").write(str(n))
PY
WRITER=$!
sleep 1
tessera snapshot create "$MNT/vms/desk01" before-patch >"$W/create.out"
grep -q "snapshot before-patch of .* taken; read it at $MNT/.snapshots/vms/desk01@before-patch" "$W/create.out" ||
    fail "create said: $(cat "$W/create.out")"
wait "$WRITER"
SNAP=$MNT/.snapshots/vms/desk01@before-patch
# The log in the snapshot is a prefix of whole lines of the live one.
python3 - "$SNAP/app.log" "$MNT/vms/desk01/app.log" <<'PY' || fail "the snapshot's log is not a clean prefix of the live log"
import sys
s = open(sys.argv[1], "rb").read()
l = open(sys.argv[2], "rb").read()
assert l.startswith(s), "not a prefix"
assert s.endswith(b"\n") or not s, "torn line"
assert len(s) > 0, "empty: the writes before the snapshot are missing"
assert len(l) > len(s), "the writes after the snapshot are in it"
PY
log "ok: snapshot log $(wc -l <"$SNAP/app.log") lines, live $(wc -l <"$MNT/vms/desk01/app.log") lines"

step "the snapshot reads as taken, through FUSE and NFS, and is hidden from listings"
[ "$(sha "$SNAP/disk.raw")" = "$(sha "$W/disk.v1")" ] || fail "snapshot disk differs"
[ "$(tmo nfs-cat "$URL/.snapshots/vms/desk01@before-patch/nvram")" = "nvram v1" ] ||
    fail "the snapshot is not readable over NFS"
ls -a "$MNT" | grep -qx '.snapshots' && fail "ls -a lists .snapshots: it must be entered by name only"
log "ok"

step "a snapshot refuses every change (EROFS)"
for cmd in \
    "dd if=/dev/zero of=$SNAP/disk.raw bs=4k count=1 conv=notrunc" \
    "truncate -s 0 $SNAP/disk.raw" \
    "touch $SNAP/new" \
    "rm -f $SNAP/nvram" \
    "mv $SNAP/nvram $MNT/stolen" \
    "chmod 777 $SNAP/nvram" \
    "mkdir $SNAP/d" \
    "rm -rf $MNT/.snapshots"; do
    out=$(sh -c "$cmd" 2>&1) && fail "'$cmd' succeeded on a snapshot"
    echo "$out" | grep -qi 'read-only' || fail "'$cmd' failed without EROFS: $out"
done
FH=$(nfsc lookup "$NFS_HOST" /ds .snapshots/vms/desk01@before-patch/nvram)
printf 'x' >"$W/x"
out=$(nfsc write "$NFS_HOST" "$FH" 0 "$W/x" file_sync 2>&1) && fail "NFS WRITE to a snapshot succeeded"
echo "$out" | grep -q ROFS || fail "NFS WRITE to a snapshot: $out"
[ "$(sha "$SNAP/disk.raw")" = "$(sha "$W/disk.v1")" ] || fail "snapshot changed"
log "ok"

step "change the VM, snapshot again, list and du"
head -c $((4 * MiB)) /dev/urandom >"$W/patch"
dd if="$W/patch" of="$MNT/vms/desk01/disk.raw" bs=1M seek=8 conv=notrunc status=none
echo "nvram v2" >"$MNT/vms/desk01/nvram"
echo junk >"$MNT/vms/desk01/added.tmp"
cp "$MNT/vms/desk01/disk.raw" "$W/disk.v2"
sync "$MNT/vms/desk01/disk.raw"
tessera snapshot create "$MNT/vms/desk01" after-patch >/dev/null
tessera snapshot list "$MNT" >"$W/list.out"
grep -q "^/vms/desk01 *before-patch .* user" "$W/list.out" || fail "list: $(cat "$W/list.out")"
grep -q "^/vms/desk01 *after-patch " "$W/list.out" || fail "list: $(cat "$W/list.out")"
n=$(tessera snapshot list "$MNT/vms" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$n" = 2 ] || fail "list --json of $MNT/vms: $n snapshots, expected 2"
uniq=$(tessera snapshot list "$MNT/vms/desk01" --du --json | python3 -c '
import json, sys
print({s["name"]: s["unique_bytes"] for s in json.load(sys.stdin)}["before-patch"])')
# before-patch alone holds the 4 MiB the patch overwrote (plus the old nvram and log chunks).
[ "$uniq" -ge $((4 * MiB)) ] && [ "$uniq" -le $((4 * MiB + 256 * 1024)) ] ||
    fail "du of before-patch: $uniq unique bytes, expected about 4 MiB"
tessera snapshot list "$MNT" --du | grep -q "UNIQUE" || fail "list --du shows no UNIQUE column"
log "ok: before-patch holds $uniq bytes alone"

step "one-line errors"
expect_error "has no snapshot nope" tessera snapshot rollback "$MNT/vms/desk01" nope
expect_error "already has a snapshot before-patch" tessera snapshot create "$MNT/vms/desk01" before-patch
expect_error "snapshot name" tessera snapshot create "$MNT/vms/desk01" 'a@b'
expect_error "already exists" tessera snapshot restore "$MNT/vms/desk01" before-patch "$MNT/vms/desk01"

step "rollback: the folder as it was, newer snapshots kept, NFS handles valid"
FH=$(nfsc lookup "$NFS_HOST" /ds vms/desk01/disk.raw)
tessera snapshot rollback "$MNT/vms/desk01" before-patch >/dev/null
[ "$(sha "$MNT/vms/desk01/disk.raw")" = "$(sha "$W/disk.v1")" ] || fail "disk not rolled back"
[ "$(cat "$MNT/vms/desk01/nvram")" = "nvram v1" ] || fail "nvram not rolled back"
[ ! -e "$MNT/vms/desk01/added.tmp" ] || fail "a file added after the snapshot survived the rollback"
nfsc read "$NFS_HOST" "$FH" $((8 * MiB)) 4096 "$W/nfs.read" >/dev/null || fail "the NFS handle of disk.raw is stale after rollback"
cmp -s "$W/nfs.read" <(dd if="$W/disk.v1" bs=4096 skip=$((8 * 256)) count=1 status=none) ||
    fail "NFS reads other bytes than the rolled-back disk"
[ "$(sha "$MNT/.snapshots/vms/desk01@after-patch/disk.raw")" = "$(sha "$W/disk.v2")" ] ||
    fail "the newer snapshot changed with the rollback"
log "ok"

step "restore: a writable copy"
tessera snapshot restore "$MNT/vms/desk01" after-patch "$MNT/vms/desk01-v2" >/dev/null
[ "$(sha "$MNT/vms/desk01-v2/disk.raw")" = "$(sha "$W/disk.v2")" ] || fail "restored disk differs"
echo written >"$MNT/vms/desk01-v2/nvram" || fail "the restored copy is not writable"
log "ok"

step "kill -9 and restart: snapshots are durable"
kill9_serve
start_serve "$DS" --mount "$MNT" --gc-interval 0
[ "$(sha "$MNT/.snapshots/vms/desk01@before-patch/disk.raw")" = "$(sha "$W/disk.v1")" ] || fail "snapshot lost or changed by kill -9"
[ "$(tessera snapshot list "$MNT" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 2 ] ||
    fail "snapshot list after kill -9"
log "ok"

step "schedule: the serving process takes snapshots"
tessera snapshot schedule "$MNT/vms/desk01" --every 1m --keep-last 3 >/dev/null
tessera snapshot schedule "$MNT/vms/desk01" | grep -q "^/vms/desk01 .* 1m .* 3 " || fail "schedule not shown"
deadline=$((SECONDS + 45))
until tessera snapshot list "$MNT/vms/desk01" --json | grep -q '"scheduled": true'; do
    [ $SECONDS -lt "$deadline" ] || fail "no scheduled snapshot within 45 s"
    sleep 2
done
tessera snapshot schedule "$MNT/vms/desk01" --off >/dev/null
log "ok: $(tessera snapshot list "$MNT/vms/desk01" | grep -c schedule) scheduled snapshot(s)"

step "prune and delete give the space back"
rm -rf "$MNT/vms/desk01-v2"
stored() { tessera stats "$DS" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])'; }
packs() { du -sb "$DS/packs" | awk '{ print $1 }'; }
before=$(stored)
tessera snapshot prune "$MNT/vms/desk01" --keep-last 1 --dry-run | grep -q "would delete" || fail "prune --dry-run"
[ "$(tessera snapshot list "$MNT/vms/desk01" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 3 ] ||
    fail "dry run deleted snapshots"
tessera snapshot prune "$MNT/vms/desk01" --keep-last 1 >/dev/null
[ "$(tessera snapshot list "$MNT/vms/desk01" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 1 ] ||
    fail "prune --keep-last 1 left $(tessera snapshot list "$MNT/vms/desk01")"
for s in $(tessera snapshot list "$MNT" --json | python3 -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))'); do
    tessera snapshot delete "$MNT/vms/desk01" "$s" >/dev/null
done
after=$(stored)
# after-patch held the 4 MiB patch alone (the live disk was rolled back, the restored copy
# is deleted).
[ $((before - after)) -ge $((4 * MiB)) ] || fail "deleting every snapshot freed $((before - after)) bytes, expected >= 4 MiB"
[ "$after" -le $((33 * MiB)) ] || fail "after deleting every snapshot $after bytes are still stored"
p0=$(packs)
tessera gc "$DS" >/dev/null
p1=$(packs)
[ $((p0 - p1)) -ge $((4 * MiB)) ] || fail "gc gave back $((p0 - p1)) bytes of packs, expected >= 4 MiB"
[ -z "$(ls -A "$MNT/.snapshots")" ] || fail ".snapshots not empty after deleting all: $(ls -A "$MNT/.snapshots")"
log "ok: stored $before -> $after bytes, packs $p0 -> $p1 bytes"

stop_serve
tessera fsck "$DS" >/dev/null || fail "fsck after the snapshot suite"
log "all snapshot checks passed"
