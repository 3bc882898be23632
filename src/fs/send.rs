//! `tessera send`: a snapshot, or the changes between two snapshots of one path, as a stream
//! (`stream.rs`) for `tessera receive` on another datastore.
//!
//! Full: every entry of the snapshot's tree, every chunk its files use, once. Incremental
//! (`from`): every entry (entries are small, and listing all of them tells the receiver what
//! was deleted), but for a file present in both snapshots only the slots whose chunk differs,
//! and only chunks the older snapshot does not hold: what changed since, as stored.
//! Everything is read in one read transaction, so the stream is one point in time and the
//! packs it reads cannot be deleted under it by compaction.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::inode::{Inode, InodeId, Kind};
use super::stream::{self, Entry, Header, Kind as FrameKind, Writer};
use super::tree::{self, Root};
use super::{get_inode, Engine, FsError, FsResult};
use crate::schema::{DIRCOOKIE, DIRENTS, INODES, NODES, SYMLINKS, XATTRS};
use crate::store::chunk::ChunkId;
use crate::store::{ChunkKey, Encoded, IndexEntry};

/// What a send wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    pub entries: u64,
    pub chunks: u64,
    /// Chunk payload bytes sent: compressed (records stored uncompressed are compressed on
    /// the way, `Encoded::compressed`).
    pub chunk_bytes: u64,
    /// Whole stream, framing included.
    pub stream_bytes: u64,
    /// Map slots sent (changed slots, for an incremental send).
    pub slots: u64,
    /// Chunks not sent because the receiver said it held them (network replication).
    pub chunks_held_by_receiver: u64,
}

/// The tree under `top`, parents before children: (relative path, inode number, inode).
fn walk(rtx: &redb::ReadTransaction, top: InodeId) -> FsResult<Vec<(Vec<u8>, InodeId, Inode)>> {
    let inodes = rtx.open_table(INODES)?;
    let dirents = rtx.open_table(DIRENTS)?;
    let cookies = rtx.open_table(DIRCOOKIE)?;
    let mut out = Vec::new();
    let mut stack = vec![(Vec::new(), top)];
    while let Some((path, ino)) = stack.pop() {
        let i = get_inode(&inodes, ino)?;
        let is_dir = i.kind == Kind::Dir;
        out.push((path.clone(), ino, i));
        if is_dir {
            let mut kids = Vec::new();
            for r in cookies.range((ino.0, 0)..(ino.0 + 1, 0))? {
                let (_, name) = r?;
                let name = name.value().to_vec();
                if let Some(e) = dirents.get((ino.0, name.as_slice()))? {
                    let mut p = path.clone();
                    if !p.is_empty() {
                        p.push(b'/');
                    }
                    p.extend_from_slice(&name);
                    kids.push((p, InodeId(e.value().0)));
                }
            }
            // Popped in readdir order.
            stack.extend(kids.into_iter().rev());
        }
    }
    Ok(out)
}

fn slots_of(size: u64, c: u64) -> u64 {
    size.div_ceil(c)
}

/// Asks the receiver which of some chunks it holds already (network replication: the
/// receiver answers a `Have` frame, and holds those it has for the rest of the session).
pub type AskHave<'a> = &'a mut dyn FnMut(usize) -> FsResult<Vec<bool>>;

/// Entries prepared for sending, their chunks not yet decided.
struct Pending {
    entry: Entry,
    ino: InodeId,
    /// (slot, chunk key) to send; `None` is a hole.
    slots: Vec<(u64, Option<ChunkKey>)>,
}

/// Frames of chunks read ahead of the one being written (4 MiB each at most): the disk is
/// read while the network (or pipe) is busy.
const READ_AHEAD: usize = 4;

/// Entries per batch, and chunk candidates per batch: one `Have` round trip per batch.
const BATCH_ENTRIES: usize = 1024;
const BATCH_CHUNKS: usize = 65_536;

impl Engine {
    /// Write snapshot `snap` of `path` to `out` as a stream; with `from`, only what changed
    /// since the older snapshot `from` of the same path. With `ask`, chunks the receiver says
    /// it holds are not sent. `progress(entries done, entries)`.
    pub fn send(
        &self,
        path: &str,
        snap: &str,
        from: Option<&str>,
        out: &mut dyn Write,
        ask: Option<AskHave<'_>>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<SendReport> {
        let list = self.snapshot_list(Some(path))?;
        let find = |n: &str| {
            list.iter()
                .find(|s| s.name == n)
                .cloned()
                .ok_or(FsError::NotFound)
        };
        let new = find(snap)?;
        let old = from.map(find).transpose()?;
        if old.as_ref().is_some_and(|o| o.created > new.created) {
            return Err(FsError::Invalid("--from must name an older snapshot"));
        }
        let top = self.resolve(new.location.as_bytes())?;
        let base = old
            .as_ref()
            .map(|o| self.resolve(o.location.as_bytes()))
            .transpose()?;
        let rtx = self.read_txn()?;
        let nodes = rtx.open_table(NODES)?;
        let symlinks = rtx.open_table(SYMLINKS)?;
        let xattrs = rtx.open_table(XATTRS)?;
        let c = self.chunk_size;

        // The base snapshot: its files' roots by path, and every chunk it holds (the receiver
        // holds them too).
        let mut base_files: HashMap<Vec<u8>, (Root, u64)> = HashMap::new();
        let mut sent: HashSet<ChunkKey> = HashSet::new();
        if let Some(b) = base {
            for (p, _, i) in walk(&rtx, b)? {
                if i.kind == Kind::File {
                    for (_, k) in tree::collect(&nodes, i.root, 0, slots_of(i.size, c))? {
                        sent.insert(k);
                    }
                    base_files.insert(p, (i.root, i.size));
                }
            }
        }
        let entries = walk(&rtx, top)?;
        let total = entries.len() as u64;
        let mut w = Writer::new(out)?;
        w.json(
            FrameKind::Header,
            &Header {
                source: self.id(),
                chunk_size: c,
                path: new.path.clone(),
                snap: new.name.clone(),
                created: new.created,
                from: old.as_ref().map(|o| (o.name.clone(), o.created)),
            },
        )?;
        let mut rep = SendReport::default();
        // Files sent in this stream by chunk-map root: a clone of one of them is sent as a
        // reference to it, not as a map.
        let mut by_root: HashMap<Root, Vec<u8>> = HashMap::new();
        let mut ask = ask;
        let asking = ask.is_some();
        // The batch whose `Have` is out and whose chunks go next: the next batch's question is
        // sent before it, so the receiver answers while this batch crosses and the sender
        // never waits for a drained pipe (the answer comes before this batch in the stream).
        let mut prev: Option<Prepared> = None;
        let mut batch: Vec<Pending> = Vec::new();
        let mut candidates = 0usize;
        let n_entries = entries.len();
        for (n, (path, ino, i)) in entries.into_iter().enumerate() {
            let mut slots: Vec<(u64, Option<ChunkKey>)> = Vec::new();
            let mut on_base = false;
            let same_as = (i.kind == Kind::File && !i.root.node.is_none())
                .then(|| by_root.get(&i.root).cloned())
                .flatten();
            if i.kind == Kind::File && !i.root.node.is_none() && same_as.is_none() {
                by_root.insert(i.root, path.clone());
            }
            if i.kind == Kind::File && same_as.is_none() {
                let n_slots = slots_of(i.size, c);
                match base_files.get(&path) {
                    Some(&(broot, bsize)) => {
                        on_base = true;
                        if broot != i.root || bsize != i.size {
                            let a = tree::collect(&nodes, broot, 0, slots_of(bsize, c))?;
                            let b = tree::collect(&nodes, i.root, 0, n_slots)?;
                            slots = diff(&a, &b, n_slots);
                        }
                    }
                    None => {
                        slots = tree::collect(&nodes, i.root, 0, n_slots)?
                            .into_iter()
                            .map(|(s, k)| (s, Some(k)))
                            .collect();
                    }
                }
            }
            candidates += slots.len();
            let symlink = match i.kind {
                Kind::Symlink => symlinks.get(ino.0)?.map(|v| v.value().to_vec()),
                _ => None,
            };
            let xs = xattrs
                .range((ino.0, [].as_slice())..(ino.0 + 1, [].as_slice()))?
                .map(|r| r.map(|(k, v)| (k.value().1.to_vec(), v.value().to_vec())))
                .collect::<Result<Vec<_>, _>>()?;
            batch.push(Pending {
                entry: Entry {
                    path,
                    kind: i.kind as u8,
                    perm: i.perm,
                    uid: i.uid,
                    gid: i.gid,
                    rdev: i.rdev,
                    size: i.size,
                    atime: (i.atime.secs, i.atime.nsecs),
                    mtime: (i.mtime.secs, i.mtime.nsecs),
                    symlink,
                    xattrs: xs,
                    on_base,
                    same_as,
                },
                ino,
                slots,
            });
            if batch.len() >= BATCH_ENTRIES || candidates >= BATCH_CHUNKS || n + 1 == n_entries {
                let p = self.prepare_batch(
                    &rtx,
                    &mut w,
                    std::mem::take(&mut batch),
                    &mut sent,
                    asking,
                )?;
                if let Some(prev) = prev.replace(p) {
                    self.send_batch(&mut w, prev, ask.as_deref_mut(), &mut rep)?;
                }
                candidates = 0;
                progress(n as u64 + 1, total);
            }
        }
        if let Some(prev) = prev.take() {
            self.send_batch(&mut w, prev, ask, &mut rep)?;
        }
        w.json(
            FrameKind::End,
            &stream::End {
                entries: rep.entries,
                chunks: rep.chunks,
                chunk_bytes: rep.chunk_bytes,
            },
        )?;
        w.flush()?;
        rep.stream_bytes = w.bytes;
        Ok(rep)
    }

    /// Look up a batch's chunks and pick those not known to be on the other side yet (not
    /// sent before, not in the base); with `asking`, ask the receiver which of those it holds.
    fn prepare_batch(
        &self,
        rtx: &redb::ReadTransaction,
        w: &mut Writer<&mut dyn Write>,
        batch: Vec<Pending>,
        sent: &mut HashSet<ChunkKey>,
        asking: bool,
    ) -> FsResult<Prepared> {
        let mut keys: Vec<ChunkKey> = batch
            .iter()
            .flat_map(|p| p.slots.iter().filter_map(|(_, k)| *k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let entries = self.store.entries_many(rtx, &keys)?;
        let mut ids: HashMap<ChunkKey, IndexEntry> = HashMap::with_capacity(keys.len());
        for (k, e) in keys.into_iter().zip(entries) {
            let e = e.ok_or_else(|| FsError::BadMeta(format!("chunk key {k} not indexed")))?;
            ids.insert(k, e);
        }
        let mut todo: Vec<(ChunkKey, InodeId, u64)> = Vec::new();
        for p in &batch {
            for (s, k) in &p.slots {
                if let Some(k) = k {
                    if sent.insert(*k) {
                        todo.push((*k, p.ino, *s));
                    }
                }
            }
        }
        let asked = asking && !todo.is_empty();
        if asked {
            let q: Vec<ChunkId> = todo.iter().map(|t| ids[&t.0].id).collect();
            w.have(&q)?;
            w.flush()?;
        }
        Ok(Prepared {
            batch,
            ids,
            todo,
            asked,
        })
    }

    /// Send a prepared batch: the chunks it needs first (less those the receiver said it
    /// holds), read in pack order on a helper thread while the previous frame is written, then
    /// each entry and its maps.
    fn send_batch(
        &self,
        w: &mut Writer<&mut dyn Write>,
        p: Prepared,
        ask: Option<&mut (dyn FnMut(usize) -> FsResult<Vec<bool>> + '_)>,
        rep: &mut SendReport,
    ) -> FsResult<()> {
        let c = self.chunk_size;
        let Prepared {
            batch,
            ids,
            mut todo,
            asked,
        } = p;
        if asked {
            let ask =
                ask.ok_or_else(|| FsError::Stream("a chunk query without a receiver".into()))?;
            let held = ask(todo.len())?;
            if held.len() != todo.len() {
                return Err(FsError::Stream(
                    "the receiver answered for other chunks".into(),
                ));
            }
            rep.chunks_held_by_receiver += held.iter().filter(|h| **h).count() as u64;
            todo = todo
                .into_iter()
                .zip(held)
                .filter(|(_, h)| !h)
                .map(|(t, _)| t)
                .collect();
        }
        // In pack order (sequential reads), in frames of about FRAME_TARGET bytes.
        todo.sort_by_key(|t| {
            let l = ids[&t.0].loc;
            (l.pack, l.offset)
        });
        let mut groups: Vec<&[(ChunkKey, InodeId, u64)]> = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (i, t) in todo.iter().enumerate() {
            bytes += 41 + ids[&t.0].loc.stored_len as usize;
            if bytes >= stream::FRAME_TARGET || i + 1 == todo.len() {
                groups.push(&todo[start..=i]);
                start = i + 1;
                bytes = 0;
            }
        }
        std::thread::scope(|scope| -> FsResult<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<FsResult<Vec<Encoded>>>(READ_AHEAD);
            let ids = &ids;
            scope.spawn(move || {
                let mut buf = Vec::new();
                for g in groups {
                    let want: Vec<IndexEntry> = g.iter().map(|t| ids[&t.0]).collect();
                    let level = self.store.zstd_level();
                    let frame = self
                        .store
                        .read_stored_many(&want, &mut buf)
                        .into_par_iter()
                        .zip(g)
                        .map(|(r, (_, ino, s))| {
                            r.map(|e| e.compressed(level))
                                .map_err(|e| FsError::from(e).at(ino.0, s * c))
                        })
                        .collect::<FsResult<Vec<Encoded>>>();
                    let stop = frame.is_err();
                    if tx.send(frame).is_err() || stop {
                        return;
                    }
                }
            });
            // Leaving early (an error) drops `rx`, which ends the reader.
            for frame in rx {
                let frame = frame?;
                rep.chunks += frame.len() as u64;
                rep.chunk_bytes += frame.iter().map(|e| e.payload.len() as u64).sum::<u64>();
                w.chunks(&frame)?;
            }
            Ok(())
        })?;
        for p in batch {
            w.json(FrameKind::Entry, &p.entry)?;
            let slots: Vec<(u64, Option<ChunkId>)> = p
                .slots
                .iter()
                .map(|(s, k)| (*s, k.map(|k| ids[&k].id)))
                .collect();
            for part in slots.chunks(stream::MAP_SLOTS_PER_FRAME) {
                w.map(part)?;
            }
            rep.slots += slots.len() as u64;
            rep.entries += 1;
        }
        Ok(())
    }
}

/// A batch looked up, its `Have` sent if asking.
struct Prepared {
    batch: Vec<Pending>,
    /// Index entry of every chunk key its slots use.
    ids: HashMap<ChunkKey, IndexEntry>,
    /// Chunks to send unless the receiver holds them: (key, file, slot) of first use.
    todo: Vec<(ChunkKey, InodeId, u64)>,
    asked: bool,
}

/// Slots of `b` (new) that differ from `a` (old), both sorted present-slot lists; a slot
/// present in `a` but not in `b` (below `n_slots`) becomes a hole.
fn diff(
    a: &[(u64, ChunkKey)],
    b: &[(u64, ChunkKey)],
    n_slots: u64,
) -> Vec<(u64, Option<ChunkKey>)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                if x.1 != y.1 {
                    out.push((y.0, Some(y.1)));
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                if x.0 < n_slots {
                    out.push((x.0, None));
                }
                i += 1;
            }
            (Some(_), Some(y)) => {
                out.push((y.0, Some(y.1)));
                j += 1;
            }
            (Some(x), None) => {
                if x.0 < n_slots {
                    out.push((x.0, None));
                }
                i += 1;
            }
            (None, Some(y)) => {
                out.push((y.0, Some(y.1)));
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    out
}
