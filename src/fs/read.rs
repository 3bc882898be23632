//! Reads: file data from the write-back buffer and the store, in one snapshot.

use super::inode::InodeId;
use super::timing::Stage;
use super::{get_inode, tree, Attr, Engine, FsError, FsResult};
use crate::schema::{INODES, NODES};
use crate::store::ChunkKey;

use super::data::require_file;

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
        let mut out = vec![0u8; (end - offset) as usize];
        let copy = |out: &mut [u8], idx: u64, chunk: &[u8]| {
            let s = offset.max(idx * c);
            let e = end.min((idx + 1) * c);
            out[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&chunk[(s - idx * c) as usize..(e - idx * c) as usize]);
        };
        let mem = g.as_deref();
        let nodes = rtx.open_table(NODES)?;
        let stored: Vec<(u64, ChunkKey)> = tree::collect(&nodes, inode.root, first, last + 1)?
            .into_iter()
            .filter(|(i, _)| mem.is_none_or(|m| m.chunk(*i).is_none()))
            .collect();
        if let Some(m) = mem {
            if let Some(f) = &m.inflight {
                for (&idx, buf) in f.range(first..=last) {
                    copy(&mut out, idx, buf);
                }
            }
            for (&idx, buf) in m.dirty.range(first..=last) {
                copy(&mut out, idx, buf);
            }
        }
        // The stored chunks are read from the snapshot, taken under the state lock, so the
        // read is of the file as it was when the lock was held; releasing the lock first lets
        // writers of the file go on while this read waits for the disk and decompresses.
        drop(g);
        let keys: Vec<ChunkKey> = stored.iter().map(|s| s.1).collect();
        let chunks = self.store.read_many(&rtx, &keys);
        for ((idx, _), r) in stored.iter().map(|s| (s.0, ())).zip(chunks) {
            match r {
                Ok(data) => copy(&mut out, idx, &data),
                Err(e) => {
                    let e = FsError::from(e).at(ino.0, idx * c);
                    tracing::error!(file = %self.path_of(ino), offset = idx * c, "read failed: {e}");
                    return Err(e);
                }
            }
        }
        Ok((out, attr))
    }
}
