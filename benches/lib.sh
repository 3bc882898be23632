# shellcheck shell=bash
# benches/lib.sh: sourced by the benchmark scripts (from the repository root). Records what a
# run measures and writes it, at the end, to $BENCH_RESULTS_DIR/<script>.json through
# benches/results.py (commit, date, machine, each figure with its unit and its references from
# the same run). `make bench-report` turns those files into the tables of benches/README.md.
#
#   bench_begin NAME                      start recording (call once, early)
#   bench_binary PATH                     the tessera binary measured (path, build time)
#   bench_param NAME VALUE DEFAULT        a size/knob of this run (a run whose knobs are all at
#                                         their defaults is "full size"; others are marked small)
#   bench_metric ID UNIT LABEL [k=v ...]  declare a figure; k: subject=tessera refs=a,b
#                                         better=higher|lower target=TEXT cache=cold|warm
#                                         note=TEXT headline=1 (also in README.md's summary)
#   bench_value ID SYSTEM VALUE           a measured value (a number, or null when not measured)
#   bench_finish                          write the results file
#   drop_caches                           sync + drop the page cache; returns non-zero (and says
#                                         so) if the kernel refused: the caller must not call
#                                         what follows "cold"
#   wait_ports_free PORT...               wait (up to PORT_WAIT s, default 3600) until nothing
#                                         listens on these TCP/UDP ports on any address
#   hold_memory SIZE                      keep SIZE (e.g. 16G) of memory in use until the script
#                                         ends (sets HOLD_PID; kill it in the cleanup), as the
#                                         desktops' VMs do on a hypervisor host
#
# Env: BENCH_RESULTS_DIR (default benches/results; point it elsewhere for development runs).
BENCH_RESULTS_DIR=${BENCH_RESULTS_DIR:-$PWD/benches/results}
BENCH_NAME=
BENCH_REC=

bench_begin() {
    BENCH_NAME=$1
    BENCH_REC=$(mktemp /tmp/tessera-bench-rec.XXXXXX)
    printf 'started\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$BENCH_REC"
    printf 'command\t%s\n' "${BENCH_COMMAND:-benches/$1.sh}" >>"$BENCH_REC"
    printf 'source\t%s\n' "$(python3 benches/results.py source)" >>"$BENCH_REC"
}
# bench_binary PATH: the binary measured (its build time goes into the results file: a binary
# older than the commit's changes to src/ would not be what the commit says)
bench_binary() { printf 'binary\t%s\t%s\n' "$1" "$(date -u -r "$1" +%Y-%m-%dT%H:%M:%SZ)" >>"$BENCH_REC"; }
bench_param() { printf 'param\t%s\t%s\t%s\n' "$1" "$2" "${3:-$2}" >>"$BENCH_REC"; }
bench_metric() {
    local id=$1 unit=$2 label=$3
    shift 3
    local IFS=$'\t'
    printf 'metric\t%s\t%s\t%s\t%s\n' "$id" "$unit" "$label" "$*" >>"$BENCH_REC"
}
bench_value() {
    local v=${3:-null}
    # bc writes numbers below 1 without the leading zero (.904)
    [[ $v == .* ]] && v=0$v
    [[ $v == -.* ]] && v=-0${v#-}
    [[ $v =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]] || v=null
    printf 'value\t%s\t%s\t%s\n' "$1" "$2" "$v" >>"$BENCH_REC"
}
bench_finish() {
    python3 benches/results.py write "$BENCH_NAME" "$BENCH_REC" "$BENCH_RESULTS_DIR"
    rm -f "$BENCH_REC"
}

drop_caches() {
    sync
    if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
        echo "bench: dropping the page cache failed: the next measurement is not cold" >&2
        return 1
    fi
}

# hold_memory SIZE: a process that takes SIZE bytes of memory, touches every page and keeps it
# until killed, so the page cache works in what is left, as on a host whose RAM is in use. On a
# VM whose unused memory goes back to the hypervisor (a balloon with free page reporting),
# page-cache pages taken from free memory each cost a fault in the host at first use (writing
# 1 GiB into a new file: about 2 s of system time, against 0.25 s once the page cache is full
# and recycles its own pages), which penalises whichever server allocates new pages (appends)
# over one that overwrites pages it already has. Returns once the memory is taken.
hold_memory() {
    local bytes ready
    bytes=$(numfmt --from=iec "$1")
    ready=$(mktemp /tmp/tessera-bench-hold.XXXXXX)
    python3 - "$bytes" "$ready" <<'PY' &
import mmap, signal, sys, time
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
for off in range(0, n, 4096):  # MAP_POPULATE already faulted them in; make sure
    m[off] = 1
open(sys.argv[2], "w").write("ready\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
PY
    HOLD_PID=$!
    until [ -s "$ready" ]; do
        kill -0 "$HOLD_PID" 2>/dev/null || { echo "bench: cannot hold $1 of memory" >&2; return 1; }
        sleep 1
    done
    rm -f "$ready"
    echo "bench: holding $1 of memory (pid $HOLD_PID); $(awk '/MemAvailable/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) left available"
}

# ports_busy PORT...: prints the listeners on those ports (TCP listen or UDP bound)
ports_busy() {
    local p pat=""
    for p in "$@"; do pat+="${pat:+|}:$p\$"; done
    ss -Htuln | awk -v pat="$pat" '$5 ~ pat'
}
wait_ports_free() {
    local deadline=$((SECONDS + ${PORT_WAIT:-3600})) said=
    while [ -n "$(ports_busy "$@")" ]; do
        [ -n "$said" ] || { echo "bench: waiting for ports $* to be free:" >&2; ports_busy "$@" >&2; said=1; }
        [ "$SECONDS" -lt "$deadline" ] || { echo "bench: ports $* still busy after ${PORT_WAIT:-3600} s" >&2; return 1; }
        sleep 2
    done
}
# listens_on PID PORT: PID (or a child of it) holds the TCP listening socket PORT; guards
# against measuring somebody else's server that took the port first
listens_on() {
    local pids
    pids=$(ss -Hltnp "sport = :$2" | grep -o 'pid=[0-9]*' | cut -d= -f2 || true)
    local p
    for p in $pids; do
        [ "$p" = "$1" ] && return 0
        [ "$(ps -o ppid= -p "$p" | tr -d ' ')" = "$1" ] && return 0
    done
    echo "bench: port $2 is not held by process $1 (${pids:-nobody})" >&2
    return 1
}

# ---- shared by the scripts that run nfs-ganesha (nfs.sh, nfs_meta.sh)

# need_ganesha: install nfs-ganesha, its VFS FSAL and rpcbind when missing.
need_ganesha() {
    local p
    for p in nfs-ganesha nfs-ganesha-vfs rpcbind; do
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$p" </dev/null >/dev/null
    done
}

# trim_disk MNT: give the host back the space of files deleted on a loop-mounted peer disk.
# The peers' images are sparse files mounted without `discard`, so everything a benchmark
# ever wrote stays allocated on the host until a trim: a full vdi.sh writes tens of GiB of
# packs and copies, and a host disk that fills under the image turns into I/O errors
# inside it. Runs between measured runs, never inside one.
trim_disk() {
    fstrim "$1" >/dev/null 2>&1 || true
}

# stop_pid PID: TERM, wait up to 60 s, then KILL.
stop_pid() {
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null || return 0
    timeout 60 tail --pid="$1" -f /dev/null || kill -9 "$1" 2>/dev/null || true
}

# start_ganesha DIR WORK: serve DIR (on the disk under test) as nfs://127.0.0.1/gan with
# nfs-ganesha's VFS FSAL and rpcbind, NFSv3 over TCP only; sets GPID and RPCPID. Ports 111 and
# 2049 must be free (wait_ports_free first). Config and log go to WORK.
start_ganesha() {
    local dir=$1 work=$2 up=
    cat >"$work/ganesha.conf" <<CONF
NFS_CORE_PARAM { Protocols = 3; Bind_addr = 127.0.0.1; Enable_NLM = false; Enable_RQUOTA = false; Mount_Path_Pseudo = true; }
NFSV4 { Graceless = true; }
EXPORT {
    Export_Id = 1; Path = $dir; Pseudo = /gan; Protocols = 3; Transports = TCP;
    Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
    FSAL { Name = VFS; }
}
CONF
    rpcbind -f -w &
    RPCPID=$!
    ganesha.nfsd -F -f "$work/ganesha.conf" -L "$work/ganesha.log" -p "$work/ganesha.pid" -N NIV_EVENT &
    GPID=$!
    for _ in $(seq 1 100); do nfs-ls nfs://127.0.0.1/gan/ >/dev/null 2>&1 && { up=1; break; }; sleep 0.2; done
    [ -n "$up" ] && listens_on "$GPID" 2049 || {
        tail "$work/ganesha.log" >&2
        echo "bench: ganesha did not come up" >&2
        return 1
    }
}

# start_tessera_nfs DS WORK [SERVE_ARGS...]: serve the datastore DS as nfs://127.0.0.1/ds (its
# own portmapper on 111); sets TPID; its log goes to WORK/tessera.log.
start_tessera_nfs() {
    local ds=$1 work=$2 up=
    shift 2
    "$TESSERA" serve "$ds" --nfs 127.0.0.1:2049 "$@" 2>"$work/tessera.log" &
    TPID=$!
    for _ in $(seq 1 100); do nfs-ls nfs://127.0.0.1/ds/ >/dev/null 2>&1 && { up=1; break; }; sleep 0.2; done
    [ -n "$up" ] && listens_on "$TPID" 2049 || {
        tail "$work/tessera.log" >&2
        echo "bench: tessera did not come up" >&2
        return 1
    }
}
