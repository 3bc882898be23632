//! Pack compaction: live records of mostly-dead packs are copied to the active pack and the
//! old packs are deleted, giving their space back to the host filesystem.
//!
//! Order, for crash safety: copy the live records (appended and synced) -> one durable
//! transaction points the index at the copies -> delete the old pack. A crash before the
//! commit leaves unreferenced copies (garbage for the next run); after it, an old pack with
//! nothing live in it, which the next run deletes. A pack is deleted only once no reader can
//! still hold a location in it (`Store::retire_pack` waits for every older snapshot).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::pace::Pacer;
use super::{Engine, FsResult};
use crate::store::chunk::ChunkId;
use crate::store::pack::PackId;
use crate::store::{ChunkKey, ChunkLoc, IndexEntry, PackUse};

/// Live bytes (per the pack accounting) of the candidate packs compacted per scan of the
/// index. A scan keeps the live index entries of its group in memory, about 72 bytes each:
/// 4 GiB of 16 KiB chunks compressed 2:1 is 512 K entries, 36 MiB, whatever the size of the
/// datastore. A group has at least one pack (at most 256 MiB of records). Each group costs one
/// scan of the whole index, hence groups this large.
const GC_SCAN_LIVE_BYTES: u64 = 4 << 30;

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
    /// The threshold used: packs with a smaller live share were compacted.
    #[serde(default)]
    pub min_live: f64,
    /// Packs left with dead records (their live share was at or above `min_live`, or they
    /// are being appended to), and their dead bytes.
    #[serde(default)]
    pub packs_left_with_dead: u64,
    #[serde(default)]
    pub bytes_left_dead: u64,
    /// Records stored uncompressed on the write path that the copy compressed.
    #[serde(default)]
    pub chunks_compressed: u64,
    /// Most index entries held in memory at once (tests check the grouping).
    #[serde(skip)]
    pub peak_entries_held: u64,
}

impl Engine {
    /// Compact every pack (except the one being appended to) whose live share of records is
    /// below `min_live` (0.0..=1.0). `progress(done, total)` counts packs.
    pub fn gc(&self, min_live: f64, progress: &dyn Fn(u64, u64)) -> FsResult<GcReport> {
        self.gc_paced(min_live, None, progress)
    }

    /// `gc` copying at most `rate` bytes per second (`tessera gc --max-rate`). Live records are
    /// copied in groups (`GC_SCAN_LIVE_BYTES` per scan of the index) so memory stays bounded
    /// and pauses are spread out; no lock is held while pausing. Records stored uncompressed
    /// are compressed whatever their age (but for the pack being appended to: `ACTIVE_QUIET`).
    pub fn gc_paced(
        &self,
        min_live: f64,
        rate: Option<u64>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<GcReport> {
        self.gc_run(min_live, rate, Duration::ZERO, progress)
    }

    /// A background run (`spawn_reclaimer`): like `gc_paced`, but records stored uncompressed
    /// are compressed only in packs gone cold (`Tuning::recompress_min_age`).
    pub(crate) fn gc_background(&self, min_live: f64, rate: Option<u64>) -> FsResult<GcReport> {
        self.gc_run(min_live, rate, self.tuning().recompress_min_age, &|_, _| {})
    }

    fn gc_run(
        &self,
        min_live: f64,
        rate: Option<u64>,
        min_age: Duration,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<GcReport> {
        // One compaction at a time (background and on demand): a second run could otherwise
        // take the pack the first one is copying into for a candidate and delete it.
        let _one = self.gc_lock.lock();
        let r = self.gc_inner(min_live, rate, min_age, GC_SCAN_LIVE_BYTES, progress);
        // Whatever happened, take the space reserve back if the copies let go of it.
        self.ensure_reserve();
        let mut r = r?;
        r.min_live = min_live;
        // What is left dead, and where: the report says why it stayed.
        for u in self.store.pack_use(&*self.read_txn()?)?.values() {
            if u.dead > 0 {
                r.packs_left_with_dead += 1;
                r.bytes_left_dead += u.dead;
            }
        }
        Ok(r)
    }

    /// The live-share threshold background reclamation compacts below now, or `None` when
    /// there is nothing worth doing. Packs mostly dead (under half live) are always worth
    /// it: copying their live half frees more than it writes. Once dead records are more
    /// than `RECLAIM_MAX_DEAD_SHARE` of the pack bytes, the deadest packs are added until
    /// what stays dead is at most `RECLAIM_TARGET_DEAD_SHARE`: each pack compacted frees
    /// the most per byte copied, and the gap between the two shares keeps it from chasing
    /// every small delete.
    ///
    /// Packs whose records were largely stored uncompressed (see `RECOMPRESS_MIN_SHARE`) are
    /// compacted whatever the threshold; once `RECOMPRESS_MIN_BYTES` of such records wait in
    /// packs no longer appended to, a run is due even with nothing dead (threshold 0).
    pub fn reclaim_threshold(&self) -> FsResult<Option<f64>> {
        let uses = self.store.pack_use(&*self.read_txn()?)?;
        // Packs nothing accounts for (a removal a crash interrupted) go whatever the rest:
        // threshold 0 takes only packs with nothing live.
        if !self.store.unaccounted_packs(&uses)?.is_empty() {
            return Ok(Some(0.0));
        }
        let packs: Vec<(u64, u64)> = uses.values().map(|u| (u.live, u.dead)).collect();
        self.raw_backlog
            .store(uses.values().map(|u| u.deferred).sum(), Ordering::Relaxed);
        let active = self.store.active_pack();
        let waiting: u64 = uses
            .iter()
            .filter(|(p, _)| {
                active.is_none_or(|a| **p <= a) && self.cold(**p, self.tuning().recompress_min_age)
            })
            .map(|(_, u)| u.deferred)
            .sum();
        Ok(pick_min_live(&packs).or_else(|| (waiting >= RECOMPRESS_MIN_BYTES).then_some(0.0)))
    }

    /// Has `pack` gone without appends for `min_age` (or since the datastore was opened)?
    /// Only such packs have their uncompressed records compressed by background compaction
    /// (`Tuning::recompress_min_age`); `tessera gc` compresses whatever waits (`min_age` 0).
    fn cold(&self, pack: PackId, min_age: Duration) -> bool {
        self.store.idle_for(pack).is_none_or(|d| d >= min_age)
    }

    /// Read the bytes of uncompressed records waiting for compaction from the pack accounting.
    pub(crate) fn refresh_raw_backlog(&self) -> FsResult<()> {
        let uses = self.store.pack_use(&*self.read_txn()?)?;
        self.raw_backlog
            .store(uses.values().map(|u| u.deferred).sum(), Ordering::Relaxed);
        Ok(())
    }

    /// Should a flush store new chunks uncompressed (`Tuning::raw_backlog`)? Only while the
    /// backlog is under the limit and an eighth of the disk's free space, and never on an
    /// S3-backed datastore, whose sealed packs are uploaded (compressing them later would
    /// upload them again).
    pub(crate) fn ingest_raw(&self) -> bool {
        let limit = self.tuning().raw_backlog;
        if limit == 0 || self.store.io().as_tier().is_some() {
            return false;
        }
        let backlog = self.raw_backlog.load(Ordering::Relaxed);
        backlog < limit && backlog < self.disk_space().1 / 8
    }

    /// Count `bytes` more of uncompressed records stored by a flush.
    pub(crate) fn add_raw_backlog(&self, bytes: u64) {
        self.raw_backlog.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The compaction run; candidates are worked through in groups of about
    /// `group_live_bytes` live bytes each.
    fn gc_inner(
        &self,
        min_live: f64,
        rate: Option<u64>,
        min_age: Duration,
        group_live_bytes: u64,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<GcReport> {
        let mut pacer = Pacer::new(rate);
        let mut accounting = self.store.pack_use(&*self.read_txn()?)?;
        let low = |acc: &BTreeMap<PackId, PackUse>, p: PackId| {
            let u = acc.get(&p).copied().unwrap_or_default();
            u.live == 0 || u.live_share() < min_live
        };
        let to_compress = |acc: &BTreeMap<PackId, PackUse>, p: PackId| {
            let u = acc.get(&p).copied().unwrap_or_default();
            u.deferred > 0
                && u.deferred as f64 >= RECOMPRESS_MIN_SHARE * (u.live + u.dead) as f64
                && self.cold(p, min_age)
        };
        // The pack being appended to is compacted too once it qualifies: close it first. (A
        // copy stored uncompressed ends in it, up to a pack's worth: once the pack goes cold,
        // or on `tessera gc` once nothing was appended for `ACTIVE_QUIET`, it is compressed
        // like the rest; a pack still being written is left alone, or a `tessera gc` during a
        // desktop's writes would seal a small pack each time.)
        if let Some(a) = self.store.active_pack() {
            if (low(&accounting, a) && accounting.get(&a).is_some_and(|u| u.dead > 0))
                || (to_compress(&accounting, a) && self.cold(a, min_age.max(ACTIVE_QUIET)))
            {
                self.store.seal_active()?;
                accounting = self.store.pack_use(&*self.read_txn()?)?;
            }
        }
        // List first, then read the active pack: a pack created meanwhile is either not
        // listed or at/after the active one. Pack ids only grow, so everything at or after the
        // active pack (which may hold records not committed yet) is left alone.
        let listed = self.store.pack_files()?;
        let active = self.store.active_pack();
        let candidates: Vec<(PackId, u64)> = listed
            .into_iter()
            .filter(|(p, _)| active.is_none_or(|a| *p < a))
            .filter(|(p, _)| low(&accounting, *p) || to_compress(&accounting, *p))
            .collect();
        let mut report = GcReport::default();
        if candidates.is_empty() {
            progress(0, 0);
            return Ok(report);
        }
        // Copies need free space; on a full disk, the reserve provides it.
        let live_of = |p: &PackId| accounting.get(p).map_or(0, |u| u.live);
        let to_copy: u64 = candidates.iter().map(|(p, _)| live_of(p)).sum();
        // Records appended to the candidates before they were sealed, or written over their
        // dead records (`store::reuse`; from now on none is), are committed (or garbage) once
        // the writers that wrote them are done: wait for them first.
        let ids: Vec<PackId> = candidates.iter().map(|c| c.0).collect();
        let _compacting = self.store.compacting(&ids);
        self.store.drain_appends();
        // Copies need free space; on a full disk, the reserve provides it (released only now,
        // right before copying, so writers have little time to take it).
        if self.disk_space().1 < to_copy + (16 << 20) && self.release_reserve() {
            tracing::info!("gc: disk nearly full, compacting into the space reserve");
        }
        let total = candidates.len() as u64;
        let mut done = 0u64;
        let mut rest = &candidates[..];
        while !rest.is_empty() {
            // The next group: packs in order while their live bytes fit the limit (at least
            // one pack). Only this group's index entries are held, from one scan of the index.
            let (mut n, mut bytes) = (0, 0);
            while n < rest.len() && (n == 0 || bytes + live_of(&rest[n].0) <= group_live_bytes) {
                bytes += live_of(&rest[n].0);
                n += 1;
            }
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let ids: Vec<PackId> = group.iter().map(|g| g.0).collect();
            let mut live = self.store.live_records(&*self.read_txn()?, &ids)?;
            let held = live.values().map(Vec::len).sum::<usize>() as u64;
            report.peak_entries_held = report.peak_entries_held.max(held);
            for &(pack, size) in group {
                progress(done, total);
                done += 1;
                let compress = accounting.get(&pack).is_some_and(|u| u.deferred > 0);
                let records = live.remove(&pack).unwrap_or_default();
                self.compact_pack(pack, size, records, compress, &mut pacer, &mut report)?;
            }
        }
        progress(total, total);
        self.refresh_raw_backlog()?;
        Ok(report)
    }

    /// Copy the live `records` of `pack` (`size` bytes) out, point the index at the copies
    /// (durably), and delete the pack. With `compress`, records stored raw are compressed on
    /// the way.
    fn compact_pack(
        &self,
        pack: PackId,
        size: u64,
        records: Vec<(ChunkKey, IndexEntry)>,
        compress: bool,
        pacer: &mut Pacer,
        report: &mut GcReport,
    ) -> FsResult<()> {
        let copied = match self
            .store
            .copy_records(&records, compress, &mut |b| pacer.done(b))
        {
            Ok(c) => c,
            Err((e, made)) => {
                tracing::error!("gc: pack {:08x} kept: {e}", pack.0);
                // The copies made so far are referenced by nothing: count them as dead
                // space, so a later run reclaims them.
                self.txn(false, |w| {
                    for l in &made {
                        w.chunks.add_dead(l)?;
                    }
                    Ok(())
                })?;
                report.packs_skipped_damaged += 1;
                return Ok(());
            }
        };
        // Durable: the copies are synced before the index points at them.
        let switched = self.txn(true, |w| {
            Ok(w.chunks.switch_to_copies(pack, &records, &copied.locs)?)
        });
        if let Err(e) = switched {
            // Nothing points at the copies: count them as dead space.
            let copies: HashMap<ChunkId, ChunkLoc> =
                records.iter().map(|r| r.1.id).zip(copied.locs).collect();
            self.settle_failed_appends(&copies, &Default::default());
            return Err(e);
        }
        self.store.retire_pack(pack)?;
        let moved = copied.bytes;
        self.ops.gc_packs.inc();
        self.ops.gc_moved_bytes.inc_by(moved);
        self.ops.gc_freed_bytes.inc_by(size.saturating_sub(moved));
        report.packs_compacted += 1;
        report.chunks_moved += copied.locs.len() as u64;
        report.chunks_compressed += copied.compressed;
        report.bytes_moved += moved;
        report.bytes_freed += size.saturating_sub(moved);
        Ok(())
    }
}

impl Engine {
    /// Count the records appended for a transaction that then failed as dead space (in a
    /// small transaction of its own), so compaction reclaims them. Best effort: if this fails
    /// too, they stay uncounted until `fsck --repair` recomputes the accounting.
    /// `reused`: the places of dead records among them (`store::reuse`), dead space already.
    pub(crate) fn settle_failed_appends(
        &self,
        appended: &HashMap<ChunkId, ChunkLoc>,
        reused: &HashSet<(PackId, u64)>,
    ) {
        if appended.is_empty() {
            return;
        }
        if let Err(e) = self.txn(false, |w| {
            w.chunks.reused = reused.clone();
            Ok(w.chunks.settle_appended(appended)?)
        }) {
            tracing::warn!(
                "cannot count {} records of a failed write as reclaimable: {e}",
                appended.len()
            );
        }
    }
}

/// `reclaim_threshold` over the (live, dead) bytes of every pack.
fn pick_min_live(packs: &[(u64, u64)]) -> Option<f64> {
    let dead: u64 = packs.iter().map(|p| p.1).sum();
    let total: u64 = packs.iter().map(|p| p.0 + p.1).sum();
    if dead < RECLAIM_MIN_DEAD {
        return None;
    }
    let share = |p: &(u64, u64)| p.0 as f64 / (p.0 + p.1).max(1) as f64;
    let mut min_live = 0.5f64;
    if dead as f64 > RECLAIM_MAX_DEAD_SHARE * total as f64 {
        let mut by_share: Vec<&(u64, u64)> = packs.iter().filter(|p| p.1 > 0).collect();
        by_share.sort_by(|a, b| share(a).total_cmp(&share(b)));
        let mut left = dead;
        for p in by_share {
            if left as f64 <= RECLAIM_TARGET_DEAD_SHARE * total as f64 {
                break;
            }
            left -= p.1;
            // Strictly above this pack's share, so it is a candidate.
            min_live = min_live.max(share(p) + 1e-9);
        }
    }
    let any = packs.iter().any(|p| p.1 > 0 && share(p) < min_live);
    any.then_some(min_live.min(1.0))
}

/// Compaction takes a pack once records stored uncompressed (`Encoded::uncompressed`) are
/// this share of its bytes: compressing them (about 2:1 on desktop data) then frees about as
/// much as compacting a pack at the background's dead-share threshold.
pub const RECOMPRESS_MIN_SHARE: f64 = 0.25;
/// Uncompressed records are compressed only in packs not appended to for this long: the hot
/// set is rewritten within minutes, and a record that dies meanwhile is reclaimed with the dead
/// space instead of being compressed first. (Without it, compaction compressed a desktop's
/// writes as fast as they came: 2.3 GB copied in 30 s of fio's VDI profile, which then ran at
/// 0.71x its speed.)
pub const RECOMPRESS_MIN_AGE: Duration = Duration::from_secs(600);
/// `tessera gc` compresses the uncompressed records of the pack being appended to only once
/// nothing was appended to it for this long: a copy that has ended, not a desktop writing.
pub const ACTIVE_QUIET: Duration = Duration::from_secs(1);
/// Background compaction runs once this many bytes of uncompressed records wait in packs no
/// longer appended to, even with nothing dead.
pub const RECOMPRESS_MIN_BYTES: u64 = 32 << 20;

/// Background compaction starts when this much pack space is dead (bytes).
pub const RECLAIM_MIN_DEAD: u64 = 32 << 20;
/// Background compaction also takes packs that are mostly live once dead records exceed this
/// share of all pack bytes (see `reclaim_threshold`)...
pub const RECLAIM_MAX_DEAD_SHARE: f64 = 0.10;
/// ...and stops adding packs once what stays dead is at most this share.
pub const RECLAIM_TARGET_DEAD_SHARE: f64 = 0.05;
/// `tessera gc` compacts packs with at least 5 % dead records (restic's prune default):
/// whatever stats calls reclaimable, less at most 5 % of the packs it leaves.
pub const DEFAULT_MIN_LIVE: f64 = 0.95;

impl Engine {
    /// Background reclamation while serving: every `interval`, if at least `RECLAIM_MIN_DEAD`
    /// bytes are dead, compact the packs `reclaim_threshold` picks, copying at most `rate`
    /// bytes per second so guest I/O keeps its speed. Deleted data's space is thus back on the host within
    /// about `interval` plus the copy time. The thread holds no strong reference while it
    /// waits and ends once the engine is dropped.
    pub fn spawn_reclaimer(
        self: &std::sync::Arc<Self>,
        interval: std::time::Duration,
        rate: Option<u64>,
    ) -> std::thread::JoinHandle<()> {
        self.spawn_periodic("tessera-gc", interval, move |e| {
            let min_live = match e.reclaim_threshold() {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!("background gc: cannot read pack accounting: {err}");
                    return;
                }
            };
            match e.gc_background(min_live, rate) {
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
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::fs::dir::Ctx;
    use crate::fs::{Format, InodeId, Kind};
    use crate::store::pack::{MemPackIo, PackIo, PACK_HEADER_LEN};

    const C: usize = 4096;

    /// In-memory packs whose appends start failing after a given number (0: never).
    #[derive(Default)]
    struct FlakyIo {
        mem: MemPackIo,
        /// Appends left before they fail; `usize::MAX`: never.
        appends_left: AtomicUsize,
    }

    impl PackIo for FlakyIo {
        fn create(&self, p: PackId) -> std::io::Result<()> {
            self.mem.create(p)
        }
        fn append(&self, p: PackId, d: &[u8]) -> std::io::Result<u64> {
            let left = self.appends_left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(std::io::Error::other("injected append failure"));
            }
            self.appends_left
                .store(left.saturating_sub(1), Ordering::SeqCst);
            self.mem.append(p, d)
        }
        fn read_at(&self, p: PackId, o: u64, l: usize) -> std::io::Result<Vec<u8>> {
            self.mem.read_at(p, o, l)
        }
        fn sync(&self, p: PackId) -> std::io::Result<()> {
            self.mem.sync(p)
        }
        fn len(&self, p: PackId) -> std::io::Result<u64> {
            self.mem.len(p)
        }
        fn list(&self) -> std::io::Result<Vec<PackId>> {
            self.mem.list()
        }
        fn remove(&self, p: PackId) -> std::io::Result<()> {
            self.mem.remove(p)
        }
    }

    /// Protects the background policy: nothing below 32 MiB dead; packs under half live are
    /// always taken; past 10 % dead the deadest packs are added until at most 5 % stays dead,
    /// and no more (a churned pool ends within the 10 % promise without rewriting every pack).
    #[test]
    fn background_threshold_takes_the_deadest_packs_down_to_five_percent() {
        const M: u64 = 1 << 20;
        assert_eq!(pick_min_live(&[(200 * M, 20 * M)]), None);
        // 8 % dead overall, one pack mostly dead: just that one.
        let m = pick_min_live(&[(900 * M, 40 * M), (10 * M, 40 * M)]).unwrap();
        assert_eq!(m, 0.5);
        // 25 % dead spread over packs 10-40 % dead: the deadest until <= 5 % stays.
        let packs = [
            (154 * M, 102 * M), // 40 % dead
            (179 * M, 77 * M),  // 30 %
            (205 * M, 51 * M),  // 20 %
            (230 * M, 26 * M),  // 10 %
        ];
        let m = pick_min_live(&packs).unwrap();
        let total: u64 = packs.iter().map(|p| p.0 + p.1).sum();
        let left: u64 = packs
            .iter()
            .filter(|p| p.0 as f64 / (p.0 + p.1) as f64 >= m)
            .map(|p| p.1)
            .sum();
        assert!(left as f64 <= 0.05 * total as f64, "left {left} of {total}");
        // The 10 % pack is not needed for that: it stays.
        assert!(230.0 / 256.0 >= m, "min_live {m} takes the 10 % pack too");
    }

    fn engine(io: Arc<dyn PackIo>) -> Engine {
        let f = Format {
            chunk_size: C as u32,
            zstd_level: 1,
        };
        Engine::in_memory(f, io).unwrap()
    }

    fn unique_data(seed: u64, chunks: usize) -> Vec<u8> {
        crate::fs::testutil::unique_data(seed, chunks, C)
    }

    fn file(e: &Engine, name: &str, data: &[u8]) -> InodeId {
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
        e.write(i, 0, data).unwrap();
        i
    }

    fn read_all(e: &Engine, ino: InodeId, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < len {
            out.extend(e.read(ino, out.len() as u64, 1 << 20).unwrap());
        }
        out
    }

    /// Every byte of every pack past its header, and what the accounting counts (live, dead).
    fn bytes_and_accounting(e: &Engine) -> (u64, u64, u64) {
        let on_disk: u64 = e
            .store
            .pack_files()
            .unwrap()
            .iter()
            .map(|(_, len)| len - PACK_HEADER_LEN)
            .sum();
        let uses = e.store.pack_use(&e.read_txn().unwrap()).unwrap();
        let live = uses.values().map(|u| u.live).sum();
        let dead = uses.values().map(|u| u.dead).sum();
        (on_disk, live, dead)
    }

    /// Protects: compaction holds the live index entries of a bounded group of packs at a
    /// time, not of every candidate, and still compacts them all.
    #[test]
    fn gc_works_through_candidates_in_bounded_groups() {
        let e = engine(Arc::new(MemPackIo::default()));
        let mut files = Vec::new();
        for p in 0..10u64 {
            let d = unique_data(p + 1, 20);
            let i = file(&e, &format!("f{p}"), &d);
            e.sync_all().unwrap();
            e.store.seal_active().unwrap();
            files.push((i, d));
        }
        // Keep 5 of each file's 20 chunks: every pack is 25 % live.
        for (i, d) in &mut files {
            let s = crate::fs::data::SetAttr {
                size: Some(5 * C as u64),
                ..Default::default()
            };
            e.setattr(*i, &s).unwrap();
            d.truncate(5 * C);
        }
        e.sync_all().unwrap();
        // A group limit below one pack's live bytes: one pack per group.
        let r = {
            let _one = e.gc_lock.lock();
            e.gc_inner(0.5, None, Duration::ZERO, 1, &|_, _| {})
                .unwrap()
        };
        assert_eq!(r.packs_compacted, 10, "{r:?}");
        assert_eq!(r.chunks_moved, 50);
        assert_eq!(
            r.peak_entries_held, 5,
            "entries of more than one pack held at once"
        );
        for (i, d) in &files {
            assert_eq!(&read_all(&e, *i, d.len()), d);
        }
        let f = e.fsck(&|_, _| {}).unwrap();
        assert!(f.problems.is_empty(), "{:?}", f.problems);
    }

    /// Protects the space and accounting of random rewrites (`store::reuse`): once a
    /// rewrite's old records are durably dead and unread, the next rewrite writes over them
    /// instead of growing the packs; every pack byte stays counted live or dead exactly once,
    /// the data and fsck stay right, and compaction still reclaims what is left.
    #[test]
    fn rewrites_go_over_dead_records_and_count_once() {
        let e = engine(Arc::new(MemPackIo::default()));
        let d = unique_data(1, 64);
        let i = file(&e, "f", &d);
        e.sync_all().unwrap();
        let mut last = d;
        let mut sizes = Vec::new();
        for round in 0..6u64 {
            last = unique_data(10 + round, 64);
            e.write(i, 0, &last).unwrap();
            e.sync_all().unwrap();
            let (on_disk, live, dead) = bytes_and_accounting(&e);
            assert_eq!(
                live + dead,
                on_disk,
                "round {round}: bytes counted twice or never"
            );
            sizes.push(on_disk);
        }
        let reused = e.store.reused().0;
        assert!(
            reused >= 4 * 64,
            "only {reused} records written over dead ones"
        );
        assert_eq!(sizes[5], sizes[1], "packs grew under rewrites: {sizes:?}");
        assert_eq!(read_all(&e, i, last.len()), last);
        let f = e.fsck(&|_, _| {}).unwrap();
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        e.gc(0.9, &|_, _| {}).unwrap();
        let (on_disk, live, dead) = bytes_and_accounting(&e);
        assert_eq!((dead, on_disk), (0, live), "dead records not reclaimed");
        assert_eq!(read_all(&e, i, last.len()), last);
    }

    /// Protects readers (`store::reuse`): while a snapshot older than a record's death is
    /// open, the record's place is not written over; once it ends, it may be.
    #[test]
    fn an_open_snapshot_keeps_dead_records_from_being_written_over() {
        let e = engine(Arc::new(MemPackIo::default()));
        let i = file(&e, "f", &unique_data(1, 16));
        e.sync_all().unwrap();
        let snapshot = e.read_txn().unwrap();
        for round in 0..3u64 {
            e.write(i, 0, &unique_data(10 + round, 16)).unwrap();
            e.sync_all().unwrap();
        }
        assert_eq!(e.store.reused().0, 0, "written over under an open snapshot");
        drop(snapshot);
        let last = unique_data(20, 16);
        e.write(i, 0, &last).unwrap();
        e.sync_all().unwrap();
        assert!(e.store.reused().0 >= 16);
        assert_eq!(read_all(&e, i, last.len()), last);
    }

    /// Protects: records appended for a write whose commit then failed are counted as dead
    /// space (every pack byte is counted live or dead), and compaction gives them back.
    #[test]
    fn records_of_a_failed_commit_are_dead_and_reclaimed() {
        let io = Arc::new(FlakyIo::default());
        io.appends_left.store(usize::MAX, Ordering::SeqCst);
        let e = engine(io.clone());
        // 600 chunks are appended in three groups of 256: the second append fails.
        let d = unique_data(7, 600);
        let i = file(&e, "f", &d);
        io.appends_left.store(1, Ordering::SeqCst);
        assert!(e.flush_ino(i, false).is_err());
        io.appends_left.store(usize::MAX, Ordering::SeqCst);
        e.sync_all().unwrap();
        let (on_disk, live, dead) = bytes_and_accounting(&e);
        assert!(
            dead >= 256 * C as u64,
            "failed write's records not dead: {dead}"
        );
        assert_eq!(
            live + dead,
            on_disk,
            "pack bytes counted neither live nor dead"
        );
        e.gc(0.9, &|_, _| {}).unwrap();
        let (on_disk, live, dead) = bytes_and_accounting(&e);
        assert_eq!(dead, 0);
        assert_eq!(on_disk, live, "dead records not reclaimed");
        assert_eq!(read_all(&e, i, d.len()), d);
    }
}
