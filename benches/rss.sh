#!/usr/bin/env bash
# benches/rss.sh: memory stays bounded whatever is written. Writes SIZE (default 20g) of
# unique, half-compressible data through a Tessera mount with fio (1 MiB sequential writes),
# then reports the daemon's peak resident memory (VmHWM) and the write throughput.
# Target: peak RSS < 512 MiB after 20 GiB. Needs root; needs SIZE of free disk under /var/tmp.
# Env: SIZE (20g, fio's size syntax), BENCH_RESULTS_DIR. Writes benches/results/rss.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
TESSERA=${TESSERA:-$PWD/target/release/tessera}
SIZE=${SIZE:-20g}
[ -x "$TESSERA" ] || cargo build --release --locked
bench_begin rss
bench_binary "$TESSERA"
bench_param SIZE "$SIZE" 20g
W=$(mktemp -d /var/tmp/tessera-rss.XXXXXX)
trap 'mountpoint -q "$W/mnt" && fusermount3 -u "$W/mnt"; sleep 1; rm -rf "$W"' EXIT
"$TESSERA" init "$W/ds" >/dev/null
mkdir -p "$W/mnt"
TESSERA_LOG=warn "$TESSERA" mount "$W/ds" "$W/mnt" 2>"$W/mount.log" &
PID=$!
for _ in $(seq 100); do mountpoint -q "$W/mnt" && break; sleep 0.2; done
fio --name=fill --filename="$W/mnt/big.raw" --rw=write --bs=1M --size="$SIZE" --refill_buffers \
    --buffer_compress_percentage=50 --end_fsync=1 --output-format=json --output="$W/fio.json" >/dev/null
MBPS=$(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['bw_bytes']/1e6, 1))" "$W/fio.json")
HWM=$(awk '/VmHWM/{printf "%.1f", $2/1024}' /proc/$PID/status)
RSS=$(awk '/VmRSS/{printf "%.1f", $2/1024}' /proc/$PID/status)
echo "wrote $SIZE through the mount at $MBPS MB/s; tessera peak RSS $HWM MiB, now $RSS MiB"
"$TESSERA" stats "$W/ds" | grep -E "unique|stored|metadata"
bench_metric peak_rss MiB "peak RSS of the daemon (VmHWM) after writing $SIZE of unique data" better=lower \
    target="< 512 MiB" headline=1
bench_value peak_rss tessera "$HWM"
bench_metric rss_after MiB "RSS of the daemon after the write" better=lower
bench_value rss_after tessera "$RSS"
bench_metric write MB/s "sequential 1 MiB writes through the mount (fio, half-compressible, end_fsync)" \
    better=higher
bench_value write tessera "$MBPS"
bench_finish
