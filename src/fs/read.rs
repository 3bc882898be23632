//! Reads: file data from the write-back buffer and the store, in one snapshot.

use super::inode::InodeId;
use super::timing::Stage;
use super::{get_inode, tree, Attr, Engine, FsError, FsResult};
use crate::schema::{INODES, NODES};
use crate::store::ChunkKey;

use super::data::require_file;
use super::dirty::Patch;

impl Engine {
    /// Read up to `len` bytes at `offset` (short at end of file).
    pub fn read(&self, ino: InodeId, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        self.read_with_attr(ino, offset, len).map(|r| r.0)
    }

    /// [`Engine::read`], with the file's attributes as of the read (same snapshot): an NFS READ
    /// answers both, and one look at the metadata costs half of two.
    pub fn read_with_attr(&self, ino: InodeId, offset: u64, len: u32) -> FsResult<(Vec<u8>, Attr)> {
        self.timings
            .time(Stage::Read, || self.read_timed(ino, offset, len))
    }

    fn read_timed(&self, ino: InodeId, offset: u64, len: u32) -> FsResult<(Vec<u8>, Attr)> {
        let st = self.files.get(&ino).map(|s| s.clone());
        let g = st.as_ref().map(|s| s.state.read());
        let rtx = self.read_txn()?;
        let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
        require_file(inode.kind)?;
        let attr = self.attr_of(ino, inode.clone(), g.as_deref());
        let size = g.as_ref().and_then(|g| g.size).unwrap_or(inode.size);
        if offset >= size || len == 0 {
            return Ok((Vec::new(), attr));
        }
        let end = (offset + u64::from(len)).min(size);
        let c = self.chunk_size;
        let (first, last) = (offset / c, (end - 1) / c);
        // The part of chunk `idx` this read returns, as a range inside the chunk.
        let part = |idx: u64| {
            let s = offset.max(idx * c);
            let e = end.min((idx + 1) * c);
            (s - idx * c) as usize..(e - idx * c) as usize
        };
        // Where each chunk of the range comes from. Unflushed chunks are copied (their part
        // only) while the state lock is held; chunks in flight are shared, not copied. A part
        // that unflushed chunks written in part do not cover comes from the chunk under them
        // (in flight, stored or a hole) with their written bytes put over it (`Patch`es,
        // newest first).
        enum Src {
            Mem(Vec<u8>),
            Inflight,
            Stored(Vec<Patch>),
            Hole(Vec<Patch>),
        }
        let mem = g.as_deref();
        let inflight = mem.and_then(|m| m.inflight.clone());
        let nodes = rtx.open_table(NODES)?;
        let mut srcs: Vec<Src> = (first..=last)
            .map(|idx| {
                let p = part(idx);
                let dirty = mem.and_then(|m| m.dirty.get(&idx));
                let flying = inflight.as_ref().and_then(|f| f.get(&idx));
                let mut patches = Vec::new();
                for (layer, is_dirty) in [(dirty, true), (flying, false)] {
                    let Some(d) = layer else { continue };
                    if d.covers(&p) {
                        if !is_dirty && patches.is_empty() {
                            return Src::Inflight;
                        }
                        let mut v = d.slice(p.clone()).to_vec();
                        for pt in patches.iter().rev() {
                            Patch::apply(pt, &mut v);
                        }
                        return Src::Mem(v);
                    }
                    patches.push(d.patch(p.clone()));
                }
                Src::Hole(patches)
            })
            .collect();
        let mut keys: Vec<ChunkKey> = Vec::new();
        for (idx, key) in tree::collect(&nodes, inode.root, first, last + 1)? {
            let slot = idx
                .checked_sub(first)
                .and_then(|i| srcs.get_mut(i as usize));
            if let Some(s @ Src::Hole(_)) = slot {
                let Src::Hole(patches) = std::mem::replace(s, Src::Inflight) else {
                    unreachable!("matched above")
                };
                *s = Src::Stored(patches);
                keys.push(key);
            }
        }
        // The stored chunks are read from the snapshot, taken under the state lock, so the
        // read is of the file as it was when the lock was held; releasing the lock first lets
        // writers of the file go on while this read waits for the disk and decompresses.
        drop(g);
        // In key order, which is file order: the loop below takes them one by one.
        let mut chunks = self.store.read_many(&rtx, &keys).into_iter();
        // Assembled in file order, each byte written once: zero-filling a 1 MiB reply first
        // and copying chunks over it cost a twentieth of a sequential read's CPU (perf).
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (idx, src) in (first..=last).zip(&srcs) {
            match src {
                Src::Mem(b) => out.extend_from_slice(b),
                Src::Inflight => {
                    let f = inflight.as_ref().expect("seen above");
                    out.extend_from_slice(f[&idx].slice(part(idx)));
                }
                Src::Stored(patches) => match chunks.next().expect("one result per key") {
                    Ok(data) => {
                        let at = out.len();
                        out.extend_from_slice(&data[part(idx)]);
                        for pt in patches.iter().rev() {
                            pt.apply(&mut out[at..]);
                        }
                    }
                    Err(e) => {
                        let e = FsError::from(e).at(ino.0, idx * c);
                        tracing::error!(file = %self.path_of(ino), offset = idx * c, "read failed: {e}");
                        return Err(e);
                    }
                },
                Src::Hole(patches) => {
                    let at = out.len();
                    out.resize(at + part(idx).len(), 0);
                    for pt in patches.iter().rev() {
                        pt.apply(&mut out[at..]);
                    }
                }
            }
        }
        Ok((out, attr))
    }
}
