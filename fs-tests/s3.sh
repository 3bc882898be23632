#!/usr/bin/env bash
# fs-tests/s3.sh: an S3-backed datastore (`tessera init --store s3://...`) against a real S3 API
# server started here (moto's server, on loopback), as a user runs it.
#
# Protects: init refuses an unreachable bucket or a prefix that holds another datastore; files
# written through FUSE are uploaded as pack objects in the background and the folder is cut
# down to its disk cache (smaller than the data); after dropping the page cache every byte
# reads back through FUSE and NFS, from the bucket where evicted; `tessera stats` shows the
# bucket, the cache and the requests; a second server on the same prefix is refused and told
# which host holds it; ROUNDS (20) kill -9 rounds while uploads run, each followed by a restart
# that finds the file fsynced before the kill intact (and all of them after the last round); after a clean stop, `tessera restore` rebuilds the
# datastore in a new folder from the bucket alone, every file identical and fsck clean.
#
# Env: MOTO_SERVER (default: the venv .ci/deps.sh installs, /var/tmp/tessera-moto), ROUNDS.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
MOTO_SERVER=${MOTO_SERVER:-/var/tmp/tessera-moto/bin/moto_server}
[ -x "$MOTO_SERVER" ] || fail "no moto server at $MOTO_SERVER (.ci/deps.sh installs it)"
command -v curl >/dev/null || fail "curl is required"
command -v nfs-cat >/dev/null || fail "nfs-cat is required (libnfs-utils)"
ROUNDS=${ROUNDS:-20}
MiB=$((1024 * 1024))

make_tmp
DS=$TEST_TMP/ds
M=$TEST_TMP/m
W=$TEST_TMP/work
mkdir -p "$W"
export AWS_ACCESS_KEY_ID=tessera-test AWS_SECRET_ACCESS_KEY=tessera-test-secret

step "an S3 API server on loopback (moto)"
PORT=$((20000 + RANDOM % 20000))
"$MOTO_SERVER" -H 127.0.0.1 -p "$PORT" >"$TEST_TMP/logs/moto.log" 2>&1 &
BG_PIDS+=("$!")
EP=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do curl -sf -o /dev/null "$EP/" && break; sleep 0.2; done
curl -sf -o /dev/null "$EP/" || fail "moto did not start (log: $TEST_TMP/logs/moto.log)"
curl -sf -X PUT -o /dev/null "$EP/vdi" || fail "cannot create the bucket"

step "init refuses what it cannot use"
out=$(tessera init "$TEST_TMP/bad" --store s3://no-such-bucket/x --endpoint "$EP" 2>&1) &&
    fail "init accepted a bucket that does not exist"
grep -q "NoSuchBucket\|cannot reach" <<<"$out" || fail "unclear error for a missing bucket: $out"
[ ! -e "$TEST_TMP/bad" ] || fail "a refused init left a folder behind"
out=$(unset AWS_SECRET_ACCESS_KEY; tessera init "$TEST_TMP/bad" --store s3://vdi/x --endpoint "$EP" 2>&1) &&
    fail "init accepted missing credentials"
grep -q "AWS_SECRET_ACCESS_KEY" <<<"$out" || fail "the credentials error does not say what to set: $out"

step "init --store, with a 24 MiB disk cache"
tessera init "$DS" --store s3://vdi/pool1 --endpoint "$EP" --disk-cache 24M >/dev/null
grep -q "$AWS_SECRET_ACCESS_KEY" "$DS/tier.json" && fail "the secret key was written into tier.json"
# Small packs and a short idle seal, so a test-sized write makes many objects quickly.
python3 - "$DS/tier.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c["pack_bytes"] = 4 << 20; c["seal_idle_secs"] = 2
open(p, "w").write(json.dumps(c))
PY
start_serve "$DS" --mount "$M" --gc-interval 0
out=$(tessera init "$TEST_TMP/other" --store s3://vdi/pool1 --endpoint "$EP" 2>&1) &&
    fail "a second init on a prefix in use succeeded"
grep -q "already holds" <<<"$out" || fail "unclear error for a prefix in use: $out"

# tier FIELD: a figure of the tier from `tessera stats --json`.
tier() { tessera stats --json "$DS" | python3 -c "import json,sys; print(json.load(sys.stdin)['tier']['$1'])"; }
# wait_uploaded: until nothing waits for upload (the active pack is sealed when idle).
wait_uploaded() {
    local deadline=$((SECONDS + 120))
    until [ "$(tier uploads_pending)" = 0 ] && [ "$(tessera stats --json "$DS" | python3 -c "
import json,sys; t=json.load(sys.stdin)['tier']; print(t['local_pack_bytes'] - t['cached_pack_bytes'])")" = 0 ]; do
        [ $SECONDS -lt "$deadline" ] || fail "uploads did not finish in 120 s: $(tessera stats "$DS" | grep -A5 'object store')"
        sleep 1
    done
}

step "120 MiB of unique data through FUSE: uploaded, and the folder cut to its cache"
for i in 1 2 3; do
    head -c $((40 * MiB)) /dev/urandom >"$W/f$i"
    tmo dd if="$W/f$i" of="$M/f$i" bs=1M conv=fsync status=none
done
wait_uploaded
objects=$(tier objects)
[ "$objects" -ge 25 ] || fail "only $objects objects in the bucket for 120 MiB in 4 MiB packs"
cached=$(( $(tier cached_pack_bytes) + $(tier cache_block_bytes) ))
[ "$cached" -le $((24 * MiB)) ] || fail "the folder keeps $cached bytes, over its 24 MiB cache"
log "$objects objects; $((cached / MiB)) MiB kept locally"

step "every byte reads back through FUSE and NFS, from the bucket where evicted"
down=$(tier bytes_downloaded)
sync; echo 3 >/proc/sys/vm/drop_caches
for i in 1 2 3; do tmo cmp "$W/f$i" "$M/f$i" || fail "f$i differs through FUSE"; done
[ "$(tmo nfs-cat "nfs://$NFS_HOST/ds/f2" | sha256sum)" = "$(sha256sum <"$W/f2")" ] ||
    fail "f2 differs over NFS"
[ "$(tier bytes_downloaded)" -gt "$down" ] || fail "nothing was read back from the bucket"
tessera stats "$DS" | grep -A5 "object store" >&2

step "a second server on the same prefix is refused, naming the holder"
mkdir -p "$TEST_TMP/two"
tessera init "$TEST_TMP/two" >/dev/null
cp "$DS/tier.json" "$TEST_TMP/two/"
out=$(tessera stats "$TEST_TMP/two" 2>&1) && fail "a second datastore opened a prefix in use"
grep -q "in use by host $(cat /proc/sys/kernel/hostname)" <<<"$out" || fail "the refusal does not name the holder: $out"

step "$ROUNDS kill -9 rounds during uploads: every fsynced file intact after each restart"
kill9_serve
for r in $(seq 1 "$ROUNDS"); do
    start_serve "$DS" --mount "$M" --gc-interval 0
    # The file of the round before (all of them are checked at the end).
    if [ "$r" -gt 1 ]; then
        tmo cmp -s "$W/k$((r - 1))" "$M/k$((r - 1))" || fail "round $r: k$((r - 1)), fsynced before the kill -9, differs"
    fi
    head -c $((6 * MiB)) /dev/urandom >"$W/k$r"
    tmo dd if="$W/k$r" of="$M/k$r" bs=1M conv=fsync status=none
    # A random moment: during the upload of the packs just sealed, or later.
    sleep "0.$((RANDOM % 10))"
    kill9_serve
done
start_serve "$DS" --mount "$M" --gc-interval 0
for i in $(seq 1 "$ROUNDS"); do tmo cmp -s "$W/k$i" "$M/k$i" || fail "k$i differs after the last kill -9"; done
for i in 1 2 3; do tmo cmp -s "$W/f$i" "$M/f$i" || fail "f$i differs after the kill -9 rounds"; done
wait_uploaded
stop_serve
tessera fsck "$DS" >/dev/null || fail "fsck found problems after the kill -9 rounds"

step "restore from the bucket alone into a new folder"
R=$TEST_TMP/restored
out=$(tessera restore s3://vdi/pool1 "$R" --endpoint "$EP" --disk-cache 24M) || fail "restore failed: $out"
log "$out"
start_mount "$R" "$TEST_TMP/rm"
for i in 1 2 3; do tmo cmp -s "$W/f$i" "$TEST_TMP/rm/f$i" || fail "f$i differs after restore"; done
for i in $(seq 1 "$ROUNDS"); do tmo cmp -s "$W/k$i" "$TEST_TMP/rm/k$i" || fail "k$i differs after restore"; done
stop_mount "$TEST_TMP/rm"
tessera fsck "$R" >/dev/null || fail "fsck found problems in the restored datastore"
log "PASS"
