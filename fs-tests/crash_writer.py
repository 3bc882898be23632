#!/usr/bin/env python3
"""Writer and verifier for the kill -9 crash test (fs-tests/crash.sh).

Protects the durability promises: every byte written before a successful
fsync()/fdatasync() survives a crash of the Tessera daemon, byte for byte;
every namespace operation that returned survives it too (meta, verify-meta).

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

  crash_writer.py meta        --dir D --journal J --seed S [--base-model M]
                              [--max-seconds T] [--ops-per-sec R]
  crash_writer.py verify-meta --dir D --base-model M [--journal J] [--update-base]

meta: starting from the namespace model M (the state verified last round;
absent = empty), performs a deterministic random sequence of namespace ops in
D, each valid on the model (so any error but ENOTCONN/ECONNABORTED, the
daemon's death, is a failure: exit 4): create, mkdir, symlink, link, rename
(files and dirs, to new names or over existing files / empty dirs), chmod,
unlink, rmdir, truncate (ftruncate: a setattr of the size), utime. No fsync
anywhere: an op that returned must be durable. The journal J gets
{"b": i, "t": time, "op": {...}} before op i and {"d": i} after it returned.

verify-meta: the namespace under D (names, kinds, modes, symlink targets,
link counts, file sizes, mtimes set by utime and not changed since) must equal
the model M plus every op marked done, or plus also the one op begun but not
done (in flight at the kill). Without --journal, exactly M. On a mismatch it
names the differences and which journaled state the namespace matches (how
many completed ops were lost). --update-base stores the matching model in M.
"""

import argparse
import errno
import json
import os
import random
import stat
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


# ---------------------------------------------------------------- metadata worker
#
# The namespace model: {"next": N, "names": {relpath: ino}, "inodes": {str(ino): inode}} with
# inode = {"kind": "file"|"dir"|"symlink", "mode": M, "size": S, "target": T, "mtime_ns": X|None}.
# Paths are relative to the worker's folder ("" is the folder itself, never in "names").

NAME_POOL = ["n%d" % i for i in range(24)]
FILE_MODES = [0o600, 0o644, 0o640, 0o755, 0o444, 0o4755, 0o2750]
DIR_MODES = [0o755, 0o700, 0o750, 0o775, 0o1777]


def empty_model():
    return {"next": 1, "names": {}, "inodes": {}}


def parent_of(p):
    return p.rsplit("/", 1)[0] if "/" in p else ""


def join(parent, name):
    return name if parent == "" else parent + "/" + name


def children(model, d):
    return [p for p in model["names"] if parent_of(p) == d]


def apply_meta(model, op):
    """Apply one journaled namespace op to the model (the same effect the filesystem must show)."""
    names, inodes = model["names"], model["inodes"]
    k = op["op"]
    if k in ("create", "mkdir", "symlink"):
        ino = str(model["next"])
        model["next"] += 1
        kind = {"create": "file", "mkdir": "dir", "symlink": "symlink"}[k]
        inodes[ino] = {"kind": kind, "mode": op.get("mode", 0o777), "size": 0,
                       "target": op.get("target"), "mtime_ns": None}
        names[op["path"]] = ino
    elif k == "link":
        names[op["path"]] = names[op["src"]]
    elif k in ("unlink", "rmdir"):
        ino = names.pop(op["path"])
        if ino not in names.values():
            del inodes[ino]
    elif k == "rename":
        src, dst = op["src"], op["path"]
        if dst in names:
            old = names.pop(dst)
            if old not in names.values() and old != names[src]:
                del inodes[old]
        moved = {p: i for p, i in names.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del names[p]
        for p, i in moved.items():
            names[dst + p[len(src):]] = i
    elif k == "chmod":
        inodes[names[op["path"]]]["mode"] = op["mode"]
    elif k == "truncate":
        ino = inodes[names[op["path"]]]
        ino["size"] = op["size"]
        ino["mtime_ns"] = None  # now: unknown
    elif k == "utime":
        inodes[names[op["path"]]]["mtime_ns"] = op["mtime_ns"]
    else:
        raise ValueError("unknown op %r" % op)


def choose_meta_op(rng, model):
    """A random op that is valid on the model (so any error from the filesystem is a failure)."""
    names, inodes = model["names"], model["inodes"]
    kind_of = lambda p: inodes[names[p]]["kind"]
    dirs = [""] + [p for p in names if kind_of(p) == "dir"]
    files = [p for p in names if kind_of(p) == "file"]
    nondirs = [p for p in names if kind_of(p) != "dir"]

    def new_path(max_depth=3):
        for _ in range(20):
            d = rng.choice(dirs)
            if d.count("/") + 1 >= max_depth:
                continue
            p = join(d, rng.choice(NAME_POOL))
            if p not in names:
                return p
        return None

    for _ in range(50):
        k = rng.choices(["create", "mkdir", "symlink", "link", "rename", "chmod", "unlink", "rmdir",
                         "truncate", "utime"], [14, 6, 5, 5, 16, 8, 9, 4, 8, 6])[0]
        if k == "create":
            p = new_path()
            if p:
                return {"op": k, "path": p, "mode": rng.choice(FILE_MODES)}
        elif k == "mkdir":
            p = new_path(2)
            if p:
                return {"op": k, "path": p, "mode": rng.choice(DIR_MODES)}
        elif k == "symlink":
            p = new_path()
            if p:
                t = rng.choice(["target-%d" % rng.randrange(1000), "../" + rng.choice(NAME_POOL),
                                "/nonexistent/" + "x" * rng.randrange(1, 200)])
                return {"op": k, "path": p, "target": t}
        elif k == "link" and files:
            p = new_path()
            if p:
                return {"op": k, "src": rng.choice(files), "path": p}
        elif k == "rename" and names:
            src = rng.choice(list(names))
            sk = kind_of(src)
            if rng.random() < 0.4:  # over an existing target
                if sk == "dir":
                    cands = [p for p in dirs if p and not children(model, p)]
                else:
                    cands = nondirs
                cands = [p for p in cands if names[p] != names[src]]
            else:
                p = new_path()
                cands = [p] if p else []
            cands = [p for p in cands if p != src and not p.startswith(src + "/")
                     and not src.startswith(p + "/")]
            if sk == "dir":  # keep the tree shallow: a moved dir and its subtree at depth <= 3
                depth = max(q.count("/") for q in names if q == src or q.startswith(src + "/")) - src.count("/")
                cands = [p for p in cands if p.count("/") + depth <= 2]
            if cands:
                return {"op": k, "src": src, "path": rng.choice(cands)}
        elif k == "chmod":
            cands = [p for p in names if kind_of(p) != "symlink"]
            if cands:
                p = rng.choice(cands)
                modes = DIR_MODES if kind_of(p) == "dir" else FILE_MODES
                return {"op": k, "path": p, "mode": rng.choice(modes)}
        elif k == "unlink" and nondirs:
            return {"op": k, "path": rng.choice(nondirs)}
        elif k == "rmdir":
            cands = [p for p in dirs if p and not children(model, p)]
            if cands:
                return {"op": k, "path": rng.choice(cands)}
        elif k == "truncate" and files:
            size = rng.choice([0, 1, 4095, 4096, 16384, 16385, rng.randrange(1 << 20), rng.randrange(1 << 30)])
            return {"op": k, "path": rng.choice(files), "size": size}
        elif k == "utime" and files:
            return {"op": k, "path": rng.choice(files),
                    "mtime_ns": rng.randrange(1_000_000_000, 2_000_000_000) * 10**9 + rng.randrange(10**9)}
    return {"op": "create", "path": "spill-%d" % model["next"], "mode": 0o644}


def do_meta(root, op):
    """Perform one op on the filesystem (no fsync: the op returning is the promise). Paths are
    relative to `root`, an open fd of the worker's folder: after the kill, every op fails with
    ENOTCONN instead of landing in the directory under the detached mount."""
    k, p = op["op"], op["path"]
    if k == "create":
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, op["mode"], dir_fd=root))
    elif k == "mkdir":
        os.mkdir(p, op["mode"], dir_fd=root)
    elif k == "symlink":
        os.symlink(op["target"], p, dir_fd=root)
    elif k == "link":
        os.link(op["src"], p, src_dir_fd=root, dst_dir_fd=root, follow_symlinks=False)
    elif k == "unlink":
        os.unlink(p, dir_fd=root)
    elif k == "rmdir":
        os.rmdir(p, dir_fd=root)
    elif k == "rename":
        os.rename(op["src"], p, src_dir_fd=root, dst_dir_fd=root)
    elif k == "chmod":
        os.chmod(p, op["mode"], dir_fd=root)
    elif k == "truncate":
        fd = os.open(p, os.O_WRONLY, dir_fd=root)
        try:
            os.ftruncate(fd, op["size"])  # a setattr(size)
        finally:
            os.close(fd)
    elif k == "utime":
        os.utime(p, ns=(op["mtime_ns"], op["mtime_ns"]), dir_fd=root)


def load_model(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return empty_model()


def meta_cmd(args):
    os.umask(0)
    rng = random.Random(args.seed)
    model = load_model(args.base_model)
    journal = Journal(args.journal)
    if not os.path.isdir(args.dir):
        os.mkdir(args.dir, 0o755)
    root = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
    journal.add({"op": "start", "seed": args.seed})
    n = 0
    start = time.monotonic()
    while time.monotonic() - start < args.max_seconds:
        op = choose_meta_op(rng, model)
        journal.add({"b": n, "t": time.time(), "op": op})
        do_meta(root, op)
        journal.add({"d": n})  # it returned: from now on it must survive a kill -9
        apply_meta(model, op)
        n += 1
        if args.ops_per_sec > 0:
            ahead = n / args.ops_per_sec - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    print("meta: time limit reached after %d ops" % n, file=sys.stderr)
    return 0


def scan(root):
    """The namespace under root as {relpath: (kind, mode, size, target, nlink, mtime_ns)}."""
    out = {}
    if not os.path.isdir(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None, None, st.st_nlink, None)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, None, os.readlink(full), None, None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, None, st.st_nlink, st.st_mtime_ns)
            else:
                out[rel] = ("other %o" % st.st_mode, None, None, None, None, None)
    return out


def expected(model):
    """What scan() must show for the model (an mtime of None matches any value)."""
    names, inodes = model["names"], model["inodes"]
    nlinks = {}
    for i in names.values():
        nlinks[i] = nlinks.get(i, 0) + 1
    out = {}
    for p, i in names.items():
        ino = inodes[i]
        if ino["kind"] == "dir":
            subdirs = sum(1 for q in children(model, p) if inodes[names[q]]["kind"] == "dir")
            out[p] = ("dir", ino["mode"], None, None, 2 + subdirs, None)
        elif ino["kind"] == "symlink":
            out[p] = ("symlink", None, None, ino["target"], None, None)
        else:
            out[p] = ("file", ino["mode"], ino["size"], None, nlinks[i], ino["mtime_ns"])
    return out


def diff(actual, want):
    errs = []
    for p in sorted(set(actual) | set(want)):
        a, w = actual.get(p), want.get(p)
        if a is None:
            errs.append("%s: missing, expected %s" % (p, fmt(w)))
        elif w is None:
            errs.append("%s: unexpected %s" % (p, fmt(a)))
        elif a[:5] != w[:5] or (w[5] is not None and a[5] != w[5]):
            errs.append("%s: is %s, expected %s" % (p, fmt(a), fmt(w)))
    return errs


def fmt(e):
    kind, mode, size, target, nlink, mtime = e
    s = kind
    if mode is not None:
        s += " mode %o" % mode
    if size is not None:
        s += " size %d" % size
    if target is not None:
        s += " -> %r" % target
    if nlink is not None:
        s += " nlink %d" % nlink
    if mtime is not None:
        s += " mtime_ns %d" % mtime
    return s


def verify_meta_cmd(args):
    base = load_model(args.base_model)
    recs = read_journal(args.journal) if args.journal else []
    begun, done = [], set()
    for r in recs:
        if "b" in r:
            begun.append(r)
        elif "d" in r:
            done.add(r["d"])
    state = json.loads(json.dumps(base))
    lost_from = None
    for r in begun:
        if r["b"] in done:
            apply_meta(state, r["op"])
    inflight = [r for r in begun if r["b"] not in done]
    if len(inflight) > 1 or (inflight and inflight[0]["b"] != len(begun) - 1):
        print("verify-meta: journal has more than one unfinished op: %s" % inflight, file=sys.stderr)
        return 2
    cands = [("after the last completed op", state)]
    if inflight:
        s2 = json.loads(json.dumps(state))
        apply_meta(s2, inflight[0]["op"])
        cands.append(("after the op in flight at the kill", s2))
    actual = scan(args.dir)
    for what, m in cands:
        if not diff(actual, expected(m)):
            print("verify-meta: ok, %d entries, %d ops in the journal (state %s)%s"
                  % (len(actual), len(done), what, "" if args.journal else " [exact compare]"),
                  file=sys.stderr)
            if args.update_base:
                with open(args.base_model + ".tmp", "w") as f:
                    json.dump(m, f)
                os.replace(args.base_model + ".tmp", args.base_model)
            return 0
    errs = diff(actual, expected(state))
    for e in errs[:30]:
        print("verify-meta: FAIL %s" % e, file=sys.stderr)
    if len(errs) > 30:
        print("verify-meta: ... %d differences in all" % len(errs), file=sys.stderr)
    # How far back does the namespace match? (what the crash lost)
    if begun:
        t_end = begun[-1]["t"]
        s = json.loads(json.dumps(base))
        match = -1 if not diff(actual, expected(s)) else None
        for r in begun:
            if r["b"] not in done:
                break
            apply_meta(s, r["op"])
            if not diff(actual, expected(s)):
                match = r["b"]
        if match is None:
            print("verify-meta: the namespace matches no state the journal went through", file=sys.stderr)
        else:
            lost = [r for r in begun if r["b"] > match and r["b"] in done]
            print("verify-meta: the namespace is the state %s: the last %d completed ops are lost, "
                  "the first of them began %.2f s before the last journaled op (%s)"
                  % ("before the round's first op" if match < 0 else "after op %d" % match,
                     len(lost), t_end - lost[0]["t"], lost[0]["op"]), file=sys.stderr)
    return 1


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
    m = sub.add_parser("meta")
    m.add_argument("--dir", required=True)
    m.add_argument("--journal", required=True)
    m.add_argument("--seed", type=int, required=True)
    m.add_argument("--base-model", help="the model verified last round (JSON; absent: empty)")
    m.add_argument("--max-seconds", type=float, default=60)
    m.add_argument("--ops-per-sec", type=float, default=400)
    vm = sub.add_parser("verify-meta")
    vm.add_argument("--dir", required=True)
    vm.add_argument("--base-model", required=True)
    vm.add_argument("--journal")
    vm.add_argument("--update-base", action="store_true")
    args = ap.parse_args()
    if args.cmd in ("write", "meta"):
        run = write_cmd if args.cmd == "write" else meta_cmd
        try:
            return run(args)
        except OSError as e:  # the daemon was killed: ENOTCONN / EIO
            if args.cmd == "meta" and e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                # every op is valid on the model: any other error is a wrong namespace
                print("meta: FAIL unexpected error %s at %.6f" % (e, time.time()), file=sys.stderr)
                return 4
            print("%s: stopped by %s" % ("writer" if args.cmd == "write" else "meta", e), file=sys.stderr)
            return 3
    if args.cmd == "verify-meta":
        return verify_meta_cmd(args)
    return verify_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
