#!/usr/bin/env bash
# fs-tests/replication.sh: snapshots replicated between two datastores through a pipe, as a
# user runs it (`tessera send ... | tessera receive ...`), served and not served.
#
# Protects: a full stream of a VM folder from a served datastore (NFS + FUSE) into an unserved
# one, byte for byte; the stream about the stored size, not the logical one; an incremental
# stream after 1 % of the disk changed carrying about that 1 %, into the other datastore while it
# is served (FUSE), applied in place; the replica read-only (EROFS) until `tessera promote`; a
# stream cut short refused with a one-line error and leaving nothing behind; a second receive of
# the same stream refused; through a file (send > FILE, receive < FILE). Over TCP (`tessera
# replicate --to`, `--replication` on the receiver): a full run, an incremental run sending about
# the changed 1 %, ROUNDS (20) runs broken at random points by kill -9 of the receiver or of
# the sender or a cut connection, each resumed by the next run (chunks received before the
# break not sent again) and ending byte-identical; a schedule run by the serving process with its point and lag in
# `tessera stats`; fsck clean on both.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 is required"

make_tmp
A=$TEST_TMP/a
B=$TEST_TMP/b
MA=$TEST_TMP/ma
MB=$TEST_TMP/mb
W=$TEST_TMP/work
mkdir -p "$W"
MiB=$((1024 * 1024))
ROUNDS=${ROUNDS:-20}

tessera init "$A" >/dev/null
tessera init "$B" >/dev/null
start_serve "$A" --mount "$MA" --gc-interval 0

step "a VM folder on A: a 64 MiB half-compressible disk, a config, a symlink"
mkdir -p "$MA/vms/desk01"
python3 - "$W/disk" <<'PY'
import random, sys
rng = random.Random(11)
with open(sys.argv[1], "wb") as f:
    for i in range(4096):                      # 4096 x 16 KiB = 64 MiB
        half = rng.randbytes(8192)
        f.write(half + bytes(8192))             # compresses about 2x
PY
cp "$W/disk" "$MA/vms/desk01/disk.raw"
echo "memsize = 4096" >"$MA/vms/desk01/desk01.vmx"
ln -s disk.raw "$MA/vms/desk01/current"
tessera snapshot create "$MA/vms/desk01" s1 >/dev/null

step "full: A (served) | B (not served)"
tmo "$TESSERA" send "$MA/vms/desk01@s1" 2>"$W/send.err" | tmo "$TESSERA" receive "$B" >"$W/recv.out" ||
    fail "send | receive: $(cat "$W/send.err" "$W/recv.out")"
grep -q "received /vms/desk01@s1: 3 entries\|received /vms/desk01@s1: 4 entries" "$W/recv.out" || fail "receive said: $(cat "$W/recv.out")"
stream_mb=$(sed -n 's/.*MiB as stored), \([0-9.]*\) MiB stream.*/\1/p' "$W/send.err")
log "send: $(cat "$W/send.err")"
python3 -c "import sys; s=float('$stream_mb'); sys.exit(0 if 28 <= s <= 40 else 1)" ||
    fail "the full stream is $stream_mb MiB: expected about the stored size (32 MiB of 64 MiB logical)"

step "incremental: 1 % of the disk changes; A | B (served, FUSE)"
start_mount "$B" "$MB"
[ "$(sha "$MB/vms/desk01/disk.raw")" = "$(sha "$W/disk")" ] || fail "the replica's disk differs"
[ "$(readlink "$MB/vms/desk01/current")" = disk.raw ] || fail "symlink lost"
ino_before=$(stat -c %i "$MB/vms/desk01/disk.raw")
head -c $((640 * 1024)) /dev/urandom >"$W/patch"    # 40 chunks of 4096 = ~1 %
dd if="$W/patch" of="$MA/vms/desk01/disk.raw" bs=64K seek=100 conv=notrunc status=none
echo "memsize = 8192" >"$MA/vms/desk01/desk01.vmx"
cp "$MA/vms/desk01/disk.raw" "$W/disk2"
tessera snapshot create "$MA/vms/desk01" s2 >/dev/null
tmo "$TESSERA" send "$MA/vms/desk01@s2" --from s1 --json 2>"$W/inc.json" | tmo "$TESSERA" receive "$MB" >"$W/recv2.out" ||
    fail "incremental send | receive: $(cat "$W/inc.json" "$W/recv2.out")"
bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stream_bytes"])' "$W/inc.json")
[ "$bytes" -le $((900 * 1024)) ] || fail "the incremental stream is $bytes bytes for 640 KiB changed"
[ "$(sha "$MB/vms/desk01/disk.raw")" = "$(sha "$W/disk2")" ] || fail "the replica's disk differs after the incremental"
[ "$(cat "$MB/vms/desk01/desk01.vmx")" = "memsize = 8192" ] || fail "config not updated"
[ "$(stat -c %i "$MB/vms/desk01/disk.raw")" = "$ino_before" ] || fail "the incremental replaced the disk's inode"
[ "$(sha "$MB/.snapshots/vms/desk01@s1/disk.raw")" = "$(sha "$W/disk")" ] || fail "snapshot s1 changed on B"
log "ok: incremental stream $bytes bytes"

step "the replica is read-only until promoted"
out=$(dd if=/dev/zero of="$MB/vms/desk01/disk.raw" bs=4k count=1 conv=notrunc 2>&1) && fail "wrote into a replica"
echo "$out" | grep -qi 'read-only' || fail "writing a replica: $out"
expect_error "was received before" sh -c "'$TESSERA' send '$MA/vms/desk01@s2' --from s1 2>/dev/null | '$TESSERA' receive '$MB'"

step "a cut stream is refused and leaves nothing"
tmo "$TESSERA" send "$MA/vms/desk01@s2" >"$W/full.stream" 2>/dev/null
head -c $(( $(stat -c %s "$W/full.stream") / 2 )) "$W/full.stream" >"$W/cut.stream"
expect_error "cut" tessera receive "$MB/vms/copy" <"$W/cut.stream"
[ ! -e "$MB/vms/copy" ] || fail "a cut stream left a replica"
tessera receive "$MB/vms/copy" <"$W/full.stream" >/dev/null
[ "$(sha "$MB/vms/copy/disk.raw")" = "$(sha "$W/disk2")" ] || fail "receive from a file"

step "promote: writable"
tessera promote "$MB/vms/desk01" | grep -q "is writable now" || fail "promote"
echo "changed on B" >"$MB/vms/desk01/desk01.vmx" || fail "a promoted replica is not writable"
expect_error "not a replica" tessera promote "$MB/vms/desk01"

step "over TCP: replicate to a receiver (tessera mount --replication)"
stop_mount "$MB"
RPORT=127.0.0.1:19479
start_mount "$B" "$MB" --replication "$RPORT"
tessera replicate "$MA/vms/desk01" --to "$RPORT" --target /dr/desk01 --json >"$W/r1.json" || fail "replicate: $(cat "$W/r1.json")"
[ "$(sha "$MB/dr/desk01/disk.raw")" = "$(sha "$MA/vms/desk01/disk.raw")" ] || fail "TCP replica differs"
held=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent"]["chunks_held_by_receiver"])' "$W/r1.json")
[ "$held" -ge 4000 ] || fail "the receiver held $held chunks already (it has the same disk elsewhere): they crossed anyway"
log "ok: full run, $held chunks the target already held were not sent"
dd if=/dev/urandom of="$MA/vms/desk01/disk.raw" bs=64K seek=300 count=10 conv=notrunc status=none
tessera replicate "$MA/vms/desk01" --to "$RPORT" --target /dr/desk01 --json >"$W/r2.json"
sent=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent"]["chunk_bytes"])' "$W/r2.json")
[ "$sent" -le $((700 * 1024)) ] || fail "incremental TCP run sent $sent bytes of chunks for 640 KiB changed"
[ "$(sha "$MB/dr/desk01/disk.raw")" = "$(sha "$MA/vms/desk01/disk.raw")" ] || fail "TCP replica differs after the incremental"
log "ok: incremental run sent $sent bytes of chunks"

step "$ROUNDS runs broken at random points (kill -9 of the receiver or the sender, a cut connection); each resumed"
# A TCP proxy in front of the receiver, to cut connections (killed mid-run).
PROXY_PORT=127.0.0.1:19478
start_proxy() {
    python3 - "$PROXY_PORT" "$RPORT" <<'PY' &
import socket, sys, threading
lh, lp = sys.argv[1].split(":"); uh, up = sys.argv[2].split(":")
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((lh, int(lp))); ls.listen(4)
def pipe(a, b):
    try:
        while (d := a.recv(65536)):
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
while True:
    c, _ = ls.accept()
    u = socket.create_connection((uh, int(up)))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
PY
    PROXY=$!
    BG_PIDS+=("$PROXY")
    for _ in $(seq 50); do port_open "$PROXY_PORT" && return 0; sleep 0.1; done
    fail "the test proxy did not start"
}
port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; }
head -c $((48 * MiB)) /dev/urandom >"$MA/vms/desk01/big.raw"
tessera replicate "$MA/vms/desk01" --to "$RPORT" --target /dr/desk01 >/dev/null
RANDOM=2026
for round in $(seq 1 "$ROUNDS"); do
    kinds=(receiver sender connection)
    kind=${kinds[$((RANDOM % 3))]}
    at=$((20 + RANDOM % 21))   # kill at 2.0 .. 4.0 s, in tenths
    dd if=/dev/urandom of="$MA/vms/desk01/big.raw" bs=1M seek=$((RANDOM % 24)) count=24 conv=notrunc status=none
    to=$RPORT
    [ "$kind" = connection ] && { start_proxy; to=$PROXY_PORT; }
    # 24 MiB new at 4 MiB/s: the run takes about 6 s and is broken in the middle.
    tmo "$TESSERA" replicate "$MA/vms/desk01" --to "$to" --target /dr/desk01 --max-rate 4 >/dev/null 2>&1 &
    RUN=$!
    sleep "$((at / 10)).$((at % 10))"
    case $kind in
    receiver)
        pid=${MOUNT_PID[$(abs "$MB")]}
        kill -KILL "$pid"
        wait_pid_exit "$pid" 10 || fail "receiver survived kill -9"
        reap "$pid"; unset "MOUNT_PID[$(abs "$MB")]"
        lazy_unmount "$MB" || true
        wait "$RUN" && fail "round $round: the run succeeded although the receiver was killed"
        start_mount "$B" "$MB" --replication "$RPORT"
        ;;
    sender)
        kill9_serve
        wait "$RUN" && fail "round $round: the run succeeded although the sender was killed"
        start_serve "$A" --mount "$MA" --gc-interval 0
        ;;
    connection)
        kill -KILL "$PROXY"
        wait "$PROXY" 2>/dev/null || true
        wait "$RUN" && fail "round $round: the run succeeded although its connection was cut"
        ;;
    esac
    tessera replicate "$MA/vms/desk01" --to "$RPORT" --target /dr/desk01 --json >"$W/resume.json" || fail "round $round: resume failed"
    python3 - "$W/resume.json" <<'PY' || fail "round $round ($kind at ${at}00 ms): $(cat "$W/resume.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["resumed"], "the point of the broken run was not sent again"
# Chunks that arrived before the break (durable, or found in the packs after a kill -9) are not sent again.
assert r["sent"]["chunks_held_by_receiver"] > 0, "every chunk crossed again"
PY
    [ "$(sha "$MB/dr/desk01/big.raw")" = "$(sha "$MA/vms/desk01/big.raw")" ] || fail "round $round: replica differs"
    log "ok: round $round ($kind at ${at}00 ms): resumed, $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["sent"]["chunks"], "chunks sent,", r["sent"]["chunks_held_by_receiver"], "held")' "$W/resume.json")"
done

step "a replication schedule in the serving process"
tessera clone "$MA/vms/desk01" "$MA/vms/desk02" >/dev/null
echo "desk02 config" >"$MA/vms/desk02/desk01.vmx"
tessera replicate "$MA/vms/desk02" --to "$RPORT" --every 1m >/dev/null
# Never replicated: due at the scheduler's next check (every 30 s).
deadline=$((SECONDS + 50))
until tessera stats "$A" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = [x for x in s["replication"] if x["path"] == "/vms/desk02" and x["every"] == 60]
sys.exit(0 if r and r[0]["last_point"] > 0 and not r[0]["last_error"] else 1)'; do
    [ $SECONDS -lt "$deadline" ] || fail "the schedule did not replicate within 50 s: $(tessera stats "$A" | grep -A1 replication)"
    sleep 2
done
[ "$(cat "$MB/vms/desk02/desk01.vmx")" = "desk02 config" ] || fail "the scheduled run did not carry desk02"
tessera stats "$A" | grep -q "^replication .*/vms/desk02 -> $RPORT, every 60 s: point of .* (lag" || fail "stats: $(tessera stats "$A" | grep replication)"
log "ok: $(tessera stats "$A" | grep '^replication .*desk02')"
tessera replicate "$MA/vms/desk02" --off >/dev/null

stop_mount "$MB"
stop_serve
tessera fsck "$A" >/dev/null || fail "fsck A"
tessera fsck "$B" >/dev/null || fail "fsck B"
log "all replication checks passed"
