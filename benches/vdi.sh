#!/usr/bin/env bash
# benches/vdi.sh: the VDI profile the way a hypervisor drives a datastore, Tessera against
# nfs-ganesha (VFS FSAL), same run, same loop-mounted ext4 disk under both servers.
#
# The client is qemu's own NFS driver (libnfs): qemu-nbd --cache=none serves an nfs:// URL and
# fio's nbd engine drives it. Each server first receives the corpus golden image (2 GiB Debian,
# qemu-img convert), then:
#   qd1 qd4 qd16 qd64  one client, the VDI sizing profile (4 KiB, 80 % write, 80 % random) at
#                      queue depth 1, 4, 16 and 64: IOPS (reads + writes), write p99
#   pool4              four clients at once (4 qemu-nbd processes on 4 clones of the image, QD16
#                      each; `tessera clone` for Tessera, full copies for ganesha): total IOPS,
#                      write p99 over all of them
#   rss                Tessera's peak resident memory (VmHWM) over the whole run
#   cpu_server         each server's CPU time per I/O in its QD16 run (/proc/PID/stat, all
#                      threads): a figure the host's noise moves less than IOPS. On this CPU-bound
#                      2-core machine the IOPS ratio follows the ratio of the whole machine's CPU
#                      per I/O, and most of the difference is the server's own.
#   cpu_client         the client's CPU time per I/O in the same run: qemu-nbd (/proc) and fio
#                      (its own usr_cpu + sys_cpu)
#   cpu_machine        the whole machine's busy CPU time per I/O in the same run (/proc/stat:
#                      user, nice, system, irq, softirq; steal and idle left out)
#   cpu_*              where Tessera's CPU goes during the QD16 run, in microseconds per I/O:
#                      the engine's per-stage CPU timings (`tessera stats --json`, stages) and
#                      the rest of the process's CPU time (/proc/PID/stat): the NFS front end,
#                      RPC decoding and replies, the async runtime
# Writes are UNSTABLE (qemu's default with cache=none); each fio run ends with a flush (COMMIT),
# included in its time, so data acknowledged as durable is measured, not only buffered.
#
# Needs root, fio (nbd engine), qemu-utils, libnfs-utils, the corpus (built if missing); installs
# nfs-ganesha, nfs-ganesha-vfs and rpcbind when missing. Ports 111 and 2049 must be free.
# Env: CORPUS (/var/tmp/corpus), IMAGE (default the corpus golden image), RUNTIME (30 s per
#      point), QDS ("1 4 16 64"), CLIENTS (4), MNT_ROOT (/mnt), PEERS_DIR, TESSERA,
#      CHUNK_SIZE (Tessera's chunk size, `tessera init --chunk-size`; default 16K),
#      HOLD_MEMORY (e.g. 16G: keep that much memory in use for the whole run, as the desktops'
#      VMs do on a hypervisor host, so both servers' page caches recycle their own pages; see
#      `hold_memory` in benches/lib.sh and benches/README.md, "Memory the host took back"),
#      BENCH_RESULTS_DIR (benches/results). Writes benches/results/vdi.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
CORPUS=${CORPUS:-/var/tmp/corpus}
RUNTIME=${RUNTIME:-30}
QDS=${QDS:-1 4 16 64}
CLIENTS=${CLIENTS:-4}
MNT_ROOT=${MNT_ROOT:-/mnt}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
EXT4=$MNT_ROOT/peer-ext4
WORK=$(mktemp -d /var/tmp/tessera-vdi-bench.XXXXXX)
GOLDEN=${IMAGE:-$CORPUS/golden.raw}
if [ ! -f "$GOLDEN" ] && [ -z "${IMAGE:-}" ]; then
    ../shared/tools/corpus/make-corpus.sh "$CORPUS" 1
fi
need_ganesha
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench: fio has no nbd engine" >&2; exit 1; }

bench_begin vdi
bench_binary "$TESSERA"
gv=$(dpkg-query -W -f='${Version}' nfs-ganesha)
bench_param nfs-ganesha "$gv" "$gv" # the version measured against, not a knob
bench_param RUNTIME "$RUNTIME" 30
bench_param QDS "$QDS" "1 4 16 64"
bench_param CLIENTS "$CLIENTS" 4
bench_param IMAGE "$GOLDEN" "$CORPUS/golden.raw"
CHUNK_SIZE=${CHUNK_SIZE:-16K}
bench_param CHUNK_SIZE "$CHUNK_SIZE" 16K
HOLD_MEMORY=${HOLD_MEMORY:-none}
bench_param HOLD_MEMORY "$HOLD_MEMORY" none

TPID= GPID= RPCPID= HOLD_PID=
NBD_PIDS=()
stop_nbd() {
    local p
    for p in "${NBD_PIDS[@]}"; do stop_pid "$p"; done
    NBD_PIDS=()
}
cleanup() {
    stop_nbd
    stop_pid "$TPID"
    stop_pid "$GPID"
    stop_pid "$RPCPID"
    stop_pid "$HOLD_PID"
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"
[ "$HOLD_MEMORY" = none ] || hold_memory "$HOLD_MEMORY"

SIZE=$(stat -c %s "$GOLDEN")
declare -A R=()

# nbd_serve URL SOCK: qemu-nbd serving URL (qemu's NFS driver, no host cache) on a unix socket
nbd_serve() {
    rm -f "$2"
    qemu-nbd --cache=none -f raw -t --shared=4 --socket="$2" "$1" 2>>"$WORK/qemu-nbd.log" &
    NBD_PIDS+=($!)
    for _ in $(seq 1 100); do [ -S "$2" ] && return 0; sleep 0.1; done
    echo "bench: qemu-nbd did not come up for $1" >&2
    tail "$WORK/qemu-nbd.log" >&2
    return 1
}

# run_fio OUT QD SOCK...: the VDI profile, one fio job per socket, RUNTIME s, then a flush
run_fio() {
    local out=$1 qd=$2 i=0 s
    shift 2
    local args=(--output-format=json --output="$out" --group_reporting
        --ioengine=nbd --rw=randrw --rwmixwrite=80 --percentage_random=80 --bs=4k
        --iodepth="$qd" --size="$SIZE" --runtime="$RUNTIME" --time_based --end_fsync=1
        --randseed=42)
    for s in "$@"; do
        args+=(--name="c$i" --uri="nbd+unix:///?socket=$s" --randseed=$((42 + i)))
        i=$((i + 1))
    done
    fio "${args[@]}" >/dev/null
}

# summarise NAME KEY OUT: IOPS and write/read p99 (ms) of a fio run
summarise() {
    local v
    v=$(python3 - "$3" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
p99 = lambda d: d["clat_ns"]["percentile"]["99.000000"] / 1e6 if d["total_ios"] else 0
print(j["read"]["iops"] + j["write"]["iops"], p99(j["write"]), p99(j["read"]))
PY
    )
    read -r R[$1.$2] R[$1.$2_wp99] R[$1.$2_rp99] <<<"$v"
    printf 'bench: %-8s %-6s %8.0f IOPS  write p99 %6.2f ms  read p99 %6.2f ms\n' "$1" "$2" \
        "${R[$1.$2]}" "${R[$1.$2_wp99]}" "${R[$1.$2_rp99]}"
}

# cpu_mark NAME: the CPU time so far (clock ticks) of server NAME, of the qemu-nbd processes
# and of the whole machine (busy), on one line
cpu_mark() {
    local pid=$TPID p n=0
    [ "$1" = tessera ] || pid=$GPID
    for p in "${NBD_PIDS[@]}"; do n=$((n + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$(awk '{print $14 + $15}' "/proc/$pid/stat") $n $(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat)"
}

# server_cpu NAME: R[NAME.cpu_server], R[NAME.cpu_client] and R[NAME.cpu_machine], CPU
# microseconds per I/O in NAME's QD16 run (marks in $WORK/NAME-qd16.cpu)
server_cpu() {
    local v
    v=$(python3 - "$WORK/$1-qd16.json" "$WORK/$1-qd16.cpu" "$(getconf CLK_TCK)" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
a, b = (list(map(int, l.split())) for l in open(sys.argv[2]).read().splitlines())
hz = int(sys.argv[3])
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
us = lambda ticks: ticks / hz * 1e6 / ios
fio = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1e3 * 1e6 / ios
print(us(b[0] - a[0]), us(b[1] - a[1]) + fio, us(b[2] - a[2]))
PY
    )
    read -r R[$1.cpu_server] R[$1.cpu_client] R[$1.cpu_machine] <<<"$v"
    printf 'bench: %-8s CPU per I/O at QD16: server %.1f us, client %.1f us, machine busy %.1f us\n' \
        "$1" "${R[$1.cpu_server]}" "${R[$1.cpu_client]}" "${R[$1.cpu_machine]}"
}

# stage_mark PREFIX: Tessera's per-stage timings right now (its CPU time: cpu_mark)
stage_mark() {
    "$TESSERA" stats --json "$EXT4/ds" >"$1.json"
}

# run_suite NAME URL MAKE_COPY: MAKE_COPY N makes clone N of vdi-0.raw (server's way)
run_suite() {
    local name=$1 url=$2 copy=$3 qd n socks=() c0
    qemu-img convert -O raw "$GOLDEN" "$url/vdi-0.raw"
    # Tessera stores a fresh copy uncompressed and compresses it once its packs are cold;
    # compress it now, so the desktops run on a golden image as it is at rest.
    if [ "$name" = tessera ]; then sleep 1; "$TESSERA" gc "$EXT4/ds" >/dev/null; fi
    for qd in $QDS; do
        nbd_serve "$url/vdi-0.raw" "$WORK/nbd-0.sock"
        [ "$name.$qd" != tessera.16 ] || stage_mark "$WORK/stages0"
        c0=$(cpu_mark "$name")
        run_fio "$WORK/$name-qd$qd.json" "$qd" "$WORK/nbd-0.sock"
        [ "$qd" != 16 ] || printf '%s\n%s\n' "$c0" "$(cpu_mark "$name")" >"$WORK/$name-qd16.cpu"
        [ "$name.$qd" != tessera.16 ] || stage_mark "$WORK/stages1"
        stop_nbd
        trim_disk "$EXT4"
        summarise "$name" "qd$qd" "$WORK/$name-qd$qd.json"
        [ "$qd" != 16 ] || server_cpu "$name"
    done
    for n in $(seq 1 $((CLIENTS - 1))); do "$copy" "$n"; done
    for n in $(seq 0 $((CLIENTS - 1))); do
        nbd_serve "$url/vdi-$n.raw" "$WORK/nbd-$n.sock"
        socks+=("$WORK/nbd-$n.sock")
    done
    run_fio "$WORK/$name-pool.json" 16 "${socks[@]}"
    stop_nbd
    trim_disk "$EXT4"
    summarise "$name" pool "$WORK/$name-pool.json"
}

# ---- nfs-ganesha, VFS export of a folder on the ext4 disk
wait_ports_free 2049 111
mkdir -p "$EXT4/ganesha"
start_ganesha "$EXT4/ganesha" "$WORK"
ganesha_copy() { cp --sparse=always "$EXT4/ganesha/vdi-0.raw" "$EXT4/ganesha/vdi-$1.raw"; }
run_suite ganesha nfs://127.0.0.1/gan ganesha_copy
stop_pid "$GPID"; GPID=
stop_pid "$RPCPID"; RPCPID=
rm -rf "$EXT4/ganesha"

# ---- Tessera, datastore on the same ext4 disk
wait_ports_free 2049 111
"$TESSERA" init --chunk-size "$CHUNK_SIZE" "$EXT4/ds" >/dev/null
start_tessera_nfs "$EXT4/ds" "$WORK"
tessera_copy() { "$TESSERA" clone "$EXT4/ds/vdi-0.raw" "$EXT4/ds/vdi-$1.raw" >/dev/null; }
run_suite tessera nfs://127.0.0.1/ds tessera_copy
R[tessera.rss]=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$TPID/status")
echo "bench: tessera peak RSS ${R[tessera.rss]} MiB"
stop_pid "$TPID"; TPID=
rm -rf "$EXT4/ds"

# where the CPU went in Tessera's QD16 run, microseconds per I/O
STAGES="write_buffer rmw_read read hash compress append commit durable front_end"
declare -A CPU=()
while read -r k v; do CPU[$k]=$v; done < <(python3 - "$WORK" "$(getconf CLK_TCK)" <<'PY'
import json, sys
w, hz = sys.argv[1], int(sys.argv[2])
st = lambda f: {s["stage"]: s["seconds"] for s in json.load(open(f"{w}/{f}.json"))["stages"]}
a, b = st("stages0"), st("stages1")
d = {k: b[k] - a[k] for k in b}
# the server's CPU ticks over the QD16 run, first field of each cpu_mark line
t0, t1 = (int(l.split()[0]) for l in open(f"{w}/tessera-qd16.cpu").read().splitlines())
total = (t1 - t0) / hz
j = json.load(open(f"{w}/tessera-qd16.json"))["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
us = lambda x: x * 1e6 / ios
d["write_buffer"] = d.pop("write")  # without the loads it makes (rmw_read): stages nest, each charged once
engine = sum(d.values())
d["front_end"] = max(total - engine, 0.0)
print("total", us(total))
for k, v in d.items():
    print(k, us(v))
PY
)
printf 'bench: tessera CPU per I/O at QD16: %.0f us:' "${CPU[total]}"
for k in $STAGES; do printf ' %s %.1f' "$k" "${CPU[$k]}"; done
echo

# ---- results: benches/results/vdi.json, and the table
for qd in $QDS; do
    t=
    [ "$qd" = 16 ] && t=">= 1.0x ganesha"
    bench_metric "qd$qd" IOPS "VDI profile, one client, queue depth $qd" subject=tessera refs=ganesha \
        better=higher ${t:+target="$t"} headline=$([ "$qd" = 16 ] && echo 1 || echo 0)
    bench_metric "qd${qd}_wp99" ms "write p99, queue depth $qd" subject=tessera refs=ganesha better=lower \
        ${t:+target="<= 2x ganesha"}
done
bench_metric pool IOPS "VDI profile, $CLIENTS clients on $CLIENTS clones at once (QD16 each), total" \
    subject=tessera refs=ganesha better=higher headline=1
bench_metric pool_wp99 ms "write p99, $CLIENTS clients" subject=tessera refs=ganesha better=lower
bench_metric rss MiB "Tessera's peak RSS over the run" subject=tessera better=lower target="< 512 MiB"
bench_metric cpu_server "us/IO" "server CPU per I/O, QD16 run (process CPU time over reads + writes)" \
    subject=tessera refs=ganesha better=lower
bench_metric cpu_client "us/IO" "  client CPU per I/O in the same run (qemu-nbd + fio)" \
    subject=tessera refs=ganesha better=lower
bench_metric cpu_machine "us/IO" "  whole machine's busy CPU per I/O in the same run" \
    subject=tessera refs=ganesha better=lower
bench_metric cpu_total "us/IO" "Tessera CPU per I/O, QD16 run (80 % 4 KiB writes)" subject=tessera better=lower
declare -A STAGE_LABEL=(
    [write_buffer]="copying writes into the write-back buffer (locks, snapshot, copy)"
    [rmw_read]="read-modify-write: loading the stored 16 KiB chunk a 4 KiB write lands in, by the flush or, past half the dirty limit, by the write (read, decompress, verify)"
    [read]="reads (chunk-map lookup, pack read, decompress, verify)"
    [hash]="blake3 of flushed chunks"
    [compress]="zstd of new chunks"
    [append]="pack appends"
    [commit]="flush transactions (chunk map, chunk index, redb commit)"
    [durable]="durable commits (fdatasync, redb durable commit)"
    [front_end]="outside the engine: NFS front end, RPC decoding and replies, async runtime, kernel TCP"
)
for k in $STAGES; do
    bench_metric "cpu_$k" "us/IO" "  of which ${STAGE_LABEL[$k]}" subject=tessera better=lower
done
for s in ganesha tessera; do
    for qd in $QDS; do
        bench_value "qd$qd" "$s" "${R[$s.qd$qd]:-}"
        bench_value "qd${qd}_wp99" "$s" "${R[$s.qd${qd}_wp99]:-}"
    done
    bench_value pool "$s" "${R[$s.pool]:-}"
    bench_value pool_wp99 "$s" "${R[$s.pool_wp99]:-}"
    bench_value cpu_server "$s" "${R[$s.cpu_server]:-}"
    bench_value cpu_client "$s" "${R[$s.cpu_client]:-}"
    bench_value cpu_machine "$s" "${R[$s.cpu_machine]:-}"
done
bench_value rss tessera "${R[tessera.rss]}"
bench_value cpu_total tessera "${CPU[total]}"
for k in $STAGES; do bench_value "cpu_$k" tessera "${CPU[$k]}"; done
bench_finish
python3 benches/report.py --print vdi
