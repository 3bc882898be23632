#!/usr/bin/env bash
# benches/bootstorm.sh: a boot storm. A pool of desktops cloned from one golden image boots at
# once; each reads most of the same golden blocks (Citrix sizes a booting desktop at about 150
# IOPS, 60-70 % reads). The read cache is keyed by chunk id, so every clone's read of a golden
# block is the same cache entry.
#
#   cold      one reader, cold caches (server restarted, page cache dropped): the boot set of
#             the golden image read once in random order. MB/s, and the bytes Tessera read from
#             its packs (the boot set's stored bytes: the reference for the storm below)
#   storm     CLONES clones of the golden image read at once, each the same boot set in its own
#             random order (fio, one job per clone, its own seed), from cold caches:
#             aggregate MB/s against the cold reader's, bytes read from packs and from the
#             disk (/proc/PID/io read_bytes) against the cold reader's pack bytes, cache hit
#             ratio (`tessera stats`)
#   warm      `tessera warm` of the golden image, then the same storm: its time, and what the
#             storm still read from the packs
#   fuse      the ceiling of FUSE on this machine: the same storm through bindfs (a bare FUSE
#             passthrough) over copies of the boot set held in RAM (tmpfs): no disk, no
#             decompression, no cache; its aggregate throughput / the cold reader's is the most
#             any FUSE file system reaches here
# The boot set: the first BOOT_MIB MiB of the golden image (boot loader, kernel, the start of
# the root file system; holes included), read in BS blocks, psync, O_DIRECT through the mount
# (the page cache of the mount would otherwise answer the second read of a clone's block).
#
# Needs root, fio, jq, bindfs, the corpus golden image (built if missing). Env: CLONES (20), BOOT_MIB
# (256), BS (16k), CACHE_SIZE (384M), CORPUS, MNT_ROOT (/mnt), PEERS_DIR, TESSERA,
# BENCH_RESULTS_DIR. Writes benches/results/bootstorm.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
PEERS_DIR=${PEERS_DIR:-$(realpath ../shared/tools/peers)}
MNT_ROOT=${MNT_ROOT:-/mnt}
CLONES=${CLONES:-20}
BOOT_MIB=${BOOT_MIB:-256}
BS=${BS:-16k}
CACHE_SIZE=${CACHE_SIZE:-384M}
CORPUS=${CORPUS:-/var/tmp/corpus}
TESSERA=${TESSERA:-$PWD/target/release/tessera}
[ -x "$TESSERA" ] || cargo build --release --locked
EXT4=$MNT_ROOT/peer-ext4
DS=$EXT4/ds
MNT=$MNT_ROOT/tessera-boot
REF=$MNT_ROOT/tessera-boot-ref
WORK=$(mktemp -d /tmp/tessera-bootstorm.XXXXXX)
TPID=
GOLDEN=$CORPUS/golden.raw
[ -f "$GOLDEN" ] || (cd ../shared/tools/corpus && ./make-corpus.sh "$CORPUS")

bench_begin bootstorm
bench_binary "$TESSERA"
bench_param CLONES "$CLONES" 20
bench_param BOOT_MIB "$BOOT_MIB" 256
bench_param BS "$BS" 16k
bench_param CACHE_SIZE "$CACHE_SIZE" 384M

mount_ds() {
    mkdir -p "$MNT"
    "$TESSERA" mount "$DS" "$MNT" --cache-size "$CACHE_SIZE" --gc-interval 0 2>>"$WORK/tessera.log" &
    TPID=$!
    for _ in $(seq 1 100); do mountpoint -q "$MNT" && return; sleep 0.1; done
    echo "bench: mount failed" >&2; tail "$WORK/tessera.log" >&2; exit 1
}
umount_ds() {
    fusermount3 -u "$MNT"
    wait "$TPID" || true
    TPID=
}
cleanup() {
    [ -n "$TPID" ] && { fusermount3 -u "$MNT" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; }
    mountpoint -q "$REF/fuse" 2>/dev/null && fusermount3 -u "$REF/fuse"
    mountpoint -q "$REF/ram" 2>/dev/null && umount "$REF/ram"
    "$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$PEERS_DIR/umount-peer.sh" ext4 "$EXT4" >/dev/null 2>&1 || true
"$PEERS_DIR/mount-peer.sh" ext4 "$EXT4"
rm -rf "$DS"; "$TESSERA" init "$DS" >/dev/null

mount_ds
cp --sparse=always "$GOLDEN" "$MNT/golden.raw"
mkdir "$MNT/pool"
"$TESSERA" clone "$MNT/golden.raw" "$MNT/pool/desktop-{n:03}.raw" --count "$CLONES" >/dev/null
umount_ds
# The copy was stored uncompressed; the golden image of a pool is at rest, compressed.
"$TESSERA" gc "$DS" >/dev/null

# fio_read OUT FILE...: the boot set of each FILE read once in random order, one job per file
fio_read() {
    local out=$1 i=0 f
    shift
    local args=(--output-format=json --output="$out" --group_reporting --ioengine=psync
        --direct=1 --rw=randread --bs="$BS" --size="${BOOT_MIB}M" --randrepeat=0)
    for f in "$@"; do
        args+=(--name="d$i" --filename="$f" --randseed=$((7 + i)))
        i=$((i + 1))
    done
    fio "${args[@]}" >/dev/null
}
bw_mbs() { jq '.jobs[0].read.bw_bytes / 1000000' "$1"; }
disk_read() { awk '/^read_bytes/ {print $2}' "/proc/$TPID/io"; }
stat_of() { "$TESSERA" stats --json "$DS" | jq ".$1"; }

# one_phase NAME [warm]: restart cold, optionally warm, run NAME's readers; sets P_* figures
one_phase() {
    local name=$1 t0 t1
    drop_caches
    mount_ds
    P_WARM_S=0
    if [ "${2:-}" = warm ]; then
        t0=$(date +%s.%N)
        "$TESSERA" warm "$MNT/golden.raw" --json >"$WORK/warm.json"
        t1=$(date +%s.%N)
        P_WARM_S=$(echo "$t1 - $t0" | bc -l)
    fi
    local d0 p0 h0 m0
    d0=$(disk_read); p0=$(stat_of pack_read_bytes); h0=$(stat_of cache_hits); m0=$(stat_of cache_misses)
    if [ "$name" = cold ]; then
        fio_read "$WORK/$name.json" "$MNT/golden.raw"
    else
        fio_read "$WORK/$name.json" "$MNT"/pool/desktop-*.raw
    fi
    P_MBS=$(bw_mbs "$WORK/$name.json")
    P_DISK=$(( $(disk_read) - d0 ))
    P_PACK=$(( $(stat_of pack_read_bytes) - p0 ))
    local h m
    h=$(( $(stat_of cache_hits) - h0 )); m=$(( $(stat_of cache_misses) - m0 ))
    P_HIT=$(echo "$h / ($h + $m + 0.000001)" | bc -l)
    P_RSS=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$TPID/status")
    umount_ds
    printf 'bench: %-6s %8.1f MB/s  packs read %6.1f MB  disk read %6.1f MB  cache hits %5.1f%%  RSS %.0f MiB\n' \
        "$name" "$P_MBS" "$(echo "$P_PACK / 1000000" | bc -l)" "$(echo "$P_DISK / 1000000" | bc -l)" \
        "$(echo "$P_HIT * 100" | bc -l)" "$P_RSS"
}

one_phase cold
C_MBS=$P_MBS; C_PACK=$P_PACK
one_phase storm
S_MBS=$P_MBS; S_PACK=$P_PACK; S_DISK=$P_DISK; S_HIT=$P_HIT; S_RSS=$P_RSS
one_phase warmstorm warm
W_MBS=$P_MBS; W_PACK=$P_PACK; W_S=$P_WARM_S

# The same storm through bindfs over the boot set in RAM: what FUSE alone allows here.
command -v bindfs >/dev/null || apt-get install -y -q bindfs >/dev/null
mkdir -p "$REF/ram" "$REF/fuse"
mount -t tmpfs -o size=$(( (CLONES + 1) * BOOT_MIB ))m tmpfs "$REF/ram"
for i in $(seq 1 "$CLONES"); do head -c "${BOOT_MIB}M" "$GOLDEN" >"$REF/ram/desktop-$i.raw"; done
bindfs "$REF/ram" "$REF/fuse"
fio_read "$WORK/fuse.json" "$REF"/fuse/desktop-*.raw
F_MBS=$(bw_mbs "$WORK/fuse.json")
fusermount3 -u "$REF/fuse"; umount "$REF/ram"
printf 'bench: fuse   %8.1f MB/s  (bindfs over tmpfs, %s readers)\n' "$F_MBS" "$CLONES"

bench_metric cold MB/s "one cold reader: the golden image's first $BOOT_MIB MiB in random $BS reads" better=higher
bench_value cold tessera "$C_MBS"
bench_metric storm_ratio x "$CLONES clones booting at once from cold caches: aggregate throughput / one cold reader's" \
    better=higher headline=1 target=">= 10x"
bench_value storm_ratio tessera "$(echo "$S_MBS / $C_MBS" | bc -l)"
bench_metric storm MB/s "$CLONES clones at once: aggregate throughput" subject=tessera refs=bindfs better=higher \
    note="bindfs: $CLONES readers of copies of the boot set through bindfs over tmpfs (FUSE alone: no disk, no decompression)"
bench_value storm tessera "$S_MBS"
bench_value storm bindfs "$F_MBS"
bench_metric fuse_ceiling x "through FUSE alone here (bindfs over tmpfs): aggregate throughput / one cold reader's, the most the ratio above can reach" better=higher
bench_value fuse_ceiling bindfs "$(echo "$F_MBS / $C_MBS" | bc -l)"
bench_metric storm_pack_ratio x "$CLONES clones at once: bytes read from packs / the boot set's stored bytes (the cold reader's)" \
    better=lower headline=1 target="<= 1.1x"
bench_value storm_pack_ratio tessera "$(echo "$S_PACK / $C_PACK" | bc -l)"
bench_metric storm_disk_ratio x "$CLONES clones at once: bytes read from the disk (/proc/PID/io) / the boot set's stored bytes" better=lower
bench_value storm_disk_ratio tessera "$(echo "$S_DISK / $C_PACK" | bc -l)"
bench_metric storm_hits % "$CLONES clones at once: chunk reads served by the cache" better=higher
bench_value storm_hits tessera "$(echo "$S_HIT * 100" | bc -l)"
bench_metric storm_rss MiB "peak RSS of the serving process in the storm (--cache-size $CACHE_SIZE)" better=lower
bench_value storm_rss tessera "$S_RSS"
bench_metric warm_s s "tessera warm of the golden image (cold)" better=lower
bench_value warm_s tessera "$W_S"
bench_metric warm_storm MB/s "$CLONES clones at once after tessera warm: aggregate throughput" better=higher
bench_value warm_storm tessera "$W_MBS"
bench_metric warm_storm_pack MB "$CLONES clones at once after tessera warm: bytes still read from packs" better=lower
bench_value warm_storm_pack tessera "$(echo "$W_PACK / 1000000" | bc -l)"
bench_finish
