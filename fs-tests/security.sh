#!/usr/bin/env bash
# fs-tests/security.sh: a datastore is private whatever the umask.
#
# Protects: with umask 022, init + mount + a written file leave the datastore folder and
# packs/ at 0700 and every file in them (packs, meta.redb, meta.redb.bak, lock, reserve,
# control.sock) at 0600; another local user can neither read a pack nor reach the control
# socket; with the folder and socket opened up on purpose (0711, 0666), the socket's
# peer-credential check still refuses that user with a one-line answer (and logs it) while
# root is served; a datastore with old 0755/0644 modes is made private on its next open.
#
# Needs root: creates the user tessera-test (TESSERA_TEST_USER) if missing and switches to it
# with setpriv.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
[ "$(id -u)" = 0 ] || fail "needs root (creates a user and switches to it)"
command -v setpriv >/dev/null || fail "setpriv is required (util-linux)"
# The other user cannot run root's python (e.g. a pyenv shim under /root).
PY=/usr/bin/python3
[ -x "$PY" ] || fail "$PY is required"

umask 022
make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
OTHER=${TESSERA_TEST_USER:-tessera-test}

if ! id -u "$OTHER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$OTHER" ||
        fail "cannot create user $OTHER"
    log "created user $OTHER"
fi
OTHER_UID=$(id -u "$OTHER")
OTHER_GID=$(id -g "$OTHER")
as_other() { tmo setpriv --reuid="$OTHER_UID" --regid="$OTHER_GID" --clear-groups -- "$@"; }

# mode_of PATH: octal permission bits.
mode_of() { stat -c '%a' -- "$1"; }

# check_private WHAT NAME...: DS and packs/ are 0700, every entry under DS has no group or
# other access, and each NAME (relative to DS) exists.
check_private() {
    local what=$1 p m n=0
    shift
    for p in "$@"; do
        [ -e "$DS/$p" ] || [ -S "$DS/$p" ] || fail "$what: $DS/$p does not exist"
    done
    [ "$(mode_of "$DS")" = 700 ] || fail "$what: datastore folder is $(mode_of "$DS"), expected 700"
    [ "$(mode_of "$DS/packs")" = 700 ] || fail "$what: packs/ is $(mode_of "$DS/packs"), expected 700"
    while IFS= read -r -d '' p; do
        m=$(mode_of "$p")
        # Octal: no bit in the group or other digits.
        [ $((8#$m & 8#077)) = 0 ] || fail "$what: $p is $m ($(stat -c %F -- "$p")); expected 600 or stricter"
        n=$((n + 1))
    done < <(find "$DS" -mindepth 1 -print0)
    log "$what: $DS is 700 and all $n entries under it are private"
}

step "init with umask 022, mount, write a file"
tessera init "$DS" >/dev/null
start_mount "$DS" "$MNT"
tmo dd if=/dev/urandom of="$MNT/disk.raw" bs=1M count=8 conv=fsync status=none
ls "$DS"/packs/*.pack >/dev/null 2>&1 || fail "no pack written after an fsync'd write"
PACK=$(ls "$DS"/packs/*.pack | head -n 1)
check_private "mounted" meta.redb meta.redb.bak lock reserve control.sock packs \
    "packs/$(basename -- "$PACK")"

step "another user can read neither a pack nor reach the control socket"
if as_other cat -- "$PACK" >/dev/null 2>&1; then fail "$OTHER could read $PACK"; fi
if as_other "$PY" -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' \
    "$DS/control.sock" 2>/dev/null; then
    fail "$OTHER could connect to $DS/control.sock"
fi
log "ok: $OTHER gets permission denied on the pack and the socket path"

step "peer-credential check: folder 0711 and socket 0666 on purpose, $OTHER is still refused"
chmod 0711 "$DS"
chmod 0666 "$DS/control.sock"
ASK='import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b"{\"op\":\"stats\"}\n")
except OSError:
    pass  # refused before the request was read; the answer is still there
buf = b""
while not buf.endswith(b"\n"):
    d = s.recv(4096)
    if not d:
        break
    buf += d
sys.stdout.write(buf.decode())'
answer=$(as_other "$PY" -c "$ASK" "$DS/control.sock") || fail "$OTHER: connecting to the opened-up socket failed"
log "$OTHER got: $answer"
grep -q '"ok":false' <<<"$answer" || fail "$OTHER was served: $answer"
grep -qi 'permission denied' <<<"$answer" || fail "refusal does not say why: $answer"
[ "$(grep -c . <<<"$answer")" = 1 ] || fail "refusal is not one line: $answer"
answer=$(tmo "$PY" -c "$ASK" "$DS/control.sock")
grep -q '"ok":true' <<<"$answer" || fail "root was not served: $answer"
grep -q "refused uid $OTHER_UID" "$TEST_TMP"/logs/mount-*.log || fail "the refusal was not logged"
log "ok: $OTHER refused (and logged), root served"
chmod 0700 "$DS"
chmod 0600 "$DS/control.sock"

step "unmount; a datastore with old modes (0755/0644) is made private on its next open"
stop_mount "$MNT"
chmod 0755 "$DS" "$DS/packs"
find "$DS" -mindepth 1 -type f -exec chmod 0644 {} +
[ "$(mode_of "$PACK")" = 644 ] || fail "setup: could not open up $PACK"
tessera stats "$DS" >/dev/null 2>"$TEST_TMP/logs/stats.log" || { cat "$TEST_TMP/logs/stats.log" >&2; fail "stats failed"; }
grep -q "private" "$TEST_TMP/logs/stats.log" || fail "tightening was not logged: $(cat "$TEST_TMP/logs/stats.log")"
check_private "reopened" meta.redb meta.redb.bak lock reserve packs "packs/$(basename -- "$PACK")"
tessera stats "$DS" >/dev/null 2>"$TEST_TMP/logs/stats2.log"
if grep -q "private" "$TEST_TMP/logs/stats2.log"; then fail "tightening logged again on a private datastore"; fi
log "ok: tightened once, logged once"
