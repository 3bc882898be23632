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
# that finds the file fsynced before the kill intact (and all of them after the last round);
# ROUNDS kill -9 rounds during compaction of evicted packs (read back from the bucket), every
# fsynced file intact, and after a final compaction and a clean stop the objects of compacted
# packs are deleted and fsck is clean; `tessera restore` rebuilds the datastore in a new folder
# from the bucket alone, every file identical and fsck clean; on that folder (no pack on its
# disk) `fsck --repair` rebuilds the index from the pack objects and `scrub` verifies them; a
# damaged object makes scrub name the file and offset, and reads fail instead of returning
# other bytes.
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

# tier FIELD: a figure of the tier from `tessera stats --json`; tier_of DS FIELD for another.
tier_of() { tessera stats --json "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['tier']['$2'])"; }
tier() { tier_of "$DS" "$1"; }
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

step "$ROUNDS kill -9 rounds during compaction of objects: every fsynced file intact"
# Each round rewrites half of one file (its old records, in uploaded and mostly evicted packs, die),
# then compacts at 1 MiB/s (about 1 MiB of live records to copy, so it takes a second or two),
# reading the packs back from the bucket, and is killed at a random moment of it.
compacted=0
for r in $(seq 1 "$ROUNDS"); do
    start_serve "$DS" --mount "$M" --gc-interval 0
    if [ "$r" -gt 1 ]; then
        p=$((r - 1)) o=$((1 + RANDOM % ROUNDS))
        tmo cmp -s "$W/k$p" "$M/k$p" || fail "round $r: k$p, fsynced before the kill -9, differs"
        tmo cmp -s "$W/k$o" "$M/k$o" || fail "round $r: k$o differs after a kill -9 during compaction"
    fi
    # Half of the file: its packs keep live records, which compaction reads back and copies.
    head -c $((3 * MiB)) /dev/urandom >"$W/half"
    dd if="$W/half" of="$W/k$r" bs=1M conv=notrunc status=none
    tmo dd if="$W/half" of="$M/k$r" bs=1M conv=fsync,notrunc status=none
    "$TESSERA" gc "$DS" --min-live 0.9 --max-rate 1 --json >"$TEST_TMP/gc-$r.json" 2>&1 &
    gc=$!
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    kill9_serve
    wait "$gc" || true
    grep -q '"packs_compacted"' "$TEST_TMP/gc-$r.json" && compacted=$((compacted + 1))
done
start_serve "$DS" --mount "$M" --gc-interval 0
for i in $(seq 1 "$ROUNDS"); do tmo cmp -s "$W/k$i" "$M/k$i" || fail "k$i differs after the compaction rounds"; done
for i in 1 2 3; do tmo cmp -s "$W/f$i" "$M/f$i" || fail "f$i differs after the compaction rounds"; done
# Compaction to the end: it also removes the packs whose removal a kill interrupted.
tessera gc "$DS" --min-live 0.9 --json >"$TEST_TMP/gc-final.json" || fail "gc failed: $(cat "$TEST_TMP/gc-final.json")"
objects_before=$(tier objects)
wait_uploaded
stop_serve
stats=$(tessera stats --json "$DS")
left=$(python3 -c "import json,sys; s=json.loads(sys.argv[1]); print(s['reclaimable_bytes'], s['tier']['objects'], s['pack_count'])" "$stats")
read -r reclaimable objects_after packs <<<"$left"
[ "$compacted" -lt "$ROUNDS" ] || fail "every compaction ended before its kill -9: the rounds did not test a kill during compaction"
log "$((ROUNDS - compacted)) of $ROUNDS compactions were killed before they ended; the final run: $(cat "$TEST_TMP/gc-final.json" | tr -d '\n ' | cut -c1-160)"
log "objects in the bucket: $objects_before before the clean stop, $objects_after after; $packs packs; $reclaimable bytes reclaimable"
[ "$objects_after" -lt "$objects_before" ] || fail "no object of a compacted pack was deleted at the clean stop"
[ "$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['tier']['deletes_pending'])" "$stats")" = 0 ] || fail "deletes still pending after a clean stop"
tessera fsck "$DS" >/dev/null || fail "fsck found problems after the compaction rounds"

step "restore from the bucket alone into a new folder"
R=$TEST_TMP/restored
out=$(tessera restore s3://vdi/pool1 "$R" --endpoint "$EP" --disk-cache 24M) || fail "restore failed: $out"
log "$out"
start_mount "$R" "$TEST_TMP/rm"
for i in 1 2 3; do tmo cmp -s "$W/f$i" "$TEST_TMP/rm/f$i" || fail "f$i differs after restore"; done
for i in $(seq 1 "$ROUNDS"); do tmo cmp -s "$W/k$i" "$TEST_TMP/rm/k$i" || fail "k$i differs after restore"; done
stop_mount "$TEST_TMP/rm"
tessera fsck "$R" >/dev/null || fail "fsck found problems in the restored datastore"

step "the bucket alone is enough for fsck --repair and scrub (no pack is on the new folder's disk)"
ls "$R"/packs/*.pack >/dev/null 2>&1 && fail "the restored folder holds pack files; the bucket would not be tested"
# Repair rescans every pack object, record by record, and rebuilds the chunk index and the
# counts from what it finds: every chunk must be found again, from the bucket.
tessera fsck --repair --json "$R" >"$TEST_TMP/repair.json" || fail "fsck --repair from the bucket failed: $(cat "$TEST_TMP/repair.json")"
python3 - "$TEST_TMP/repair.json" "$(tier_of "$R" objects)" <<'PY' || fail "repair did not scan the bucket: $(cat "$TEST_TMP/repair.json")"
import json, sys
r = json.load(open(sys.argv[1])); objects = int(sys.argv[2])
r = r.get("repair", r)
assert r["packs_scanned"] == objects, f"{r['packs_scanned']} packs scanned, {objects} objects"
assert r["chunks_lost"] == 0 and not r["damaged_files"], r
PY
tessera scrub --json "$R" >"$TEST_TMP/scrub.json" || fail "scrub of the bucket failed: $(cat "$TEST_TMP/scrub.json")"
log "repair: $(tr -d '\n ' <"$TEST_TMP/repair.json" | cut -c1-200)"
log "scrub: $(tr -d '\n ' <"$TEST_TMP/scrub.json" | cut -c1-200)"
start_mount "$R" "$TEST_TMP/rm"
for i in 1 2 3; do tmo cmp -s "$W/f$i" "$TEST_TMP/rm/f$i" || fail "f$i differs after repair"; done
stop_mount "$TEST_TMP/rm"

step "a damaged object: scrub names the file and offset; reads fail, never wrong bytes"
# Through boto3 (moto's own dependency): flip a byte every 64 KiB of the first pack object.
obj=$("${MOTO_SERVER%/*}/python3" - "$EP" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
key = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="vdi", Prefix="pool1/packs/")["Contents"])[0]
b = bytearray(s3.get_object(Bucket="vdi", Key=key)["Body"].read())
for off in range(4096, len(b), 65536):
    b[off] ^= 0xFF
s3.put_object(Bucket="vdi", Key=key, Body=bytes(b))
print(key)
PY
) || fail "cannot damage an object in the bucket"
rm -rf "$R"/cache/*
rc=0
tessera scrub --json "$R" >"$TEST_TMP/scrub2.json" 2>"$TEST_TMP/scrub2.err" || rc=$?
[ "$rc" != 0 ] || fail "scrub found nothing wrong in a damaged object: $(cat "$TEST_TMP/scrub2.json")"
grep -q '"offset"' "$TEST_TMP/scrub2.json" || fail "scrub does not name a file and offset: $(cat "$TEST_TMP/scrub2.json" "$TEST_TMP/scrub2.err")"
log "scrub (exit $rc): $(tr -d '\n ' <"$TEST_TMP/scrub2.json" | cut -c1-240)"
start_mount "$R" "$TEST_TMP/rm"
bad=0
for i in 1 2 3 $(seq 1 "$ROUNDS" | sed 's/^/k/'); do
    f=$i; [[ $f == k* ]] || f=f$i
    if ! tmo cmp -s "$W/$f" "$TEST_TMP/rm/$f" 2>/dev/null; then
        # Differing is only allowed as a read error, never as other bytes.
        tmo cat "$TEST_TMP/rm/$f" >/dev/null 2>&1 && fail "$f reads back different bytes without an error"
        bad=$((bad + 1))
    fi
done
[ "$bad" -gt 0 ] || fail "no file fails to read after damaging $obj"
stop_mount "$TEST_TMP/rm"
log "$bad files fail with EIO on the damaged object; none reads wrong bytes"
log "PASS"
