//! File data: the write-back buffer (writes land in a per-file `FileState`), and the types of
//! the data API (`SetAttr`, `Falloc`). Reads are in `read.rs`, flushing in `flush.rs`, size
//! and extent changes in `extent.rs`.
//!
//! # Write-back
//! A write lands in the file's [`FileState`]: each touched chunk is held in memory, whole or
//! as the ranges written so far ([`DirtyChunk`]; the stored chunk under a partial one is loaded
//! by the flush, in a batch, not by the write, unless the buffer is past half its limit), so a
//! burst of 4 KiB writes into one chunk costs one load and one hash + compress + append when
//! flushed, not one per write. Dirty data is flushed (1) by `fsync`, durably; (2) by the
//! background flusher every few seconds, durably; (3) when the dirty total passes
//! [`super::Tuning::dirty_limit`] (memory pressure); (4) before operations that need the file's
//! stored state (truncate, clone, copy ranges). Reads see dirty data.
//!
//! # Flush
//! Complete partial chunks from their stored bases (in a batch, with the file's state lock
//! released); hash dirty chunks (in parallel); skip all-zero ones (holes); look up each id;
//! compress and append only the new ones; then one transaction points the file's chunk map at
//! them and adjusts reference counts. Unchanged invariant: bytes past EOF inside the last chunk are 0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

use super::dirty::{DirtyChunk, MAX_RANGES};
use super::inode::{Inode, InodeId, Kind, Time};
use super::timing::Stage;
use super::{get_inode, Attr, Engine, FsError, FsResult, MAX_FILE_SIZE};
use crate::schema::INODES;

/// Share of the dirty limit the background flusher commits per transaction under memory
/// pressure (a batch of the lowest-indexed dirty chunks of a file). It is woken at half the
/// limit, so one batch takes about what was dirty then. Smaller batches cost more, in CPU and
/// in space: a flushed chunk updates two chunk-index entries at random keys and a transaction
/// rewrites each index page it touches, so 1024-chunk batches rewrote about 1.3 index pages per
/// chunk where half-limit batches rewrite about 0.4 (`commit` 38 -> 26-30 us per I/O in
/// benches/vdi.sh), and the metadata file grew by 1.7 % of a 1 GiB deduplicated copy, not
/// 0.x % (pages freed by commits that are not yet durable cannot be reused).
pub(super) const FLUSH_BATCH_SHARE: u64 = 2;

/// How long a writer past the dirty limit waits for the flusher before flushing itself.
pub(super) const PRESSURE_WAIT: Duration = Duration::from_secs(2);

/// Stored chunks loaded for a partial write before it takes effect, by chunk index (`None`:
/// a hole). See [`Engine::preload`].
type Preloaded = BTreeMap<u64, Option<super::flush::Base>>;

/// Chunk buffers by chunk index.
pub(crate) type Chunks = BTreeMap<u64, DirtyChunk>;

#[cfg(test)]
thread_local! {
    /// Tests: run once on this thread while the next preload has the state lock released
    /// (another writer's write and flush, deterministically inside the window).
    pub(super) static WHILE_PRELOADING: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        std::cell::RefCell::new(None);
    /// Tests: run once on this thread while the next flush loads the bases of partial chunks
    /// with the state lock released (another writer's write, deterministically in the window).
    pub(super) static WHILE_COMPLETING: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        std::cell::RefCell::new(None);
}

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
    /// Chunks written in part inside the file (a stored chunk completed by a partial write,
    /// or a hole inside the file filled in part by a write smaller than a chunk): the
    /// hot set, stored uncompressed when flushed (`Encoded::uncompressed`) and compressed
    /// later by compaction, because a desktop's random 4 KiB writes come back to the same
    /// chunks. Chunks past the end of the file (a file written front to back, whatever its
    /// write size) and the edges of large writes into holes (a copy's extents) are compressed
    /// at once. A hint only: an index left here after its chunk was dropped costs nothing.
    pub(crate) hot: BTreeSet<u64>,
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

    pub(super) fn is_clean(&self) -> bool {
        self.dirty.is_empty()
            && self.inflight.is_none()
            && self.size.is_none()
            && self.mtime.is_none()
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
pub(super) fn check_range(offset: u64, data: &[u8]) -> FsResult<()> {
    offset
        .checked_add(data.len() as u64)
        .filter(|&e| e <= MAX_FILE_SIZE)
        .map(|_| ())
        .ok_or(FsError::TooBig)
}

/// File data operations apply to regular files only.
pub(super) fn require_file(kind: Kind) -> FsResult<()> {
    match kind {
        Kind::File => Ok(()),
        Kind::Dir => Err(FsError::IsDir),
        _ => Err(FsError::Invalid("not a regular file")),
    }
}

/// [`require_file`] for a change of the file's data or size: snapshots and replicas are
/// read-only.
pub(super) fn require_writable(inode: &Inode) -> FsResult<()> {
    require_file(inode.kind)?;
    if inode.is_read_only() {
        return Err(FsError::ReadOnly);
    }
    Ok(())
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
        self.write_loading(ino, &mut g, offset, data, &mut None)?;
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
        require_writable(&inode)?;
        let mut stored = Some((rtx, inode));
        if !data.is_empty() {
            // A zero-length write changes nothing (not even the size past its offset).
            self.write_loading(ino, &mut g, offset, data, &mut stored)?;
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
            self.write_into_timed(ino, g, offset, data, stored, Preloaded::new())
        })
    }

    /// [`Engine::preload`] then [`Engine::write_into`], timed as one `Write` stage (its loads are
    /// charged to `RmwRead` alone).
    fn write_loading<'e>(
        &'e self,
        ino: InodeId,
        g: &mut RwLockWriteGuard<'_, FileState>,
        offset: u64,
        data: &[u8],
        stored: &mut Option<(super::Snapshot<'e>, Inode)>,
    ) -> FsResult<()> {
        self.timings.time(Stage::Write, || {
            let pre = self.preload(ino, g, offset, data.len() as u64, stored)?;
            self.write_into_timed(ino, g, offset, data, stored, pre)
        })
    }

    /// Past half the dirty limit (the flusher is behind), load the stored chunks a write
    /// covers only in part before it takes effect, with the file's state lock released:
    /// deferring the loads to the flush there made writers fill the buffer faster and then wait
    /// at the limit for batches that load thousands of chunks (write p99 4 -> 6 ms at QD16 over
    /// NFS), and loading under the lock made every other writer and reader of the file wait
    /// behind each load (6 % of writes at QD16 waited over 1 ms for the lock). Below half the
    /// limit nothing is loaded here.
    ///
    /// The loads read the snapshot in `stored`, taken under the lock. They are kept only if
    /// no transaction committed while the lock was released (`Engine::commits`): anything
    /// that changes a file's chunk map commits first (a flush clears `inflight` only after its
    /// commit), so an unchanged count means the snapshot is still the file's stored state, and
    /// chunks another writer dirtied meanwhile are newer and win in [`Engine::write_into`].
    /// Otherwise the loads are dropped, `stored` is taken again, and the write loads under the
    /// lock (commits come a few times a second: a rare retry).
    ///
    /// Lock order: the snapshot holds the store's read gate (shared, recursive) while the
    /// state lock is taken again; the gate's exclusive holder (pack deletion) takes no state
    /// lock, so this cannot close a cycle.
    fn preload<'e>(
        &'e self,
        ino: InodeId,
        g: &mut RwLockWriteGuard<'_, FileState>,
        offset: u64,
        len: u64,
        stored: &mut Option<(super::Snapshot<'e>, Inode)>,
    ) -> FsResult<Preloaded> {
        if self.dirty_bytes() <= self.tuning.dirty_limit / 2 {
            return Ok(Preloaded::new());
        }
        let c = self.chunk_size;
        let end = offset + len;
        let need: Vec<u64> = (offset / c..end.div_ceil(c))
            .filter(|&idx| {
                let whole = offset <= idx * c && end >= (idx + 1) * c;
                let held = g.dirty.contains_key(&idx)
                    || g.inflight.as_ref().is_some_and(|f| f.contains_key(&idx));
                !whole && !held
            })
            .collect();
        if need.is_empty() {
            return Ok(Preloaded::new());
        }
        let before = self.commits.load(Ordering::SeqCst);
        if stored.is_none() {
            let rtx = self.read_txn()?;
            let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
            *stored = Some((rtx, inode));
        }
        let (rtx, inode) = stored.as_ref().expect("taken above");
        let loaded = RwLockWriteGuard::unlocked(g, || -> FsResult<Preloaded> {
            #[cfg(test)]
            if let Some(meanwhile) = WHILE_PRELOADING.with(|h| h.borrow_mut().take()) {
                meanwhile();
            }
            self.load_bases(ino, rtx, inode.root, &need)
                .into_iter()
                .map(|(idx, b)| b.map(|b| (idx, b)))
                .collect()
        })?;
        if self.commits.load(Ordering::SeqCst) == before {
            return Ok(loaded);
        }
        let rtx = self.read_txn()?;
        let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
        *stored = Some((rtx, inode));
        Ok(Preloaded::new())
    }

    fn write_into_timed<'e>(
        &'e self,
        ino: InodeId,
        g: &mut FileState,
        offset: u64,
        data: &[u8],
        stored: &mut Option<(super::Snapshot<'e>, Inode)>,
        mut pre: Preloaded,
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
                require_writable(inode)?;
            }
        }
        // The size before this write (`stored` was loaded above when `g.size` is unknown).
        let size = g
            .size
            .unwrap_or_else(|| stored.as_ref().map_or(0, |s| s.1.size));
        // A write smaller than a chunk fills holes before this size in part (see
        // `FileState::hot`); a larger one (a copy whose extents start anywhere) does not.
        let inside = if data.len() as u64 >= c { 0 } else { size };
        let mut pos = offset;
        while pos < end {
            let idx = pos / c;
            let cs = idx * c;
            let ce = (cs + c).min(end);
            let whole = pos == cs && ce == cs + c;
            let src = &data[(pos - offset) as usize..(ce - offset) as usize];
            if !g.dirty.contains_key(&idx) {
                if cs < inside && !whole {
                    g.hot.insert(idx);
                }
                let chunk = if whole {
                    // Copied once, not zero-filled and then overwritten (a sequential copy's
                    // chunks are all whole).
                    DirtyChunk::whole(src.into())
                } else if let Some(b) = g.inflight.as_ref().and_then(|f| f.get(&idx)) {
                    // Newer than the stored chunk and older than this write: the copy keeps
                    // it if its flush fails (see `Engine::flush_part`).
                    g.hot.insert(idx);
                    b.clone()
                } else if let Some(base) = pre.remove(&idx) {
                    match base {
                        Some(b) => {
                            g.hot.insert(idx);
                            DirtyChunk::from_stored(b, c as usize)
                        }
                        None => DirtyChunk::whole(vec![0u8; c as usize].into_boxed_slice()),
                    }
                } else {
                    // The stored chunk (or hole) under it is loaded by the flush.
                    DirtyChunk::empty(c as usize)
                };
                g.dirty.insert(idx, chunk);
                self.dirty_bytes.fetch_add(c, Ordering::Relaxed);
                if whole {
                    pos = ce;
                    continue;
                }
            }
            let d = &g.dirty[&idx];
            if !whole
                && !d.is_whole()
                && (d.range_count() >= MAX_RANGES
                    || self.dirty_bytes() > self.tuning.dirty_limit / 2)
            {
                // Scattered tiny writes: complete the chunk now rather than track more ranges.
                // Past half the dirty limit, a chunk `preload` did not load (its loads were
                // dropped after a commit) is loaded here, under the lock, as before.
                load(stored)?;
                let (rtx, inode) = stored.as_ref().expect("loaded above");
                let base = self.load_bases(ino, rtx, inode.root, &[idx]);
                let base = base.into_iter().next().expect("one per index").1?;
                let d = g.dirty.get_mut(&idx).expect("inserted above");
                match base {
                    Some(b) => {
                        d.complete_from(b);
                        g.hot.insert(idx);
                    }
                    None => d.complete(None),
                }
            }
            let d = g.dirty.get_mut(&idx).expect("inserted above");
            d.write((pos - cs) as usize, src);
            pos = ce;
        }
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
        // A flush that fails for some chunks (a damaged chunk under a partial write) commits
        // the others: the write fails only if room could not be made.
        let mut r = self.flush_ino(ino, false);
        if self.dirty_bytes() > self.tuning.dirty_limit {
            let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
            for i in inos {
                if self.dirty_bytes() <= self.tuning.dirty_limit / 2 {
                    break;
                }
                r = r.and(self.flush_ino(i, false));
            }
        }
        if self.dirty_bytes() > self.tuning.dirty_limit {
            r?;
        }
        Ok(())
    }

    /// True when writers are past the dirty limit and will wait for the flusher (front ends
    /// run such writes where waiting does not hold up other requests).
    pub fn under_pressure(&self) -> bool {
        self.dirty_bytes() > self.tuning.dirty_limit
    }
}
