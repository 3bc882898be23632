//! The filesystem engine: a datastore in POSIX terms (inodes, directories, file data, clones).
//!
//! Front ends (FUSE, NFS, the CLI) call the methods of [`Engine`]; the engine knows nothing of
//! them. Operations are grouped by family: `dir.rs` (namespace), `data.rs` (the write-back
//! buffer), `read.rs`, `flush.rs` (flush, fsync, the background flusher), `extent.rs`
//! (truncate, punch, seek), `clone.rs` (clones and range sharing), `xattr.rs`, `check.rs`
//! (fsck), `stats.rs`.
//!
//! # Concurrency
//! Metadata lives in one redb database; redb serialises write transactions and gives readers
//! snapshots. File data written but not yet flushed sits in a per-inode [`data::FileState`]
//! (see `data::FileEntry`).
//!
//! Lock order (a thread holding one may only wait for those below it):
//! 1. `Engine::gc_lock` (one compaction at a time);
//! 2. file flush locks `FileEntry::flush`, in inode order;
//! 3. file-state locks `FileEntry::state`, in inode order;
//! 4. `Engine::durable_lock` (group commit);
//! 5. the store's append session (`Store::append_session`, shared; `drain_appends` takes it
//!    exclusively holding nothing below 1);
//! 6. the redb write transaction;
//! 7. the store's read gate (`Store::read_gate`, shared and recursive, taken by every
//!    snapshot; exclusive only to delete packs, under `gc_lock` alone);
//! 8. leaf locks held for a few instructions, never while waiting for another lock:
//!    `open_counts`, `pressure`, `progress`, the store's `active` and `unsynced`, the chunk cache.
//!
//! Nothing takes a flush lock while holding a state lock, and nothing calls `write` (which
//! may flush any file under memory pressure) while holding a flush lock: parking_lot locks
//! are not re-entrant. Test builds check this at run time: `crate::deadlock` aborts the race,
//! crash and property tests on any lock cycle.
//!
//! # Durability
//! redb keeps a `Durability::None` commit only until the process ends: such a commit is visible
//! at once but is lost by a kill -9 (and a power loss) unless a `Durability::Immediate` commit
//! follows. So:
//! - metadata operations (`meta_txn`) commit with `None` and then wait for a durable commit
//!   that covers them (`make_durable`, shared by concurrent callers: group commit) before
//!   returning: what they acknowledged survives kill -9 and power loss;
//! - file data lands in the write-back buffer and is flushed into commits with `None`; it
//!   becomes durable at `fsync`, O_SYNC, NFS COMMIT/FILE_SYNC, the periodic flusher (every few
//!   seconds), clones and unmount. Unsynced data may be lost by a crash, as on any filesystem;
//! - every durable commit syncs the pack appends first, then commits with `Immediate` (which
//!   also makes every earlier `None` commit durable). Packs are therefore always durable before
//!   the metadata that references them.

pub mod check;
pub mod clone;
#[cfg(test)]
mod crash_tests;
pub mod data;
pub mod dir;
pub(crate) mod dirty;
pub mod du;
pub mod error;
pub mod extent;
pub mod flush;
pub mod gc;
pub mod inode;
pub mod ops;
pub mod pace;
pub mod periodic;
pub mod read;
pub mod receive;
pub mod repair;
pub mod repl_state;
#[cfg(test)]
mod replication_tests;
pub mod scrub;
pub mod send;
pub mod snapshot;
#[cfg(test)]
mod snapshot_tests;
pub mod stats;
pub mod stream;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
pub mod tier_backup;
#[cfg(test)]
mod tier_tests;
pub mod timing;
pub mod tree;
pub mod upgrade;
pub mod warm;
pub mod xattr;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    WriteTransaction,
};

use crate::schema::*;
use crate::store::pack::{DirPackIo, PackIo};
use crate::store::remote::TierConfig;
use crate::store::tier::TieredPackIo;
use crate::store::{ChunkLoc, ChunkTables, Store};
pub use error::{FsError, FsResult};
pub use inode::{Generation, Inode, InodeId, Kind, Time};

/// Largest file size (bytes): 1 PiB. Well above the 16 TiB NFS clients expect.
pub const MAX_FILE_SIZE: u64 = 1 << 50;
/// Longest name in a directory (bytes), as in Linux.
pub const NAME_MAX: usize = 255;
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 65536;
pub const DEFAULT_CHUNK_SIZE: u32 = 16384;

/// Settings chosen when a datastore is created (recorded in it).
#[derive(Clone, Copy, Debug)]
pub struct Format {
    /// Bytes; a power of two between 4 KiB and 64 KiB.
    pub chunk_size: u32,
    /// zstd level, 1 (fast) to 19.
    pub zstd_level: i32,
}

impl Default for Format {
    fn default() -> Self {
        Format {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 1,
        }
    }
}

/// Run-time tuning.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Unflushed file data held in memory before writers flush (bytes).
    pub dirty_limit: u64,
    /// Verified, decompressed chunks kept for reads (bytes).
    pub cache_bytes: u64,
    /// redb page cache (bytes).
    pub meta_cache_bytes: u64,
    /// The metadata file is compacted at open and when quiet once this many bytes of it (and a
    /// quarter) are free (`Engine::compact_metadata`).
    pub compact_min_free: u64,
    /// Records stored uncompressed on the write path are compressed by compaction only in
    /// packs not appended to for this long (`RECOMPRESS_MIN_AGE`).
    pub recompress_min_age: std::time::Duration,
    /// New chunks are stored uncompressed, for background compaction to compress once their
    /// packs go cold, while fewer than this many bytes of uncompressed records wait (and at
    /// most an eighth of the disk's free space); past it, and always on an S3-backed
    /// datastore (packs would be uploaded twice), they are compressed as they are written.
    /// Moves zstd, most of the CPU of a copy onto the datastore, off the write path: see
    /// `RAW_BACKLOG`. 0 compresses every chunk written whole at once.
    pub raw_backlog: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        // With the FUSE buffers (4 threads x 1 MiB) and allocator slack, these keep the daemon
        // under 512 MiB resident whatever is written (benches/rss.sh, benches/fio.sh).
        Tuning {
            dirty_limit: 96 << 20,
            cache_bytes: 48 << 20,
            // Four desktops writing at once ran 10 % more IOPS at 10 % less CPU per I/O with
            // 96 MiB than with 48 (the flush commits and appends cheaper; two runs each in one
            // hour, benches/README.md "Where the 4-client pool loses"), for about 40 MiB more
            // peak RSS; 192 MiB gave no more.
            meta_cache_bytes: 96 << 20,
            compact_min_free: COMPACT_MIN_FREE,
            recompress_min_age: gc::RECOMPRESS_MIN_AGE,
            raw_backlog: RAW_BACKLOG,
        }
    }
}

/// Default `Tuning::raw_backlog` (bytes): the data of a golden image or two (the corpus golden
/// image holds 1.1 GiB in 2 GiB), small beside a datastore of hundreds of desktops. Copying
/// images in runs at the speed of hashing and appending; the extra disk writes (the raw
/// records, then their compressed copies) are paid once, when the packs go cold.
pub const RAW_BACKLOG: u64 = 4 << 30;

/// Attributes as front ends see them.
#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: InodeId,
    pub inode: Inode,
    /// Bytes of stored (non-hole) data, before dedup and compression.
    pub allocated: u64,
}

pub const META_FILE: &str = "meta.redb";
/// Space set aside on the datastore's disk for compaction (see `Engine::ensure_reserve`).
pub const RESERVE_FILE: &str = "reserve";

/// The metadata file is compacted at open when at least this many bytes of it are free
/// (and a quarter of it): below that, the time is not worth the space.
pub const COMPACT_MIN_FREE: u64 = 16 << 20;

/// Copy of the metadata file taken each time a serving process opens the datastore.
pub const META_BACKUP: &str = "meta.redb.bak";
pub const PACK_DIR: &str = "packs";

thread_local! {
    /// Inside `Engine::request` on this thread: `Some(true)` once a metadata operation has
    /// committed and waits to be made durable when the request ends. The engine is synchronous,
    /// so a request runs on one thread from start to end (the NFS adapter runs it inside
    /// `block_in_place`).
    static DEFERRED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// The engine over one datastore.
pub struct Engine {
    /// Shared by every transaction (held only while one begins); taken exclusively to compact
    /// the file (`compact_metadata`), which needs all transactions to have ended.
    db: parking_lot::RwLock<Database>,
    store: Store,
    dir: Option<PathBuf>,
    chunk_size: u64,
    /// See `K_DATASTORE_ID`.
    id: u64,
    files: DashMap<InodeId, Arc<data::FileEntry>>,
    /// Open handles per inode (an unlinked inode lives until its last handle closes).
    open_counts: Mutex<HashMap<InodeId, u32>>,
    dirty_bytes: AtomicU64,
    /// Bytes of records stored uncompressed and waiting for compaction to compress them: the
    /// pack accounting's figure, read at open and at each background reclamation check, plus
    /// what flushes stored raw since (so it errs high between checks; `Tuning::raw_backlog`).
    raw_backlog: AtomicU64,
    tuning: Tuning,
    /// Write transactions committed so far (group commit bookkeeping).
    commits: AtomicU64,
    /// Every commit counted below this number is durable.
    durable_upto: AtomicU64,
    /// Serialises callers of `make_durable`, so late arrivals find their commit covered.
    /// Lock order 4 (module doc): taken under flush and state locks, never the other way.
    durable_lock: Mutex<()>,
    /// Held by a compaction run (one at a time). Lock order 1: first of all.
    gc_lock: Mutex<()>,
    /// Held by a `receive` (one at a time: it owns `/.snapshots/.receiving`). Taken before
    /// any other lock and never while holding one.
    receive_lock: Mutex<()>,
    /// Set by writers under memory pressure to wake the background flusher. Shared with the
    /// flusher thread, which holds no strong reference to the engine while it waits.
    pressure: Arc<(Mutex<bool>, parking_lot::Condvar)>,
    /// Signalled after each flush commit: writers waiting for room under memory pressure.
    progress: (Mutex<()>, parking_lot::Condvar),
    flusher_running: AtomicBool,
    /// CPU time per stage of the data path (`tessera stats`, the benchmarks' breakdown).
    pub(crate) timings: timing::Timings,
    /// Requests per front end and kind, recorded by the front ends (metrics).
    pub ops: ops::Ops,
}

/// A read transaction that also keeps the packs it may read from being deleted by compaction
/// until it ends (compaction deletes a pack only once no snapshot older than its commit lives).
pub(crate) struct Snapshot<'a> {
    txn: redb::ReadTransaction,
    _gate: crate::store::ReadGate<'a>,
}

impl std::ops::Deref for Snapshot<'_> {
    type Target = redb::ReadTransaction;
    fn deref(&self) -> &redb::ReadTransaction {
        &self.txn
    }
}

/// The tables a metadata transaction works on, opened once per transaction.
pub(crate) struct W<'txn> {
    /// For tables few transactions use (snapshots), opened on demand.
    pub txn: &'txn WriteTransaction,
    pub inodes: Table<'txn, u64, &'static [u8]>,
    pub dirents: Table<'txn, (u64, &'static [u8]), (u64, u64)>,
    pub cookies: Table<'txn, (u64, u64), &'static [u8]>,
    pub symlinks: Table<'txn, u64, &'static [u8]>,
    pub xattrs: Table<'txn, (u64, &'static [u8]), &'static [u8]>,
    pub orphans: Table<'txn, u64, ()>,
    pub sup: Table<'txn, &'static str, u64>,
    pub nodes: Table<'txn, u64, &'static [u8]>,
    pub refs: Table<'txn, u64, u64>,
    pub chunks: ChunkTables<'txn>,
    pub next_node: u64,
    /// Set only by the snapshot commands: every other transaction that would store an inode
    /// of a snapshot fails with `FsError::ReadOnly` (the backstop behind the checks at each
    /// entry point, so no path can change a snapshot by accident).
    pub snapshots_writable: bool,
}

impl<'txn> W<'txn> {
    fn open(txn: &'txn WriteTransaction) -> FsResult<W<'txn>> {
        let sup = txn.open_table(SUPER)?;
        let next_node = sup.get(K_NEXT_NODE)?.map_or(1, |v| v.value());
        Ok(W {
            txn,
            inodes: txn.open_table(INODES)?,
            dirents: txn.open_table(DIRENTS)?,
            cookies: txn.open_table(DIRCOOKIE)?,
            symlinks: txn.open_table(SYMLINKS)?,
            xattrs: txn.open_table(XATTRS)?,
            orphans: txn.open_table(ORPHANS)?,
            sup,
            nodes: txn.open_table(NODES)?,
            refs: txn.open_table(NODEREFS)?,
            chunks: ChunkTables::open(txn)?,
            next_node,
            snapshots_writable: false,
        })
    }

    /// Apply the transaction's reference drops: the chunks released, and their records.
    fn finish(mut self) -> FsResult<(Vec<crate::store::chunk::ChunkId>, Vec<ChunkLoc>)> {
        self.chunks.apply_decrefs()?;
        self.sup.insert(K_NEXT_NODE, self.next_node)?;
        Ok((
            std::mem::take(&mut self.chunks.released),
            std::mem::take(&mut self.chunks.died),
        ))
    }

    pub fn tree(&mut self) -> tree::TreeTx<'_, 'txn> {
        tree::TreeTx {
            nodes: &mut self.nodes,
            refs: &mut self.refs,
            chunks: &mut self.chunks,
            next_node: &mut self.next_node,
        }
    }

    pub fn inode(&self, ino: InodeId) -> FsResult<Inode> {
        get_inode(&self.inodes, ino)
    }

    pub fn put_inode(&mut self, ino: InodeId, inode: &Inode) -> FsResult<()> {
        if inode.is_read_only() && !self.snapshots_writable {
            return Err(FsError::ReadOnly);
        }
        self.inodes.insert(ino.0, inode.encode().as_slice())?;
        Ok(())
    }

    pub fn counter(&mut self, key: &'static str, first: u64) -> FsResult<u64> {
        let v = self.sup.get(key)?.map_or(first, |v| v.value());
        self.sup.insert(key, v + 1)?;
        Ok(v)
    }
}

pub(crate) fn get_inode<T: ReadableTable<u64, &'static [u8]>>(
    t: &T,
    ino: InodeId,
) -> FsResult<Inode> {
    let v = t.get(ino.0)?.ok_or(FsError::NotFound)?;
    Inode::decode(v.value())
        .ok_or_else(|| FsError::BadMeta(format!("inode {} does not decode", ino.0)))
}

/// A new datastore id: the creation time in nanoseconds, so a datastore re-created in the same
/// place gets a larger id and NFS handles of the old one answer "stale".
fn new_datastore_id() -> u64 {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    ns.max(1)
}

/// The datastore's id; datastores made before ids existed get one now.
fn datastore_id(db: &Database) -> FsResult<u64> {
    if let Some(id) = db.begin_read()?.open_table(SUPER)?.get(K_DATASTORE_ID)? {
        return Ok(id.value());
    }
    let id = new_datastore_id();
    let txn = db.begin_write()?;
    txn.open_table(SUPER)?.insert(K_DATASTORE_ID, id)?;
    txn.commit()?;
    Ok(id)
}

fn read_format(db: &Database) -> FsResult<Format> {
    let rtx = db.begin_read()?;
    let sup = rtx
        .open_table(SUPER)
        .map_err(|_| FsError::BadMeta("not a Tessera datastore".into()))?;
    let get = |k| -> FsResult<u64> {
        sup.get(k)?
            .map(|v| v.value())
            .ok_or_else(|| FsError::BadMeta(format!("superblock lacks {k}")))
    };
    let version = get(K_FORMAT)?;
    if version != FORMAT_VERSION {
        return Err(FsError::BadMeta(format!(
            "datastore format {version} is not supported by this build (format {FORMAT_VERSION})"
        )));
    }
    Ok(Format {
        chunk_size: get(K_CHUNK_SIZE)? as u32,
        zstd_level: get(K_ZSTD_LEVEL)? as i32,
    })
}

impl Engine {
    /// Create a new datastore in `dir` (which must be empty or absent).
    pub fn create(dir: &Path, format: Format) -> FsResult<()> {
        Self::create_with_tier(dir, format, None)
    }

    /// [`Engine::create`], with the chunks kept in an object store (`tier`).
    pub fn create_with_tier(dir: &Path, format: Format, tier: Option<&TierConfig>) -> FsResult<()> {
        if !format.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&format.chunk_size)
        {
            return Err(FsError::Invalid(
                "chunk size must be a power of two from 4 KiB to 64 KiB",
            ));
        }
        if !(1..=19).contains(&format.zstd_level) {
            return Err(FsError::Invalid("zstd level must be 1 to 19"));
        }
        std::fs::create_dir_all(dir)?;
        if std::fs::read_dir(dir)?.next().is_some() {
            return Err(FsError::Exists);
        }
        // Private before anything is put in it (see `crate::private`).
        crate::private::make_private(dir)?;
        crate::private::create_dir(&dir.join(PACK_DIR))?;
        let db = Database::create(dir.join(META_FILE))?;
        // redb creates the file with the umask's mode.
        crate::private::make_private(&dir.join(META_FILE))?;
        Self::init_db(&db, format)?;
        if let Some(t) = tier {
            t.save(dir)?;
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    fn init_db(db: &Database, format: Format) -> FsResult<()> {
        let txn = db.begin_write()?;
        {
            let mut w = W::open(&txn)?;
            w.sup.insert(K_FORMAT, FORMAT_VERSION)?;
            w.sup.insert(K_CHUNK_SIZE, u64::from(format.chunk_size))?;
            w.sup.insert(K_ZSTD_LEVEL, format.zstd_level as u64)?;
            w.sup.insert(K_NEXT_INODE, 2)?;
            w.sup.insert(K_NEXT_GENERATION, 2)?;
            w.sup.insert(K_DATASTORE_ID, new_datastore_id())?;
            let mut root = Inode::new(Kind::Dir, 0o755, 0, 0, Generation(1));
            root.nlink = 2;
            w.put_inode(InodeId::ROOT, &root)?;
            w.dirents.insert((1, b"..".as_slice()), (1, 0))?;
            w.finish()?;
        }
        let _ = txn.open_table(COUNTERS)?;
        let _ = txn.open_table(PACKS)?;
        txn.commit()?;
        Ok(())
    }

    /// Open the datastore in `dir`. The caller holds the datastore lock.
    pub fn open(dir: &Path, tuning: Tuning) -> FsResult<Engine> {
        Self::open_with(dir, tuning, None)
    }

    /// [`Engine::open`] with given pack I/O instead of the folder's own (tests put an
    /// object-store tier over an in-memory or failing store under a real folder).
    pub fn open_with(dir: &Path, tuning: Tuning, io: Option<Arc<dyn PackIo>>) -> FsResult<Engine> {
        let meta = dir.join(META_FILE);
        if !meta.exists() {
            return Err(FsError::BadMeta(format!(
                "{} is not a Tessera datastore (no {META_FILE})",
                dir.display()
            )));
        }
        let damaged = |detail: &str| {
            let fix = if dir.join(META_BACKUP).exists() {
                format!(
                    "restore the copy taken when it was last served: cp {b} {m} && tessera fsck --repair {d}",
                    b = dir.join(META_BACKUP).display(),
                    m = meta.display(),
                    d = dir.display()
                )
            } else {
                format!("restore {} from a backup", meta.display())
            };
            FsError::BadMeta(format!(
                "the metadata file {} is damaged ({detail}); the packs still hold the data but not \
                 the file names and chunk maps: {fix}",
                meta.display()
            ))
        };
        // redb asserts (panics) on some damage, e.g. a truncated file: report it as damage.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Database::builder()
                .set_cache_size(tuning.meta_cache_bytes as usize)
                .open(&meta)
        }));
        std::panic::set_hook(hook);
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)))) => {
                return Err(damaged(&m))
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(damaged("truncated, or not a database")),
        };
        let io: Arc<dyn PackIo> = match (io, TierConfig::load(dir)?) {
            (Some(io), _) => io,
            (None, Some(cfg)) => Arc::new(TieredPackIo::open(dir, &dir.join(PACK_DIR), cfg)?),
            (None, None) => Arc::new(DirPackIo::new(&dir.join(PACK_DIR))?),
        };
        let v = upgrade::format_of(&db)?;
        if v < FORMAT_VERSION {
            // The conversion is one transaction; the copy is for going back to the old build.
            let keep = dir.join(format!("{META_FILE}.format{v}"));
            std::fs::copy(&meta, &keep)?;
            std::fs::File::open(&keep)?.sync_all()?;
            tracing::warn!(
                "converting {} from datastore format {v} to {FORMAT_VERSION}; the old metadata \
                 is kept in {} (delete it once this build serves the datastore well)",
                dir.display(),
                keep.display()
            );
        }
        let mut e = Self::with_parts(db, io, tuning)?;
        e.dir = Some(dir.to_path_buf());
        e.ensure_reserve();
        if let Err(err) = e.compact_metadata(e.tuning.compact_min_free) {
            tracing::warn!("cannot compact the metadata file: {err}");
        }
        Ok(e)
    }

    /// An engine over a given database and pack I/O (tests use in-memory ones).
    pub fn with_parts(db: Database, io: Arc<dyn PackIo>, tuning: Tuning) -> FsResult<Engine> {
        upgrade::upgrade(&db)?;
        let format = read_format(&db)?;
        let cache_items = (tuning.cache_bytes / u64::from(format.chunk_size)) as usize;
        let store = Store::open(io, format.zstd_level, cache_items)?;
        let id = datastore_id(&db)?;
        let e = Engine {
            db: parking_lot::RwLock::new(db),
            store,
            dir: None,
            chunk_size: u64::from(format.chunk_size),
            id,
            files: DashMap::new(),
            open_counts: Mutex::new(HashMap::new()),
            dirty_bytes: AtomicU64::new(0),
            raw_backlog: AtomicU64::new(0),
            tuning,
            commits: AtomicU64::new(0),
            durable_upto: AtomicU64::new(0),
            durable_lock: Mutex::new(()),
            gc_lock: Mutex::new(()),
            receive_lock: Mutex::new(()),
            pressure: Arc::new((Mutex::new(false), parking_lot::Condvar::new())),
            progress: (Mutex::new(()), parking_lot::Condvar::new()),
            flusher_running: AtomicBool::new(false),
            timings: timing::Timings::default(),
            ops: ops::Ops::default(),
        };
        e.purge_orphans()?;
        e.refresh_raw_backlog()?;
        Ok(e)
    }

    /// A fresh in-memory datastore (tests, benchmarks).
    pub fn in_memory(format: Format, io: Arc<dyn PackIo>) -> FsResult<Engine> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::init_db(&db, format)?;
        Self::with_parts(db, io, Tuning::default())
    }

    /// Tear down, returning the database and pack I/O so a test can reopen them as after a
    /// crash (nothing is flushed).
    pub fn into_parts(self) -> (Database, Arc<dyn PackIo>) {
        let io = self.store.io().clone();
        (self.db.into_inner(), io)
    }

    /// The datastore's id, fixed at creation (see `K_DATASTORE_ID`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tuning the engine was opened with.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// CPU time per stage of the data path since the engine was opened.
    pub fn timings(&self) -> &timing::Timings {
        &self.timings
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Run `f` in a write transaction and commit it; durably (packs synced first) if asked.
    pub(crate) fn txn<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut W<'_>) -> FsResult<T>,
    ) -> FsResult<T> {
        if durable {
            // Most of the pack fsync happens here, before the metadata writer lock is taken,
            // so other writers' commits do not wait for it; the sync inside covers only
            // appends made meanwhile.
            self.store.sync()?;
        }
        let mut txn = self.db.read().begin_write()?;
        // Commits completed before this transaction began; a durable commit covers them.
        let covers = self.commits.load(Ordering::SeqCst);
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| FsError::BadMeta(e.to_string()))?;
        let (out, (released, died)) = {
            let mut w = W::open(&txn)?;
            let out = f(&mut w)?;
            (out, w.finish()?)
        };
        if durable {
            self.store.sync()?;
            // From this commit on, every record born so far may be referenced by durable
            // state (`store::reuse`); inside the transaction, so no commit comes between.
            self.store.durable_point();
        }
        txn.commit()?;
        let number = self.commits.fetch_add(1, Ordering::SeqCst);
        // Their places may be written over once the deaths are durable (`store::reuse`).
        self.store.record_deaths(number, durable, &died);
        if durable {
            self.durable_upto.fetch_max(covers, Ordering::SeqCst);
            self.store.deaths_durable(covers);
        }
        for id in released {
            self.store.forget(&id);
        }
        Ok(out)
    }

    /// A metadata operation (create, link, unlink, rename, setattr, xattrs): commit it, then
    /// make it durable before returning, so what a caller was told succeeded survives kill -9
    /// and power loss (NFS servers must have these on stable storage before replying, RFC 1813
    /// section 3.3). The commit itself is quick (`Durability::None`); the durable part is
    /// shared with every operation that committed meanwhile (`make_durable`, group commit), so
    /// concurrent creates cost one fsync between them, not one each.
    pub(crate) fn meta_txn<T>(&self, f: impl FnOnce(&mut W<'_>) -> FsResult<T>) -> FsResult<T> {
        let out = self.txn(false, f)?;
        let deferred = DEFERRED.with(|d| match d.get() {
            Some(_) => {
                d.set(Some(true));
                true
            }
            None => false,
        });
        if !deferred {
            self.make_durable()?;
        }
        Ok(out)
    }

    /// Run several engine operations as one request: their metadata changes are made durable
    /// once, when `f` returns (whether it succeeded or not), instead of once per operation. An
    /// NFS CREATE is a create plus a setattr, and its reply waits for one fsync, not two.
    /// Requests that change nothing cost nothing. Nests: the outermost call makes it durable.
    pub fn request<T, E: From<FsError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let outer = DEFERRED.with(|d| d.replace(Some(false)));
        let out = f();
        let changed = DEFERRED.with(|d| d.replace(outer)) == Some(true);
        if changed {
            match outer {
                Some(_) => DEFERRED.with(|d| d.set(Some(true))),
                None => self.make_durable()?,
            }
        }
        out
    }

    /// Give the metadata file's free pages back to the disk (redb's `compact`, which moves
    /// pages down and truncates the file). redb reuses free pages, but a burst of writes
    /// between durable commits leaves the file larger than its tables (2.9x after copying 9
    /// desktop images in), and only compaction shrinks it. Needs every transaction to have
    /// ended (it gives up otherwise), so it runs when a datastore is opened, when the
    /// flusher finds it quiet and when a serving process stops, each time only if at least
    /// `min_free` bytes and a quarter of the file are free; new transactions wait meanwhile
    /// (0.4 s for a 70 MiB file). Returns the bytes given back.
    pub fn compact_metadata(&self, min_free: u64) -> FsResult<u64> {
        let Some(path) = self.dir().map(|d| d.join(META_FILE)) else {
            return Ok(0);
        };
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let before = len(&path);
        let used = {
            let db = self.db.read();
            let txn = db.begin_write()?;
            let st = txn.stats().map_err(redb::Error::from)?;
            txn.abort()?;
            st.allocated_pages() * st.page_size() as u64
        };
        let free = before.saturating_sub(used);
        if free < min_free || free < before / 4 {
            return Ok(0);
        }
        let mut db = self.db.write();
        // Compaction commits, and may make whatever is committed durable: records born so far
        // count as referenced by durable state from here on (`store::reuse`).
        self.store.durable_point();
        match db.compact() {
            Ok(_) => {}
            // A transaction is still open (a client call in flight): next time.
            Err(redb::CompactionError::TransactionInProgress) => return Ok(0),
            Err(e) => return Err(redb::Error::from(e).into()),
        }
        drop(db);
        let after = len(&path);
        tracing::info!(
            "metadata compacted: {} MiB -> {} MiB",
            before >> 20,
            after >> 20
        );
        Ok(before.saturating_sub(after))
    }

    pub(crate) fn read_txn(&self) -> FsResult<Snapshot<'_>> {
        let gate = self.store.read_gate();
        Ok(Snapshot {
            txn: self.db.read().begin_read()?,
            _gate: gate,
        })
    }

    /// Attributes of `ino`, including data written but not yet flushed.
    pub fn getattr(&self, ino: InodeId) -> FsResult<Attr> {
        let st = self.files.get(&ino).map(|s| s.clone());
        let guard = st.as_ref().map(|s| s.state.read());
        let rtx = self.read_txn()?;
        let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
        Ok(self.attr_of(ino, inode, guard.as_deref()))
    }

    pub(crate) fn attr_of(
        &self,
        ino: InodeId,
        mut inode: Inode,
        st: Option<&data::FileState>,
    ) -> Attr {
        let mut allocated = inode.aux * self.chunk_size;
        if let Some(st) = st {
            st.overlay(&mut inode);
            allocated += st.chunk_count() as u64 * self.chunk_size;
        }
        let allocated = match inode.kind {
            // Chunks are whole, the file's tail is not: never report more than the size.
            Kind::File => allocated.min(inode.size.next_multiple_of(4096)),
            _ => 4096,
        };
        Attr {
            ino,
            inode,
            allocated,
        }
    }

    /// A handle was opened on `ino`; one `for_write` (or truncating) fails on a snapshot.
    pub fn open_handle(&self, ino: InodeId, for_write: bool) -> FsResult<Attr> {
        let a = self.getattr(ino)?;
        if for_write && a.inode.is_read_only() {
            return Err(FsError::ReadOnly);
        }
        *self.open_counts.lock().entry(ino).or_insert(0) += 1;
        Ok(a)
    }

    /// A handle on `ino` was closed; an unlinked inode is deleted with its last handle.
    pub fn release_handle(&self, ino: InodeId) -> FsResult<()> {
        let last = {
            let mut oc = self.open_counts.lock();
            let c = oc.entry(ino).or_insert(1);
            *c -= 1;
            if *c == 0 {
                oc.remove(&ino);
                true
            } else {
                false
            }
        };
        if last {
            let purged = self.txn(false, |w| {
                if w.orphans.get(ino.0)?.is_some() {
                    w.orphans.remove(ino.0)?;
                    dir::purge(w, ino)?;
                    return Ok(true);
                }
                Ok(false)
            })?;
            if purged {
                self.drop_state(ino);
            }
        }
        Ok(())
    }

    pub(crate) fn is_open(&self, ino: InodeId) -> bool {
        self.open_counts.lock().contains_key(&ino)
    }

    fn purge_orphans(&self) -> FsResult<()> {
        self.txn(true, |w| {
            let orphans: Vec<u64> = w
                .orphans
                .iter()?
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for o in orphans {
                w.orphans.remove(o)?;
                dir::purge(w, InodeId(o))?;
            }
            Ok(())
        })
    }

    /// Size of the space reserve: 5 % of the disk, at least 16 MiB, at most 256 MiB (enough to
    /// compact a full pack that is half dead).
    fn reserve_bytes(&self) -> u64 {
        let (total, _) = self.disk_space();
        (total / 20).clamp(16 << 20, 256 << 20)
    }

    /// Keep the space reserve allocated. Writes fill the disk up to it and fail with ENOSPC,
    /// leaving room for compaction to copy live records out of mostly-dead packs, which is how
    /// a full datastore gets its space back. Best effort: on a disk too full to hold it, the
    /// reserve waits until compaction has freed space.
    pub(crate) fn ensure_reserve(&self) {
        let Some(dir) = &self.dir else { return };
        let want = self.reserve_bytes();
        let path = dir.join(RESERVE_FILE);
        let had = std::fs::metadata(&path).map_or(0, |m| m.len());
        if had >= want {
            return;
        }
        let r = (|| -> std::io::Result<()> {
            let f = crate::private::open_options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            use std::os::fd::AsRawFd;
            // SAFETY: `f` is an open, writable file for the duration of the call; the range is
            // non-negative and below i64::MAX (at most 256 MiB).
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, want as libc::off_t) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            f.sync_all()
        })();
        if let Err(err) = r {
            // Keep what was there before; drop only a reserve this call started.
            if had == 0 {
                let _ = std::fs::remove_file(&path);
            }
            tracing::warn!(
                "cannot set aside {} MiB for compaction ({err}); free some space on the disk",
                want >> 20
            );
        }
    }

    /// Give the reserve back to the disk so compaction can copy into it.
    pub(crate) fn release_reserve(&self) -> bool {
        let Some(dir) = &self.dir else { return false };
        std::fs::remove_file(dir.join(RESERVE_FILE)).is_ok()
    }

    /// Capacity of the disk under the datastore: (total bytes, available bytes).
    pub fn disk_space(&self) -> (u64, u64) {
        let Some(dir) = &self.dir else {
            return (1 << 40, 1 << 40);
        };
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            return (0, 0);
        };
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return (0, 0);
        }
        let f = s.f_frsize as u64;
        (s.f_blocks as u64 * f, s.f_bavail as u64 * f)
    }

    /// Number of inodes in use.
    pub fn inode_count(&self) -> FsResult<u64> {
        Ok(self.read_txn()?.open_table(INODES)?.len()?)
    }
}

/// Check a directory entry name.
pub(crate) fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid("bad file name"));
    }
    Ok(())
}
