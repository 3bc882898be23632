//! Space statistics: logical size, stored size, dedup and compression ratios.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::inode::{Inode, Kind};
use super::{Engine, FsResult};
use crate::schema::*;

/// Figures for `tessera stats`. Byte counts are bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// The object-store tier (datastores made with `init --store`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<crate::store::tier::TierStats>,
    pub files: u64,
    pub directories: u64,
    /// Sum of file sizes (holes included).
    pub logical_bytes: u64,
    /// Sum over files of their non-hole chunks: what the files would take without dedup.
    pub referenced_bytes: u64,
    /// Distinct chunks stored, uncompressed.
    pub unique_bytes: u64,
    /// Distinct chunks stored, as compressed in packs (record headers excluded).
    pub stored_bytes: u64,
    pub chunk_count: u64,
    pub chunk_size: u64,
    /// referenced / unique.
    pub dedup_ratio: f64,
    /// unique / stored.
    pub compression_ratio: f64,
    /// referenced / stored.
    pub total_ratio: f64,
    /// Bytes of pack files on disk (live and dead records, headers).
    pub pack_bytes: u64,
    /// Records no longer referenced, reclaimable by compaction.
    pub reclaimable_bytes: u64,
    /// Records stored uncompressed on the write path (new data while the backlog has room,
    /// chunks rewritten in part), which compaction compresses (`tessera gc`; in the background
    /// once their packs are cold and `RECOMPRESS_MIN_BYTES` wait).
    #[serde(default)]
    pub uncompressed_bytes: u64,
    /// The read cache of decompressed, verified chunks (`--cache-size`), shared by all files:
    /// chunk reads it served and chunk loads from packs since the datastore was opened, its
    /// fill, and the bytes read from packs to serve reads.
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub cache_misses: u64,
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub cache_capacity_bytes: u64,
    #[serde(default)]
    pub pack_read_bytes: u64,
    /// Records written over dead records of the same size instead of appended
    /// (`store::reuse`), and their bytes, since the datastore was opened.
    #[serde(default)]
    pub records_reused: u64,
    #[serde(default)]
    pub reused_bytes: u64,
    /// Share of pack bytes that are live records (1.0: nothing to reclaim).
    #[serde(default)]
    pub pack_fill: f64,
    pub pack_count: u64,
    /// Size of the metadata database file.
    pub metadata_bytes: u64,
    /// The copy of the metadata file taken when the datastore was last served
    /// (`meta.redb.bak`).
    #[serde(default)]
    pub metadata_backup_bytes: u64,
    /// Space set aside for compaction on a full disk (`reserve`).
    #[serde(default)]
    pub reserve_bytes: u64,
    /// Everything else in the datastore folder (lock file, metadata kept from a format
    /// conversion).
    #[serde(default)]
    pub other_bytes: u64,
    /// The datastore folder in all: packs, metadata, backup, reserve and the rest.
    #[serde(default)]
    pub folder_bytes: u64,
    /// Unflushed data held in memory (only non-zero when asked of a serving process).
    pub dirty_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// Where the metadata file's bytes go, per table (redb's own page accounting).
    #[serde(default)]
    pub metadata_tables: Vec<MetaTable>,
    /// CPU time per stage of the data path since the datastore was opened (a serving
    /// process's figures when asked of one).
    #[serde(default)]
    pub stages: Vec<super::timing::StageTime>,
    /// Snapshots kept, and replication per path: receiver, schedule, last point and lag.
    #[serde(default)]
    pub snapshots: u64,
    #[serde(default)]
    pub replication: Vec<super::repl_state::ReplState>,
}

/// One metadata table's share of `meta.redb`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaTable {
    pub table: String,
    pub entries: u64,
    /// Key and value bytes.
    pub stored_bytes: u64,
    /// Bytes of the pages the table's tree takes (leaf and branch pages).
    pub page_bytes: u64,
    /// Page bytes neither stored nor redb's per-entry overhead: half-empty pages.
    pub fragmented_bytes: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

impl Engine {
    pub fn stats(&self) -> FsResult<Stats> {
        // Unflushed sizes and chunks are not in the tables yet.
        let mut sizes = std::collections::HashMap::new();
        let mut dirty = 0;
        for e in self.files.iter() {
            if let Some(g) = e.value().state.try_read() {
                dirty += g.chunk_count() as u64 * self.chunk_size;
                if let Some(s) = g.size {
                    sizes.insert(e.key().0, s);
                }
            }
        }
        let rtx = self.read_txn()?;
        let (mut files, mut dirs, mut logical, mut referenced) = (0, 0, 0, dirty);
        for r in rtx.open_table(INODES)?.iter()? {
            let (k, v) = r?;
            let Some(mut i) = Inode::decode(v.value()) else {
                continue;
            };
            if let Some(s) = sizes.get(&k.value()) {
                i.size = *s;
            }
            match i.kind {
                Kind::File => {
                    files += 1;
                    logical += i.size;
                    referenced += i.aux * self.chunk_size;
                }
                Kind::Dir => dirs += 1,
                _ => {}
            }
        }
        let counters = rtx.open_table(COUNTERS)?;
        let get = |k| -> FsResult<u64> { Ok(counters.get(k)?.map_or(0, |v| v.value())) };
        let unique = get(C_UNIQUE_BYTES)?;
        let stored = get(C_STORED_BYTES)?;
        let chunk_count = get(C_CHUNK_COUNT)?;
        let uses = self.store.pack_use(&rtx)?;
        // Packs nothing accounts for are reclaimable whole (the next compaction removes them).
        let dead = uses.values().map(|u| u.dead).sum::<u64>()
            + self
                .store
                .unaccounted_packs(&uses)?
                .iter()
                .map(|(_, len)| len)
                .sum::<u64>();
        let uncompressed_bytes = uses.values().map(|u| u.deferred).sum();
        let cache = self.store.cache_stats();
        let (mut pack_bytes, mut pack_count) = (0, 0);
        for (_, len) in self.store.pack_files()? {
            pack_bytes += len;
            pack_count += 1;
        }
        let size_of = |name: &str| {
            self.dir()
                .and_then(|d| std::fs::metadata(d.join(name)).ok())
                .map_or(0, |m| m.len())
        };
        let metadata_bytes = size_of(super::META_FILE);
        let metadata_backup_bytes = size_of(super::META_BACKUP);
        let reserve_bytes = size_of(super::RESERVE_FILE);
        // Regular files at the top of the folder (the packs are counted above).
        let top: u64 = self
            .dir()
            .and_then(|d| std::fs::read_dir(d).ok())
            .map(|it| {
                it.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let other_bytes =
            top.saturating_sub(metadata_bytes + metadata_backup_bytes + reserve_bytes);
        let (disk_total_bytes, disk_free_bytes) = self.disk_space();
        let metadata_tables = meta_tables(&rtx)?;
        let tier = self.store.tier();
        Ok(Stats {
            files,
            directories: dirs,
            logical_bytes: logical,
            referenced_bytes: referenced,
            unique_bytes: unique,
            stored_bytes: stored,
            chunk_count,
            chunk_size: self.chunk_size,
            dedup_ratio: ratio(referenced, unique),
            compression_ratio: ratio(unique, stored),
            total_ratio: ratio(referenced, stored),
            pack_bytes,
            reclaimable_bytes: dead,
            uncompressed_bytes,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_bytes: cache.chunks * self.chunk_size,
            cache_capacity_bytes: cache.capacity_chunks * self.chunk_size,
            pack_read_bytes: cache.pack_read_bytes,
            records_reused: self.store.reused().0,
            reused_bytes: self.store.reused().1,
            pack_fill: if pack_bytes == 0 {
                1.0
            } else {
                1.0 - (dead.min(pack_bytes) as f64 / pack_bytes as f64)
            },
            pack_count,
            metadata_bytes,
            metadata_backup_bytes,
            reserve_bytes,
            other_bytes,
            // With an object-store tier, only some packs are in the folder (and the cache).
            folder_bytes: match &tier {
                Some(t) => t.local_pack_bytes + t.cache_block_bytes + top,
                None => pack_bytes + top,
            },
            tier,
            dirty_bytes: self.dirty_bytes(),
            disk_total_bytes,
            disk_free_bytes,
            metadata_tables,
            stages: self.timings.snapshot(),
            snapshots: self.snapshot_list(None)?.len() as u64,
            replication: self.replication_state()?,
        })
    }
}

fn meta_tables(rtx: &redb::ReadTransaction) -> FsResult<Vec<MetaTable>> {
    use redb::{ReadableTableMetadata, TableDefinition, TableHandle};
    fn one<K: redb::Key + 'static, V: redb::Value + 'static>(
        rtx: &redb::ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> FsResult<MetaTable> {
        let t = rtx.open_table(def)?;
        let st = t.stats()?;
        Ok(MetaTable {
            table: def.name().to_string(),
            entries: t.len()?,
            stored_bytes: st.stored_bytes(),
            page_bytes: st.stored_bytes() + st.metadata_bytes() + st.fragmented_bytes(),
            fragmented_bytes: st.fragmented_bytes(),
        })
    }
    Ok(vec![
        one(rtx, INODES)?,
        one(rtx, DIRENTS)?,
        one(rtx, DIRCOOKIE)?,
        one(rtx, SYMLINKS)?,
        one(rtx, XATTRS)?,
        one(rtx, NODES)?,
        one(rtx, NODEREFS)?,
        one(rtx, CHUNKS)?,
        one(rtx, PACKS)?,
        one(rtx, COUNTERS)?,
        one(rtx, ORPHANS)?,
    ])
}
