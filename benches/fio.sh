#!/usr/bin/env bash
# benches/fio.sh: fio through a Tessera mount against ext4 and bindfs (a FUSE passthrough),
# measured in the same run on the same loop-mounted ext4 disk. Tessera's datastore lives on
# the ext4 peer's filesystem, so all three write to the same device.
#
# Uses ../shared/tools/peers (mount-peer.sh, bench.sh, report.py). Needs root.
# Env: TESTS (default "seqwrite seqread vdi dedup"), VDI_RUNTIME (60), VDI_SIZE (2g),
#      PEERS_DIR (../shared/tools/peers), MNT_ROOT (/mnt), RAW_ROOT (/tmp/tessera-bench-raw).
# Prints bench.sh's key=value lines, then a markdown table (report.py) and Tessera/ext4 ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
MNT_ROOT=${MNT_ROOT:-/mnt}
export RAW_ROOT=${RAW_ROOT:-/tmp/tessera-bench-raw}
export TESTS=${TESTS:-seqwrite seqread vdi dedup}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
rm -rf "$RAW_ROOT"; mkdir -p "$RAW_ROOT"

EXT4=$MNT_ROOT/peer-ext4
BINDFS=$MNT_ROOT/peer-bindfs
TMNT=$MNT_ROOT/tessera-bench
TPID=
cleanup() {
    if mountpoint -q "$TMNT"; then fusermount3 -u "$TMNT" || true; fi
    [ -n "$TPID" ] && timeout 60 tail --pid="$TPID" -f /dev/null || true
    "$PEERS_DIR/umount-peer.sh" bindfs "$BINDFS" >/dev/null 2>&1 || true
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"
"$PEERS_DIR/bench.sh" "$EXT4" ext4

"$PEERS_DIR/umount-peer.sh" bindfs "$BINDFS" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" bindfs "$BINDFS"
"$PEERS_DIR/bench.sh" "$BINDFS" bindfs
"$PEERS_DIR/umount-peer.sh" bindfs "$BINDFS"

DS=$EXT4/tessera-ds
rm -rf "$DS"; mkdir -p "$TMNT"
"$TESSERA" init "$DS" >/dev/null
TESSERA_LOG=warn "$TESSERA" mount "$DS" "$TMNT" 2>"$RAW_ROOT/tessera-mount.log" &
TPID=$!
for _ in $(seq 100); do mountpoint -q "$TMNT" && break; sleep 0.2; done
mountpoint -q "$TMNT" || { echo "tessera did not mount" >&2; exit 1; }
"$PEERS_DIR/bench.sh" "$TMNT" tessera
echo "tessera peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/$TPID/status)"
"$TESSERA" stats "$DS" || true

python3 "$PEERS_DIR/report.py" "$RAW_ROOT" || true
# Ratios against ext4 and bindfs from this run.
python3 - "$RAW_ROOT" <<'PY'
import glob, os, sys
rows = {}
for f in glob.glob(os.path.join(sys.argv[1], "*", "results.txt")):
    for line in open(f):
        d = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        key = (d.get("label"), d.get("test"), d.get("mode", ""))
        rows[key] = d
def val(label, test, field, mode=""):
    d = rows.get((label, test, mode))
    try:
        return float(d[field]) if d else None
    except (KeyError, ValueError):
        return None
print("\n| metric | tessera | ext4 | bindfs | tessera/ext4 | tessera/bindfs |\n|---|---|---|---|---|---|")
for test, field, mode in [("seqwrite", "MBps", ""), ("seqread", "MBps", ""),
                          ("vdi", "iops", "libaio"), ("vdi", "iops", "psync")]:
    t, e, b = (val(l, test, field, mode) for l in ("tessera", "ext4", "bindfs"))
    r = lambda a, c: f"{a / c:.2f}x" if a and c else "n/a"
    print(f"| {test} {mode} {field} | {t} | {e} | {b} | {r(t, e)} | {r(t, b)} |")
PY
