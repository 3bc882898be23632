#!/usr/bin/env bash
# fs-tests/promises.sh [TEST...]: README promises that carry a number, each checked on a real mount.
#
# Tests (default: all, in this order):
#   clone     `tessera clone --count N` is one durable transaction: kill -9 of the daemon right
#             after `clone --count 50` returned: all 50 clones are there after the restart, each
#             equal to the template; killed while the clone runs: all 50 or none, never some.
#   flush     written data is flushed durably every 5 s without any fsync: 8 MiB written (file
#             kept open, so no flush on close), 7 s of waiting, kill -9: it is all there.
#   pressure  the write-back buffer is bounded (96 MiB): 320 MiB written without fsync, with the
#             5 s flusher turned off (--flush-interval 3600), reach the packs while writing (at
#             most 96 MiB + slack still in memory at the end), and the daemon's RSS stays under
#             320 MiB all along.
#   scrub     a mounted `tessera scrub DS` (through the serving process) reads at 256 MiB/s by
#             default: over >= 640 MiB of incompressible packs it takes at least 80 % of
#             size / 256 MiB/s, and `--max-rate 0` is faster.
# Every check ends with a clean unmount and `tessera fsck`.
#
# Env: TESSERA, KEEP_TMP.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 is required"

MiB=$((1024 * 1024))
make_tmp
MNT=$TEST_TMP/mnt

fsync_file() { python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$1"; }
packs_bytes() { find "$1/packs" -name '*.pack' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }
fsck_clean() { tessera fsck "$1" >"$TEST_TMP/fsck.log" 2>&1 || { cat "$TEST_TMP/fsck.log" >&2; fail "$2: tessera fsck exited non-zero"; }; }

# same_trees TEMPLATE DIR...: each DIR holds what TEMPLATE holds (paths, kinds, modes, sizes,
# contents, symlink targets); prints the first difference and fails otherwise.
same_trees() {
    python3 - "$@" <<'PY'
import hashlib, os, stat, sys
def tree(root):
    out = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = "%d %s" % (st.st_size, hashlib.sha256(open(p, "rb").read()).hexdigest())
            else:
                what = ""
            out.append((os.path.relpath(p, root), oct(st.st_mode), what))
    return sorted(out)
want = tree(sys.argv[1])
for d in sys.argv[2:]:
    got = tree(d)
    if got != want:
        print("%s differs from %s: %s" % (d, sys.argv[1], sorted(set(got) ^ set(want))[:3]), file=sys.stderr)
        sys.exit(1)
PY
}

test_clone() {
    step "clone --count 50: one durable transaction"
    local ds=$TEST_TMP/ds-clone n i got ms t0
    tessera init "$ds" >/dev/null
    start_mount "$ds" "$MNT"
    mkdir -p "$MNT/t/sub" "$MNT/d"
    for i in $(seq 1 20); do head -c $((4096 * i + 7)) /dev/urandom >"$MNT/t/f$i"; done
    head -c $((256 * 1024 + 5)) /dev/urandom >"$MNT/t/sub/disk.raw"
    ln -s ../f1 "$MNT/t/sub/link"
    chmod 0640 "$MNT/t/f2"
    for i in $(seq 1 20); do fsync_file "$MNT/t/f$i"; done
    fsync_file "$MNT/t/sub/disk.raw"
    fsync_file "$MNT/t/sub"
    fsync_file "$MNT/t"
    t0=$(date +%s%N)
    tessera clone "$MNT/t" "$MNT/d/vm-{n:03}" --count 50 >/dev/null || fail "tessera clone --count 50 failed"
    log "clone --count 50 took $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    kill9_mount "$MNT"      # right after it returned
    start_mount "$ds" "$MNT"
    n=$(find "$MNT/d" -mindepth 1 -maxdepth 1 -name 'vm-*' | wc -l)
    [ "$n" = 50 ] || fail "after kill -9 right after 'clone --count 50' returned, $n of the 50 clones are there"
    same_trees "$MNT/t" "$MNT"/d/vm-* || fail "a clone differs from the template after the crash"
    log "ok: all 50 clones survived a kill -9 right after the clone returned, equal to the template"

    # killed while `clone --count 50` runs: all or nothing
    for i in 1 2 3 4; do
        mkdir "$MNT/e$i"
        fsync_file "$MNT/e$i"      # the folder itself is not under test here
        ms=$(( (i - 1) * 20 ))
        "$TESSERA" clone "$MNT/t" "$MNT/e$i/vm-{n:03}" --count 50 >/dev/null 2>&1 &
        local cpid=$!
        sleep "0.0$(printf %02d "$ms")"
        local returned=no
        pid_running "$cpid" || returned=yes
        kill9_mount "$MNT"
        wait_pid_exit "$cpid" 10 || kill -KILL "$cpid" 2>/dev/null || true
        reap "$cpid"
        start_mount "$ds" "$MNT"
        [ -d "$MNT/e$i" ] || fail "e$i, created and fsynced before the clone, is gone after the crash"
        got=$(find "$MNT/e$i" -mindepth 1 -maxdepth 1 | wc -l)
        [ "$got" = 0 ] || [ "$got" = 50 ] || fail "kill -9 during 'clone --count 50' left $got clones (all or none)"
        [ "$returned" = no ] || [ "$got" = 50 ] || fail "clone --count 50 had returned before the kill, yet $got clones are there"
        if [ "$got" = 50 ]; then
            same_trees "$MNT/t" "$MNT/e$i"/vm-* || fail "a clone in e$i is incomplete after the crash"
        fi
        log "ok: kill -9 ${ms} ms into 'clone --count 50' (clone exit $REAPED, returned before the kill: $returned): $got clones"
    done
    stop_mount "$MNT"
    fsck_clean "$ds" "clone"
}

test_flush() {
    step "written data is durable within 5 s without fsync (the periodic flush)"
    local ds=$TEST_TMP/ds-flush wpid
    tessera init "$ds" >/dev/null
    start_mount "$ds" "$MNT"
    head -c $((8 * MiB)) /dev/urandom >"$TEST_TMP/flush.bin"
    # write it and keep the file open (a close could flush): the 5 s flusher must do it
    python3 - "$TEST_TMP/flush.bin" "$MNT/unsynced.raw" "$TEST_TMP/flush.ready" <<'PY' &
import os, sys, time
data = open(sys.argv[1], "rb").read()
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)
for off in range(0, len(data), 1 << 20):
    os.pwrite(fd, data[off:off + (1 << 20)], off)
open(sys.argv[3], "w").close()
time.sleep(120)
PY
    wpid=$!
    BG_PIDS+=("$wpid")
    for _ in $(seq 200); do [ -e "$TEST_TMP/flush.ready" ] && break; sleep 0.1; done
    [ -e "$TEST_TMP/flush.ready" ] || fail "writing 8 MiB into the mount took over 20 s"
    sleep 7
    kill9_mount "$MNT"
    kill -KILL "$wpid" 2>/dev/null || true
    reap "$wpid"
    start_mount "$ds" "$MNT"
    [ -e "$MNT/unsynced.raw" ] || fail "unsynced.raw, written 7 s before the kill, is gone (no periodic flush)"
    cmp "$TEST_TMP/flush.bin" "$MNT/unsynced.raw" || fail "data written 7 s before kill -9 (no fsync) is not all there: the 5 s flush did not make it durable"
    log "ok: 8 MiB written without fsync survived a kill -9 7 s later"
    stop_mount "$MNT"
    fsck_clean "$ds" "flush"
}

PRESSURE_DS=$TEST_TMP/ds-big
test_pressure() {
    step "memory pressure: 320 MiB written without fsync reach the packs while writing"
    local ds=$PRESSURE_DS pid
    [ -d "$ds" ] || tessera init "$ds" >/dev/null
    start_mount "$ds" "$MNT" --flush-interval 3600
    pid=${MOUNT_PID[$(abs "$MNT")]}
    python3 - "$MNT/big1.raw" "$pid" "$ds/packs" $((320 * MiB)) <<'PY' || fail "the write-back buffer is not bounded (see above)"
import os, random, sys, time
path, pid, packs, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
MiB = 1 << 20
def rss():
    for line in open("/proc/%s/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def packed():
    return sum(e.stat().st_size for e in os.scandir(packs) if e.name.endswith(".pack"))
rng = random.Random(1)
base = packed()
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
peak = rss()
for off in range(0, total, MiB):
    os.pwrite(fd, rng.randbytes(MiB), off)   # incompressible
    if off % (8 * MiB) == 0:
        peak = max(peak, rss())
peak = max(peak, rss())
in_packs = packed() - base
print("wrote %d MiB without fsync: %d MiB in packs at the end of the write, daemon RSS peak %d MiB"
      % (total >> 20, in_packs >> 20, peak >> 20), file=sys.stderr)
bad = []
if in_packs < total - 96 * MiB - 32 * MiB:
    bad.append("only %d MiB of %d reached the packs: more than 96 MiB (+ 32 MiB slack) held in memory"
               % (in_packs >> 20, total >> 20))
if peak > 320 * MiB:
    bad.append("daemon RSS peaked at %d MiB (> 320 MiB)" % (peak >> 20))
for b in bad:
    print("pressure: FAIL " + b, file=sys.stderr)
os.fsync(fd)
sys.exit(1 if bad else 0)
PY
    log "ok: the write-back buffer stayed bounded"
    stop_mount "$MNT"
}

test_scrub() {
    step "mounted scrub: 256 MiB/s by default, faster with --max-rate 0"
    local ds=$PRESSURE_DS size i t0 t_def t_max need
    [ -d "$ds" ] || tessera init "$ds" >/dev/null
    start_mount "$ds" "$MNT"
    i=2
    while [ "$(packs_bytes "$ds")" -lt $((640 * MiB)) ]; do    # incompressible data
        python3 -c 'import os,random,sys; r=random.Random(int(sys.argv[2])); fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT, 0o644)
for o in range(0, 160 << 20, 1 << 20): os.pwrite(fd, r.randbytes(1 << 20), o)
os.fsync(fd)' "$MNT/big$i.raw" "$i" || fail "writing big$i.raw failed"
        i=$((i + 1))
    done
    size=$(packs_bytes "$ds")
    t0=$(date +%s%N)
    tessera scrub "$ds" >"$TEST_TMP/scrub1.log" 2>&1 || { cat "$TEST_TMP/scrub1.log" >&2; fail "mounted scrub failed"; }
    t_def=$(( ($(date +%s%N) - t0) / 1000000 ))
    t0=$(date +%s%N)
    tessera scrub "$ds" --max-rate 0 >"$TEST_TMP/scrub2.log" 2>&1 || { cat "$TEST_TMP/scrub2.log" >&2; fail "mounted scrub --max-rate 0 failed"; }
    t_max=$(( ($(date +%s%N) - t0) / 1000000 ))
    need=$(( size / MiB * 1000 / 256 * 8 / 10 ))    # ms: 80 % of size at 256 MiB/s
    log "scrub of $((size / MiB)) MiB of packs: default ${t_def} ms (at least $need expected), --max-rate 0 ${t_max} ms"
    [ "$t_def" -ge "$need" ] || fail "mounted scrub took ${t_def} ms for $((size / MiB)) MiB: faster than 256 MiB/s, so not paced by default"
    [ $((t_max * 10)) -le $((t_def * 8)) ] || fail "scrub --max-rate 0 (${t_max} ms) is not faster than the default (${t_def} ms)"
    stop_mount "$MNT"
    fsck_clean "$ds" "scrub"
}

if [ $# -gt 0 ]; then tests=("$@"); else tests=(clone flush pressure scrub); fi
for t in "${tests[@]}"; do
    declare -F "test_$t" >/dev/null || fail "no such test: $t (clone flush pressure scrub)"
    s0=$SECONDS
    "test_$t"
    log "$t: $((SECONDS - s0)) s"
done
