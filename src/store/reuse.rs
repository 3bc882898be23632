//! Dead records' places used again: a new record of exactly the size of a record nothing
//! references any more is written over it instead of appended to the pack being filled.
//!
//! Why: every flush of random writes appends a new version of each chunk it rewrites, and the
//! old version dies a moment later. Appended, the new version takes new page-cache pages (and
//! new blocks of the filesystem under the packs); written over a dead version of the same size
//! it takes pages the page cache holds already, as an in-place overwrite (nfs-ganesha's
//! writes into an image) does. On a VM whose free memory goes back to its host, a new page
//! costs a fault in the host: with packs whose pages were all cached, the VDI profile over NFS
//! took 44-48 us of server CPU per I/O instead of 76-82 (`benches/README.md`, "Dead records
//! written over in place"). ZFS uses freed blocks again the same way, once the transaction group that
//! freed them is on disk.
//!
//! A record's place may be used again once:
//! 1. its death is durable: the commit that dropped its last reference is covered by a
//!    durable commit, so no state a crash or power loss can return to references it (a
//!    write into it that a crash tears leaves bytes nothing reads). A record born and dead
//!    between two durable commits (a chunk flushed twice within one flush interval) was never
//!    referenced by durable state, so its death needs no durable commit (ZFS frees a block
//!    born in the open transaction group at once the same way): see [`Store::born`];
//! 2. no reader can still read it: every snapshot that began before that commit has ended
//!    ([`Grace`]);
//! 3. its pack is not being compacted ([`Store::compacting`]: compaction copies live records
//!    from a snapshot it does not keep, then deletes the pack) and the packs are not in an
//!    object-store tier (uploaded packs never change: [`PackIo::rewrites`]).
//!
//! The place is taken whole (same header and payload length), so a scan of the pack still
//! steps from record to record. A write into a place is synced with the next durable commit
//! like an append, and the commit that references it moves its bytes from dead to live in
//! the pack's accounting (`ChunkTables::reused`). A crash forgets the places waiting here:
//! they stay dead space, for compaction.
//!
//! [`PackIo::rewrites`]: super::pack::PackIo::rewrites

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::pack::{PackId, RECORD_HEADER_LEN};
use super::{ChunkLoc, Store};

/// Most dead records waiting to be used again (24 bytes each: at most about 6 MiB). Past it,
/// deaths are left to compaction: using places again is an optimisation, never needed.
const MAX_WAITING: usize = 256 * 1024;

/// Two-phase reader epochs (as RCU's grace periods): a reader pins the current phase for as
/// long as it may read packs; a record dead since phase `t` may be overwritten once the phase
/// reached `t + 2`, because the phase advances only when no reader of the phase before the
/// current one is left.
#[derive(Default)]
pub(crate) struct Grace {
    phase: AtomicU64,
    active: [AtomicUsize; 2],
}

/// A reader's hold on its phase; released on drop.
pub struct Pin<'a> {
    grace: &'a Grace,
    slot: usize,
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.grace.active[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

impl Grace {
    pub(crate) fn pin(&self) -> Pin<'_> {
        loop {
            let p = self.phase.load(Ordering::SeqCst);
            let slot = (p & 1) as usize;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            // Counted in the slot of the phase it read; if the phase moved meanwhile the
            // advancer may not have seen the count: count again under the new phase.
            if self.phase.load(Ordering::SeqCst) == p {
                return Pin { grace: self, slot };
            }
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Advance the phase as far as the readers allow (never waits); the phase now.
    fn advance(&self) -> u64 {
        for _ in 0..2 {
            let p = self.phase.load(Ordering::SeqCst);
            // The slot phase `p + 1` will use is the one phase `p - 1` used.
            if self.active[((p + 1) & 1) as usize].load(Ordering::SeqCst) != 0 {
                break;
            }
            let _ = self
                .phase
                .compare_exchange(p, p + 1, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.phase.load(Ordering::SeqCst)
    }

    fn now(&self) -> u64 {
        self.phase.load(Ordering::SeqCst)
    }
}

/// The place of a dead record: where its header starts, and its payload length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Place {
    pub pack: PackId,
    pub offset: u64,
    pub stored_len: u32,
}

impl Place {
    fn of(loc: &ChunkLoc) -> Place {
        Place {
            pack: loc.pack,
            offset: loc.offset,
            stored_len: loc.stored_len,
        }
    }

    /// Bytes of the place (header and payload).
    pub fn bytes(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Dead records on their way to being used again.
#[derive(Default)]
pub(crate) struct Places {
    /// By the number of the commit that made them dead, oldest first: waiting for a durable
    /// commit to cover it.
    undurable: VecDeque<(u64, Place)>,
    /// Durable deaths by the reader phase when they became durable, oldest first.
    durable: VecDeque<(u64, Place)>,
    /// Records born since the last durable commit (`Store::born`), by pack and offset: no
    /// state a crash can return to references them.
    young: HashSet<(PackId, u64)>,
    /// Free to take, by payload length.
    ready: HashMap<u32, Vec<Place>>,
    ready_count: usize,
    /// Packs compaction is copying out of, with how many compactions hold each (their places
    /// are dropped: the pack goes anyway).
    compacting: HashMap<PackId, usize>,
}

impl Places {
    fn len(&self) -> usize {
        self.undurable.len() + self.durable.len() + self.ready_count
    }

    fn forget(&mut self, packs: &HashSet<PackId>) {
        self.undurable.retain(|(_, h)| !packs.contains(&h.pack));
        self.durable.retain(|(_, h)| !packs.contains(&h.pack));
        self.young.retain(|(pack, _)| !packs.contains(pack));
        let mut count = 0;
        for v in self.ready.values_mut() {
            v.retain(|h| !packs.contains(&h.pack));
            count += v.len();
        }
        self.ready_count = count;
    }
}

/// Counters of places used again (`tessera stats`).
#[derive(Default)]
pub(crate) struct ReuseStats {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    /// Deaths left to compaction because the queue was full.
    pub dropped: AtomicU64,
}

/// Held while compaction copies the live records of some packs: places in them are not used
/// again (a record that dies after compaction's snapshot is still copied, and must read intact
/// until the copy is done).
pub struct Compacting<'a> {
    store: &'a Store,
    packs: Vec<PackId>,
}

impl Drop for Compacting<'_> {
    fn drop(&mut self) {
        let mut p = self.store.places.lock();
        for pack in &self.packs {
            if let Some(n) = p.compacting.get_mut(pack) {
                *n -= 1;
                if *n == 0 {
                    p.compacting.remove(pack);
                }
            }
        }
    }
}

impl Store {
    /// Records made dead by commit number `commit` (the engine's commit counter), to use
    /// again once that commit is durable (`durable`: it is already).
    pub fn record_deaths(&self, commit: u64, durable: bool, dead: &[ChunkLoc]) {
        if dead.is_empty() || !self.io().rewrites() {
            return;
        }
        let phase = self.grace.now();
        let mut p = self.places.lock();
        for loc in dead {
            if p.len() >= MAX_WAITING {
                self.reuse_stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if p.compacting.contains_key(&loc.pack) {
                continue;
            }
            let h = Place::of(loc);
            // Born since the last durable commit: never referenced by durable state.
            let young = p.young.remove(&(loc.pack, loc.offset));
            if durable || young {
                p.durable.push_back((phase, h));
            } else {
                p.undurable.push_back((commit, h));
            }
        }
    }

    /// Records the commit being made references for the first time (new appends and places
    /// written over). Call it inside that commit's transaction, before it commits: the
    /// transaction holds the metadata writer lock, so no durable commit can come between
    /// this call and the commit. Until [`Store::durable_point`], a crash returns to a state
    /// that does not reference them, so if they die meanwhile their places need no durable
    /// commit before being used again.
    pub fn born<'a>(&self, locs: impl IntoIterator<Item = &'a ChunkLoc>) {
        if !self.io().rewrites() {
            return;
        }
        let mut p = self.places.lock();
        for loc in locs {
            // Past the bound a record is simply treated as durable: it waits longer.
            if p.young.len() >= MAX_WAITING {
                break;
            }
            p.young.insert((loc.pack, loc.offset));
        }
    }

    /// A durable commit is being made: every record born so far may be referenced by durable
    /// state from now on. Call it inside that commit's transaction, before it commits (if the
    /// commit then fails, those records only wait longer).
    pub fn durable_point(&self) {
        self.places.lock().young.clear();
    }

    /// Every commit numbered below `upto` is durable.
    pub fn deaths_durable(&self, upto: u64) {
        let phase = self.grace.now();
        let mut p = self.places.lock();
        while p.undurable.front().is_some_and(|(c, _)| *c < upto) {
            let (_, h) = p.undurable.pop_front().expect("front checked");
            p.durable.push_back((phase, h));
        }
    }

    /// A free place for each payload length in `lens` (`None` where there is none), taken:
    /// the caller writes a record of that length there, or leaves it as the dead space it is.
    pub fn take_places(&self, lens: &[u32]) -> Vec<Option<Place>> {
        if !self.io().rewrites() {
            return vec![None; lens.len()];
        }
        let phase = self.grace.advance();
        let mut p = self.places.lock();
        while p.durable.front().is_some_and(|(t, _)| t + 2 <= phase) {
            let (_, h) = p.durable.pop_front().expect("front checked");
            if !p.compacting.contains_key(&h.pack) {
                p.ready.entry(h.stored_len).or_default().push(h);
                p.ready_count += 1;
            }
        }
        let out: Vec<Option<Place>> = lens
            .iter()
            .map(|len| {
                let h = p.ready.get_mut(len)?.pop()?;
                p.ready_count -= 1;
                Some(h)
            })
            .collect();
        drop(p);
        let (n, bytes) = out
            .iter()
            .flatten()
            .fold((0, 0), |(n, b), h| (n + 1, b + h.bytes()));
        self.reuse_stats.records.fetch_add(n, Ordering::Relaxed);
        self.reuse_stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        out
    }

    /// Keep the places of `packs` from being used again while compaction copies their live
    /// records (it reads them without holding a snapshot). Take it before
    /// [`Store::drain_appends`], so a writer that took a place in one of them before has
    /// committed when compaction reads the index.
    pub fn compacting(&self, packs: &[PackId]) -> Compacting<'_> {
        let mut p = self.places.lock();
        for pack in packs {
            *p.compacting.entry(*pack).or_default() += 1;
        }
        p.forget(&packs.iter().copied().collect());
        Compacting {
            store: self,
            packs: packs.to_vec(),
        }
    }

    /// Forget the places of a pack about to be deleted (its id may be used again).
    pub(crate) fn forget_places(&self, pack: PackId) {
        self.places.lock().forget(&HashSet::from([pack]));
    }

    /// Records and bytes written into dead records' places so far, and deaths left to
    /// compaction (queue full).
    pub fn reused(&self) -> (u64, u64, u64) {
        (
            self.reuse_stats.records.load(Ordering::Relaxed),
            self.reuse_stats.bytes.load(Ordering::Relaxed),
            self.reuse_stats.dropped.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::chunk::ChunkId;
    use crate::store::pack::{MemPackIo, PackIo};
    use crate::store::RecordRef;

    fn store() -> (Store, Arc<MemPackIo>) {
        let io = Arc::new(MemPackIo::default());
        (Store::open(io.clone(), 1, 16).unwrap(), io)
    }

    fn chunk(seed: u8) -> (ChunkId, Vec<u8>) {
        let data: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ seed).collect();
        (ChunkId::of(&data), data)
    }

    /// Append raw records of `chunks`; their locations.
    fn append(s: &Store, chunks: &[(ChunkId, &Vec<u8>)]) -> Vec<ChunkLoc> {
        let refs: Vec<RecordRef<'_>> = chunks
            .iter()
            .map(|(id, d)| RecordRef::uncompressed(*id, d))
            .collect();
        s.append_refs(&refs).unwrap()
    }

    /// Protects acknowledged data and readers: a dead record's place is written over only
    /// once its death is durable and every reader older than that has ended, once, and a
    /// record of another size never takes it.
    #[test]
    fn a_place_is_taken_once_durable_and_unread() {
        let (s, _) = store();
        let (id, data) = chunk(1);
        let loc = append(&s, &[(id, &data)])[0];
        let len = loc.stored_len;
        s.record_deaths(7, false, &[loc]);
        assert_eq!(s.take_places(&[len]), vec![None], "death not durable yet");
        let reader = s.read_gate();
        s.deaths_durable(8);
        for _ in 0..3 {
            assert_eq!(
                s.take_places(&[len]),
                vec![None],
                "a reader may still read it"
            );
        }
        drop(reader);
        assert_eq!(s.take_places(&[len + 1]), vec![None], "another size");
        let place = s.take_places(&[len, len])[0].expect("free once unread");
        assert_eq!((place.pack, place.offset), (loc.pack, loc.offset));
        assert_eq!(s.take_places(&[len]), vec![None], "taken twice");
        assert_eq!(s.reused().0, 1);
    }

    /// Offsets of the places taken.
    fn offsets(places: Vec<Option<Place>>) -> Vec<u64> {
        places.iter().flatten().map(|h| h.offset).collect()
    }

    /// Protects acknowledged data: a record born after the last durable commit and dead before
    /// the next is free once unread, without a durable commit; one born before a durable
    /// commit waits for the durable commit that covers its death.
    #[test]
    fn a_record_never_durable_is_free_once_unread() {
        let (s, _) = store();
        let (a, da) = chunk(7);
        let (b, db) = chunk(8);
        let locs = append(&s, &[(a, &da), (b, &db)]);
        let len = locs[0].stored_len;
        s.born(&locs[..1]);
        s.durable_point();
        s.born(&locs[1..]);
        let reader = s.read_gate();
        s.record_deaths(5, false, &locs);
        assert_eq!(
            s.take_places(&[len]),
            vec![None],
            "a reader may still read it"
        );
        drop(reader);
        assert_eq!(
            offsets(s.take_places(&[len, len])),
            vec![locs[1].offset],
            "only the record born after the durable commit"
        );
        s.deaths_durable(6);
        assert_eq!(
            offsets(s.take_places(&[len])),
            vec![locs[0].offset],
            "the older one once its death is durable"
        );
    }

    /// Protects compaction's copies: no place in a pack being compacted is taken, and deaths
    /// in it while it is are forgotten (the pack goes anyway); a retired pack's places too.
    #[test]
    fn compacted_and_retired_packs_give_no_places() {
        let (s, _) = store();
        let (a, da) = chunk(2);
        let (b, db) = chunk(3);
        let locs = append(&s, &[(a, &da), (b, &db)]);
        let len = locs[0].stored_len;
        s.record_deaths(0, true, &locs[..1]);
        let c = s.compacting(&[locs[0].pack]);
        s.record_deaths(1, true, &locs[1..]);
        assert_eq!(s.take_places(&[len, len]), vec![None, None]);
        drop(c);
        assert_eq!(
            s.take_places(&[len]),
            vec![None],
            "forgotten while compacted"
        );
        s.record_deaths(2, true, &locs);
        s.seal_active().unwrap();
        s.retire_pack(locs[0].pack).unwrap();
        assert_eq!(s.take_places(&[len]), vec![None], "pack deleted");
    }

    /// Protects the pack format: a record written over a dead one of the same size reads
    /// back (blake3-verified), the pack does not grow, and a scan still steps over it.
    #[test]
    fn a_record_written_over_a_dead_one_reads_back_and_scans() {
        let (s, io) = store();
        let (a, da) = chunk(4);
        let (b, db) = chunk(5);
        let (c, dc) = chunk(6);
        let locs = append(&s, &[(a, &da), (b, &db)]);
        s.record_deaths(0, true, &locs[..1]);
        let before = io.len(locs[0].pack).unwrap();
        let (got, over) = s
            .append_refs_reusing(&[RecordRef::uncompressed(c, &dc)], false)
            .unwrap();
        assert_eq!(over.len(), 1);
        assert_eq!((got[0].pack, got[0].offset), (locs[0].pack, locs[0].offset));
        assert_eq!(io.len(locs[0].pack).unwrap(), before, "the pack grew");
        assert_eq!(s.read_loc(&c, &got[0]).unwrap(), dc);
        assert_eq!(s.read_loc(&b, &locs[1]).unwrap(), db, "neighbour damaged");
        let mut found = std::collections::HashMap::new();
        let scan = s.scan_pack(locs[0].pack, &mut found).unwrap();
        assert_eq!((scan.records_intact, scan.damaged_stretches), (2, 0));
        assert!(found.contains_key(&c) && found.contains_key(&b) && !found.contains_key(&a));
    }

    /// Protects readers: a record dead at phase t is used again only once every reader
    /// pinned at t or before has ended.
    #[test]
    fn grace_waits_for_every_older_reader() {
        let g = Grace::default();
        let old = g.pin();
        let t = g.now();
        // The reader of phase t holds the phase at t + 1 at most.
        for _ in 0..5 {
            assert!(g.advance() < t + 2);
        }
        let newer = g.pin();
        drop(old);
        // One more step is possible, then the newer reader (pinned at t + 1) holds it.
        assert!(g.advance() >= t + 2);
        let at = g.now();
        for _ in 0..5 {
            assert!(g.advance() <= at + 1);
        }
        drop(newer);
        assert!(g.advance() >= at + 2);
    }
}
