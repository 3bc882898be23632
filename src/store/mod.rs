//! The chunk store: content-addressed chunks in append-only packs, indexed in redb.
//!
//! The store knows nothing of inodes or files. It turns bytes into [`ChunkId`]s, keeps each
//! distinct chunk once (in a pack, compressed), counts references, and reads chunks back
//! verified against their id.
//!
//! # Durability
//! A chunk's record is appended to a pack *before* the metadata transaction that references it
//! commits, and [`Store::sync`] makes every append durable. The engine calls `sync` before every
//! durable commit, so no durable metadata ever points past the durable end of a pack. Records
//! appended but never referenced (crash between append and commit) are garbage that compaction
//! reclaims; they are never referenced by mistake because the index only learns a location in
//! the same transaction that references it.

pub mod chunk;
pub mod compact;
#[cfg(test)]
pub mod faulty;
pub mod index;
pub mod loc;
pub use compact::{Copied, PackUse};
pub use index::{record_bytes, ChunkTables};
pub use loc::{ChunkKey, ChunkLoc, IndexEntry};
pub mod pack;
pub mod remote;
pub mod reuse;
pub mod scan;
pub mod tier;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rayon::prelude::*;
use redb::{ReadTransaction, ReadableTable};

use crate::schema;
use chunk::{ChunkId, Codec};
use pack::{PackId, PackIo, RECORD_HEADER_LEN};

/// A pack is closed and a new one started once it reaches this size (bytes). 256 MiB keeps
/// compaction units small; pack files are kept open in a bounded cache (`pack::MAX_OPEN_PACKS`).
pub const PACK_TARGET_BYTES: u64 = 256 << 20;
/// Reads of more chunks than this decode on all cores.
const PARALLEL_DECODE_MIN: usize = 16;
/// Largest single read when fetching records that sit back to back in a pack (bytes).
pub const MAX_COALESCED_READ: u64 = 4 << 20;

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on pack file: {0}")]
    Io(#[from] io::Error),
    #[error("metadata database error: {0}")]
    Meta(#[from] redb::Error),
    #[error("chunk {id:?} is damaged: {detail}")]
    Corrupt { id: ChunkId, detail: String },
    #[error("chunk {0:?} is referenced but not in the index")]
    Missing(ChunkId),
    #[error("chunk key {0} is referenced but not in the index")]
    MissingKey(ChunkKey),
    #[error("the index entry of chunk key {0} is damaged")]
    BadIndex(ChunkKey),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Meta(e.into()) }
        }
    )*};
}
redb_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

struct Active {
    pack: PackId,
    len: u64,
    /// When the pack was started (the object-store tier seals packs past an age).
    since: std::time::Instant,
}

/// The chunk store. Cheap to share behind an `Arc`.
pub struct Store {
    io: Arc<dyn PackIo>,
    /// The pack appends go to; created on the first append, so read-only uses leave no trace.
    /// Lock order (the engine's list is in `fs/mod.rs`): `appenders`, then the caller's redb
    /// write transaction, then `gate`; `active` and `unsynced` are leaves.
    active: Mutex<Option<Active>>,
    /// Packs appended to since their last sync.
    unsynced: Mutex<BTreeSet<PackId>>,
    /// Held for the whole of [`Store::sync`], so a sync never returns while another one's
    /// fsync of a pack it took from `unsynced` is still running. A leaf but for `unsynced`.
    syncing: Mutex<()>,
    /// Readers hold it shared while they may read packs; compaction holds it exclusively to
    /// delete a pack, so no read that looked up an old location is still running.
    gate: parking_lot::RwLock<()>,
    /// Readers' phases, so a dead record's place is used again only once no reader can still
    /// read it (`reuse`).
    grace: reuse::Grace,
    /// Dead records' places on their way to being used again (`reuse`); a leaf.
    places: Mutex<reuse::Places>,
    reuse_stats: reuse::ReuseStats,
    /// Held shared by a writer from its first append until the transaction referencing the
    /// appended records has committed (or failed); compaction takes it exclusively once, after
    /// choosing its packs and before reading their live records. Without it, records appended
    /// to a pack that was then sealed (by size or by compaction) could still be uncommitted
    /// when compaction scans the index, and be deleted with the pack just before their commit
    /// made them live (found by `gc_races_writes_clones_dedup_and_deletes`).
    appenders: parking_lot::RwLock<()>,
    /// Decompressed, verified chunks by id, shared by every file (clones of one golden image
    /// read the same entries: the boot-storm cache). quick_cache's CLOCK-Pro-like policy
    /// admits a chunk read once as cold, so a scan (a guest's antivirus sweep, a backup read)
    /// does not push out chunks read again and again. Scrub, fsck and compaction bypass it.
    cache: quick_cache::sync::Cache<ChunkId, Arc<Vec<u8>>>,
    /// Reads served by the cache, and chunks loaded from packs for reads (cache misses).
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    /// Bytes read from pack files to serve reads (what the cache did not save).
    pack_read_bytes: AtomicU64,
    /// When each pack was last appended to, since the store was opened (compaction leaves
    /// recent packs' uncompressed records alone: they are likely rewritten, and dead, soon).
    last_append: Mutex<HashMap<PackId, std::time::Instant>>,
    zstd_level: i32,
}

/// A reader's hold on the packs (see [`Store::read_gate`]).
pub struct ReadGate<'a> {
    _pin: reuse::Pin<'a>,
    _gate: parking_lot::RwLockReadGuard<'a, ()>,
}

/// What `Store::warm` did.
#[derive(Clone, Copy, Debug, Default)]
pub struct WarmCounts {
    /// Chunks read from packs (the others were cached).
    pub loaded: u64,
    pub damaged: u64,
}

/// How the read cache is doing (for stats and metrics).
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Chunks held now, and how many fit.
    pub chunks: u64,
    pub capacity_chunks: u64,
    pub pack_read_bytes: u64,
}

/// Largest record payload an index entry may claim (bytes): chunks are at most 64 KiB raw and
/// a chunk that does not shrink is stored raw.
pub const MAX_RECORD_PAYLOAD: u32 = 128 << 10;

/// A chunk compressed and ready to append.
#[derive(Debug)]
pub struct Encoded {
    pub id: ChunkId,
    pub payload: Vec<u8>,
    pub codec: Codec,
    pub raw_len: u32,
}

/// A record to append, its payload borrowed.
#[derive(Clone, Copy)]
pub struct RecordRef<'a> {
    pub id: ChunkId,
    pub codec: Codec,
    /// Bytes of the chunk once decoded.
    pub raw_len: u32,
    pub payload: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// `data` stored as is, its compression left to compaction ([`Encoded::uncompressed`]
    /// without the copy).
    pub fn uncompressed(id: ChunkId, data: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            id,
            codec: Codec::Raw,
            raw_len: data.len() as u32,
            payload: data,
        }
    }
}

impl Encoded {
    /// This chunk as a record to append.
    pub fn record(&self) -> RecordRef<'_> {
        RecordRef {
            id: self.id,
            codec: self.codec,
            raw_len: self.raw_len,
            payload: &self.payload,
        }
    }

    /// `data` compressed at `level` (kept raw if it does not shrink).
    pub fn new(id: ChunkId, data: &[u8], level: i32) -> Encoded {
        let (payload, codec) = chunk::encode(data, level);
        Encoded {
            id,
            payload,
            codec,
            raw_len: data.len() as u32,
        }
    }

    /// This record compressed at `level` if it was stored uncompressed (left to compaction,
    /// or found incompressible: `chunk::encode` samples that first and gives up quickly), so
    /// a replication stream carries a copy written minutes ago compressed, as it will be
    /// stored.
    pub fn compressed(self, level: i32) -> Encoded {
        match self.codec {
            Codec::Raw => Encoded::new(self.id, &self.payload, level),
            Codec::Zstd => self,
        }
    }

    /// Check a record received from elsewhere (replication): the payload decodes to `raw_len`
    /// bytes whose blake3 is `id`. Returns a one-line reason when it does not.
    pub fn verify(&self) -> Result<(), String> {
        let data = chunk::decode(&self.payload, self.codec, self.raw_len as usize)
            .ok_or_else(|| format!("chunk {} does not decode", self.id.short()))?;
        if ChunkId::of(&data) != self.id {
            return Err(format!("chunk {} does not match its id", self.id.short()));
        }
        Ok(())
    }

    /// `data` stored as is, its compression left to compaction: for chunks rewritten in part
    /// (a desktop's random 4 KiB writes), the hot set, where compressing on the write path
    /// costs a fifth of the CPU of each write and the record is likely dead again soon; and
    /// for new data while few such records wait (`fs::Tuning::raw_backlog`). The caller
    /// counts the record with `ChunkTables::settle_flushed`, which is how compaction finds the
    /// packs worth compressing (`Store::read_record_for_copy`).
    pub fn uncompressed(id: ChunkId, data: &[u8]) -> Encoded {
        Encoded {
            id,
            payload: data.to_vec(),
            codec: Codec::Raw,
            raw_len: data.len() as u32,
        }
    }
}

impl Store {
    /// Open the store over `io`. Appends always go to a new pack, so a torn tail left by a
    /// crash in an older pack is never appended after.
    pub fn open(
        io: Arc<dyn PackIo>,
        zstd_level: i32,
        cache_items: usize,
    ) -> Result<Store, StoreError> {
        Ok(Store {
            io,
            active: Mutex::new(None),
            gate: parking_lot::RwLock::new(()),
            grace: reuse::Grace::default(),
            places: Mutex::new(reuse::Places::default()),
            reuse_stats: reuse::ReuseStats::default(),
            appenders: parking_lot::RwLock::new(()),
            unsynced: Mutex::new(BTreeSet::new()),
            syncing: Mutex::new(()),
            cache: quick_cache::sync::Cache::new(cache_items.max(16)),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            pack_read_bytes: AtomicU64::new(0),
            last_append: Mutex::new(HashMap::new()),
            zstd_level,
        })
    }

    pub fn io(&self) -> &Arc<dyn PackIo> {
        &self.io
    }

    pub fn zstd_level(&self) -> i32 {
        self.zstd_level
    }

    /// Append an encoded chunk to the active pack; returns its location with `refs == 0`.
    pub fn append(&self, e: &Encoded) -> Result<ChunkLoc, StoreError> {
        Ok(self.append_many(std::slice::from_ref(e))?[0])
    }

    /// Append several chunks with one write; returns their locations (`refs == 0`) in order.
    pub fn append_many(&self, es: &[Encoded]) -> Result<Vec<ChunkLoc>, StoreError> {
        let refs: Vec<RecordRef<'_>> = es.iter().map(Encoded::record).collect();
        self.append_refs(&refs)
    }

    /// [`Store::append_many`] of borrowed records: a chunk stored raw goes from the
    /// write-back buffer into the append buffer without a copy of its own.
    pub fn append_refs(&self, rs: &[RecordRef<'_>]) -> Result<Vec<ChunkLoc>, StoreError> {
        self.append_refs_as(rs, false)
    }

    /// [`Store::append_refs`]; `rewritable`: the records are likely to be written over in
    /// place later ([`PackIo::append_rewritable`]).
    fn append_refs_as(
        &self,
        rs: &[RecordRef<'_>],
        rewritable: bool,
    ) -> Result<Vec<ChunkLoc>, StoreError> {
        let mut buf = APPEND_BUFS.lock().pop().unwrap_or_default();
        buf.clear();
        let r = self.append_records(rs, &mut buf, rewritable);
        // Kept for a later append, unless unusually large or enough are kept already.
        if buf.capacity() <= 2 * MAX_COALESCED_READ as usize {
            let mut spare = APPEND_BUFS.lock();
            if spare.len() < APPEND_BUFS_KEPT {
                spare.push(buf);
            }
        }
        r
    }

    /// [`Store::append_refs`] that writes each record over a dead record of the same size
    /// where one is free (`reuse`), appending the others. With the locations, in order, the
    /// places written over: the transaction that references them must say so
    /// (`ChunkTables::reused`), and if it never commits they stay dead space as they were.
    /// `rewritable`: the appended records are likely to be written over in turn (chunks
    /// rewritten in part), so they are laid out for it ([`PackIo::append_rewritable`]).
    pub fn append_refs_reusing(
        &self,
        rs: &[RecordRef<'_>],
        rewritable: bool,
    ) -> Result<(Vec<ChunkLoc>, Vec<reuse::Place>), StoreError> {
        let lens: Vec<u32> = rs.iter().map(|r| r.payload.len() as u32).collect();
        let places = self.take_places(&lens);
        if places.iter().all(Option::is_none) {
            return Ok((self.append_refs_as(rs, rewritable)?, Vec::new()));
        }
        let mut out: Vec<Option<ChunkLoc>> = vec![None; rs.len()];
        let mut written = Vec::new();
        let mut rest = Vec::new();
        let mut rest_at = Vec::new();
        let mut buf = Vec::new();
        for (i, (r, place)) in rs.iter().zip(&places).enumerate() {
            let Some(h) = place else {
                rest.push(*r);
                rest_at.push(i);
                continue;
            };
            buf.clear();
            pack::write_record(&mut buf, &r.id, r.codec, r.raw_len, r.payload);
            // Before the write: a failed or torn write leaves a place no commit references,
            // but the next durable commit must not skip syncing what did reach the pack.
            self.unsynced.lock().insert(h.pack);
            if let Err(e) = self.io.write_at(h.pack, h.offset, &buf) {
                return Err(e.into());
            }
            written.push(*h);
            out[i] = Some(ChunkLoc {
                pack: h.pack,
                offset: h.offset,
                stored_len: r.payload.len() as u32,
                raw_len: r.raw_len,
                codec: r.codec,
                refs: 0,
            });
        }
        if !rest.is_empty() {
            for (i, l) in rest_at
                .into_iter()
                .zip(self.append_refs_as(&rest, rewritable)?)
            {
                out[i] = Some(l);
            }
        }
        Ok((
            out.into_iter()
                .map(|l| l.expect("every record placed"))
                .collect(),
            written,
        ))
    }

    fn append_records(
        &self,
        es: &[RecordRef<'_>],
        buf: &mut Vec<u8>,
        rewritable: bool,
    ) -> Result<Vec<ChunkLoc>, StoreError> {
        let mut rel = Vec::with_capacity(es.len());
        for e in es {
            rel.push(buf.len() as u64);
            pack::write_record(buf, &e.id, e.codec, e.raw_len, e.payload);
        }
        let mut guard = self.active.lock();
        let a = match &mut *guard {
            Some(a) if a.len < self.io.pack_target() => a,
            full => {
                // Seal the full pack and start the next one. A tier uploads a sealed pack, so
                // it is synced first. A local one stays in `unsynced` for the next durable
                // commit to sync (its write-back started as it was appended), so appenders do
                // not wait here for the disk to take a pack's worth of data.
                if let Some(a) = full {
                    if self.io.tier().is_some() {
                        self.io.sync(a.pack)?;
                        self.unsynced.lock().remove(&a.pack);
                        self.io.sealed(a.pack);
                    }
                }
                let next = PackId(self.io.list()?.last().map_or(1, |p| p.0 + 1));
                self.io.create(next)?;
                full.insert(Active {
                    pack: next,
                    len: pack::PACK_HEADER_LEN,
                    since: std::time::Instant::now(),
                })
            }
        };
        let offset = if rewritable {
            self.io.append_rewritable(a.pack, buf)?
        } else {
            self.io.append(a.pack, buf)?
        };
        a.len = offset + buf.len() as u64;
        self.last_append
            .lock()
            .insert(a.pack, std::time::Instant::now());
        self.unsynced.lock().insert(a.pack);
        Ok(es
            .iter()
            .zip(rel)
            .map(|(e, r)| ChunkLoc {
                pack: a.pack,
                offset: offset + r,
                stored_len: e.payload.len() as u32,
                raw_len: e.raw_len,
                codec: e.codec,
                refs: 0,
            })
            .collect())
    }

    /// Shared hold on the pack-deletion gate (recursive: a reader may nest snapshots), and a
    /// pin of the reader phase that keeps dead records' places from being written over under
    /// the reader (`reuse`). Take it before the snapshot whose locations the reads use.
    pub fn read_gate(&self) -> ReadGate<'_> {
        ReadGate {
            _pin: self.grace.pin(),
            _gate: self.gate.read_recursive(),
        }
    }

    /// Start appending records that a transaction will reference: hold the guard until that
    /// transaction has committed. Recursive, so nested writers never wait on compaction.
    pub fn append_session(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.appenders.read_recursive()
    }

    /// Wait until every append session that started before this call has ended.
    pub fn drain_appends(&self) {
        drop(self.appenders.write());
    }

    /// Delete a pack once no reader can still be reading it.
    pub fn retire_pack(&self, pack: PackId) -> Result<(), StoreError> {
        if self.active_pack() == Some(pack) {
            return Err(StoreError::Io(io::Error::other(format!(
                "refusing to delete pack {:08x}: it is being appended to",
                pack.0
            ))));
        }
        let _no_readers = self.gate.write();
        // None of its places is used again (its id may be used again by a new pack).
        self.forget_places(pack);
        // Nothing references it any more: no durable commit needs its bytes.
        self.unsynced.lock().remove(&pack);
        self.io.remove(pack)?;
        self.last_append.lock().remove(&pack);
        Ok(())
    }

    /// How long ago `pack` was last appended to; `None` if not since the store was opened.
    pub fn idle_for(&self, pack: PackId) -> Option<std::time::Duration> {
        self.last_append.lock().get(&pack).map(|t| t.elapsed())
    }

    /// Close the active pack (synced); the next append starts a new one. Lets compaction
    /// work on the pack that was being appended to.
    pub fn seal_active(&self) -> Result<(), StoreError> {
        let mut a = self.active.lock();
        if let Some(act) = a.take() {
            self.io.sync(act.pack)?;
            self.unsynced.lock().remove(&act.pack);
            self.io.sealed(act.pack);
        }
        Ok(())
    }

    /// With an object-store tier, seal the active pack once nothing was appended to it for
    /// [`tier::SEAL_IDLE`] or it is older than [`tier::SEAL_AGE`], so it is uploaded: what the
    /// bucket lacks is then at most that old (the flusher calls this every tick). Returns
    /// whether it sealed.
    pub fn seal_if_due(&self) -> Result<bool, StoreError> {
        if self.io.tier().is_none() {
            return Ok(false);
        }
        let due = match &*self.active.lock() {
            Some(a) => {
                let idle = self
                    .last_append
                    .lock()
                    .get(&a.pack)
                    .is_none_or(|t| t.elapsed() >= self.io.seal_idle());
                idle || a.since.elapsed() >= tier::SEAL_AGE
            }
            None => false,
        };
        if due {
            self.seal_active()?;
        }
        Ok(due)
    }

    /// The pack appends go to now, if any.
    pub fn active_pack(&self) -> Option<PackId> {
        self.active.lock().as_ref().map(|a| a.pack)
    }

    /// Read a record to copy it as is (compaction), checked against the index entry and its
    /// crc32 instead of decompressed and hashed: the copy is byte for byte, and every read of
    /// it later verifies blake3 as always, so damage the crc cannot see still reads as EIO,
    /// never as wrong bytes. A tenth of the CPU of `read_record`, which matters because
    /// compaction runs beside guest I/O.
    /// With `compress`, a record stored raw is compressed at the datastore's level on the way
    /// (a pack holding records whose compression was deferred, `Encoded::uncompressed`);
    /// data that does not shrink stays raw.
    pub fn read_record_for_copy(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        compress: bool,
    ) -> Result<Encoded, StoreError> {
        let rec = self.fetch_record(id, loc)?;
        self.check_record(id, loc, &rec, compress)
    }

    /// [`Store::read_record_for_copy`] of a record already read.
    fn check_record(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        rec: &[u8],
        compress: bool,
    ) -> Result<Encoded, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            id: *id,
            detail: format!("{detail} in pack {:08x} at {}", loc.pack.0, loc.offset),
        };
        let h = pack::decode_header(rec).ok_or_else(|| corrupt("bad record header"))?;
        let payload = &rec[RECORD_HEADER_LEN..];
        if h.id != *id
            || h.stored_len != loc.stored_len
            || h.raw_len != loc.raw_len
            || !pack::record_crc_ok(&rec[..RECORD_HEADER_LEN], payload, h.crc)
        {
            return Err(corrupt("checksum mismatch"));
        }
        if compress && loc.codec == Codec::Raw {
            return Ok(Encoded::new(*id, payload, self.zstd_level));
        }
        Ok(Encoded {
            id: *id,
            payload: payload.to_vec(),
            codec: loc.codec,
            raw_len: loc.raw_len,
        })
    }

    /// Chunks as stored (compressed, with their codec), each record checked against its index
    /// entry and its crc, in the order given: for replication, which sends chunks as stored
    /// (the receiver verifies their content against the ids). Records adjacent in a pack are
    /// read with one read of up to [`MAX_COALESCED_READ`] bytes; a lost chunk is an error.
    /// `buf` is scratch space the caller keeps between calls.
    pub fn read_stored_many(
        &self,
        chunks: &[IndexEntry],
        buf: &mut Vec<u8>,
    ) -> Vec<Result<Encoded, StoreError>> {
        let mut order: Vec<(usize, ChunkLoc)> =
            chunks.iter().enumerate().map(|(i, e)| (i, e.loc)).collect();
        order.sort_by_key(|(_, l)| (l.pack, l.offset));
        let mut out: Vec<Option<Result<Encoded, StoreError>>> =
            chunks.iter().map(|_| None).collect();
        for run in adjacent_runs(&order, |t| &t.1) {
            let (first, last) = (run[0].1, run[run.len() - 1].1);
            let len = (last.offset - first.offset) as usize
                + RECORD_HEADER_LEN
                + last.stored_len as usize;
            buf.resize(len, 0);
            let bytes = (!first.is_lost()
                && self.io.read_into(first.pack, first.offset, buf).is_ok())
            .then_some(&buf[..]);
            for (i, loc) in run {
                let e = &chunks[*i];
                out[*i] = Some(if loc.is_lost() {
                    Err(StoreError::Corrupt {
                        id: e.id,
                        detail: "the chunk is lost (fsck --repair found no intact copy)".into(),
                    })
                } else {
                    match bytes {
                        Some(b) => {
                            let s = (loc.offset - first.offset) as usize;
                            let rec = &b[s..s + RECORD_HEADER_LEN + loc.stored_len as usize];
                            self.check_record(&e.id, loc, rec, false)
                        }
                        // The run could not be read whole: read this record alone to tell
                        // exactly which one is damaged.
                        None => self.read_record_for_copy(&e.id, loc, false),
                    }
                });
            }
        }
        out.into_iter()
            .map(|r| r.expect("every chunk answered"))
            .collect()
    }

    /// The object-store tier, if this store has one.
    pub fn tier_io(&self) -> Option<&tier::TieredPackIo> {
        self.io.as_tier()
    }

    /// The object-store tier's state, if this store has one.
    pub fn tier(&self) -> Option<tier::TierStats> {
        self.io.tier()
    }

    /// Seal the active pack and wait until the object-store tier holds every pack (nothing
    /// to do without a tier).
    pub fn drain_uploads(&self, patience: std::time::Duration) -> Result<(), StoreError> {
        if self.io.tier().is_none() {
            return Ok(());
        }
        self.seal_active()?;
        Ok(self.io.drain(patience)?)
    }

    /// Make every append so far durable. Called before every durable metadata commit.
    pub fn sync(&self) -> Result<(), StoreError> {
        let _one = self.syncing.lock();
        let packs: Vec<PackId> = std::mem::take(&mut *self.unsynced.lock())
            .into_iter()
            .collect();
        for (i, p) in packs.iter().enumerate() {
            if let Err(e) = self.io.sync(*p) {
                // Put back what was not synced so a retry syncs it.
                self.unsynced.lock().extend(packs[i..].iter().copied());
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// The live records of `packs`, by pack, from one scan of the index (compaction). Lost
    /// chunks have no record and are left out.
    pub fn live_records(
        &self,
        rtx: &ReadTransaction,
        packs: &[PackId],
    ) -> Result<HashMap<PackId, Vec<(ChunkKey, IndexEntry)>>, StoreError> {
        let mut live: HashMap<PackId, Vec<(ChunkKey, IndexEntry)>> =
            packs.iter().map(|p| (*p, Vec::new())).collect();
        for r in rtx.open_table(schema::CHUNKS)?.iter()? {
            let (k, v) = r?;
            if let Some(e) = IndexEntry::decode(v.value()) {
                if let Some(list) = live.get_mut(&e.loc.pack) {
                    list.push((ChunkKey(k.value()), e));
                }
            }
        }
        // In the order they were appended (the index is in hash order): compaction copies
        // them in this order, and a file written front to back stays laid out front to back,
        // so reading it back stays sequential on the disk.
        for list in live.values_mut() {
            list.sort_unstable_by_key(|(_, e)| e.loc.offset);
        }
        Ok(live)
    }

    /// Which of these chunks are already stored? (A hint for dedup before compressing; the
    /// answer is re-checked inside the committing transaction.)
    pub fn contains_many(
        &self,
        rtx: &ReadTransaction,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, StoreError> {
        let t = rtx.open_table(schema::CHUNKS)?;
        let a = rtx.open_table(schema::CHUNK_ALIASES)?;
        ids.iter()
            .map(|id| {
                Ok(self.cache.get(id).is_some()
                    || index::find_in(&t, &a, id)?.is_some_and(|(_, l)| !l.is_lost()))
            })
            .collect()
    }

    /// The id and location of each chunk under `keys` (read snapshot; one table open for all).
    pub fn entries_many(
        &self,
        rtx: &ReadTransaction,
        keys: &[ChunkKey],
    ) -> Result<Vec<Option<IndexEntry>>, StoreError> {
        let t = rtx.open_table(schema::CHUNKS)?;
        keys.iter().map(|k| index::entry_in(&t, *k)).collect()
    }

    /// The key and location of `id`, if stored (read snapshot).
    pub fn find(
        &self,
        rtx: &ReadTransaction,
        id: &ChunkId,
    ) -> Result<Option<(ChunkKey, ChunkLoc)>, StoreError> {
        index::find_in(
            &rtx.open_table(schema::CHUNKS)?,
            &rtx.open_table(schema::CHUNK_ALIASES)?,
            id,
        )
    }

    /// Read a chunk, verified against its id. Damage is reported as [`StoreError::Corrupt`],
    /// never as wrong bytes.
    pub fn read(&self, rtx: &ReadTransaction, key: ChunkKey) -> Result<Arc<Vec<u8>>, StoreError> {
        self.read_many(rtx, std::slice::from_ref(&key))
            .pop()
            .expect("one result per id")
    }

    /// Read several chunks (results in the order of `ids`). Records that sit back to back in a
    /// pack are fetched with one read of up to [`MAX_COALESCED_READ`] bytes; decompression and
    /// verification run on all cores.
    /// Verify records on disk, bypassing the cache: `recs` are read pack by pack in offset
    /// order with large sequential reads (gaps of dead records up to 256 KiB are read through),
    /// each run verified on all cores. Returns, per record, its raw size or the damage.
    /// `pace(bytes)` is called after each run (throttling).
    pub fn verify_many(
        &self,
        mut recs: Vec<(ChunkId, ChunkLoc)>,
        pace: &mut dyn FnMut(u64),
    ) -> Vec<(ChunkId, Result<u64, StoreError>)> {
        const GAP: u64 = 256 << 10;
        const RUN: u64 = 8 << 20;
        recs.sort_by_key(|(_, l)| (l.pack, l.offset));
        let end = |l: &ChunkLoc| l.offset + (RECORD_HEADER_LEN + l.stored_len as usize) as u64;
        let mut out = Vec::with_capacity(recs.len());
        // An index entry claiming an impossible length is damage, not a read to attempt.
        let (sane, insane): (Vec<_>, Vec<_>) = recs
            .into_iter()
            .partition(|(_, l)| l.stored_len <= MAX_RECORD_PAYLOAD);
        out.extend(insane.into_iter().map(|(id, l)| {
            let e = StoreError::Corrupt {
                id,
                detail: format!("index entry claims a {}-byte record", l.stored_len),
            };
            (id, Err(e))
        }));
        let recs = sane;
        let mut i = 0;
        while i < recs.len() {
            let start = recs[i].1.offset;
            let mut run_end = end(&recs[i].1);
            let mut j = i + 1;
            while j < recs.len()
                && recs[j].1.pack == recs[i].1.pack
                && recs[j].1.offset <= run_end + GAP
                && end(&recs[j].1).max(run_end) - start <= RUN
            {
                run_end = run_end.max(end(&recs[j].1));
                j += 1;
            }
            let run = &recs[i..j];
            let len = run_end - start;
            match self.io.read_at_scan(run[0].1.pack, start, len as usize) {
                Ok(buf) => {
                    let checked: Vec<(ChunkId, Result<u64, StoreError>)> = run
                        .par_iter()
                        .map(|(id, loc)| {
                            let at = (loc.offset - start) as usize;
                            let rec = buf.get(at..at + RECORD_HEADER_LEN + loc.stored_len as usize);
                            let r = match rec {
                                Some(rec) => self.verify(id, loc, rec).map(|d| d.len() as u64),
                                None => self.read_loc(id, loc).map(|d| d.len() as u64),
                            };
                            (*id, r)
                        })
                        .collect();
                    out.extend(checked);
                }
                // A short or missing pack: find out record by record which ones are gone.
                Err(_) => out.extend(
                    run.iter()
                        .map(|(id, loc)| (*id, self.read_loc(id, loc).map(|d| d.len() as u64))),
                ),
            }
            pace(len);
            i = j;
        }
        out
    }

    pub fn read_many(
        &self,
        rtx: &ReadTransaction,
        keys: &[ChunkKey],
    ) -> Vec<Result<Arc<Vec<u8>>, StoreError>> {
        self.read_many_admitting(rtx, keys, true)
    }

    /// Read a chunk needed once: the stored chunk under a partial write, which the flush
    /// replaces. Served from the read cache if it is there, but not added to it: caching it
    /// would push out chunks that are read again for one that will not be, and the churn of
    /// long-lived 16 KiB buffers costs page faults (jemalloc purges freed pages before they
    /// are reused; a buffer freed right after use is reused from the thread's cache).
    pub fn read_transient(
        &self,
        rtx: &ReadTransaction,
        key: ChunkKey,
    ) -> Result<Arc<Vec<u8>>, StoreError> {
        self.read_many_admitting(rtx, std::slice::from_ref(&key), false)
            .pop()
            .expect("one result per id")
    }

    /// [`Store::read_many`]; chunks loaded from packs enter the read cache if `admit`.
    fn read_many_admitting(
        &self,
        rtx: &ReadTransaction,
        keys: &[ChunkKey],
        admit: bool,
    ) -> Vec<Result<Arc<Vec<u8>>, StoreError>> {
        let t = match rtx.open_table(schema::CHUNKS) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                return keys
                    .iter()
                    .map(|_| Err(StoreError::Io(io::Error::other(msg.clone()))))
                    .collect();
            }
        };
        // The id of every key, from this snapshot's index: the cache is keyed by id, so a key
        // that named another chunk once can never bring back that chunk's bytes.
        let mut ids: Vec<ChunkId> = Vec::with_capacity(keys.len());
        let mut out: Vec<Option<ChunkResult>> = Vec::with_capacity(keys.len());
        // (position in keys, location) of every miss this call loads, in pack order, and the
        // cache placeholders it holds for them: concurrent readers of the same chunk (twenty
        // clones booting) wait for this load instead of repeating it.
        let mut todo = Vec::new();
        let mut guards = HashMap::new();
        // Misses another reader is loading: waited for once this call's own loads are in
        // (never while holding placeholders, so readers cannot wait on each other in a cycle).
        let mut waiting: Vec<(usize, ChunkLoc)> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match index::entry_in(&t, *k) {
                Ok(Some(e)) if !admit => {
                    ids.push(e.id);
                    if let Some(d) = self.cache.get(&e.id) {
                        self.cache_hits.fetch_add(1, Ordering::Relaxed);
                        out.push(Some(Ok(d)));
                    } else {
                        out.push(None);
                        todo.push((i, e.loc));
                    }
                }
                Ok(Some(e)) => {
                    ids.push(e.id);
                    use quick_cache::sync::GuardResult;
                    match self
                        .cache
                        .get_value_or_guard(&e.id, Some(std::time::Duration::ZERO))
                    {
                        GuardResult::Value(d) => {
                            self.cache_hits.fetch_add(1, Ordering::Relaxed);
                            out.push(Some(Ok(d)))
                        }
                        GuardResult::Guard(g) => {
                            out.push(None);
                            guards.insert(i, g);
                            todo.push((i, e.loc));
                        }
                        GuardResult::Timeout => {
                            out.push(None);
                            waiting.push((i, e.loc));
                        }
                    }
                }
                Ok(None) => {
                    ids.push(ChunkId([0; 32]));
                    out.push(Some(Err(StoreError::MissingKey(*k))));
                }
                Err(e) => {
                    ids.push(ChunkId([0; 32]));
                    out.push(Some(Err(e)));
                }
            }
        }
        todo.sort_by_key(|(_, l)| (l.pack, l.offset));
        let runs = adjacent_runs(&todo, |t| &t.1);
        // One read per run, then verification and decompression per record on all cores.
        let fetch = |run: &&[(usize, ChunkLoc)]| {
            let (first, last) = (run[0].1, run[run.len() - 1].1);
            let len = (last.offset - first.offset) as usize
                + RECORD_HEADER_LEN
                + last.stored_len as usize;
            self.pack_read_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            self.io.read_at(first.pack, first.offset, len)
        };
        let fetched: Vec<io::Result<Vec<u8>>> = if runs.len() > 1 {
            runs.par_iter().map(fetch).collect()
        } else {
            runs.iter().map(fetch).collect()
        };
        let records: Vec<(usize, &ChunkLoc, Option<&[u8]>)> = runs
            .iter()
            .zip(&fetched)
            .flat_map(|(run, bytes)| {
                let first = run[0].1.offset;
                run.iter().map(move |(i, loc)| {
                    let rec = bytes.as_ref().ok().map(|b| {
                        let s = (loc.offset - first) as usize;
                        &b[s..s + RECORD_HEADER_LEN + loc.stored_len as usize]
                    });
                    (*i, loc, rec)
                })
            })
            .collect();
        let decode = |(i, loc, rec): &(usize, &ChunkLoc, Option<&[u8]>)| {
            let r = match rec {
                Some(rec) => self.verify(&ids[*i], loc, rec),
                // The run could not be read whole: read this record alone to tell exactly
                // which one is damaged.
                None => self.read_loc(&ids[*i], loc),
            };
            (*i, r.map(Arc::new))
        };
        // Small reads stay on the calling thread: FUSE already runs several requests at once,
        // and waking the pool for a few chunks costs more than it saves.
        let decoded: Vec<(usize, ChunkResult)> = if records.len() > PARALLEL_DECODE_MIN {
            records.par_iter().map(decode).collect()
        } else {
            records.iter().map(decode).collect()
        };
        self.cache_misses
            .fetch_add(decoded.len() as u64, Ordering::Relaxed);
        for (i, r) in decoded {
            let guard = guards.remove(&i);
            if let (Ok(d), Some(g)) = (&r, guard) {
                let _ = g.insert(d.clone());
            }
            out[i] = Some(r);
        }
        drop(guards);
        for (i, loc) in waiting {
            use quick_cache::sync::GuardResult;
            out[i] = Some(match self.cache.get_value_or_guard(&ids[i], None) {
                GuardResult::Value(d) => {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    Ok(d)
                }
                // The other load failed (or the chunk was dropped meanwhile): load it here.
                GuardResult::Guard(g) => {
                    self.cache_misses.fetch_add(1, Ordering::Relaxed);
                    self.pack_read_bytes.fetch_add(
                        (RECORD_HEADER_LEN + loc.stored_len as usize) as u64,
                        Ordering::Relaxed,
                    );
                    self.read_loc(&ids[i], &loc).map(|d| {
                        let d = Arc::new(d);
                        let _ = g.insert(d.clone());
                        d
                    })
                }
                GuardResult::Timeout => unreachable!("no timeout given"),
            });
        }
        out.into_iter()
            .map(|r| r.expect("every id answered"))
            .collect()
    }

    /// Read and verify the record at `loc`, bypassing the cache (used by fsck and scrub).
    pub fn read_loc(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        let rec = self.fetch_record(id, loc)?;
        self.verify(id, loc, &rec)
    }

    /// The raw bytes (header + payload) of the record at `loc`. A missing or short pack is
    /// damage (`Corrupt`); other I/O errors stay I/O errors.
    fn fetch_record(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>, StoreError> {
        // Callers are scans (compaction, fsck, scrub) or the record-by-record retry of one.
        self.io
            .read_at_scan(
                loc.pack,
                loc.offset,
                RECORD_HEADER_LEN + loc.stored_len as usize,
            )
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound => StoreError::Corrupt {
                    id: *id,
                    detail: format!("pack {:08x} is missing or truncated: {e}", loc.pack.0),
                },
                _ => StoreError::Io(e),
            })
    }

    /// Check a record (header + payload) against the index entry and the chunk id; decode it.
    fn verify(&self, id: &ChunkId, loc: &ChunkLoc, rec: &[u8]) -> Result<Vec<u8>, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt { id: *id, detail };
        let h = pack::decode_header(rec).ok_or_else(|| {
            corrupt(format!(
                "bad record header in pack {:08x} at {}",
                loc.pack.0, loc.offset
            ))
        })?;
        let payload = &rec[RECORD_HEADER_LEN..];
        // The crc is not checked here: the blake3 check below covers the payload, and the
        // header fields that matter are compared with the index. (The crc serves scans of
        // packs that have no index to compare with: rebuild and repair.)
        if h.id != *id || h.stored_len != loc.stored_len || h.raw_len != loc.raw_len {
            return Err(corrupt(format!(
                "checksum mismatch in pack {:08x} at {}",
                loc.pack.0, loc.offset
            )));
        }
        let data = chunk::decode(payload, h.codec, h.raw_len as usize)
            .ok_or_else(|| corrupt("payload does not decompress".into()))?;
        if ChunkId::of(&data) != *id {
            return Err(corrupt("content does not match its id".into()));
        }
        Ok(data)
    }

    /// Load the chunks under `keys` into the read cache (`tessera warm`), each touched twice
    /// so the cache holds it like a chunk read again and again (quick_cache admits a chunk
    /// read once as cold, the first to go).
    pub fn warm(&self, rtx: &ReadTransaction, keys: &[ChunkKey]) -> WarmCounts {
        let mut counts = WarmCounts::default();
        let Ok(t) = rtx.open_table(schema::CHUNKS) else {
            counts.damaged = keys.len() as u64;
            return counts;
        };
        let (mut cold, mut ids) = (Vec::new(), Vec::new());
        for k in keys {
            match index::entry_in(&t, *k) {
                // Cached already: this lookup is its second touch.
                Ok(Some(e)) if self.cache.get(&e.id).is_some() => {}
                Ok(Some(e)) => {
                    cold.push(*k);
                    ids.push(e.id);
                }
                _ => counts.damaged += 1,
            }
        }
        for (r, id) in self.read_many(rtx, &cold).into_iter().zip(&ids) {
            match r {
                Ok(_) => {
                    counts.loaded += 1;
                    let _ = self.cache.get(id);
                }
                Err(_) => counts.damaged += 1,
            }
        }
        counts
    }

    /// Read cache figures since the store was opened.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.cache_hits.load(Ordering::Relaxed),
            misses: self.cache_misses.load(Ordering::Relaxed),
            chunks: self.cache.len() as u64,
            capacity_chunks: self.cache.capacity(),
            pack_read_bytes: self.pack_read_bytes.load(Ordering::Relaxed),
        }
    }

    /// Drop a chunk from the read cache (after it was released).
    pub fn forget(&self, id: &ChunkId) {
        self.cache.remove(id);
    }
}

/// A verified chunk, or why it could not be read.
pub type ChunkResult = Result<Arc<Vec<u8>>, StoreError>;

/// Buffers of records being appended, reused: a fresh multi-MiB buffer per append costs a page
/// fault and the zeroing of every page (the allocator gives freed pages back to the system
/// within 250 ms, `src/alloc.rs`, and takes fresh zeroed ones for the next). A few are kept
/// for the whole process, not one per thread: NFS and FUSE workers append too, and a buffer
/// kept by each would hold tens of MiB resident.
static APPEND_BUFS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const APPEND_BUFS_KEPT: usize = 2;

/// Runs of records adjacent in one pack, among `items` sorted by location, each spanning at
/// most [`MAX_COALESCED_READ`] bytes: one read each.
fn adjacent_runs<T>(items: &[T], loc: impl Fn(&T) -> &ChunkLoc) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for k in 1..=items.len() {
        let end_of_run = k == items.len() || {
            let (p, n) = (loc(&items[k - 1]), loc(&items[k]));
            let p_end = p.offset + (RECORD_HEADER_LEN + p.stored_len as usize) as u64;
            n.pack != p.pack
                || n.offset != p_end
                || n.offset + u64::from(n.stored_len) - loc(&items[start]).offset
                    > MAX_COALESCED_READ
        };
        if end_of_run {
            runs.push(&items[start..k]);
            start = k;
        }
    }
    runs
}
