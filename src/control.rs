//! The datastore lock and the control socket.
//!
//! One process owns a datastore at a time: it holds an exclusive `flock` on `DS/lock` (with
//! its pid written inside, for messages). A serving process also listens on the Unix socket
//! `DS/control.sock`; the CLI sends it one JSON request per connection and reads one JSON
//! response, so `tessera clone` and `tessera stats` work while the datastore is mounted.

use std::fs::{File, OpenOptions};
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

/// Take the datastore's lock without waiting.
pub fn lock(dir: &Path) -> Result<DatastoreLock, LockError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))?;
    match f.try_lock() {
        Ok(()) => {
            f.set_len(0)?;
            write!(f, "{}", std::process::id())?;
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

fn handle(engine: &Engine, req: Request) -> Response {
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
        Request::Scrub { max_rate_mib } => {
            match engine.scrub_paced((max_rate_mib > 0).then_some(max_rate_mib << 20), &|_, _| {}) {
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
            &|_, _| {},
        ) {
            Ok(r) => ok(serde_json::to_value(r).unwrap_or_default()),
            Err(e) => err(format!("gc failed: {e}")),
        },
        Request::Clone { src, dsts } => {
            let dsts: Vec<Vec<u8>> = dsts.into_iter().map(String::into_bytes).collect();
            match engine.clone_paths(src.as_bytes(), &dsts) {
                Ok(inos) => ok(serde_json::json!({"cloned": inos.len()})),
                Err(e @ CloneError::Fs(_)) => err(format!("clone failed: {e}")),
                Err(e) => err(e.to_string()),
            }
        }
    }
}

fn serve_one(engine: &Engine, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(engine, req),
        Err(e) => Response {
            ok: false,
            result: serde_json::Value::Null,
            error: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

/// Listen on the datastore's control socket until the process exits.
pub fn serve(engine: Arc<Engine>, dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join(SOCKET_FILE);
    // A socket left by a dead process: we hold the lock, so nobody else is listening.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("tessera-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let engine = engine.clone();
                let _ = std::thread::Builder::new()
                    .name("tessera-ctl-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_one(&engine, stream) {
                            tracing::warn!("control request failed: {e}");
                        }
                    });
            }
        })?;
    Ok(path)
}

/// Send one request to the process serving `dir`.
pub fn call(dir: &Path, req: &Request, timeout: Duration) -> io::Result<Response> {
    let stream = UnixStream::connect(dir.join(SOCKET_FILE))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut msg = serde_json::to_vec(req)?;
    msg.push(b'\n');
    (&stream).write_all(&msg)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
