#!/usr/bin/env python3
"""benches/nfs_meta.py: NFSv3 metadata and sync latency of one server, with the raw Python
client of fs-tests/nfs_client.py (imported, not changed). Driven by benches/nfs_meta.sh, which
runs it against nfs-ganesha and against Tessera on the same disk.

usage: nfs_meta.py HOST EXPORT OUT
       nfs_meta.py --probe HOST EXPORT   (exit 0 once the server answers MNT and NULL)
  HOST     IPv4 address of the server; NFS on NFS_PORT (2049), MOUNT on MOUNT_PORT (2049)
  EXPORT   export path to MNT
  OUT      file to write "key value" lines to (one measured figure a line)
Env: N (files per test, 2000), COMMITS (WRITE+COMMIT pairs, 1000), CLIENTS ("1 4": each test
     runs with 1 client, then with 4 clients, each its own TCP connection and process, sharing
     the work and one directory), WRITE_SIZE (bytes of the WRITE before each COMMIT, 4096).

Tests (each in a fresh directory; c = number of clients):
  null            NULL RPC round trip (median, µs): the floor of client + RPC + loopback
  create_c        CREATE UNCHECKED of N empty files: latency median and p99 (ms), creates/s
  commit_c        COMMITS x (WRITE WRITE_SIZE bytes UNSTABLE at the file's end, then COMMIT)
                  on one file per client: COMMIT latency median and p99 (ms)
  file1sync_c     N 1-byte files, each CREATE + WRITE 1 byte FILE_SYNC: files/s
  file1commit_c   N 1-byte files, each CREATE + WRITE 1 byte UNSTABLE + COMMIT: files/s
Rates are the total operations over the wall time from the start of the first client to the end
of the last. A FILE_SYNC WRITE answered less than FILE_SYNC fails the run.
"""
import math
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fs-tests"))
import nfs_client as nc  # noqa: E402

NFS_PORT = int(os.environ.get("NFS_PORT", "2049"))
MOUNT_PORT = int(os.environ.get("MOUNT_PORT", str(NFS_PORT)))
UNSTABLE, FILE_SYNC = 0, 2


def mkdir(rpc, dirfh, name):
    """MKDIR with a complete sattr3 (mode 0755; uid, gid, size, atime, mtime not set).
    fs-tests/nfs_client.mkdir sends one word short (no mtime discriminant), which ganesha
    rightly answers GARBAGE_ARGS."""
    sattr = nc.struct.pack(">IIIIIII", 1, 0o755, 0, 0, 0, 0, 0)
    body = rpc.call(nc.NFS, 3, 9, nc.opaque(dirfh) + nc.opaque(name.encode()) + sattr)
    o = nc.status_of(body)
    _present, o = nc.u32(body, o)
    fh, o = nc.take_opaque(body, o)
    return fh


def connect(host):
    return nc.Rpc(host, NFS_PORT, timeout=60)


def root_fh(host, export):
    return nc.mount(nc.Rpc(host, MOUNT_PORT, timeout=60), export)


def pct(xs, p):
    """p-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# ---- one client's share of a test; returns (start, end, [latency ns of the timed op])
def w_create(rpc, dirfh, tag, n):
    lat = []
    for i in range(n):
        t = time.perf_counter_ns()
        nc.create(rpc, dirfh, f"{tag}-{i:06}")
        lat.append(time.perf_counter_ns() - t)
    return lat


def w_commit(rpc, dirfh, tag, n):
    fh = nc.create(rpc, dirfh, f"{tag}-log")
    data = b"c" * int(os.environ.get("WRITE_SIZE", "4096"))
    lat = []
    for i in range(n):
        cnt, _c, _v = nc.write(rpc, fh, i * len(data), data, UNSTABLE)
        assert cnt == len(data), f"short write {cnt}"
        t = time.perf_counter_ns()
        nc.commit(rpc, fh)
        lat.append(time.perf_counter_ns() - t)
    return lat


def w_file1(stable):
    def run(rpc, dirfh, tag, n):
        lat = []
        for i in range(n):
            t = time.perf_counter_ns()
            fh = nc.create(rpc, dirfh, f"{tag}-{i:06}")
            cnt, committed, _v = nc.write(rpc, fh, 0, b"x", stable)
            assert cnt == 1, f"short write {cnt}"
            if stable == FILE_SYNC:
                assert committed == FILE_SYNC, f"FILE_SYNC write answered stability {committed}"
            else:
                nc.commit(rpc, fh)
            lat.append(time.perf_counter_ns() - t)
        return lat
    return run


TESTS = {"create": w_create, "commit": w_commit, "file1sync": w_file1(FILE_SYNC),
         "file1commit": w_file1(UNSTABLE)}


def client(host, test, dirfh, tag, n, barrier, q):
    try:
        rpc = connect(host)
        barrier.wait(60)
        t0 = time.monotonic_ns()
        lat = TESTS[test](rpc, dirfh, tag, n)
        q.put((tag, t0, time.monotonic_ns(), lat, None))
    except Exception as e:  # reported by the parent
        q.put((tag, 0, 0, [], f"{type(e).__name__}: {e}"))


def run_test(host, root, test, total, clients):
    rpc = connect(host)
    dirname = f"{test}-c{clients}-{os.getpid()}"
    dirfh = mkdir(rpc, root, dirname)
    share = [total // clients + (1 if k < total % clients else 0) for k in range(clients)]
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=client, args=(host, test, dirfh, f"c{k}", share[k], barrier, q))
             for k in range(clients)]
    for p in procs:
        p.start()
    res = [q.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    errs = [r[4] for r in res if r[4]]
    if errs:
        raise SystemExit(f"nfs_meta: {test} with {clients} clients failed: {errs[0]}")
    start, end = min(r[1] for r in res), max(r[2] for r in res)
    lat = [x for r in res for x in r[3]]
    return lat, (end - start) / 1e9


def main(argv):
    if len(argv) == 3 and argv[0] == "--probe":  # the server is up: MNT, then NULL over NFS
        nc.mount(nc.Rpc(argv[1], MOUNT_PORT, timeout=5), argv[2])
        return 0 if nc.Rpc(argv[1], NFS_PORT, timeout=5).call_raw(nc.NFS, 3, 0, b"")[0] == 0 else 1
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    host, export, out = argv
    n = int(os.environ.get("N", "2000"))
    commits = int(os.environ.get("COMMITS", "1000"))
    clients = [int(c) for c in os.environ.get("CLIENTS", "1 4").split()]
    root = root_fh(host, export)
    rpc = connect(host)
    figs = []

    def fig(key, value):
        figs.append((key, value))
        print(f"  {key} {value:.4g}", file=sys.stderr)

    # warm up: connection, directory and inode caches, the server's threads
    warm = mkdir(rpc, root, f"warmup-{os.getpid()}")
    for i in range(50):
        nc.create(rpc, warm, f"w{i}")
    lat = []
    for _ in range(1000):
        t = time.perf_counter_ns()
        accept, _ = rpc.call_raw(nc.NFS, 3, 0, b"")
        lat.append(time.perf_counter_ns() - t)
        assert accept == 0
    fig("null_us", statistics.median(lat) / 1e3)
    for c in clients:
        lat, secs = run_test(host, root, "create", n, c)
        fig(f"create_c{c}_p50_ms", statistics.median(lat) / 1e6)
        fig(f"create_c{c}_p99_ms", pct(lat, 99) / 1e6)
        fig(f"create_c{c}_ops", len(lat) / secs)
        lat, secs = run_test(host, root, "commit", commits, c)
        fig(f"commit_c{c}_p50_ms", statistics.median(lat) / 1e6)
        fig(f"commit_c{c}_p99_ms", pct(lat, 99) / 1e6)
        for t in ("file1sync", "file1commit"):
            lat, secs = run_test(host, root, t, n, c)
            fig(f"{t}_c{c}_fps", len(lat) / secs)
            fig(f"{t}_c{c}_p50_ms", statistics.median(lat) / 1e6)
    with open(out, "w") as f:
        f.write("".join(f"{k} {v:.6g}\n" for k, v in figs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
