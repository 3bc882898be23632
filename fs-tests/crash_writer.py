#!/usr/bin/env python3
"""Writer and verifier for the kill -9 crash test (fs-tests/crash.sh).

Protects the durability promise: every byte written before a successful
fsync()/fdatasync() survives a crash of the Tessera daemon, byte for byte.

  crash_writer.py write  --dir D --journal J --seed S [--files N] [--span BYTES]
                         [--max-seconds T] [--mbps R]
  crash_writer.py verify --dir D --base B [--journal J] [--update-base]

write: creates N files in D and writes them until an I/O error (the daemon
died) or T seconds: deterministic pseudo-random content (random, repetitive
or all-zero), 4 KiB..1 MiB at random offsets (aligned or not) within SPAN
bytes, so regions are overwritten many times, and some writes repeat earlier
content at chunk-aligned offsets (dedup hits). The journal J (outside the
mount) gets one JSON line per event:
  {"op": "creating", "file": F}                    F is about to be created
  {"op": "create", "file": F}                      F created, F and D fsynced
  {"op": "write", "file": F, "off": O, "len": L, "seed": S}
                                                   logged BEFORE the pwrite
  {"op": "sync", "file": F}                        logged AFTER fsync(F) returned
The journal is fsynced after every sync record. Only the daemon is killed,
not the kernel, so every line written before the kill is readable afterwards.

verify: B holds the content of each file as verified at the end of the
previous round (absent = file did not exist). Without --journal, each file in
D must equal its copy in B exactly (state after a clean unmount). With
--journal, per file: the durable image is B plus every write logged before
the file's last sync record; the writes logged after it may or may not have
landed, wholly or partly. So every byte must equal the durable image (zero
beyond its end) or the content of one of those later writes that covers it,
and the size must lie between the durable size and the furthest later write.
--update-base then copies the verified files into B for the next round.
"""

import argparse
import json
import os
import random
import sys
import time

KIB = 1024
MIB = 1024 * KIB
CHUNK_ALIGN = 16 * KIB  # Tessera's default chunk size: aligned repeats dedup


def content(seed, length):
    """Deterministic data for a write; the kind (zero, repetitive, random) follows the seed."""
    rng = random.Random(seed)
    kind = seed % 8
    if kind == 0:
        return bytes(length)  # all zeros: must read back as zeros, not as old data
    if kind in (1, 2):
        unit = rng.randbytes(4096)  # compressible, and dedups within the write
        return (unit * (length // 4096 + 1))[:length]
    return rng.randbytes(length)


def file_names(n):
    return ["f%d" % i for i in range(n)]


# ---------------------------------------------------------------- writer


class Journal:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def add(self, rec, sync=False):
        os.write(self.fd, (json.dumps(rec, sort_keys=True) + "\n").encode())
        if sync:
            os.fsync(self.fd)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_cmd(args):
    rng = random.Random(args.seed)
    journal = Journal(args.journal)
    os.makedirs(args.dir, exist_ok=True)
    fsync_dir(os.path.dirname(os.path.abspath(args.dir)))
    fds = {}
    for name in file_names(args.files):
        journal.add({"op": "creating", "file": name})
    for name in file_names(args.files):
        fds[name] = os.open(os.path.join(args.dir, name), os.O_RDWR | os.O_CREAT, 0o644)
        os.fsync(fds[name])
    fsync_dir(args.dir)
    for name in fds:
        journal.add({"op": "create", "file": name})
    journal.add({"op": "start", "seed": args.seed}, sync=True)

    used_seeds = []
    unsynced = set()
    writes = syncs = nbytes = 0
    start = time.monotonic()
    budget = args.mbps * MIB  # bytes per second
    while time.monotonic() - start < args.max_seconds:
        name = rng.choice(list(fds))
        # 4 KiB..1 MiB, log-uniform (mostly small), half of them not a multiple of 4 KiB
        length = int(4 * KIB * 2 ** rng.uniform(0, 8))
        if rng.random() < 0.5:
            length -= length % (4 * KIB)
        length = max(4 * KIB, min(MIB, length))
        if used_seeds and rng.random() < 0.25:
            seed = rng.choice(used_seeds)  # same content again, chunk-aligned: dedup
            off = rng.randrange(0, args.span // CHUNK_ALIGN) * CHUNK_ALIGN
        else:
            seed = rng.randrange(1 << 48)
            used_seeds.append(seed)
            align = rng.choice((1, 512, 4 * KIB, CHUNK_ALIGN))
            off = rng.randrange(0, args.span // align) * align
        data = content(seed, length)
        journal.add({"op": "write", "file": name, "off": off, "len": length, "seed": seed})
        done = 0
        while done < length:
            done += os.pwrite(fds[name], memoryview(data)[done:], off + done)
        writes += 1
        nbytes += length
        unsynced.add(name)
        r = rng.random()
        if r < 0.25:
            targets = [name]
        elif r < 0.30:
            targets = sorted(unsynced)
        else:
            targets = []
        for t in targets:
            if t not in unsynced:
                continue
            if rng.random() < 0.5:
                os.fsync(fds[t])
            else:
                os.fdatasync(fds[t])
            unsynced.discard(t)
            syncs += 1
            journal.add({"op": "sync", "file": t}, sync=True)
        # throttle: the test needs many fsyncs at random moments, not gigabytes of packs
        ahead = nbytes / budget - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
    print("writer: time limit reached after %d writes, %d syncs" % (writes, syncs), file=sys.stderr)
    return 0


# ---------------------------------------------------------------- verifier


def read_journal(path):
    recs = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except ValueError:
            if i >= len(lines) - 2:  # a torn last line (writer killed mid-line)
                break
            raise
    return recs


def apply(buf, off, data):
    if len(buf) < off:
        buf.extend(bytes(off - len(buf)))
    buf[off:off + len(data)] = data


class Mismatch(Exception):
    pass


def check_range(actual, a, b, cands):
    """actual[a:b] must hold, byte by byte, a value from one of the candidate
    buffers (each indexed like the file). Whole-range matches are tried first;
    on a miss the range is halved, down to single bytes (torn writes)."""
    piece = actual[a:b]
    for c in cands:
        if c[a:b] == piece:
            return
    if b - a <= 64:
        for i in range(a, b):
            if not any(c[i] == actual[i] for c in cands):
                raise Mismatch(i)
        return
    mid = (a + b) // 2
    check_range(actual, a, mid, cands)
    check_range(actual, mid, b, cands)


def verify_file(name, actual, base, writes, durable_upto, created):
    """Returns None if `actual` (bytes or None if missing) is an allowed state, else an error."""
    durable = bytearray(base or b"")
    pending = []
    for i, w in enumerate(writes):
        if i < durable_upto:
            apply(durable, w["off"], content(w["seed"], w["len"]))
        else:
            pending.append(w)
    if actual is None:
        if base is not None or created:
            return "missing (it was created and synced)"
        return None
    furthest = max([len(durable)] + [w["off"] + w["len"] for w in pending])
    size = len(actual)
    if not len(durable) <= size <= furthest:
        return "size %d, expected between %d (durable) and %d (furthest unsynced write)" % (
            size, len(durable), furthest)
    # candidate buffers indexed by file offset, over [0, size)
    durable_c = bytes(durable[:size]) + bytes(max(0, size - len(durable)))
    bounds = {0, size}
    for w in pending:
        bounds.update(min(size, x) for x in (w["off"], w["off"] + w["len"]))
    bounds = sorted(bounds)
    for a, b in zip(bounds, bounds[1:]):
        cands = [durable_c]
        for w in pending:
            if w["off"] <= a and b <= w["off"] + w["len"]:
                # a buffer that is only valid over [a, b): the write's data at its file offsets
                data = w.setdefault("_data", content(w["seed"], w["len"]))
                cands.append(Window(data, w["off"]))
        try:
            check_range(actual, a, b, cands)
        except Mismatch as m:
            i = m.args[0]
            covering = [(w["off"], w["len"], w["seed"]) for w in pending if w["off"] <= i < w["off"] + w["len"]]
            return ("byte %d is 0x%02x; durable value 0x%02x; %d unsynced write(s) cover it %s"
                    % (i, actual[i], durable_c[i], len(covering), covering[:5]))
    return None


class Window:
    """A write's data addressed by file offset (slices and indexes)."""

    def __init__(self, data, off):
        self.data, self.off = data, off

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.data[k.start - self.off:k.stop - self.off]
        return self.data[k - self.off]


def read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def verify_cmd(args):
    recs = read_journal(args.journal) if args.journal else []
    names = set(os.listdir(args.base)) if os.path.isdir(args.base) else set()
    writes, durable_upto, created, known = {}, {}, set(), set()
    for r in recs:
        f = r.get("file")
        if r["op"] == "creating":
            known.add(f)
        elif r["op"] == "create":
            created.add(f)
        elif r["op"] == "write":
            writes.setdefault(f, []).append(r)
        elif r["op"] == "sync":
            durable_upto[f] = len(writes.get(f, []))
        names.update([f] if f else [])
    if os.path.isdir(args.dir):
        names.update(os.listdir(args.dir))
    errors = []
    checked = 0
    results = {}
    for name in sorted(names):
        actual = read_or_none(os.path.join(args.dir, name))
        base = read_or_none(os.path.join(args.base, name))
        if name not in known and base is None and actual is not None:
            errors.append("%s: unexpected file" % name)
            continue
        err = verify_file(name, actual, base, writes.get(name, []), durable_upto.get(name, 0), name in created)
        if err:
            errors.append("%s: %s" % (name, err))
        results[name] = actual
        checked += 1
    nw = sum(len(v) for v in writes.values())
    nd = sum(durable_upto.values())
    if errors:
        for e in errors:
            print("verify: FAIL %s" % e, file=sys.stderr)
        return 1
    print("verify: ok, %d files, %d logged writes (%d fsynced before the crash)%s"
          % (checked, nw, nd, "" if args.journal else " [exact compare]"), file=sys.stderr)
    if args.update_base:
        os.makedirs(args.base, exist_ok=True)
        for name, data in results.items():
            p = os.path.join(args.base, name)
            if data is None:
                if os.path.exists(p):
                    os.unlink(p)
                continue
            with open(p + ".tmp", "wb") as f:
                f.write(data)
            os.replace(p + ".tmp", p)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--dir", required=True)
    w.add_argument("--journal", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--files", type=int, default=4)
    w.add_argument("--span", type=int, default=8 * MIB)
    w.add_argument("--max-seconds", type=float, default=60)
    w.add_argument("--mbps", type=float, default=32, help="throughput cap, MiB/s")
    v = sub.add_parser("verify")
    v.add_argument("--dir", required=True)
    v.add_argument("--base", required=True)
    v.add_argument("--journal")
    v.add_argument("--update-base", action="store_true")
    args = ap.parse_args()
    if args.cmd == "write":
        try:
            return write_cmd(args)
        except OSError as e:  # the daemon was killed: ENOTCONN / EIO
            print("writer: stopped by %s" % e, file=sys.stderr)
            return 3
    return verify_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
