#!/usr/bin/env bash
# benches/rss.sh: memory stays bounded whatever is written. Writes SIZE (default 20g) of
# unique, half-compressible data through a Tessera mount with fio (1 MiB sequential writes),
# then reports the daemon's peak resident memory (VmHWM) and the write throughput.
# Target: peak RSS < 512 MiB after 20 GiB. Needs root; needs SIZE of free disk under /var/tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
TESSERA=${TESSERA:-$PWD/target/release/tessera}
SIZE=${SIZE:-20g}
[ -x "$TESSERA" ] || cargo build --release --locked
W=$(mktemp -d /var/tmp/tessera-rss.XXXXXX)
trap 'mountpoint -q "$W/mnt" && fusermount3 -u "$W/mnt"; sleep 1; rm -rf "$W"' EXIT
"$TESSERA" init "$W/ds" >/dev/null
mkdir -p "$W/mnt"
TESSERA_LOG=warn "$TESSERA" mount "$W/ds" "$W/mnt" 2>"$W/mount.log" &
PID=$!
for _ in $(seq 100); do mountpoint -q "$W/mnt" && break; sleep 0.2; done
fio --name=fill --filename="$W/mnt/big.raw" --rw=write --bs=1M --size="$SIZE" --refill_buffers \
    --buffer_compress_percentage=50 --end_fsync=1 --output-format=json --output="$W/fio.json" >/dev/null
MBPS=$(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['bw_bytes']/1e6))" "$W/fio.json")
echo "wrote $SIZE through the mount at $MBPS MB/s; tessera peak RSS $(awk '/VmHWM/{printf "%.0f MiB", $2/1024}' /proc/$PID/status), now $(awk '/VmRSS/{printf "%.0f MiB", $2/1024}' /proc/$PID/status)"
"$TESSERA" stats "$W/ds" | grep -E "unique|stored|metadata"
