//! Pack compaction: live records of mostly-dead packs are copied to the active pack and the
//! old packs are deleted, giving their space back to the host filesystem.
//!
//! Order, for crash safety: copy the live records (appended and synced) -> one durable
//! transaction points the index at the copies -> delete the old pack. A crash before the
//! commit leaves unreferenced copies (garbage for the next run); after it, an old pack with
//! nothing live in it, which the next run deletes. A pack is deleted only once no reader can
//! still hold a location in it (`Store::retire_pack` waits for every older snapshot).

use std::collections::HashMap;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{Engine, FsResult};
use crate::schema::{ChunkLoc, CHUNKS, PACKS};
use crate::store::chunk::ChunkId;
use crate::store::pack::PackId;

/// What a compaction run did. Byte counts are bytes of pack files.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GcReport {
    pub packs_compacted: u64,
    pub chunks_moved: u64,
    pub bytes_moved: u64,
    /// Size of the deleted packs minus what was copied out of them.
    pub bytes_freed: u64,
    /// Packs left alone because a live record in them is damaged (run fsck/scrub).
    pub packs_skipped_damaged: u64,
}

impl Engine {
    /// Compact every pack (except the one being appended to) whose live share of records is
    /// below `min_live` (0.0..=1.0). `progress(done, total)` counts packs.
    pub fn gc(&self, min_live: f64, progress: &dyn Fn(u64, u64)) -> FsResult<GcReport> {
        let io = self.store.io().clone();
        let read_accounting = || -> FsResult<HashMap<u32, (u64, u64)>> {
            let rtx = self.read_txn()?;
            let t = rtx.open_table(PACKS)?;
            Ok(t.iter()?
                .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                .collect::<Result<_, _>>()?)
        };
        let mut accounting = read_accounting()?;
        let low = |acc: &HashMap<u32, (u64, u64)>, p: PackId| {
            let (live, dead) = acc.get(&p.0).copied().unwrap_or((0, 0));
            live == 0 || (live as f64) < min_live * (live + dead) as f64
        };
        // The pack being appended to is compacted too once it qualifies: close it first.
        if let Some(a) = self.store.active_pack() {
            if low(&accounting, a) && accounting.get(&a.0).is_some_and(|(_, dead)| *dead > 0) {
                self.store.seal_active()?;
                accounting = read_accounting()?;
            }
        }
        let active = self.store.active_pack();
        let candidates: Vec<PackId> = io
            .list()?
            .into_iter()
            .filter(|p| Some(*p) != active)
            .filter(|p| low(&accounting, *p))
            .collect();
        let mut report = GcReport::default();
        if candidates.is_empty() {
            progress(0, 0);
            return Ok(report);
        }
        // Live records of the candidates, from one scan of the index.
        let mut live: HashMap<PackId, Vec<(ChunkId, ChunkLoc)>> =
            candidates.iter().map(|p| (*p, Vec::new())).collect();
        {
            let rtx = self.read_txn()?;
            for r in rtx.open_table(CHUNKS)?.iter()? {
                let (k, v) = r?;
                if let Some(loc) = ChunkLoc::decode(v.value()) {
                    if let Some(list) = live.get_mut(&loc.pack) {
                        list.push((ChunkId(*k.value()), loc));
                    }
                }
            }
        }
        let total = candidates.len() as u64;
        for (n, pack) in candidates.into_iter().enumerate() {
            progress(n as u64, total);
            let size = io.len(pack).unwrap_or(0);
            let records = live.remove(&pack).unwrap_or_default();
            let mut copies = Vec::with_capacity(records.len());
            let mut damaged = false;
            for (id, loc) in &records {
                match self.store.read_record(id, loc) {
                    Ok(e) => copies.push(e),
                    Err(e) => {
                        tracing::error!("gc: pack {:08x} kept: {e}", pack.0);
                        damaged = true;
                        break;
                    }
                }
            }
            if damaged {
                report.packs_skipped_damaged += 1;
                continue;
            }
            let new_locs = if copies.is_empty() {
                Vec::new()
            } else {
                self.store.append_many(&copies)?
            };
            drop(copies);
            // Durable: the copies are synced before the index points at them.
            self.txn(true, |w| {
                for ((id, old), new) in records.iter().zip(&new_locs) {
                    match w.chunks.get(id)? {
                        Some(cur) if cur.pack == pack && cur.offset == old.offset => {
                            w.chunks.relocate(id, new)?
                        }
                        // Released or stored again meanwhile: this copy is garbage.
                        _ => w.chunks.add_dead(new)?,
                    }
                }
                w.chunks.forget_pack(pack)?;
                Ok(())
            })?;
            self.store.retire_pack(pack)?;
            let moved: u64 = new_locs
                .iter()
                .map(|l| crate::store::pack::RECORD_HEADER_LEN as u64 + u64::from(l.stored_len))
                .sum();
            report.packs_compacted += 1;
            report.chunks_moved += new_locs.len() as u64;
            report.bytes_moved += moved;
            report.bytes_freed += size.saturating_sub(moved);
        }
        progress(total, total);
        Ok(report)
    }
}
