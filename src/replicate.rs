//! Network replication: `tessera replicate PATH --to HOST:PORT` (the sender) and `tessera serve
//! --replication ADDR` (the receiver), over TCP.
//!
//! A session: the sender says which path it replicates (a JSON line); the receiver answers with
//! the snapshots of that path it holds. The sender picks the newest snapshot both hold as the
//! base and sends a new replication snapshot (`repl-<time>`) as a stream (`crate::fs::stream`)
//! from that base. Before the chunks of each batch of entries it asks which of them the
//! receiver already holds, from any VM (`Have`); the receiver answers (a JSON line of hex bits)
//! and holds those, so only data new to the target datastore crosses the wire. The receiver
//! ends with a JSON line: its report or an error.
//!
//! Resumable: a replication snapshot the receiver does not hold yet is sent again by the next
//! run (not a new one), and the receiver keeps what a cut session had received (see
//! `crate::fs::receive`), answering `Have` for it: after a cut connection or a kill -9 of
//! either side, only the chunks of the record in flight cross twice.
//!
//! No encryption or authentication: an allow-list of client addresses, loopback by default;
//! across an untrusted network, run it through ssh or a VPN (README).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::allow::AllowList;
use crate::fs::receive::ReceiveReport;
use crate::fs::send::SendReport;
use crate::fs::snapshot::SnapshotInfo;
use crate::fs::{Engine, FsError, FsResult};

/// Protocol version in the hello.
const VERSION: u32 = 1;
/// Sessions received at once; more are refused (and retried by their sender).
const MAX_SESSIONS: usize = 4;
/// How long either side waits for the other before giving up the session.
const STALL: Duration = Duration::from_secs(120);
/// Name prefix of the snapshots replication takes.
pub const REPL_PREFIX: &str = "repl-";
/// Replication snapshots a receiver keeps per path (points in time to fail over to).
pub const KEEP_POINTS: usize = 24;

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    /// The path being replicated, and where the receiver should put it (default: the same).
    path: String,
    target: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    ok: bool,
    #[serde(default)]
    error: String,
    #[serde(default)]
    snapshots: Vec<SnapshotInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Held {
    have: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    ok: bool,
    #[serde(default)]
    error: String,
    result: Option<ReceiveReport>,
}

/// What a replication run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicateReport {
    pub path: String,
    pub to: String,
    pub snapshot: String,
    /// The base it was sent from (`None`: a full send).
    pub base: Option<String>,
    /// A snapshot a cut run had left unconfirmed, sent again.
    pub resumed: bool,
    pub sent: SendReport,
    pub received: ReceiveReport,
    pub seconds: f64,
}

fn line<T: Serialize>(s: &mut impl Write, v: &T) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(v)?;
    b.push(b'\n');
    s.write_all(&b)?;
    s.flush()
}

fn read_line<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> FsResult<T> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        return Err(FsError::StreamCut(
            "the other side closed the connection: replication cut".into(),
        ));
    }
    if l.len() > 1 << 20 {
        return Err(FsError::Stream("an answer too long".into()));
    }
    serde_json::from_str(&l).map_err(|e| FsError::Stream(format!("a bad answer: {e}")))
}

fn hex_bits(bits: &[bool]) -> String {
    bits.chunks(4)
        .map(|c| {
            let v = c
                .iter()
                .enumerate()
                .fold(0u8, |a, (i, b)| a | (u8::from(*b) << i));
            char::from_digit(u32::from(v), 16).expect("nibble")
        })
        .collect()
}

fn unhex_bits(s: &str, n: usize) -> Option<Vec<bool>> {
    let mut out = Vec::with_capacity(n);
    for ch in s.chars() {
        let v = ch.to_digit(16)?;
        for i in 0..4 {
            out.push(v >> i & 1 == 1);
        }
    }
    (out.len() >= n && out.len() < n + 4).then(|| {
        out.truncate(n);
        out
    })
}

/// Serve replication sessions on `addr` until the process exits.
pub fn serve(
    engine: Arc<Engine>,
    addr: SocketAddr,
    allow: AllowList,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    if allow.0.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!("replication: receiving from every host that can reach {addr}; restrict with --allow NET");
    }
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("tessera-repl".into())
        .spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                let peer = s
                    .peer_addr()
                    .map(|p| p.ip())
                    .unwrap_or(IpAddr::from([0, 0, 0, 0]));
                if !allow.allows(peer) {
                    tracing::warn!("replication: refused {peer}: not in --allow");
                    continue;
                }
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let mut s = s;
                    let _ = line(
                        &mut s,
                        &Welcome {
                            ok: false,
                            error: "busy: retry later".into(),
                            snapshots: Vec::new(),
                        },
                    );
                    continue;
                }
                let (engine, busy) = (engine.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("tessera-repl-in".into())
                    .spawn(move || {
                        if let Err(e) = session(&engine, s) {
                            tracing::warn!("replication from {peer} failed: {e}");
                        }
                        busy.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("replication: cannot start a thread");
                }
            }
        })?;
    Ok(local)
}

/// One session, receiving side.
fn session(engine: &Engine, s: TcpStream) -> FsResult<()> {
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    s.set_nodelay(true)?;
    let mut out = s.try_clone()?;
    let mut inp = BufReader::with_capacity(1 << 20, s);
    let hello: Hello = read_line(&mut inp)?;
    if hello.version != VERSION {
        line(&mut out, &Welcome { ok: false, error: format!("protocol version {} is not supported (this receiver speaks {VERSION}): use the same Tessera version on both sides", hello.version), snapshots: Vec::new() })?;
        return Ok(());
    }
    let target = hello.target.clone().unwrap_or(hello.path.clone());
    let snapshots = engine.snapshot_list(Some(&target))?;
    line(
        &mut out,
        &Welcome {
            ok: true,
            error: String::new(),
            snapshots,
        },
    )?;
    let mut answer = |bits: &[bool]| -> FsResult<()> {
        line(
            &mut out.try_clone()?,
            &Held {
                have: hex_bits(bits),
            },
        )?;
        Ok(())
    };
    let r = engine.receive_with(
        Box::new(inp),
        Some(&target),
        false,
        Some(&mut answer),
        &|_, _| {},
    );
    let done = match r {
        Ok(rep) => {
            let name = rep
                .snapshot
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            tracing::info!(path = %rep.path, snapshot = %name, chunks = rep.chunks, "replica received");
            if name.starts_with(REPL_PREFIX) {
                prune_points(engine, &target, KEEP_POINTS);
            }
            Done {
                ok: true,
                error: String::new(),
                result: Some(rep),
            }
        }
        Err(e) => Done {
            ok: false,
            error: e.to_string(),
            result: None,
        },
    };
    line(&mut out, &done)?;
    // Ends the stream's reader thread, which may still wait for input.
    let _ = out.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// Keep the newest `keep` replication snapshots of `path`.
fn prune_points(engine: &Engine, path: &str, keep: usize) {
    let Ok(list) = engine.snapshot_list(Some(path)) else {
        return;
    };
    let mut points: Vec<_> = list
        .into_iter()
        .filter(|s| s.name.starts_with(REPL_PREFIX))
        .collect();
    points.sort_by_key(|s| std::cmp::Reverse(s.created));
    for s in points.into_iter().skip(keep) {
        if let Err(e) = engine.snapshot_delete(&s.path, &s.name) {
            tracing::warn!("cannot prune replication point {}@{}: {e}", s.path, s.name);
        }
    }
}

/// Writes at most `rate` bytes per second (none: unlimited).
struct Paced<W: Write> {
    inner: W,
    rate: Option<u64>,
    start: Instant,
    written: u64,
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.written += n as u64;
        if let Some(r) = self.rate {
            let due = Duration::from_secs_f64(self.written as f64 / r as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Options of one replication run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Where the receiver puts it (default: the same path).
    pub target: Option<String>,
    /// Bytes per second at most.
    pub max_rate: Option<u64>,
}

/// Replicate `path` (a file or VM folder of `engine`'s datastore) to the receiver at `to`:
/// a new replication snapshot (or the one a cut run left), sent from the newest snapshot both
/// sides hold, with only chunks new to the target crossing. `progress(entries done, entries)`.
pub fn replicate(
    engine: &Engine,
    path: &str,
    to: &str,
    o: &Options,
    progress: &dyn Fn(u64, u64),
) -> FsResult<ReplicateReport> {
    let t0 = Instant::now();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(to)
        .map_err(|e| FsError::Stream(format!("{to}: {e}")))?
        .next()
        .ok_or_else(|| FsError::Stream(format!("{to}: no address")))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| FsError::Stream(format!("cannot reach the receiver at {to}: {e} (is `tessera serve --replication` running there?)")))?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    s.set_nodelay(true)?;
    let mut inp = BufReader::new(s.try_clone()?);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, s.try_clone()?);
    let p = crate::fs::snapshot::norm(path)?;
    line(
        &mut out,
        &Hello {
            version: VERSION,
            path: format!("/{p}"),
            target: o.target.clone(),
        },
    )?;
    let w: Welcome = read_line(&mut inp)?;
    if !w.ok {
        return Err(FsError::Stream(format!(
            "the receiver refused: {}",
            w.error
        )));
    }
    let theirs: std::collections::HashSet<(String, u64)> = w
        .snapshots
        .iter()
        .map(|s| (s.name.clone(), s.created))
        .collect();
    let mine = engine.snapshot_list(Some(&p))?;
    let base = mine
        .iter()
        .filter(|s| theirs.contains(&(s.name.clone(), s.created)))
        .max_by_key(|s| (s.created, s.name.clone()))
        .cloned();
    // A replication snapshot newer than the base that the receiver lacks: a cut run's; send it
    // again (the receiver kept what arrived).
    let pending = mine
        .iter()
        .filter(|s| {
            s.name.starts_with(REPL_PREFIX) && !theirs.contains(&(s.name.clone(), s.created))
        })
        .filter(|s| {
            base.as_ref()
                .is_none_or(|b| (s.created, &s.name) > (b.created, &b.name))
        })
        .max_by_key(|s| (s.created, s.name.clone()))
        .cloned();
    let resumed = pending.is_some();
    let snap = match pending {
        Some(s) => s,
        None => {
            let now = crate::fs::inode::Time::now().secs.max(0) as u64;
            let mut name = format!("{REPL_PREFIX}{}", crate::fs::snapshot::default_name(now));
            // Two runs in one second: the name is taken.
            if mine.iter().any(|s| s.name == name) {
                name = format!("{name}-{}", mine.len());
            }
            engine.snapshot_create(&p, Some(&name))?
        }
    };
    let mut paced = Paced {
        inner: &mut out,
        rate: o.max_rate,
        start: Instant::now(),
        written: 0,
    };
    let mut ask = |n: usize| -> FsResult<Vec<bool>> {
        let h: Held = read_line(&mut inp)?;
        unhex_bits(&h.have, n)
            .ok_or_else(|| FsError::Stream("a bad answer to a chunk query".into()))
    };
    let sent = {
        let mut w: &mut dyn Write = &mut paced;
        engine.send(
            &p,
            &snap.name,
            base.as_ref().map(|b| b.name.as_str()),
            &mut w,
            Some(&mut ask),
            progress,
        )?
    };
    out.flush()?;
    let done: Done = read_line(&mut inp)?;
    if !done.ok {
        return Err(FsError::Stream(format!(
            "the receiver failed: {}",
            done.error
        )));
    }
    // The new base is confirmed: older replication snapshots here are not needed any more.
    for s in engine.snapshot_list(Some(&p))? {
        if s.name.starts_with(REPL_PREFIX) && s.name != snap.name {
            engine.snapshot_delete(&p, &s.name)?;
        }
    }
    Ok(ReplicateReport {
        path: format!("/{p}"),
        to: to.to_string(),
        snapshot: snap.name,
        base: base.map(|b| b.name),
        resumed,
        sent,
        received: done.result.unwrap_or_default(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// [`replicate`], with its outcome recorded for `tessera stats` and the schedule.
pub fn run(
    engine: &Engine,
    path: &str,
    to: &str,
    o: &Options,
    progress: &dyn Fn(u64, u64),
) -> FsResult<ReplicateReport> {
    let r = replicate(engine, path, to, o, progress);
    let outcome = match &r {
        Ok(rep) => Ok((
            rep.received.snapshot.as_ref().map_or(0, |s| s.created),
            rep.sent.stream_bytes,
        )),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = engine.record_replication(path, to, outcome) {
        tracing::warn!("cannot record the replication of {path}: {e}");
    }
    r
}

/// Run the replication schedules (`tessera replicate --every`) every `interval` while
/// serving: a path is replicated once its newest replicated point is `every` old, and retried
/// a minute after a failure. Holds no strong reference while waiting.
pub fn spawn_scheduler(engine: &Arc<Engine>, interval: Duration) -> std::thread::JoinHandle<()> {
    engine.spawn_periodic("tessera-repl-sched", interval, |e| {
        let Ok(all) = e.replication_state() else { return };
        let now = crate::fs::inode::Time::now().secs.max(0) as u64;
        for s in all.into_iter().filter(|s| s.every > 0) {
            let due = s.last_point == 0 || now >= s.last_point + s.every;
            let backoff = s.last_error_at > 0 && now < s.last_error_at + 60;
            if !due || backoff {
                continue;
            }
            let o = Options {
                target: None,
                max_rate: (s.max_rate > 0).then_some(s.max_rate),
            };
            match run(e, &s.path, &s.to, &o, &|_, _| {}) {
                Ok(r) => tracing::info!(
                    path = %s.path, to = %s.to, snapshot = %r.snapshot,
                    "replicated: {} chunks, {} bytes sent, {} chunks the receiver held",
                    r.sent.chunks, r.sent.stream_bytes, r.sent.chunks_held_by_receiver
                ),
                Err(err) => tracing::warn!(path = %s.path, to = %s.to, "replication failed (retried in a minute): {err}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::dir::Ctx;
    use crate::fs::{Format, InodeId, Kind};
    use crate::store::pack::MemPackIo;
    use std::io::Read;

    const C: usize = 4096;

    fn engine() -> Arc<Engine> {
        Arc::new(
            Engine::in_memory(
                Format {
                    chunk_size: C as u32,
                    zstd_level: 1,
                },
                Arc::new(MemPackIo::default()),
            )
            .unwrap(),
        )
    }

    /// Half-compressible, distinct per seed and chunk.
    fn data(seed: u64, chunks: usize) -> Vec<u8> {
        let mut v = crate::fs::testutil::unique_data(seed, chunks, C);
        for (i, b) in v.iter_mut().enumerate() {
            if i % 2 == 0 {
                *b = 0;
            }
        }
        v
    }

    fn read(e: &Engine, path: &str) -> Vec<u8> {
        let i = e.resolve(path.as_bytes()).unwrap();
        let size = e.getattr(i).unwrap().inode.size;
        e.read(i, 0, size as u32).unwrap()
    }

    fn receiver() -> (Arc<Engine>, String) {
        let b = engine();
        let addr = serve(
            b.clone(),
            "127.0.0.1:0".parse().unwrap(),
            AllowList(Vec::new()),
        )
        .unwrap();
        (b, addr.to_string())
    }

    fn clean(e: &Engine) {
        let r = e.fsck(&|_, _| {}).unwrap();
        assert!(r.problems.is_empty(), "fsck: {:#?}", r.problems);
    }

    /// Protects the figure: 50 clones of a golden image replicated, then 1 % of the
    /// blocks changed in 10 of them: the incremental run sends at most 1.1x the compressed
    /// size of the chunks new to the target (plus a small overhead per file), and the target's
    /// files are byte-identical. A second site that holds the golden image receives a new VM
    /// made from it with no chunk data at all.
    #[test]
    fn only_data_new_to_the_target_crosses() {
        let a = engine();
        let (b, to) = receiver();
        let golden = data(1, 256);
        a.mkdir(InodeId::ROOT, b"pool", 0o755, Ctx::ROOT).unwrap();
        let pool = a.resolve(b"pool").unwrap();
        let g = a
            .mknod(pool, b"golden.raw", Kind::File, 0o644, 0, Ctx::ROOT)
            .unwrap()
            .ino;
        a.write(g, 0, &golden).unwrap();
        let dsts: Vec<Vec<u8>> = (0..50)
            .map(|n| format!("/pool/desk-{n:02}.raw").into_bytes())
            .collect();
        a.clone_paths(b"/pool/golden.raw", &dsts).unwrap();
        let r1 = replicate(&a, "/pool", &to, &Options::default(), &|_, _| {}).unwrap();
        assert!(r1.base.is_none());
        assert_eq!(r1.sent.chunks, 256, "each chunk once: {:?}", r1.sent);
        // Clones go as references to the first file's map: one map, not 51.
        assert!(
            r1.sent.stream_bytes <= r1.sent.chunk_bytes + 256 * 41 + 51 * 512 + 16 * 1024,
            "{:?}",
            r1.sent
        );
        // 1 % of the blocks (3 of 256) in 10 desktops.
        let mut new_bytes = 0u64;
        for n in 0..10 {
            let d = a
                .resolve(format!("pool/desk-{n:02}.raw").as_bytes())
                .unwrap();
            for k in 0..3u64 {
                let blk = data(1000 + n * 10 + k, 1);
                new_bytes += zstd::bulk::compress(&blk, 1).unwrap().len().min(C) as u64;
                a.write(d, (k * 80 + n) * C as u64, &blk).unwrap();
            }
        }
        let r2 = replicate(&a, "/pool", &to, &Options::default(), &|_, _| {}).unwrap();
        assert_eq!(r2.base.as_deref(), Some(r1.snapshot.as_str()));
        assert_eq!(r2.sent.chunks, 30);
        assert!(
            r2.sent.chunk_bytes <= new_bytes * 11 / 10,
            "sent {} B of chunks for {new_bytes} B new",
            r2.sent.chunk_bytes
        );
        // Overhead: entries and maps of 51 files, at most 1 KiB each beyond the chunks.
        assert!(
            r2.sent.stream_bytes <= r2.sent.chunk_bytes + 51 * 1024,
            "{:?}",
            r2.sent
        );
        for n in [0, 9, 10, 49] {
            let p = format!("pool/desk-{n:02}.raw");
            assert!(read(&a, &p) == read(&b, &p), "{p} differs");
        }
        // Only the newest replication point is kept on the sender.
        let points: Vec<String> = a
            .snapshot_list(Some("/pool"))
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(points, std::slice::from_ref(&r2.snapshot));

        // A new VM from the golden image: the target holds every chunk already.
        a.mkdir(InodeId::ROOT, b"vms", 0o755, Ctx::ROOT).unwrap();
        a.clone_paths(b"/pool/golden.raw", &[b"/vms/new.raw".to_vec()])
            .unwrap();
        let r3 = replicate(&a, "/vms", &to, &Options::default(), &|_, _| {}).unwrap();
        assert_eq!(r3.sent.chunks, 0, "{:?}", r3.sent);
        assert_eq!(r3.sent.chunks_held_by_receiver, 256);
        assert!(r3.sent.stream_bytes < 64 * 1024, "{:?}", r3.sent);
        assert!(read(&b, "vms/new.raw") == golden);
        clean(&a);
        clean(&b);
    }

    /// Protects resumability: a connection cut in the middle (by a proxy that stops forwarding
    /// after some bytes) fails the run; the next run sends the same snapshot again, the receiver
    /// answers that it holds what arrived, and only the rest (plus at most the record in flight)
    /// crosses; both sides end identical and fsck clean.
    #[test]
    fn a_cut_run_resumes_where_it_stopped() {
        let a = engine();
        let (b, to) = receiver();
        a.mkdir(InodeId::ROOT, b"vm", 0o755, Ctx::ROOT).unwrap();
        let vm = a.resolve(b"vm").unwrap();
        let f = a
            .mknod(vm, b"disk", Kind::File, 0o644, 0, Ctx::ROOT)
            .unwrap()
            .ino;
        let disk = data(7, 4096); // 16 MiB, ~8 MiB stored: two or three 4 MiB records
        a.write(f, 0, &disk).unwrap();
        // A proxy that forwards 5 MiB towards the receiver, then cuts both ways.
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let paddr = proxy.local_addr().unwrap().to_string();
        let upstream = to.clone();
        std::thread::spawn(move || {
            let (c, _) = proxy.accept().unwrap();
            let u = TcpStream::connect(&upstream).unwrap();
            let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
            });
            let mut left = 5u64 << 20;
            let mut buf = vec![0u8; 64 << 10];
            let mut c = c;
            let mut u = u;
            while left > 0 {
                let n = match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n.min(left as usize),
                };
                if u.write_all(&buf[..n]).is_err() {
                    break;
                }
                left -= n as u64;
            }
            let _ = u.shutdown(std::net::Shutdown::Both);
            let _ = c.shutdown(std::net::Shutdown::Both);
        });
        let e = replicate(&a, "/vm", &paddr, &Options::default(), &|_, _| {}).unwrap_err();
        assert!(matches!(e, FsError::StreamCut(_) | FsError::Io(_)), "{e}");
        assert!(b.resolve(b"vm").is_err(), "a cut run left a replica");
        let r = replicate(&a, "/vm", &to, &Options::default(), &|_, _| {}).unwrap();
        assert!(r.resumed, "{r:?}");
        let total = r.sent.chunks + r.sent.chunks_held_by_receiver;
        assert_eq!(total, 4096);
        assert!(
            r.sent.chunks_held_by_receiver > 0,
            "nothing kept from the cut run: {r:?}"
        );
        assert!(read(&b, "vm/disk") == disk);
        clean(&a);
        clean(&b);
    }

    #[test]
    fn bits_roundtrip() {
        for n in 0..20 {
            let b: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
            assert_eq!(unhex_bits(&hex_bits(&b), n), Some(b));
        }
        assert_eq!(unhex_bits("zz", 2), None);
    }
}
