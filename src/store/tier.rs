//! The S3 tier behind [`PackIo`]: packs are written in the datastore's folder exactly as on a
//! local datastore (same durability rules); once sealed, a background thread uploads each as
//! one object (multipart, throttled), and only then may its local file be evicted to keep the
//! folder within the configured cache. Reads of evicted packs fetch 1 MiB blocks by byte range
//! into a bounded cache folder (each block checksummed there; every record is still verified
//! against its chunk id by the store), with read-ahead for sequential reads. Deleting a pack
//! (compaction) deletes its object: one request per pack, never per chunk. One writer per
//! bucket prefix: a lease object, taken and renewed by conditional put, names the holder.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::pack::{DirPackIo, PackIo};
use super::remote::{Remote, TierConfig};
use super::PackId;

/// Pack size on an S3-backed datastore: objects of tens of MiB upload in seconds, evict and
/// compact at a useful grain, and cost few requests per GiB.
pub const TIER_PACK_BYTES: u64 = 32 << 20;
/// The active pack is sealed (and uploaded) once idle this long...
pub const SEAL_IDLE: Duration = Duration::from_secs(30);
/// ...or once this old, whatever the write rate.
pub const SEAL_AGE: Duration = Duration::from_secs(300);
/// Unit of ranged reads and of the read cache.
const BLOCK: u64 = 1 << 20;
/// Blocks read ahead when a pack is read sequentially, in runs of `READ_AHEAD_RUN` blocks per
/// GET: object stores charge per request and answer each one after a round trip (tens of ms
/// on S3), so a few large ranges go faster than many small ones.
const READ_AHEAD_BLOCKS: u64 = 8;
const READ_AHEAD_RUN: u64 = 4;
/// Ticks of the disk cache's blocks at and above this are blocks desktops read; below it,
/// blocks scans brought in, evicted first.
const HOT_TICKS: u64 = 1 << 62;
/// Threads fetching read-ahead blocks: an object store answers one ranged GET in tens of ms
/// (S3's first byte), so one fetch at a time would cap a cold sequential read near 1 MiB per
/// round trip; several in flight hide that latency.
const READ_AHEAD_THREADS: usize = 4;
/// A lease not renewed for this long may be taken over.
const LEASE_TTL: Duration = Duration::from_secs(60);
/// How often the holder renews its lease (test builds: every second, so the fencing test
/// sees a takeover quickly).
const LEASE_RENEW: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(15)
};
/// Wait before retrying a failed upload or delete (doubles up to [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_millis(500);
/// (Test builds wait at most 1 s: their failures are injected, and minutes of backoff would
/// only slow the suite.)
const RETRY_MAX: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(60)
};
/// Name of the lease object under the prefix.
const LEASE: &str = "lease.json";
/// Folder of the cache of blocks read back, in the datastore folder.
pub const CACHE_DIR: &str = "cache";

fn object_name(p: PackId) -> String {
    format!("packs/{:08x}.pack", p.0)
}

fn parse_object_name(n: &str) -> Option<PackId> {
    let hex = n.strip_prefix("packs/")?.strip_suffix(".pack")?;
    u32::from_str_radix(hex, 16).ok().map(PackId)
}

/// What `tessera stats` shows about the tier.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TierStats {
    pub url: String,
    pub objects: u64,
    pub object_bytes: u64,
    pub uploads_pending: u64,
    pub upload_bytes_pending: u64,
    pub deletes_pending: u64,
    /// Local pack files (not yet uploaded, being appended to, or kept as cache).
    pub local_pack_bytes: u64,
    /// Of which uploaded packs kept as cache.
    pub cached_pack_bytes: u64,
    /// Blocks of evicted packs read back.
    pub cache_block_bytes: u64,
    pub cache_limit_bytes: u64,
    pub requests_put: u64,
    pub requests_get: u64,
    pub requests_list: u64,
    pub requests_delete: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    /// The last upload or delete failure, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set when another server took the lease: uploads and deletes stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
}

#[derive(Default)]
struct State {
    /// Packs in the bucket, with their lengths.
    remote: BTreeMap<PackId, u64>,
    /// Packs with a local file, with the order they became evictable in (upload tick).
    local: BTreeSet<PackId>,
    /// Packs being appended to: never uploaded or evicted.
    active: BTreeSet<PackId>,
    /// Sealed local packs not in the bucket yet, oldest first.
    pending: BTreeSet<PackId>,
    /// Uploaded packs whose local file is kept, oldest upload first.
    evictable: Vec<PackId>,
    /// Objects of removed packs still to delete, with the backup epoch of their removal: an
    /// object is deleted only once a metadata backup taken after its removal is in the bucket
    /// (older backups may reference it; `restore` uses the newest).
    deletions: BTreeMap<PackId, u64>,
    /// Metadata backups started (removals are tagged with this)...
    epoch: u64,
    /// ...and the newest epoch whose backup is in the bucket.
    backed_up: Option<u64>,
    last_error: Option<String>,
    fenced: Option<String>,
}

impl State {
    /// Bytes of uploaded packs whose local file is kept (part of the disk cache).
    fn cached_pack_bytes(&self) -> u64 {
        self.evictable
            .iter()
            .map(|p| self.remote.get(p).copied().unwrap_or(0))
            .sum()
    }
}

/// The cached blocks of evicted packs: files `CACHE_DIR/<pack>.<block>`, each the block's
/// bytes and their crc32, least recently used evicted first. Blocks a scan (scrub, fsck,
/// compaction, repair) brings in enter as the least recently used, and a scan's hit does not
/// refresh a block: a scan of the whole bucket evicts its own blocks, not the ones desktops
/// read.
struct Blocks {
    dir: PathBuf,
    index: Mutex<BlockIndex>,
}

#[derive(Default)]
struct BlockIndex {
    /// Length in bytes (with the crc) and last-use tick of each block.
    blocks: HashMap<(PackId, u64), (u64, u64)>,
    /// The same blocks by last-use tick, oldest first. Blocks a scan brought in have ticks
    /// below `HOT_TICKS` (first out, in the order they came), the others above.
    order: BTreeSet<(u64, PackId, u64)>,
    bytes: u64,
    /// Last tick given to a block read by a desktop (starts at `HOT_TICKS`).
    tick: u64,
    /// Last tick given to a block a scan brought in (below `HOT_TICKS`).
    scan_tick: u64,
    /// Last block read per pack (sequential reads start read-ahead).
    last: HashMap<PackId, u64>,
}

impl Blocks {
    fn open(dir: &Path) -> io::Result<Blocks> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(crate::private::DIR_MODE)
            .create(dir)?;
        let mut index = BlockIndex {
            tick: HOT_TICKS,
            ..BlockIndex::default()
        };
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            let parsed = name.split_once('.').and_then(|(p, b)| {
                Some((
                    PackId(u32::from_str_radix(p, 16).ok()?),
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
            match parsed {
                Some(k) => {
                    let len = e.metadata()?.len();
                    index.tick += 1;
                    index.blocks.insert(k, (len, index.tick));
                    index.order.insert((index.tick, k.0, k.1));
                    index.bytes += len;
                }
                // A block being written when the process stopped.
                None => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Blocks {
            dir: dir.to_path_buf(),
            index: Mutex::new(index),
        })
    }

    fn path(&self, p: PackId, b: u64) -> PathBuf {
        self.dir.join(format!("{:08x}.{b:x}", p.0))
    }

    fn contains(&self, p: PackId, b: u64) -> bool {
        self.index.lock().blocks.contains_key(&(p, b))
    }

    /// The block's bytes if cached and intact (a damaged copy is dropped). A read that is not
    /// a scan makes it the most recently used.
    fn get(&self, p: PackId, b: u64, scan: bool) -> Option<Vec<u8>> {
        {
            let mut ix = self.index.lock();
            let old = ix.blocks.get(&(p, b))?.1;
            if !scan {
                ix.tick += 1;
                let t = ix.tick;
                ix.blocks.get_mut(&(p, b))?.1 = t;
                ix.order.remove(&(old, p, b));
                ix.order.insert((t, p, b));
            }
        }
        let raw = std::fs::read(self.path(p, b)).ok();
        let ok = raw.as_ref().and_then(|raw| {
            let (data, crc) = raw.split_at(raw.len().checked_sub(4)?);
            (crc32fast::hash(data).to_le_bytes() == crc).then_some(data.len())
        });
        match (raw, ok) {
            (Some(mut raw), Some(n)) => {
                raw.truncate(n);
                Some(raw)
            }
            _ => {
                self.drop_block(p, b);
                None
            }
        }
    }

    /// Cache a block; a scan's block enters as the least recently used.
    fn put(&self, p: PackId, b: u64, data: &[u8], scan: bool) -> io::Result<()> {
        use std::io::Write;
        let tmp = self.dir.join(format!(
            "tmp-{:08x}-{b:x}-{:?}",
            p.0,
            std::thread::current().id()
        ));
        {
            let mut f = crate::private::open_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.write_all(&crc32fast::hash(data).to_le_bytes())?;
        }
        std::fs::rename(&tmp, self.path(p, b))?;
        let mut ix = self.index.lock();
        let t = if scan {
            ix.scan_tick += 1;
            ix.scan_tick
        } else {
            ix.tick += 1;
            ix.tick
        };
        let len = data.len() as u64 + 4;
        if let Some((old, ot)) = ix.blocks.insert((p, b), (len, t)) {
            ix.bytes -= old;
            ix.order.remove(&(ot, p, b));
        }
        ix.order.insert((t, p, b));
        ix.bytes += len;
        Ok(())
    }

    fn drop_block(&self, p: PackId, b: u64) {
        let mut ix = self.index.lock();
        if let Some((len, t)) = ix.blocks.remove(&(p, b)) {
            ix.order.remove(&(t, p, b));
            ix.bytes -= len;
            let _ = std::fs::remove_file(self.path(p, b));
        }
    }

    fn drop_pack(&self, p: PackId) {
        let keys: Vec<u64> = {
            let ix = self.index.lock();
            ix.blocks.keys().filter(|k| k.0 == p).map(|k| k.1).collect()
        };
        for b in keys {
            self.drop_block(p, b);
        }
        self.index.lock().last.remove(&p);
    }

    fn bytes(&self) -> u64 {
        self.index.lock().bytes
    }

    /// Drop least recently used blocks (those of scans first) until at most `limit` bytes are
    /// cached.
    fn shrink_to(&self, limit: u64) {
        loop {
            let victim = {
                let ix = self.index.lock();
                if ix.bytes <= limit {
                    return;
                }
                // The block a scan brought in last is the one it reads now: it goes last,
                // even before blocks desktops read when the cache holds little else.
                let newest_scan = ix.scan_tick;
                ix.order
                    .iter()
                    .find(|(t, _, _)| *t != newest_scan || ix.blocks.len() == 1)
                    .map(|&(_, p, b)| (p, b))
            };
            match victim {
                Some((p, b)) => self.drop_block(p, b),
                None => return,
            }
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct LeaseRecord {
    host: String,
    pid: u32,
    datastore: String,
    expires_unix: u64,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `f`, tried up to three times while it fails with anything but a refusal (a lease held
/// elsewhere) or a lost race.
fn retry_transient<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e)
                if tries < 2
                    && !matches!(
                        e.kind(),
                        io::ErrorKind::AddrInUse
                            | io::ErrorKind::AlreadyExists
                            | io::ErrorKind::InvalidInput
                    ) =>
            {
                tracing::warn!("{e} (retrying)");
                tries += 1;
                std::thread::sleep(RETRY_MIN * tries);
            }
            r => return r,
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

struct Inner {
    local: DirPackIo,
    remote: Arc<Remote>,
    blocks: Blocks,
    cfg: TierConfig,
    datastore: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
    lease: Mutex<Option<object_store::UpdateVersion>>,
    read_ahead: Mutex<Option<std::sync::mpsc::SyncSender<(PackId, u64, bool)>>>,
    /// Blocks being fetched, and the signal that one arrived.
    fetching: Mutex<std::collections::HashSet<(PackId, u64)>>,
    fetched: Condvar,
}

/// Packs in a local folder and an object-store prefix (see the module doc).
pub struct TieredPackIo {
    inner: Arc<Inner>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl TieredPackIo {
    /// Open the tier of the datastore at `ds`: take the prefix's lease, list what the bucket
    /// holds, and start the uploader (every local pack not in the bucket is sealed: the store
    /// appends only to packs it creates after opening).
    pub fn open(ds: &Path, pack_dir: &Path, cfg: TierConfig) -> io::Result<TieredPackIo> {
        let remote = Arc::new(Remote::connect(&cfg)?);
        Self::with_remote(ds, pack_dir, cfg, remote)
    }

    pub fn with_remote(
        ds: &Path,
        pack_dir: &Path,
        cfg: TierConfig,
        remote: Arc<Remote>,
    ) -> io::Result<TieredPackIo> {
        let local = DirPackIo::new(pack_dir)?;
        let blocks = Blocks::open(&ds.join(CACHE_DIR))?;
        let inner = Arc::new(Inner {
            local,
            remote,
            blocks,
            cfg,
            datastore: ds.to_path_buf(),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            lease: Mutex::new(None),
            read_ahead: Mutex::new(None),
            fetching: Mutex::new(Default::default()),
            fetched: Condvar::new(),
        });
        inner.take_lease()?;
        {
            let mut st = inner.state.lock();
            for (name, size) in retry_transient(|| inner.remote.list("packs"))? {
                if let Some(p) = parse_object_name(&name) {
                    st.remote.insert(p, size);
                }
            }
            for p in inner.local.list()? {
                st.local.insert(p);
                if st.remote.contains_key(&p) {
                    st.evictable.push(p);
                } else {
                    st.pending.insert(p);
                }
            }
        }
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tessera-upload".into())
                .spawn(move || i.upload_loop())?,
        );
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tessera-lease".into())
                .spawn(move || i.lease_loop())?,
        );
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PackId, u64, bool)>(16);
        *inner.read_ahead.lock() = Some(tx);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..READ_AHEAD_THREADS {
            let (i, rx) = (inner.clone(), rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tessera-readahead".into())
                    .spawn(move || loop {
                        let Ok((p, b, scan)) = rx.lock().recv() else {
                            return;
                        };
                        if i.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // A hint: blocks cached or being fetched are skipped.
                        let _ = i.prefetch_run(p, b, b + READ_AHEAD_RUN - 1, scan);
                    })?,
            );
        }
        inner.evict();
        Ok(TieredPackIo {
            inner,
            threads: Mutex::new(threads),
        })
    }

    /// Wait until every sealed pack is in the bucket (tests, metadata backups). Fails with
    /// the last error if no progress is made for `patience`.
    pub fn drain(&self, patience: Duration) -> io::Result<()> {
        let mut st = self.inner.state.lock();
        let mut last = (u64::MAX, u64::MAX);
        let mut since = std::time::Instant::now();
        loop {
            let now = (st.pending.len() as u64, 0);
            if now.0 == 0 {
                return Ok(());
            }
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            }
            if let Some(f) = &st.fenced {
                return Err(io::Error::other(f.clone()));
            }
            if since.elapsed() > patience {
                return Err(io::Error::other(format!(
                    "uploads to {} made no progress for {} s: {}",
                    self.inner.cfg.url,
                    patience.as_secs(),
                    st.last_error.as_deref().unwrap_or("no error reported")
                )));
            }
            self.inner.wake.notify_all();
            self.inner
                .wake
                .wait_for(&mut st, Duration::from_millis(100));
        }
    }

    /// The blocks of evicted packs in the disk cache (tests).
    #[cfg(test)]
    pub fn cached_blocks(&self) -> BTreeSet<(PackId, u64)> {
        let ix = self.inner.blocks.index.lock();
        ix.blocks.keys().copied().collect()
    }

    /// Wait (at most `patience`) until the deletes a metadata backup has let go are done: at a
    /// clean stop, so the bucket does not keep objects of compacted packs until the next
    /// start (that wait lives only in memory). False if some are left.
    pub fn finish_deletes(&self, patience: Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        let mut st = self.inner.state.lock();
        loop {
            let done = st.backed_up;
            let due = st.deletions.values().any(|e| done.is_some_and(|d| *e <= d));
            if !due {
                return true;
            }
            if st.fenced.is_some() || std::time::Instant::now() >= deadline {
                return false;
            }
            self.inner.wake.notify_all();
            self.inner
                .wake
                .wait_for(&mut st, Duration::from_millis(100));
        }
    }

    pub fn remote(&self) -> &Arc<Remote> {
        &self.inner.remote
    }

    /// Start a metadata backup: removals from now on wait for the next one. Returns its
    /// epoch, for [`TieredPackIo::put_backup`].
    pub fn begin_backup(&self) -> u64 {
        let mut st = self.inner.state.lock();
        st.epoch += 1;
        st.epoch - 1
    }

    /// Upload a metadata backup file (compressed by the caller) taken at `epoch`, after
    /// every pack it may reference: call [`TieredPackIo::drain`] first. Then point
    /// `meta/latest.json` at it, drop backups older than the previous one, and let the
    /// deletes of packs removed before `epoch` go ahead.
    pub fn put_backup(&self, epoch: u64, file: &Path, info: &BackupInfo) -> io::Result<()> {
        let r = &self.inner.remote;
        r.upload_file(&info.object, file, 0)?;
        let previous = r
            .get(LATEST)?
            .and_then(|(b, _)| serde_json::from_slice::<BackupInfo>(&b).ok());
        r.put(LATEST, serde_json::to_vec_pretty(info)?, None)?;
        // Keep the newest two; older ones are replaced (restore uses `latest.json`).
        let keep: Vec<String> = std::iter::once(info.object.clone())
            .chain(previous.map(|p| p.object))
            .collect();
        for (name, _) in r.list("meta")? {
            if name != LATEST && !keep.contains(&name) {
                r.delete(&name)?;
            }
        }
        let mut st = self.inner.state.lock();
        st.backed_up = Some(st.backed_up.map_or(epoch, |b| b.max(epoch)));
        drop(st);
        self.inner.wake.notify_all();
        Ok(())
    }
}

/// `meta/latest.json`: which metadata backup `restore` uses.
pub const LATEST: &str = "meta/latest.json";

/// What `meta/latest.json` says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupInfo {
    /// The backup's object name, under the prefix.
    pub object: String,
    /// When it was taken (unix seconds).
    pub taken_unix: u64,
    /// Bytes of the metadata file it restores to.
    pub bytes: u64,
    /// The host and datastore folder it was taken from.
    pub host: String,
    pub datastore: String,
}

impl BackupInfo {
    pub fn new(datastore: &Path, bytes: u64) -> BackupInfo {
        let t = now_unix();
        BackupInfo {
            object: format!("meta/meta-{t}.redb.zst"),
            taken_unix: t,
            bytes,
            host: hostname(),
            datastore: datastore.display().to_string(),
        }
    }
}

impl Drop for TieredPackIo {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.read_ahead.lock().take();
        self.inner.wake.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        self.inner.release_lease();
    }
}

impl Inner {
    fn lease_record(&self) -> Vec<u8> {
        serde_json::to_vec(&LeaseRecord {
            host: hostname(),
            pid: std::process::id(),
            datastore: self.datastore.display().to_string(),
            expires_unix: now_unix() + LEASE_TTL.as_secs(),
        })
        .expect("a lease record serializes")
    }

    /// Take the prefix's lease, or say who holds it. A failure that outlasts the object
    /// store's own retries is tried twice more from the start: a put whose reply was lost
    /// left a lease that the next round reads as this process's own.
    fn take_lease(&self) -> io::Result<()> {
        retry_transient(|| self.try_take_lease())
    }

    fn try_take_lease(&self) -> io::Result<()> {
        let got = self.remote.get(LEASE)?;
        let expect = match got {
            None => None,
            Some((bytes, version)) => {
                if let Ok(rec) = serde_json::from_slice::<LeaseRecord>(&bytes) {
                    // Ours after a restart on this host (the holder is gone), or this very
                    // process for this very folder.
                    let here = self.datastore.display().to_string();
                    let mine = rec.host == hostname()
                        && ((rec.pid == std::process::id() && rec.datastore == here)
                            || !pid_alive(rec.pid));
                    if rec.expires_unix > now_unix() && !mine {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!(
                                "{} is in use by host {} (process {}, datastore {}); stop \
                                 Tessera there, or wait until its lease lapses ({} s after it \
                                 stopped)",
                                self.remote.url(),
                                rec.host,
                                rec.pid,
                                rec.datastore,
                                LEASE_TTL.as_secs()
                            ),
                        ));
                    }
                }
                Some(version)
            }
        };
        match self.remote.put(LEASE, self.lease_record(), Some(expect)) {
            Ok(v) => {
                *self.lease.lock() = Some(v);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another server took {} at the same moment; stop it first",
                    self.remote.url()
                ),
            )),
            Err(e) => Err(e),
        }
    }

    fn lease_loop(&self) {
        loop {
            {
                // `wake` also signals uploads: renew only once LEASE_RENEW has passed.
                let due = std::time::Instant::now() + LEASE_RENEW;
                let mut st = self.state.lock();
                loop {
                    if self.stop.load(Ordering::SeqCst) || st.fenced.is_some() {
                        return;
                    }
                    let now = std::time::Instant::now();
                    if now >= due {
                        break;
                    }
                    self.wake.wait_for(&mut st, due - now);
                }
            }
            let Some(v) = self.lease.lock().clone() else {
                return;
            };
            match self.remote.put(LEASE, self.lease_record(), Some(Some(v))) {
                Ok(v) => *self.lease.lock() = Some(v),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let msg = format!(
                        "another server took the lease of {}: this one stopped uploading and \
                         deleting; stop one of them",
                        self.remote.url()
                    );
                    tracing::error!("{msg}");
                    self.state.lock().fenced = Some(msg);
                    self.wake.notify_all();
                    return;
                }
                // A transient failure: the lease has LEASE_TTL to be renewed.
                Err(e) => tracing::warn!("cannot renew the lease: {e}"),
            }
        }
    }

    fn release_lease(&self) {
        if self.state.lock().fenced.is_some() {
            return;
        }
        if let Some(v) = self.lease.lock().take() {
            // Only our own version: a lease taken over since is not ours to delete.
            if let Ok(Some((_, now))) = self.remote.get(LEASE) {
                if now == v {
                    let _ = self.remote.delete(LEASE);
                }
            }
        }
    }

    /// Upload sealed packs and delete removed ones, oldest first, retrying with backoff.
    fn upload_loop(&self) {
        let mut backoff = RETRY_MIN;
        loop {
            let job = {
                let mut st = self.state.lock();
                loop {
                    if self.stop.load(Ordering::SeqCst) || st.fenced.is_some() {
                        return;
                    }
                    let done = st.backed_up;
                    if let Some(p) = st
                        .deletions
                        .iter()
                        .find(|(_, e)| done.is_some_and(|d| **e <= d))
                        .map(|(p, _)| *p)
                    {
                        break Err(p);
                    }
                    if let Some(p) = st.pending.first().copied() {
                        break Ok(p);
                    }
                    self.wake.wait_for(&mut st, Duration::from_secs(1));
                }
            };
            let r = match job {
                Ok(p) => self.upload(p),
                Err(p) => self.remote.delete(&object_name(p)).map(|()| {
                    let mut st = self.state.lock();
                    st.deletions.remove(&p);
                    st.remote.remove(&p);
                }),
            };
            match r {
                Ok(()) => {
                    backoff = RETRY_MIN;
                    self.state.lock().last_error = None;
                    self.wake.notify_all();
                }
                Err(e) => {
                    tracing::warn!("object store: {e} (retrying in {:?})", backoff);
                    let mut st = self.state.lock();
                    st.last_error = Some(e.to_string());
                    self.wake.wait_for(&mut st, backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn upload(&self, p: PackId) -> io::Result<()> {
        let len = self.local.len(p)?;
        let sent =
            self.remote
                .upload_file(&object_name(p), &self.local.path(p), self.cfg.upload_rate)?;
        if sent < len {
            return Err(io::Error::other(format!(
                "pack {:08x}: uploaded {sent} of {len} bytes",
                p.0
            )));
        }
        {
            let mut st = self.state.lock();
            st.remote.insert(p, sent);
            if !st.pending.remove(&p) {
                // Removed (compacted away) while it was uploading: its object goes too.
                let epoch = st.epoch;
                st.deletions.insert(p, epoch);
            } else if st.local.contains(&p) {
                st.evictable.push(p);
            }
        }
        self.evict();
        Ok(())
    }

    /// Keep the local folder within the cache: uploaded pack files first (oldest upload
    /// first; they keep at most half of it), then read-back blocks (least recently used
    /// first). Packs not in the bucket are never evicted, whatever the cache size.
    fn evict(&self) {
        let limit = self.cfg.cache_bytes;
        loop {
            let victim = {
                let mut st = self.state.lock();
                let local_uploaded = st.cached_pack_bytes();
                // Uploaded packs keep at most half the cache, so ranges read back always
                // have room (a read of evicted data must not evict the block it just read).
                let over =
                    local_uploaded + self.blocks.bytes() > limit || local_uploaded > limit / 2;
                if !over || st.evictable.is_empty() {
                    None
                } else {
                    let p = st.evictable.remove(0);
                    st.local.remove(&p);
                    Some(p)
                }
            };
            match victim {
                Some(p) => {
                    if let Err(e) = self.local.remove(p) {
                        tracing::warn!("cannot evict pack {:08x}: {e}", p.0);
                    }
                }
                None => break,
            }
        }
        let local_uploaded = self.state.lock().cached_pack_bytes();
        self.blocks.shrink_to(limit.saturating_sub(local_uploaded));
    }

    /// Block `b` of evicted pack `p`, from the cache or the bucket. Concurrent misses of one
    /// block (a reader and the read-ahead, or clones booting at once) fetch it once.
    fn block(&self, p: PackId, b: u64, scan: bool) -> io::Result<Vec<u8>> {
        loop {
            if let Some(data) = self.blocks.get(p, b, scan) {
                return Ok(data);
            }
            let mut f = self.fetching.lock();
            if f.insert((p, b)) {
                break;
            }
            self.fetched.wait_for(&mut f, Duration::from_millis(50));
        }
        let r = self.fetch(p, b, 1, scan).map(|mut v| v.swap_remove(0));
        self.fetching.lock().remove(&(p, b));
        self.fetched.notify_all();
        r
    }

    /// Blocks `first..last` of evicted pack `p` that no one has cached or is fetching,
    /// fetched with one ranged GET and cached (a large read, such as a scan's 8 MiB run, costs
    /// one request instead of one per block). Blocks already there are left to `block`.
    /// Returns the blocks fetched, by number (a cache smaller than the run may have evicted
    /// them already).
    fn prefetch_run(&self, p: PackId, first: u64, last: u64, scan: bool) -> Vec<(u64, Vec<u8>)> {
        let claimed: Vec<u64> = {
            let mut f = self.fetching.lock();
            let mut run = Vec::new();
            for b in first..=last {
                if self.blocks.contains(p, b) || f.contains(&(p, b)) {
                    if run.is_empty() {
                        continue;
                    }
                    break;
                }
                f.insert((p, b));
                run.push(b);
            }
            run
        };
        let mut got = Vec::new();
        if let Some(&b0) = claimed.first() {
            // A failure here is only a missed prefetch: `block` fetches (and reports) again.
            if let Ok(blocks) = self.fetch(p, b0, claimed.len() as u64, scan) {
                got = (b0..).zip(blocks).collect();
            }
        }
        let mut f = self.fetching.lock();
        for b in &claimed {
            f.remove(&(p, *b));
        }
        drop(f);
        self.fetched.notify_all();
        got
    }

    /// `n` blocks from block `b` of evicted pack `p`, with one GET; each is cached.
    fn fetch(&self, p: PackId, b: u64, n: u64, scan: bool) -> io::Result<Vec<Vec<u8>>> {
        let len = self.state.lock().remote.get(&p).copied().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("pack {:08x} is neither on disk nor in the bucket", p.0),
            )
        })?;
        let start = b * BLOCK;
        if start >= len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("pack {:08x} ends at {len}, before block {b}", p.0),
            ));
        }
        // object_store retries failed requests itself; a failure that outlasts those is
        // tried twice more before the read fails (as EIO, naming the file and offset).
        let mut tries = 0;
        let data = loop {
            match self
                .remote
                .get_range(&object_name(p), start..(start + n * BLOCK).min(len))
            {
                Ok(d) => break d,
                Err(e) if tries < 2 => {
                    tracing::warn!("{e} (retrying)");
                    tries += 1;
                    std::thread::sleep(RETRY_MIN * tries);
                }
                Err(e) => return Err(e),
            }
        };
        let blocks: Vec<Vec<u8>> = data.chunks(BLOCK as usize).map(<[u8]>::to_vec).collect();
        for (k, d) in blocks.iter().enumerate() {
            if let Err(e) = self.blocks.put(p, b + k as u64, d, scan) {
                tracing::warn!("cannot cache a block of pack {:08x}: {e}", p.0);
            }
        }
        let uploaded = self.state.lock().cached_pack_bytes();
        self.blocks
            .shrink_to(self.cfg.cache_bytes.saturating_sub(uploaded));
        Ok(blocks)
    }

    fn read_remote(&self, p: PackId, offset: u64, buf: &mut [u8], scan: bool) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        // Several blocks: the missing ones in one GET.
        let mut got: HashMap<u64, Vec<u8>> = if last > first {
            self.prefetch_run(p, first, last, scan)
                .into_iter()
                .collect()
        } else {
            HashMap::new()
        };
        // Read ahead when a read moves on to the block after the last one read.
        let sequential = {
            let mut ix = self.blocks.index.lock();
            let prev = ix.last.insert(p, last);
            prev.is_some_and(|l| l < last && l + 1 >= first)
        };
        for b in first..=last {
            let data = match got.remove(&b) {
                Some(d) => d,
                None => self.block(p, b, scan)?,
            };
            let bs = b * BLOCK;
            let from = offset.max(bs);
            let to = end.min(bs + data.len() as u64);
            if to <= from {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("pack {:08x} is shorter than offset {end}", p.0),
                ));
            }
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - bs) as usize..(to - bs) as usize]);
        }
        if sequential {
            if let Some(tx) = self.read_ahead.lock().as_ref() {
                for b in (last + 1..=last + READ_AHEAD_BLOCKS).step_by(READ_AHEAD_RUN as usize) {
                    // Dropped when the read-ahead queue is full: it is only a hint.
                    let _ = tx.try_send((p, b, scan));
                }
            }
        }
        Ok(())
    }

    fn is_local(&self, p: PackId) -> bool {
        self.state.lock().local.contains(&p)
    }
}

impl PackIo for TieredPackIo {
    fn create(&self, pack: PackId) -> io::Result<()> {
        self.inner.local.create(pack)?;
        let mut st = self.inner.state.lock();
        st.local.insert(pack);
        st.active.insert(pack);
        Ok(())
    }

    fn append(&self, pack: PackId, data: &[u8]) -> io::Result<u64> {
        self.inner.local.append(pack, data)
    }

    fn read_at(&self, pack: PackId, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(pack, offset, &mut buf)?;
        Ok(buf)
    }

    fn read_into(&self, pack: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.inner.is_local(pack) {
            match self.inner.local.read_into(pack, offset, buf) {
                // Evicted between the check and the read: read it back.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => return r,
            }
        }
        self.inner.read_remote(pack, offset, buf, false)
    }

    fn read_at_scan(&self, pack: PackId, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        if self.inner.is_local(pack) {
            match self.inner.local.read_into(pack, offset, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => return r.map(|()| buf),
            }
        }
        self.inner.read_remote(pack, offset, &mut buf, true)?;
        Ok(buf)
    }

    fn sync(&self, pack: PackId) -> io::Result<()> {
        self.inner.local.sync(pack)
    }

    fn len(&self, pack: PackId) -> io::Result<u64> {
        if self.inner.is_local(pack) {
            match self.inner.local.len(pack) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => return r,
            }
        }
        self.inner
            .state
            .lock()
            .remote
            .get(&pack)
            .copied()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("pack {:08x} is neither on disk nor in the bucket", pack.0),
                )
            })
    }

    fn list(&self) -> io::Result<Vec<PackId>> {
        let st = self.inner.state.lock();
        let mut all: BTreeSet<PackId> = st.local.clone();
        all.extend(st.remote.keys().filter(|p| !st.deletions.contains_key(p)));
        Ok(all.into_iter().collect())
    }

    fn remove(&self, pack: PackId) -> io::Result<()> {
        let local = {
            let mut st = self.inner.state.lock();
            st.pending.remove(&pack);
            st.active.remove(&pack);
            st.evictable.retain(|p| *p != pack);
            if st.remote.contains_key(&pack) {
                let epoch = st.epoch;
                st.deletions.insert(pack, epoch);
            }
            st.local.remove(&pack)
        };
        self.inner.blocks.drop_pack(pack);
        self.inner.wake.notify_all();
        if local {
            self.inner.local.remove(pack)?;
        }
        Ok(())
    }

    fn sealed(&self, pack: PackId) {
        let mut st = self.inner.state.lock();
        if st.active.remove(&pack) && !st.remote.contains_key(&pack) {
            st.pending.insert(pack);
        }
        drop(st);
        self.inner.wake.notify_all();
    }

    fn pack_target(&self) -> u64 {
        match self.inner.cfg.pack_bytes {
            0 => TIER_PACK_BYTES,
            n => n,
        }
    }

    fn seal_idle(&self) -> Duration {
        match self.inner.cfg.seal_idle_secs {
            0 => SEAL_IDLE,
            n => Duration::from_secs(n),
        }
    }

    fn tier(&self) -> Option<TierStats> {
        let i = &self.inner;
        let st = i.state.lock();
        let local_pack_bytes = st.local.iter().map(|p| i.local.len(*p).unwrap_or(0)).sum();
        let r = &i.remote.requests;
        Some(TierStats {
            url: i.cfg.url.clone(),
            objects: st.remote.len() as u64,
            object_bytes: st.remote.values().sum(),
            uploads_pending: st.pending.len() as u64,
            upload_bytes_pending: st
                .pending
                .iter()
                .map(|p| i.local.len(*p).unwrap_or(0))
                .sum(),
            deletes_pending: st.deletions.len() as u64,
            local_pack_bytes,
            cached_pack_bytes: st.cached_pack_bytes(),
            cache_block_bytes: i.blocks.bytes(),
            cache_limit_bytes: i.cfg.cache_bytes,
            requests_put: r.put.load(Ordering::Relaxed),
            requests_get: r.get.load(Ordering::Relaxed),
            requests_list: r.list.load(Ordering::Relaxed),
            requests_delete: r.delete.load(Ordering::Relaxed),
            bytes_uploaded: r.bytes_up.load(Ordering::Relaxed),
            bytes_downloaded: r.bytes_down.load(Ordering::Relaxed),
            last_error: st.last_error.clone(),
            fenced: st.fenced.clone(),
        })
    }

    fn drain(&self, patience: Duration) -> io::Result<()> {
        TieredPackIo::drain(self, patience)
    }

    fn as_tier(&self) -> Option<&TieredPackIo> {
        Some(self)
    }
}
