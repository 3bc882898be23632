#!/usr/bin/env bash
# benches/clone.sh: end-to-end clone latency from the CLI (process start, control socket,
# durable commit) for files of 64 MiB, 4 GiB and 64 GiB (CLONE_SIZES in MiB), and
# `--count 1000` of a VM folder. Reference, same run: btrfs `cp --reflink=always` of the same
# sizes on the ../shared peers btrfs mount (skipped if btrfs cannot be mounted).
# Needs root. Env: CLONE_SIZES (default "64 4096 65536"), COUNT (1000), REPS (5),
# BENCH_RESULTS_DIR (benches/results). Writes benches/results/clone.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
TESSERA=${TESSERA:-$PWD/target/release/tessera}
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers 2>/dev/null || true)}
SIZES=${CLONE_SIZES:-64 4096 65536}
COUNT=${COUNT:-1000}
REPS=${REPS:-5}
[ -x "$TESSERA" ] || cargo build --release --locked
bench_begin clone
bench_binary "$TESSERA"
bench_param CLONE_SIZES "$SIZES" "64 4096 65536"
bench_param COUNT "$COUNT" 1000
bench_param REPS "$REPS" 5
W=$(mktemp -d /var/tmp/tessera-clonebench.XXXXXX)
MNT=$W/mnt
BTRFS=/mnt/peer-btrfs
cleanup() {
    mountpoint -q "$MNT" && fusermount3 -u "$MNT"
    sleep 1
    [ -n "$PEERS_DIR" ] && "$PEERS_DIR/umount-peer.sh" btrfs "$BTRFS" >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT
now_ns() { date +%s%N; }
# median of REPS runs of "$@" in ms
median_ms() {
    local i t0 ts=()
    for ((i = 0; i < REPS; i++)); do
        t0=$(now_ns); "$@" "$i" >/dev/null; ts+=($(( ($(now_ns) - t0) / 1000 )))
    done
    printf '%s\n' "${ts[@]}" | sort -n | awk '{a[NR]=$1} END{printf "%.2f", a[int((NR+1)/2)]/1000}'
}
# A file of SIZE MiB: one repeated 1 MiB block (dedups to 64 chunks, but the chunk map is full).
make_file() { head -c 1M /dev/urandom > "$W/block"; for ((i = 0; i < $2; i++)); do cat "$W/block"; done > "$1"; }

"$TESSERA" init "$W/ds" >/dev/null
mkdir -p "$MNT"
TESSERA_LOG=warn "$TESSERA" mount "$W/ds" "$MNT" 2>"$W/mount.log" &
for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.2; done
mkdir -p "$MNT/t" "$MNT/d" "$MNT/vm"
tclone() { "$TESSERA" clone "$MNT/t/f$1.raw" "$MNT/d/f$1-$2.raw"; }
declare -A T B
for s in $SIZES; do
    make_file "$MNT/t/f$s.raw" "$s"; sync
    "$TESSERA" clone "$MNT/t/f$s.raw" "$MNT/d/warm-$s.raw" >/dev/null # flushes the write-back buffer
    T[$s]=$(median_ms tclone "$s")
done
# A VM folder (disk + config + nvram), cloned COUNT times in one call.
make_file "$MNT/vm/disk.raw" 64; echo "memsize = 4096" > "$MNT/vm/vm.vmx"; head -c 8k /dev/zero > "$MNT/vm/nvram"
t0=$(now_ns); "$TESSERA" clone "$MNT/vm" "$MNT/d/desk-{n:04}" --count "$COUNT" >/dev/null; count_ms=$(( ($(now_ns) - t0) / 1000000 ))
[ "$(ls "$MNT/d" | grep -c '^desk-')" = "$COUNT" ] || { echo "count clone made the wrong number of folders" >&2; exit 1; }

if [ -n "$PEERS_DIR" ] && "$PEERS_DIR/mount-peer.sh" btrfs "$BTRFS" >/dev/null 2>&1; then
    bclone() { cp --reflink=always "$BTRFS/f$1.raw" "$BTRFS/f$1-$2.raw"; sync -f "$BTRFS/f$1-$2.raw"; }
    for s in $SIZES; do
        if [ "$(df -BM --output=avail "$BTRFS" | tail -1 | tr -dc 0-9)" -gt $((s * 2)) ]; then
            make_file "$BTRFS/f$s.raw" "$s"; sync
            B[$s]=$(median_ms bclone "$s")
        fi
    done
fi
echo "clone latency, median of $REPS, end to end from the CLI ($(nproc) cores)"
echo
echo "| file size | tessera clone (ms) | btrfs cp --reflink + sync (ms) | tessera/btrfs |"
echo "|---|---|---|---|"
for s in $SIZES; do
    b=${B[$s]:-n/a}
    r=$( [ "$b" != n/a ] && awk -v t="${T[$s]}" -v b="$b" 'BEGIN{printf "%.2fx", t/b}' || echo n/a)
    echo "| $s MiB | ${T[$s]} | $b | $r |"
done
echo
echo "--count $COUNT of a 3-file VM folder: $count_ms ms"

for s in $SIZES; do
    h=0; [ "$s" = 4096 ] && h=1
    bench_metric "clone_$s" ms "clone of a $s MiB file, median of $REPS (end to end from the CLI)" \
        subject=tessera refs=btrfs better=lower headline=$h \
        note="btrfs: cp --reflink=always + sync of the same file; n/a when it does not fit the btrfs image"
    bench_value "clone_$s" tessera "${T[$s]}"
    bench_value "clone_$s" btrfs "${B[$s]:-}"
done
bench_metric count_ms ms "clone --count $COUNT of a 3-file VM folder (one call)" better=lower \
    target="< 5000 ms" headline=1
bench_value count_ms tessera "$count_ms"
bench_finish
