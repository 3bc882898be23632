#!/usr/bin/env bash
# fs-tests/crash.sh: kill -9 crash test against a real mount.
#
# Protects: (1) durability: every write that an fsync()/fdatasync() covered is
# there byte for byte after the daemon is killed at a random moment (and later,
# unsynced writes are either there or not, never garbage); (2) the datastore
# is consistent after a crash (`tessera fsck` exits 0) and after the
# following clean unmount; (3) a clean unmount keeps everything (each round
# starts by comparing the files exactly with the state verified last round).
# The rounds share one datastore, so packs, dead records and dedup references
# accumulate across crashes.
#
# Env: CRASH_ROUNDS (20), CRASH_SEED (random; printed, set it to replay),
#      CRASH_MIN_MS / CRASH_MAX_MS (1000 / 3000: when the kill comes),
#      CRASH_MBPS (32: writer throughput cap, MiB/s), TESSERA, KEEP_TMP.
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

total_syncs=0
for r in $(seq 1 "$ROUNDS"); do
    step "round $r/$ROUNDS"
    start_mount "$DS" "$MNT"
    # what the previous round verified must have survived its clean unmount, exactly
    tmo python3 "$WRITER" verify --dir "$MNT/crash" --base "$BASE" \
        || fail "round $r: files differ from the state verified before the last clean unmount"

    journal=$TEST_TMP/journal-$r.jsonl
    wlog=$TEST_TMP/logs/writer-$r.log
    python3 "$WRITER" write --dir "$MNT/crash" --journal "$journal" \
        --seed $((SEED * 1000 + r)) --max-seconds 60 --mbps "${CRASH_MBPS:-32}" \
        </dev/null >"$wlog" 2>&1 &
    wpid=$!
    BG_PIDS+=("$wpid")
    # Every other round, compaction runs in the serving process while the writer writes, so
    # some kills land in the middle of a gc (copy, switch, delete) as well.
    gcpid=
    if [ $((r % 2)) = 0 ]; then
        (while tessera gc "$DS" --min-live 1.0 >/dev/null 2>&1; do sleep 0.2; done) &
        gcpid=$!
        BG_PIDS+=("$gcpid")
    fi
    ms=$((MIN_MS + RANDOM % (MAX_MS - MIN_MS + 1)))
    sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    if ! pid_running "$wpid"; then
        reap "$wpid"
        cat "$wlog" >&2
        fail "round $r: the writer stopped (status $REAPED) before the crash: I/O error on a live mount?"
    fi

    kill9_mount "$MNT"            # the crash, after ${ms} ms of writing
    if [ -n "$gcpid" ]; then
        # Stop the gc loop. A `tessera gc` that found the daemon dead runs on the datastore
        # itself: kill it too (one more crash in the middle of a compaction).
        kill "$gcpid" 2>/dev/null || true
        pkill -KILL -f "tessera gc $DS" 2>/dev/null || true
        wait_pid_exit "$gcpid" 10 || kill -KILL "$gcpid" 2>/dev/null || true
        reap "$gcpid"
        for _ in $(seq 50); do pgrep -f "tessera gc $DS" >/dev/null || break; sleep 0.1; done
    fi
    # the writer now gets ENOTCONN and stops by itself
    if ! wait_pid_exit "$wpid" 15; then
        log "writer still running 15 s after the crash; killing it"
        kill -KILL "$wpid" 2>/dev/null || true
        wait_pid_exit "$wpid" 5 || true
    fi
    reap "$wpid"
    syncs=$(grep -c '"op": "sync"' "$journal" || true)
    writes=$(grep -c '"op": "write"' "$journal" || true)
    total_syncs=$((total_syncs + syncs))
    log "crashed after ${ms} ms: $writes writes logged, $syncs fsyncs completed; writer: $(tail -n 1 "$wlog")"

    fsck_ok "after the crash" "$r-crash"
    start_mount "$DS" "$MNT"
    tmo python3 "$WRITER" verify --dir "$MNT/crash" --base "$BASE" --journal "$journal" --update-base \
        || fail "round $r: fsynced data lost or damaged by the crash (journal $journal, seed $SEED)"
    stop_mount "$MNT"
    fsck_ok "after a clean unmount" "$r-clean"
done

[ "$total_syncs" -gt 0 ] || fail "no fsync completed in any round: the test proved nothing"
step "final state"
tessera stats "$DS" || fail "tessera stats $DS failed"
log "$ROUNDS crash rounds passed ($total_syncs fsyncs verified in all)"
