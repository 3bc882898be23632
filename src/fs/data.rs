//! File contents: reads, the write-back buffer, flushing, truncate, punch, seek, fsync.
//!
//! # Write-back
//! A write lands in the file's [`FileState`]: each touched chunk is held whole in memory
//! (read once from the store if the write covers it only partly), so a burst of 4 KiB writes
//! into one chunk costs one read and one hash + compress + append when flushed, not one per
//! write. Dirty data is flushed (1) by `fsync`, durably; (2) by the background flusher every
//! few seconds, durably; (3) when the dirty total passes [`super::Tuning::dirty_limit`]
//! (memory pressure); (4) before operations that need the file's stored state (truncate,
//! clone, copy ranges). Reads see dirty data.
//!
//! # Flush
//! Hash dirty chunks (in parallel); skip all-zero ones (holes); look up each id; compress and
//! append only the new ones; then one transaction points the file's chunk map at them and
//! adjusts reference counts. Unchanged invariant: bytes past EOF inside the last chunk are 0.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;

use super::inode::{Inode, InodeId, Kind, Time};
use super::timing::Stage;
use super::{get_inode, tree, Attr, Engine, FsError, FsResult, MAX_FILE_SIZE};
use crate::schema::{INODES, K_BARRIERS, NODES};
use crate::store::chunk::{is_zero, ChunkId, HOT_ZSTD_LEVEL};
use crate::store::ChunkKey;
use crate::store::Encoded;

/// Share of the dirty limit the background flusher commits per transaction under memory
/// pressure (a batch of the lowest-indexed dirty chunks of a file). It is woken at half the
/// limit, so one batch takes about what was dirty then. Smaller batches cost more, in CPU and
/// in space: a flushed chunk updates two chunk-index entries at random keys and a transaction
/// rewrites each index page it touches, so 1024-chunk batches rewrote about 1.3 index pages per
/// chunk where half-limit batches rewrite about 0.4 (`commit` 38 -> 26-30 us per I/O in
/// benches/vdi.sh), and the metadata file grew by 1.7 % of a 1 GiB deduplicated copy, not
/// 0.x % (pages freed by commits that are not yet durable cannot be reused).
const FLUSH_BATCH_SHARE: u64 = 2;

/// How long a writer past the dirty limit waits for the flusher before flushing itself.
const PRESSURE_WAIT: Duration = Duration::from_secs(2);

/// Chunk buffers by chunk index.
pub(crate) type Chunks = BTreeMap<u64, Box<[u8]>>;

/// One file's write-back state and the lock that serialises its flushes.
///
/// Lock order (see the list in `fs/mod.rs`): `flush`, then `state`, then a write transaction;
/// several files' locks in inode order. Never call `Engine::write` holding `flush` (it may
/// flush this file under memory pressure). A flush holds `flush` for its whole length but `state` only to move dirty chunks to `inflight` and to clear it again, so
/// writers and readers of the file go on while its chunks are hashed, compressed and committed.
#[derive(Default)]
pub struct FileEntry {
    pub(crate) flush: Mutex<()>,
    pub(crate) state: RwLock<FileState>,
}

/// Unflushed state of one file.
#[derive(Default)]
pub struct FileState {
    /// Whole chunks by index, newer than what the chunk map (and `inflight`) holds.
    pub(crate) dirty: Chunks,
    /// Chunks being committed by a flush: newer than the chunk map, older than `dirty`.
    pub(crate) inflight: Option<Arc<Chunks>>,
    /// File size if changed since the last flush.
    pub(crate) size: Option<u64>,
    /// Modification time (and ctime) if changed since the last flush.
    pub(crate) mtime: Option<Time>,
    /// Chunks rewritten in part after being stored (read back to take a partial write): the
    /// hot set, compressed at [`HOT_ZSTD_LEVEL`] when flushed. A hint only: an index left here
    /// after its chunk was dropped costs nothing.
    pub(crate) hot: HashSet<u64>,
}

impl FileState {
    pub(crate) fn overlay(&self, inode: &mut Inode) {
        if let Some(s) = self.size {
            inode.size = s;
        }
        if let Some(t) = self.mtime {
            inode.mtime = t;
            inode.ctime = t;
        }
    }

    fn is_clean(&self) -> bool {
        self.dirty.is_empty()
            && self.inflight.is_none()
            && self.size.is_none()
            && self.mtime.is_none()
    }

    /// The newest unflushed copy of chunk `idx`, if any.
    pub(crate) fn chunk(&self, idx: u64) -> Option<&[u8]> {
        self.dirty
            .get(&idx)
            .or_else(|| self.inflight.as_ref().and_then(|f| f.get(&idx)))
            .map(|b| &b[..])
    }

    /// Chunks held in memory (dirty or in flight). A chunk rewritten while its flush is in
    /// flight counts twice: this feeds only the allocated-size estimate, which is capped by
    /// the file size, and it is O(1) where counting exactly cost a map walk per `getattr`
    /// (every NFS WRITE answers with attributes).
    pub(crate) fn chunk_count(&self) -> usize {
        self.dirty.len() + self.inflight.as_ref().map_or(0, |f| f.len())
    }
}

/// A time to set: the server's clock or a given time.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(Time),
}

/// Attribute changes (each `None` leaves the attribute alone).
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Time>,
}

/// What `fallocate` should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Falloc {
    /// Make the range part of the file (extends the size unless `keep_size`). Nothing is
    /// reserved: the datastore is thin, space is used when data is written.
    Allocate { keep_size: bool },
    /// Turn the range into a hole; the size does not change.
    PunchHole,
    /// Make the range read as zeros (extends the size unless `keep_size`).
    ZeroRange { keep_size: bool },
}

/// A write of `data` at `offset` must end within the largest file size.
fn check_range(offset: u64, data: &[u8]) -> FsResult<()> {
    offset
        .checked_add(data.len() as u64)
        .filter(|&e| e <= MAX_FILE_SIZE)
        .map(|_| ())
        .ok_or(FsError::TooBig)
}

/// File data operations apply to regular files only.
fn require_file(kind: Kind) -> FsResult<()> {
    match kind {
        Kind::File => Ok(()),
        Kind::Dir => Err(FsError::IsDir),
        _ => Err(FsError::Invalid("not a regular file")),
    }
}

impl Engine {
    pub(crate) fn entry(&self, ino: InodeId) -> Arc<FileEntry> {
        self.files.entry(ino).or_default().clone()
    }

    /// Forget the unflushed state of a deleted inode.
    pub(crate) fn drop_state(&self, ino: InodeId) {
        if let Some((_, st)) = self.files.remove(&ino) {
            let _f = st.flush.lock();
            let mut g = st.state.write();
            let n = g.dirty.len() as u64 * self.chunk_size;
            g.dirty.clear();
            self.dirty_bytes.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Bytes of unflushed file data held in memory.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// Read up to `len` bytes at `offset` (short at end of file).
    pub fn read(&self, ino: InodeId, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        self.read_with_attr(ino, offset, len).map(|r| r.0)
    }

    /// [`Engine::read`], with the file's attributes as of the read (same snapshot): an NFS READ
    /// answers both, and one look at the metadata costs half of two.
    pub fn read_with_attr(&self, ino: InodeId, offset: u64, len: u32) -> FsResult<(Vec<u8>, Attr)> {
        self.timings
            .time(Stage::Read, || self.read_timed(ino, offset, len))
    }

    fn read_timed(&self, ino: InodeId, offset: u64, len: u32) -> FsResult<(Vec<u8>, Attr)> {
        let st = self.files.get(&ino).map(|s| s.clone());
        let g = st.as_ref().map(|s| s.state.read());
        let rtx = self.read_txn()?;
        let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
        require_file(inode.kind)?;
        let attr = self.attr_of(ino, inode.clone(), g.as_deref());
        let size = g.as_ref().and_then(|g| g.size).unwrap_or(inode.size);
        if offset >= size || len == 0 {
            return Ok((Vec::new(), attr));
        }
        let end = (offset + u64::from(len)).min(size);
        let c = self.chunk_size;
        let (first, last) = (offset / c, (end - 1) / c);
        let mut out = vec![0u8; (end - offset) as usize];
        let copy = |out: &mut [u8], idx: u64, chunk: &[u8]| {
            let s = offset.max(idx * c);
            let e = end.min((idx + 1) * c);
            out[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&chunk[(s - idx * c) as usize..(e - idx * c) as usize]);
        };
        let mem = g.as_deref();
        let nodes = rtx.open_table(NODES)?;
        let stored: Vec<(u64, ChunkKey)> = tree::collect(&nodes, inode.root, first, last + 1)?
            .into_iter()
            .filter(|(i, _)| mem.is_none_or(|m| m.chunk(*i).is_none()))
            .collect();
        if let Some(m) = mem {
            if let Some(f) = &m.inflight {
                for (&idx, buf) in f.range(first..=last) {
                    copy(&mut out, idx, buf);
                }
            }
            for (&idx, buf) in m.dirty.range(first..=last) {
                copy(&mut out, idx, buf);
            }
        }
        let keys: Vec<ChunkKey> = stored.iter().map(|s| s.1).collect();
        let chunks = self.store.read_many(&rtx, &keys);
        for ((idx, _), r) in stored.iter().map(|s| (s.0, ())).zip(chunks) {
            match r {
                Ok(data) => copy(&mut out, idx, &data),
                Err(e) => {
                    let e = FsError::from(e).at(ino.0, idx * c);
                    tracing::error!(file = %self.path_of(ino), offset = idx * c, "read failed: {e}");
                    return Err(e);
                }
            }
        }
        Ok((out, attr))
    }

    /// Write `data` at `offset`; returns the bytes written (all of them).
    pub fn write(&self, ino: InodeId, offset: u64, data: &[u8]) -> FsResult<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        check_range(offset, data)?;
        // Make room first: if the buffer is full and cannot be flushed (full disk), the write
        // fails with nothing buffered, instead of being buffered and reported as failed.
        self.relieve_pressure(ino)?;
        let st = self.entry(ino);
        let mut g = st.state.write();
        self.write_locked(ino, &mut g, offset, data)?;
        Ok(data.len())
    }

    /// [`Engine::write`] for NFS: `admit` sees the file's attributes first (a stale handle is
    /// refused before anything is written); returns the attributes from just before and just
    /// after the write, all from one metadata snapshot (a WRITE reply carries both).
    pub fn write_with_attrs<E: From<FsError>>(
        &self,
        ino: InodeId,
        offset: u64,
        data: &[u8],
        admit: impl FnOnce(&Attr) -> Result<(), E>,
    ) -> Result<(Attr, Attr), E> {
        check_range(offset, data)?;
        self.relieve_pressure(ino)?;
        let st = self.entry(ino);
        let mut g = st.state.write();
        let rtx = self.read_txn()?;
        let inode = get_inode(&rtx.open_table(INODES).map_err(FsError::from)?, ino)?;
        let before = self.attr_of(ino, inode.clone(), Some(&g));
        admit(&before)?;
        require_file(inode.kind)?;
        let mut stored = Some((rtx, inode));
        if !data.is_empty() {
            // A zero-length write changes nothing (not even the size past its offset).
            self.write_into(ino, &mut g, offset, data, &mut stored)?;
        }
        let (_, inode) = stored.expect("kept by write_into");
        let after = self.attr_of(ino, inode, Some(&g));
        Ok((before, after))
    }

    pub(crate) fn write_locked(
        &self,
        ino: InodeId,
        g: &mut FileState,
        offset: u64,
        data: &[u8],
    ) -> FsResult<()> {
        self.write_into(ino, g, offset, data, &mut None)
    }

    /// Copy `data` into the file's dirty chunks; `stored` is the snapshot and stored inode to
    /// read partly covered chunks from (taken on first need when `None`).
    fn write_into<'e>(
        &'e self,
        ino: InodeId,
        g: &mut FileState,
        offset: u64,
        data: &[u8],
        stored: &mut Option<(super::Snapshot<'e>, Inode)>,
    ) -> FsResult<()> {
        self.timings.time(Stage::Write, || {
            self.write_into_timed(ino, g, offset, data, stored)
        })
    }

    fn write_into_timed<'e>(
        &'e self,
        ino: InodeId,
        g: &mut FileState,
        offset: u64,
        data: &[u8],
        stored: &mut Option<(super::Snapshot<'e>, Inode)>,
    ) -> FsResult<()> {
        let c = self.chunk_size;
        let end = offset + data.len() as u64;
        let load = |stored: &mut Option<(super::Snapshot<'e>, Inode)>| -> FsResult<()> {
            if stored.is_none() {
                let rtx = self.read_txn()?;
                let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
                *stored = Some((rtx, inode));
            }
            Ok(())
        };
        if g.size.is_none() {
            load(stored)?;
            if let Some((_, inode)) = &*stored {
                require_file(inode.kind)?;
            }
        }
        let mut pos = offset;
        while pos < end {
            let idx = pos / c;
            let cs = idx * c;
            let ce = (cs + c).min(end);
            if !g.dirty.contains_key(&idx) {
                let buf = if pos == cs && ce == cs + c {
                    vec![0u8; c as usize]
                } else if let Some(b) = g.inflight.as_ref().and_then(|f| f.get(&idx)) {
                    g.hot.insert(idx);
                    b.to_vec()
                } else {
                    load(stored)?;
                    let (rtx, inode) = stored.as_ref().expect("loaded above");
                    let nodes = rtx.open_table(NODES)?;
                    let stored_id = tree::get(&nodes, inode.root, idx)?;
                    if stored_id.is_some() {
                        g.hot.insert(idx);
                    }
                    match stored_id {
                        Some(id) => self
                            .timings
                            .time(Stage::RmwRead, || self.store.read(rtx, id))
                            .map_err(|e| {
                                let e = FsError::from(e).at(ino.0, cs);
                                tracing::error!(file = %self.path_of(ino), offset = cs, "read for write failed: {e}");
                                e
                            })?
                            .to_vec(),
                        None => vec![0u8; c as usize],
                    }
                };
                g.dirty.insert(idx, buf.into_boxed_slice());
                self.dirty_bytes.fetch_add(c, Ordering::Relaxed);
            }
            let buf = g.dirty.get_mut(&idx).expect("inserted above");
            buf[(pos - cs) as usize..(ce - cs) as usize]
                .copy_from_slice(&data[(pos - offset) as usize..(ce - offset) as usize]);
            pos = ce;
        }
        let size = match g.size {
            Some(s) => s,
            None => stored.as_ref().map_or(0, |s| s.1.size),
        };
        g.size = Some(size.max(end));
        g.mtime = Some(Time::now());
        Ok(())
    }

    /// Keep the dirty total under the limit.
    ///
    /// Past half the limit the background flusher (if running) is woken and writers go on, so
    /// hashing and compressing overlap with new writes. Past the limit, writers wait for the
    /// flusher's next batch (see [`FLUSH_BATCH_SHARE`]; it signals each):
    /// a writer that flushed whole files itself held its thread (an NFS worker) for hundreds
    /// of milliseconds and queued behind the flusher's lock, which made the write latency
    /// tail. If the flusher makes no progress for [`PRESSURE_WAIT`] (a full disk), the writer
    /// flushes itself, so the write fails with nothing buffered rather than waiting forever.
    fn relieve_pressure(&self, ino: InodeId) -> FsResult<()> {
        let limit = self.tuning.dirty_limit;
        if self.dirty_bytes() <= limit / 2 {
            return Ok(());
        }
        if self.flusher_running.load(Ordering::Relaxed) {
            *self.pressure.0.lock() = true;
            self.pressure.1.notify_one();
            let deadline = std::time::Instant::now() + PRESSURE_WAIT;
            while self.dirty_bytes() > limit && std::time::Instant::now() < deadline {
                let mut g = self.progress.0.lock();
                self.progress.1.wait_for(&mut g, Duration::from_millis(20));
            }
            if self.dirty_bytes() <= limit {
                return Ok(());
            }
        }
        self.flush_ino(ino, false)?;
        if self.dirty_bytes() > self.tuning.dirty_limit {
            let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
            for i in inos {
                if self.dirty_bytes() <= self.tuning.dirty_limit / 2 {
                    break;
                }
                self.flush_ino(i, false)?;
            }
        }
        Ok(())
    }

    /// True when writers are past the dirty limit and will wait for the flusher (front ends
    /// run such writes where waiting does not hold up other requests).
    pub fn under_pressure(&self) -> bool {
        self.dirty_bytes() > self.tuning.dirty_limit
    }

    /// Flush one file's unflushed data; durably (with everything committed before) if asked.
    pub fn flush_ino(&self, ino: InodeId, durable: bool) -> FsResult<()> {
        self.flush_part(ino, None)?;
        if durable {
            self.make_durable()?;
        }
        Ok(())
    }

    /// Commit one file's dirty chunks (all of them, or the `max` lowest-indexed: one batch
    /// of the background flusher, which keeps its transactions and the writers' waits short
    /// and touches one region of the chunk map at a time), with its size and mtime. Returns
    /// whether dirty chunks remain.
    pub(crate) fn flush_part(&self, ino: InodeId, max: Option<usize>) -> FsResult<bool> {
        let Some(st) = self.files.get(&ino).map(|s| s.clone()) else {
            return Ok(false);
        };
        let _one_flush = st.flush.lock();
        let (batch, size, mtime) = {
            let mut g = st.state.write();
            if g.is_clean() {
                (None, None, None)
            } else {
                let taken = match max.and_then(|m| g.dirty.keys().nth(m).copied()) {
                    Some(split) => {
                        let rest = g.dirty.split_off(&split);
                        std::mem::replace(&mut g.dirty, rest)
                    }
                    None => std::mem::take(&mut g.dirty),
                };
                let hot: HashSet<u64> = if g.dirty.is_empty() {
                    std::mem::take(&mut g.hot)
                } else {
                    taken.keys().filter(|k| g.hot.remove(k)).copied().collect()
                };
                let batch = Arc::new(taken);
                g.inflight = Some(batch.clone());
                (Some((batch, hot)), g.size, g.mtime)
            }
        };
        let Some((batch, hot)) = batch else {
            return Ok(false);
        };
        // The heavy part runs without the state lock: writers and readers go on.
        let r = self.commit_chunks(ino, &batch, &hot, size, mtime, None, false);
        let mut g = st.state.write();
        g.inflight = None;
        match r {
            Ok(()) => {
                if g.size == size {
                    g.size = None;
                }
                if g.mtime == mtime {
                    g.mtime = None;
                }
                self.dirty_bytes
                    .fetch_sub(batch.len() as u64 * self.chunk_size, Ordering::Relaxed);
                self.progress.1.notify_all();
                Ok(!g.dirty.is_empty())
            }
            Err(e) => {
                // Nothing was committed: the chunks are dirty again (unless rewritten).
                for (k, v) in batch.iter() {
                    if !g.dirty.contains_key(k) {
                        g.dirty.insert(*k, v.clone());
                    } else {
                        self.dirty_bytes
                            .fetch_sub(self.chunk_size, Ordering::Relaxed);
                    }
                }
                g.hot.extend(hot);
                Err(e)
            }
        }
    }

    /// `fsync`/`fdatasync`: on return, everything written to `ino` survives a power loss.
    pub fn fsync(&self, ino: InodeId) -> FsResult<()> {
        self.flush_ino(ino, false)?;
        self.make_durable()
    }

    /// Make every commit completed so far durable, sharing one durable commit between callers
    /// that arrive together (group commit): a caller whose commits were covered by a durable
    /// commit that started after them returns without committing again.
    pub fn make_durable(&self) -> FsResult<()> {
        let mine = self.commits.load(Ordering::SeqCst);
        let _one_at_a_time = self.durable_lock.lock();
        if self.durable_upto.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        self.barrier()
    }

    /// A durable commit: makes every earlier commit (and the packs they reference) durable.
    pub fn barrier(&self) -> FsResult<()> {
        self.timings.time(Stage::Durable, || {
            self.txn(true, |w| {
                w.counter(K_BARRIERS, 0)?;
                Ok(())
            })
        })
    }

    /// Flush every file and commit durably (`syncfs`, the periodic flusher, unmount).
    pub fn sync_all(&self) -> FsResult<()> {
        let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
        for ino in inos {
            self.flush_ino(ino, false)?;
        }
        self.barrier()?;
        // Forget clean states nobody holds (only the map's reference left).
        self.files.retain(|_, s| {
            Arc::strong_count(s) > 1 || s.state.try_read().is_none_or(|g| !g.is_clean())
        });
        Ok(())
    }

    /// Commit the unflushed state of a file (the caller holds its `flush` and `state` locks,
    /// so nothing is in flight), plus `holes`: a range of chunk indexes to turn into holes.
    pub(crate) fn flush_locked(
        &self,
        ino: InodeId,
        g: &mut FileState,
        durable: bool,
        holes: Option<Range<u64>>,
    ) -> FsResult<()> {
        debug_assert!(g.inflight.is_none());
        if g.is_clean() && holes.is_none() {
            return if durable { self.barrier() } else { Ok(()) };
        }
        self.commit_chunks(ino, &g.dirty, &g.hot, g.size, g.mtime, holes, durable)?;
        let n = g.dirty.len() as u64;
        *g = FileState::default();
        self.dirty_bytes
            .fetch_sub(n * self.chunk_size, Ordering::Relaxed);
        Ok(())
    }

    /// Store `chunks` (hash, dedup, compress, append) and commit them, the size and mtime into
    /// the file's chunk map and inode in one transaction.
    #[allow(clippy::too_many_arguments)]
    fn commit_chunks(
        &self,
        ino: InodeId,
        chunks: &Chunks,
        hot: &HashSet<u64>,
        size: Option<u64>,
        mtime: Option<Time>,
        holes: Option<Range<u64>>,
        durable: bool,
    ) -> FsResult<()> {
        let level = self.store.zstd_level();
        // From the first append to the commit below (see `Store::append_session`).
        let _appending = self.store.append_session();
        let hashed: Vec<(u64, Option<ChunkId>)> = chunks
            .par_iter()
            .map(|(&i, b)| {
                let id = self
                    .timings
                    .time(Stage::Hash, || (!is_zero(b)).then(|| ChunkId::of(b)));
                (i, id)
            })
            .collect();
        let mut need: Vec<(ChunkId, u64)> = Vec::new();
        {
            let mut seen = HashSet::new();
            let distinct: Vec<(ChunkId, u64)> = hashed
                .iter()
                .filter_map(|(i, id)| id.filter(|id| seen.insert(*id)).map(|id| (id, *i)))
                .collect();
            let ids: Vec<ChunkId> = distinct.iter().map(|d| d.0).collect();
            let stored = self.store.contains_many(&*self.read_txn()?, &ids)?;
            need.extend(
                distinct
                    .into_iter()
                    .zip(stored)
                    .filter(|(_, s)| !s)
                    .map(|(d, _)| d),
            );
        }
        // Compress on all cores, 4 MiB at a time, so compressed copies never pile up in memory;
        // each group is appended to the pack while the next one compresses (the append is a
        // serial copy into the page cache, and without the overlap a core would sit idle).
        let mut locs = HashMap::new();
        let encode = |group: &[(ChunkId, u64)]| -> Vec<Encoded> {
            group
                .par_iter()
                .map(|(id, i)| {
                    let level = if hot.contains(i) {
                        HOT_ZSTD_LEVEL
                    } else {
                        level
                    };
                    self.timings
                        .time(Stage::Compress, || Encoded::new(*id, &chunks[i], level))
                })
                .collect()
        };
        let mut append =
            |encoded: Vec<Encoded>| -> FsResult<Vec<(ChunkId, crate::store::ChunkLoc)>> {
                let ls = self
                    .timings
                    .time(Stage::Append, || self.store.append_many(&encoded))?;
                Ok(encoded.iter().map(|e| e.id).zip(ls).collect())
            };
        let mut pending: Option<Vec<Encoded>> = None;
        let mut appending = || -> FsResult<()> {
            for group in need.chunks(256) {
                let prev = pending.take();
                let (encoded, appended) = rayon::join(|| encode(group), || prev.map(&mut append));
                if let Some(a) = appended {
                    locs.extend(a?);
                }
                pending = Some(encoded);
            }
            if let Some(p) = pending.take() {
                locs.extend(append(p)?);
            }
            Ok(())
        };
        if let Err(e) = appending() {
            // What was appended before the failure is referenced by nothing.
            self.settle_failed_appends(&locs);
            return Err(e);
        }
        let mut updates = hashed;
        updates.sort_unstable_by_key(|u| u.0);
        let dirty = chunks;
        let t = super::timing::thread_cpu_ns();
        let r = self.txn(durable, |w| {
            let mut inode = match w.inode(ino) {
                Ok(i) => i,
                // Deleted meanwhile (NFS has no open state): its data goes with it.
                Err(FsError::NotFound) => {
                    w.chunks.settle_appended(&locs)?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            // A chunk seen as stored may have lost its last reference since: store it again.
            for (i, id) in &updates {
                if let Some(id) = id {
                    if !locs.contains_key(id) && w.chunks.find(id)?.is_none_or(|(_, l)| l.is_lost())
                    {
                        let e = Encoded::new(*id, &dirty[i], level);
                        locs.insert(*id, self.store.append(&e)?);
                    }
                }
            }
            if let Some(h) = &holes {
                // Chunks being committed here are newer than the punch (the caller dropped
                // the dirty ones inside the range), so the range is cleared first.
                let (root, total) = w.tree().clear(inode.root, h.start, h.end)?;
                inode.root = root;
                inode.aux = total;
            }
            let mut keyed = Vec::with_capacity(updates.len());
            for (i, id) in &updates {
                let key = match id {
                    Some(id) => Some(w.chunks.reference(id, locs.get(id))?),
                    None => None,
                };
                keyed.push((*i, key));
            }
            let (root, total) = w.tree().set(inode.root, &keyed)?;
            inode.root = root;
            inode.aux = total;
            if let Some(s) = size {
                inode.size = s;
            }
            if let Some(t) = mtime {
                inode.mtime = t;
                inode.ctime = t;
            }
            w.chunks.settle_appended(&locs)?;
            w.put_inode(ino, &inode)
        });
        let stage = if durable {
            Stage::Durable
        } else {
            Stage::Commit
        };
        self.timings
            .add(stage, super::timing::thread_cpu_ns().saturating_sub(t));
        if r.is_err() {
            self.settle_failed_appends(&locs);
        }
        r
    }

    /// Change attributes (a size change truncates or extends with a hole).
    pub fn setattr(&self, ino: InodeId, s: &SetAttr) -> FsResult<Attr> {
        if s.size.is_some_and(|sz| sz > MAX_FILE_SIZE) {
            return Err(FsError::TooBig);
        }
        let st = match self.files.get(&ino).map(|x| x.clone()) {
            Some(st) => Some(st),
            None if s.size.is_some() => Some(self.entry(ino)),
            None => None,
        };
        let _f = st.as_ref().map(|s| s.flush.lock());
        let mut g = st.as_ref().map(|s| s.state.write());
        if let Some(g) = g.as_deref_mut() {
            self.flush_locked(ino, g, false, None)?;
        }
        let c = self.chunk_size;
        // Truncating inside a chunk: that chunk's tail past the new size must read as zeros.
        let mut tail: Option<(u64, Option<ChunkId>, Option<Encoded>)> = None;
        if let Some(sz) = s.size {
            let rtx = self.read_txn()?;
            let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
            require_file(inode.kind)?;
            if sz < inode.size && sz % c != 0 {
                let idx = sz / c;
                if let Some(id) = tree::get(&rtx.open_table(NODES)?, inode.root, idx)? {
                    let mut data = self
                        .store
                        .read(&rtx, id)
                        .map_err(|e| FsError::from(e).at(ino.0, idx * c))?
                        .to_vec();
                    data[(sz % c) as usize..].fill(0);
                    tail = Some(if is_zero(&data) {
                        (idx, None, None)
                    } else {
                        let nid = ChunkId::of(&data);
                        (
                            idx,
                            Some(nid),
                            Some(Encoded::new(nid, &data, self.store.zstd_level())),
                        )
                    });
                }
            }
        }
        // The tail chunk may be appended inside the transaction (see `Store::append_session`).
        let _appending = tail.is_some().then(|| self.store.append_session());
        let inode = self.meta_txn(|w| {
            let mut i = w.inode(ino)?;
            let now = Time::now();
            let mut changed = false;
            if let Some(m) = s.mode {
                i.perm = (m & 0o7777) as u16;
                changed = true;
            }
            if let Some(u) = s.uid {
                i.uid = u;
                changed = true;
            }
            if let Some(gid) = s.gid {
                i.gid = gid;
                changed = true;
            }
            if let Some(sz) = s.size {
                if let Some((idx, id, enc)) = &tail {
                    let mut appended = None;
                    if let Some(e) = enc {
                        if w.chunks.find(&e.id)?.is_none_or(|(_, l)| l.is_lost()) {
                            appended = Some(self.store.append(e)?);
                        }
                    }
                    let key = match id {
                        Some(id) => Some(w.chunks.reference(id, appended.as_ref())?),
                        None => None,
                    };
                    let (r, t) = w.tree().set(i.root, &[(*idx, key)])?;
                    i.root = r;
                    i.aux = t;
                }
                if sz < i.size {
                    let (r, t) = w.tree().truncate(i.root, sz.div_ceil(c))?;
                    i.root = r;
                    i.aux = t;
                }
                if sz != i.size {
                    i.mtime = now;
                }
                i.size = sz;
                changed = true;
            }
            match s.atime {
                Some(SetTime::Now) => i.atime = now,
                Some(SetTime::At(t)) => i.atime = t,
                None => {}
            }
            match s.mtime {
                Some(SetTime::Now) => i.mtime = now,
                Some(SetTime::At(t)) => i.mtime = t,
                None => {}
            }
            changed |= s.atime.is_some() || s.mtime.is_some();
            if let Some(t) = s.ctime {
                i.ctime = t;
            } else if changed {
                i.ctime = now;
            }
            w.put_inode(ino, &i)?;
            Ok(i)
        })?;
        Ok(self.attr_of(ino, inode, g.as_deref()))
    }

    /// Punch holes, zero ranges or extend (see [`Falloc`]).
    pub fn fallocate(&self, ino: InodeId, offset: u64, len: u64, mode: Falloc) -> FsResult<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        if len == 0 {
            return Err(FsError::Invalid("fallocate of zero bytes"));
        }
        let st = self.entry(ino);
        let _f = st.flush.lock();
        let mut g = st.state.write();
        let inode = self.getattr_locked(ino, &g)?;
        require_file(inode.kind)?;
        let (keep_size, zero) = match mode {
            Falloc::Allocate { keep_size } => (keep_size, false),
            Falloc::PunchHole => (true, true),
            Falloc::ZeroRange { keep_size } => (keep_size, true),
        };
        if zero && offset < inode.size {
            let zend = end.min(inode.size);
            let c = self.chunk_size;
            // Whole chunks inside the range become one hole range in the chunk map (memory
            // and work independent of the range's length: a 1 PiB punch costs what a 1 MiB
            // one does); the partial chunks at its edges are zeroed in place.
            let (first_whole, end_whole) = (offset.div_ceil(c), zend / c);
            if first_whole < end_whole {
                let gone: Vec<u64> = g
                    .dirty
                    .range(first_whole..end_whole)
                    .map(|(&k, _)| k)
                    .collect();
                for k in gone {
                    g.dirty.remove(&k);
                    self.dirty_bytes.fetch_sub(c, Ordering::Relaxed);
                }
                let head = (offset, (first_whole * c).min(zend));
                let tail = ((end_whole * c).max(offset), zend);
                for (s, e) in [head, tail] {
                    if s < e {
                        self.write_locked(ino, &mut g, s, &vec![0u8; (e - s) as usize])?;
                    }
                }
            } else {
                // Inside one chunk or across one chunk boundary: at most two partial chunks.
                self.write_locked(ino, &mut g, offset, &vec![0u8; (zend - offset) as usize])?;
            }
            // Zeroing must not move the size or times beyond what the caller asked.
            g.size = Some(inode.size);
            g.mtime = Some(Time::now());
            let holes = (first_whole < end_whole).then_some(first_whole..end_whole);
            self.flush_locked(ino, &mut g, false, holes)?;
        }
        if !keep_size && end > inode.size {
            g.size = Some(end);
            g.mtime = Some(Time::now());
        }
        Ok(())
    }

    fn getattr_locked(&self, ino: InodeId, g: &FileState) -> FsResult<Inode> {
        let rtx = self.read_txn()?;
        let mut i = get_inode(&rtx.open_table(INODES)?, ino)?;
        g.overlay(&mut i);
        Ok(i)
    }

    /// `lseek` with SEEK_DATA (`data`) or SEEK_HOLE: the next offset `>= offset` in data or in
    /// a hole; `None` (ENXIO) at or past the end of the file.
    pub fn seek(&self, ino: InodeId, offset: u64, data: bool) -> FsResult<Option<u64>> {
        let st = self.files.get(&ino).map(|s| s.clone());
        let g = st.as_ref().map(|s| s.state.read());
        let rtx = self.read_txn()?;
        let mut inode = get_inode(&rtx.open_table(INODES)?, ino)?;
        if let Some(g) = g.as_deref() {
            g.overlay(&mut inode);
        }
        if offset >= inode.size {
            return Ok(None);
        }
        let nodes = rtx.open_table(NODES)?;
        let c = self.chunk_size;
        let dirty = g.as_ref().map(|g| &g.dirty);
        let inflight = g.as_ref().and_then(|g| g.inflight.as_ref());
        let mut idx = offset / c;
        if data {
            let t = tree::seek(&nodes, inode.root, idx, true)?;
            let d = [dirty, inflight.map(|f| &**f)]
                .into_iter()
                .flatten()
                .filter_map(|d| d.range(idx..).next().map(|(&k, _)| k))
                .min();
            let found = match (t, d) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok(found
                .map(|i| (i * c).max(offset))
                .filter(|&o| o < inode.size))
        } else {
            loop {
                let h = tree::seek(&nodes, inode.root, idx, false)?.unwrap_or(u64::MAX / c);
                if dirty.is_some_and(|d| d.contains_key(&h))
                    || inflight.is_some_and(|f| f.contains_key(&h))
                {
                    idx = h + 1;
                    continue;
                }
                return Ok(Some((h * c).max(offset).min(inode.size)));
            }
        }
    }

    /// Start the background flusher: every `interval`, flush all files durably. It stops
    /// when the engine is dropped.
    /// It also runs when writers signal memory pressure, flushing (not durably) until the
    /// dirty total is under a quarter of the limit.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) -> std::thread::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let signal = self.pressure.clone();
        self.flusher_running.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("tessera-flush".into())
            .spawn(move || loop {
                let pressure = {
                    let mut p = signal.0.lock();
                    if !*p {
                        signal.1.wait_for(&mut p, interval);
                    }
                    std::mem::take(&mut *p)
                };
                let Some(e) = weak.upgrade() else { return };
                let r = if pressure {
                    e.flush_some(e.tuning.dirty_limit / 4)
                } else {
                    e.sync_all()
                };
                if let Err(err) = r {
                    tracing::error!("background flush failed (will retry): {err}");
                }
            })
            .expect("spawn flusher thread")
    }

    /// Flush files (not durably), a batch at a time, until at most `target` bytes are dirty.
    fn flush_some(&self, target: u64) -> FsResult<()> {
        let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
        for ino in inos {
            while self.dirty_bytes() > target {
                let batch = (self.tuning.dirty_limit / FLUSH_BATCH_SHARE / self.chunk_size).max(64);
                if !self.flush_part(ino, Some(batch as usize))? {
                    break;
                }
            }
            if self.dirty_bytes() <= target {
                break;
            }
        }
        Ok(())
    }
}
