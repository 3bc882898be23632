//! What the serving process needs to replicate on a schedule and to report it: per replicated
//! path, the receiver, the interval (the RPO), and the last run's outcome (table `repl_state`).
//! The network part is `crate::replicate`; this module only keeps the records.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::snapshot::norm;
use super::{Engine, FsError, FsResult};
use crate::schema::REPL_STATE;

/// Replication of one path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplState {
    /// The path, inside the datastore (`/vms/desk01`).
    #[serde(default)]
    pub path: String,
    /// Receiver, `HOST:PORT`.
    pub to: String,
    /// Seconds between runs of the schedule; 0: no schedule (runs by hand only).
    pub every: u64,
    /// Bytes per second at most (0: unlimited).
    pub max_rate: u64,
    /// Unix seconds of the last run that succeeded, and the time of the point in time it
    /// replicated (its snapshot's creation).
    pub last_ok: u64,
    pub last_point: u64,
    /// The last run's error, if it failed (cleared by a success), and when.
    pub last_error: String,
    pub last_error_at: u64,
    /// Bytes the last successful run sent.
    pub last_bytes: u64,
    /// Seconds between the newest replicated point and now (filled in when read).
    #[serde(default)]
    pub lag: u64,
}

fn now() -> u64 {
    super::inode::Time::now().secs.max(0) as u64
}

impl Engine {
    /// Every replicated path's record, with its lag as of now.
    pub fn replication_state(&self) -> FsResult<Vec<ReplState>> {
        let rtx = self.read_txn()?;
        let t = match rtx.open_table(REPL_STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let now = now();
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            let mut s: ReplState = serde_json::from_slice(v.value())
                .map_err(|e| FsError::BadMeta(format!("replication record: {e}")))?;
            s.path = format!("/{}", String::from_utf8_lossy(k.value()));
            s.lag = if s.last_point > 0 {
                now.saturating_sub(s.last_point)
            } else {
                0
            };
            out.push(s);
        }
        Ok(out)
    }

    /// Change the record of `path` with `f` (a new record if it has none), durably.
    pub fn update_replication(&self, path: &str, f: impl FnOnce(&mut ReplState)) -> FsResult<()> {
        let p = norm(path)?;
        self.meta_txn(|w| {
            let mut t = w.txn.open_table(REPL_STATE)?;
            let mut s: ReplState = match t.get(p.as_bytes())? {
                Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                None => ReplState::default(),
            };
            f(&mut s);
            let b = serde_json::to_vec(&s).map_err(|e| FsError::BadMeta(e.to_string()))?;
            t.insert(p.as_bytes(), b.as_slice())?;
            Ok(())
        })
    }

    /// Forget the replication record (and schedule) of `path`.
    pub fn forget_replication(&self, path: &str) -> FsResult<()> {
        let p = norm(path)?;
        self.meta_txn(|w| {
            let mut t = w.txn.open_table(REPL_STATE)?;
            t.remove(p.as_bytes())?.ok_or(FsError::NotFound)?;
            Ok(())
        })
    }

    /// Record the outcome of a run.
    pub fn record_replication(
        &self,
        path: &str,
        to: &str,
        r: Result<(u64, u64), String>,
    ) -> FsResult<()> {
        let to = to.to_string();
        self.update_replication(path, |s| {
            s.to = to;
            match r {
                Ok((point, bytes)) => {
                    s.last_ok = now();
                    s.last_point = point;
                    s.last_bytes = bytes;
                    s.last_error.clear();
                    s.last_error_at = 0;
                }
                Err(e) => {
                    s.last_error = e;
                    s.last_error_at = now();
                }
            }
        })
    }
}
