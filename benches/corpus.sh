#!/usr/bin/env bash
# benches/corpus.sh: the whole datastore against the dedup floor of a VDI corpus, and background
# reclamation after a pool churn (issue 10), on a loop-mounted ext4 disk (../shared/tools/peers).
#
#   write   the corpus (../shared/tools/corpus/make-corpus.sh: golden.raw + 8 diverged desktops,
#           18 GiB logical) written as full copies the two ways hypervisors and admins do:
#           golden and the odd desktops with qemu-img convert over NFS (qemu's own nfs://
#           client), the even desktops with cp through the FUSE mount; then 50 clones of the
#           golden image (`tessera clone`). One `tessera serve --nfs --mount` process; its
#           peak RSS is recorded. Stopped cleanly, what was stored uncompressed compressed
#           with `tessera gc` (timed), then measured: pack bytes and meta.redb,
#           against the floor from ../shared/tools/corpus/dedup-potential.py on the same
#           images (16 KiB fixed chunks, zstd-1 per chunk: what a perfect chunk store holds).
#   churn   half the desktops deleted and re-made as clones of golden, with the default
#           background reclamation (60 s interval, 64 MiB/s): dead share of pack bytes after
#           CHURN_WAIT s (target <= 10 %).
#
# Needs root, qemu-img with the nfs driver (qemu-block-extra), jq, python3 with numpy,
# zstandard and fastcdc (installed with pip when missing). Env: CORPUS (/var/tmp/corpus; built
# with 8 desktops when missing), CLONES (50), CHURN_WAIT (150), MNT_ROOT (/mnt),
# BENCH_RESULTS_DIR. Writes benches/results/corpus.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
CORPUS_TOOLS=$(realpath ../shared/tools/corpus)
MNT_ROOT=${MNT_ROOT:-/mnt}
CORPUS=${CORPUS:-/var/tmp/corpus}
CLONES=${CLONES:-50}
CHURN_WAIT=${CHURN_WAIT:-150}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
EXT4=$MNT_ROOT/peer-ext4
DS=$EXT4/ds
MNT=$MNT_ROOT/tessera-corpus
WORK=${WORK:-/tmp/tessera-corpus-work}
TPID=

ls "$CORPUS"/desktop-0{1..8}.raw >/dev/null 2>&1 || "$CORPUS_TOOLS/make-corpus.sh" "$CORPUS" 8
python3 -c 'import numpy, zstandard, fastcdc' 2>/dev/null ||
    pip install -q --break-system-packages numpy zstandard fastcdc
IMAGES=("$CORPUS/golden.raw" "$CORPUS"/desktop-0{1..8}.raw)

bench_begin corpus
bench_binary "$TESSERA"
bench_param CORPUS "$CORPUS" /var/tmp/corpus
bench_param CLONES "$CLONES" 50
bench_param CHURN_WAIT "$CHURN_WAIT" 150

cleanup() {
    [ -n "$TPID" ] && { kill "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; }
    fusermount3 -u "$MNT" 2>/dev/null || true
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK" "$MNT"
wait_ports_free 111 2049
"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"
"$TESSERA" init "$DS" >/dev/null

# The floor first (CPU only; nothing else runs).
python3 "$CORPUS_TOOLS/dedup-potential.py" --fixed 16 --cdc '' --levels 1 --jobs 1 \
    --json "$WORK/floor.json" "${IMAGES[@]}" >"$WORK/floor.txt"
floor=$(jq '.results[] | select(.scheme == "fixed-16K") | .zstd["1"]' "$WORK/floor.json")
[ -n "$floor" ] && [ "$floor" -gt 0 ] || { echo "bench: no floor in $WORK/floor.json" >&2; exit 1; }

serve() {
    start_tessera_nfs "$DS" "$WORK" --mount "$MNT"
    for _ in $(seq 1 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
}
stop() { stop_pid "$TPID"; TPID=; }
peak=0
watch_rss() { # background: the serving process's peak RSS (VmHWM), in KiB, into $WORK/hwm
    while kill -0 "$1" 2>/dev/null; do
        awk '/VmHWM/ { print $2 }' "/proc/$1/status" >"$WORK/hwm.tmp" 2>/dev/null && mv "$WORK/hwm.tmp" "$WORK/hwm"
        sleep 1
    done
}

# ---- write
serve
watch_rss "$TPID" &
t0=$(date +%s)
i=0
for img in "${IMAGES[@]}"; do
    name=$(basename "$img")
    if [ $((i % 2)) = 0 ]; then
        qemu-img convert -q -n -O raw "$img" "nfs://127.0.0.1/ds/$name" 2>/dev/null ||
            { qemu-img create -q -f raw "nfs://127.0.0.1/ds/$name" 2G && qemu-img convert -q -n -O raw "$img" "nfs://127.0.0.1/ds/$name"; }
    else
        cp --sparse=always "$img" "$MNT/$name"
        sync "$MNT/$name"
    fi
    i=$((i + 1))
done
"$TESSERA" clone "$MNT/golden.raw" "$MNT/clone-{n:03}.raw" --count "$CLONES" >/dev/null
t1=$(date +%s)
peak=$(cat "$WORK/hwm" 2>/dev/null || echo 0)
"$TESSERA" stats "$DS" --json >"$WORK/stats-serving.json"
stop
# New data is stored uncompressed (up to --raw-backlog) and compressed in the background once
# its packs are cold (10 min); measured at rest: `tessera gc` compresses it now, timed.
raw_packs=$(jq .pack_bytes "$WORK/stats-serving.json")
t2=$(date +%s.%N)
"$TESSERA" gc "$DS" >"$WORK/gc.txt"
t3=$(date +%s.%N)
cat "$WORK/gc.txt"
"$TESSERA" stats "$DS" --json >"$WORK/stats.json"
"$TESSERA" stats "$DS" >"$WORK/stats.txt"
packs=$(jq .pack_bytes "$WORK/stats.json")
meta=$(jq .metadata_bytes "$WORK/stats.json")
bak=$(jq .metadata_backup_bytes "$WORK/stats.json")
folder=$(jq .folder_bytes "$WORK/stats.json")
reserve=$(jq .reserve_bytes "$WORK/stats.json")
du_folder=$(du -sb "$DS" | cut -f1)
ratio=$(echo "($packs + $meta) / $floor" | bc -l)
share=$(echo "100 * $meta / $packs" | bc -l)
echo "bench: corpus written in $((t1 - t0)) s: packs $((packs >> 20)) MiB + metadata $((meta >> 20)) MiB = $(printf '%.3f' "$ratio")x the floor ($((floor >> 20)) MiB); metadata $(printf '%.2f' "$share") % of pack bytes; backup $((bak >> 20)) MiB, reserve $((reserve >> 20)) MiB, folder $((folder >> 20)) MiB (du -sb: $((du_folder >> 20)) MiB); peak RSS $((peak >> 10)) MiB"
sed -n '/^metadata /,/^datastore folder/p' "$WORK/stats.txt"

bench_metric floor_ratio x "packs + metadata over the dedup floor (dedup-potential.py: 16 KiB chunks, zstd-1), 9 images + $CLONES clones" \
    better=lower target="<= 1.05x" headline=1
bench_value floor_ratio tessera "$ratio"
bench_metric meta_share % "metadata (meta.redb) as a share of pack bytes" better=lower target="<= 3 %" headline=1
bench_value meta_share tessera "$share"
bench_metric floor MiB "the floor: zstd-1 size of the unique 16 KiB chunks of the 9 images"
bench_value floor floor "$(echo "$floor / 1048576" | bc -l)"
bench_metric packs MiB "pack files" better=lower
bench_value packs tessera "$(echo "$packs / 1048576" | bc -l)"
bench_metric raw_packs MiB "pack files right after the writes, before the background compresses what was stored uncompressed" better=lower
bench_value raw_packs tessera "$(echo "$raw_packs / 1048576" | bc -l)"
bench_metric compress_s s "tessera gc compressing it (the background does it once the packs are cold)" better=lower
bench_value compress_s tessera "$(echo "$t3 - $t2" | bc -l)"
bench_metric meta MiB "meta.redb after a clean stop (compacted)" better=lower
bench_value meta tessera "$(echo "$meta / 1048576" | bc -l)"
bench_metric meta_serving MiB "meta.redb while serving, right after the writes (free pages not compacted)" better=lower
bench_value meta_serving tessera "$(echo "$(jq .metadata_bytes "$WORK/stats-serving.json") / 1048576" | bc -l)"
bench_metric folder MiB "the datastore folder (packs, metadata, backup copy, space reserve)" better=lower \
    note="tessera stats adds it up; du -sb agrees"
bench_value folder tessera "$(echo "$folder / 1048576" | bc -l)"
bench_value folder "du -sb" "$(echo "$du_folder / 1048576" | bc -l)"
bench_metric write_rss MiB "peak RSS of the serving process while writing the corpus" better=lower target="<= 512 MiB"
bench_value write_rss tessera "$(echo "$peak / 1024" | bc -l)"

# ---- churn: delete half the desktops, re-make them as clones, let background gc work
serve
watch_rss "$TPID" &
for n in 02 04 06 08; do rm -f "$MNT/desktop-$n.raw"; done
sync
for n in 02 04 06 08; do "$TESSERA" clone "$MNT/golden.raw" "$MNT/desktop-$n.raw" >/dev/null; done
"$TESSERA" stats "$DS" --json >"$WORK/churn-before.json"
sleep "$CHURN_WAIT"
"$TESSERA" stats "$DS" --json >"$WORK/churn-after.json"
peak2=$(cat "$WORK/hwm" 2>/dev/null || echo 0)
stop
dead0=$(jq '.reclaimable_bytes / .pack_bytes * 100' "$WORK/churn-before.json")
dead1=$(jq '.reclaimable_bytes / .pack_bytes * 100' "$WORK/churn-after.json")
echo "bench: churn: dead share of pack bytes $(printf '%.1f' "$dead0") % after deleting 4 desktops, $(printf '%.1f' "$dead1") % ${CHURN_WAIT} s later (background gc, defaults); peak RSS $((peak2 >> 10)) MiB"
bench_metric churn_dead % "dead share of pack bytes after deleting and re-cloning half the desktops, ${CHURN_WAIT} s later (background gc, defaults)" \
    subject=after refs=before better=lower target="<= 10 %" headline=1
bench_value churn_dead before "$dead0"
bench_value churn_dead after "$dead1"
bench_metric churn_rss MiB "peak RSS of the serving process during the churn and compaction" better=lower target="<= 512 MiB"
bench_value churn_rss tessera "$(echo "$peak2 / 1024" | bc -l)"
bench_finish
