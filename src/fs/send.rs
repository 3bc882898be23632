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

use serde::{Deserialize, Serialize};

use super::inode::{Inode, InodeId, Kind};
use super::stream::{self, Entry, Header, Kind as FrameKind, Writer};
use super::tree::{self, Root};
use super::{get_inode, Engine, FsError, FsResult};
use crate::schema::{DIRCOOKIE, DIRENTS, INODES, NODES, SYMLINKS, XATTRS};
use crate::store::{ChunkKey, Encoded};

/// What a send wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    pub entries: u64,
    pub chunks: u64,
    /// Chunk payload bytes as stored (compressed).
    pub chunk_bytes: u64,
    /// Whole stream, framing included.
    pub stream_bytes: u64,
    /// Map slots sent (changed slots, for an incremental send).
    pub slots: u64,
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

impl Engine {
    /// Write snapshot `snap` of `path` to `out` as a stream; with `from`, only what changed
    /// since the older snapshot `from` of the same path. `progress(entries done, entries)`.
    pub fn send(
        &self,
        path: &str,
        snap: &str,
        from: Option<&str>,
        out: &mut dyn Write,
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
        let mut have: HashSet<ChunkKey> = HashSet::new();
        if let Some(b) = base {
            for (p, _, i) in walk(&rtx, b)? {
                if i.kind == Kind::File {
                    for (_, k) in tree::collect(&nodes, i.root, 0, slots_of(i.size, c))? {
                        have.insert(k);
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
        let mut batch: Vec<Encoded> = Vec::new();
        let mut batch_bytes = 0usize;
        for (n, (path, ino, i)) in entries.into_iter().enumerate() {
            let mut slots: Vec<(u64, Option<ChunkKey>)> = Vec::new();
            let mut on_base = false;
            if i.kind == Kind::File {
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
            // The chunks these slots need first, as stored, each once.
            let mut ids = Vec::with_capacity(slots.len());
            for (s, k) in &slots {
                let Some(k) = k else {
                    ids.push((*s, None));
                    continue;
                };
                let e = self
                    .store
                    .entry(&rtx, *k)?
                    .ok_or_else(|| FsError::BadMeta(format!("chunk key {k} not indexed")))?;
                ids.push((*s, Some(e.id)));
                if have.insert(*k) {
                    let enc = self
                        .store
                        .read_stored(&rtx, *k)
                        .map_err(|err| FsError::from(err).at(ino.0, s * c))?;
                    rep.chunks += 1;
                    rep.chunk_bytes += enc.payload.len() as u64;
                    batch_bytes += 41 + enc.payload.len();
                    batch.push(enc);
                    if batch_bytes >= stream::FRAME_TARGET {
                        w.chunks(&batch)?;
                        batch.clear();
                        batch_bytes = 0;
                    }
                }
            }
            if !batch.is_empty() {
                w.chunks(&batch)?;
                batch.clear();
                batch_bytes = 0;
            }
            let symlink = match i.kind {
                Kind::Symlink => symlinks.get(ino.0)?.map(|v| v.value().to_vec()),
                _ => None,
            };
            let xs = xattrs
                .range((ino.0, [].as_slice())..(ino.0 + 1, [].as_slice()))?
                .map(|r| r.map(|(k, v)| (k.value().1.to_vec(), v.value().to_vec())))
                .collect::<Result<Vec<_>, _>>()?;
            w.json(
                FrameKind::Entry,
                &Entry {
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
                },
            )?;
            for part in ids.chunks(stream::MAP_SLOTS_PER_FRAME) {
                w.map(part)?;
            }
            rep.slots += ids.len() as u64;
            rep.entries += 1;
            progress(n as u64 + 1, total);
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
