#!/usr/bin/env bash
# benches/s3.sh: an S3-backed datastore (`tessera init --store s3://...`, issue 12) against a
# local one, in one run, both on the same loop-mounted ext4 disk (../shared/tools/peers), the
# bucket served by moto's S3 server on loopback with its object files on that same disk.
#
#   ingest   the VDI corpus (../shared/tools/corpus: golden + 8 desktops, 18 GiB logical) copied
#            through the FUSE mount (cp, then sync of each file), onto a local datastore and onto
#            an S3-backed one with a disk cache smaller than the data (CACHE, 256 MiB): seconds
#            until every file is acknowledged as durable (target: S3 >= 0.8x local's speed), and
#            until the last pack is in the bucket.
#   requests requests per GiB stored in the bucket (PUTs are multipart parts of 8 MiB, GETs
#            the 1 MiB ranges read back), and objects per GiB.
#   cold     a cold sequential read (dd, 1 MiB) of the golden image after a restart with an
#            emptied page cache: on the S3-backed datastore its packs are evicted (checked: the
#            bytes downloaded are reported), against the same read on the local datastore.
#
# Needs root, the moto server (.ci/deps.sh installs it in /var/tmp/tessera-moto), curl, jq.
# Env: CORPUS (/var/tmp/corpus), CACHE (256M), MNT_ROOT (/mnt), MOTO_SERVER, BENCH_RESULTS_DIR.
# Writes benches/results/s3.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
CORPUS_TOOLS=$(realpath ../shared/tools/corpus)
MNT_ROOT=${MNT_ROOT:-/mnt}
CORPUS=${CORPUS:-/var/tmp/corpus}
CACHE=${CACHE:-256M}
MOTO_SERVER=${MOTO_SERVER:-/var/tmp/tessera-moto/bin/moto_server}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
[ -x "$MOTO_SERVER" ] || { echo "bench: no moto server at $MOTO_SERVER (.ci/deps.sh installs it)" >&2; exit 1; }
EXT4=$MNT_ROOT/peer-ext4
MNT=$MNT_ROOT/tessera-s3
WORK=${WORK:-/tmp/tessera-s3-work}
TPID=
MPID=

ls "$CORPUS"/desktop-0{1..8}.raw >/dev/null 2>&1 || "$CORPUS_TOOLS/make-corpus.sh" "$CORPUS" 8
IMAGES=("$CORPUS/golden.raw" "$CORPUS"/desktop-0{1..8}.raw)

bench_begin s3
bench_binary "$TESSERA"
bench_param CORPUS "$CORPUS" /var/tmp/corpus
bench_param CACHE "$CACHE" 256M

cleanup() {
    stop_pid "$TPID"
    fusermount3 -u "$MNT" 2>/dev/null || true
    stop_pid "$MPID"
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK" "$MNT"
"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"

# moto keeps objects in temporary files: on the disk under test, like the local packs.
mkdir -p "$EXT4/moto"
PORT=$((20000 + RANDOM % 20000))
TMPDIR=$EXT4/moto "$MOTO_SERVER" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MPID=$!
EP=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do curl -sf -o /dev/null "$EP/" && break; sleep 0.2; done
curl -sf -X PUT -o /dev/null "$EP/bench" || { echo "bench: moto did not start ($WORK/moto.log)" >&2; exit 1; }
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret

serve() { # serve DS [ARGS]: FUSE mount at $MNT (no NFS: the copy goes through FUSE)
    "$TESSERA" mount "$1" "$MNT" "${@:2}" 2>"$WORK/tessera-$(basename "$1").log" &
    TPID=$!
    for _ in $(seq 1 300); do mountpoint -q "$MNT" && return 0; sleep 0.1; done
    echo "bench: the mount of $1 did not come up" >&2; tail "$WORK/tessera-$(basename "$1").log" >&2; return 1
}
stop() { stop_pid "$TPID"; TPID=; }
tier() { "$TESSERA" stats --json "$1" | jq ".tier.$2 // 0"; }
now() { date +%s.%N; }

# ingest DS: copy the corpus through the mount; prints the seconds until the last sync. The
# images are read once first, so both runs read them from the page cache (the first run would
# otherwise read them from the disk and the second not).
ingest() {
    local t0 img
    cat "${IMAGES[@]}" >/dev/null
    t0=$(now)
    for img in "${IMAGES[@]}"; do
        cp --sparse=always "$img" "$MNT/$(basename "$img")"
        sync "$MNT/$(basename "$img")"
    done
    echo "$(now) - $t0" | bc -l
}
# cold_read DS: restart with an empty page cache, read the golden image; sets MBPS (MB/s) and
# FETCHED (bytes the serving process downloaded from the bucket during the read).
cold_read() {
    serve "$1"
    drop_caches
    local t0 t d0
    d0=$(tier "$1" bytes_downloaded)
    t0=$(now)
    dd if="$MNT/golden.raw" of=/dev/null bs=1M status=none
    t=$(echo "$(now) - $t0" | bc -l)
    MBPS=$(echo "$(stat -c %s "$MNT/golden.raw") / $t / 1000000" | bc -l)
    FETCHED=$(( $(tier "$1" bytes_downloaded) - d0 ))
    stop
}

# ---- local
L=$EXT4/ds-local
"$TESSERA" init "$L" >/dev/null
# Compressing as it writes, as an S3-backed datastore does (one that stored a copy
# uncompressed would upload it twice): the comparison is of the tier alone.
serve "$L" --raw-backlog 0
t_local=$(ingest)
stop
echo "bench: local ingest $(printf '%.1f' "$t_local") s"

# ---- S3-backed
S=$EXT4/ds-s3
"$TESSERA" init "$S" --store s3://bench/pool --endpoint "$EP" --disk-cache "$CACHE" >/dev/null
serve "$S"
t_s3=$(ingest)
t0=$(now)
deadline=$((SECONDS + 1800))
# Until nothing waits for upload (the active pack is sealed after 30 s idle).
until [ "$(tier "$S" uploads_pending)" = 0 ] &&
    [ "$("$TESSERA" stats --json "$S" | jq '.tier.local_pack_bytes - .tier.cached_pack_bytes')" = 0 ]; do
    [ $SECONDS -lt $deadline ] || { echo "bench: uploads did not finish in 30 min" >&2; exit 1; }
    sleep 1
done
t_drain=$(echo "$t_s3 + $(now) - $t0" | bc -l)
"$TESSERA" stats --json "$S" >"$WORK/s3-ingest.json"
stop
echo "bench: S3 ingest $(printf '%.1f' "$t_s3") s acknowledged, $(printf '%.1f' "$t_drain") s until the last pack was in the bucket"
"$TESSERA" stats "$S" | sed -n '/object store/,$p'

gib=$(jq '.tier.object_bytes / 1073741824' "$WORK/s3-ingest.json")
puts=$(jq '.tier.requests_put' "$WORK/s3-ingest.json")
gets=$(jq '.tier.requests_get' "$WORK/s3-ingest.json")
lists=$(jq '.tier.requests_list' "$WORK/s3-ingest.json")
dels=$(jq '.tier.requests_delete' "$WORK/s3-ingest.json")
objects=$(jq '.tier.objects' "$WORK/s3-ingest.json")

# ---- cold reads
cold_read "$L"
mb_local=$MBPS
cold_read "$S"
mb_s3=$MBPS
fetched=$(echo "$FETCHED / 1048576" | bc -l)
echo "bench: cold read of golden.raw: local $(printf '%.0f' "$mb_local") MB/s, S3-backed $(printf '%.0f' "$mb_s3") MB/s ($(printf '%.0f' "$fetched") MiB fetched from the bucket)"

bench_metric ingest_speed x "corpus ingest through FUSE (9 images, 18 GiB logical), speed until every file is synced, S3-backed over local" \
    subject=s3 refs=local better=higher target=">= 0.8x" headline=1
bench_value ingest_speed local 1
bench_value ingest_speed s3 "$(echo "$t_local / $t_s3" | bc -l)"
bench_metric ingest_s s "corpus ingest: seconds until every file is synced (s3_drained: until the last pack is in the bucket)" \
    subject=s3 refs=local,s3_drained better=lower
bench_value ingest_s local "$t_local"
bench_value ingest_s s3 "$t_s3"
bench_value ingest_s s3_drained "$t_drain"
per_gib() { printf '%.1f' "$(echo "$1 / $gib" | bc -l)"; }
bench_metric requests_per_gib req/GiB "requests per GiB stored in the bucket during the ingest" better=lower \
    note="PUT $(per_gib "$puts") (8 MiB multipart parts, each object's start and end, lease renewals, metadata backups), GET $(per_gib "$gets"), LIST $(per_gib "$lists"), DELETE $(per_gib "$dels") per GiB"
bench_value requests_per_gib s3 "$(echo "($puts + $gets + $lists + $dels) / $gib" | bc -l)"
bench_metric objects_per_gib obj/GiB "objects per GiB stored in the bucket" better=lower
bench_value objects_per_gib s3 "$(echo "$objects / $gib" | bc -l)"
bench_metric stored MiB "stored in the bucket after the ingest" better=lower
bench_value stored s3 "$(echo "$gib * 1024" | bc -l)"
bench_metric cold_read MB/s "cold sequential read of golden.raw (2 GiB) through FUSE after a restart, page cache dropped" \
    subject=s3 refs=local better=higher headline=1 cache=cold note="S3-backed: its packs evicted, read back in 1 MiB ranges"
bench_value cold_read local "$mb_local"
bench_value cold_read s3 "$mb_s3"
bench_metric cold_fetched MiB "bytes fetched from the bucket by the cold read of golden.raw"
bench_value cold_fetched s3 "$fetched"
bench_finish
