#!/usr/bin/env python3
"""fs-tests/nfs_client.py: a raw NFSv3 client over TCP for what libnfs-utils and qemu cannot
do from the command line: keep a file handle across a server restart, send WRITEs with a
chosen stability and compare write verifiers, and send malformed or hostile RPC records.

Subcommands (HOST is an IPv4 address; NFS and MOUNT are on PORT, default 2049):
  lookup HOST EXPORT PATH            print the file handle of EXPORT/PATH (hex)
  getattr HOST FH                    print "size N" or the NFS error name (exit 3)
  read HOST FH OFFSET COUNT OUT      write the bytes read to OUT
  write HOST FH OFFSET IN STABLE     write IN at OFFSET (STABLE: unstable|file_sync);
                                     print "<committed> <verifier hex>"
  commit HOST FH                     print the COMMIT verifier (hex)
  remove HOST DIRFH NAME             REMOVE
  create HOST DIRFH NAME             CREATE (unchecked); print the new handle
  mkdir HOST DIRFH NAME              MKDIR; print the new handle
  rename HOST DIRFH FROM TODIRFH TO  RENAME
  symlink HOST DIRFH NAME TARGET     SYMLINK, then READLINK through the new handle
  setattr HOST FH SIZE MTIME         SETATTR size (bytes, or -) and mtime (unix seconds, or -)
  excl HOST DIRFH NAME VERF          CREATE EXCLUSIVE with an 8-byte verifier (hex)
  fsstat HOST FH                     print "tbytes fbytes abytes"
  fsinfo HOST FH                     print "rtmax wtmax maxfilesize"
  listdir HOST DIRFH MAXCOUNT OUT    READDIRPLUS in pages of MAXCOUNT bytes, one name a line to
                                     OUT; with env PAUSE_AT=N, waits for file OUT.go after N pages
  pmap HOST                          GETPORT of NFS v3/TCP and MOUNT v3/TCP from the portmapper
                                     (port 111), over TCP and over UDP; print the four ports
  hostile HOST EXPORT                send malformed records, huge lengths, unknown programs and
                                     procedures, garbage handles; each case expects either a
                                     given error reply or the connection dropped, and the server
                                     up after it
  pipeline HOST FH N                 N COMMITs sent back to back on one connection before any
                                     reply is read: every one answered NFS3_OK, once
  slowreader HOST FH PID SECS MIB    pipeline 3000 READs of 1 MiB on one connection and never
                                     read the replies; for SECS seconds sample the server's
                                     (PID) VmRSS, which must stay under MIB, and check that
                                     another connection is served meanwhile
  conncap HOST N CAP [PORT]          open N connections to PORT (default NFS; 111: the
                                     portmapper): exactly CAP are served (a NULL call) and the
                                     rest are closed by the server; after closing them all, a
                                     new connection is served
  idle HOST SECS                     a connection with no call, and one stalled inside a call,
                                     are closed by the server within SECS seconds
  readdircap HOST DIRFH LIMIT        READDIR (count) and READDIRPLUS (dircount, maxcount) of
                                     4 GiB - 1: both replies at most LIMIT bytes and not eof
                                     (the listing continues), NFS3_OK
  rofs HOST EXPORT DIRFH FH          every change procedure answers NFS3ERR_ROFS
  refused HOST [PORT]                the server closes a new connection without answering NULL
  pmap_refused HOST                  the portmapper answers no GETPORT: TCP closed, UDP silent
Exit status: 0 ok, 3 an NFS error, 1 anything else.
"""
import os
import socket
import struct
import sys
import threading
import time

PORT = int(os.environ.get("NFS_PORT", "2049"))
NFS, MOUNT = 100003, 100005
ERRNAMES = {0: "NFS3_OK", 1: "NFS3ERR_PERM", 2: "NFS3ERR_NOENT", 5: "NFS3ERR_IO", 13: "NFS3ERR_ACCES",
            17: "NFS3ERR_EXIST", 20: "NFS3ERR_NOTDIR", 21: "NFS3ERR_ISDIR", 22: "NFS3ERR_INVAL",
            27: "NFS3ERR_FBIG", 28: "NFS3ERR_NOSPC", 30: "NFS3ERR_ROFS", 63: "NFS3ERR_NAMETOOLONG",
            66: "NFS3ERR_NOTEMPTY", 70: "NFS3ERR_STALE", 10001: "NFS3ERR_BADHANDLE",
            10004: "NFS3ERR_NOTSUPP", 10006: "NFS3ERR_SERVERFAULT"}


class NfsError(Exception):
    def __init__(self, status):
        super().__init__(ERRNAMES.get(status, str(status)))
        self.status = status


def opaque(b):
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)


def auth_unix():
    body = struct.pack(">I", int(time.time())) + opaque(b"fs-tests") + struct.pack(">III", 0, 0, 0)
    return struct.pack(">I", 1) + opaque(body)


class Rpc:
    def __init__(self, host, port=PORT, timeout=30):
        # NFS_SRC: the local address to connect from (allow-list tests)
        src = os.environ.get("NFS_SRC")
        self.s = socket.create_connection((host, port), timeout=timeout,
                                          source_address=(src, 0) if src else None)
        self.xid = int(time.time() * 1000) & 0xFFFFFFF

    def send_record(self, payload, last=True):
        self.s.sendall(struct.pack(">I", (0x80000000 if last else 0) | len(payload)) + payload)

    def recv_record(self):
        out = b""
        while True:
            (h,) = struct.unpack(">I", self.recvn(4))
            out += self.recvn(h & 0x7FFFFFFF)
            if h & 0x80000000:
                return out

    def recvn(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise ConnectionError("server closed the connection")
            b += c
        return b

    def call_raw(self, prog, vers, proc, args, rpcvers=2):
        self.xid += 1
        hdr = struct.pack(">IIIIII", self.xid, 0, rpcvers, prog, vers, proc) + auth_unix() + struct.pack(">II", 0, 0)
        self.send_record(hdr + args)
        r = self.recv_record()
        xid, mtype, stat = struct.unpack(">III", r[:12])
        assert xid == self.xid and mtype == 1, "reply does not match the call"
        if stat != 0:  # MSG_DENIED
            return ("denied", r[12:])
        # verifier: flavor, opaque body
        (vlen,) = struct.unpack(">I", r[16:20])
        off = 20 + vlen + (-vlen % 4)
        (accept,) = struct.unpack(">I", r[off:off + 4])
        return (accept, r[off + 4:])

    def call(self, prog, vers, proc, args):
        accept, body = self.call_raw(prog, vers, proc, args)
        if accept != 0:
            raise RuntimeError(f"RPC not accepted: accept_stat {accept}")
        return body


def u32(b, o):
    return struct.unpack(">I", b[o:o + 4])[0], o + 4


def u64(b, o):
    return struct.unpack(">Q", b[o:o + 8])[0], o + 8


def take_opaque(b, o):
    n, o = u32(b, o)
    return b[o:o + n], o + n + (-n % 4)


def skip_post_op_attr(b, o):
    present, o = u32(b, o)
    return o + (84 if present else 0)


def skip_wcc(b, o):
    present, o = u32(b, o)
    o += 24 if present else 0
    return skip_post_op_attr(b, o)


def status_of(body):
    st, o = u32(body, 0)
    if st != 0:
        raise NfsError(st)
    return o


def mount(rpc, export):
    body = rpc.call(MOUNT, 3, 1, opaque(export.encode()))
    st, o = u32(body, 0)
    if st != 0:
        raise RuntimeError(f"MNT {export} failed: mountstat {st}")
    fh, o = take_opaque(body, o)
    return fh


def lookup(rpc, dirfh, name):
    body = rpc.call(NFS, 3, 3, opaque(dirfh) + opaque(name.encode()))
    o = status_of(body)
    fh, o = take_opaque(body, o)
    return fh


def getattr_size(rpc, fh):
    body = rpc.call(NFS, 3, 1, opaque(fh))
    o = status_of(body)
    # fattr3: type mode nlink uid gid (5 x u32) then size
    size, _ = u64(body, o + 20)
    return size


def read(rpc, fh, off, count):
    body = rpc.call(NFS, 3, 6, opaque(fh) + struct.pack(">QI", off, count))
    o = status_of(body)
    o = skip_post_op_attr(body, o)
    n, o = u32(body, o)
    eof, o = u32(body, o)
    data, o = take_opaque(body, o)
    return data, eof


def write(rpc, fh, off, data, stable):
    body = rpc.call(NFS, 3, 7, opaque(fh) + struct.pack(">QII", off, len(data), stable) + opaque(data))
    o = status_of(body)
    o = skip_wcc(body, o)
    count, o = u32(body, o)
    committed, o = u32(body, o)
    return count, committed, body[o:o + 8]


def commit(rpc, fh):
    body = rpc.call(NFS, 3, 21, opaque(fh) + struct.pack(">QI", 0, 0))
    o = status_of(body)
    o = skip_wcc(body, o)
    return body[o:o + 8]


def remove(rpc, dirfh, name):
    status_of(rpc.call(NFS, 3, 12, opaque(dirfh) + opaque(name.encode())))


def create(rpc, dirfh, name):
    # createhow3 UNCHECKED with sattr3: mode set 0644, nothing else
    sattr = struct.pack(">IIIIIII", 1, 0o644, 0, 0, 0, 0, 0)
    body = rpc.call(NFS, 3, 8, opaque(dirfh) + opaque(name.encode()) + struct.pack(">I", 0) + sattr)
    o = status_of(body)
    present, o = u32(body, o)
    fh, o = take_opaque(body, o)
    return fh


def mkdir(rpc, dirfh, name):
    sattr = struct.pack(">IIIIIII", 1, 0o755, 0, 0, 0, 0, 0)
    body = rpc.call(NFS, 3, 9, opaque(dirfh) + opaque(name.encode()) + sattr)
    o = status_of(body)
    present, o = u32(body, o)
    fh, o = take_opaque(body, o)
    return fh


def rename(rpc, fromdir, fromname, todir, toname):
    status_of(rpc.call(NFS, 3, 14, opaque(fromdir) + opaque(fromname.encode())
                       + opaque(todir) + opaque(toname.encode())))


def symlink(rpc, dirfh, name, target):
    sattr = struct.pack(">IIIIII", 0, 0, 0, 0, 0, 0)
    body = rpc.call(NFS, 3, 10, opaque(dirfh) + opaque(name.encode()) + sattr + opaque(target.encode()))
    o = status_of(body)
    present, o = u32(body, o)
    fh, o = take_opaque(body, o)
    body = rpc.call(NFS, 3, 5, opaque(fh))
    o = status_of(body)
    o = skip_post_op_attr(body, o)
    t, o = take_opaque(body, o)
    return t.decode()


def setattr(rpc, fh, size, mtime):
    s = struct.pack(">III", 0, 0, 0)
    s += struct.pack(">IQ", 1, size) if size is not None else struct.pack(">I", 0)
    s += struct.pack(">I", 0)  # atime: don't change
    s += struct.pack(">III", 2, mtime, 0) if mtime is not None else struct.pack(">I", 0)
    body = rpc.call(NFS, 3, 2, opaque(fh) + s + struct.pack(">I", 0))
    status_of(body)


def create_exclusive(rpc, dirfh, name, verf):
    body = rpc.call(NFS, 3, 8, opaque(dirfh) + opaque(name.encode()) + struct.pack(">I", 2) + verf)
    o = status_of(body)
    present, o = u32(body, o)
    fh, o = take_opaque(body, o)
    return fh


def fsstat(rpc, fh):
    body = rpc.call(NFS, 3, 18, opaque(fh))
    o = status_of(body)
    o = skip_post_op_attr(body, o)
    return struct.unpack(">QQQ", body[o:o + 24])


def fsinfo(rpc, fh):
    body = rpc.call(NFS, 3, 19, opaque(fh))
    o = status_of(body)
    o = skip_post_op_attr(body, o)
    rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref = struct.unpack(">7I", body[o:o + 28])
    (maxfilesize,) = struct.unpack(">Q", body[o + 28:o + 36])
    return rtmax, wtmax, maxfilesize


def listdir(rpc, dirfh, maxcount, out, pause_at=None):
    """READDIRPLUS page by page; returns names in order (may repeat if the server repeats)."""
    names, cookie, verf, pages = [], 0, b"\0" * 8, 0
    while True:
        body = rpc.call(NFS, 3, 17, opaque(dirfh) + struct.pack(">Q", cookie) + verf
                        + struct.pack(">II", maxcount // 2, maxcount))
        o = status_of(body)
        o = skip_post_op_attr(body, o)
        verf = body[o:o + 8]
        o += 8
        while True:
            more, o = u32(body, o)
            if not more:
                break
            _fileid, o = u64(body, o)
            name, o = take_opaque(body, o)
            cookie, o = u64(body, o)
            o = skip_post_op_attr(body, o)
            has_fh, o = u32(body, o)
            if has_fh:
                _fh, o = take_opaque(body, o)
            names.append(name.decode())
        eof, o = u32(body, o)
        pages += 1
        if pause_at is not None and pages == pause_at:
            open(out + ".paused", "w").close()
            deadline = time.time() + 120
            while not os.path.exists(out + ".go"):
                assert time.time() < deadline, "nobody said go"
                time.sleep(0.05)
        if eof:
            break
    with open(out, "w") as f:
        f.write("".join(n + "\n" for n in names))
    return pages


def pmap_getport(host, udp):
    """PMAPPROC_GETPORT for NFS v3 and MOUNT v3 over TCP, asked over TCP or UDP."""
    ports = []
    for prog in (NFS, MOUNT):
        call = struct.pack(">IIIIII", 77, 0, 2, 100000, 2, 3) + struct.pack(">IIII", 0, 0, 0, 0)
        call += struct.pack(">IIII", prog, 3, 6, 0)
        if udp:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            if os.environ.get("NFS_SRC"):
                s.bind((os.environ["NFS_SRC"], 0))
            s.sendto(call, (host, 111))
            r, _ = s.recvfrom(4096)
        else:
            rpc = Rpc(host, 111, timeout=5)
            rpc.send_record(call)
            r = rpc.recv_record()
        xid, mtype, stat, _vf, _vl, accept, port = struct.unpack(">7I", r[:28])
        assert (xid, mtype, stat, accept) == (77, 1, 0, 0), "portmapper refused GETPORT"
        ports.append(port)
    return ports


def resolve(host, export, path):
    rpc = Rpc(host)
    fh = mount(rpc, export)
    for part in [p for p in path.split("/") if p]:
        fh = lookup(rpc, fh, part)
    return fh


def alive(host):
    """The server answers a NULL call on a new connection."""
    r = Rpc(host, timeout=10)
    accept, _ = r.call_raw(NFS, 3, 0, b"")
    assert accept == 0, f"NULL not accepted ({accept})"


class Dropped(Exception):
    """The server closed (or reset) the connection."""


def read_until_closed(sock, timeout):
    """Bytes the server sends until it closes the connection; AssertionError if it keeps it
    open for `timeout` seconds (a hang is not a drop)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            c = sock.recv(65536)
            if not c:
                return got
            got += c
    except ConnectionResetError:
        return got
    except socket.timeout:
        raise AssertionError(f"connection still open after {timeout} s (want it dropped)")


def hostile(host, export):
    root = resolve(host, export, "")
    checks = []

    def rec(name, fn):
        # fn asserts its own expectation (a given error reply, or the connection dropped);
        # an AssertionError ends the run, and the server must still answer afterwards.
        res = fn()
        print(f"  {name}: {res}")
        alive(host)
        checks.append(name)

    def dropped(parts, shut=False, timeout=5):
        """Send parts on a new connection; the server must close it without a reply."""
        r = Rpc(host, timeout=timeout)
        try:
            for p in parts:
                r.s.sendall(p)
            if shut:
                r.s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return "dropped (while sending)"
        got = read_until_closed(r.s, timeout)
        assert got == b"", f"got {len(got)} bytes of reply, want the connection dropped"
        return "dropped"

    # record marking abuse: the write side stays open, so only the server's own limits
    # (not an EOF from the client) can end these connections
    limit = 1024 * 1024 + 64 * 1024
    rec("2 GiB record header", lambda: dropped([struct.pack(">I", 0xFFFFFFFF)]))
    rec("1 GiB record, 1 KiB sent", lambda: dropped([struct.pack(">I", 0x80000000 | (1 << 30)), b"x" * 1024]))
    rec("record of 1 MiB + 64 KiB + 4 (one over the limit) announced",
        lambda: dropped([struct.pack(">I", 0x80000000 | (limit + 4))]))
    rec("many fragments past the limit",
        lambda: dropped([struct.pack(">I", 60000) + b"\0" * 60000 for _ in range(40)]))

    def at_limit():
        # a NULL call padded to exactly the limit is read and answered
        r = Rpc(host, timeout=10)
        r.xid += 1
        call = struct.pack(">IIIIII", r.xid, 0, 2, NFS, 3, 0) + auth_unix() + struct.pack(">II", 0, 0)
        r.send_record(call + b"\0" * (limit - len(call)))
        rep = r.recv_record()
        xid, mtype = struct.unpack(">II", rep[:8])
        assert (xid, mtype) == (r.xid, 1), "no reply to a record of exactly 1 MiB + 64 KiB"
        return "answered"

    rec("record of exactly 1 MiB + 64 KiB", at_limit)
    rec("truncated record, then EOF", lambda: dropped([struct.pack(">I", 0x80000000 | 100), b"\1" * 10], shut=True))
    rec("garbage record", lambda: dropped([struct.pack(">I", 0x80000000 | 256), b"\xff" * 256]))
    rec("zero-length record", lambda: dropped([struct.pack(">I", 0x80000000)]))
    rec("reply instead of call", lambda: dropped([struct.pack(">I", 0x80000000 | 12), struct.pack(">III", 1, 1, 0)]))

    def rpc_status(prog, vers, proc, args, rpcvers=2):
        r = Rpc(host, timeout=10)
        return r.call_raw(prog, vers, proc, args, rpcvers)

    def must(res, accept, what):
        assert res[0] == accept, f"{what}: got {res[0]}, want {accept}"
        return what

    def rpc_mismatch():
        res = rpc_status(NFS, 3, 0, b"", rpcvers=7)
        assert res[0] == "denied", f"got {res!r:.60}, want MSG_DENIED"
        rej, low, high = struct.unpack(">III", res[1][:12])
        assert (rej, low, high) == (0, 2, 2), f"got reject {rej} ({low}, {high}), want RPC_MISMATCH (2, 2)"
        return "RPC_MISMATCH 2..2"

    rec("wrong RPC version", rpc_mismatch)
    rec("unknown program", lambda: must(rpc_status(123456, 1, 0, b""), 1, "PROG_UNAVAIL"))
    rec("NFS version 4 call", lambda: must(rpc_status(NFS, 4, 0, b""), 2, "PROG_MISMATCH"))
    rec("unknown NFS procedure", lambda: must(rpc_status(NFS, 3, 99, b""), 3, "PROC_UNAVAIL"))
    rec("GETATTR without arguments", lambda: must(rpc_status(NFS, 3, 1, b""), 4, "GARBAGE_ARGS"))

    def long_handle():
        # over NFS3_FHSIZE (64): undecodable (GARBAGE_ARGS) or a bad handle, never served
        accept, body = rpc_status(NFS, 3, 1, struct.pack(">I", 1000) + b"\0" * 1000)
        if accept == 4:
            return "GARBAGE_ARGS"
        assert accept == 0, f"accept_stat {accept}"
        st = ERRNAMES.get(struct.unpack(">I", body[:4])[0])
        assert st in ("NFS3ERR_BADHANDLE", "NFS3ERR_STALE"), f"got {st}, want GARBAGE_ARGS, BADHANDLE or STALE"
        return st

    rec("GETATTR handle length 1000", long_handle)

    def nfs_status(proc, args):
        accept, body = rpc_status(NFS, 3, proc, args)
        assert accept == 0, f"accept_stat {accept}"
        return ERRNAMES.get(struct.unpack(">I", body[:4])[0])

    def must_fail(proc, args, allowed):
        st = nfs_status(proc, args)
        assert st in allowed, f"got {st}, want one of {allowed}"
        return st

    bad = ("NFS3ERR_BADHANDLE", "NFS3ERR_STALE")
    rec("GETATTR 3-byte handle", lambda: must_fail(1, opaque(b"abc"), bad))
    rec("GETATTR random 24-byte handle", lambda: must_fail(1, opaque(os.urandom(24)), bad))
    rec("GETATTR handle of inode 0", lambda: must_fail(1, opaque(root[:8] + b"\0" * 16), bad))
    rec("READ random handle", lambda: must_fail(6, opaque(os.urandom(24)) + struct.pack(">QI", 0, 4096), bad))
    probe = Rpc(host)
    try:
        remove(probe, root, "hostile-probe")
    except NfsError:
        pass
    fh = create(probe, root, "hostile-probe")
    write(probe, fh, 0, b"p" * 5000, 2)

    def read_huge():
        data, eof = read(Rpc(host), fh, 0, 0xFFFFFFFF)
        assert len(data) == 5000 and eof, f"read {len(data)} bytes, eof {eof}"
        return "5000 bytes, eof"

    def read_past_end():
        data, eof = read(Rpc(host), fh, 2**64 - 1, 4096)
        assert data == b"" and eof, f"read {len(data)} bytes, eof {eof}"
        return "0 bytes, eof"

    rec("READ count 4 GiB", read_huge)
    rec("READ at offset 2^64-1", read_past_end)
    rec("WRITE at offset 2^63",
        lambda: must_fail(7, opaque(fh) + struct.pack(">QII", 2**63, 4, 2) + opaque(b"abcd"),
                          ("NFS3ERR_FBIG", "NFS3ERR_INVAL")))
    rec("SETATTR size 2^63",
        lambda: must_fail(2, opaque(fh) + struct.pack(">IIIIQII", 0, 0, 0, 1, 2**63, 0, 0) + struct.pack(">I", 0),
                          ("NFS3ERR_FBIG", "NFS3ERR_INVAL")))
    rec("WRITE count says 1 MiB, carries 4 bytes",
        lambda: must_fail(7, opaque(fh) + struct.pack(">QII", 0, 1 << 20, 2) + opaque(b"abcd"), ("NFS3ERR_INVAL",)))
    rec("WRITE to a directory",
        lambda: must_fail(7, opaque(root) + struct.pack(">QII", 0, 4, 2) + opaque(b"abcd"),
                          ("NFS3ERR_INVAL", "NFS3ERR_ISDIR")))
    rec("LOOKUP 300-byte name", lambda: must_fail(3, opaque(root) + opaque(b"n" * 300), ("NFS3ERR_NAMETOOLONG",)))
    rec("LOOKUP name with a slash",
        lambda: must_fail(3, opaque(root) + opaque(b"a/b"), ("NFS3ERR_NOENT", "NFS3ERR_INVAL")))
    rec("CREATE name with a slash",
        lambda: must_fail(8, opaque(root) + opaque(b"x/y") + struct.pack(">I", 0) + b"\0" * 24,
                          ("NFS3ERR_INVAL", "NFS3ERR_ACCES", "NFS3ERR_PERM")))
    rec("CREATE named ..",
        lambda: must_fail(8, opaque(root) + opaque(b"..") + struct.pack(">I", 0) + b"\0" * 24,
                          ("NFS3ERR_EXIST", "NFS3ERR_INVAL")))

    def mnt_outside():
        accept, body = rpc_status(MOUNT, 3, 1, opaque(b"/elsewhere/x"))
        assert accept == 0, f"accept_stat {accept}"
        (st,) = struct.unpack(">I", body[:4])
        assert st in (2, 13), f"mountstat {st}, want MNT3ERR_NOENT (2) or MNT3ERR_ACCES (13)"
        return f"mountstat {st}"

    def pmap_set():
        accept, body = rpc_status(100000, 2, 1, struct.pack(">IIII", 1, 1, 6, 1))
        if accept == 0:
            (ok,) = struct.unpack(">I", body[:4])
            assert ok == 0, "portmap SET through the NFS port answered TRUE"
            return "FALSE"
        assert accept in (1, 3), f"accept_stat {accept}"
        return f"accept_stat {accept}"

    rec("MNT of a path outside the export", mnt_outside)
    rec("portmap SET (refused)", pmap_set)
    print(f"hostile: {len(checks)} cases, each answered as expected, server alive after each")


def send_calls(rpc, calls, sent):
    """Send pre-built call records back to back (in a thread); stop at the first error."""
    try:
        for c in calls:
            rpc.send_record(c)
            sent[0] += 1
    except OSError:
        pass


def call_record(rpc, prog, vers, proc, args):
    rpc.xid += 1
    return struct.pack(">IIIIII", rpc.xid, 0, 2, prog, vers, proc) + auth_unix() + struct.pack(">II", 0, 0) + args


def pipeline(host, fh, n):
    """N COMMITs (an fsync each: slow, so many are active at once) pipelined on one
    connection before any reply is read: the server serves 128 at a time and TCP pushes back
    on the rest; none may fail (upstream answered SYSTEM_ERR past 256 active calls)."""
    r = Rpc(host, timeout=60)
    calls = [call_record(r, NFS, 3, 21, opaque(fh) + struct.pack(">QI", 0, 0)) for _ in range(n)]
    want = {struct.unpack(">I", c[:4])[0] for c in calls}
    sent = [0]
    t = threading.Thread(target=send_calls, args=(r, calls, sent), daemon=True)
    t.start()
    seen = set()
    for _ in range(n):
        rep = r.recv_record()
        xid, mtype, stat = struct.unpack(">III", rep[:12])
        assert mtype == 1 and stat == 0, f"xid {xid}: not an accepted reply"
        (vlen,) = struct.unpack(">I", rep[16:20])
        off = 20 + vlen + (-vlen % 4)
        (accept,) = struct.unpack(">I", rep[off:off + 4])
        assert accept == 0, f"xid {xid}: accept_stat {accept} (SYSTEM_ERR is 5) after {len(seen)} answers"
        (nfsst,) = struct.unpack(">I", rep[off + 4:off + 8])
        assert nfsst == 0, f"xid {xid}: {ERRNAMES.get(nfsst, nfsst)}"
        assert xid in want and xid not in seen, f"unexpected or repeated xid {xid}"
        seen.add(xid)
    t.join(10)
    assert sent[0] == n
    print(f"pipeline: {n} COMMITs sent before reading a reply, {len(seen)} answered NFS3_OK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def slow_reader(host, fh, pid, seconds, limit_mib, n=3000, conns=1):
    """Clients that pipeline N READs of 1 MiB (spread over CONNS connections) and never read
    a reply. The server must stop reading their calls (TCP backpressure) instead of queuing
    gigabytes of replies, per connection and all connections together."""
    size = getattr_size(Rpc(host), fh)
    mib = size >> 20
    assert mib >= 64, f"the file has {size} bytes; want 64 MiB or more"
    base = rss_kib(pid)
    sent = [0]
    rpcs = []
    for c in range(conns):
        r = Rpc(host, timeout=30)
        rpcs.append(r)
        calls = [call_record(r, NFS, 3, 6, opaque(fh) + struct.pack(">QI", (i % mib) << 20, 1 << 20))
                 for i in range(c, n, conns)]
        threading.Thread(target=send_calls, args=(r, calls, sent), daemon=True).start()
    peak, other, t0 = base, None, time.time()
    while time.time() - t0 < seconds:
        peak = max(peak, rss_kib(pid))
        # With many stuck connections the shared budget is full: others wait for the
        # write-stall timeout to drop them (README), so "served meanwhile" is for one.
        if conns == 1 and other is None and time.time() - t0 > seconds / 2:
            # another client is served meanwhile: a 1 MiB READ on a new connection
            o = Rpc(host, timeout=10)
            data, _eof = read(o, fh, 0, 1 << 20)
            assert len(data) == 1 << 20, f"the other client read {len(data)} bytes"
            other = round(time.time() - t0, 1)
        time.sleep(0.2)
    print(f"slow reader: {sent[0]} of {n} READ calls of 1 MiB sent on {conns} connection(s), none read; server VmRSS "
          f"{base >> 10} MiB before, peak {peak >> 10} MiB over {seconds} s (limit {limit_mib} MiB); "
          f"another client read 1 MiB at {other} s")
    assert conns > 1 or other is not None, "the other client was not tried"
    assert peak < limit_mib << 10, f"server VmRSS reached {peak >> 10} MiB (limit {limit_mib} MiB)"
    for r in rpcs:
        r.s.close()


def conn_cap(host, n, cap, port=PORT):
    """Open N connections to PORT (NFS, or the portmapper on 111): exactly CAP are served."""
    prog, vers = (100000, 2) if port == 111 else (NFS, 3)
    conns, served, dropped = [], 0, 0
    for _ in range(n):
        r = Rpc(host, port, timeout=10)
        conns.append(r)
        try:
            accept, _ = r.call_raw(prog, vers, 0, b"")
            assert accept == 0, f"NULL accept_stat {accept}"
            served += 1
        except socket.timeout:
            raise AssertionError("a connection got neither an answer nor closed in 10 s")
        except (ConnectionError, OSError):
            dropped += 1
    print(f"conncap: {n} connections to port {port} opened: {served} served, {dropped} closed by the server")
    assert served == cap, f"{served} connections served, want exactly {cap}"
    for r in conns:
        r.s.close()
    deadline = time.time() + 10
    while True:
        try:
            if port == 111:
                pmap_getport(host, False)
            else:
                alive(host)
            break
        except (ConnectionError, OSError):
            assert time.time() < deadline, "no new connection served 10 s after closing them all"
            time.sleep(0.2)
    print("conncap: a new connection is served after they closed")


def idle(host, secs):
    r = Rpc(host, timeout=10)
    accept, _ = r.call_raw(NFS, 3, 0, b"")
    assert accept == 0
    t0 = time.time()
    got = read_until_closed(r.s, secs)
    assert got == b"", "unexpected bytes on an idle connection"
    print(f"idle: closed by the server after {time.time() - t0:.1f} s without a call")
    # A client that stalls inside a call (a record mark promising 200 bytes, 10 sent): the
    # server cannot resume a half-read record, so it drops the connection too.
    r = Rpc(host, timeout=10)
    r.s.sendall(struct.pack(">I", 0x80000000 | 200) + b"\0" * 10)
    t0 = time.time()
    got = read_until_closed(r.s, secs)
    assert got == b"", "unexpected bytes on a connection stalled inside a call"
    print(f"idle: closed by the server {time.time() - t0:.1f} s into a stalled call")


def readdir_cap(host, dirfh, limit):
    big = 0xFFFFFFFF
    for name, proc, args in (
        ("READDIR", 16, opaque(dirfh) + struct.pack(">Q", 0) + b"\0" * 8 + struct.pack(">I", big)),
        ("READDIRPLUS", 17, opaque(dirfh) + struct.pack(">Q", 0) + b"\0" * 8 + struct.pack(">II", big, big)),
    ):
        r = Rpc(host, timeout=30)
        r.send_record(call_record(r, NFS, 3, proc, args))
        rep = r.recv_record()
        (vlen,) = struct.unpack(">I", rep[16:20])
        off = 20 + vlen + (-vlen % 4)
        accept, st = struct.unpack(">II", rep[off:off + 8])
        assert accept == 0 and st == 0, f"{name}: accept_stat {accept}, {ERRNAMES.get(st, st)}"
        body = rep[off + 4:]
        o = skip_post_op_attr(body, 4) + 8
        entries = 0
        while True:
            more, o = u32(body, o)
            if not more:
                break
            _fileid, o = u64(body, o)
            _name, o = take_opaque(body, o)
            _cookie, o = u64(body, o)
            if proc == 17:
                o = skip_post_op_attr(body, o)
                has_fh, o = u32(body, o)
                if has_fh:
                    _fh, o = take_opaque(body, o)
            entries += 1
        eof, o = u32(body, o)
        print(f"readdircap: {name} asking 4 GiB: reply of {len(rep)} bytes, {entries} entries, eof {eof}")
        assert len(rep) <= limit, f"{name} reply of {len(rep)} bytes (limit {limit})"
        assert not eof, f"{name} listed the whole directory in one reply; the test needs one larger than {limit}"


def rofs(host, export, dirfh, fh):
    """Every change procedure on a read-only export answers NFS3ERR_ROFS."""
    sattr_mode = struct.pack(">IIIIIII", 1, 0o600, 0, 0, 0, 0, 0)  # mode set; uid gid size atime mtime not
    name = lambda n: opaque(n.encode())
    cases = [
        ("SETATTR", 2, opaque(fh) + sattr_mode + struct.pack(">I", 0)),
        ("WRITE", 7, opaque(fh) + struct.pack(">QII", 0, 4, 2) + opaque(b"abcd")),
        ("CREATE", 8, opaque(dirfh) + name("ro-new") + struct.pack(">I", 0) + sattr_mode),
        ("MKDIR", 9, opaque(dirfh) + name("ro-dir") + sattr_mode),
        ("SYMLINK", 10, opaque(dirfh) + name("ro-link") + struct.pack(">IIIIII", 0, 0, 0, 0, 0, 0) + name("x")),
        ("REMOVE", 12, opaque(dirfh) + name("one.bin")),
        ("RMDIR", 13, opaque(dirfh) + name("big")),
        ("RENAME", 14, opaque(dirfh) + name("one.bin") + opaque(dirfh) + name("ro-renamed")),
    ]
    for what, proc, args in cases:
        accept, body = Rpc(host).call_raw(NFS, 3, proc, args)
        assert accept == 0, f"{what}: accept_stat {accept}"
        (st,) = struct.unpack(">I", body[:4])
        assert st == 30, f"{what} on a read-only export answered {ERRNAMES.get(st, st)}, want NFS3ERR_ROFS"
        print(f"  {what}: NFS3ERR_ROFS")
    print(f"rofs: {len(cases)} change procedures refused with NFS3ERR_ROFS")


def refused(host, port=PORT, call=None):
    """The server closes a new connection without answering (allow-list, connection cap)."""
    try:
        r = Rpc(host, port, timeout=10)
        r.send_record(call or call_record(r, NFS, 3, 0, b""))
        got = r.s.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        got = b""
    except socket.timeout:
        raise AssertionError("the connection was neither answered nor closed in 10 s")
    assert got == b"", f"the server answered ({len(got)} bytes)"
    print("refused: dropped without an answer")


def pmap_refused(host):
    call = struct.pack(">IIIIII", 78, 0, 2, 100000, 2, 3) + struct.pack(">IIII", 0, 0, 0, 0)
    call += struct.pack(">IIII", NFS, 3, 6, 0)
    refused(host, 111, call)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if os.environ.get("NFS_SRC"):
        s.bind((os.environ["NFS_SRC"], 0))
    s.settimeout(3)
    s.sendto(call, (host, 111))
    try:
        r, _ = s.recvfrom(4096)
    except socket.timeout:
        print("pmap_refused: TCP dropped, UDP unanswered")
        return
    raise AssertionError(f"the portmapper answered a refused peer over UDP ({len(r)} bytes)")


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 1
    cmd, host = argv[0], argv[1]
    a = argv[2:]
    try:
        if cmd == "lookup":
            print(resolve(host, a[0], a[1]).hex())
        elif cmd == "getattr":
            print("size", getattr_size(Rpc(host), bytes.fromhex(a[0])))
        elif cmd == "read":
            fh, off, count, out = bytes.fromhex(a[0]), int(a[1]), int(a[2]), a[3]
            rpc, buf = Rpc(host), b""
            while len(buf) < count:
                data, eof = read(rpc, fh, off + len(buf), min(1 << 20, count - len(buf)))
                buf += data
                if eof or not data:
                    break
            open(out, "wb").write(buf)
        elif cmd == "write":
            fh, off, data = bytes.fromhex(a[0]), int(a[1]), open(a[2], "rb").read()
            stable = {"unstable": 0, "file_sync": 2}[a[3]]
            rpc, done, committed, verf = Rpc(host), 0, 2, b""
            while done < len(data):
                piece = data[done:done + (1 << 20)]
                n, c, verf = write(rpc, fh, off + done, piece, stable)
                assert n == len(piece), f"short write {n}"
                if stable == 2:
                    assert c == 2, f"FILE_SYNC write answered {c}"
                committed = min(committed, c)
                done += n
            print({0: "unstable", 1: "data_sync", 2: "file_sync"}[committed], verf.hex())
        elif cmd == "commit":
            print(commit(Rpc(host), bytes.fromhex(a[0])).hex())
        elif cmd == "remove":
            remove(Rpc(host), bytes.fromhex(a[0]), a[1])
        elif cmd == "create":
            print(create(Rpc(host), bytes.fromhex(a[0]), a[1]).hex())
        elif cmd == "mkdir":
            print(mkdir(Rpc(host), bytes.fromhex(a[0]), a[1]).hex())
        elif cmd == "rename":
            rename(Rpc(host), bytes.fromhex(a[0]), a[1], bytes.fromhex(a[2]), a[3])
        elif cmd == "symlink":
            print(symlink(Rpc(host), bytes.fromhex(a[0]), a[1], a[2]))
        elif cmd == "setattr":
            setattr(Rpc(host), bytes.fromhex(a[0]), None if a[1] == "-" else int(a[1]),
                    None if a[2] == "-" else int(a[2]))
        elif cmd == "excl":
            print(create_exclusive(Rpc(host), bytes.fromhex(a[0]), a[1], bytes.fromhex(a[2])).hex())
        elif cmd == "fsstat":
            print(*fsstat(Rpc(host), bytes.fromhex(a[0])))
        elif cmd == "fsinfo":
            print(*fsinfo(Rpc(host), bytes.fromhex(a[0])))
        elif cmd == "listdir":
            pause = os.environ.get("PAUSE_AT")
            pages = listdir(Rpc(host), bytes.fromhex(a[0]), int(a[1]), a[2], int(pause) if pause else None)
            print("pages", pages)
        elif cmd == "pmap":
            print(*(pmap_getport(host, False) + pmap_getport(host, True)))
        elif cmd == "hostile":
            hostile(host, a[0])
        elif cmd == "pipeline":
            pipeline(host, bytes.fromhex(a[0]), int(a[1]))
        elif cmd == "slowreader":
            slow_reader(host, bytes.fromhex(a[0]), int(a[1]), float(a[2]), int(a[3]),
                        conns=int(a[4]) if len(a) > 4 else 1)
        elif cmd == "conncap":
            conn_cap(host, int(a[0]), int(a[1]), int(a[2]) if len(a) > 2 else PORT)
        elif cmd == "idle":
            idle(host, float(a[0]))
        elif cmd == "readdircap":
            readdir_cap(host, bytes.fromhex(a[0]), int(a[1]))
        elif cmd == "rofs":
            rofs(host, a[0], bytes.fromhex(a[1]), bytes.fromhex(a[2]))
        elif cmd == "refused":
            refused(host, int(a[0]) if a else PORT)
        elif cmd == "pmap_refused":
            pmap_refused(host)
        else:
            print(__doc__)
            return 1
    except NfsError as e:
        print(str(e))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
