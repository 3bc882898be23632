# shellcheck shell=bash
# fs-tests/lib.sh: helpers shared by the fs-tests suites. Sourced, not executed.
#
# Protects the suites themselves: every wait is bounded, every mount a suite
# starts is unmounted (or, if its daemon is wedged, killed and lazily unmounted)
# when the suite exits, for whatever reason, and the scratch dir is removed.
#
# Env:
#   TESSERA          the binary (default: <repo>/target/release/tessera)
#   TESSERA_TEST_TMP parent of the scratch dirs (default /var/tmp: a real disk, not tmpfs)
#   CMD_TIMEOUT      seconds allowed for one tessera CLI call or one file copy (default 300)
#   KEEP_TMP=1       keep the scratch dir (datastore, logs) for a post-mortem

FS_TESTS_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname -- "$FS_TESTS_DIR")
TESSERA=${TESSERA:-$REPO_ROOT/target/release/tessera}
TESSERA_TEST_TMP=${TESSERA_TEST_TMP:-/var/tmp}
CMD_TIMEOUT=${CMD_TIMEOUT:-300}
SUITE=$(basename -- "$0" .sh)

declare -A MOUNT_PID=()   # mount point -> pid of its `tessera mount` process
MOUNT_SEQ=0
TEST_TMP=

# Each line carries the seconds since the suite started: a failure in CI says when it came.
log()  { printf '[%s +%ss] %s\n' "$SUITE" "$SECONDS" "$*" >&2; }
step() { printf '\n[%s +%ss] --- %s\n' "$SUITE" "$SECONDS" "$*" >&2; }
fail() { printf '[%s +%ss] FAIL: %s\n' "$SUITE" "$SECONDS" "$*" >&2; exit 1; }

[ -x "$TESSERA" ] || fail "tessera binary not found at $TESSERA (run: make build, or set TESSERA)"
[ -c /dev/fuse ] || fail "/dev/fuse is missing: FUSE is not available on this machine"
command -v fusermount3 >/dev/null || fail "fusermount3 not found (apt-get install fuse3)"
TESSERA=$(realpath -- "$TESSERA")

# tessera ARGS...: the CLI, bounded by CMD_TIMEOUT (exit 124 = it hung).
tessera() { timeout -k 10 "$CMD_TIMEOUT" "$TESSERA" "$@"; }
# tmo CMD...: any other command that goes through the mount, bounded likewise.
tmo() { timeout -k 10 "$CMD_TIMEOUT" "$@"; }

# make_tmp: create the suite's scratch dir, print nothing, set TEST_TMP.
make_tmp() {
    TEST_TMP=$(mktemp -d "$TESSERA_TEST_TMP/tessera-test.XXXXXX")
    # Other users (pjdfstest switches to nobody/daemon) must be able to reach the mount.
    chmod 0755 "$TEST_TMP"
    TEST_TMP=$(realpath -- "$TEST_TMP")
    mkdir -p "$TEST_TMP/logs"
    # run-all.sh sweeps leftover mounts only in scratch dirs of its own run
    [ -z "${TESSERA_RUN_ID:-}" ] || echo "$TESSERA_RUN_ID" >"$TEST_TMP/.run-id"
    log "scratch dir $TEST_TMP"
}

# abs PATH: absolute, normalised, without touching the filesystem (a stat()
# of a hung or dead FUSE mount point blocks or fails).
abs() { realpath -s -m -- "$1"; }

# fstype_at DIR: the fstype mounted exactly at DIR, "" if none. Reads the mount
# table instead of stat()ing DIR, which fails with ENOTCONN on a dead FUSE mount.
fstype_at() { awk -v m="$1" '$2 == m { t = $3 } END { print t }' /proc/self/mounts; }
is_mounted() { [ -n "$(fstype_at "$1")" ]; }

# pid_running PID: true while any thread of PID has not exited (a process that is only a
# zombie awaiting `wait` is not running). Every thread counts: after SIGKILL the group
# leader shows as a zombie while the other threads are still exiting (one in the middle of a
# disk write can take a while), and the process's files (its listening sockets, the
# datastore lock) stay open until the last of them is gone, so a server started then would
# find the port in use.
pid_running() {
    local f st
    for f in /proc/"$1"/task/*/stat; do
        # The state follows the command name, which is in parentheses and may hold spaces.
        st=$(sed -n 's/.*) \([A-Za-z]\) .*/\1/p' "$f" 2>/dev/null) || continue
        [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ] && return 0
    done
    return 1
}

# wait_pid_exit PID SECONDS: true if PID ended within SECONDS.
wait_pid_exit() {
    local pid=$1 deadline=$((SECONDS + $2))
    while pid_running "$pid"; do
        [ $SECONDS -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# reap PID: collect an ended child; its exit status goes to REAPED (not via
# $(...): a subshell cannot wait for its parent's children).
REAPED=0
reap() { REAPED=0; wait "$1" 2>/dev/null || REAPED=$?; }

# wait_unmounted DIR SECONDS
wait_unmounted() {
    local deadline=$((SECONDS + $2))
    while is_mounted "$1"; do
        [ $SECONDS -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

show_log() {
    local f=$1 n=$2
    [ -s "$f" ] || return 0
    printf '[%s] ---- last %s lines of %s ----\n' "$SUITE" "$n" "$f" >&2
    tail -n "$n" -- "$f" >&2
}

# start_mount DS MNT [EXTRA MOUNT ARGS...]: start `tessera mount` in the
# background and wait (<= 20 s) until MNT is a FUSE mount point (fstype "fuse":
# fuser mounts directly as root and does not record the "tessera" subtype).
start_mount() {
    local ds=$1 mnt=$2 pid logf deadline
    shift 2
    mkdir -p -- "$mnt"
    mnt=$(abs "$mnt")
    is_mounted "$mnt" && fail "start_mount: $mnt is already mounted"
    MOUNT_SEQ=$((MOUNT_SEQ + 1))
    logf=$TEST_TMP/logs/mount-$MOUNT_SEQ.log
    "$TESSERA" mount "$ds" "$mnt" "$@" </dev/null >"$logf" 2>&1 &
    pid=$!
    MOUNT_PID[$mnt]=$pid
    deadline=$((SECONDS + 20))
    until [[ "$(fstype_at "$mnt")" == fuse* ]] && timeout 5 mountpoint -q -- "$mnt"; do
        if ! pid_running "$pid"; then
            reap "$pid"
            unset "MOUNT_PID[$mnt]"
            fail "tessera mount $ds $mnt exited with status $REAPED before mounting"
        fi
        if [ $SECONDS -ge "$deadline" ]; then
            fail "tessera mount $ds $mnt: not mounted after 20 s (fstype now: '$(fstype_at "$mnt")')"
        fi
        sleep 0.1
    done
    log "mounted $ds on $mnt (pid $pid, log $logf)"
}

# stop_mount MNT: clean unmount; the daemon must exit (status 0) within 30 s.
stop_mount() {
    local mnt pid rc i
    mnt=$(abs "$1")
    pid=${MOUNT_PID[$mnt]:-}
    [ -n "$pid" ] || fail "stop_mount: $mnt was not mounted by this suite"
    for i in $(seq 1 20); do    # EBUSY right after a file was closed is transient
        timeout 10 fusermount3 -u -- "$mnt" 2>/dev/null && break
        is_mounted "$mnt" || break
        [ "$i" = 20 ] && { timeout 10 fusermount3 -u -- "$mnt" || true; fail "stop_mount: cannot unmount $mnt (busy?)"; }
        sleep 0.5
    done
    if ! wait_pid_exit "$pid" 30; then
        fail "stop_mount: tessera mount (pid $pid) still running 30 s after unmounting $mnt"
    fi
    reap "$pid"
    rc=$REAPED
    unset "MOUNT_PID[$mnt]"
    if [ "$rc" != 0 ]; then
        fail "stop_mount: tessera mount exited with status $rc after a clean unmount of $mnt"
    fi
    log "unmounted $mnt"
}

# kill9_mount MNT: kill -9 the daemon (a crash), then remove the dead mount.
kill9_mount() {
    local mnt pid
    mnt=$(abs "$1")
    pid=${MOUNT_PID[$mnt]:-}
    [ -n "$pid" ] || fail "kill9_mount: $mnt was not mounted by this suite"
    disown "$pid" 2>/dev/null || true   # no "Killed" job notice from bash
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" 10 || fail "kill9_mount: pid $pid survived SIGKILL for 10 s"
    reap "$pid"
    unset "MOUNT_PID[$mnt]"
    lazy_unmount "$mnt" || fail "kill9_mount: dead mount $mnt is still in the mount table"
    log "killed -9 pid $pid and removed the dead mount $mnt"
}

# lazy_unmount DIR: detach DIR whatever state its daemon is in (<= 10 s).
lazy_unmount() {
    is_mounted "$1" || return 0
    timeout 10 fusermount3 -u -z -- "$1" 2>/dev/null || timeout 10 umount -l -- "$1" 2>/dev/null || true
    wait_unmounted "$1" 10
}

# Registered background helpers (e.g. a writer), killed on exit, and extra
# paths (outside TEST_TMP) removed on exit.
declare -a BG_PIDS=()
declare -a CLEANUP_PATHS=()
# Other mounts a suite made (e.g. a loop-mounted disk), detached on exit after the FUSE ones.
declare -a EXTRA_UNMOUNTS=()

_lib_cleanup() {
    local rc=$? mnt pid
    set +e
    trap - EXIT INT TERM
    for pid in "${BG_PIDS[@]}"; do
        pid_running "$pid" && kill -KILL "$pid" 2>/dev/null
    done
    for mnt in "${!MOUNT_PID[@]}"; do
        pid=${MOUNT_PID[$mnt]}
        pid_running "$pid" || is_mounted "$mnt" || continue
        log "cleanup: unmounting $mnt (pid $pid)"
        timeout 10 fusermount3 -u -- "$mnt" 2>/dev/null || { kill -TERM "$pid" 2>/dev/null; sleep 1; }
        wait_pid_exit "$pid" 15 || kill -KILL "$pid" 2>/dev/null
        wait_pid_exit "$pid" 5
        lazy_unmount "$mnt" || log "cleanup: WARNING: $mnt is still mounted"
    done
    for m in "${EXTRA_UNMOUNTS[@]}"; do
        mountpoint -q -- "$m" 2>/dev/null && { umount -- "$m" 2>/dev/null || umount -l -- "$m" 2>/dev/null || true; }
    done
    if [ "$rc" != 0 ] && [ -n "$TEST_TMP" ]; then   # the newest logs (daemon, writer)
        for f in $(ls -t "$TEST_TMP"/logs/*.log 2>/dev/null | head -n 3); do show_log "$f" 40; done
    fi
    [ ${#CLEANUP_PATHS[@]} = 0 ] || rm -rf -- "${CLEANUP_PATHS[@]}"
    if [ -n "$TEST_TMP" ] && [ -d "$TEST_TMP" ]; then
        if [ "${KEEP_TMP:-0}" = 1 ]; then
            log "KEEP_TMP=1: kept $TEST_TMP"
        elif awk -v p="$TEST_TMP/" 'index($2, p) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
            log "cleanup: WARNING: something is still mounted under $TEST_TMP; not deleting it"
        else
            rm -rf -- "$TEST_TMP"
        fi
    fi
    if [ "$rc" = 0 ]; then log "PASS"; else log "FAILED (exit $rc)"; fi
    exit "$rc"
}
trap _lib_cleanup EXIT
# A signal (e.g. from `timeout`) becomes an exit, so the EXIT trap cleans up.
trap 'exit 143' TERM
trap 'exit 130' INT

# expect_error PATTERN CMD...: CMD must fail (not time out) with exactly one
# non-empty line on stderr, matching PATTERN (grep -Ei).
expect_error() {
    local pat=$1 rc=0 errf lines
    shift
    errf=$TEST_TMP/stderr.$$
    "$@" >/dev/null 2>"$errf" || rc=$?
    [ "$rc" != 0 ] || fail "'$*' succeeded; expected an error matching /$pat/"
    [ "$rc" != 124 ] && [ "$rc" != 137 ] || fail "'$*' timed out"
    lines=$(grep -c . "$errf" || true)
    [ "$lines" = 1 ] || { cat "$errf" >&2; fail "'$*': expected a one-line error on stderr, got $lines lines"; }
    grep -Eqi -- "$pat" "$errf" || { cat "$errf" >&2; fail "'$*': error does not match /$pat/"; }
    log "ok (exit $rc): $*  ->  $(cat "$errf")"
    rm -f -- "$errf"
}

sha() { tmo sha256sum -- "$1" | awk '{ print $1 }'; }

# ---- tessera serve (NFS, optionally with a FUSE mount)
NFS_HOST=${NFS_HOST:-127.0.0.1}
SERVE_PID=
SERVE_MNT=
NFS_CLIENT=$FS_TESTS_DIR/nfs_client.py

# port_busy PORT: something listens on TCP PORT of 127.0.0.1.
port_busy() { (exec 3<>"/dev/tcp/$NFS_HOST/$1") 2>/dev/null; }

# start_serve DS [--mount MNT] [SERVE ARGS...]: start `tessera serve DS --nfs`
# on 127.0.0.1:2049 (portmapper on 111) in the background; wait (<= 20 s) until
# NFS answers and, with --mount, until MNT is mounted.
start_serve() {
    local ds=$1 pid logf deadline
    shift
    SERVE_MNT=
    [ "${1:-}" = --mount ] && SERVE_MNT=$(abs "$2") && mkdir -p -- "$SERVE_MNT"
    [ -z "$SERVE_PID" ] || fail "start_serve: a server (pid $SERVE_PID) is already running"
    # A server this suite stopped a moment ago may hold its ports while its last threads exit:
    # give them 10 s before calling the port taken.
    deadline=$((SECONDS + 10))
    for p in 2049 111; do
        while port_busy "$p"; do
            [ $SECONDS -lt $deadline ] ||
                fail "start_serve: port $p on $NFS_HOST is in use (another NFS server or rpcbind?)"
            sleep 0.1
        done
    done
    MOUNT_SEQ=$((MOUNT_SEQ + 1))
    logf=$TEST_TMP/logs/serve-$MOUNT_SEQ.log
    "$TESSERA" serve "$ds" --nfs "$NFS_HOST:2049" "$@" </dev/null >"$logf" 2>&1 &
    pid=$!
    SERVE_PID=$pid
    [ -z "$SERVE_MNT" ] || MOUNT_PID[$SERVE_MNT]=$pid
    BG_PIDS+=("$pid")
    deadline=$((SECONDS + 20))
    until port_busy 2049 && { [ -z "$SERVE_MNT" ] || { [[ "$(fstype_at "$SERVE_MNT")" == fuse* ]] && timeout 5 mountpoint -q -- "$SERVE_MNT"; }; }; do
        if ! pid_running "$pid"; then
            reap "$pid"
            SERVE_PID=
            [ -z "$SERVE_MNT" ] || unset "MOUNT_PID[$SERVE_MNT]"
            show_log "$logf" 20
            fail "tessera serve $ds exited with status $REAPED before serving"
        fi
        [ $SECONDS -lt "$deadline" ] || fail "tessera serve $ds: not serving after 20 s"
        sleep 0.1
    done
    log "serving $ds over NFS on $NFS_HOST:2049${SERVE_MNT:+ and on $SERVE_MNT} (pid $pid, log $logf)"
}

# stop_serve: SIGTERM; the server must unmount, flush and exit 0 within 30 s.
stop_serve() {
    local pid=$SERVE_PID
    [ -n "$pid" ] || fail "stop_serve: no server running"
    kill -TERM "$pid"
    wait_pid_exit "$pid" 30 || fail "stop_serve: tessera serve (pid $pid) still running 30 s after SIGTERM"
    reap "$pid"
    SERVE_PID=
    [ -z "$SERVE_MNT" ] || { unset "MOUNT_PID[$SERVE_MNT]"; wait_unmounted "$SERVE_MNT" 10 || fail "stop_serve: $SERVE_MNT still mounted"; }
    [ "$REAPED" = 0 ] || fail "stop_serve: tessera serve exited with status $REAPED after SIGTERM"
    log "server stopped (SIGTERM, exit 0)"
}

# kill9_serve: kill -9 the server (a crash) and remove its dead mount, if any.
kill9_serve() {
    local pid=$SERVE_PID
    [ -n "$pid" ] || fail "kill9_serve: no server running"
    disown "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" 10 || fail "kill9_serve: pid $pid survived SIGKILL for 10 s"
    reap "$pid"
    SERVE_PID=
    if [ -n "$SERVE_MNT" ]; then
        unset "MOUNT_PID[$SERVE_MNT]"
        lazy_unmount "$SERVE_MNT" || fail "kill9_serve: dead mount $SERVE_MNT is still mounted"
    fi
    log "killed -9 the server (pid $pid)"
}

# nfsc ARGS...: the raw NFS client (fs-tests/nfs_client.py), bounded in time.
nfsc() { tmo python3 "$NFS_CLIENT" "$@"; }

# ---- S3-backed datastores (issue 12), against moto's S3 server on loopback

MOTO_SERVER=${MOTO_SERVER:-/var/tmp/tessera-moto/bin/moto_server}
S3_EP=

# start_moto: start an S3 API server (moto) on a free loopback port for this suite, with one
# bucket, "vdi"; sets S3_EP and the AWS credential variables (moto takes any).
start_moto() {
    [ -z "$S3_EP" ] || return 0
    [ -x "$MOTO_SERVER" ] || fail "no moto server at $MOTO_SERVER (.ci/deps.sh installs it)"
    command -v curl >/dev/null || fail "curl is required"
    local port pid try up=
    # A port the kernel hands out as free (a random one may be taken by another socket), and a
    # new one if moto still loses it; up to 60 s per try: a loaded CI machine starts it slowly.
    for try in 1 2 3; do
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        "$MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$TEST_TMP/logs/moto.log" 2>&1 &
        pid=$!
        BG_PIDS+=("$pid")
        S3_EP=http://127.0.0.1:$port
        for _ in $(seq 1 300); do
            curl -sf -o /dev/null "$S3_EP/" && { up=1; break; }
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        [ -z "$up" ] || break
        log "moto did not come up on port $port (try $try): $(tail -n 1 "$TEST_TMP/logs/moto.log")"
        kill "$pid" 2>/dev/null || true
    done
    [ -n "$up" ] || fail "moto did not start (log: $TEST_TMP/logs/moto.log)"
    curl -sf -X PUT -o /dev/null "$S3_EP/vdi" || fail "cannot create the bucket"
    export AWS_ACCESS_KEY_ID=tessera-test AWS_SECRET_ACCESS_KEY=tessera-test-secret
    log "S3 API server (moto) at $S3_EP, bucket vdi"
}

# init_ds DS: `tessera init DS`. With TESSERA_S3=1, an S3-backed datastore instead (prefix named
# after DS, in moto's bucket "vdi") with a disk cache of S3_CACHE (default 16M), 1 MiB packs and
# a 1 s idle seal: test-sized data is uploaded, evicted and read back from the bucket, so a suite
# run this way drives the object-store tier with a cache smaller than its data.
init_ds() {
    if [ "${TESSERA_S3:-0}" = 1 ]; then
        start_moto
        tessera init "$1" --store "s3://vdi/$(basename -- "$1")-$RANDOM" --endpoint "$S3_EP" \
            --disk-cache "${S3_CACHE:-16M}" >/dev/null || fail "tessera init --store failed"
        python3 - "$1/tier.json" <<'PY' || fail "cannot set the test pack size in $1/tier.json"
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c["pack_bytes"] = 1 << 20; c["seal_idle_secs"] = 1
open(p, "w").write(json.dumps(c))
PY
        log "S3-backed datastore $1 ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$1/tier.json"), disk cache ${S3_CACHE:-16M})"
    else
        tessera init "$1" >/dev/null || fail "tessera init failed"
    fi
}
