#!/usr/bin/env bash
# fs-tests/nfs.sh: the NFSv3 export, driven by real clients (libnfs-utils, qemu-img, qemu-io)
# and by fs-tests/nfs_client.py where a client must keep handles or send raw calls.
#
# Protects: `tessera serve --nfs --mount` serving one datastore to NFS and FUSE at once;
# nfs-cp both ways of 0 B, 1 B, 1 MiB + 1 B and a 3 GiB sparse file, byte for byte, and
# NFS <-> FUSE visibility at once; qemu-img create (raw, qcow2), convert of a real ext4
# image onto the export and back, info, check, compare; qemu-io pattern writes and verified
# reads at random offsets; `tessera clone` through the serving process, visible over NFS
# at once; READDIRPLUS of 10 000 entries, paged, stable while entries are created;
# rename, symlink, SETATTR size/mtime, CREATE EXCLUSIVE; FSSTAT = the backing disk,
# FSINFO maxfilesize >= 16 TiB; handles that survive SIGTERM and kill -9 restarts with
# every stable or committed write intact and a new write verifier; STALE for deleted files;
# hostile RPC input (each case answered with its expected error or dropped); bounded memory per
# client (a slow reader pipelining 3000 1 MiB READs keeps the server under 512 MiB while others
# are served, READDIR/READDIRPLUS replies <= 1 MiB whatever the client asks, 2000 pipelined
# COMMITs all answered, 256 connections at most); dead clients dropped (a stalled reply, an idle
# connection); read-only export refusing every change with NFS3ERR_ROFS; the client allow-list
# for NFS and the portmapper (TCP and UDP); loopback bind by default and a warning when exposed
# without --allow; fsck clean at the end.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
for c in nfs-ls nfs-cp nfs-cat qemu-img qemu-io python3 mkfs.ext4; do
    command -v "$c" >/dev/null || fail "$c is required (make deps)"
done

# must_refuse SECS CMD...: CMD must fail, and within SECS seconds: a hang (exit 124) is not
# a refusal.
must_refuse() {
    local secs=$1 rc=0
    shift
    timeout -k 5 "$secs" "$@" >/dev/null 2>&1 || rc=$?
    [ "$rc" != 0 ] || fail "'$*' succeeded; it must be refused"
    [ "$rc" != 124 ] && [ "$rc" != 137 ] || fail "'$*' hung for $secs s instead of being refused"
}

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
W=$TEST_TMP/work
mkdir -p "$W"
URL=nfs://$NFS_HOST/ds
MiB=$((1024 * 1024))

init_ds "$DS"
start_serve "$DS" --mount "$MNT"

step "portmapper on 111 (TCP and UDP) points at NFS and MOUNT"
[ "$(nfsc pmap "$NFS_HOST")" = "2049 2049 2049 2049" ] || fail "portmapper GETPORT: $(nfsc pmap "$NFS_HOST")"
log "ok"

step "nfs-cp both ways: 0 B, 1 B, 1 MiB + 1 B, 3 GiB sparse"
: >"$W/zero.bin"
printf 'x' >"$W/one.bin"
head -c $((MiB + 1)) /dev/urandom >"$W/mib1.bin"
truncate -s 3G "$W/sparse.bin"
for off in 0 $((700 * MiB + 5)) $((3 * 1024 * MiB - 4096)); do
    head -c 4096 /dev/urandom | dd of="$W/sparse.bin" bs=1 seek="$off" conv=notrunc status=none
done
for f in zero one mib1 sparse; do
    tmo nfs-cp "$W/$f.bin" "$URL/$f.bin" >/dev/null
    [ "$(sha "$W/$f.bin")" = "$(sha "$MNT/$f.bin")" ] || fail "$f.bin written over NFS reads differently through FUSE"
    if [ "$f" = sparse ]; then
        # back through nfs-cat to a pipe: no 3 GiB scratch file
        [ "$(tmo nfs-cat "$URL/$f.bin" | sha256sum | awk '{print $1}')" = "$(sha "$W/$f.bin")" ] ||
            fail "$f.bin reads back differently over NFS"
    else
        tmo nfs-cp "$URL/$f.bin" "$W/$f.back" >/dev/null
        cmp "$W/$f.bin" "$W/$f.back" || fail "$f.bin reads back differently over NFS"
    fi
    log "ok: $f.bin ($(stat -c %s "$W/$f.bin") bytes) NFS -> FUSE and back over NFS"
done
[ "$(tmo nfs-cat "$URL/one.bin")" = x ] || fail "nfs-cat one.bin"
alloc=$(stat -c %b "$MNT/sparse.bin")
[ "$alloc" -lt $((64 * 1024 * 2)) ] || fail "3 GiB sparse file allocates $alloc sectors: holes were not kept"
tmo nfs-ls "$URL/" | grep -q ' mib1.bin$' || fail "nfs-ls does not list mib1.bin"

step "FUSE -> NFS at once"
head -c $((3 * MiB + 7)) /dev/urandom >"$MNT/fuse-written.bin"
[ "$(tmo nfs-cat "$URL/fuse-written.bin" | sha256sum | awk '{print $1}')" = "$(sha "$MNT/fuse-written.bin")" ] ||
    fail "a file written through FUSE reads differently over NFS"
log "ok: written through FUSE, identical over NFS at once"

step "qemu-img: create, convert a real ext4 image onto the export and back, info, check, compare"
# a fixed tree (same seed every run): 2000 files in 40 folders, text and random data, some
# files repeated (dedup), 0 B to 1 MiB
python3 - "$W/tree" <<'PY' || fail "cannot build the test tree"
import os, random, sys
rng, root, made = random.Random(20251129), sys.argv[1], []
words = [b"desktop", b"template", b"volume", b"chunk", b"extent", b"inode", b"\n"]
for i in range(2000):
    d = os.path.join(root, "d%02d" % (i % 40))
    os.makedirs(d, exist_ok=True)
    r = rng.random()
    n = rng.randrange(0, 16384) if r < 0.7 else rng.randrange(16384, 262144) if r < 0.95 else rng.randrange(262144, 1 << 20)
    if made and rng.random() < 0.1:
        data = rng.choice(made)
    elif rng.random() < 0.5:
        data = b" ".join(rng.choice(words) for _ in range(n // 6 + 1))[:n]
    else:
        data = rng.randbytes(n)
    made.append(data)
    with open(os.path.join(d, "f%04d" % i), "wb") as f:
        f.write(data)
PY
[ "$(find "$W/tree" -type f | wc -l)" = 2000 ] || fail "the test tree does not have its 2000 files"
tree_mib=$(du -sm "$W/tree" | cut -f1)
[ "$tree_mib" -ge 64 ] || fail "the test tree has only $tree_mib MiB"
tmo mkfs.ext4 -q -F -d "$W/tree" "$W/real.raw" 512M
rm -rf "$W/tree"
tmo qemu-img create -f raw "$URL/blank.raw" 64M >/dev/null
tmo qemu-img create -f qcow2 "$URL/blank.qcow2" 1G >/dev/null
tmo qemu-img info "$URL/blank.qcow2" | grep -q 'virtual size: 1 GiB' || fail "qemu-img info of the new qcow2"
[ "$(stat -c %s "$MNT/blank.raw")" = $((64 * MiB)) ] || fail "raw image created over NFS has the wrong size"
tmo qemu-img convert -O qcow2 "$W/real.raw" "$URL/real.qcow2"
tmo qemu-img convert -O raw "$W/real.raw" "$URL/real.raw"
tmo qemu-img check "$URL/real.qcow2" >/dev/null || fail "qemu-img check of the converted qcow2"
tmo qemu-img compare "$W/real.raw" "$URL/real.qcow2" >/dev/null || fail "qcow2 on the export differs from the source"
tmo qemu-img compare "$W/real.raw" "$URL/real.raw" >/dev/null || fail "raw on the export differs from the source"
tmo qemu-img convert -O raw "$URL/real.qcow2" "$W/real.back"
cmp "$W/real.raw" "$W/real.back" || fail "image converted back from the export differs"
rm -f "$W/real.back"
tmo qemu-img info "$URL/real.qcow2" | grep -q 'file format: qcow2' || fail "qemu-img info of real.qcow2"
log "ok: real.raw (ext4, $(du -m "$W/real.raw" | cut -f1) MiB used) onto the export as qcow2 and raw and back, identical"

step "qemu-io: pattern writes at random offsets, verified reads in a new process"
tmo qemu-img create -f qcow2 "$URL/io.qcow2" 2G >/dev/null
writes=() reads=()
for i in $(seq 1 24); do
    len=$(( (RANDOM % 64 + 1) * 4096 ))
    pat=$(( (i * 37) % 255 + 1 ))
    # a random offset in the i-th 80 MiB stripe: patterns never overlap
    off=$(( i * 80 * MiB + (RANDOM % 1024) * 512 ))
    writes+=(-c "write -P $pat $off $len")
    reads+=(-c "read -P $pat $off $len")
done
tmo qemu-io -f qcow2 "${writes[@]}" "$URL/io.qcow2" >"$W/qemu-io.w" || fail "qemu-io writes"
tmo qemu-io -f qcow2 "${reads[@]}" "$URL/io.qcow2" >"$W/qemu-io.r" || fail "qemu-io reads"
! grep -qi 'pattern verification failed\|error' "$W/qemu-io.r" || { cat "$W/qemu-io.r" >&2; fail "qemu-io read back wrong data"; }
[ "$(grep -c '^read ' "$W/qemu-io.r")" = 24 ] || fail "qemu-io did not verify all 24 reads"
tmo qemu-img check "$URL/io.qcow2" >/dev/null || fail "qemu-img check after qemu-io"
log "ok: 24 pattern writes verified by a second qemu-io"

step "tessera clone through the serving process: visible over NFS at once"
tessera clone "$DS/real.raw" "$DS/clone-of-real.raw" >/dev/null
tmo qemu-img compare "$W/real.raw" "$URL/clone-of-real.raw" >/dev/null || fail "clone seen over NFS differs"
log "ok: clone made by the CLI reads identically over NFS"

step "READDIRPLUS: 10 000 entries, paged, stable while entries are created"
mkdir "$MNT/big"
python3 -c "
import os, sys
d = sys.argv[1]
for i in range(10000):
    open(os.path.join(d, 'e%05d' % i), 'w').close()
" "$MNT/big"
root=$(nfsc lookup "$NFS_HOST" /ds "")
big=$(nfsc lookup "$NFS_HOST" /ds big)
tmo nfs-ls "$URL/big" | grep -c ' e[0-9]*$' >"$W/count"
[ "$(cat "$W/count")" = 10000 ] || fail "nfs-ls lists $(cat "$W/count") of 10000 entries"
# a paged listing (4 KiB pages) that stops after 5 pages while 2000 entries are created
PAUSE_AT=5 nfsc listdir "$NFS_HOST" "$big" 4096 "$W/list" >"$W/list.pages" &
lister=$!
deadline=$((SECONDS + 60))
until [ -e "$W/list.paused" ]; do [ $SECONDS -lt $deadline ] || fail "lister did not pause"; sleep 0.05; done
python3 -c "
import os, sys
for i in range(2000):
    open(os.path.join(sys.argv[1], 'n%05d' % i), 'w').close()
" "$MNT/big"
touch "$W/list.go"
wait "$lister" || fail "paged READDIRPLUS failed"
orig=$(grep -c '^e' "$W/list")
dups=$(sort "$W/list" | uniq -d | wc -l)
[ "$orig" = 10000 ] || fail "paged listing saw $orig of the 10000 entries that existed throughout"
[ "$dups" = 0 ] || fail "paged listing repeated $dups names"
log "ok: $(cat "$W/list.pages"); all 10000 old entries once, no repeats, $(grep -c '^n' "$W/list") of 2000 new ones seen"

step "rename, symlink, SETATTR size/mtime, CREATE EXCLUSIVE"
f=$(nfsc lookup "$NFS_HOST" /ds mib1.bin)
nfsc rename "$NFS_HOST" "$root" mib1.bin "$big" moved.bin
[ -f "$MNT/big/moved.bin" ] && [ ! -e "$MNT/mib1.bin" ] || fail "rename over NFS not seen through FUSE"
cmp "$W/mib1.bin" "$MNT/big/moved.bin" || fail "renamed file changed"
[ "$(nfsc getattr "$NFS_HOST" "$f")" = "size $((MiB + 1))" ] || fail "handle not valid after rename"
[ "$(nfsc symlink "$NFS_HOST" "$root" link.raw big/moved.bin)" = big/moved.bin ] || fail "READLINK"
[ "$(readlink "$MNT/link.raw")" = big/moved.bin ] || fail "symlink over NFS not seen through FUSE"
nfsc setattr "$NFS_HOST" "$f" 4096 1234567890
[ "$(stat -c '%s %Y' "$MNT/big/moved.bin")" = "4096 1234567890" ] || fail "SETATTR size/mtime: $(stat -c '%s %Y' "$MNT/big/moved.bin")"
cmp -n 4096 "$W/mib1.bin" "$MNT/big/moved.bin" || fail "truncate over NFS damaged the head"
e1=$(nfsc excl "$NFS_HOST" "$root" excl.bin 0102030405060708)
e2=$(nfsc excl "$NFS_HOST" "$root" excl.bin 0102030405060708)
[ "$e1" = "$e2" ] || fail "a retransmitted CREATE EXCLUSIVE did not find its file"
[ "$(nfsc excl "$NFS_HOST" "$root" excl.bin 0807060504030201)" = NFS3ERR_EXIST ] || fail "CREATE EXCLUSIVE with another verifier must be EXIST"
log "ok"

step "FSSTAT is the backing disk, FSINFO allows >= 16 TiB files"
read -r tb fb ab <<<"$(nfsc fsstat "$NFS_HOST" "$root")"
read -r dtot davail <<<"$(df -B1 --output=size,avail "$DS" | tail -n 1)"
[ "$tb" = "$dtot" ] || fail "FSSTAT total $tb != disk $dtot"
diff=$(( ab > davail ? ab - davail : davail - ab ))
[ "$diff" -lt $((256 * MiB)) ] || fail "FSSTAT available $ab far from the disk's $davail"
read -r rtmax wtmax maxfs <<<"$(nfsc fsinfo "$NFS_HOST" "$root")"
[ "$rtmax" = $MiB ] && [ "$wtmax" = $MiB ] || fail "rtmax/wtmax $rtmax/$wtmax, want 1 MiB"
[ "$maxfs" -ge $((16 << 40)) ] || fail "maxfilesize $maxfs < 16 TiB"
log "ok: total $tb, available $ab (df: $davail), maxfilesize $maxfs"

step "restarts: handles survive SIGTERM and kill -9; stable and committed writes survive; verifier changes"
rf=$(nfsc create "$NFS_HOST" "$root" restart.bin)
head -c $((2 * MiB)) /dev/urandom >"$W/A"
head -c $((MiB + 3)) /dev/urandom >"$W/B"
head -c $((MiB)) /dev/urandom >"$W/C"
read -r how1 v1 <<<"$(nfsc write "$NFS_HOST" "$rf" 0 "$W/A" unstable)"
[ "$(nfsc commit "$NFS_HOST" "$rf")" = "$v1" ] || fail "COMMIT verifier differs from WRITE's without a restart"
read -r how2 v2 <<<"$(nfsc write "$NFS_HOST" "$rf" $((4 * MiB)) "$W/B" file_sync)"
[ "$how2" = file_sync ] || fail "FILE_SYNC write answered $how2"
read -r how3 v3 <<<"$(nfsc write "$NFS_HOST" "$rf" $((8 * MiB)) "$W/C" unstable)"
[ "$how3" = unstable ] || fail "an UNSTABLE write claimed $how3 (the engine buffers it)"
kill9_serve
start_serve "$DS" --mount "$MNT"
# B (FILE_SYNC) ends at 5 MiB + 3; the UNSTABLE C, up to 9 MiB, may or may not have been flushed
got=$(nfsc getattr "$NFS_HOST" "$rf") || fail "GETATTR with the old handle after kill -9: $got"
case $got in
"size $((5 * MiB + 3))" | "size $((9 * MiB))") ;;
*) fail "GETATTR with the old handle after kill -9 answered '$got'" ;;
esac
v4=$(nfsc commit "$NFS_HOST" "$rf")
[ "$v4" != "$v1" ] || fail "write verifier unchanged after a crash: clients could not resend lost UNSTABLE data"
nfsc read "$NFS_HOST" "$rf" 0 $((2 * MiB)) "$W/A.back"
cmp "$W/A" "$W/A.back" || fail "committed data lost or changed by kill -9"
nfsc read "$NFS_HOST" "$rf" $((4 * MiB)) $((MiB + 3)) "$W/B.back"
cmp "$W/B" "$W/B.back" || fail "FILE_SYNC data lost or changed by kill -9"
log "ok: after kill -9 the old handle works, committed and FILE_SYNC data intact, verifier changed"
# SIGTERM: everything, UNSTABLE included, is flushed on the way down
nfsc write "$NFS_HOST" "$rf" $((8 * MiB)) "$W/C" unstable >/dev/null
stop_serve
start_serve "$DS" --mount "$MNT"
nfsc read "$NFS_HOST" "$rf" $((8 * MiB)) "$MiB" "$W/C.back"
cmp "$W/C" "$W/C.back" || fail "data written before SIGTERM lost"
nfsc listdir "$NFS_HOST" "$big" 65536 "$W/list.after" >/dev/null || fail "READDIRPLUS with the old directory handle after a restart failed"
[ "$(grep -c '^e' "$W/list.after")" = 10000 ] && grep -qx moved.bin "$W/list.after" ||
    fail "the old directory handle lists $(grep -c '^e' "$W/list.after") of 10000 entries after a restart"
tmo qemu-img compare "$W/real.raw" "$URL/real.qcow2" >/dev/null || fail "image changed across restarts"
log "ok: after SIGTERM the old handles work and everything written is there"

step "STALE for a deleted file, also after its inode number could be reused"
sf=$(nfsc create "$NFS_HOST" "$root" doomed.bin)
nfsc remove "$NFS_HOST" "$root" doomed.bin
for i in 1 2 3; do nfsc create "$NFS_HOST" "$root" "reborn$i.bin" >/dev/null; done
[ "$(nfsc getattr "$NFS_HOST" "$sf")" = NFS3ERR_STALE ] || fail "handle of a deleted file is not STALE"
log "ok"

step "hostile input: malformed records, huge lengths, unknown procedures, garbage handles"
before=$(sha "$MNT/big/moved.bin")
nfsc hostile "$NFS_HOST" /ds >"$W/hostile.out" || { cat "$W/hostile.out" >&2; fail "hostile input"; }
tail -n 1 "$W/hostile.out" >&2
pid_running "$SERVE_PID" || fail "the server died on hostile input"
[ "$(sha "$MNT/big/moved.bin")" = "$before" ] || fail "hostile input changed a file"
tmo qemu-img compare "$W/real.raw" "$URL/real.qcow2" >/dev/null || fail "hostile input changed an image"

step "bounded memory per client: a slow reader, READDIR of 4 GiB, deep pipelines, the connection cap"
rawfh=$(nfsc lookup "$NFS_HOST" /ds real.raw)
nfsc slowreader "$NFS_HOST" "$rawfh" "$SERVE_PID" 20 512 >"$W/slow.out" 2>&1 &
slow=$!
sleep 5
tmo nfs-ls "$URL/" | grep -q ' one.bin$' || fail "nfs-ls not served while a slow reader holds its connection"
wait "$slow" || { cat "$W/slow.out" >&2; fail "slow reader"; }
cat "$W/slow.out" >&2
# 16 connections that stop reading: the budget shared by all connections (128 MiB) holds,
# where 16 per-connection budgets alone would allow 512 MiB of replies.
nfsc slowreader "$NFS_HOST" "$rawfh" "$SERVE_PID" 15 512 16 >&2 || fail "16 slow readers"
mkdir "$MNT/long"
python3 -c "
import os, sys
for i in range(6000):
    open(os.path.join(sys.argv[1], '%05d' % i + 'L' * 245), 'w').close()
" "$MNT/long"
longfh=$(nfsc lookup "$NFS_HOST" /ds long)
nfsc readdircap "$NFS_HOST" "$longfh" $((MiB + 1024)) >&2 || fail "READDIR/READDIRPLUS reply not bounded"
pages=$(nfsc listdir "$NFS_HOST" "$longfh" 4294967295 "$W/long.list") || fail "paged READDIRPLUS of 4 GiB pages"
[ "$(grep -c L "$W/long.list")" = 6000 ] || fail "4 GiB READDIRPLUS pages listed $(grep -c L "$W/long.list") of 6000 entries"
log "ok: 6000 entries, $pages of at most 1 MiB each"
nfsc pipeline "$NFS_HOST" "$rf" 2000 >&2 || fail "pipelined calls failed"
nfsc conncap "$NFS_HOST" 266 256 >&2 || fail "connection cap"
grep -q 'refusing a connection from .*: 256 connections already open' "$TEST_TMP/logs/serve-$MOUNT_SEQ.log" ||
    fail "connections over the cap not logged"
nfsc conncap "$NFS_HOST" 74 64 111 >&2 || fail "portmapper connection cap"
grep -q 'portmapper: refusing a connection from .*: 64 connections already open' "$TEST_TMP/logs/serve-$MOUNT_SEQ.log" ||
    fail "portmapper connections over the cap not logged"
pid_running "$SERVE_PID" || fail "the server died"
stop_serve

step "dead clients: a reply stalled 3 s drops the connection, a connection without calls (or stalled inside one) for 3 s closes"
start_serve "$DS" --nfs-write-timeout 3 --nfs-idle-timeout 3
nfsc idle "$NFS_HOST" 10 >&2 || fail "idle connection not closed"
nfsc slowreader "$NFS_HOST" "$rawfh" "$SERVE_PID" 8 512 >&2 || fail "slow reader"
grep -q 'dropping the connection from .*: no progress writing a reply for 3 s' "$TEST_TMP/logs/serve-$MOUNT_SEQ.log" ||
    fail "a client that stopped reading was not dropped"
log "ok"
stop_serve

step "read-only export"
start_serve "$DS" --read-only
[ "$(tmo nfs-cat "$URL/one.bin")" = x ] || fail "read-only export cannot be read"
must_refuse 20 nfs-cp "$W/one.bin" "$URL/ro-attempt.bin"
nfsc rofs "$NFS_HOST" /ds "$root" "$(nfsc lookup "$NFS_HOST" /ds one.bin)" >&2 || fail "read-only export accepted a change"
for n in ro-attempt.bin ro-new ro-dir ro-link ro-renamed; do
    [ "$(nfsc lookup "$NFS_HOST" /ds "$n")" = NFS3ERR_NOENT ] || fail "read-only export: $n exists"
done
[ "$(tmo nfs-cat "$URL/one.bin")" = x ] || fail "read-only export: one.bin changed"
stop_serve

step "client allow-list"
start_serve "$DS" --allow 127.0.0.2/32
[ "$(NFS_SRC=127.0.0.2 nfsc getattr "$NFS_HOST" "$rf")" = "size $((9 * MiB))" ] || fail "allowed client refused"
must_refuse 20 nfs-ls "$URL/"
NFS_SRC=127.0.0.1 nfsc refused "$NFS_HOST" >/dev/null || fail "raw client from 127.0.0.1 was served"
grep -q 'refusing a connection from 127.0.0.1' "$TEST_TMP/logs/serve-$MOUNT_SEQ.log" || fail "refused peer not logged"
# the portmapper on its own: an allowed peer gets GETPORT answers over TCP and UDP, a refused
# one is disconnected (TCP) or not answered (UDP)
[ "$(NFS_SRC=127.0.0.2 nfsc pmap "$NFS_HOST")" = "2049 2049 2049 2049" ] || fail "portmapper refused an allowed client"
NFS_SRC=127.0.0.1 nfsc pmap_refused "$NFS_HOST" >&2 || fail "portmapper answered a client outside the allow-list"
stop_serve

# serve_bg LOG ARGS...: `tessera serve DS ARGS...` in the background until its log says it
# exports (<= 20 s); sets BG.
serve_bg() {
    local logf=$1 deadline=$((SECONDS + 20))
    shift
    "$TESSERA" serve "$DS" "$@" </dev/null >"$logf" 2>&1 &
    BG=$!
    BG_PIDS+=("$BG")
    until grep -q 'over NFSv3 on' "$logf"; do
        pid_running "$BG" || { cat "$logf" >&2; fail "tessera serve $* exited"; }
        [ $SECONDS -lt "$deadline" ] || fail "tessera serve $*: not serving after 20 s"
        sleep 0.1
    done
}
stop_bg() {
    kill -TERM "$BG"
    wait_pid_exit "$BG" 30 || fail "tessera serve (pid $BG) still running 30 s after SIGTERM"
    reap "$BG"
    [ "$REAPED" = 0 ] || fail "tessera serve exited with status $REAPED"
}

step "bind address: loopback by default; a warning when exposed without --allow"
if [ "$NFS_HOST" = 127.0.0.1 ] || ! (exec 3<>/dev/tcp/127.0.0.1/2049) 2>/dev/null; then
    serve_bg "$TEST_TMP/logs/serve-default.log" --nfs --portmap 0
    socks=$(ss -ltnpH | grep "pid=$BG," | awk '{ print $4 }' | sort -u | tr '\n' ' ')
    [ "$socks" = "127.0.0.1:2049 " ] || fail "tessera serve --nfs listens on '$socks', want only 127.0.0.1:2049"
    ! grep -q 'exporting to every host' "$TEST_TMP/logs/serve-default.log" || fail "warned on loopback"
    stop_bg
    log "ok: --nfs alone listens on 127.0.0.1:2049 only"
else
    log "SKIP: 127.0.0.1:2049 is busy (another server); the default address is not checked"
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
serve_bg "$TEST_TMP/logs/serve-exposed.log" --nfs "0.0.0.0:$port" --portmap 0 --read-only
stop_bg
grep -q "WARN.*exporting to every host that can reach 0.0.0.0:$port; restrict with --allow NET" "$TEST_TMP/logs/serve-exposed.log" ||
    fail "no warning when exported on 0.0.0.0 without --allow"
serve_bg "$TEST_TMP/logs/serve-exposed-allow.log" --nfs "0.0.0.0:$port" --portmap 0 --read-only --allow 127.0.0.1/32
stop_bg
! grep -q 'exporting to every host' "$TEST_TMP/logs/serve-exposed-allow.log" || fail "warned although --allow was given"
log "ok: warned on 0.0.0.0:$port without --allow, not with it"

if [ "${TESSERA_S3:-0}" = 1 ]; then
    step "the object-store tier was used: the data in the bucket is beyond the disk cache"
    tessera stats --json "$DS" >"$W/stats.json"
    python3 - "$W/stats.json" <<'PY' || fail "the S3-backed run did not exercise the bucket: $(cat "$W/stats.json")"
import json, sys
t = json.load(open(sys.argv[1]))["tier"]
kept = t["cached_pack_bytes"] + t["cache_block_bytes"]
print(f"[nfs] bucket: {t['objects']} objects, {t['object_bytes'] >> 20} MiB; cache limit {t['cache_limit_bytes'] >> 20} MiB, "
      f"{kept >> 20} MiB kept", file=sys.stderr)
# More data than the cache can hold, and the cache within its limit: the reads of this suite
# (after restarts, of images larger than the cache) came back from the bucket.
assert t["object_bytes"] > 2 * t["cache_limit_bytes"], "the data fits the cache: the bucket was not exercised"
assert kept <= t["cache_limit_bytes"], "the folder keeps more than its cache"
PY
fi

step "fsck after everything"
tessera fsck "$DS" >/dev/null || fail "fsck found problems"
log "ok: fsck clean"
