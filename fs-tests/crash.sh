#!/usr/bin/env bash
# fs-tests/crash.sh: kill -9 crash test against a real mount.
#
# Protects: (1) durability: every write that an fsync()/fdatasync() covered is
# there byte for byte after the daemon is killed at a random moment (and later,
# unsynced writes are either there or not, never garbage); (2) the datastore
# is consistent after a crash (`tessera fsck` exits 0) and after the
# following clean unmount; (3) a clean unmount keeps everything (each round
# starts by comparing the files exactly with the state verified last round);
# (4) metadata durability: every namespace operation that returned (create,
# mkdir, rename of files and dirs, also over existing targets, chmod, symlink,
# unlink, rmdir, link, truncate by setattr, utime) survives the kill without
# any fsync: after each restart the metadata worker's folder (names, kinds,
# modes, symlink targets, link counts, sizes, mtimes set by utime) must equal
# the model after the last op that returned, or after the one op in flight.
# Every fourth round (3, 7, ...) runs the metadata worker alone: no fsync
# from the data writer, so nothing but the ops' own commits can make them
# durable; (5) compaction under crashes: in the even rounds `tessera gc` runs
# in a loop while the kill lands; every run that ended before the kill must
# have succeeded, and at least one must have completed over all rounds.
# The rounds share one datastore, so packs, dead records and dedup references
# accumulate across crashes. Before the rounds, each op type alone (create, mkdir, rename,
# rename over a file, rename of a dir, chmod, symlink, unlink, rmdir, link, truncate, utime) is
# followed at once by kill -9 and must be there after the restart.
#
# Env: CRASH_ROUNDS (20), CRASH_SEED (random; printed, set it to replay),
#      CRASH_MIN_MS / CRASH_MAX_MS (1000 / 3000: when the kill comes),
#      CRASH_MBPS (32: writer throughput cap, MiB/s), CRASH_META_OPS (400: metadata ops
#      per second), TESSERA, KEEP_TMP.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"

ROUNDS=${CRASH_ROUNDS:-20}
SEED=${CRASH_SEED:-$(( $(date +%s) % 100000 ))}
MIN_MS=${CRASH_MIN_MS:-1000}
MAX_MS=${CRASH_MAX_MS:-3000}
WRITER=$FS_TESTS_DIR/crash_writer.py
command -v python3 >/dev/null || fail "python3 is required"
RANDOM=$SEED
log "rounds=$ROUNDS seed=$SEED (replay with CRASH_SEED=$SEED)"

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
BASE=$TEST_TMP/base        # file contents verified at the end of the last round
META_BASE=$TEST_TMP/meta-base.json   # the metadata worker's namespace, verified last round
mkdir -p "$BASE"
tessera init "$DS" >/dev/null || fail "tessera init $DS failed"

fsck_ok() {
    local what=$1 rc=0 out=$TEST_TMP/fsck-$2.log
    tessera fsck "$DS" >"$out" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        cat "$out" >&2
        fail "round $r: tessera fsck $what exited $rc"
    fi
}

# Each metadata op alone, then kill -9: whatever the random rounds do, every op type must be
# durable by itself when it returns (a later durable commit would cover an earlier op that was
# not, so only a kill right after each op shows which op type is not).
step "each metadata op alone, followed at once by kill -9"
O=$MNT/one
r=0   # (for fsck_ok)
start_mount "$DS" "$MNT"
mkdir "$O" "$O/rd"
for f in a b c x t; do : >"$O/$f"; done
truncate -s 1 "$O/b"
truncate -s 2 "$O/c"
python3 -c 'import os,sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)' "$O"/* "$O" "$MNT" || fail "fsync of the setup failed"
one_ops=(
    'create|: >"$O/new"|[ -f "$O/new" ]'
    'mkdir|mkdir "$O/newdir"|[ -d "$O/newdir" ]'
    'rename|mv "$O/a" "$O/a2"|[ -f "$O/a2" ] && [ ! -e "$O/a" ]'
    'rename over a file|mv "$O/b" "$O/c"|[ ! -e "$O/b" ] && [ "$(stat -c %s "$O/c")" = 1 ]'
    'rename a dir|mv "$O/rd" "$O/rd2"|[ -d "$O/rd2" ] && [ ! -e "$O/rd" ]'
    'chmod|chmod 0751 "$O/c"|[ "$(stat -c %a "$O/c")" = 751 ]'
    'symlink|ln -s some/target "$O/sl"|[ "$(readlink "$O/sl")" = some/target ]'
    'unlink|rm "$O/x"|[ ! -e "$O/x" ]'
    'rmdir|rmdir "$O/rd2"|[ ! -e "$O/rd2" ]'
    'link|ln "$O/c" "$O/hl"|[ "$(stat -c %h "$O/c")" = 2 ] && [ -f "$O/hl" ]'
    'truncate|truncate -s 12345 "$O/t"|[ "$(stat -c %s "$O/t")" = 12345 ]'
    'utime|touch -m -d @1500000000 "$O/t"|[ "$(stat -c %Y "$O/t")" = 1500000000 ]'
)
for entry in "${one_ops[@]}"; do
    IFS='|' read -r what op check <<<"$entry"
    eval "$op" || fail "$what: '$op' failed on a live mount"
    kill9_mount "$MNT"
    start_mount "$DS" "$MNT"
    eval "$check" || fail "$what ('$op') returned, then kill -9 of the daemon: it is lost after the restart ($check is false)"
    log "ok: $what survived kill -9 right after it returned"
done
stop_mount "$MNT"
fsck_ok "after the single-op crashes" one

total_syncs=0
total_gc_ok=0
total_meta=0
for r in $(seq 1 "$ROUNDS"); do
    step "round $r/$ROUNDS"
    start_mount "$DS" "$MNT"
    # what the previous round verified must have survived its clean unmount, exactly
    tmo python3 "$WRITER" verify --dir "$MNT/crash" --base "$BASE" \
        || fail "round $r: files differ from the state verified before the last clean unmount"
    tmo python3 "$WRITER" verify-meta --dir "$MNT/meta" --base-model "$META_BASE" \
        || fail "round $r: the namespace differs from the state verified before the last clean unmount"

    journal=$TEST_TMP/journal-$r.jsonl
    mjournal=$TEST_TMP/meta-journal-$r.jsonl
    wlog=$TEST_TMP/logs/writer-$r.log
    mlog=$TEST_TMP/logs/meta-$r.log
    meta_only=0
    [ $((r % 4)) = 3 ] && meta_only=1
    wpid=
    if [ "$meta_only" = 0 ]; then
        python3 "$WRITER" write --dir "$MNT/crash" --journal "$journal" \
            --seed $((SEED * 1000 + r)) --max-seconds 60 --mbps "${CRASH_MBPS:-32}" \
            </dev/null >"$wlog" 2>&1 &
        wpid=$!
        BG_PIDS+=("$wpid")
    fi
    python3 "$WRITER" meta --dir "$MNT/meta" --journal "$mjournal" --base-model "$META_BASE" \
        --seed $((SEED * 1000 + r)) --max-seconds 60 --ops-per-sec "${CRASH_META_OPS:-400}" \
        </dev/null >"$mlog" 2>&1 &
    mpid=$!
    BG_PIDS+=("$mpid")
    # Every other round, compaction runs in the serving process while the writer writes, so
    # some kills land in the middle of a gc (copy, switch, delete) as well. Each run is
    # logged: start, end, exit status, last line of its output.
    gcpid=
    gclog=$TEST_TMP/gc-$r.log
    : >"$gclog"
    if [ $((r % 2)) = 0 ]; then
        (while :; do
            t0=$(date +%s.%N) rc=0
            "$TESSERA" gc "$DS" --min-live 1.0 >"$TEST_TMP/gc.out" 2>&1 &
            echo $! >"$TEST_TMP/gc.pid"
            wait $! || rc=$?
            printf '%s %s %s %s\n' "$t0" "$(date +%s.%N)" "$rc" "$(tail -n 1 "$TEST_TMP/gc.out" | tr -s '\t' ' ')" >>"$gclog"
            sleep 0.2
        done) </dev/null &
        gcpid=$!
        BG_PIDS+=("$gcpid")
    fi
    ms=$((MIN_MS + RANDOM % (MAX_MS - MIN_MS + 1)))
    sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    for p in $wpid $mpid; do
        if ! pid_running "$p"; then
            reap "$p"
            cat "$wlog" "$mlog" >&2 2>/dev/null || true
            fail "round $r: the writer or metadata worker stopped (status $REAPED) before the crash: I/O error on a live mount?"
        fi
    done

    kill_at=$(date +%s.%N)
    kill9_mount "$MNT"            # the crash, after ${ms} ms of writing
    if [ -n "$gcpid" ]; then
        # Stop the gc loop. A `tessera gc` that found the daemon dead runs on the datastore
        # itself: kill it too (one more crash in the middle of a compaction).
        kill "$gcpid" 2>/dev/null || true
        wait_pid_exit "$gcpid" 10 || kill -KILL "$gcpid" 2>/dev/null || true
        reap "$gcpid"
        gc_last=$(cat "$TEST_TMP/gc.pid" 2>/dev/null || true)
        if [ -n "$gc_last" ] && pid_running "$gc_last"; then
            kill -KILL "$gc_last" 2>/dev/null || true
            wait_pid_exit "$gc_last" 10 || fail "round $r: tessera gc (pid $gc_last) survived SIGKILL"
        fi
        rm -f -- "$TEST_TMP/gc.pid"
        # A run the loop started just as it was stopped is not in gc.pid yet (it was killed
        # between the fork and the echo): find it by its command line.
        for p in $(pgrep -f -- "gc $DS --min-live 1.0" || true); do
            kill -KILL "$p" 2>/dev/null || true
            wait_pid_exit "$p" 10 || fail "round $r: tessera gc (pid $p) survived SIGKILL"
        done
    fi
    # the writer and the metadata worker now get ENOTCONN and stop by themselves
    for p in $wpid $mpid; do
        if ! wait_pid_exit "$p" 15; then
            log "pid $p still running 15 s after the crash; killing it"
            kill -KILL "$p" 2>/dev/null || true
            wait_pid_exit "$p" 5 || true
        fi
        reap "$p"
        if [ "$p" = "$mpid" ] && [ "$REAPED" != 3 ]; then
            cat "$mlog" >&2
            # an error (not ENOTCONN) from the dying connection after the kill is no failure
            err_at=$(sed -nE 's/^meta: FAIL unexpected error .* at ([0-9.]+)$/\1/p' "$mlog")
            if [ "$REAPED" = 4 ] && [ -n "$err_at" ] && awk -v a="$err_at" -v k="$kill_at" 'BEGIN { exit !(a >= k) }'; then
                log "round $r: the metadata worker's error came $(awk -v a="$err_at" -v k="$kill_at" 'BEGIN { printf "%.3f", a - k }') s after the kill: the dying mount's, not a failure"
            else
                fail "round $r: the metadata worker ended with status $REAPED, not by the crash (3) (kill at $kill_at)"
            fi
        fi
    done
    if [ -n "$gcpid" ]; then
        # runs that ended before the kill must have succeeded; later ones met a dying daemon
        read -r gc_ok gc_late < <(awk -v k="$kill_at" '$2 < k && $3 == 0 { ok++ } $2 >= k { late++ }
            END { print ok + 0, late + 0 }' "$gclog")
        if awk -v k="$kill_at" '$2 < k && $3 != 0 { bad = 1 } END { exit !bad }' "$gclog"; then
            awk -v k="$kill_at" '$2 < k && $3 != 0' "$gclog" >&2
            fail "round $r: tessera gc failed while the daemon was alive (start end status output above)"
        fi
        total_gc_ok=$((total_gc_ok + gc_ok))
        log "gc: $gc_ok runs completed before the crash, $gc_late ended after it"
    fi
    syncs=0 writes=0
    if [ "$meta_only" = 0 ]; then
        syncs=$(grep -c '"op": "sync"' "$journal" || true)
        writes=$(grep -c '"op": "write"' "$journal" || true)
    fi
    mops=$(grep -c '^{"d": ' "$mjournal" || true)
    total_syncs=$((total_syncs + syncs))
    total_meta=$((total_meta + mops))
    log "crashed after ${ms} ms: $writes writes logged, $syncs fsyncs completed, $mops metadata ops returned$([ "$meta_only" = 1 ] && echo ' (metadata worker alone)'); writer: $(tail -n 1 "$wlog" 2>/dev/null); meta: $(tail -n 1 "$mlog")"

    fsck_ok "after the crash" "$r-crash"
    start_mount "$DS" "$MNT"
    if [ "$meta_only" = 0 ]; then
        tmo python3 "$WRITER" verify --dir "$MNT/crash" --base "$BASE" --journal "$journal" --update-base \
            || fail "round $r: fsynced data lost or damaged by the crash (journal $journal, seed $SEED)"
    else
        tmo python3 "$WRITER" verify --dir "$MNT/crash" --base "$BASE" \
            || fail "round $r: files nobody wrote this round changed in the crash"
    fi
    tmo python3 "$WRITER" verify-meta --dir "$MNT/meta" --base-model "$META_BASE" --journal "$mjournal" --update-base \
        || fail "round $r: metadata operations that had returned were lost in the crash (journal $mjournal, seed $SEED)"
    stop_mount "$MNT"
    fsck_ok "after a clean unmount" "$r-clean"
done

[ "$total_syncs" -gt 0 ] || fail "no fsync completed in any round: the test proved nothing"
[ "$total_meta" -gt 0 ] || fail "no metadata op completed in any round: the test proved nothing"
[ "$ROUNDS" -lt 2 ] || [ "$total_gc_ok" -gt 0 ] || fail "no tessera gc completed in any gc round: the kills never met a compaction"
step "final state"
tessera stats "$DS" || fail "tessera stats $DS failed"
log "$ROUNDS crash rounds passed ($total_syncs fsyncs, $total_meta metadata ops, $total_gc_ok gc runs in all)"
