//! Pack lifetime as seen from outside the store: how full of live records each pack is, which
//! pack files exist, and the mechanics of compaction (copying a pack's live records out,
//! pointing the index at the copies, deleting the pack). The policy (which packs, when, how
//! fast) is the engine's (`fs/gc.rs`); everything about pack files and records is here.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;
use redb::{ReadTransaction, ReadableTable};

use super::chunk::ChunkId;
use super::index::{find_in, record_bytes, ChunkTables};
use super::pack::{PackId, PACK_HEADER_LEN};
use super::{ChunkKey, ChunkLoc, Encoded, IndexEntry, Store, StoreError};
use crate::schema;

/// Records copied per append (4096 x 16 KiB chunks: at most 64 MiB in memory).
const COPY_GROUP: usize = 4096;

/// What a pack holds, by the index's accounting (bytes of pack file: headers included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackUse {
    pub live: u64,
    pub dead: u64,
    /// Live records stored uncompressed on the write path, waiting for compaction to compress
    /// them (`Encoded::uncompressed`).
    pub deferred: u64,
}

impl PackUse {
    /// The live share of the pack's record bytes (1 for an empty pack).
    pub fn live_share(&self) -> f64 {
        if self.live + self.dead == 0 {
            1.0
        } else {
            self.live as f64 / (self.live + self.dead) as f64
        }
    }
}

/// The copies of one pack's live records.
#[derive(Debug, Default)]
pub struct Copied {
    /// Where each record went, in the order given.
    pub locs: Vec<ChunkLoc>,
    /// Record bytes written (headers included).
    pub bytes: u64,
    /// Records stored raw that the copy compressed.
    pub compressed: u64,
}

impl Store {
    /// The accounting of every pack that has any (read snapshot).
    pub fn pack_use(&self, rtx: &ReadTransaction) -> Result<BTreeMap<PackId, PackUse>, StoreError> {
        let mut out: BTreeMap<PackId, PackUse> = BTreeMap::new();
        for e in rtx.open_table(schema::PACKS)?.iter()? {
            let (k, v) = e?;
            let (live, dead) = v.value();
            out.insert(
                PackId(k.value()),
                PackUse {
                    live,
                    dead,
                    deferred: 0,
                },
            );
        }
        // Absent in a datastore that never deferred a compression.
        match rtx.open_table(schema::PACK_DEFERRED) {
            Ok(t) => {
                for e in t.iter()? {
                    let (k, v) = e?;
                    out.entry(PackId(k.value())).or_default().deferred = v.value();
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// Packs that exist (files, or objects in a tier's bucket) but hold nothing the metadata
    /// accounts for, before the active pack: a pack compacted away whose removal a kill -9
    /// interrupted (an object's delete waits for a metadata backup, and that wait is not
    /// durable), or one whose appends were never committed. Nothing references them; the
    /// next compaction removes them. With their lengths in bytes, given `uses` from
    /// [`Store::pack_use`] of the same snapshot.
    pub fn unaccounted_packs(
        &self,
        uses: &BTreeMap<PackId, PackUse>,
    ) -> Result<Vec<(PackId, u64)>, StoreError> {
        let active = self.active_pack();
        Ok(self
            .pack_files()?
            .into_iter()
            .filter(|(p, _)| active.is_none_or(|a| *p < a) && !uses.contains_key(p))
            .collect())
    }

    /// Every pack file and its length in bytes, in pack order.
    pub fn pack_files(&self) -> Result<Vec<(PackId, u64)>, StoreError> {
        Ok(self
            .io
            .list()?
            .into_iter()
            .map(|p| (p, self.io.len(p).unwrap_or(0)))
            .collect())
    }

    /// Intact records the index does not know, in packs other than the one being appended
    /// to whose accounting leaves bytes unexplained: appended for commits that a kill -9 took
    /// away (the appends were in the page cache; the commits were not durable yet). In pack
    /// order. Reads (and verifies) only such packs, none after a clean shutdown.
    pub fn orphan_records(
        &self,
        rtx: &ReadTransaction,
    ) -> Result<Vec<(ChunkId, ChunkLoc)>, StoreError> {
        let uses = self.pack_use(rtx)?;
        let active = self.active_pack();
        let index = rtx.open_table(schema::CHUNKS)?;
        let aliases = rtx.open_table(schema::CHUNK_ALIASES)?;
        let mut out = Vec::new();
        for (pack, len) in self.pack_files()? {
            let u = uses.get(&pack).copied().unwrap_or_default();
            if Some(pack) == active || len <= PACK_HEADER_LEN + u.live + u.dead {
                continue;
            }
            let mut found = HashMap::new();
            self.scan_pack(pack, &mut found)?;
            for (id, loc) in found {
                if find_in(&index, &aliases, &id)?.is_none() {
                    out.push((id, loc));
                }
            }
        }
        out.sort_by_key(|(_, l)| (l.pack, l.offset));
        Ok(out)
    }

    /// The live records of `pack` copied to the active pack (synced with the next durable
    /// commit, as every append); with `compress`, records stored raw are compressed on the way.
    /// `copied(bytes)` after each group, for pacing. A damaged record stops the copy: the
    /// error, and the copies made so far (referenced by nothing: count them dead).
    pub fn copy_records(
        &self,
        records: &[(ChunkKey, IndexEntry)],
        compress: bool,
        copied: &mut dyn FnMut(u64),
    ) -> Result<Copied, (StoreError, Vec<ChunkLoc>)> {
        let mut out = Copied::default();
        for group in records.chunks(COPY_GROUP) {
            // Read, checked and compressed on all cores (zstd is most of a run that compresses
            // a copy stored uncompressed); appended in order, one thread.
            let read: Vec<Result<Encoded, StoreError>> = group
                .par_iter()
                .map(|(_, e)| self.read_record_for_copy(&e.id, &e.loc, compress))
                .collect();
            let mut copies: Vec<Encoded> = Vec::with_capacity(group.len());
            for ((_, e), r) in group.iter().zip(read) {
                match r {
                    Ok(c) => {
                        if c.codec != e.loc.codec {
                            out.compressed += 1;
                        }
                        copies.push(c);
                    }
                    Err(err) => return Err((err, out.locs)),
                }
            }
            let locs = match self.append_many(&copies) {
                Ok(l) => l,
                Err(err) => return Err((err, out.locs)),
            };
            let bytes: u64 = locs.iter().map(record_bytes).sum();
            out.bytes += bytes;
            out.locs.extend(locs);
            copied(bytes);
        }
        Ok(out)
    }
}

impl ChunkTables<'_> {
    /// Point the index at the copies (`locs`, in the order of `records`) of `pack`'s live
    /// records and drop the pack's accounting: the pack holds nothing live any more and can be
    /// retired once this commits. A record released or stored again since it was read leaves
    /// its copy as dead space.
    pub fn switch_to_copies(
        &mut self,
        pack: PackId,
        records: &[(ChunkKey, IndexEntry)],
        locs: &[ChunkLoc],
    ) -> Result<(), StoreError> {
        for ((key, old), new) in records.iter().zip(locs) {
            match self.entry(*key)? {
                Some(cur)
                    if cur.id == old.id
                        && cur.loc.pack == pack
                        && cur.loc.offset == old.loc.offset =>
                {
                    self.relocate(*key, new)?
                }
                _ => self.add_dead(new)?,
            }
        }
        self.forget_pack(pack)
    }
}
