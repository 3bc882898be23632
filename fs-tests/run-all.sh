#!/usr/bin/env bash
# fs-tests/run-all.sh [SUITE...]: run the filesystem test suites against the
# release binary, each under a time limit, and report pass/fail per suite.
# Suites: cli (the README flow), space (du, background reclamation), corrupt (damaged packs and
# metadata), fulldisk (ENOSPC on a small loop disk), nfs (the NFSv3 export with real clients), crash (kill -9
# durability), promises (README numbers: clone --count durable, 5 s flush, bounded write-back, scrub
# pacing), trust (the reported hang, punch and lost-metadata failures), pjdfstest (POSIX), security
# (private datastore modes, control socket peer check), metrics (the Prometheus endpoint),
# package (the Debian package: lintian, dpkg, mount -t fuse.tessera, fstab, purge), snapshot (snapshots
# through the mount, NFS and the CLI: read-only, rollback, restore, schedule, prune, space),
# replication (send | receive between two datastores, incremental, cut streams, promote), s3 (an
# S3-backed datastore against moto's S3 server: uploads, eviction, read-back, lease, kill -9, restore),
# s3-nfs and s3-pjdfstest (nfs and pjdfstest, whole, on S3-backed datastores with a disk cache
# smaller than their data).
# Exits non-zero if any suite failed. pjdfstest (both), fulldisk, security and package need root: outside CI
# (CI=true) it is skipped, and reported as skipped, when run as a user. After each suite, any Tessera mount it
# left under a scratch dir (e.g. killed by its time limit) is detached.
#
# Env: FS_TESTS (suites to run, default "cli trust space corrupt fulldisk nfs snapshot replication s3 s3-nfs metrics crash promises pjdfstest s3-pjdfstest security package"; or pass them as
#      arguments), TIMEOUT_CLI (600), TIMEOUT_NFS (900), TIMEOUT_CRASH (1200), TIMEOUT_PJDFSTEST
#      (1200) in seconds, TESSERA (binary), plus each suite's own knobs.
set -euo pipefail
cd -- "$(dirname -- "$0")/.."
export TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || { echo "run-all: no tessera binary at $TESSERA (make build)" >&2; exit 1; }

if [ $# -gt 0 ]; then suites=("$@"); else read -r -a suites <<<"${FS_TESTS:-cli trust space corrupt fulldisk nfs snapshot replication s3 s3-nfs metrics crash promises pjdfstest s3-pjdfstest security package}"; fi

limit_of() {
    case $1 in
    cli) echo "${TIMEOUT_CLI:-600}" ;;
    nfs | s3-nfs) echo "${TIMEOUT_NFS:-900}" ;;
    space) echo "${TIMEOUT_SPACE:-600}" ;;
    corrupt) echo "${TIMEOUT_CORRUPT:-600}" ;;
    fulldisk) echo "${TIMEOUT_FULLDISK:-600}" ;;
    crash) echo "${TIMEOUT_CRASH:-1200}" ;;
    promises) echo "${TIMEOUT_PROMISES:-600}" ;;
    pjdfstest | s3-pjdfstest) echo "${TIMEOUT_PJDFSTEST:-1200}" ;;
    *) echo 900 ;;
    esac
}

# Each suite's scratch dir records this run's id (lib.sh: .run-id), so the sweep after a suite
# detaches only this run's leftover mounts, never those of another run on the same machine.
export TESSERA_RUN_ID=${TESSERA_RUN_ID:-run-$$-$(date +%s%N)}
TEST_ROOT=$(realpath -- "${TESSERA_TEST_TMP:-/var/tmp}")

# Detach FUSE mounts left under this run's scratch dirs.
sweep_mounts() {
    local m d
    for m in $(awk -v p="$TEST_ROOT/tessera-test." '$3 ~ "^fuse" && index($2, p) == 1 { print $2 }' /proc/self/mounts); do
        d=${m#"$TEST_ROOT/"}
        d=$TEST_ROOT/${d%%/*}      # the scratch dir the mount is in
        [ "$(cat "$d/.run-id" 2>/dev/null)" = "$TESSERA_RUN_ID" ] || continue
        echo "run-all: WARNING: $1 left $m mounted; detaching it" >&2
        timeout 10 fusermount3 -u -z -- "$m" 2>/dev/null || timeout 10 umount -l -- "$m" 2>/dev/null || true
    done
}

OUT_DIR=$(mktemp -d "$TEST_ROOT/tessera-fs-tests-out.XXXXXX")
trap 'rm -rf -- "$OUT_DIR"' EXIT
declare -A result=() took=()
failed=0
for s in "${suites[@]}"; do
    script=fs-tests/$s.sh
    [ -x "$script" ] || { echo "run-all: no such suite: $s" >&2; exit 2; }
    limit=$(limit_of "$s")
    printf '\n==================== fs-tests: %s (limit %ss) ====================\n' "$s" "$limit"
    if [[ $s == pjdfstest || $s == s3-pjdfstest || $s == fulldisk || $s == security || $s == package ]] && [ "$(id -u)" != 0 ] && [ "${CI:-}" != true ]; then
        echo "run-all: $s needs root; skipped"
        result[$s]="SKIP (needs root)" took[$s]=0
        continue
    fi
    start=$SECONDS
    # The suite's output is kept, so the summary can repeat a failure's last lines: CI shows
    # only the tail of the run.
    set +e
    timeout -k 60 "$limit" "$script" </dev/null 2>&1 | tee "$OUT_DIR/$s.log"
    rc=${PIPESTATUS[0]}
    set -e
    took[$s]=$((SECONDS - start))
    sweep_mounts "$s"
    case $rc in
    0) result[$s]=PASS ;;
    124 | 137) result[$s]="FAIL (timed out after ${limit}s)"; failed=1 ;;
    *) result[$s]="FAIL (exit $rc)"; failed=1 ;;
    esac
done

printf '\n==================== fs-tests summary ====================\n'
for s in "${suites[@]}"; do printf '  %-10s %-32s %5ss\n' "$s" "${result[$s]}" "${took[$s]}"; done
for s in "${suites[@]}"; do
    [[ ${result[$s]} == FAIL* ]] || continue
    printf '\n---- %s: the last 15 lines it printed ----\n' "$s"
    tail -n 15 -- "$OUT_DIR/$s.log" | cut -c1-300
done
exit "$failed"
