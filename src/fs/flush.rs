//! Flushing the write-back buffer: hash, dedup, compress, append and commit dirty chunks;
//! fsync, durability barriers, and the background flusher.

use super::inode::{InodeId, Time};
use super::timing::Stage;
use super::{Engine, FsError, FsResult};
use crate::schema::K_BARRIERS;
use crate::store::chunk::{is_zero, ChunkId};
use crate::store::{ChunkKey, Encoded, RecordRef};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::data::{Chunks, FileState, FLUSH_BATCH_SHARE};

/// A stored chunk under a partial write, as loaded (shared with the read cache).
pub(crate) type Base = Arc<Vec<u8>>;

/// Partial chunks completed per hold of a file's state lock. Each copies the written ranges
/// over its base and frees a 16 KiB buffer; 64 per hold measured 0.1-0.25 ms a hold (p90) and
/// up to 4 ms when the holder lost its core, while every writer and reader of the file
/// waited (VDI profile, QD4 over NFS, two cores): 8 keep each hold to tens of microseconds.
const COMPLETE_GROUP: usize = 8;

/// Background flush batches run on one core while less than this share of the dirty limit
/// (numerator, denominator) is dirty; past it, on every core (rayon's global pool). See
/// [`calm_pool`].
const CALM_BELOW: (u64, u64) = (3, 4);

/// A rayon pool of one thread for background flush batches while the write-back buffer is
/// calm. A batch hashes, compresses and loads on every core of the global pool, and on two
/// cores that took both from the request threads (and the client) for the 50-150 ms of a
/// batch: the latency tail of the VDI profile came in such episodes (fio's latency log, 5 ms
/// windows). On one core the batch leaves the other to requests: write p99 at QD4 1.56/1.61
/// -> 1.06/1.12 ms, at QD16 3.36/3.62 -> 2.54/2.70 ms, with as many IOPS or more (alternated
/// `prof` pairs, benches/README.md). A buffer filling faster than one core flushes crosses
/// [`CALM_BELOW`] and the batches spread over every core again. Shared by the process's
/// engines (one per served datastore; tests make many), built on first use.
fn calm_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "tessera-flush1".into())
            .build()
            .expect("start the flusher's one-thread pool")
    })
}

/// Flusher ticks without a commit before the metadata file is compacted (at the default 5 s
/// interval: 30 s of quiet).
const QUIET_TICKS_BEFORE_COMPACT: u32 = 6;

impl Engine {
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
        // The batch: the dirty chunks below `split`, the `max` lowest-indexed as of this look
        // (chunks dirtied below it meanwhile join the batch), or all of them. Found here, under
        // the shared lock, so the exclusive hold below does not walk the dirty map again.
        // Partial chunks of the batch get their bases first, loaded with the state lock
        // released. Under the flush lock nothing else changes the file's chunk map (every
        // change of a map holds its file's flush lock), so the loads stay the stored state
        // even after the snapshot is dropped; writes meanwhile only add written ranges.
        let (split, partial): (Option<u64>, Vec<u64>) = {
            let g = st.state.read();
            let split = max.and_then(|m| g.dirty.keys().nth(m).copied());
            let partial = g
                .dirty
                .range(..split.unwrap_or(u64::MAX))
                .filter(|(_, d)| !d.is_whole())
                .map(|(&k, _)| k)
                .collect();
            (split, partial)
        };
        let mut failed: Option<FsError> = None;
        if !partial.is_empty() {
            #[cfg(test)]
            if let Some(meanwhile) = super::data::WHILE_COMPLETING.with(|h| h.borrow_mut().take()) {
                meanwhile();
            }
            let bases = {
                let rtx = self.read_txn()?;
                let inode = super::get_inode(&rtx.open_table(crate::schema::INODES)?, ino)?;
                self.load_bases(ino, &rtx, inode.root, &partial)
            };
            if let Some(e) = self.complete_in_groups(&st, bases) {
                failed.get_or_insert(e);
            }
        }
        let (batch, size, mtime) = {
            let mut g = st.state.write();
            // Chunks written in part since the loads above: a full flush (fsync, COMMIT)
            // completes them here, under the lock (its window is short); a background batch
            // leaves them to the next batch rather than hold every writer and reader of the
            // file while it loads (random writes land below the batch's end half the time).
            let late: Vec<u64> = if max.is_none() {
                g.dirty
                    .iter()
                    .filter(|(k, d)| {
                        !(d.is_whole() || failed.is_some() && partial.binary_search(k).is_ok())
                    })
                    .map(|(&k, _)| k)
                    .collect()
            } else {
                Vec::new()
            };
            if !late.is_empty() {
                let rtx = self.read_txn()?;
                let inode = super::get_inode(&rtx.open_table(crate::schema::INODES)?, ino)?;
                for (idx, base) in self.load_bases(ino, &rtx, inode.root, &late) {
                    match base {
                        Ok(base) => Self::complete_partial(&mut g, idx, base),
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
            }
            if g.is_clean() {
                (None, None, None)
            } else {
                let mut taken = match split {
                    Some(split) => {
                        let rest = g.dirty.split_off(&split);
                        std::mem::replace(&mut g.dirty, rest)
                    }
                    None => std::mem::take(&mut g.dirty),
                };
                // Chunks still partial stay dirty: written since the loads (the next batch
                // completes them), or over a base that could not be read (their written bytes
                // are kept, reads of the rest fail as the base does; the flush reports the
                // error after committing everything else).
                let stuck: Vec<u64> = taken
                    .iter()
                    .filter(|(_, d)| !d.is_whole())
                    .map(|(&k, _)| k)
                    .collect();
                for k in stuck {
                    let d = taken.remove(&k).expect("listed above");
                    g.dirty.insert(k, d);
                }
                // The batch's part of the hot set, split off as the dirty map was (not looked
                // up chunk by chunk: a batch is thousands of chunks, under this exclusive hold
                // every writer and reader of the file waits for). Chunks left dirty above lose
                // the mark until they are completed again (`complete_partial` marks them).
                let hot = match split {
                    Some(split) => {
                        let rest = g.hot.split_off(&split);
                        std::mem::replace(&mut g.hot, rest)
                    }
                    None => std::mem::take(&mut g.hot),
                };
                // With chunks left dirty the file's size and mtime are committed with them
                // later; committing them now too is harmless (they are the newest).
                let batch = Arc::new(taken);
                g.inflight = Some(batch.clone());
                // The partial chunks of the next batch, loaded while this one commits.
                let next: Vec<u64> = g
                    .dirty
                    .iter()
                    .take(max.unwrap_or(0))
                    .filter(|(_, d)| !d.is_whole())
                    .map(|(&k, _)| k)
                    .collect();
                (Some((batch, hot, next)), g.size, g.mtime)
            }
        };
        let Some((batch, hot, next)) = batch else {
            return failed.map_or(Ok(false), Err);
        };
        // The heavy part runs without the state lock: writers and readers go on. The bases of
        // the next batch's partial chunks load meanwhile, on the core the commit (one thread)
        // leaves: this commit changes only this batch's slots, and the flush lock keeps every
        // other change of the chunk map out, so they stay the stored state.
        let (r, ahead) = rayon::join(
            || self.commit_chunks(ino, &batch, &hot, size, mtime, None, false),
            || -> Vec<(u64, FsResult<Option<Base>>)> {
                if next.is_empty() {
                    return Vec::new();
                }
                let load = || -> FsResult<_> {
                    let rtx = self.read_txn()?;
                    let inode = super::get_inode(&rtx.open_table(crate::schema::INODES)?, ino)?;
                    Ok(self.load_bases(ino, &rtx, inode.root, &next))
                };
                load().unwrap_or_default()
            },
        );
        // Failures are left for the next batch to meet (and report) again.
        let _ = self.complete_in_groups(&st, ahead);
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
                match failed {
                    Some(e) => Err(e),
                    None => Ok(!g.dirty.is_empty()),
                }
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
        // One file that cannot be flushed (a damaged chunk under a partial write) does not
        // hold back the others; its error is reported after they are flushed.
        let mut failed = None;
        for ino in inos {
            if let Err(e) = self.flush_ino(ino, false) {
                failed.get_or_insert(e);
            }
        }
        self.barrier()?;
        // Forget clean states nobody holds (only the map's reference left).
        self.files.retain(|_, s| {
            Arc::strong_count(s) > 1 || s.state.try_read().is_none_or(|g| !g.is_clean())
        });
        failed.map_or(Ok(()), Err)
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
        let partial: Vec<u64> = g
            .dirty
            .iter()
            .filter(|(_, d)| !d.is_whole())
            .map(|(&k, _)| k)
            .collect();
        if !partial.is_empty() {
            let rtx = self.read_txn()?;
            let inode = super::get_inode(&rtx.open_table(crate::schema::INODES)?, ino)?;
            let mut failed = None;
            for (idx, base) in self.load_bases(ino, &rtx, inode.root, &partial) {
                match base {
                    Ok(base) => Self::complete_partial(g, idx, base),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
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
        hot: &BTreeSet<u64>,
        size: Option<u64>,
        mtime: Option<Time>,
        holes: Option<Range<u64>>,
        durable: bool,
    ) -> FsResult<()> {
        // Every chunk is whole by now (completed by the callers): a partial one reaching here
        // would be stored with zeros for its unwritten bytes.
        let whole: BTreeMap<u64, &[u8]> = chunks
            .iter()
            .map(|(&i, d)| {
                d.bytes().map(|b| (i, b)).ok_or(FsError::Invalid(
                    "internal: a partial chunk reached the commit",
                ))
            })
            .collect::<FsResult<_>>()?;
        let chunks = &whole;
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
        let written = hashed.iter().filter(|(_, id)| id.is_some()).count() as u64;
        self.ops.chunks_written.inc_by(written);
        self.ops
            .dedup_hits
            .inc_by(written.saturating_sub(need.len() as u64));
        // Chunks rewritten in part (the hot set) are stored uncompressed, for compaction to
        // compress once their packs go cold; so are all new chunks while the backlog of such
        // records is small (`Tuning::raw_backlog`): copying an image in then costs hashing and
        // appending, and zstd runs later, in the background.
        let ingest_raw = self.ingest_raw();
        let deferred: HashSet<ChunkId> = need
            .iter()
            .filter(|(_, i)| ingest_raw || hot.contains(i))
            .map(|(id, _)| *id)
            .collect();
        // Compress on all cores, 4 MiB at a time, so compressed copies never pile up in memory;
        // each group is appended to the pack while the next one compresses (the append is a
        // serial copy into the page cache, and without the overlap a core would sit idle).
        let mut locs = HashMap::new();
        // Dead records' places the appends wrote over (`store::reuse`), for the commit.
        let mut reused: HashSet<(crate::store::pack::PackId, u64)> = HashSet::new();
        // Chunks stored raw are appended straight from the write-back buffer (`RecordRef`);
        // the others from their compressed copy.
        enum Prepared<'a> {
            Encoded(Encoded),
            Raw(RecordRef<'a>),
        }
        let encode = |group: &[(ChunkId, u64)]| -> Vec<Prepared<'_>> {
            group
                .par_iter()
                .map(|(id, i)| {
                    self.timings.time(Stage::Compress, || {
                        if deferred.contains(id) {
                            Prepared::Raw(RecordRef::uncompressed(*id, chunks[i]))
                        } else {
                            Prepared::Encoded(Encoded::new(*id, chunks[i], level))
                        }
                    })
                })
                .collect()
        };
        // `rewritable`: the group is mostly chunks rewritten in part, whose next versions will
        // likely be written over these records (`PackIo::append_rewritable`).
        let mut append = |(prepared, rewritable): (Vec<Prepared<'_>>, bool)|
         -> FsResult<Vec<(ChunkId, crate::store::ChunkLoc)>> {
                let refs: Vec<RecordRef<'_>> = prepared
                    .iter()
                    .map(|p| match p {
                        Prepared::Encoded(e) => e.record(),
                        Prepared::Raw(r) => *r,
                    })
                    .collect();
                let (ls, over) = self
                    .timings
                    .time(Stage::Append, || {
                        self.store.append_refs_reusing(&refs, rewritable)
                    })?;
                reused.extend(over.iter().map(|p| (p.pack, p.offset)));
                Ok(refs.iter().map(|r| r.id).zip(ls).collect())
            };
        let mut pending: Option<(Vec<Prepared<'_>>, bool)> = None;
        let mut appending = || -> FsResult<()> {
            for group in need.chunks(256) {
                let prev = pending.take();
                let (encoded, appended) = rayon::join(|| encode(group), || prev.map(&mut append));
                if let Some(a) = appended {
                    locs.extend(a?);
                }
                let partial = group.iter().filter(|(_, i)| hot.contains(i)).count();
                pending = Some((encoded, 2 * partial > group.len()));
            }
            if let Some(p) = pending.take() {
                locs.extend(append(p)?);
            }
            Ok(())
        };
        if let Err(e) = appending() {
            // What was appended before the failure is referenced by nothing.
            self.settle_failed_appends(&locs, &reused);
            return Err(e);
        }
        let mut updates = hashed;
        updates.sort_unstable_by_key(|u| u.0);
        let dirty = chunks;
        let t = super::timing::thread_cpu_ns();
        let r = self.txn(durable, |w| {
            w.chunks.reused = reused.clone();
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
                        let e = Encoded::new(*id, dirty[i], level);
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
            // References are taken in chunk-key order, not file order: a batch of random
            // writes touches thousands of random index keys, and in key order consecutive
            // lookups walk the same branch pages and often the same leaf.
            let mut keyed: Vec<(u64, Option<ChunkKey>)> =
                updates.iter().map(|(i, _)| (*i, None)).collect();
            let mut by_key: Vec<(usize, &ChunkId)> = updates
                .iter()
                .enumerate()
                .filter_map(|(j, (_, id))| id.as_ref().map(|id| (j, id)))
                .collect();
            by_key.sort_unstable_by_key(|(_, id)| ChunkKey::preferred(id));
            // Which appended records the index took (the others are dead), for the settling
            // below: known here, so it needs no lookup per record.
            let mut recorded = HashSet::new();
            for (j, id) in by_key {
                let r = w.chunks.reference(id, locs.get(id))?;
                if r.recorded {
                    recorded.insert(*id);
                }
                keyed[j].1 = Some(r.key);
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
            w.chunks
                .settle_flushed(&locs, &recorded, &deferred, &reused)?;
            // Inside the transaction: no durable commit comes between this and the commit.
            self.store.born(locs.values());
            w.put_inode(ino, &inode)
        });
        let stage = if durable {
            Stage::Durable
        } else {
            Stage::Commit
        };
        self.timings
            .add(stage, super::timing::thread_cpu_ns().saturating_sub(t));
        match &r {
            Err(_) => self.settle_failed_appends(&locs, &reused),
            Ok(()) => self.add_raw_backlog(
                deferred.len() as u64
                    * (self.chunk_size + crate::store::pack::RECORD_HEADER_LEN as u64),
            ),
        }
        r
    }

    /// Load the stored chunks (bases) under chunk indexes `idxs` of the file whose chunk map
    /// is `root`, on all cores:
    /// per index, the chunk or `None` for a hole, or the error naming the file and offset.
    pub(crate) fn load_bases(
        &self,
        ino: InodeId,
        rtx: &redb::ReadTransaction,
        root: super::tree::Root,
        idxs: &[u64],
    ) -> Vec<(u64, FsResult<Option<Base>>)> {
        let c = self.chunk_size;
        let located: Vec<(u64, FsResult<Option<crate::store::ChunkKey>>)> =
            match rtx.open_table(crate::schema::NODES) {
                Ok(nodes) => idxs
                    .iter()
                    .map(|&i| (i, super::tree::get(&nodes, root, i)))
                    .collect(),
                Err(e) => {
                    let msg = FsError::from(e).to_string();
                    let err = || FsError::Io(std::io::Error::other(msg.clone()));
                    return idxs.iter().map(|&i| (i, Err(err()))).collect();
                }
            };
        let keys: Vec<_> = located
            .iter()
            .filter_map(|(_, k)| k.as_ref().ok().copied().flatten())
            .collect();
        // One read per chunk on all cores, each timed on the thread that does it (a batched
        // `read_many` would spread its decompression over the pool, where a stage timing on
        // this thread does not see it); random partial writes rarely sit back to back in a
        // pack, so batching would seldom coalesce reads anyway.
        let mut loaded = keys
            .par_iter()
            .map(|&k| {
                self.timings
                    .time(Stage::RmwRead, || self.store.read_transient(rtx, k))
            })
            .collect::<Vec<_>>()
            .into_iter();
        located
            .into_iter()
            .map(|(idx, k)| {
                let r = match k {
                    Err(e) => Err(e),
                    Ok(None) => Ok(None),
                    Ok(Some(_)) => match loaded.next().expect("one result per key") {
                        Ok(b) => Ok(Some(b)),
                        Err(e) => {
                            let e = FsError::from(e).at(ino.0, idx * c);
                            tracing::error!(file = %self.path_of(ino), offset = idx * c, "cannot read the stored chunk under a partial write: {e}");
                            Err(e)
                        }
                    },
                };
                (idx, r)
            })
            .collect()
    }

    /// Fill partial chunks from their loaded bases ([`Engine::complete_partial`]), taking the
    /// file's state lock for [`COMPLETE_GROUP`] chunks at a time: a batch is thousands of
    /// 16 KiB copies, and holding the lock for all of them at once stalled every writer and
    /// reader of the file for milliseconds. The caller holds the file's flush lock (the bases
    /// stay the stored state). Returns the first load error.
    fn complete_in_groups(
        &self,
        st: &super::data::FileEntry,
        bases: Vec<(u64, FsResult<Option<Base>>)>,
    ) -> Option<FsError> {
        let mut failed = None;
        let mut it = bases.into_iter().peekable();
        while it.peek().is_some() {
            let mut g = st.state.write();
            for (idx, base) in it.by_ref().take(COMPLETE_GROUP) {
                match base {
                    Ok(base) => Self::complete_partial(&mut g, idx, base),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        failed
    }

    /// Fill dirty chunk `idx`'s unwritten bytes from its stored `base` (`None`: a hole). A
    /// stored chunk rewritten in part joins the hot set (see `FileState::hot`).
    pub(crate) fn complete_partial(g: &mut FileState, idx: u64, base: Option<Base>) {
        if let Some(d) = g.dirty.get_mut(&idx) {
            if !d.is_whole() {
                match base {
                    Some(b) => {
                        d.complete_from(b);
                        g.hot.insert(idx);
                    }
                    None => d.complete(None),
                }
            }
        }
    }

    /// Start the background flusher: every `interval`, flush all files durably. It stops
    /// when the engine is dropped.
    /// It also runs when writers signal memory pressure, flushing (not durably) until the
    /// dirty total is under a quarter of the limit; under pressure that never lets up, the
    /// durable flush still comes every `interval` (it used to wait for a quiet moment: behind
    /// a steady stream of writes, written data was not durable for minutes).
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) -> std::thread::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let signal = self.pressure.clone();
        self.flusher_running.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("tessera-flush".into())
            .spawn(move || {
                // Ticks in a row without a commit, and whether this quiet spell compacted.
                let (mut quiet, mut compacted, mut last) = (0u32, false, u64::MAX);
                let mut synced_at = std::time::Instant::now();
                loop {
                    let pressure = {
                        let mut p = signal.0.lock();
                        if !*p {
                            let left = interval.saturating_sub(synced_at.elapsed());
                            signal.1.wait_for(&mut p, left);
                        }
                        std::mem::take(&mut *p)
                    };
                    let Some(e) = weak.upgrade() else { return };
                    let before = e.commits.load(Ordering::SeqCst);
                    let due = synced_at.elapsed() >= interval;
                    let r = if pressure && !due {
                        e.flush_some(e.tuning.dirty_limit / 4)
                    } else {
                        // The next one `interval` after this one ends, as when it only came
                        // after a quiet `interval`.
                        let r = e.sync_all();
                        synced_at = std::time::Instant::now();
                        r
                    };
                    if let Err(err) = r {
                        tracing::error!("background flush failed (will retry): {err}");
                    }
                    if let Err(err) = e.store.seal_if_due() {
                        tracing::error!("cannot seal the pack for upload (will retry): {err}");
                    }
                    // Once the datastore has been quiet for a while, give the metadata file's
                    // free pages back (a burst of writes leaves the file up to 3x its tables).
                    // Compaction stalls new transactions, so only when nothing is going on.
                    // Quiet: no commit since the last tick, and this tick's flush committed
                    // nothing but its own barrier.
                    let after = e.commits.load(Ordering::SeqCst);
                    if before == last && after <= before + 1 && !pressure {
                        quiet += 1;
                    } else {
                        (quiet, compacted) = (0, false);
                    }
                    last = after;
                    if quiet >= QUIET_TICKS_BEFORE_COMPACT && !compacted {
                        compacted = true;
                        if let Err(err) = e.compact_metadata(e.tuning.compact_min_free) {
                            tracing::warn!("cannot compact the metadata file: {err}");
                        }
                    }
                }
            })
            .expect("spawn flusher thread")
    }

    /// Flush files (not durably), a batch at a time, until at most `target` bytes are dirty;
    /// each batch on one core while the buffer is calm ([`calm_pool`]).
    pub(crate) fn flush_some(&self, target: u64) -> FsResult<()> {
        let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
        let mut failed = None;
        for ino in inos {
            while self.dirty_bytes() > target {
                let batch = (self.tuning.dirty_limit / FLUSH_BATCH_SHARE / self.chunk_size).max(64);
                let calm =
                    self.dirty_bytes() < self.tuning.dirty_limit / CALM_BELOW.1 * CALM_BELOW.0;
                let r = if calm {
                    calm_pool().install(|| self.flush_part(ino, Some(batch as usize)))
                } else {
                    self.flush_part(ino, Some(batch as usize))
                };
                match r {
                    Ok(true) => {}
                    Ok(false) => break,
                    // This file's other chunks are committed; go on with the next file.
                    Err(e) => {
                        failed.get_or_insert(e);
                        break;
                    }
                }
            }
            if self.dirty_bytes() <= target {
                break;
            }
        }
        failed.map_or(Ok(()), Err)
    }
}
