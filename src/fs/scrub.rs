//! `scrub`: read every stored chunk, verify it against its id, and name the damaged files and
//! offsets. Safe while serving: it reads the index a batch at a time, each from a fresh
//! snapshot (so compaction goes on meanwhile), and bypasses the chunk cache so it checks what
//! is on disk.

use std::collections::HashMap;
use std::ops::Bound::{Excluded, Unbounded};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::inode::{Inode, InodeId, Kind};
use super::pace::Pacer;
use super::{tree, Engine, FsResult};
use crate::schema::{CHUNKS, INODES, NODES};
use crate::store::chunk::ChunkId;
use crate::store::{ChunkKey, ChunkLoc, IndexEntry};

/// Index entries verified per batch, each batch read from its own snapshot (about 40 MiB of
/// bookkeeping: the batch and its copy for verification).
const SCRUB_BATCH: usize = 256 << 10;

/// A damaged place in a file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    pub path: String,
    /// Byte offset of the damaged chunk in the file.
    pub offset: u64,
}

/// What a scrub found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScrubReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged_chunks: Vec<String>,
    pub damaged: Vec<Damage>,
}

impl Engine {
    /// Verify every chunk. `progress(done, total)` counts chunks.
    pub fn scrub(&self, progress: &dyn Fn(u64, u64)) -> FsResult<ScrubReport> {
        self.scrub_paced(None, progress)
    }

    /// `scrub` reading at most `rate` bytes per second (while serving, so guest I/O keeps its
    /// speed). Chunks are verified pack by pack in offset order, in batches of `SCRUB_BATCH`
    /// index entries so memory stays bounded on large datastores.
    pub fn scrub_paced(
        &self,
        rate: Option<u64>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<ScrubReport> {
        self.scrub_batched(rate, SCRUB_BATCH, &mut || {}, progress)
    }

    /// The scrub, `batch` index entries at a time. Each batch is read from a fresh snapshot,
    /// held only while reading it: a snapshot held for the whole run (hours on a large
    /// datastore) would keep compaction from deleting packs and make the metadata file grow.
    /// So chunks may move or go between reading a batch and verifying it: a chunk that fails is
    /// looked up again, and is damage only if the index still puts it where it failed; one
    /// that moved is verified where it is now, one that is gone is skipped.
    /// `before_verify` runs between reading a batch and verifying it (tests).
    fn scrub_batched(
        &self,
        rate: Option<u64>,
        batch: usize,
        before_verify: &mut dyn FnMut(),
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<ScrubReport> {
        let mut r = ScrubReport::default();
        // Damaged chunks by key, with the name the report gives them.
        let mut bad: HashMap<ChunkKey, String> = HashMap::new();
        let mut pacer = Pacer::new(rate);
        let total = redb::ReadableTableMetadata::len(&self.read_txn()?.open_table(CHUNKS)?)?;
        // Last key read: the next batch starts after it.
        let mut after: Option<u64> = None;
        loop {
            let mut recs: Vec<(ChunkId, ChunkLoc)> = Vec::new();
            let mut keys: HashMap<ChunkId, ChunkKey> = HashMap::new();
            let mut done = true;
            {
                let rtx = self.read_txn()?;
                let chunks = rtx.open_table(CHUNKS)?;
                let iter = match &after {
                    None => chunks.iter()?,
                    Some(k) => chunks.range::<u64>((Excluded(*k), Unbounded))?,
                };
                for e in iter {
                    let (k, v) = e?;
                    let key = ChunkKey(k.value());
                    after = Some(key.0);
                    match IndexEntry::decode(v.value()) {
                        Some(e) => {
                            recs.push((e.id, e.loc));
                            keys.insert(e.id, key);
                        }
                        None => {
                            tracing::error!("scrub: chunk key {key}: bad index entry");
                            bad.insert(key, format!("key {key}"));
                        }
                    }
                    if recs.len() >= batch {
                        done = false;
                        break;
                    }
                }
            }
            before_verify();
            // In id order, to find where a failed chunk was.
            recs.sort_unstable_by_key(|(id, _)| id.0);
            let mut failed = Vec::new();
            for (id, res) in self.store.verify_many(recs.clone(), &mut |n| pacer.done(n)) {
                match res {
                    Ok(n) => {
                        r.bytes_checked += n;
                        r.chunks_checked += 1;
                    }
                    Err(e) => failed.push((id, e)),
                }
            }
            let damaged = bad.len();
            if !failed.is_empty() {
                self.recheck(&recs, &keys, failed, &mut r, &mut bad)?;
            }
            self.ops.scrub_chunks.inc_by(recs.len() as u64);
            self.ops
                .scrub_damaged
                .inc_by(bad.len().saturating_sub(damaged) as u64);
            progress(r.chunks_checked, total);
            if done {
                break;
            }
        }
        progress(total, total);
        if bad.is_empty() {
            return Ok(r);
        }
        r.damaged_chunks = bad.values().cloned().collect();
        r.damaged_chunks.sort();
        // Which files and offsets use the damaged chunks (only walked when there is damage).
        let mut spots: HashMap<InodeId, Vec<u64>> = HashMap::new();
        {
            let rtx = self.read_txn()?;
            let nodes = rtx.open_table(NODES)?;
            for e in rtx.open_table(INODES)?.iter()? {
                let (k, v) = e?;
                let Some(i) = Inode::decode(v.value()) else {
                    continue;
                };
                if i.kind != Kind::File || i.root.node.is_none() {
                    continue;
                }
                for (idx, id) in tree::collect(&nodes, i.root, 0, u64::MAX)? {
                    if bad.contains_key(&id) {
                        spots
                            .entry(InodeId(k.value()))
                            .or_default()
                            .push(idx * self.chunk_size);
                    }
                }
            }
        }
        for (ino, offsets) in spots {
            let path = self.path_of(ino);
            r.damaged.extend(offsets.into_iter().map(|offset| Damage {
                path: path.clone(),
                offset,
            }));
        }
        r.damaged
            .sort_by(|a, b| (&a.path, a.offset).cmp(&(&b.path, b.offset)));
        Ok(r)
    }
}

impl Engine {
    /// Look the chunks that failed verification up again in a fresh snapshot (see
    /// `scrub_batched`): damage if still where they failed, verified again if moved, skipped
    /// if gone. `recs` is the batch as read, in id order.
    fn recheck(
        &self,
        recs: &[(ChunkId, ChunkLoc)],
        keys: &HashMap<ChunkId, ChunkKey>,
        failed: Vec<(ChunkId, crate::store::StoreError)>,
        r: &mut ScrubReport,
        bad: &mut HashMap<ChunkKey, String>,
    ) -> FsResult<()> {
        // Holding the snapshot keeps the packs it points into (`Snapshot`).
        let rtx = self.read_txn()?;
        let chunks = rtx.open_table(CHUNKS)?;
        for (id, err) in failed {
            let Ok(at) = recs.binary_search_by(|(i, _)| i.0.cmp(&id.0)) else {
                continue;
            };
            let was = recs[at].1;
            let Some(&key) = keys.get(&id) else {
                continue;
            };
            let now = match chunks.get(key.0)? {
                // Released since the batch was read: nothing to check.
                None => continue,
                Some(v) => match IndexEntry::decode(v.value()) {
                    // Released, and its key taken by another chunk since.
                    Some(e) if e.id != id => continue,
                    e => e.map(|e| e.loc),
                },
            };
            let res = match now {
                Some(now) if now.pack == was.pack && now.offset == was.offset => Err(err),
                // Moved by compaction (or stored again): verify the record it has now.
                Some(now) => self.store.read_loc(&id, &now).map(|d| d.len() as u64),
                None => Err(err),
            };
            match res {
                Ok(n) => {
                    r.bytes_checked += n;
                    r.chunks_checked += 1;
                }
                Err(e) => {
                    tracing::error!("scrub: chunk {}: {e}", id.short());
                    bad.insert(key, id.short());
                    r.chunks_checked += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::dir::Ctx;
    use crate::fs::Format;
    use crate::store::pack::MemPackIo;

    const C: usize = 4096;

    fn unique_data(seed: u64, chunks: usize) -> Vec<u8> {
        crate::fs::testutil::unique_data(seed, chunks, C)
    }

    /// Protects: scrub reads each batch from a fresh snapshot and takes chunks that compaction
    /// moved or that were freed between reading a batch and verifying it in its stride: moved
    /// ones are verified where they are now, freed ones skipped, neither reported as damage.
    /// (Compaction deleting a pack while scrub runs is only possible because scrub holds no
    /// snapshot across batches.)
    #[test]
    fn chunks_moved_or_freed_during_a_scrub_are_not_damage() {
        let f = Format {
            chunk_size: C as u32,
            zstd_level: 1,
        };
        let e = Engine::in_memory(f, Arc::new(MemPackIo::default())).unwrap();
        let mk = |name: &[u8], d: &[u8]| {
            let i = e
                .mknod(InodeId::ROOT, name, Kind::File, 0o644, 0, Ctx::ROOT)
                .unwrap()
                .ino;
            e.write(i, 0, d).unwrap();
        };
        mk(b"gone", &unique_data(1, 40));
        mk(b"kept", &unique_data(2, 40));
        e.sync_all().unwrap();
        let mut first = true;
        let mut between = || {
            if std::mem::take(&mut first) {
                // After the first batch was read: free half the chunks and move the rest.
                e.unlink(InodeId::ROOT, b"gone").unwrap();
                e.sync_all().unwrap();
                let g = e.gc(0.99, &|_, _| {}).unwrap();
                assert!(g.packs_compacted > 0, "{g:?}");
            }
        };
        let r = e.scrub_batched(None, 16, &mut between, &|_, _| {}).unwrap();
        assert!(r.damaged_chunks.is_empty(), "{:?}", r.damaged_chunks);
        assert_eq!(r.chunks_checked, 40, "every chunk of `kept` checked once");
    }
}
