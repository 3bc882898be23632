//! `scrub`: read every stored chunk, verify it against its id, and name the damaged files and
//! offsets. Safe while serving: it reads through its own snapshot and bypasses the chunk cache
//! so it checks what is on disk.

use std::collections::{HashMap, HashSet};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::inode::{Inode, InodeId, Kind};
use super::pace::Pacer;
use super::{tree, Engine, FsResult};
use crate::schema::{ChunkLoc, CHUNKS, INODES, NODES};
use crate::store::chunk::ChunkId;

/// Index entries verified per batch (about 80 MiB of bookkeeping).
const SCRUB_BATCH: usize = 1 << 20;

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
        let mut r = ScrubReport::default();
        let mut bad: HashSet<ChunkId> = HashSet::new();
        let mut pacer = Pacer::new(rate);
        {
            let rtx = self.read_txn()?;
            let chunks = rtx.open_table(CHUNKS)?;
            let total = redb::ReadableTableMetadata::len(&chunks)?;
            let mut batch = Vec::new();
            let mut iter = chunks.iter()?;
            loop {
                let next = iter.next();
                let done = next.is_none();
                if let Some(e) = next {
                    let (k, v) = e?;
                    let id = ChunkId(*k.value());
                    match ChunkLoc::decode(v.value()) {
                        Some(loc) => batch.push((id, loc)),
                        None => {
                            tracing::error!("scrub: chunk {}: bad index entry", id.short());
                            bad.insert(id);
                        }
                    }
                }
                if batch.len() >= SCRUB_BATCH || (done && !batch.is_empty()) {
                    let results = self
                        .store
                        .verify_many(std::mem::take(&mut batch), &mut |n| pacer.done(n));
                    for (id, res) in results {
                        match res {
                            Ok(n) => r.bytes_checked += n,
                            Err(e) => {
                                tracing::error!("scrub: chunk {}: {e}", id.short());
                                bad.insert(id);
                            }
                        }
                        r.chunks_checked += 1;
                    }
                    progress(r.chunks_checked, total);
                }
                if done {
                    break;
                }
            }
            progress(total, total);
        }
        if bad.is_empty() {
            return Ok(r);
        }
        r.damaged_chunks = bad.iter().map(|c| c.short()).collect();
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
                    if bad.contains(&id) {
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
