#!/usr/bin/env bash
# fs-tests/pjdfstest.sh [TEST_PATTERN...]: POSIX conformance of the FUSE mount.
#
# Runs the pjdfstest suite (Rust crate `pjdfstest` 0.2.2) as root against a
# fresh Tessera mount, then unmounts and runs `tessera fsck` on what the suite
# left behind (fifos, sockets, devices, hard links, renames, odd modes).
# Protects: POSIX semantics (permissions, ownership, timestamps, link counts,
# rename/unlink/rmdir rules, error codes) and metadata consistency.
#
# Exclusions: fs-tests/pjdfstest.exclude, one exact test name per line with a
# `# reason`. They are passed to pjdfstest as `expected_failures`; an excluded
# test that passes is reported (remove it from the list) but only fails the
# run with PJD_STRICT=1. Any other failure fails the run.
#
# Pinned result: fs-tests/pjdfstest.expected holds the number of tests that
# pass and the list of tests expected to be skipped (README: 0 failures, 384
# passed, 14 skipped). A full run (no TEST_PATTERN) fails when fewer tests pass
# or when a test not in that list is skipped, naming the newly skipped tests:
# lost coverage does not pass silently.
#
# Env: PJDFSTEST (binary; default pjdfstest in PATH or $CARGO_HOME/bin),
#      PJD_NAPTIME (0.01), PJD_TIMEOUT (1200 s), PJD_LOG (full log; default
#      /var/tmp/tessera-pjdfstest.log), PJD_EXCLUDE (the exclude file), PJD_STRICT,
#      PJD_EXPECTED (the pinned result file), TESSERA, KEEP_TMP.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"

[ "$(id -u)" = 0 ] || fail "pjdfstest must run as root (chown, mknod, dummy users)"
PJDFSTEST=${PJDFSTEST:-$(command -v pjdfstest || echo "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest")}
[ -x "$PJDFSTEST" ] || fail "pjdfstest not found (cargo install pjdfstest --locked --version 0.2.2, or .ci/deps.sh)"
EXCLUDE=${PJD_EXCLUDE:-$FS_TESTS_DIR/pjdfstest.exclude}
EXPECTED=${PJD_EXPECTED:-$FS_TESTS_DIR/pjdfstest.expected}
[ -f "$EXPECTED" ] || fail "no pinned result file $EXPECTED"
PJD_LOG=${PJD_LOG:-/var/tmp/tessera-pjdfstest.log}
for u in nobody:nogroup daemon:daemon; do
    id -u "${u%:*}" >/dev/null 2>&1 && getent group "${u#*:}" >/dev/null \
        || fail "dummy user/group $u does not exist on this machine"
done

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
CONF=$TEST_TMP/pjdfstest.toml
SECONDARY=$(mktemp -d /dev/shm/tessera-pjd-secondary.XXXXXX)   # tmpfs: another fs, for EXDEV tests
CLEANUP_PATHS+=("$SECONDARY")
chmod 0755 "$SECONDARY"

# exclude file -> TOML list of names (reason comments and blank lines dropped)
excluded=()
while IFS= read -r line || [ -n "$line" ]; do
    read -r name extra <<<"${line%%#*}" || true
    [ -n "$name" ] || continue
    [ -z "$extra" ] || fail "pjdfstest.exclude: one test name per line: '$line'"
    [[ $name =~ ^[A-Za-z0-9_:]+$ ]] || fail "pjdfstest.exclude: bad test name '$name'"
    [[ $line == *'#'?* ]] || fail "pjdfstest.exclude: '$name' has no '# reason'"
    excluded+=("$name")
done <"$EXCLUDE"
toml_list=$(printf '"%s", ' ${excluded[@]+"${excluded[@]}"})

cat >"$CONF" <<TOML
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}
secondary_fs = "$SECONDARY"

[settings]
naptime = ${PJD_NAPTIME:-0.01}
allow_remount = false
expected_failures = [${toml_list%, }]

[dummy_auth]
entries = [
  ["nobody", "nogroup"],
  ["daemon", "daemon"],
]
TOML

init_ds "$DS"
start_mount "$DS" "$MNT"
if [ "${TESSERA_S3:-0}" = 1 ]; then
    # pjdfstest writes little data: 8 MiB beside it put the datastore beyond its disk cache,
    # so the suite runs while packs are uploaded and evicted; read back at the end.
    head -c $((8 << 20)) /dev/urandom >"$TEST_TMP/ballast"
    tmo dd if="$TEST_TMP/ballast" of="$MNT/ballast" bs=1M conv=fsync status=none
fi
WORK=$MNT/pjdfstest
mkdir -m 0755 "$WORK"

step "$("$PJDFSTEST" --version) on $MNT (${#excluded[@]} excluded; log $PJD_LOG)"
rc=0
(cd "$WORK" && NO_COLOR=1 CLICOLOR=0 TERM=dumb timeout -k 10 "${PJD_TIMEOUT:-1200}" \
    "$PJDFSTEST" -c "$CONF" -p "$WORK" "$@") </dev/null >"$PJD_LOG" 2>&1 || rc=$?
sed -i 's/\x1b\[[0-9;]*m//g' "$PJD_LOG"

# Result lines are "NAME <spaces> STATUS"; details follow on tab-indented lines.
status_re='^([A-Za-z0-9_:]+) +(ok|skipped|FAILED|PASSED UNEXPECTEDLY|failed as expected)$'
names_with() { sed -nE "s/$status_re/\1 \2/p" "$PJD_LOG" | awk -v s="$1" '{ n = $1; $1 = ""; if (substr($0, 2) == s) print n }'; }
summary=$(grep -E '^Summary:' "$PJD_LOG" | tail -n 1 || true)
failed=$(names_with FAILED)
unexpected=$(names_with 'PASSED UNEXPECTEDLY')

step "pjdfstest result (exit $rc)"
echo "${summary:-no summary line: pjdfstest crashed or timed out}"
if [ -n "$failed" ]; then
    echo "failed tests (not in pjdfstest.exclude):"
    # each failure with its message lines
    awk -v list="$failed" 'BEGIN { n = split(list, a, "\n"); for (i = 1; i <= n; i++) want[a[i]] = 1 }
        /^[^\t ]/ { show = ($1 in want) && / FAILED$/ } show { print "  " $0 }' "$PJD_LOG" | head -n 400
fi
if [ -n "$unexpected" ]; then
    echo "excluded tests that PASSED (remove them from fs-tests/pjdfstest.exclude):"
    echo "$unexpected" | sed 's/^/  /'
fi
if [ $# = 0 ]; then
    for name in ${excluded[@]+"${excluded[@]}"}; do
        grep -qE "^$name +" "$PJD_LOG" || echo "warning: excluded test '$name' does not exist in this pjdfstest"
    done
fi

step "unmount and fsck what pjdfstest left behind"
if [ "${TESSERA_S3:-0}" = 1 ]; then
    tmo cmp -s "$TEST_TMP/ballast" "$MNT/ballast" || fail "the 8 MiB written before the suite differ"
fi
stop_mount "$MNT"
fsck_rc=0
tessera fsck "$DS" || fsck_rc=$?

[ -n "$summary" ] || fail "pjdfstest did not finish (exit $rc); see $PJD_LOG"
[ -z "$failed" ] || fail "pjdfstest: $(echo "$failed" | wc -l) test(s) failed ($summary); see $PJD_LOG"
if [ $# = 0 ]; then
    # the pinned result: as many passes, no skip that is not listed
    want_passed=$(awk '$1 == "passed" { print $2 }' "$EXPECTED")
    want_skips=$(awk '$1 == "skip" { print $2 }' "$EXPECTED" | sort)
    [[ $want_passed =~ ^[0-9]+$ ]] || fail "$EXPECTED: no 'passed N' line"
    got_passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")
    got_skips=$(names_with skipped | sort)
    new_skips=$(comm -13 <(echo "$want_skips") <(echo "$got_skips") | grep . || true)
    gone_skips=$(comm -23 <(echo "$want_skips") <(echo "$got_skips") | grep . || true)
    n_want=$(grep -c . <<<"$want_skips" || true)
    n_got=$(grep -c . <<<"$got_skips" || true)
    log "pinned: $want_passed passed, $n_want skipped; this run: ${got_passed:-?} passed, $n_got skipped"
    [ -z "$gone_skips" ] || log "no longer skipped (delete them from $EXPECTED): $(echo $gone_skips)"
    [ -n "$got_passed" ] && [ "$got_passed" -le "$want_passed" ] || [ -z "$got_passed" ] \
        || log "more tests pass than pinned: raise 'passed' in $EXPECTED to $got_passed"
    if [ -n "$new_skips" ]; then
        echo "newly skipped tests (not in $EXPECTED):"
        for n in $new_skips; do
            printf '  %s: %s\n' "$n" "$(grep -A1 -E "^$n +skipped$" "$PJD_LOG" | sed -n '2s/^\t//p')"
        done
        fail "pjdfstest: $(echo "$new_skips" | wc -l) test(s) newly skipped (pinned: $n_want skipped); see above"
    fi
    [ "$n_got" -le "$n_want" ] || fail "pjdfstest: $n_got tests skipped, pinned $n_want"
    [ -n "$got_passed" ] && [ "$got_passed" -ge "$want_passed" ] \
        || fail "pjdfstest: ${got_passed:-no count of} tests passed, pinned $want_passed ($summary)"
fi
if [ -n "$unexpected" ] && [ "${PJD_STRICT:-0}" = 1 ]; then
    fail "pjdfstest: excluded tests passed (PJD_STRICT=1)"
fi
# pjdfstest exits 1 for unexpected passes too; anything else non-zero is unexplained
if [ "$rc" != 0 ] && [ -z "$unexpected" ]; then fail "pjdfstest exited $rc without a failed test"; fi
[ "$fsck_rc" = 0 ] || fail "tessera fsck exited $fsck_rc after pjdfstest"
if [ "${TESSERA_S3:-0}" = 1 ]; then
    # The data went through the bucket: more of it there than the disk cache holds.
    tessera stats --json "$DS" >"$TEST_TMP/stats.json"
    python3 - "$TEST_TMP/stats.json" <<'PY' || fail "the S3-backed run did not exercise the bucket"
import json, sys
t = json.load(open(sys.argv[1]))["tier"]
print(f"[pjdfstest] bucket: {t['objects']} objects, {t['object_bytes']} bytes; disk cache {t['cache_limit_bytes']} bytes", file=sys.stderr)
assert t["object_bytes"] > t["cache_limit_bytes"], "the data fits the disk cache: the bucket was not exercised"
PY
fi
