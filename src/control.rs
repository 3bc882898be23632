//! The datastore lock and the control socket.
//!
//! One process owns a datastore at a time: it holds an exclusive `flock` on `DS/lock` (with
//! its pid written inside, for messages). A serving process also listens on the Unix socket
//! `DS/control.sock`; the CLI sends it one JSON request per connection and reads one JSON
//! response, so `tessera clone` and `tessera stats` work while the datastore is mounted.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fs::clone::CloneError;
use crate::fs::Engine;

pub const LOCK_FILE: &str = "lock";
pub const SOCKET_FILE: &str = "control.sock";
/// Longest request accepted on the socket (bytes): 1000 destination paths fit easily.
const MAX_REQUEST: u64 = 16 << 20;

/// Exclusive ownership of a datastore, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DatastoreLock {
    _file: File,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("datastore is in use by process {0}")]
    Busy(String),
    #[error("cannot open the datastore lock: {0}")]
    Io(#[from] io::Error),
}

/// Take the datastore's lock without waiting. The owner of the lock also makes the datastore
/// private if it is not yet (see [`crate::private::tighten_datastore`]).
pub fn lock(dir: &Path) -> Result<DatastoreLock, LockError> {
    let mut f = crate::private::open_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))?;
    match f.try_lock() {
        Ok(()) => {
            f.set_len(0)?;
            write!(f, "{}", std::process::id())?;
            crate::private::tighten_datastore(dir, crate::fs::PACK_DIR);
            Ok(DatastoreLock { _file: f })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            Err(LockError::Busy(if pid.trim().is_empty() {
                "?".into()
            } else {
                pid.trim().to_string()
            }))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// A request to the serving process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Verify every chunk.
    Scrub {
        /// MiB per second at most (0: unlimited).
        #[serde(default)]
        max_rate_mib: u64,
    },
    /// Clone `src` to every path in `dsts` (paths inside the datastore).
    Clone {
        src: String,
        dsts: Vec<String>,
    },
    Stats,
    /// Space accounting of a file or folder (a path inside the datastore).
    Du {
        path: String,
    },
    /// Load the chunks of a file or folder (a path inside the datastore) into the read cache.
    Warm {
        path: String,
    },
    /// Write snapshot `snap` of `path` as a replication stream (`crate::fs::send`), raw on the
    /// connection, then the answer line. An error before the stream starts is the answer alone.
    Send {
        path: String,
        snap: String,
        from: Option<String>,
    },
    /// Read a replication stream from the connection, raw after the request line, into
    /// `target` (`crate::fs::receive`); progress lines, then the answer.
    Receive {
        target: Option<String>,
        #[serde(default)]
        force: bool,
    },
    /// Replicate `path` to the receiver at `to` now (`crate::replicate`).
    Replicate {
        path: String,
        to: String,
        target: Option<String>,
        #[serde(default)]
        max_rate_mib: u64,
    },
    /// Set the replication schedule of `path` (`every` seconds), or remove it (`every: None`).
    ReplicateSchedule {
        path: String,
        to: String,
        every: Option<u64>,
        #[serde(default)]
        max_rate_mib: u64,
    },
    /// Make a replica writable (failover).
    Promote {
        path: String,
    },
    /// A snapshot command (`crate::fs::snapshot`).
    Snapshot {
        action: crate::fs::snapshot::SnapAction,
    },
    /// Compact packs whose live share is below `min_live`.
    Gc {
        min_live: f64,
        /// MiB per second at most (0: unlimited).
        #[serde(default)]
        max_rate_mib: u64,
    },
}

/// The answer: `ok` with a result, or an error with a kind the CLI can act on.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default)]
    pub error: String,
}

/// How often a long request reports progress (`{"progress":[done,total]}` lines before the
/// answer): often enough for a progress bar, rarely enough to cost nothing.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A progress line, sent before the answer of a long request.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    progress: (u64, u64),
}

fn handle(engine: &Engine, req: Request, progress: &dyn Fn(u64, u64)) -> Response {
    let ok = |v| Response {
        ok: true,
        result: v,
        error: String::new(),
    };
    let err = |e: String| Response {
        ok: false,
        result: serde_json::Value::Null,
        error: e,
    };
    match req {
        Request::Ping => ok(serde_json::json!({"pid": std::process::id()})),
        Request::Stats => match engine.stats() {
            Ok(s) => ok(serde_json::to_value(s).unwrap_or_default()),
            Err(e) => err(e.to_string()),
        },
        Request::Du { path } => match engine.du(&path) {
            Ok(u) => ok(serde_json::to_value(u).unwrap_or_default()),
            Err(e) => err(format!("{path}: {e}")),
        },
        Request::Warm { path } => match engine.warm(&path, progress) {
            Ok(r) => ok(serde_json::to_value(r).unwrap_or_default()),
            Err(e) => err(format!("{path}: {e}")),
        },
        Request::Scrub { max_rate_mib } => {
            match engine.scrub_paced((max_rate_mib > 0).then_some(max_rate_mib << 20), progress) {
                Ok(r) => ok(serde_json::to_value(r).unwrap_or_default()),
                Err(e) => err(format!("scrub failed: {e}")),
            }
        }
        Request::Gc {
            min_live,
            max_rate_mib,
        } => match engine.gc_paced(
            min_live,
            (max_rate_mib > 0).then_some(max_rate_mib << 20),
            progress,
        ) {
            Ok(r) => ok(serde_json::to_value(r).unwrap_or_default()),
            Err(e) => err(format!("gc failed: {e}")),
        },
        Request::Replicate {
            path,
            to,
            target,
            max_rate_mib,
        } => {
            let o = crate::replicate::Options {
                target,
                max_rate: (max_rate_mib > 0).then_some(max_rate_mib << 20),
            };
            match crate::replicate::run(engine, &path, &to, &o, progress) {
                Ok(r) => ok(serde_json::to_value(r).unwrap_or_default()),
                Err(e) => err(format!("replication of {path} to {to} failed: {e}")),
            }
        }
        Request::ReplicateSchedule {
            path,
            to,
            every,
            max_rate_mib,
        } => {
            let r = match every {
                Some(every) => engine.resolve(path.as_bytes()).and_then(|_| {
                    engine.update_replication(&path, |s| {
                        s.to = to.clone();
                        s.every = every;
                        s.max_rate = max_rate_mib << 20;
                    })
                }),
                None => engine.forget_replication(&path),
            };
            match r {
                Ok(()) => ok(serde_json::Value::Null),
                Err(e) => err(format!("{path}: {e}")),
            }
        }
        Request::Promote { path } => match engine.promote(&path) {
            Ok(n) => ok(serde_json::json!({ "inodes": n })),
            Err(e) => err(format!("{path}: {e}")),
        },
        // Streams are served by `serve_one` itself.
        Request::Send { .. } | Request::Receive { .. } => {
            err("a stream request cannot be nested".into())
        }
        Request::Snapshot { action } => match engine.snapshot_action(&action) {
            Ok(v) => ok(v),
            Err(e) => err(e.to_string()),
        },
        Request::Clone { src, dsts } => {
            let dsts: Vec<Vec<u8>> = dsts.into_iter().map(String::into_bytes).collect();
            match engine.clone_paths_progress(src.as_bytes(), &dsts, progress) {
                Ok(inos) => ok(serde_json::json!({"cloned": inos.len()})),
                Err(e @ CloneError::Fs(_)) => err(format!("clone failed: {e}")),
                Err(e) => err(e.to_string()),
            }
        }
    }
}

/// Limits of the control socket.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are answered "busy" and closed. Each holds a thread
    /// for as long as its request runs (a scrub or gc can take hours).
    pub max_conns: usize,
    /// Time a client has to send its whole request; an idle client cannot hold a slot.
    pub request_timeout: Duration,
    /// Time a client has to take the response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 16,
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The uid of the process at the other end of a Unix socket (SO_PEERCRED: the credentials it
/// had when it connected).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the life of `stream`; `cred` is a writable ucred and
    // `len` holds its exact size, which is what SO_PEERCRED fills in (and nothing more).
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Who may use the control socket: root, the owner of the datastore folder, and the user the
/// serving process runs as (who can read the datastore anyway).
pub fn peer_allowed(peer: u32, owner: u32, server: u32) -> bool {
    peer == 0 || peer == owner || peer == server
}

/// Answer with an error and close (refused or busy connections, on the accepting thread: the
/// answer is one short line, which fits in the socket buffer).
fn refuse(stream: &UnixStream, error: String) {
    let resp = Response {
        ok: false,
        result: serde_json::Value::Null,
        error,
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if let Ok(mut out) = serde_json::to_vec(&resp) {
        out.push(b'\n');
        let _ = (&*stream).write_all(&out);
    }
}

/// Read one request line, which must arrive whole within `timeout`; also returns the bytes
/// read past it (the start of a stream that follows a `Receive` request).
fn read_request(stream: &UnixStream, timeout: Duration) -> io::Result<(String, Vec<u8>)> {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.contains(&b'\n') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request not received in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(n) => n,
            // A signal is not the client's doing: keep waiting for the rest of its time.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() as u64 > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request too long",
            ));
        }
    }
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    let rest = buf.get(end + 1..).map(<[u8]>::to_vec).unwrap_or_default();
    buf.truncate(end);
    let line = String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((line, rest))
}

/// How long a stream may stall (the other end of the pipe not reading or not writing) before
/// the request is given up.
const STREAM_STALL: Duration = Duration::from_secs(600);

/// Counts what passes through to `inner`.
struct Counting<'a> {
    inner: std::io::BufWriter<&'a UnixStream>,
    written: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn answer(stream: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut out = serde_json::to_vec(resp)?;
    out.push(b'\n');
    (&*stream).write_all(&out)
}

fn serve_send(
    engine: &Engine,
    stream: &UnixStream,
    path: &str,
    snap: &str,
    from: Option<&str>,
) -> io::Result<()> {
    stream.set_write_timeout(Some(STREAM_STALL))?;
    let mut out = Counting {
        inner: std::io::BufWriter::with_capacity(1 << 20, stream),
        written: 0,
    };
    let r = engine.send(path, snap, from, &mut out, None, &|_, _| {});
    let written = out.written;
    let flushed = out.flush();
    drop(out);
    match r {
        Ok(rep) => {
            flushed?;
            answer(
                stream,
                &Response {
                    ok: true,
                    result: serde_json::to_value(rep).unwrap_or_default(),
                    error: String::new(),
                },
            )
        }
        // Nothing sent yet: the error is the answer. Mid-stream: closing the connection cuts
        // the stream, which the other end reports as such.
        Err(e) if written == 0 => answer(
            stream,
            &Response {
                ok: false,
                result: serde_json::Value::Null,
                error: format!("{path}@{snap}: {e}"),
            },
        ),
        Err(e) => Err(io::Error::other(format!(
            "send of {path}@{snap} stopped: {e}"
        ))),
    }
}

fn serve_one(engine: &Engine, stream: UnixStream, limits: &Limits) -> io::Result<()> {
    let (line, rest) = read_request(&stream, limits.request_timeout)?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    // Progress lines go out at most every PROGRESS_EVERY, and the last one always; once one
    // cannot be written (a client that does not read them), no more are tried, so the
    // request never waits on its client.
    let last = std::cell::Cell::new(None::<std::time::Instant>);
    let broken = std::cell::Cell::new(false);
    let progress = |done: u64, total: u64| {
        // total 0: a count with no known end (a stream being received), paced only by time.
        let due = (total > 0 && done >= total)
            || last.get().is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if broken.get() || !due {
            return;
        }
        last.set(Some(std::time::Instant::now()));
        let Ok(mut out) = serde_json::to_vec(&Progress {
            progress: (done, total),
        }) else {
            return;
        };
        out.push(b'\n');
        if (&stream).write_all(&out).is_err() {
            broken.set(true);
        }
    };
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Send { path, snap, from }) => {
            return serve_send(engine, &stream, &path, &snap, from.as_deref())
        }
        Ok(Request::Receive { target, force }) => {
            stream.set_read_timeout(Some(STREAM_STALL))?;
            let inp = std::io::Cursor::new(rest).chain(std::io::BufReader::with_capacity(
                1 << 20,
                stream.try_clone()?,
            ));
            let resp = match engine.receive(Box::new(inp), target.as_deref(), force, &progress) {
                Ok(rep) => Response {
                    ok: true,
                    result: serde_json::to_value(rep).unwrap_or_default(),
                    error: String::new(),
                },
                Err(e) => Response {
                    ok: false,
                    result: serde_json::Value::Null,
                    error: format!("receive failed: {e}"),
                },
            };
            let r = answer(&stream, &resp);
            // Ends the stream's reader thread, which may still wait for input.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return r;
        }
        Ok(req) => handle(engine, req, &progress),
        Err(e) => Response {
            ok: false,
            result: serde_json::Value::Null,
            error: format!("bad request: {e}"),
        },
    };
    answer(&stream, &resp)
}

/// One of the control socket's connection slots, given back when dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Listen on the datastore's control socket until the process exits.
pub fn serve(engine: Arc<Engine>, dir: &Path) -> io::Result<PathBuf> {
    serve_with(engine, dir, Limits::default())
}

/// `serve` with given limits (tests use small ones).
pub fn serve_with(engine: Arc<Engine>, dir: &Path, limits: Limits) -> io::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let path = dir.join(SOCKET_FILE);
    // A socket left by a dead process: we hold the lock, so nobody else is listening.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // bind() applies the umask; the folder is 0700, so nobody else could reach it meanwhile.
    std::fs::set_permissions(
        &path,
        std::fs::Permissions::from_mode(crate::private::FILE_MODE),
    )?;
    let owner = std::fs::metadata(dir)?.uid();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("tessera-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match peer_uid(&stream) {
                    Ok(uid) if peer_allowed(uid, owner, me) => {}
                    who => {
                        let who = match who {
                            Ok(uid) => format!("uid {uid}"),
                            Err(e) => format!("unknown user ({e})"),
                        };
                        tracing::warn!("control socket: refused {who}: not root nor the datastore's owner");
                        refuse(
                            &stream,
                            format!("permission denied: only root or the datastore's owner (uid {owner}) may use it"),
                        );
                        continue;
                    }
                }
                if busy.fetch_add(1, Ordering::SeqCst) >= limits.max_conns {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    refuse(
                        &stream,
                        format!("busy: {} control requests running; retry later", limits.max_conns),
                    );
                    continue;
                }
                let engine = engine.clone();
                // Gives the slot back when the connection ends, even by a panic.
                let slot = Slot(busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("tessera-ctl-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = serve_one(&engine, stream, &limits) {
                            tracing::warn!("control request failed: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("control socket: cannot start a thread: {e}");
                }
            }
        })?;
    Ok(path)
}

/// Send one request to the process serving `dir`.
pub fn call(dir: &Path, req: &Request, timeout: Duration) -> io::Result<Response> {
    call_with_progress(dir, req, timeout, &|_, _| {})
}

/// `call`, passing the progress a long request reports (gc, scrub, warm) to `progress(done,
/// total)`. `timeout` bounds the wait for each line, so a long request that reports progress
/// is not cut off.
pub fn call_with_progress(
    dir: &Path,
    req: &Request,
    timeout: Duration,
    progress: &dyn Fn(u64, u64),
) -> io::Result<Response> {
    let stream = UnixStream::connect(dir.join(SOCKET_FILE))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut msg = serde_json::to_vec(req)?;
    msg.push(b'\n');
    (&stream).write_all(&msg)?;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the serving process closed the connection without an answer",
            ));
        }
        if let Ok(p) = serde_json::from_str::<Progress>(&line) {
            progress(p.progress.0, p.progress.1);
            continue;
        }
        return serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
}

/// `Request::Send` to the process serving `dir`: the stream is copied to `out` as it comes,
/// then the answer is returned. A stream cut short is an error.
pub fn call_send(dir: &Path, req: &Request, out: &mut dyn Write) -> io::Result<Response> {
    use crate::fs::stream::MAGIC;
    let stream = UnixStream::connect(dir.join(SOCKET_FILE))?;
    stream.set_read_timeout(Some(STREAM_STALL))?;
    let mut msg = serde_json::to_vec(req)?;
    msg.push(b'\n');
    (&stream).write_all(&msg)?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, &stream);
    let cut = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the serving process stopped in the middle of the stream (see its log)",
        ),
        _ => e,
    };
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..])?;
        if n == 0 {
            break;
        }
        got += n;
        if !MAGIC.starts_with(&head[..got]) {
            break;
        }
    }
    if &head[..got] != MAGIC {
        // An answer instead of a stream: an error before anything was sent.
        let mut line = head[..got].to_vec();
        r.read_until(b'\n', &mut line)?;
        return serde_json::from_slice(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
    out.write_all(&head)?;
    let mut buf = Vec::new();
    loop {
        let mut fh = [0u8; 5];
        r.read_exact(&mut fh).map_err(cut)?;
        let len = u32::from_le_bytes(fh[1..].try_into().expect("4 bytes")) as usize;
        if len > crate::fs::stream::FRAME_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "damaged stream from the serving process",
            ));
        }
        buf.resize(len + 4, 0);
        r.read_exact(&mut buf).map_err(cut)?;
        out.write_all(&fh)?;
        out.write_all(&buf)?;
        if fh[0] == crate::fs::stream::Kind::End as u8 {
            break;
        }
    }
    out.flush()?;
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `Request::Receive` to the process serving `dir`, with the stream read from `inp`;
/// `progress(done, 0)` as the serving process reports it.
pub fn call_receive(
    dir: &Path,
    req: &Request,
    mut inp: Box<dyn Read + Send>,
    progress: &dyn Fn(u64, u64),
) -> io::Result<Response> {
    let stream = UnixStream::connect(dir.join(SOCKET_FILE))?;
    let mut msg = serde_json::to_vec(req)?;
    msg.push(b'\n');
    (&stream).write_all(&msg)?;
    let mut tx = stream.try_clone()?;
    // The stream goes out on its own thread while answers come back on this one; a server that
    // refuses early closes the connection, which ends the copy.
    let copier = std::thread::spawn(move || -> io::Result<u64> {
        let n = io::copy(&mut inp, &mut tx)?;
        tx.shutdown(std::net::Shutdown::Write)?;
        Ok(n)
    });
    let mut reader = BufReader::new(&stream);
    let resp = loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the serving process closed the connection without an answer",
            ));
        }
        if let Ok(p) = serde_json::from_str::<Progress>(&line) {
            progress(p.progress.0, p.progress.1);
            continue;
        }
        break serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    };
    // An early answer (a refusal) leaves the copier blocked on input nobody reads: it ends
    // when the process exits.
    if resp.as_ref().is_ok_and(|r: &Response| r.ok) {
        let _ = copier.join();
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::Format;
    use crate::store::pack::MemPackIo;

    #[test]
    fn peer_uid_is_the_connecting_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer_uid(&a).unwrap(), unsafe { libc::geteuid() });
    }

    #[test]
    fn only_root_the_owner_and_the_server_may_connect() {
        assert!(peer_allowed(0, 1000, 1000));
        assert!(peer_allowed(1000, 1000, 0));
        assert!(peer_allowed(1001, 1000, 1001));
        assert!(!peer_allowed(1001, 1000, 0));
        assert!(!peer_allowed(1001, 1000, 1000));
    }

    fn ask(path: &Path) -> Response {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A refused client may find the socket closed already; the answer is still there.
        let _ = (&s).write_all(b"{\"op\":\"ping\"}\n");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Protects the progress bars of `tessera gc`, `scrub`, `warm` and `clone --count` on a
    /// served datastore:
    /// a long request reports progress lines before its answer, the last one complete, and
    /// the client still gets the answer.
    #[test]
    fn long_requests_report_progress_before_the_answer() {
        use crate::fs::dir::Ctx;
        use crate::fs::{InodeId, Kind};
        let d = tempfile::tempdir().unwrap();
        let e =
            Arc::new(Engine::in_memory(Format::default(), Arc::new(MemPackIo::default())).unwrap());
        let i = e
            .mknod(
                InodeId::ROOT,
                b"golden.raw",
                Kind::File,
                0o644,
                0,
                Ctx::ROOT,
            )
            .unwrap()
            .ino;
        e.write(i, 0, &crate::fs::testutil::unique_data(3, 600, 16384))
            .unwrap();
        e.sync_all().unwrap();
        serve_with(e, d.path(), Limits::default()).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let req = Request::Warm {
            path: "/golden.raw".into(),
        };
        let r = call_with_progress(d.path(), &req, Duration::from_secs(30), &|a, b| {
            seen.lock().unwrap().push((a, b))
        })
        .unwrap();
        assert!(r.ok, "{}", r.error);
        assert_eq!(r.result["chunks"], 600);
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.last(), Some(&(600, 600)), "{seen:?}");
        // A plain call skips the progress lines.
        let r = call(
            d.path(),
            &Request::Scrub { max_rate_mib: 0 },
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(r.ok, "{}", r.error);
        assert_eq!(r.result["chunks_checked"], 600);
        // clone --count: progress up to the last clone, then all of them at once.
        let seen = std::sync::Mutex::new(Vec::new());
        let req = Request::Clone {
            src: "/golden.raw".into(),
            dsts: (0..300).map(|n| format!("/desk-{n}")).collect(),
        };
        let r = call_with_progress(d.path(), &req, Duration::from_secs(30), &|a, b| {
            seen.lock().unwrap().push((a, b))
        })
        .unwrap();
        assert!(r.ok, "{}", r.error);
        assert_eq!(r.result["cloned"], 300);
        assert_eq!(seen.into_inner().unwrap().last(), Some(&(300, 300)));
    }

    #[test]
    fn connections_are_capped_and_idle_ones_time_out() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let e =
            Arc::new(Engine::in_memory(Format::default(), Arc::new(MemPackIo::default())).unwrap());
        let limits = Limits {
            max_conns: 2,
            // Long enough that a loaded machine still sees both idle clients in their slots.
            request_timeout: Duration::from_secs(4),
            write_timeout: Duration::from_secs(1),
        };
        let path = serve_with(e, d.path(), limits).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ask(&path).ok);
        // Two idle clients take both slots; the third is told to retry.
        // Each idle client with the time it connected.
        let connect = || {
            let at = std::time::Instant::now();
            let s = UnixStream::connect(&path).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, at)
        };
        let mut idle: Vec<(UnixStream, std::time::Instant)> = (0..2).map(|_| connect()).collect();
        // The server takes them in its own time (a loaded machine can take a while): ask
        // until they hold both slots. One that arrived while the slot of an earlier `ask` was
        // still being released was told "busy" and closed (it reads as answered or closed,
        // not as waiting): it is replaced.
        let start = std::time::Instant::now();
        // Replaces the idle clients that were answered or closed; true if none was.
        let keep = |idle: &mut Vec<(UnixStream, std::time::Instant)>| {
            let mut all = true;
            for c in idle.iter_mut() {
                let mut b = [0u8; 64];
                match std::io::Read::read(&mut c.0, &mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    _ => {
                        *c = connect();
                        all = false;
                    }
                }
            }
            all
        };
        let r = loop {
            keep(&mut idle);
            let r = ask(&path);
            if start.elapsed() > Duration::from_secs(20) {
                break r;
            }
            // "busy" may have come while the slot of the previous `ask` was still held, with an
            // idle client told "busy" at the same moment: it counts only if, a moment later,
            // both idle clients still wait and the server is still full.
            if !r.ok {
                std::thread::sleep(Duration::from_millis(300));
                if keep(&mut idle) {
                    let again = ask(&path);
                    if !again.ok {
                        break again;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!r.ok && r.error.starts_with("busy"), "{r:?}");
        let connected = idle.iter().map(|c| c.1).min().unwrap();
        // They are dropped once their time to send a request is up.
        let start = std::time::Instant::now();
        while !ask(&path).ok {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "idle clients kept their slots"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Not before their time: the server's clock starts at accept, after `connected`, so
        // load can only make this later (measuring from the end of the busy phase could not
        // tell a loaded machine from an early drop).
        assert!(connected.elapsed() >= limits.request_timeout);
        drop(idle);
    }
}
