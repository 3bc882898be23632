#!/usr/bin/env bash
# benches/fio.sh: fio through a Tessera mount against ext4 and bindfs (a FUSE passthrough),
# measured in the same run on the same loop-mounted ext4 disk. Tessera's datastore lives on
# the ext4 peer's filesystem, so all three write to the same device.
#
# Uses ../shared/tools/peers (mount-peer.sh, bench.sh, report.py). Needs root.
# Env: TESTS (default "seqwrite seqread vdi dedup"), VDI_RUNTIME (60), VDI_SIZE (2g),
#      PEERS_DIR (../shared/tools/peers), MNT_ROOT (/mnt), RAW_ROOT (/tmp/tessera-bench-raw).
# Prints bench.sh's key=value lines, then a markdown table (report.py) and Tessera/ext4 ratios;
# writes benches/results/fio.json (BENCH_RESULTS_DIR). bench.sh drops the page cache before the
# seq read without checking that it worked: this script checks that the kernel accepts the drop
# before each filesystem's run and labels the seq read warm if it does not.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
MNT_ROOT=${MNT_ROOT:-/mnt}
export RAW_ROOT=${RAW_ROOT:-/tmp/tessera-bench-raw}
export TESTS=${TESTS:-seqwrite seqread vdi dedup}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
rm -rf "$RAW_ROOT"; mkdir -p "$RAW_ROOT"
bench_begin fio
bench_binary "$TESSERA"
bench_param TESTS "$TESTS" "seqwrite seqread vdi dedup"
bench_param VDI_RUNTIME "${VDI_RUNTIME:-60}" 60
bench_param VDI_SIZE "${VDI_SIZE:-2g}" 2g
COLD=cold
probe_drop() { drop_caches || COLD=warm; }

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
probe_drop
"$PEERS_DIR/bench.sh" "$EXT4" ext4

"$PEERS_DIR/umount-peer.sh" bindfs "$BINDFS" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" bindfs "$BINDFS"
probe_drop
"$PEERS_DIR/bench.sh" "$BINDFS" bindfs
"$PEERS_DIR/umount-peer.sh" bindfs "$BINDFS"

DS=$EXT4/tessera-ds
rm -rf "$DS"; mkdir -p "$TMNT"
"$TESSERA" init "$DS" >/dev/null
# --gc-interval 0: no background reclamation during the run, else the space it frees from the
# earlier tests is counted against the dedup copy (a negative "added")
TESSERA_LOG=warn "$TESSERA" mount "$DS" "$TMNT" --gc-interval 0 2>"$RAW_ROOT/tessera-mount.log" &
TPID=$!
for _ in $(seq 100); do mountpoint -q "$TMNT" && break; sleep 0.2; done
mountpoint -q "$TMNT" || { echo "tessera did not mount" >&2; exit 1; }
probe_drop
"$PEERS_DIR/bench.sh" "$TMNT" tessera
probe_drop
echo "tessera peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/$TPID/status)"
"$TESSERA" stats "$DS" || true

python3 "$PEERS_DIR/report.py" "$RAW_ROOT" || true
# Ratios against ext4 and bindfs from this run; the figures go into the results records.
COLD=$COLD python3 - "$RAW_ROOT" "$BENCH_REC" <<'PY'
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

figs = [
    ("seqwrite", "MB/s", "seq write, 1 MiB blocks, 1 GiB + fsync (fio)", "seqwrite", "MBps", "", "higher",
     [">= 0.5x ext4"], ["headline=1"]),
    ("seqread", "MB/s", "seq read, 1 MiB blocks, 1 GiB (fio)", "seqread", "MBps", "", "higher",
     [">= 0.7x ext4"], ["headline=1", "cache=" + os.environ.get("COLD", "cold")]),
    ("vdi_libaio", "IOPS", "VDI profile, 4 KiB 80 % write 80 % random, libaio QD16, direct", "vdi", "iops",
     "libaio", "higher", [">= 1.5x bindfs, >= 0.5x ext4"], ["headline=1"]),
    ("vdi_psync", "IOPS", "VDI profile, psync x4, direct", "vdi", "iops", "psync", "higher", [">= 1.0x bindfs"],
     []),
    ("dedup_added", "MiB", "second full copy of a 1 GiB file adds", "dedup", "second_copy_added_bytes", "",
     "lower", ["<= 0.5 % (5.1 MiB)"], ["headline=1", "note=Tessera mounted with --gc-interval 0 for the whole run"]),
]
with open(sys.argv[2], "a") as rec:
    for fid, unit, label, test, field, mode, better, target, extra in figs:
        vals = {l: val(l, test, field, mode) for l in ("tessera", "ext4", "bindfs")}
        if all(v is None for v in vals.values()):
            continue
        if fid == "dedup_added":
            vals = {l: (v / 2**20 if v is not None else None) for l, v in vals.items()}
        kv = ["subject=tessera", "refs=ext4,bindfs", f"better={better}"] + [f"target={t}" for t in target] + extra
        rec.write("\t".join(["metric", fid, unit, label] + kv) + "\n")
        for l, v in vals.items():
            rec.write(f"value\t{fid}\t{l}\t{'null' if v is None else v}\n")
PY
bench_finish
