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

use super::pace::Pacer;
use super::{Engine, FsResult};
use crate::schema::{ChunkLoc, CHUNKS, PACKS};
use crate::store::chunk::ChunkId;
use crate::store::pack::PackId;

/// Live records copied per group (4096 x 16 KiB chunks: at most 64 MiB in memory).
const GC_GROUP: usize = 4096;

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
        self.gc_paced(min_live, None, progress)
    }

    /// `gc` copying at most `rate` bytes per second (background compaction while serving).
    /// Live records are copied in groups of `GC_GROUP` so memory stays bounded and pauses
    /// are spread out; no lock is held while pausing.
    pub fn gc_paced(
        &self,
        min_live: f64,
        rate: Option<u64>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<GcReport> {
        // One compaction at a time (background and on demand): a second run could otherwise
        // take the pack the first one is copying into for a candidate and delete it.
        let _one = self.gc_lock.lock();
        let r = self.gc_inner(min_live, rate, progress);
        // Whatever happened, take the space reserve back if the copies let go of it.
        self.ensure_reserve();
        r
    }

    fn gc_inner(
        &self,
        min_live: f64,
        rate: Option<u64>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<GcReport> {
        let mut pacer = Pacer::new(rate);
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
        // List first, then read the active pack: a pack created meanwhile is either not
        // listed or at/after the active one. Pack ids only grow, so everything at or after the
        // active pack (which may hold records not committed yet) is left alone.
        let listed = io.list()?;
        let active = self.store.active_pack();
        let candidates: Vec<PackId> = listed
            .into_iter()
            .filter(|p| active.is_none_or(|a| p.0 < a.0))
            .filter(|p| low(&accounting, *p))
            .collect();
        let mut report = GcReport::default();
        if candidates.is_empty() {
            progress(0, 0);
            return Ok(report);
        }
        // Copies need free space; on a full disk, the reserve provides it.
        let to_copy: u64 = candidates
            .iter()
            .map(|p| accounting.get(&p.0).map_or(0, |a| a.0))
            .sum();
        // Records appended to the candidates before they were sealed are committed (or
        // garbage) once the writers that appended them are done: wait for them first.
        self.store.drain_appends();
        // Copies need free space; on a full disk, the reserve provides it (released only now,
        // right before copying, so writers have little time to take it).
        if self.disk_space().1 < to_copy + (16 << 20) && self.release_reserve() {
            tracing::info!("gc: disk nearly full, compacting into the space reserve");
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
            let mut new_locs = Vec::with_capacity(records.len());
            let mut damaged = false;
            'copy: for group in records.chunks(GC_GROUP) {
                let mut copies = Vec::with_capacity(group.len());
                for (id, loc) in group {
                    match self.store.read_record(id, loc) {
                        Ok(e) => copies.push(e),
                        Err(e) => {
                            tracing::error!("gc: pack {:08x} kept: {e}", pack.0);
                            damaged = true;
                            break 'copy;
                        }
                    }
                }
                let bytes: u64 = copies.iter().map(|c| c.payload.len() as u64).sum();
                new_locs.extend(self.store.append_many(&copies)?);
                pacer.done(bytes);
            }
            if damaged {
                // The copies made so far are referenced by nothing: count them as dead space,
                // so a later run reclaims them.
                self.txn(false, |w| {
                    for l in &new_locs {
                        w.chunks.add_dead(l)?;
                    }
                    Ok(())
                })?;
                report.packs_skipped_damaged += 1;
                continue;
            }
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

/// Background compaction starts when this much pack space is dead (bytes).
pub const RECLAIM_MIN_DEAD: u64 = 32 << 20;

impl Engine {
    /// Dead bytes in packs: records no file references any more.
    pub fn dead_bytes(&self) -> FsResult<u64> {
        let rtx = self.read_txn()?;
        let t = rtx.open_table(PACKS)?;
        let mut dead = 0;
        for r in t.iter()? {
            dead += r?.1.value().1;
        }
        Ok(dead)
    }

    /// Background reclamation while serving: every `interval`, if at least `RECLAIM_MIN_DEAD`
    /// bytes are dead, compact packs under half live, copying at most `rate` bytes per second
    /// so guest I/O keeps its speed. Deleted data's space is thus back on the host within
    /// about `interval` plus the copy time. The thread holds no strong reference while it
    /// waits and ends once the engine is dropped.
    pub fn spawn_reclaimer(
        self: &std::sync::Arc<Self>,
        interval: std::time::Duration,
        rate: Option<u64>,
    ) -> std::thread::JoinHandle<()> {
        let weak = std::sync::Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tessera-gc".into())
            .spawn(move || loop {
                let start = std::time::Instant::now();
                while start.elapsed() < interval {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    if weak.strong_count() == 0 {
                        return;
                    }
                }
                let Some(e) = weak.upgrade() else { return };
                let dead = match e.dead_bytes() {
                    Ok(d) => d,
                    Err(err) => {
                        tracing::warn!("background gc: cannot read pack accounting: {err}");
                        continue;
                    }
                };
                if dead < RECLAIM_MIN_DEAD {
                    continue;
                }
                match e.gc_paced(0.5, rate, &|_, _| {}) {
                    Ok(r) if r.packs_compacted > 0 => tracing::info!(
                        "background gc: {} packs compacted, {} MiB moved, {} MiB freed",
                        r.packs_compacted,
                        r.bytes_moved >> 20,
                        r.bytes_freed >> 20
                    ),
                    Ok(_) => {}
                    Err(err) => tracing::warn!("background gc failed (will retry): {err}"),
                }
            })
            .expect("spawn gc thread")
    }
}
