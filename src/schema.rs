//! The whole key-value schema of the metadata database (`meta.redb`), in one place.
//!
//! | table | key | value |
//! |---|---|---|
//! | `super`     | name `&str` | `u64` counter or setting (see the `K_*` constants) |
//! | `inodes`    | inode `u64` | [`crate::fs::inode::Inode`] encoding (fixed 96 bytes) |
//! | `dirents`   | (parent `u64`, name bytes) | (child inode `u64`, cookie `u64`) |
//! | `dircookie` | (parent `u64`, cookie `u64`) | name bytes: readdir order, stable while entries are added |
//! | `symlinks`  | inode `u64` | target bytes |
//! | `xattrs`    | (inode `u64`, name bytes) | value bytes |
//! | `nodes`     | node `u64` | chunk-map tree node ([`crate::fs::tree`] encoding) |
//! | `noderefs`  | node `u64` | reference count `u64` (roots and parent nodes pointing at it) |
//! | `chunk_index` | chunk key `u64` ([`crate::store::ChunkKey`]) | [`crate::store::IndexEntry`] encoding (61 bytes: id, location, references) |
//! | `chunk_aliases` | chunk id `[u8; 32]` | chunk key `u64`: the few chunks whose preferred key was taken |
//! | `packs`     | pack `u32` | (live bytes `u64`, dead bytes `u64`) of stored records |
//! | `counters`  | name `&str` | `u64` store-wide totals (see the `C_*` constants) |
//! | `orphans`   | inode `u64` | `()`: unlinked inodes still open; purged at next open |
//! | `snapshots` | (path bytes, name bytes) | (snapshot's top inode `u64`, created unix seconds `u64`, `SNAP_*` flags `u64`) |
//! | `repl_state` | path bytes | JSON `crate::fs::repl_state::ReplState`: receiver, schedule, last run |
//! | `snap_schedules` | path bytes | (interval seconds, keep last, keep hourly, keep daily: `u64` each) |
//!
//! Every integer inside a byte value is little-endian. The format version is `super.format`.
//!
//! Format history: 1 keyed the index by the 32-byte chunk id (table `chunks`, value a
//! `ChunkLoc`) and chunk-map leaves held ids; 2 keys both by 8-byte [`crate::store::ChunkKey`]s,
//! which makes the maps of full copies 3.7x smaller. Opening a format-1 datastore converts it
//! (`crate::fs::upgrade`).

use redb::TableDefinition;

pub const SUPER: TableDefinition<&str, u64> = TableDefinition::new("super");
pub const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub const DIRENTS: TableDefinition<(u64, &[u8]), (u64, u64)> = TableDefinition::new("dirents");
pub const DIRCOOKIE: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dircookie");
pub const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
pub const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
pub const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");
pub const NODEREFS: TableDefinition<u64, u64> = TableDefinition::new("noderefs");
pub const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunk_index");
pub const CHUNK_ALIASES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_aliases");
/// The format-1 index (read only by the upgrade).
pub const CHUNKS_V1: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
pub const PACKS: TableDefinition<u32, (u64, u64)> = TableDefinition::new("packs");
/// Bytes per pack of records stored uncompressed on the write path (chunks rewritten in part,
/// new data while the backlog has room: see `crate::store::Encoded::uncompressed`), for
/// compaction to compress. A hint: records that
/// died since still count until their pack is compacted. Absent in datastores written before
/// it (created at open); builds that do not know it ignore it.
pub const PACK_DEFERRED: TableDefinition<u32, u64> = TableDefinition::new("pack_deferred");
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
pub const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
/// Snapshots (`crate::fs::snapshot`) by the path they were taken of (relative to the root, no
/// leading `/`) and name. Absent until the first snapshot; older builds ignore it (and refuse
/// nothing: the snapshot trees are ordinary, flagged inodes under `/.snapshots`).
pub const SNAPSHOTS: TableDefinition<SnapKey, SnapValue> = TableDefinition::new("snapshots");
/// (path, name) of a snapshot.
pub type SnapKey = (&'static [u8], &'static [u8]);
/// (top inode, created unix seconds, `SNAP_*` flags) of a snapshot.
pub type SnapValue = (u64, u64, u64);
/// Snapshot schedules by path, run by the serving process.
pub const SNAP_SCHEDULES: TableDefinition<&[u8], (u64, u64, u64, u64)> =
    TableDefinition::new("snap_schedules");
/// Replication per path (`crate::fs::repl_state`), JSON values. Absent until the first
/// replication; older builds ignore it.
pub const REPL_STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("repl_state");
/// `snapshots` flag: taken by a schedule (pruned by the schedule's retention rules).
pub const SNAP_SCHEDULED: u64 = 1;
/// `snapshots` flag: received from another datastore (`tessera receive`).
pub const SNAP_RECEIVED: u64 = 2;

/// On-disk format version written by this build.
pub const FORMAT_VERSION: u64 = 2;

pub const K_FORMAT: &str = "format";
pub const K_CHUNK_SIZE: &str = "chunk_size";
pub const K_ZSTD_LEVEL: &str = "zstd_level";
pub const K_NEXT_INODE: &str = "next_inode";
pub const K_NEXT_NODE: &str = "next_node";
pub const K_NEXT_GENERATION: &str = "next_generation";
/// A random id given to the datastore when it is created (NFS file handles carry it, so
/// handles of another datastore, or of one re-created at the same path, read as stale).
pub const K_DATASTORE_ID: &str = "datastore_id";
/// Bumped by every durable barrier commit, so the commit is never empty.
pub const K_BARRIERS: &str = "barriers";
/// Inode of `/.snapshots`, once the first snapshot created it.
pub const K_SNAP_ROOT: &str = "snap_root";
/// Number of distinct chunks stored.
pub const C_CHUNK_COUNT: &str = "chunk_count";
/// Next alias number (`ChunkKey::alias`).
pub const C_NEXT_ALIAS: &str = "next_alias";
/// Sum of the uncompressed length of distinct chunks.
pub const C_UNIQUE_BYTES: &str = "unique_bytes";
/// Sum of the stored (compressed) payload length of distinct chunks.
pub const C_STORED_BYTES: &str = "stored_bytes";
