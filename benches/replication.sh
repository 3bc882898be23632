#!/usr/bin/env bash
# benches/replication.sh: replication between two datastores over loopback TCP (issue 11), on a
# loop-mounted ext4 disk (../shared/tools/peers) holding both.
#
#   full    the VDI corpus (../shared/tools/corpus/make-corpus.sh: golden.raw + 8 diverged
#           desktops, 18 GiB logical) copied into datastore A (cp through the FUSE mount),
#           then `tessera replicate` of the folder to datastore B (`tessera mount
#           --replication`), from cold caches: its time against copying A's pack files with
#           `cat | nc` to a file on the same disk (synced) from cold caches (target: at least
#           0.7x that speed). Also `tessera scrub` of A from cold caches: the receiver's
#           check of every chunk against its id alone, a floor for the full run's time.
#   pool    50 clones of the golden image in A replicated (B holds the golden image's chunks
#           from the corpus already: almost nothing crosses), then 1 % of the 16 KiB blocks
#           rewritten with new data in 10 of them and replicated again: chunk bytes sent
#           against the compressed size of the chunks new to B (A's stored bytes grew by
#           exactly those; target: at most 1.1x), and the stream's overhead per file.
#   Both datastores' files compared byte for byte (a sample) and fsck clean at the end.
#
# Needs root, nc (netcat-openbsd, installed when missing), python3. Env: CORPUS
# (/var/tmp/corpus; built when missing), CLONES (50), MNT_ROOT (/mnt), BENCH_RESULTS_DIR.
# Writes benches/results/replication.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
CORPUS_TOOLS=$(realpath ../shared/tools/corpus)
MNT_ROOT=${MNT_ROOT:-/mnt}
CORPUS=${CORPUS:-/var/tmp/corpus}
CLONES=${CLONES:-50}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
command -v nc >/dev/null || apt-get install -y -q netcat-openbsd >/dev/null
EXT4=$MNT_ROOT/peer-ext4
A=$EXT4/repl-a
B=$EXT4/repl-b
MA=$MNT_ROOT/tessera-repl-a
MB=$MNT_ROOT/tessera-repl-b
PORT=127.0.0.1:19480
PA= PB=
calc() { python3 -c "print($1)"; }

ls "$CORPUS"/desktop-0{1..8}.raw >/dev/null 2>&1 || "$CORPUS_TOOLS/make-corpus.sh" "$CORPUS" 8
IMAGES=("$CORPUS/golden.raw" "$CORPUS"/desktop-0{1..8}.raw)

bench_begin replication
bench_binary "$TESSERA"
bench_param CORPUS "$CORPUS" /var/tmp/corpus
bench_param CLONES "$CLONES" 50

cleanup() {
    for p in $PA $PB; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    fusermount3 -u "$MA" 2>/dev/null || true
    fusermount3 -u "$MB" 2>/dev/null || true
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"
rm -rf "$A" "$B" "$EXT4/ref.bin"
mkdir -p "$MA" "$MB"
"$TESSERA" init "$A" >/dev/null
"$TESSERA" init "$B" >/dev/null

wait_mounted() {
    for _ in $(seq 100); do mountpoint -q "$1" && return 0; sleep 0.1; done
    echo "bench: $1 not mounted" >&2
    exit 1
}
"$TESSERA" mount "$A" "$MA" --gc-interval 0 >/tmp/repl-a.log 2>&1 &
PA=$!
"$TESSERA" mount "$B" "$MB" --gc-interval 0 --replication "$PORT" >/tmp/repl-b.log 2>&1 &
PB=$!
wait_mounted "$MA"
wait_mounted "$MB"

echo "== corpus into A (cp through the mount)" >&2
mkdir -p "$MA/corpus"
for img in "${IMAGES[@]}"; do cp "$img" "$MA/corpus/"; done
sync -f "$MA/corpus/golden.raw"
# A stored the copies uncompressed, to compress them once their packs are cold: replicate the
# corpus as it is at rest (compressed), and send the packs of that to the reference.
sleep 1
"$TESSERA" gc "$A" >/dev/null
PACK_BYTES=$(du -sb "$A/packs" | awk '{ print $1 }')

echo "== full replication of the corpus, cold" >&2
drop_caches || true
t0=$(date +%s.%N)
"$TESSERA" replicate "$MA/corpus" --to "$PORT" --json >/tmp/repl-full.json
t1=$(date +%s.%N)
T_REPL=$(calc "$t1 - $t0")
STREAM=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent"]["stream_bytes"])' /tmp/repl-full.json)

echo "== reference: cat the pack files | nc, to a file on the same disk, synced, cold" >&2
drop_caches || true
nc -l 127.0.0.1 19481 >"$EXT4/ref.bin" &
NCPID=$!
sleep 0.3
t0=$(date +%s.%N)
cat "$A"/packs/* | nc -N 127.0.0.1 19481
wait "$NCPID"
sync -f "$EXT4/ref.bin"
t1=$(date +%s.%N)
T_REF=$(calc "$t1 - $t0")
rm -f "$EXT4/ref.bin"

# The receiver checks every chunk against its id: decompress and hash. Scrub does exactly that
# on all cores and nothing else, so its time is a floor for a full replication on this machine
# (which also reads, sends, stores and indexes, on the same two cores).
echo "== verification alone: tessera scrub of A, cold" >&2
drop_caches || true
t0=$(date +%s.%N)
"$TESSERA" scrub "$A" --max-rate 0 >/dev/null
t1=$(date +%s.%N)
T_SCRUB=$(calc "$t1 - $t0")

echo "== pool: $CLONES clones of the golden image, then 1 % of blocks changed in 10" >&2
mkdir -p "$MA/pool"
"$TESSERA" clone "$MA/corpus/golden.raw" "$MA/pool/golden.raw" >/dev/null
"$TESSERA" clone "$MA/pool/golden.raw" "$MA/pool/desk-{n:03}.raw" --count "$CLONES" >/dev/null
"$TESSERA" replicate "$MA/pool" --to "$PORT" --json >/tmp/repl-pool1.json
stored() { "$TESSERA" stats "$A" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])'; }
before=$(stored)
python3 - "$MA/pool" <<'PY'
import os, random, sys
pool = sys.argv[1]
rng = random.Random(2026)
size = os.path.getsize(os.path.join(pool, "golden.raw"))
blocks = size // 16384
for n in range(1, 11):
    path = os.path.join(pool, f"desk-{n:03}.raw")
    fd = os.open(path, os.O_WRONLY)
    for b in rng.sample(range(blocks), blocks // 100):
        # half-compressible new data, like a guest's writes
        os.pwrite(fd, rng.randbytes(8192) + bytes(8192), b * 16384)
    os.fsync(fd)
    os.close(fd)
PY
# The new blocks were stored uncompressed: their compressed size is what A holds once gc has
# compressed them.
sleep 1
"$TESSERA" gc "$A" >/dev/null
after=$(stored)
NEW_BYTES=$((after - before))
"$TESSERA" replicate "$MA/pool" --to "$PORT" --json >/tmp/repl-pool2.json
read -r SENT STREAM2 ENTRIES HELD1 SENT1 < <(python3 - /tmp/repl-pool2.json /tmp/repl-pool1.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p = json.load(open(sys.argv[2]))
print(r["sent"]["chunk_bytes"], r["sent"]["stream_bytes"], r["sent"]["entries"],
      p["sent"]["chunks_held_by_receiver"], p["sent"]["stream_bytes"])
PY
)

echo "== check: byte for byte (sample), fsck" >&2
for f in corpus/golden.raw corpus/desktop-05.raw pool/desk-001.raw pool/desk-010.raw pool/desk-$(printf %03d "$CLONES").raw; do
    cmp "$MA/$f" "$MB/$f" || { echo "bench: $f differs on B" >&2; exit 1; }
done
for p in $PA $PB; do kill "$p"; wait "$p" || true; done
PA= PB=
"$TESSERA" fsck "$A" >/dev/null
"$TESSERA" fsck "$B" >/dev/null

bench_metric full_speed x "full replication of the corpus over loopback: speed / the pack files sent with cat piped to nc into a synced file (both cold)" \
    better=higher headline=1 target=">= 0.7x"
bench_value full_speed tessera "$(calc "$T_REF / $T_REPL")"
bench_metric full_s s "full replication of the corpus ($(numfmt --to=iec "$PACK_BYTES") of packs)" better=lower
bench_value full_s tessera "$T_REPL"
bench_value full_s "cat+nc" "$T_REF"
bench_metric full_verify s "verification alone: tessera scrub of the source, every chunk decompressed and checked against its id on all cores (cold)" better=lower
bench_value full_verify tessera "$T_SCRUB"
bench_metric full_ceiling x "cat+nc time / verification alone: the most the full replication's speed ratio can reach here" better=higher
bench_value full_ceiling tessera "$(calc "$T_REF / $T_SCRUB")"
bench_metric full_stream MiB "full replication: bytes on the wire" better=lower
bench_value full_stream tessera "$(calc "$STREAM / 1048576")"
bench_value full_stream "cat+nc" "$(calc "$PACK_BYTES / 1048576")"
bench_metric pool_first KiB "$CLONES clones of a golden image the target holds: bytes on the wire" better=lower
bench_value pool_first tessera "$(calc "$SENT1 / 1024")"
bench_metric incr_ratio x "1 % of blocks changed in 10 of $CLONES clones: chunk bytes sent / compressed size of the chunks new to the target" \
    better=lower headline=1 target="<= 1.1x"
bench_value incr_ratio tessera "$(calc "$SENT / $NEW_BYTES")"
bench_metric incr_overhead B "incremental run: stream bytes beyond the chunks, per file" better=lower
bench_value incr_overhead tessera "$(calc "($STREAM2 - $SENT) / $ENTRIES")"
bench_finish
echo "full: ${T_REPL}s vs ${T_REF}s (verification alone ${T_SCRUB}s); pool: first $SENT1 B on the wire ($HELD1 chunks held), incremental $SENT B of chunks for $NEW_BYTES B new" >&2
