#!/usr/bin/env bash
# fs-tests/cli.sh: the README's user flow, end to end, on a real mount.
#
# Protects: init with defaults; mount; cp of a 64 MiB image into the mount;
# `tessera clone` of a file and of a directory (--count, {n:03}) on a live
# mount, clones equal to their source and independent of it (copy on write);
# a plain cp inside the mount; `stats --json` on a mounted datastore (dedup
# ratio > 1); one-line errors for a missing source, an existing destination, a
# non-datastore; clean unmount + fsck; clone on an unmounted datastore; that
# everything survives unmount/remount.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 is required"

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
SRC=$TEST_TMP/golden.raw        # built outside the mount
PATCH=$TEST_TMP/patch.bin
EXPECT=$TEST_TMP/desk-001.expected
MiB=$((1024 * 1024))
PATCH_OFF=$((16 * MiB + 123))   # deliberately not block or chunk aligned

# expect_nonzero CMD...: CMD must fail, without timing out.
expect_nonzero() {
    local rc=0
    "$@" >/dev/null 2>&1 || rc=$?
    [ "$rc" != 0 ] || fail "'$*' succeeded; expected it to be refused"
    [ "$rc" != 124 ] && [ "$rc" != 137 ] || fail "'$*' timed out"
    log "ok (refused, exit $rc): $*"
}

step "build a 64 MiB semi-compressible image outside the mount"
python3 - "$SRC" "$PATCH" <<'PY'
import random, sys
rng = random.Random(20240601)
words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(600)]
B = 64 * 1024
blocks = []
with open(sys.argv[1], "wb") as f:
    for i in range(1024):                      # 1024 x 64 KiB = 64 MiB
        k = rng.random()
        if k < 0.15:
            b = bytes(B)                        # zeros (unallocated space in a disk image)
        elif k < 0.45:
            b = b" ".join(rng.choices(words, k=B // 5))[:B].ljust(B, b"\n")  # text: compresses
        elif k < 0.55 and blocks:
            b = rng.choice(blocks)              # a repeated block: dedups
        else:
            b = rng.randbytes(B)                # incompressible
            blocks.append(b)
        f.write(b)
with open(sys.argv[2], "wb") as f:
    f.write(random.Random(7).randbytes(1024 * 1024 + 17))
PY
GOLDEN_SHA=$(sha "$SRC")
cp -- "$SRC" "$EXPECT"
dd if="$PATCH" of="$EXPECT" bs=64K seek="$PATCH_OFF" oflag=seek_bytes conv=notrunc status=none
EXPECT_SHA=$(sha "$EXPECT")
log "golden sha256 $GOLDEN_SHA"

step "tessera init (defaults) and mount"
tessera init "$DS" || fail "tessera init $DS failed"
expect_nonzero tessera init "$DS"      # must not re-initialise (or wipe) a datastore
out=$(tessera mount "$DS" "$MNT" --cache-size 5Q 2>&1) && fail "--cache-size 5Q was accepted"
grep -q "unknown unit" <<<"$out" || fail "--cache-size 5Q: $out"
start_mount "$DS" "$MNT" --cache-size 64M
mkdir "$MNT/templates" "$MNT/desktops"
tmo cp -- "$SRC" "$MNT/templates/golden.raw" || fail "cp into the mount failed"
[ "$(sha "$MNT/templates/golden.raw")" = "$GOLDEN_SHA" ] || fail "golden.raw differs from its source after cp"
[ "$(stat -c %s "$MNT/templates/golden.raw")" = $((64 * MiB)) ] || fail "golden.raw has the wrong size"

step "clone a file on the live mount"
tessera clone "$MNT/templates/golden.raw" "$MNT/desktops/desk-001.raw" || fail "tessera clone (file) failed"
[ "$(sha "$MNT/desktops/desk-001.raw")" = "$GOLDEN_SHA" ] || fail "clone differs from its source"

step "write into the clone: the source must not change"
tmo dd if="$PATCH" of="$MNT/desktops/desk-001.raw" bs=64K seek="$PATCH_OFF" oflag=seek_bytes \
    conv=notrunc status=none || fail "dd into the clone failed"
[ "$(sha "$MNT/desktops/desk-001.raw")" = "$EXPECT_SHA" ] || fail "clone content wrong after dd conv=notrunc"
[ "$(sha "$MNT/templates/golden.raw")" = "$GOLDEN_SHA" ] || fail "writing to the clone changed the source"

step "clone a directory ten times: vm-{n:03} --count 10"
tessera clone "$MNT/templates" "$MNT/desktops/vm-{n:03}" --count 10 || fail "tessera clone --count 10 failed"
for n in $(seq -f %03g 1 10); do
    f=$MNT/desktops/vm-$n/golden.raw
    [ -f "$f" ] || fail "missing $f"
    [ "$(sha "$f")" = "$GOLDEN_SHA" ] || fail "$f differs from golden"
done
for n in 000 011; do [ ! -e "$MNT/desktops/vm-$n" ] || fail "unexpected vm-$n"; done
[ "$(ls "$MNT/desktops" | wc -l)" = 11 ] || fail "desktops/ should hold desk-001.raw and vm-001..vm-010"

step "plain cp inside the mount"
unique() { tessera stats "$DS" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["unique_bytes"])'; }
before=$(unique)
tmo cp -- "$MNT/templates/golden.raw" "$MNT/copy.raw" || fail "cp inside the mount failed"
[ "$(sha "$MNT/copy.raw")" = "$GOLDEN_SHA" ] || fail "copy.raw differs from golden"
# copy_file_range inside the mount shares chunks: the copy stores no new data.
after=$(unique)
[ "$before" = "$after" ] || fail "cp inside the mount stored new data ($before -> $after unique bytes)"
log "cp inside the mount shared every chunk ($after unique bytes before and after)"
# Holes: a sparse file reads as zeros, takes no space, and SEEK_DATA finds its data.
tmo truncate -s 1G "$MNT/sparse.raw" || fail "truncate of sparse.raw failed"
printf 'data' | tmo dd of="$MNT/sparse.raw" bs=1 seek=$((512 << 20)) conv=notrunc status=none || fail "write into sparse.raw failed"
python3 - "$MNT/sparse.raw" <<'PY' || fail "SEEK_DATA/SEEK_HOLE or allocated size wrong on sparse.raw"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
data = os.lseek(fd, 0, os.SEEK_DATA)
hole = os.lseek(fd, data, os.SEEK_HOLE)
assert data == 512 << 20, data
assert hole == (512 << 20) + 16384, hole
assert os.pread(fd, 8, data) == b"data\0\0\0\0"
assert os.fstat(fd).st_blocks * 512 <= 64 << 10, os.fstat(fd).st_blocks
PY

step "tessera gc on the mounted datastore gives deleted data back"
packs_mb() { du -sm "$DS/packs" | cut -f1; }
head -c 24M /dev/urandom >"$TEST_TMP/unique.bin"
tmo cp -- "$TEST_TMP/unique.bin" "$MNT/unique.bin" || fail "cp of unique.bin failed"
python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$MNT/unique.bin" || fail "fsync of unique.bin failed"
full=$(packs_mb)
rm -f -- "$MNT/unique.bin"
# No options: every pack with 5 % or more dead goes, so what stats called reclaimable comes
# back, and the report says what was left and why.
tessera gc "$DS" >"$TEST_TMP/gc.out" 2>&1 || { cat "$TEST_TMP/gc.out" >&2; fail "tessera gc failed while mounted"; }
now=$(packs_mb)
[ "$now" -le $((full - 20)) ] || fail "tessera gc freed too little: packs $full MiB -> $now MiB: $(cat "$TEST_TMP/gc.out")"
tessera stats "$DS" --json >"$TEST_TMP/stats-gc.json" || fail "stats after gc failed"
python3 - "$TEST_TMP/stats-gc.json" <<'PY' || fail "tessera gc left more than 5 % of the packs dead: $(cat "$TEST_TMP/gc.out")"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["reclaimable_bytes"] <= 0.05 * d["pack_bytes"], (d["reclaimable_bytes"], d["pack_bytes"])
PY
log "gc: packs $full MiB -> $now MiB: $(tr '\n' ' ' <"$TEST_TMP/gc.out")"
[ "$(sha "$MNT/copy.raw")" = "$GOLDEN_SHA" ] || fail "copy.raw differs after gc"

step "tessera stats adds up the datastore folder: packs, metadata, backup, reserve"
tessera stats "$DS" >"$TEST_TMP/stats.txt" || fail "tessera stats failed while mounted"
for line in "^metadata " "^metadata backup " "^space reserve " "^datastore folder "; do
    grep -q "$line" "$TEST_TMP/stats.txt" || fail "tessera stats has no '$line' line: $(cat "$TEST_TMP/stats.txt")"
done
tessera stats "$DS" --json >"$TEST_TMP/stats-folder.json" || fail "tessera stats --json failed"
folder=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["folder_bytes"])' "$TEST_TMP/stats-folder.json")
# du counts the two folders' own blocks too (4 KiB each); nothing else may be missing.
on_disk=$(du -sb "$DS" | cut -f1)
[ $((on_disk - folder)) -ge 0 ] && [ $((on_disk - folder)) -le 65536 ] ||
    fail "stats says the folder holds $folder bytes, du -sb says $on_disk"
tessera du "$MNT/copy.raw" >"$TEST_TMP/du.txt" || fail "tessera du failed"
grep -q "metadata .* space reserve .* folder" "$TEST_TMP/du.txt" || fail "tessera du does not show metadata and the reserve: $(cat "$TEST_TMP/du.txt")"
log "stats: folder $folder bytes, du -sb $on_disk"

step "tessera stats --json on the mounted datastore"
tessera stats "$DS" --json >"$TEST_TMP/stats.json" || fail "tessera stats --json failed while mounted"
python3 - "$TEST_TMP/stats.json" <<'PY' || fail "stats --json: unparsable or dedup_ratio <= 1"
import json, sys
d = json.load(open(sys.argv[1]))
def find(o):
    if isinstance(o, dict):
        if "dedup_ratio" in o:
            return o["dedup_ratio"]
        for v in o.values():
            r = find(v)
            if r is not None:
                return r
    return None
r = find(d)
print("stats: dedup_ratio=%s" % r, {k: v for k, v in d.items() if not isinstance(v, (dict, list))}, file=sys.stderr)
sys.exit(0 if isinstance(r, (int, float)) and r > 1 else 1)
PY

step "tessera warm loads a template into the serving process's read cache"
tessera warm "$MNT/templates" --json >"$TEST_TMP/warm.json" || fail "tessera warm failed"
tessera stats "$DS" --json >"$TEST_TMP/stats-warm.json" || fail "tessera stats --json failed"
python3 - "$TEST_TMP/warm.json" "$TEST_TMP/stats-warm.json" <<'PY' || fail "tessera warm: $(cat "$TEST_TMP/warm.json")"
import json, sys
w = json.load(open(sys.argv[1]))[0]
s = json.load(open(sys.argv[2]))
# golden.raw: 64 MiB, a quarter of it zeros (holes are not chunks); it fits the 64 MiB cache.
assert w["files"] == 1 and w["chunks"] >= 2048 and not w["cache_full"], w
assert s["cache_capacity_bytes"] == 64 << 20, s["cache_capacity_bytes"]
assert s["cache_bytes"] >= w["bytes"] * 9 // 10, (s["cache_bytes"], w["bytes"])
PY
tessera warm "$MNT/templates/golden.raw" >"$TEST_TMP/warm.txt" || fail "tessera warm (text) failed"
grep -q "chunks of 1 file(s), 0 read from packs" "$TEST_TMP/warm.txt" || fail "a second warm read from packs again: $(cat "$TEST_TMP/warm.txt")"

step "error cases"
expect_error 'does not exist' tessera clone "$MNT/templates/missing.raw" "$MNT/desktops/x.raw"
[ ! -e "$MNT/desktops/x.raw" ] || fail "a failed clone left $MNT/desktops/x.raw behind"
expect_error 'exists' tessera clone "$MNT/templates/golden.raw" "$MNT/desktops/desk-001.raw"
[ "$(sha "$MNT/desktops/desk-001.raw")" = "$EXPECT_SHA" ] || fail "a refused clone changed its destination"
expect_nonzero tessera fsck "$DS"      # the datastore is in use
mkdir "$TEST_TMP/not-a-datastore"
expect_error . tessera fsck "$TEST_TMP/not-a-datastore"
[ -z "$(ls -A "$TEST_TMP/not-a-datastore")" ] || fail "fsck wrote into a directory that is not a datastore"
expect_error . tessera fsck "$TEST_TMP/no-such-dir"

step "clean unmount, fsck"
stop_mount "$MNT"
tessera fsck "$DS" || fail "tessera fsck after a clean unmount exited non-zero"

expect_error 'nothing serves' tessera warm "$DS/templates/golden.raw"

step "clone on the unmounted datastore"
tessera clone "$DS/templates/golden.raw" "$DS/desktops/offline.raw" || fail "offline tessera clone failed"

step "remount: everything must still be there"
start_mount "$DS" "$MNT"
[ "$(sha "$MNT/desktops/offline.raw")" = "$GOLDEN_SHA" ] || fail "offline.raw differs from golden"
[ "$(sha "$MNT/templates/golden.raw")" = "$GOLDEN_SHA" ] || fail "golden.raw changed across a remount"
[ "$(sha "$MNT/desktops/desk-001.raw")" = "$EXPECT_SHA" ] || fail "desk-001.raw lost its change across a remount"
[ "$(sha "$MNT/desktops/vm-010/golden.raw")" = "$GOLDEN_SHA" ] || fail "vm-010 changed across a remount"
[ "$(sha "$MNT/copy.raw")" = "$GOLDEN_SHA" ] || fail "copy.raw changed across a remount"
stop_mount "$MNT"
tessera fsck "$DS" || fail "final tessera fsck exited non-zero"
tessera stats "$DS" || fail "tessera stats failed"

step "damage: a flipped byte in a pack reads as EIO, scrub and fsck name the file"
DS2=$TEST_TMP/ds-damage
tessera init "$DS2" >/dev/null || fail "init of $DS2 failed"
start_mount "$DS2" "$MNT"
head -c 1M /dev/urandom >"$TEST_TMP/victim.bin"
tmo cp -- "$TEST_TMP/victim.bin" "$MNT/victim.raw" || fail "cp victim failed"
python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$MNT/victim.raw" || fail "fsync victim failed"
stop_mount "$MNT"
pack=$(ls "$DS2"/packs/*.pack | head -n 1)
# Flip one byte inside the first record's payload (16-byte pack header + 52-byte record header).
python3 - "$pack" <<'PY' || fail "could not damage $pack"
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(16 + 52 + 1000)
    b = f.read(1)
    f.seek(16 + 52 + 1000)
    f.write(bytes([b[0] ^ 0xFF]))
PY
out=$(tessera scrub "$DS2" 2>&1) && fail "scrub found no damage: $out"
grep -q "damaged: /victim.raw at offset 0" <<<"$out" || fail "scrub did not name /victim.raw at offset 0: $out"
log "scrub: $(grep -c "^damaged: " <<<"$out") damaged place(s) named"
tessera fsck "$DS2" >"$TEST_TMP/fsck-damage.log" 2>&1 && fail "fsck passed a damaged datastore"
grep -q "damaged file: /victim.raw" "$TEST_TMP/fsck-damage.log" || fail "fsck did not name /victim.raw"
start_mount "$DS2" "$MNT"
if err=$(dd if="$MNT/victim.raw" of=/dev/null bs=16k count=1 2>&1); then fail "damaged chunk read without error"; fi
grep -q "Input/output error" <<<"$err" || fail "damaged chunk: expected EIO, got: $err"
# The rest of the file stays readable.
tmo dd if="$MNT/victim.raw" of=/dev/null bs=16k skip=1 status=none || fail "undamaged chunks of victim.raw unreadable"
stop_mount "$MNT"
grep -q "victim.raw" "$TEST_TMP/logs/mount-$MOUNT_SEQ.log" || fail "the daemon's log does not name the damaged file"

step "format 1: a datastore written by an older build is converted at open, files intact"
# fixtures/format1-datastore.tar.zst: meta.redb and packs of a datastore made by the format-1
# build (commit 6f081d3): /vm1/disk.raw (sparse), its clone /vm1/clone.raw diverged by a
# few bytes, /b.txt and the symlink /link -> b.txt.
DS1=$TEST_TMP/ds-format1
mkdir -p "$DS1"
tar -C "$DS1" --zstd -xf "$(dirname -- "$0")/fixtures/format1-datastore.tar.zst" || fail "cannot unpack the format-1 fixture"
tessera fsck "$DS1" >"$TEST_TMP/fsck-format1.log" 2>&1 || { cat "$TEST_TMP/fsck-format1.log" >&2; fail "fsck of a converted format-1 datastore failed"; }
grep -q "converting .* from datastore format 1 to 2" "$TEST_TMP/fsck-format1.log" || fail "opening a format-1 datastore did not say it converts it"
[ -f "$DS1/meta.redb.format1" ] || fail "the format-1 metadata was not kept"
start_mount "$DS1" "$MNT"
for want in a5686bd438e7d37044b707aec67b3f9512ab38760cdabe4c0d665cf95f7d67af:vm1/clone.raw \
    671cc70b175d52f9a35edee4e001e8d6bcf394d9acafbcbbaa14001f26d97edf:vm1/disk.raw \
    5b288a34cbf992b1c846c001d774b7fbc5b421214be82f386935af8cbe15a81c:b.txt; do
    [ "$(sha "$MNT/${want#*:}")" = "${want%%:*}" ] || fail "format-1 file ${want#*:} changed in the conversion"
done
[ "$(readlink "$MNT/link")" = b.txt ] || fail "format-1 symlink changed in the conversion"
# The converted datastore takes writes and clones like a new one.
printf 'after' | dd of="$MNT/vm1/disk.raw" bs=1 seek=70000 conv=notrunc status=none || fail "write to a converted file failed"
tessera clone "$MNT/vm1/disk.raw" "$MNT/vm1/clone2.raw" >/dev/null || fail "clone in a converted datastore failed"
stop_mount "$MNT"
tessera fsck "$DS1" >/dev/null 2>&1 || fail "fsck after using a converted datastore failed"
log "format-1 datastore converted; files, symlink and clones intact"
