#!/usr/bin/env bash
# benches/nfs_meta.sh: NFSv3 metadata and sync latency, Tessera against nfs-ganesha (Debian
# package, FSAL VFS export of an ext4 folder): same client (benches/nfs_meta.py, the raw Python
# NFSv3 client of fs-tests/nfs_client.py), same run, same loop-mounted ext4 disk under both
# servers, one server after the other.
#
#   create      CREATE of N empty files: latency median / p99, creates/s
#   commit      COMMIT after a small (WRITE_SIZE) UNSTABLE WRITE, COMMITS times: median / p99
#   1-byte      N files of 1 byte: CREATE + WRITE FILE_SYNC, and CREATE + WRITE UNSTABLE +
#               COMMIT: files/s
# each with 1 client, then 4 (CLIENTS), each client its own connection and process; plus the
# NULL RPC round trip, the floor of this client. Nothing checks that either server's answers
# are really durable: this measures what each server does when asked.
#
# Needs root and ports 2049 and 111 free (waits for them: another engineer's tests may hold
# them); installs nfs-ganesha nfs-ganesha-vfs rpcbind when missing. ganesha runs with rpcbind
# (it registers there) and MOUNT on MOUNT_PORT; Tessera with --portmap 0 (MOUNT on 2049).
# Env: N (2000), COMMITS (1000), CLIENTS ("1 4"), WRITE_SIZE (4096), MNT_ROOT (/mnt),
#      MOUNT_PORT (20048), PEERS_DIR, TESSERA, BENCH_RESULTS_DIR (benches/results).
# Writes benches/results/nfs_meta.json (see benches/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
MNT_ROOT=${MNT_ROOT:-/mnt}
export N=${N:-2000} COMMITS=${COMMITS:-1000} CLIENTS=${CLIENTS:-1 4} WRITE_SIZE=${WRITE_SIZE:-4096}
MOUNT_PORT=${MOUNT_PORT:-20048}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
EXT4=$MNT_ROOT/peer-ext4
WORK=$(mktemp -d /var/tmp/tessera-nfsmeta.XXXXXX)

need_ganesha

bench_begin nfs_meta
bench_binary "$TESSERA"
gv=$(dpkg-query -W -f='${Version}' nfs-ganesha)
bench_param nfs-ganesha "$gv" "$gv" # the version measured against, not a knob
bench_param N "$N" 2000
bench_param COMMITS "$COMMITS" 1000
bench_param CLIENTS "$CLIENTS" "1 4"
bench_param WRITE_SIZE "$WRITE_SIZE" 4096

TPID= GPID= RPCPID=
cleanup() {
    stop_pid "$TPID"
    stop_pid "$GPID"
    stop_pid "$RPCPID"
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"

# ---- nfs-ganesha, VFS export of a folder on the ext4 disk
wait_ports_free 2049 111 "$MOUNT_PORT"
mkdir -p "$EXT4/ganesha"
cat >"$WORK/ganesha.conf" <<EOF
NFS_CORE_PARAM { Protocols = 3; Bind_addr = 127.0.0.1; NFS_Port = 2049; MNT_Port = $MOUNT_PORT;
                 Enable_NLM = false; Enable_RQUOTA = false; Mount_Path_Pseudo = true; }
NFSV4 { Graceless = true; }
EXPORT {
    Export_Id = 1; Path = $EXT4/ganesha; Pseudo = /gan; Protocols = 3; Transports = TCP;
    Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
    FSAL { Name = VFS; }
}
EOF
rpcbind -f -w &
RPCPID=$!
ganesha.nfsd -F -f "$WORK/ganesha.conf" -p "$WORK/ganesha.pid" -L "$WORK/ganesha.log" -N NIV_EVENT &
GPID=$!
up=
for _ in $(seq 1 150); do
    kill -0 "$GPID" 2>/dev/null || break
    MOUNT_PORT=$MOUNT_PORT python3 benches/nfs_meta.py --probe 127.0.0.1 /gan 2>/dev/null && { up=1; break; }
    sleep 0.2
done
[ -n "$up" ] || { tail "$WORK/ganesha.log" >&2; echo "bench: ganesha did not come up" >&2; exit 1; }
listens_on "$GPID" 2049
echo "bench: ganesha" >&2
MOUNT_PORT=$MOUNT_PORT python3 benches/nfs_meta.py 127.0.0.1 /gan "$WORK/ganesha.out"
stop_pid "$GPID"; GPID=
stop_pid "$RPCPID"; RPCPID=
rm -rf "$EXT4/ganesha"

# ---- Tessera, datastore on the same ext4 disk
wait_ports_free 2049
"$TESSERA" init "$EXT4/ds" >/dev/null
"$TESSERA" serve "$EXT4/ds" --nfs 127.0.0.1:2049 --portmap 0 2>"$WORK/tessera.log" &
TPID=$!
up=
for _ in $(seq 1 150); do
    kill -0 "$TPID" 2>/dev/null || break
    MOUNT_PORT=2049 python3 benches/nfs_meta.py --probe 127.0.0.1 /ds 2>/dev/null && { up=1; break; }
    sleep 0.2
done
[ -n "$up" ] || { tail "$WORK/tessera.log" >&2; echo "bench: tessera did not come up" >&2; exit 1; }
listens_on "$TPID" 2049
echo "bench: tessera" >&2
MOUNT_PORT=2049 python3 benches/nfs_meta.py 127.0.0.1 /ds "$WORK/tessera.out"
stop_pid "$TPID"; TPID=
rm -rf "$EXT4/ds"

# ---- figures
declare -A V=()
for s in ganesha tessera; do
    while read -r k v; do V[$s.$k]=$v; done <"$WORK/$s.out"
done
fig() { # fig KEY UNIT LABEL BETTER [k=v...]
    local key=$1 unit=$2 label=$3 better=$4
    shift 4
    bench_metric "$key" "$unit" "$label" subject=tessera refs=ganesha better="$better" "$@"
    bench_value "$key" ganesha "${V[ganesha.$key]:-}"
    bench_value "$key" tessera "${V[tessera.$key]:-}"
}
fig null_us µs "NULL RPC round trip, median (client floor)" lower
for c in $CLIENTS; do
    cl="$c client$([ "$c" = 1 ] || echo s)"
    fig "create_c${c}_p50_ms" ms "CREATE latency, median, $cl" lower headline=$([ "$c" = 1 ] && echo 1 || echo 0)
    fig "create_c${c}_p99_ms" ms "CREATE latency, p99, $cl" lower
    fig "create_c${c}_ops" "creates/s" "CREATEs per second, $cl" higher
    fig "commit_c${c}_p50_ms" ms "COMMIT after a $WRITE_SIZE-byte UNSTABLE WRITE, median, $cl" lower headline=$([ "$c" = 1 ] && echo 1 || echo 0)
    fig "commit_c${c}_p99_ms" ms "COMMIT after a $WRITE_SIZE-byte UNSTABLE WRITE, p99, $cl" lower
    fig "file1sync_c${c}_fps" "files/s" "1-byte files (CREATE + WRITE FILE_SYNC) per second, $cl" higher headline=$([ "$c" = 1 ] && echo 1 || echo 0)
    fig "file1sync_c${c}_p50_ms" ms "1-byte file (CREATE + WRITE FILE_SYNC), median, $cl" lower
    fig "file1commit_c${c}_fps" "files/s" "1-byte files (CREATE + UNSTABLE WRITE + COMMIT) per second, $cl" higher
    fig "file1commit_c${c}_p50_ms" ms "1-byte file (CREATE + UNSTABLE WRITE + COMMIT), median, $cl" lower
done
bench_finish
python3 benches/report.py --print nfs_meta 2>/dev/null || true
