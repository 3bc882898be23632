#!/usr/bin/env bash
# benches/space.sh: reclamation and scrub, on a loop-mounted ext4 disk (../shared/tools/peers).
#
#   gc         40 files of 64 MiB (compressible, unique) written, every other one deleted, so the
#              packs are half dead; `tessera gc --min-live 0.6` timed: MB/s and chunks/s moved,
#              MB/s freed (pack bytes deleted per second)
#   vdi+gc     fio's VDI profile (../shared/tools/peers/bench.sh, libaio QD16, VDI_RUNTIME s)
#              through the mount, first alone, then while `tessera gc --min-live GC_MIN_LIVE
#              --max-rate GC_RATE` keeps compacting a second, half-dead pool of packs (run
#              again every 0.2 s): IOPS ratio. GC_MIN_LIVE 0.6 is what background reclamation
#              picks for a half-dead pool (the packs just above half live; src/fs/gc.rs
#              `reclaim_threshold`); 0.99 would also re-compact the pack fio writes into on
#              every pass, which nothing does unattended
#   scrub      `tessera scrub` of the datastore from cold caches vs `cat` of its pack files
#              (the disk's sequential read speed), both in pack bytes per second
#   delete     100 clones of a 512 MiB template, each diverged by 50 MiB, deleted while mounted
#              with the default background reclamation (60 s interval, 64 MiB/s): time until
#              the space is back on the disk, and the disk's usage before and after
#
# Needs root, fio, jq. Env: PARTS ("gc vdi scrub delete"), VDI_RUNTIME (30), GC_RATE (64 MiB/s),
# GC_MIN_LIVE (0.6),
# CLONES (100), POOL_FILES (40: files of 64 MiB per pool), MNT_ROOT (/mnt), BENCH_RESULTS_DIR.
# Writes benches/results/space.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
MNT_ROOT=${MNT_ROOT:-/mnt}
export VDI_RUNTIME=${VDI_RUNTIME:-30}
GC_RATE=${GC_RATE:-64}
GC_MIN_LIVE=${GC_MIN_LIVE:-0.6}
CLONES=${CLONES:-100}
POOL_FILES=${POOL_FILES:-40}
PARTS=${PARTS:-gc vdi scrub delete}
part() { [[ " $PARTS " == *" $1 "* ]]; }
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
EXT4=$MNT_ROOT/peer-ext4
DS=$EXT4/ds
MNT=$MNT_ROOT/tessera-space
export RAW_ROOT=${RAW_ROOT:-/tmp/tessera-space-raw}
TPID=

bench_begin space
bench_binary "$TESSERA"
bench_param PARTS "$PARTS" "gc vdi scrub delete"
bench_param VDI_RUNTIME "$VDI_RUNTIME" 30
bench_param GC_RATE "$GC_RATE" 64
bench_param GC_MIN_LIVE "$GC_MIN_LIVE" 0.6
bench_param CLONES "$CLONES" 100
bench_param POOL_FILES "$POOL_FILES" 40

now() { date +%s.%N; }
used() { df -B1 --output=used "$EXT4" | tail -n 1; }
mb() { echo "$1 / 1000000" | bc -l | xargs printf '%.0f'; }

mount_ds() {
    mkdir -p "$MNT"
    "$TESSERA" mount "$DS" "$MNT" "$@" 2>>"$RAW_ROOT/tessera.log" &
    TPID=$!
    for _ in $(seq 1 100); do mountpoint -q "$MNT" && return; sleep 0.1; done
    echo "bench: mount failed" >&2; exit 1
}
umount_ds() {
    fusermount3 -u "$MNT"
    wait "$TPID" || true
    TPID=
}
cleanup() {
    [ -n "$TPID" ] && { fusermount3 -u "$MNT" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; }
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rm -rf "$RAW_ROOT"; mkdir -p "$RAW_ROOT"
"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"
rm -rf "$DS"; "$TESSERA" init "$DS" >/dev/null

# write_pool DIR N: N files of 64 MiB, compressible (2:1) and unique, through the mount
write_pool() {
    mkdir -p "$1"
    python3 - "$1" "$2" <<'PY'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2])
r = random.Random(hash(d) & 0xffff)
for i in range(n):
    with open(os.path.join(d, f"f{i:03}.raw"), "wb") as f:
        for _ in range(64):
            b = bytearray(r.randbytes(512 << 10)) + bytes(512 << 10)
            f.write(b)
        f.flush(); os.fsync(f.fileno())
PY
}
delete_half() { find "$1" -name 'f*[02468].raw' -delete; sync; }

# ---- gc throughput
# --raw-backlog 0: new data compressed as it is written, so the compaction measured below is
# of packs at rest (with data stored uncompressed, every `tessera gc` would compress it too).
mount_ds --gc-interval 0 --raw-backlog 0
write_pool "$MNT/pool1" "$POOL_FILES"
if part gc; then
delete_half "$MNT/pool1"
t0=$(now)
"$TESSERA" gc "$DS" --min-live 0.6 --json >"$RAW_ROOT/gc.json"
t1=$(now)
secs=$(echo "$t1 - $t0" | bc -l)
moved=$(jq .bytes_moved "$RAW_ROOT/gc.json"); freed=$(jq .bytes_freed "$RAW_ROOT/gc.json")
chunks=$(jq .chunks_moved "$RAW_ROOT/gc.json")
fi
if part gc; then
    bench_metric gc_moved MB/s "tessera gc --min-live 0.6 after deleting half of $POOL_FILES x 64 MiB files: bytes moved per second" better=higher headline=1
    bench_value gc_moved tessera "$(echo "$moved / $secs / 1000000" | bc -l)"
    bench_metric gc_chunks chunks/s "same: chunks moved per second" better=higher
    bench_value gc_chunks tessera "$(echo "$chunks / $secs" | bc -l)"
    bench_metric gc_freed MB/s "same: pack bytes freed per second" better=higher
    bench_value gc_freed tessera "$(echo "$freed / $secs / 1000000" | bc -l)"
    bench_metric gc_moved_total MB "same: bytes moved in all"
    bench_value gc_moved_total tessera "$(echo "$moved / 1000000" | bc -l)"
fi
part gc && echo "bench: gc $(printf '%.1f' "$secs") s: moved $(mb "$moved") MB ($(mb "$(echo "$moved / $secs" | bc -l)") MB/s, $(printf '%.0f' "$(echo "$chunks / $secs" | bc -l)") chunks/s), freed $(mb "$freed") MB ($(mb "$(echo "$freed / $secs" | bc -l)") MB/s)"

# ---- VDI profile alone, then during compaction
if part vdi; then
TESTS=vdi VDI_MODES=libaio "$PEERS_DIR/bench.sh" "$MNT" vdi-alone | tee "$RAW_ROOT/vdi-alone.txt"
write_pool "$MNT/pool2" "$POOL_FILES"
delete_half "$MNT/pool2"
(
    while :; do "$TESSERA" gc "$DS" --min-live "$GC_MIN_LIVE" --max-rate "$GC_RATE" --json >>"$RAW_ROOT/gc-during.json" 2>/dev/null || true; sleep 0.2; done
) &
GCLOOP=$!
TESTS=vdi VDI_MODES=libaio "$PEERS_DIR/bench.sh" "$MNT" vdi-gc | tee "$RAW_ROOT/vdi-gc.txt"
kill "$GCLOOP"; wait "$GCLOOP" 2>/dev/null || true
iops() { grep -o ' iops=[0-9]*' "$1" | head -n 1 | cut -d= -f2; }
a=$(iops "$RAW_ROOT/vdi-alone.txt"); b=$(iops "$RAW_ROOT/vdi-gc.txt")
moved_during=$(jq -s 'map(.bytes_moved) | add' "$RAW_ROOT/gc-during.json")
bench_metric vdi_gc IOPS "fio VDI profile (libaio QD16, ${VDI_RUNTIME} s) while gc --min-live $GC_MIN_LIVE --max-rate $GC_RATE compacts, against it alone" \
    subject="during gc" refs=alone better=higher target=">= 0.8x (<= 20 % loss)" headline=1
bench_value vdi_gc alone "$a"
bench_value vdi_gc "during gc" "$b"
bench_metric vdi_gc_moved MB "bytes gc moved during that fio run"
bench_value vdi_gc_moved "during gc" "$(echo "$moved_during / 1000000" | bc -l)"
echo "bench: vdi libaio alone $a IOPS, during gc (--max-rate $GC_RATE) $b IOPS: $(printf '%.2f' "$(echo "$b / $a" | bc -l)")x; gc moved $(mb "$moved_during") MB meanwhile"
fi
umount_ds

# ---- scrub vs the disk's sequential read (packs compacted first: every pack byte is live, so
# both read the same bytes)
if part scrub; then
"$TESSERA" gc "$DS" --min-live 1.0 >/dev/null
cache=cold
drop_caches || cache=warm
pack_bytes=$(du -cb "$DS"/packs/*.pack | tail -n 1 | cut -f1)
t0=$(now); cat "$DS"/packs/*.pack >/dev/null; t1=$(now)
disk=$(echo "$pack_bytes / ($t1 - $t0)" | bc -l)
drop_caches || cache=warm
t0=$(now); "$TESSERA" scrub "$DS" --json >"$RAW_ROOT/scrub.json"; t1=$(now)
scrub=$(echo "$pack_bytes / ($t1 - $t0)" | bc -l)
bench_metric scrub MB/s "tessera scrub vs cat of the same pack files, in pack bytes per second" \
    subject=scrub refs="cat of the packs" better=higher cache=$cache target=">= 0.7x" headline=1
bench_value scrub scrub "$(echo "$scrub / 1000000" | bc -l)"
bench_value scrub "cat of the packs" "$(echo "$disk / 1000000" | bc -l)"
echo "bench: scrub $(mb "$scrub") MB/s of packs ($(mb "$pack_bytes") MB of packs, $(mb "$(jq .bytes_checked "$RAW_ROOT/scrub.json")") MB verified after decompression) vs sequential read $(mb "$disk") MB/s: $(printf '%.2f' "$(echo "$scrub / $disk" | bc -l)")x"
fi

# ---- delete 100 diverged clones, background reclamation with its defaults
part delete || { bench_finish; exit 0; }
rm -rf "$DS"; "$TESSERA" init "$DS" >/dev/null
mount_ds
mkdir -p "$MNT/templates" "$MNT/desktops"
python3 - "$MNT/templates/golden.raw" <<'PY'
import os, random, sys
r = random.Random(7)
with open(sys.argv[1], "wb") as f:
    for _ in range(512):
        f.write(bytearray(r.randbytes(512 << 10)) + bytes(512 << 10))
    f.flush(); os.fsync(f.fileno())
PY
sync
template_used=$(used)
"$TESSERA" clone "$MNT/templates/golden.raw" "$MNT/desktops/desk-{n:03}.raw" --count "$CLONES" >/dev/null
python3 - "$MNT/desktops" "$CLONES" <<'PY'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2])
r = random.Random(11)
for i in range(1, n + 1):
    with open(os.path.join(d, f"desk-{i:03}.raw"), "r+b") as f:
        for _ in range(50):  # 50 MiB of new data, at random 1 MiB-aligned places
            f.seek(r.randrange(0, 512) << 20)
            f.write(bytearray(r.randbytes(512 << 10)) + bytes(512 << 10))
        f.flush(); os.fsync(f.fileno())
PY
sync
before=$(used)
t0=$(now)
rm -rf "$MNT/desktops"
sync
# back: within 10 % of the clones' space above what the template alone used
until [ "$(used)" -le $((template_used + (before - template_used) / 10)) ]; do
    [ "$(echo "$(now) - $t0 > 600" | bc)" = 1 ] && { echo "bench: space not back in 10 min" >&2; break; }
    sleep 1
done
t1=$(now)
after=$(used)
echo "bench: delete $CLONES clones diverged by 50 MiB: disk used $(mb "$template_used") MB (template) -> $(mb "$before") MB (with clones) -> $(mb "$after") MB, space back $(printf '%.0f' "$(echo "$t1 - $t0" | bc -l)") s after the delete (background gc, defaults)"
umount_ds
bench_metric delete_back s "delete $CLONES clones of a 512 MiB template diverged by 50 MiB each: time until the space is back (background gc, defaults)" \
    better=lower headline=1 note="at most the 60 s interval plus the copy time: depends on where the interval is when the delete happens"
bench_value delete_back tessera "$(echo "$t1 - $t0" | bc -l)"
bench_metric disk_template MB "disk used with the template alone" better=lower
bench_value disk_template tessera "$(echo "$template_used / 1000000" | bc -l)"
bench_metric disk_clones MB "disk used with the template and the clones" better=lower
bench_value disk_clones tessera "$(echo "$before / 1000000" | bc -l)"
bench_metric disk_after MB "disk used after the delete, once the space is back" better=lower
bench_value disk_after tessera "$(echo "$after / 1000000" | bc -l)"
bench_finish
