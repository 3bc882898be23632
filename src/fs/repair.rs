//! `fsck --repair`: rebuild what the packs and the chunk maps still determine.
//!
//! - The chunk index is rebuilt from the references (which chunks the files' maps use) and
//!   the packs (where an intact record of each chunk is): every pack is scanned record by
//!   record (header, crc32, decompression, blake3 against the id), resynchronising on the
//!   record magic after damage. An entry whose record is gone or damaged is pointed at another
//!   intact copy when one exists (compaction and crashes leave copies).
//! - Reference counts of chunks and chunk-map nodes are recomputed from the trees; nodes no
//!   file reaches are deleted; per-pack live/dead accounting and the store counters are
//!   recomputed.
//! - What cannot be rebuilt is named: files whose chunks have no intact record anywhere (or
//!   whose chunk-map nodes are gone) keep failing with EIO on the damaged ranges, never
//!   returning wrong bytes, and are listed by path so they can be restored.

use std::collections::{HashMap, HashSet};

use redb::ReadableTable;
use serde::Serialize;

use super::inode::{InodeId, Kind};
use super::tree::{self, Node};
use super::{Engine, FsResult};
use crate::schema::*;
use crate::store::chunk::ChunkId;
use crate::store::pack::PackId;
use crate::store::{ChunkKey, ChunkLoc, IndexEntry};

/// What a repair did. Byte counts are bytes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    pub packs_scanned: u64,
    pub records_intact: u64,
    /// Stretches of pack bytes that did not parse as intact records (skipped).
    pub damaged_stretches: u64,
    /// Index entries created or pointed at another intact copy.
    pub index_entries_rebuilt: u64,
    /// Index entries nothing references any more (removed).
    pub index_entries_dropped: u64,
    /// Chunk and node reference counts that were wrong (corrected).
    pub counts_fixed: u64,
    /// Chunk-map nodes no file reaches (deleted).
    pub nodes_dropped: u64,
    /// Chunks referenced by files but intact nowhere.
    pub chunks_lost: u64,
    /// Files that keep damaged ranges (restore them from a copy).
    pub damaged_files: Vec<String>,
}

impl Engine {
    /// Rebuild the chunk index and every count from the packs and the chunk maps. The caller
    /// holds the datastore lock (nothing else writes). `progress(done, total)` counts packs.
    pub fn repair(&self, progress: &dyn Fn(u64, u64)) -> FsResult<RepairReport> {
        self.sync_all()?;
        let mut r = RepairReport::default();

        // 1. References, from the files' chunk maps.
        let mut node_refs: HashMap<u64, u64> = HashMap::new();
        let mut chunk_refs: HashMap<ChunkKey, u64> = HashMap::new();
        let mut broken_files: HashSet<InodeId> = HashSet::new();
        let files: Vec<(InodeId, super::tree::Root)> = {
            let rtx = self.read_txn()?;
            let nodes = rtx.open_table(NODES)?;
            let mut files = Vec::new();
            for e in rtx.open_table(INODES)?.iter()? {
                let (k, v) = e?;
                let Some(i) = super::inode::Inode::decode(v.value()) else {
                    // Its chunk map would look unreferenced and be deleted: refuse instead.
                    return Err(super::FsError::BadMeta(format!(
                        "inode {} does not decode; repairing would drop the data it may own: \
                         restore meta.redb.bak (see README, Damage and full disks)",
                        k.value()
                    )));
                };
                if i.kind == Kind::File && !i.root.node.is_none() {
                    files.push((InodeId(k.value()), i.root));
                }
            }
            let mut visited = HashSet::new();
            for (ino, root) in &files {
                let mut stack = vec![(root.node.0, root.height)];
                while let Some((id, h)) = stack.pop() {
                    *node_refs.entry(id).or_insert(0) += 1;
                    if !visited.insert(id) {
                        continue;
                    }
                    match tree::load(&nodes, tree::NodeId(id)) {
                        Ok(Node::Leaf(s)) => {
                            for c in s.iter().flatten() {
                                *chunk_refs.entry(*c).or_insert(0) += 1;
                            }
                        }
                        Ok(Node::Interior(_, s)) => {
                            for (child, _) in s.iter().filter(|c| !c.0.is_none()) {
                                stack.push((child.0, h.saturating_sub(1)));
                            }
                        }
                        Err(_) => {
                            broken_files.insert(*ino);
                        }
                    }
                }
            }
            files
        };

        // 2. Intact records, from the packs.
        let packs: Vec<PackId> = self.store.pack_files()?.into_iter().map(|p| p.0).collect();
        let mut found: HashMap<ChunkId, ChunkLoc> = HashMap::new();
        for (n, pack) in packs.iter().enumerate() {
            progress(n as u64, packs.len() as u64);
            let scan = self.store.scan_pack(*pack, &mut found)?;
            r.records_intact += scan.records_intact;
            r.damaged_stretches += scan.damaged_stretches;
            r.packs_scanned += 1;
        }
        progress(packs.len() as u64, packs.len() as u64);

        // 3. One transaction rewrites the index, the counts and the accounting.
        let mut lost: HashSet<ChunkKey> = HashSet::new();
        self.txn(true, |w| {
            // chunk-map nodes
            let stored_nodes: Vec<u64> = w
                .nodes
                .iter()?
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for id in stored_nodes {
                match node_refs.get(&id) {
                    None => {
                        w.nodes.remove(id)?;
                        w.refs.remove(id)?;
                        r.nodes_dropped += 1;
                    }
                    Some(&n) => {
                        if w.refs.get(id)?.map(|v| v.value()) != Some(n) {
                            w.refs.insert(id, n)?;
                            r.counts_fixed += 1;
                        }
                    }
                }
            }
            // the chunk index
            let old: HashMap<ChunkKey, IndexEntry> = w.chunks.entries()?.into_iter().collect();
            let alias_ids: HashMap<ChunkKey, ChunkId> = w
                .chunks
                .aliases()?
                .into_iter()
                .map(|(id, k)| (k, id))
                .collect();
            r.index_entries_dropped +=
                old.keys().filter(|k| !chunk_refs.contains_key(k)).count() as u64;
            // Which id a key names when its entry is gone: a preferred key is its id's
            // prefix, so an intact record with that prefix is it (unless two share it).
            let mut by_prefix: HashMap<ChunkKey, Option<ChunkId>> = HashMap::new();
            for id in found.keys() {
                by_prefix
                    .entry(ChunkKey::preferred(id))
                    .and_modify(|e| *e = None)
                    .or_insert(Some(*id));
            }
            let mut index = Vec::with_capacity(chunk_refs.len());
            for (&key, &refs) in &chunk_refs {
                let prev = old.get(&key).filter(|e| key.may_be(&e.id));
                let id = match prev {
                    Some(e) => Some(e.id),
                    None if key.is_alias() => alias_ids.get(&key).copied(),
                    None => by_prefix.get(&key).copied().flatten(),
                };
                let intact_prev = prev.map(|e| e.loc).filter(|p| {
                    id.and_then(|id| found.get(&id))
                        .is_some_and(|f| f.pack == p.pack && f.offset == p.offset)
                });
                let loc = match (intact_prev, id.and_then(|id| found.get(&id))) {
                    (Some(p), _) => {
                        if p.refs != refs {
                            r.counts_fixed += 1;
                        }
                        ChunkLoc { refs, ..p }
                    }
                    (None, Some(f)) => {
                        r.index_entries_rebuilt += 1;
                        ChunkLoc { refs, ..*f }
                    }
                    (None, None) => {
                        // Kept with its count, at no location: reads fail as damage, and
                        // the counts of every file still using it stay right.
                        lost.insert(key);
                        ChunkLoc::lost(refs)
                    }
                };
                // A key whose id is unknown keeps an all-zero id: reads of it fail as damage.
                let id = id.unwrap_or(ChunkId([0; 32]));
                index.push((key, IndexEntry { id, loc }));
            }
            let scanned: HashSet<PackId> = packs.iter().copied().collect();
            let lens: Vec<(PackId, u64)> = self
                .store
                .pack_files()?
                .into_iter()
                .filter(|(p, _)| scanned.contains(p))
                .collect();
            w.chunks.replace_all(&index, &lens)?;
            Ok(())
        })?;
        // The cache may hold chunks by id only; it never holds wrong bytes (verified on
        // load), so it stays.
        r.chunks_lost = lost.len() as u64;

        // 4. Name what could not be rebuilt.
        if !lost.is_empty() {
            let rtx = self.read_txn()?;
            let nodes = rtx.open_table(NODES)?;
            for (ino, root) in &files {
                if broken_files.contains(ino) {
                    continue;
                }
                if tree::collect(&nodes, *root, 0, u64::MAX)?
                    .iter()
                    .any(|(_, c)| lost.contains(c))
                {
                    broken_files.insert(*ino);
                }
            }
        }
        r.damaged_files = broken_files.iter().map(|i| self.path_of(*i)).collect();
        r.damaged_files.sort();
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::dir::Ctx;
    use crate::fs::Format;
    use crate::store::pack::{MemPackIo, PackIo, PACK_HEADER_LEN};

    const C: usize = 4096;

    fn engine() -> (Engine, Arc<MemPackIo>) {
        let io = Arc::new(MemPackIo::default());
        let e = Engine::in_memory(
            Format {
                chunk_size: C as u32,
                zstd_level: 1,
            },
            io.clone(),
        )
        .unwrap();
        (e, io)
    }

    fn data(seed: u64, chunks: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..chunks * C)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 64) % 2 == 0 {
                    7
                } else {
                    x as u8
                } // compressible, unique
            })
            .collect()
    }

    fn put(e: &Engine, name: &str, d: &[u8]) -> InodeId {
        let i = e
            .mknod(
                InodeId::ROOT,
                name.as_bytes(),
                Kind::File,
                0o644,
                0,
                Ctx::ROOT,
            )
            .unwrap()
            .ino;
        e.write(i, 0, d).unwrap();
        e.fsync(i).unwrap();
        i
    }

    fn problems(e: &Engine) -> Vec<String> {
        e.fsck(&|_, _| {}).unwrap().problems
    }

    /// Protects: a lost chunk index (every entry gone) and wrong reference counts are rebuilt
    /// from the packs and the chunk maps; all data reads back; fsck is clean afterwards.
    #[test]
    fn rebuilds_the_index_from_packs() {
        let (e, _) = engine();
        let a = data(1, 20);
        let ia = put(&e, "a.raw", &a);
        e.clone_paths(b"/a.raw", &[b"/b.raw".to_vec()]).unwrap();
        let ib = e.resolve(b"/b.raw").unwrap();
        e.write(ib, 0, &data(2, 3)).unwrap();
        e.sync_all().unwrap();
        // wipe the index and skew a node count
        e.txn(true, |w| {
            w.chunks.replace_all(&[], &[])?;
            w.refs.insert(1, 99)?;
            Ok(())
        })
        .unwrap();
        assert!(!problems(&e).is_empty());
        let r = e.repair(&|_, _| {}).unwrap();
        assert!(r.index_entries_rebuilt >= 20, "{r:?}");
        assert!(r.damaged_files.is_empty() && r.chunks_lost == 0, "{r:?}");
        assert_eq!(problems(&e), Vec::<String>::new());
        assert_eq!(e.read(ia, 0, (20 * C) as u32).unwrap(), a);
        let mut b = a.clone();
        b[..3 * C].copy_from_slice(&data(2, 3));
        assert_eq!(e.read(ib, 0, (20 * C) as u32).unwrap(), b);
    }

    /// Protects: with a pack removed, repair names exactly the files whose data was only
    /// there, those keep failing (EIO, never wrong bytes), everything else reads back, and
    /// the datastore is otherwise consistent.
    #[test]
    fn names_files_lost_with_a_pack() {
        let (e, io) = engine();
        let lost = data(3, 10);
        let il = put(&e, "lost.raw", &lost);
        e.store.seal_active().unwrap();
        let kept = data(4, 10);
        let ik = put(&e, "kept.raw", &kept);
        e.store.seal_active().unwrap();
        let first = *io.list_packs().first().unwrap();
        io.remove(first).unwrap();
        let r = e.repair(&|_, _| {}).unwrap();
        assert_eq!(r.damaged_files, vec!["/lost.raw".to_string()], "{r:?}");
        assert_eq!(r.chunks_lost, 10);
        assert_eq!(e.read(ik, 0, (10 * C) as u32).unwrap(), kept);
        assert!(matches!(
            e.read(il, 0, C as u32),
            Err(crate::fs::FsError::Corrupt { .. })
        ));
        // what remains wrong is only the lost file's chunks, which are stored nowhere
        let p = problems(&e);
        assert!(
            !p.is_empty() && p.iter().all(|s| s.contains("ffffffff")),
            "{p:?}"
        );
        // a clone of the damaged file keeps consistent counts and can be written to
        e.clone_paths(b"/lost.raw", &[b"/lost2.raw".to_vec()])
            .unwrap();
        let l2 = e.resolve(b"/lost2.raw").unwrap();
        e.write(l2, 0, &data(9, 1)).unwrap();
        e.sync_all().unwrap();
        // storing the same content again heals every file that uses it
        put(&e, "again.raw", &lost);
        assert_eq!(e.read(il, 0, (10 * C) as u32).unwrap(), lost);
        assert_eq!(problems(&e), Vec::<String>::new());
        // and deleting everything leaves a clean, empty datastore
        for f in ["lost.raw", "lost2.raw", "again.raw", "kept.raw"] {
            e.unlink(InodeId::ROOT, f.as_bytes()).unwrap();
        }
        assert_eq!(problems(&e), Vec::<String>::new());
        assert_eq!(e.stats().unwrap().chunk_count, 0);
    }

    /// Protects: a damaged stretch inside a pack is skipped and the scan resynchronises on
    /// the next record, so records after the damage are still found.
    #[test]
    fn scan_resyncs_after_damage() {
        let (e, io) = engine();
        put(&e, "a.raw", &data(5, 8));
        e.store.seal_active().unwrap();
        let p = *io.list_packs().first().unwrap();
        // break the second record's header magic
        let second = e
            .read_txn()
            .unwrap()
            .open_table(CHUNKS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|x| IndexEntry::decode(x.unwrap().1.value()).unwrap().loc.offset)
            .filter(|&o| o > PACK_HEADER_LEN)
            .min()
            .unwrap();
        io.corrupt(p, second as usize, 0x55);
        let mut found = HashMap::new();
        let r = e.store.scan_pack(p, &mut found).unwrap();
        assert_eq!(r.damaged_stretches, 1);
        assert_eq!(r.records_intact, 7);
        assert_eq!(found.len(), 7);
    }
}
