#!/usr/bin/env bash
# fs-tests/space.sh: per-VM space accounting and background reclamation on a real mount.
#
# Protects: `tessera du` on a mounted datastore (through the serving process) says what a VM
# shares and what deleting it frees: a fresh clone is all shared, a clone diverged by 8 MiB
# has 8 MiB unique; deleting VMs gives the space back to the host filesystem by itself
# (background compaction, no `tessera gc`) within a bounded time while the mount serves;
# other files stay intact; fsck is clean afterwards. With the default settings (no options:
# every 60 s once 32 MiB or more of pack space is dead, paced at 64 MiB/s), "deleted desktops'
# space is back on the host within about a minute plus the copy time": 48 MiB deleted come
# back within 90 s + copy time, with the remaining file intact.
set -euo pipefail
. "$(dirname -- "$0")/lib.sh"
command -v python3 >/dev/null || fail "python3 is required"

make_tmp
DS=$TEST_TMP/ds
MNT=$TEST_TMP/mnt
MiB=$((1024 * 1024))
tessera init "$DS" >/dev/null
# background reclamation every second, unthrottled, so the test is quick
start_mount "$DS" "$MNT" --gc-interval 1 --gc-rate 0

step "a template VM and clones"
mkdir -p "$MNT/templates/vm" "$MNT/desktops"
head -c $((8 * MiB)) /dev/urandom >"$TEST_TMP/keep.bin"
tmo cp "$TEST_TMP/keep.bin" "$MNT/keep.raw"
head -c $((48 * MiB)) /dev/urandom >"$TEST_TMP/disk.bin"
tmo cp "$TEST_TMP/disk.bin" "$MNT/templates/vm/disk.raw"
printf 'config' >"$MNT/templates/vm/vm.vmx"
tessera clone "$MNT/templates/vm" "$MNT/desktops/d{n}" --count 3 >/dev/null
# d1 diverges by 8 MiB of new data at 16 MiB
head -c $((8 * MiB)) /dev/urandom >"$TEST_TMP/patch.bin"
tmo dd if="$TEST_TMP/patch.bin" of="$MNT/desktops/d1/disk.raw" bs=1M seek=16 conv=notrunc,fsync status=none

step "tessera du while mounted"
tessera du "$MNT/templates/vm" "$MNT/desktops/d1" "$MNT/desktops/d2" --json >"$TEST_TMP/du.json"
tessera du "$MNT/desktops" >&2
python3 - "$TEST_TMP/du.json" <<'PY' || fail "tessera du figures are wrong"
import json, sys
MiB = 1 << 20
t, d1, d2 = json.load(open(sys.argv[1]))
for u in (t, d1, d2):
    assert u["logical_bytes"] == 48 * MiB + 6, u
    assert u["allocated_bytes"] >= 48 * MiB, u
assert d1["unique_bytes"] == 8 * MiB, d1          # its diverged chunks only
assert d2["unique_bytes"] == 0 and d2["freed_on_delete_bytes"] == 0, d2
assert t["unique_bytes"] == 0, t                 # d2 and d3 still use every template chunk
assert 8 * MiB <= d1["freed_on_delete_bytes"] <= 9 * MiB, d1   # random data: stored raw
assert d1["shared_bytes"] == d1["allocated_bytes"] - 8 * MiB, d1
print("du ok:", {k: v for k, v in d1.items() if k != "path"})
PY
log "ok: template and fresh clones all shared, diverged clone 8 MiB unique"

step "deleting VMs gives the space back in the background"
packs_mb() { du -sm "$DS/packs" | cut -f1; }
full=$(packs_mb)
# the pool is retired: every desktop and the template (their packs fall under half live)
rm -rf "$MNT/desktops" "$MNT/templates"
sync
deadline=$((SECONDS + 60))
until [ "$(packs_mb)" -le $((full - 40)) ]; do
    [ $SECONDS -lt $deadline ] || fail "background reclamation freed too little in 60 s: packs $full MiB -> $(packs_mb) MiB"
    sleep 1
done
log "ok: packs $full MiB -> $(packs_mb) MiB without tessera gc, $((SECONDS - deadline + 60)) s after the delete"
cmp "$TEST_TMP/keep.bin" "$MNT/keep.raw" || fail "keep.raw changed after reclamation"
tessera du "$MNT/keep.raw" --json >"$TEST_TMP/du2.json"
python3 -c "
import json, sys
k, = json.load(open(sys.argv[1]))
assert k['unique_bytes'] == 8 << 20, k   # the only file left owns all it uses
" "$TEST_TMP/du2.json" || fail "du after deletes"
grep -q 'background gc: ' "$TEST_TMP"/logs/mount-*.log || fail "background gc did not log what it did"

step "unmount, fsck"
stop_mount "$MNT"
tessera fsck "$DS" >/dev/null || fail "fsck after background reclamation"
log "ok: fsck clean"

step "default settings: deleted space is back within about a minute plus the copy time"
DS2=$TEST_TMP/ds-defaults
tessera init "$DS2" >/dev/null
start_mount "$DS2" "$MNT"     # no options: --gc-interval 60, --gc-rate 64, 32 MiB dead at least
head -c $((8 * MiB)) /dev/urandom >"$TEST_TMP/keep2.bin"
tmo cp "$TEST_TMP/keep2.bin" "$MNT/keep.raw"
head -c $((48 * MiB)) /dev/urandom >"$TEST_TMP/gone.bin"
tmo cp "$TEST_TMP/gone.bin" "$MNT/desktop.raw"
for f in keep.raw desktop.raw; do
    python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)" "$MNT/$f" || fail "fsync $f"
done
packs2() { du -sm "$DS2/packs" | cut -f1; }
full=$(packs2)
rm -f "$MNT/desktop.raw"
t_del=$SECONDS
# copy time at 64 MiB/s of what is still live (8 MiB), rounded up
deadline=$((t_del + 90 + 1))
until [ "$(packs2)" -le $((full - 40)) ]; do
    [ $SECONDS -lt $deadline ] || fail "with the defaults, 48 MiB deleted did not come back within 91 s: packs $full MiB -> $(packs2) MiB"
    sleep 1
done
log "ok: packs $full MiB -> $(packs2) MiB $((SECONDS - t_del)) s after the delete, default settings"
cmp "$TEST_TMP/keep2.bin" "$MNT/keep.raw" || fail "keep.raw changed after default reclamation"
stop_mount "$MNT"
tessera fsck "$DS2" >/dev/null || fail "fsck after default reclamation"
