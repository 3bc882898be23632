//! Size and extent operations: setattr (truncate and extend), fallocate (punch, zero), and
//! SEEK_DATA / SEEK_HOLE.

use super::inode::{Inode, InodeId, Time};
use super::{get_inode, tree, Attr, Engine, FsError, FsResult, MAX_FILE_SIZE};
use crate::schema::{INODES, NODES};
use crate::store::chunk::{is_zero, ChunkId};
use crate::store::Encoded;
use std::sync::atomic::Ordering;

use super::data::{require_writable, Falloc, FileState, SetAttr, SetTime};

impl Engine {
    /// Change attributes (a size change truncates or extends with a hole).
    pub fn setattr(&self, ino: InodeId, s: &SetAttr) -> FsResult<Attr> {
        if s.size.is_some_and(|sz| sz > MAX_FILE_SIZE) {
            return Err(FsError::TooBig);
        }
        let st = match self.files.get(&ino).map(|x| x.clone()) {
            Some(st) => Some(st),
            None if s.size.is_some() => Some(self.entry(ino)),
            None => None,
        };
        let _f = st.as_ref().map(|s| s.flush.lock());
        let mut g = st.as_ref().map(|s| s.state.write());
        if let Some(g) = g.as_deref_mut() {
            self.flush_locked(ino, g, false, None)?;
        }
        let c = self.chunk_size;
        // Truncating inside a chunk: that chunk's tail past the new size must read as zeros.
        let mut tail: Option<(u64, Option<ChunkId>, Option<Encoded>)> = None;
        if let Some(sz) = s.size {
            let rtx = self.read_txn()?;
            let inode = get_inode(&rtx.open_table(INODES)?, ino)?;
            require_writable(&inode)?;
            if sz < inode.size && sz % c != 0 {
                let idx = sz / c;
                if let Some(id) = tree::get(&rtx.open_table(NODES)?, inode.root, idx)? {
                    let mut data = self
                        .store
                        .read(&rtx, id)
                        .map_err(|e| FsError::from(e).at(ino.0, idx * c))?
                        .to_vec();
                    data[(sz % c) as usize..].fill(0);
                    tail = Some(if is_zero(&data) {
                        (idx, None, None)
                    } else {
                        let nid = ChunkId::of(&data);
                        (
                            idx,
                            Some(nid),
                            Some(Encoded::new(nid, &data, self.store.zstd_level())),
                        )
                    });
                }
            }
        }
        // The tail chunk may be appended inside the transaction (see `Store::append_session`).
        let _appending = tail.is_some().then(|| self.store.append_session());
        let inode = self.meta_txn(|w| {
            let mut i = w.inode(ino)?;
            let now = Time::now();
            let mut changed = false;
            if let Some(m) = s.mode {
                i.perm = (m & 0o7777) as u16;
                changed = true;
            }
            if let Some(u) = s.uid {
                i.uid = u;
                changed = true;
            }
            if let Some(gid) = s.gid {
                i.gid = gid;
                changed = true;
            }
            if let Some(sz) = s.size {
                if let Some((idx, id, enc)) = &tail {
                    let mut appended = None;
                    if let Some(e) = enc {
                        if w.chunks.find(&e.id)?.is_none_or(|(_, l)| l.is_lost()) {
                            appended = Some(self.store.append(e)?);
                        }
                    }
                    let key = match id {
                        Some(id) => Some(w.chunks.reference(id, appended.as_ref())?.key),
                        None => None,
                    };
                    let (r, t) = w.tree().set(i.root, &[(*idx, key)])?;
                    i.root = r;
                    i.aux = t;
                }
                if sz < i.size {
                    let (r, t) = w.tree().truncate(i.root, sz.div_ceil(c))?;
                    i.root = r;
                    i.aux = t;
                }
                if sz != i.size {
                    i.mtime = now;
                }
                i.size = sz;
                changed = true;
            }
            match s.atime {
                Some(SetTime::Now) => i.atime = now,
                Some(SetTime::At(t)) => i.atime = t,
                None => {}
            }
            match s.mtime {
                Some(SetTime::Now) => i.mtime = now,
                Some(SetTime::At(t)) => i.mtime = t,
                None => {}
            }
            changed |= s.atime.is_some() || s.mtime.is_some();
            if let Some(t) = s.ctime {
                i.ctime = t;
            } else if changed {
                i.ctime = now;
            }
            w.put_inode(ino, &i)?;
            Ok(i)
        })?;
        Ok(self.attr_of(ino, inode, g.as_deref()))
    }

    /// Punch holes, zero ranges or extend (see [`Falloc`]).
    pub fn fallocate(&self, ino: InodeId, offset: u64, len: u64, mode: Falloc) -> FsResult<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::TooBig)?;
        if len == 0 {
            return Err(FsError::Invalid("fallocate of zero bytes"));
        }
        let st = self.entry(ino);
        let _f = st.flush.lock();
        let mut g = st.state.write();
        let inode = self.getattr_locked(ino, &g)?;
        require_writable(&inode)?;
        let (keep_size, zero) = match mode {
            Falloc::Allocate { keep_size } => (keep_size, false),
            Falloc::PunchHole => (true, true),
            Falloc::ZeroRange { keep_size } => (keep_size, true),
        };
        if zero && offset < inode.size {
            let zend = end.min(inode.size);
            let c = self.chunk_size;
            // Whole chunks inside the range become one hole range in the chunk map (memory
            // and work independent of the range's length: a 1 PiB punch costs what a 1 MiB
            // one does); the partial chunks at its edges are zeroed in place.
            let (first_whole, end_whole) = (offset.div_ceil(c), zend / c);
            if first_whole < end_whole {
                let gone: Vec<u64> = g
                    .dirty
                    .range(first_whole..end_whole)
                    .map(|(&k, _)| k)
                    .collect();
                for k in gone {
                    g.dirty.remove(&k);
                    self.dirty_bytes.fetch_sub(c, Ordering::Relaxed);
                }
                let head = (offset, (first_whole * c).min(zend));
                let tail = ((end_whole * c).max(offset), zend);
                for (s, e) in [head, tail] {
                    if s < e {
                        self.write_locked(ino, &mut g, s, &vec![0u8; (e - s) as usize])?;
                    }
                }
            } else {
                // Inside one chunk or across one chunk boundary: at most two partial chunks.
                self.write_locked(ino, &mut g, offset, &vec![0u8; (zend - offset) as usize])?;
            }
            // Zeroing must not move the size or times beyond what the caller asked.
            g.size = Some(inode.size);
            g.mtime = Some(Time::now());
            let holes = (first_whole < end_whole).then_some(first_whole..end_whole);
            self.flush_locked(ino, &mut g, false, holes)?;
        }
        if !keep_size && end > inode.size {
            g.size = Some(end);
            g.mtime = Some(Time::now());
        }
        Ok(())
    }

    fn getattr_locked(&self, ino: InodeId, g: &FileState) -> FsResult<Inode> {
        let rtx = self.read_txn()?;
        let mut i = get_inode(&rtx.open_table(INODES)?, ino)?;
        g.overlay(&mut i);
        Ok(i)
    }

    /// `lseek` with SEEK_DATA (`data`) or SEEK_HOLE: the next offset `>= offset` in data or in
    /// a hole; `None` (ENXIO) at or past the end of the file.
    pub fn seek(&self, ino: InodeId, offset: u64, data: bool) -> FsResult<Option<u64>> {
        let st = self.files.get(&ino).map(|s| s.clone());
        let g = st.as_ref().map(|s| s.state.read());
        let rtx = self.read_txn()?;
        let mut inode = get_inode(&rtx.open_table(INODES)?, ino)?;
        if let Some(g) = g.as_deref() {
            g.overlay(&mut inode);
        }
        if offset >= inode.size {
            return Ok(None);
        }
        let nodes = rtx.open_table(NODES)?;
        let c = self.chunk_size;
        let dirty = g.as_ref().map(|g| &g.dirty);
        let inflight = g.as_ref().and_then(|g| g.inflight.as_ref());
        let mut idx = offset / c;
        if data {
            let t = tree::seek(&nodes, inode.root, idx, true)?;
            let d = [dirty, inflight.map(|f| &**f)]
                .into_iter()
                .flatten()
                .filter_map(|d| d.range(idx..).next().map(|(&k, _)| k))
                .min();
            let found = match (t, d) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok(found
                .map(|i| (i * c).max(offset))
                .filter(|&o| o < inode.size))
        } else {
            loop {
                let h = tree::seek(&nodes, inode.root, idx, false)?.unwrap_or(u64::MAX / c);
                if dirty.is_some_and(|d| d.contains_key(&h))
                    || inflight.is_some_and(|f| f.contains_key(&h))
                {
                    idx = h + 1;
                    continue;
                }
                return Ok(Some((h * c).max(offset).min(inode.size)));
            }
        }
    }
}
