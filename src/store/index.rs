//! The chunk index: which chunks are stored, under which key, where, and how many chunk-map
//! slots reference each; plus the per-pack live/dead accounting and the store counters.
//!
//! # Keys (format 2)
//! The index is keyed by [`ChunkKey`], 8 bytes, and chunk maps hold keys, not 32-byte ids.
//! A chunk's key is its id's first 55 bits, so finding a chunk by id (dedup) is one lookup
//! that compares the stored id. When that key is held by another live chunk (two ids sharing
//! 55 bits: a pair in 10^8 chunks has odds of about 1 in 7 of existing at all) the newcomer
//! gets an alias key from a counter and an entry in `chunk_aliases`, which is empty in
//! practice, so the second lookup a miss costs is a lookup in an empty table. A key keeps
//! naming the same chunk while it has references; a preferred key freed by a released chunk
//! may later be taken by another chunk with the same prefix, which is safe because nothing
//! references the key any more, and reads verify every chunk against the id in its entry.

use std::collections::{HashMap, HashSet};

use redb::{ReadableTable, WriteTransaction};

use super::chunk::ChunkId;
use super::loc::{ChunkKey, ChunkLoc, IndexEntry};
use super::pack::{self, PackId, RECORD_HEADER_LEN};
use super::StoreError;
use crate::schema;

/// Find `id` in the index through any readable tables (a read or a write transaction).
pub(super) fn find_in<I, A>(
    index: &I,
    aliases: &A,
    id: &ChunkId,
) -> Result<Option<(ChunkKey, ChunkLoc)>, StoreError>
where
    I: ReadableTable<u64, &'static [u8]>,
    A: ReadableTable<&'static [u8; 32], u64>,
{
    let k = ChunkKey::preferred(id);
    if let Some(e) = entry_in(index, k)? {
        if e.id == *id {
            return Ok(Some((k, e.loc)));
        }
    }
    let Some(a) = aliases.get(&id.0)? else {
        return Ok(None);
    };
    let k = ChunkKey(a.value());
    match entry_in(index, k)? {
        Some(e) if e.id == *id => Ok(Some((k, e.loc))),
        _ => Err(StoreError::BadIndex(k)),
    }
}

/// The entry under `key`, if any.
pub(super) fn entry_in<I: ReadableTable<u64, &'static [u8]>>(
    index: &I,
    key: ChunkKey,
) -> Result<Option<IndexEntry>, StoreError> {
    match index.get(key.0)? {
        Some(v) => Ok(Some(
            IndexEntry::decode(v.value()).ok_or(StoreError::BadIndex(key))?,
        )),
        None => Ok(None),
    }
}

/// The store's tables opened in one write transaction: reference counting of chunks.
pub struct ChunkTables<'txn> {
    index: redb::Table<'txn, u64, &'static [u8]>,
    aliases: redb::Table<'txn, &'static [u8; 32], u64>,
    packs: redb::Table<'txn, u32, (u64, u64)>,
    deferred: redb::Table<'txn, u32, u64>,
    counters: redb::Table<'txn, &'static str, u64>,
    /// Chunks whose last reference went away in this transaction.
    pub released: Vec<ChunkId>,
    /// Where those chunks' records are: dead once this commits (`store::reuse`).
    pub died: Vec<ChunkLoc>,
    /// Places of dead records that records for this transaction were written over
    /// (`Store::append_refs_reusing`): counted dead already, so a record recorded there moves
    /// its bytes from dead to live, and one left unreferenced adds no dead bytes.
    pub reused: HashSet<(PackId, u64)>,
    /// Reference drops not applied yet: they are applied at the end of the transaction, so a
    /// chunk that one slot gives up and another slot takes in the same transaction (data moved
    /// within a file, or between clones) never drops out of the index in between.
    pending: Vec<ChunkKey>,
    /// Counter and per-pack changes of this transaction, written once by `apply_decrefs`:
    /// written per chunk, they cost eight B-tree operations for every chunk stored or released.
    acct: Accounting,
}

/// Changes to the store counters and the per-pack live/dead bytes, not written yet.
#[derive(Default)]
struct Accounting {
    chunks: i64,
    unique: i64,
    stored: i64,
    /// Pack -> (live, dead) byte changes.
    packs: HashMap<u32, (i64, i64)>,
}

impl Accounting {
    fn pack(&mut self, pack: PackId, live: i64, dead: i64) {
        let e = self.packs.entry(pack.0).or_insert((0, 0));
        e.0 += live;
        e.1 += dead;
    }

    /// A record now in the index: live bytes in its pack, and one more chunk.
    fn recorded(&mut self, loc: &ChunkLoc) {
        self.pack(loc.pack, record_bytes(loc) as i64, 0);
        self.chunk(loc, 1);
    }

    /// A chunk record entering (`sign` 1) or leaving (-1) the index.
    fn chunk(&mut self, loc: &ChunkLoc, sign: i64) {
        self.chunks += sign;
        self.unique += sign * i64::from(loc.raw_len);
        self.stored += sign * i64::from(loc.stored_len);
    }
}

fn bump(t: &mut redb::Table<'_, &'static str, u64>, k: &str, d: i64) -> Result<(), StoreError> {
    let cur = t.get(k)?.map_or(0, |v| v.value());
    t.insert(k, cur.saturating_add_signed(d))?;
    Ok(())
}

/// A reference taken by [`ChunkTables::reference`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The chunk's key (what the chunk-map slot holds).
    pub key: ChunkKey,
    /// The record appended for it is now the chunk's copy (false: it was stored already, and
    /// the appended record, if any, is dead).
    pub recorded: bool,
}

/// Bytes a record takes in its pack (header and payload).
pub fn record_bytes(l: &ChunkLoc) -> u64 {
    RECORD_HEADER_LEN as u64 + u64::from(l.stored_len)
}

impl<'txn> ChunkTables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(ChunkTables {
            index: txn.open_table(schema::CHUNKS)?,
            aliases: txn.open_table(schema::CHUNK_ALIASES)?,
            packs: txn.open_table(schema::PACKS)?,
            deferred: txn.open_table(schema::PACK_DEFERRED)?,
            counters: txn.open_table(schema::COUNTERS)?,
            released: Vec::new(),
            died: Vec::new(),
            reused: HashSet::new(),
            pending: Vec::new(),
            acct: Accounting::default(),
        })
    }

    /// Every index entry (repair).
    pub fn entries(&self) -> Result<Vec<(ChunkKey, IndexEntry)>, StoreError> {
        let mut out = Vec::new();
        for e in self.index.iter()? {
            let (k, v) = e?;
            if let Some(e) = IndexEntry::decode(v.value()) {
                out.push((ChunkKey(k.value()), e));
            }
        }
        Ok(out)
    }

    /// Every alias (repair: keys of chunks whose entry may be gone).
    pub fn aliases(&self) -> Result<Vec<(ChunkId, ChunkKey)>, StoreError> {
        let mut out = Vec::new();
        for e in self.aliases.iter()? {
            let (k, v) = e?;
            out.push((ChunkId(*k.value()), ChunkKey(v.value())));
        }
        Ok(out)
    }

    /// Replace the whole index with `index`, and recompute the aliases, the per-pack
    /// accounting (from `pack_lens`: every pack file and its length) and the counters
    /// (repair).
    pub fn replace_all(
        &mut self,
        index: &[(ChunkKey, IndexEntry)],
        pack_lens: &[(PackId, u64)],
    ) -> Result<(), StoreError> {
        // Everything is recomputed: changes made earlier in this transaction are in it.
        self.acct = Accounting::default();
        self.index.retain(|_, _| false)?;
        self.aliases.retain(|_, _| false)?;
        let (mut unique, mut stored) = (0u64, 0u64);
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut next_alias = self.get_counter(schema::C_NEXT_ALIAS)?;
        for (k, e) in index {
            self.index.insert(k.0, e.encode().as_slice())?;
            if k.is_alias() {
                self.aliases.insert(&e.id.0, k.0)?;
                next_alias = next_alias.max(k.alias_number() + 1);
            }
            if e.loc.is_lost() {
                continue;
            }
            unique += u64::from(e.loc.raw_len);
            stored += u64::from(e.loc.stored_len);
            *live.entry(e.loc.pack.0).or_insert(0) += record_bytes(&e.loc);
        }
        self.packs.retain(|_, _| false)?;
        for (p, len) in pack_lens {
            let l = live.get(&p.0).copied().unwrap_or(0);
            let dead = len.saturating_sub(pack::PACK_HEADER_LEN).saturating_sub(l);
            self.packs.insert(p.0, (l, dead))?;
        }
        // Waiting-for-compression hints are kept for the packs that are still there.
        let present: std::collections::HashSet<u32> = pack_lens.iter().map(|(p, _)| p.0).collect();
        self.deferred.retain(|p, _| present.contains(&p))?;
        for (k, v) in [
            (schema::C_CHUNK_COUNT, index.len() as u64),
            (schema::C_UNIQUE_BYTES, unique),
            (schema::C_STORED_BYTES, stored),
            (schema::C_NEXT_ALIAS, next_alias),
        ] {
            self.counters.insert(k, v)?;
        }
        Ok(())
    }

    fn get_counter(&self, k: &str) -> Result<u64, StoreError> {
        Ok(self.counters.get(k)?.map_or(0, |v| v.value()))
    }

    /// The key and location of `id`, if stored.
    pub fn find(&self, id: &ChunkId) -> Result<Option<(ChunkKey, ChunkLoc)>, StoreError> {
        find_in(&self.index, &self.aliases, id)
    }

    /// The chunk under `key`, if any.
    pub fn entry(&self, key: ChunkKey) -> Result<Option<IndexEntry>, StoreError> {
        entry_in(&self.index, key)
    }

    fn put(&mut self, key: ChunkKey, id: &ChunkId, loc: &ChunkLoc) -> Result<(), StoreError> {
        let e = IndexEntry { id: *id, loc: *loc };
        self.index.insert(key.0, e.encode().as_slice())?;
        Ok(())
    }

    /// Add a reference to a chunk that is already stored.
    pub fn incref(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        let mut e = self.entry(key)?.ok_or(StoreError::MissingKey(key))?;
        e.loc.refs += 1;
        self.put(key, &e.id, &e.loc)
    }

    /// Add `n` references to a chunk that is already stored (one update for many slots).
    pub fn incref_by(&mut self, key: ChunkKey, n: u64) -> Result<(), StoreError> {
        let mut e = self.entry(key)?.ok_or(StoreError::MissingKey(key))?;
        e.loc.refs += n;
        self.put(key, &e.id, &e.loc)
    }

    /// Add a reference to a chunk by id; it must be stored.
    pub fn incref_id(&mut self, id: &ChunkId) -> Result<ChunkKey, StoreError> {
        match self.find(id)? {
            Some((k, mut l)) => {
                l.refs += 1;
                self.put(k, id, &l)?;
                Ok(k)
            }
            None => Err(StoreError::Missing(*id)),
        }
    }

    /// Add `n` references to chunk `id` through `key`, a key it had earlier in this session,
    /// if it still names that chunk and the chunk is not lost; false if not (look it up by id).
    pub fn incref_known(
        &mut self,
        key: ChunkKey,
        id: &ChunkId,
        n: u64,
    ) -> Result<bool, StoreError> {
        match self.entry(key)? {
            Some(mut e) if e.id == *id && !e.loc.is_lost() => {
                e.loc.refs += n;
                self.put(key, id, &e.loc)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Add a reference to `id` if it is stored and intact; its key, or `None`.
    pub fn incref_present(&mut self, id: &ChunkId) -> Result<Option<ChunkKey>, StoreError> {
        match self.find(id)? {
            Some((k, mut l)) if !l.is_lost() => {
                l.refs += 1;
                self.put(k, id, &l)?;
                Ok(Some(k))
            }
            _ => Ok(None),
        }
    }

    /// Point a chunk at a new copy of its record (compaction); its old record becomes dead.
    pub fn relocate(&mut self, key: ChunkKey, new: &ChunkLoc) -> Result<(), StoreError> {
        let old = self.entry(key)?.ok_or(StoreError::MissingKey(key))?;
        let mut l = *new;
        l.refs = old.loc.refs;
        self.put(key, &old.id, &l)?;
        // The copy may be smaller (compaction compresses records stored uncompressed).
        self.acct.stored += i64::from(l.stored_len) - i64::from(old.loc.stored_len);
        let r = record_bytes(&old.loc) as i64;
        self.acct.pack(old.loc.pack, -r, r);
        self.acct.pack(l.pack, record_bytes(&l) as i64, 0);
        Ok(())
    }

    /// Count a record nothing references (a copy made by compaction that lost a race).
    pub fn add_dead(&mut self, loc: &ChunkLoc) -> Result<(), StoreError> {
        if !self.reused.remove(&(loc.pack, loc.offset)) {
            self.acct.pack(loc.pack, 0, record_bytes(loc) as i64);
        }
        Ok(())
    }

    /// A record now in the index ([`Accounting::recorded`]); written over a dead record
    /// (`reused`), its bytes stop counting as dead.
    fn record_live(&mut self, l: &ChunkLoc) {
        self.acct.recorded(l);
        if self.reused.remove(&(l.pack, l.offset)) {
            self.acct.pack(l.pack, 0, -(record_bytes(l) as i64));
        }
    }

    /// Account records appended for this transaction that the index does not point at: the
    /// chunk was stored by another writer meanwhile, the file went away, or the transaction
    /// that was to reference them failed (then call it in a follow-up transaction). They are
    /// dead space in their packs, which compaction reclaims; uncounted, they would stay on
    /// disk for good. Call before the transaction's reference drops are applied.
    pub fn settle_appended<'a>(
        &mut self,
        appended: impl IntoIterator<Item = (&'a ChunkId, &'a ChunkLoc)>,
    ) -> Result<(), StoreError> {
        for (id, loc) in appended {
            match self.find(id)? {
                Some((_, cur)) if cur.pack == loc.pack && cur.offset == loc.offset => {}
                _ => self.add_dead(loc)?,
            }
        }
        Ok(())
    }

    /// [`ChunkTables::settle_appended`] for a flush that took its references with
    /// [`ChunkTables::reference`], which said which appended records it `recorded` (the
    /// others are dead: another copy of the chunk was stored first), so no lookups are
    /// needed. Also counts the recorded records stored uncompressed (`raw`) as waiting for
    /// compaction to compress them. One counter update per pack: a batch of random 4 KiB
    /// writes appends thousands of raw records to the same pack.
    /// `over`: the places of dead records they were written over (`store::reuse`), whose
    /// bytes count as waiting already (a place is taken by a record of its exact size, and a
    /// whole chunk that size was stored raw: zstd's output is kept only when smaller).
    pub fn settle_flushed<'a>(
        &mut self,
        appended: impl IntoIterator<Item = (&'a ChunkId, &'a ChunkLoc)>,
        recorded: &HashSet<ChunkId>,
        raw: &HashSet<ChunkId>,
        over: &HashSet<(PackId, u64)>,
    ) -> Result<(), StoreError> {
        let mut waiting: HashMap<u32, u64> = HashMap::new();
        for (id, loc) in appended {
            if !recorded.contains(id) {
                self.add_dead(loc)?;
            } else if raw.contains(id) && !over.contains(&(loc.pack, loc.offset)) {
                *waiting.entry(loc.pack.0).or_default() += record_bytes(loc);
            }
        }
        for (pack, bytes) in waiting {
            let n = self.deferred.get(pack)?.map_or(0, |v| v.value());
            self.deferred.insert(pack, n + bytes)?;
        }
        Ok(())
    }

    /// Forget a pack's accounting (it is about to be deleted).
    pub fn forget_pack(&mut self, pack: PackId) -> Result<(), StoreError> {
        self.acct.packs.remove(&pack.0);
        self.packs.remove(pack.0)?;
        self.deferred.remove(pack.0)?;
        Ok(())
    }

    /// Add a reference to `id`, recording it at `loc` if it is not in the index yet (or is
    /// lost). Returns its key and whether `loc` was recorded.
    ///
    /// The new entry is written first and the one it replaced, if any, looked at after: a
    /// flush's chunks are nearly all new, and then this is one B-tree operation, not a
    /// lookup and an insert. A chunk stored already (a dedup hit) or a key held by another
    /// chunk gets its entry put back, two operations as before.
    pub fn incref_or_insert(
        &mut self,
        id: &ChunkId,
        loc: &ChunkLoc,
    ) -> Result<Reference, StoreError> {
        let k = ChunkKey::preferred(id);
        let mut l = *loc;
        l.refs = 1;
        let new = IndexEntry { id: *id, loc: l }.encode();
        let replaced: Option<Vec<u8>> = self
            .index
            .insert(k.0, new.as_slice())?
            .map(|v| v.value().to_vec());
        let Some(raw) = replaced else {
            self.record_live(&l);
            return Ok(Reference {
                key: k,
                recorded: true,
            });
        };
        let Some(cur) = IndexEntry::decode(&raw) else {
            self.index.insert(k.0, raw.as_slice())?;
            return Err(StoreError::BadIndex(k));
        };
        if cur.id == *id {
            if !cur.loc.is_lost() {
                let mut c = cur.loc;
                c.refs += 1;
                self.put(k, id, &c)?;
                return Ok(Reference {
                    key: k,
                    recorded: false,
                });
            }
            // A lost chunk stored again: the new record takes over, with every reference
            // the damaged files still hold.
            l.refs = cur.loc.refs + 1;
            self.put(k, id, &l)?;
            self.acct.chunks -= 1;
            self.record_live(&l);
            return Ok(Reference {
                key: k,
                recorded: true,
            });
        }
        // Another chunk holds the preferred key: it keeps it; `id` lives under an alias.
        self.index.insert(k.0, raw.as_slice())?;
        let key = match self.find(id)? {
            Some((a, cur)) if !cur.is_lost() => {
                let mut c = cur;
                c.refs += 1;
                self.put(a, id, &c)?;
                return Ok(Reference {
                    key: a,
                    recorded: false,
                });
            }
            Some((a, cur)) => {
                l.refs = cur.refs + 1;
                self.acct.chunks -= 1;
                a
            }
            None => self.new_alias(id)?,
        };
        self.put(key, id, &l)?;
        self.record_live(&l);
        Ok(Reference {
            key,
            recorded: true,
        })
    }

    /// Take a reference to `id` for a chunk-map slot: recorded at `appended` (the record just
    /// written for it) unless stored already; without a record it must be stored.
    pub fn reference(
        &mut self,
        id: &ChunkId,
        appended: Option<&ChunkLoc>,
    ) -> Result<Reference, StoreError> {
        match appended {
            Some(l) => self.incref_or_insert(id, l),
            None => Ok(Reference {
                key: self.incref_id(id)?,
                recorded: false,
            }),
        }
    }

    /// Record `id` at `loc` as is, references and all, under a new key; counters and pack
    /// accounting are left alone (format conversion, where they are already right).
    pub fn adopt(&mut self, id: &ChunkId, loc: &ChunkLoc) -> Result<ChunkKey, StoreError> {
        if let Some((k, _)) = self.find(id)? {
            return Ok(k);
        }
        let k = self.new_key(id)?;
        self.put(k, id, loc)?;
        Ok(k)
    }

    /// A free key for `id`, which is not in the index: its preferred key, or a new alias.
    fn new_key(&mut self, id: &ChunkId) -> Result<ChunkKey, StoreError> {
        let k = ChunkKey::preferred(id);
        if self.index.get(k.0)?.is_none() {
            return Ok(k);
        }
        self.new_alias(id)
    }

    /// An alias key for `id`, whose preferred key another chunk holds.
    fn new_alias(&mut self, id: &ChunkId) -> Result<ChunkKey, StoreError> {
        let n = self.get_counter(schema::C_NEXT_ALIAS)?;
        self.counters.insert(schema::C_NEXT_ALIAS, n + 1)?;
        let a = ChunkKey::alias(n);
        self.aliases.insert(&id.0, a.0)?;
        tracing::info!(
            "chunk {} shares its key with another chunk; stored under alias {a}",
            id.short()
        );
        Ok(a)
    }

    /// Drop a reference (applied by [`ChunkTables::apply_decrefs`] at the end of the
    /// transaction).
    pub fn decref(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        self.pending.push(key);
        Ok(())
    }

    /// Apply the deferred reference drops; a chunk leaves the index when none are left and its
    /// record becomes dead space in its pack. Must run before the transaction commits.
    pub fn apply_decrefs(&mut self) -> Result<(), StoreError> {
        // In key order: consecutive drops walk the same index pages (see `settle_flushed`).
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_unstable();
        for k in pending {
            self.decref_now(k)?;
        }
        let a = std::mem::take(&mut self.acct);
        for (k, d) in [
            (schema::C_CHUNK_COUNT, a.chunks),
            (schema::C_UNIQUE_BYTES, a.unique),
            (schema::C_STORED_BYTES, a.stored),
        ] {
            if d != 0 {
                bump(&mut self.counters, k, d)?;
            }
        }
        for (p, (dl, dd)) in a.packs {
            let (live, dead) = self.packs.get(p)?.map_or((0, 0), |v| v.value());
            self.packs.insert(
                p,
                (
                    live.saturating_add_signed(dl),
                    dead.saturating_add_signed(dd),
                ),
            )?;
        }
        Ok(())
    }

    /// Drop one reference now. The entry is removed first and put back with one reference
    /// less if others remain: most dropped chunks lose their last reference (a rewritten
    /// chunk of a file), and then this is one B-tree operation, not a lookup and a remove.
    fn decref_now(&mut self, key: ChunkKey) -> Result<(), StoreError> {
        let removed: Option<Vec<u8>> = self.index.remove(key.0)?.map(|v| v.value().to_vec());
        let Some(raw) = removed else {
            // A chunk lost to damage (fsck --repair names its files): dropping a reference to
            // it must not fail, or a damaged file could never be deleted or overwritten.
            tracing::warn!(
                "reference dropped to chunk key {key}, which is not stored (damaged datastore)"
            );
            return Ok(());
        };
        let Some(mut e) = IndexEntry::decode(&raw) else {
            self.index.insert(key.0, raw.as_slice())?;
            return Err(StoreError::BadIndex(key));
        };
        if e.loc.refs > 1 {
            e.loc.refs -= 1;
            return self.put(key, &e.id, &e.loc);
        }
        if key.is_alias() {
            self.aliases.remove(&e.id.0)?;
        }
        let loc = e.loc;
        if !loc.is_lost() {
            let r = record_bytes(&loc) as i64;
            self.acct.pack(loc.pack, -r, r);
            self.died.push(loc);
        }
        self.acct.chunk(&loc, -1);
        self.released.push(e.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::chunk::Codec;

    fn loc(offset: u64) -> ChunkLoc {
        ChunkLoc {
            pack: PackId(1),
            offset,
            stored_len: 10,
            raw_len: 20,
            codec: Codec::Zstd,
            refs: 0,
        }
    }

    /// Two ids with the same preferred key: the second gets an alias, both are found, and
    /// releasing either leaves the other intact (protects dedup and reads against prefix
    /// collisions, which real data essentially never produces).
    #[test]
    fn colliding_prefixes_get_aliases_and_stay_distinct() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let db = redb::Database::create(f.path()).unwrap();
        let a = ChunkId([7; 32]);
        let mut b = a;
        b.0[31] = 8;
        assert_eq!(ChunkKey::preferred(&a), ChunkKey::preferred(&b));
        let w = db.begin_write().unwrap();
        {
            let mut t = ChunkTables::open(&w).unwrap();
            let ka = t.incref_or_insert(&a, &loc(100)).unwrap().key;
            let kb = t.incref_or_insert(&b, &loc(200)).unwrap().key;
            assert_eq!(ka, ChunkKey::preferred(&a));
            assert!(kb.is_alias());
            assert_eq!(t.find(&a).unwrap().unwrap().1.offset, 100);
            assert_eq!(t.find(&b).unwrap().unwrap().1.offset, 200);
            assert_eq!(
                t.incref_or_insert(&b, &loc(300)).unwrap(),
                Reference {
                    key: kb,
                    recorded: false
                }
            );
            // Release a (the holder of the preferred key): b stays findable by its alias.
            t.decref(ka).unwrap();
            t.apply_decrefs().unwrap();
            assert!(t.find(&a).unwrap().is_none());
            assert_eq!(
                t.find(&b).unwrap().unwrap(),
                (
                    kb,
                    ChunkLoc {
                        refs: 2,
                        ..loc(200)
                    }
                )
            );
            // a comes back under its preferred key; b keeps its alias.
            assert_eq!(t.incref_or_insert(&a, &loc(400)).unwrap().key, ka);
            t.decref(kb).unwrap();
            t.decref(kb).unwrap();
            t.apply_decrefs().unwrap();
            assert!(t.find(&b).unwrap().is_none());
            assert!(t.aliases().unwrap().is_empty());
            assert_eq!(t.released, vec![a, b]);
        }
        w.commit().unwrap();
    }

    /// Protects the space accounting of a flush (`settle_flushed`): a record appended for a
    /// chunk another copy of which was recorded first is counted dead (or compaction never
    /// reclaims it), and only the raw records the index points at count as waiting for
    /// compression (or compaction never compresses them), added up per pack.
    #[test]
    fn a_flush_counts_lost_appends_dead_and_raw_records_per_pack() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let db = redb::Database::create(f.path()).unwrap();
        let (a, b, c, d) = (
            ChunkId([1; 32]),
            ChunkId([2; 32]),
            ChunkId([3; 32]),
            ChunkId([4; 32]),
        );
        let w = db.begin_write().unwrap();
        {
            let mut t = ChunkTables::open(&w).unwrap();
            let mut recorded = HashSet::new();
            let mut take = |t: &mut ChunkTables, id: ChunkId, at: u64| {
                if t.incref_or_insert(&id, &loc(at)).unwrap().recorded {
                    recorded.insert(id);
                }
            };
            take(&mut t, a, 100);
            // b was stored at 300 by another writer before this flush's record at 200.
            t.incref_or_insert(&b, &loc(300)).unwrap();
            take(&mut t, b, 200);
            take(&mut t, c, 500);
            take(&mut t, d, 600);
            assert_eq!(recorded, HashSet::from([a, c, d]));
            let dead_before = t.acct.packs.get(&1).map_or(0, |p| p.1);
            let appended =
                HashMap::from([(a, loc(100)), (b, loc(200)), (c, loc(500)), (d, loc(600))]);
            // c was compressed: it waits for nothing.
            let raw = HashSet::from([a, b, d]);
            t.settle_flushed(&appended, &recorded, &raw, &HashSet::new())
                .unwrap();
            let rec = record_bytes(&loc(0));
            assert_eq!(
                t.acct.packs[&1].1 - dead_before,
                rec as i64,
                "b's record is dead"
            );
            let waiting = |t: &ChunkTables| t.deferred.get(1).unwrap().map(|v| v.value());
            assert_eq!(waiting(&t), Some(2 * rec), "a and d wait for compression");
            // A later flush adds to the pack's count.
            let e = ChunkId([5; 32]);
            assert!(t.incref_or_insert(&e, &loc(700)).unwrap().recorded);
            let e1 = HashSet::from([e]);
            t.settle_flushed(&HashMap::from([(e, loc(700))]), &e1, &e1, &HashSet::new())
                .unwrap();
            assert_eq!(waiting(&t), Some(3 * rec));
        }
        w.commit().unwrap();
    }
}
