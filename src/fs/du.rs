//! Per-VM space accounting (`tessera du`): for a file or a folder, its logical size, its
//! allocated size, the bytes it shares with other files and the bytes unique to it, i.e. what
//! deleting it would free (Tintri-style per-VM space).
//!
//! Ownership is exact over the copy-on-write chunk maps. A tree node belongs to the set when
//! every reference to it (its reference count) comes from an inode of the set or from a node
//! that belongs to the set; a chunk is unique to the set when every leaf slot referencing it
//! lies in such nodes. Nodes are visited top-down by height, so each is judged once, after
//! all its possible referrers in the set.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::inode::{InodeId, Kind};
use super::tree::{self, Node, NodeId};
use super::{get_inode, Engine, FsError, FsResult};
use crate::schema::*;
use crate::store::record_bytes;
use crate::store::{ChunkKey, IndexEntry};

/// Space of one file or folder. Bytes throughout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The path as asked (inside the datastore).
    pub path: String,
    pub files: u64,
    /// Sum of file sizes, holes included.
    pub logical_bytes: u64,
    /// Non-hole chunks of the files (what they would take without dedup or compression).
    pub allocated_bytes: u64,
    /// Allocated bytes whose chunks other files use too (clones, dedup hits).
    pub shared_bytes: u64,
    /// Allocated bytes whose chunks only these files use.
    pub unique_bytes: u64,
    /// Disk space deleting these files gives back (after `tessera gc`): their unique chunks
    /// as stored (compressed, with record headers).
    pub freed_on_delete_bytes: u64,
}

impl Engine {
    /// Space accounting of the file or folder at `path` (inside the datastore).
    pub fn du(&self, path: &str) -> FsResult<Usage> {
        let top = self.resolve(path.as_bytes())?;
        // Unflushed data is not in the chunk maps yet: flush what is dirty first.
        self.sync_all()?;
        let rtx = self.read_txn()?;
        let inodes = rtx.open_table(INODES)?;
        let dirents = rtx.open_table(DIRENTS)?;
        let nodes = rtx.open_table(NODES)?;
        let refs = rtx.open_table(NODEREFS)?;
        let chunks = rtx.open_table(CHUNKS)?;

        // Files of the set, with how many of their names lie inside it (hard links).
        let mut names: HashMap<InodeId, u32> = HashMap::new();
        let mut stack = vec![top];
        let top_inode = get_inode(&inodes, top)?;
        if top_inode.kind == Kind::Dir {
            while let Some(d) = stack.pop() {
                for e in dirents.range((d.0, [].as_slice())..(d.0 + 1, [].as_slice()))? {
                    let (k, v) = e?;
                    let (_, name) = k.value();
                    if name == b".." || name == b"." {
                        continue;
                    }
                    let child = InodeId(v.value().0);
                    let i = get_inode(&inodes, child)?;
                    match i.kind {
                        Kind::Dir => stack.push(child),
                        Kind::File => *names.entry(child).or_insert(0) += 1,
                        _ => {}
                    }
                }
            }
        } else if top_inode.kind == Kind::File {
            // One name: a file with other hard links stays when this name is deleted.
            names.insert(top, 1);
        }

        let mut u = Usage {
            path: path.to_string(),
            ..Usage::default()
        };
        // Per node, by height (judged from the top down): references from the set (to compare
        // with its reference count) and the number of file paths reaching it (clones inside
        // the set share nodes, but each file's allocated size counts them).
        let mut by_height: BTreeMap<u8, HashMap<NodeId, (u64, u64)>> = BTreeMap::new();
        for (&ino, &n) in &names {
            let i = get_inode(&inodes, ino)?;
            u.files += 1;
            u.logical_bytes += i.size;
            u.allocated_bytes += self.attr_of(ino, i.clone(), None).allocated;
            // A file with names outside the set stays when the set is deleted.
            if n >= i.nlink && !i.root.node.is_none() {
                let e = by_height
                    .entry(i.root.height)
                    .or_default()
                    .entry(i.root.node)
                    .or_insert((0, 0));
                e.0 += 1;
                e.1 += 1;
            }
        }
        // Per chunk: leaf slots in owned nodes, and file paths reaching them.
        let mut slots: HashMap<ChunkKey, (u64, u64)> = HashMap::new();
        while let Some((h, level)) = by_height.pop_last() {
            for (id, (from_set, paths)) in level {
                let total = refs.get(id.0)?.map_or(0, |v| v.value());
                if from_set < total {
                    continue; // referenced from outside the set too
                }
                match tree::load(&nodes, id)? {
                    Node::Leaf(s) => {
                        for c in s.iter().flatten() {
                            let e = slots.entry(*c).or_insert((0, 0));
                            e.0 += 1;
                            e.1 += paths;
                        }
                    }
                    Node::Interior(_, s) => {
                        let below = by_height.entry(h.saturating_sub(1)).or_default();
                        for (child, _) in s.iter().filter(|c| !c.0.is_none()) {
                            let e = below.entry(*child).or_insert((0, 0));
                            e.0 += 1;
                            e.1 += paths;
                        }
                    }
                }
            }
        }
        let mut unique_slots = 0u64;
        for (key, (n, paths)) in slots {
            let v = chunks
                .get(key.0)?
                .ok_or_else(|| FsError::BadMeta(format!("chunk key {key} not indexed")))?;
            let loc = IndexEntry::decode(v.value())
                .ok_or_else(|| FsError::BadMeta(format!("bad index entry {key}")))?
                .loc;
            if n >= loc.refs {
                unique_slots += paths;
                if !loc.is_lost() {
                    u.freed_on_delete_bytes += record_bytes(&loc);
                }
            }
        }
        u.unique_bytes = (unique_slots * self.chunk_size).min(u.allocated_bytes);
        u.shared_bytes = u.allocated_bytes - u.unique_bytes;
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::dir::Ctx;
    use crate::fs::Format;
    use crate::store::pack::MemPackIo;

    const C: usize = 4096;

    fn engine() -> Engine {
        Engine::in_memory(
            Format {
                chunk_size: C as u32,
                zstd_level: 1,
            },
            Arc::new(MemPackIo::default()),
        )
        .unwrap()
    }

    fn unique_data(seed: u64, chunks: usize) -> Vec<u8> {
        crate::fs::testutil::unique_data(seed, chunks, C)
    }

    fn file(e: &Engine, dir: InodeId, name: &str, data: &[u8]) -> InodeId {
        let i = e
            .mknod(dir, name.as_bytes(), Kind::File, 0o644, 0, Ctx::ROOT)
            .unwrap()
            .ino;
        e.write(i, 0, data).unwrap();
        i
    }

    /// Protects: `du` says what deleting a VM frees: a fresh clone frees nothing, a diverged
    /// clone frees exactly its diverged chunks, the template frees nothing while clones use
    /// it, and a folder counts shared chunks between its own files as unique to it. Checked
    /// against the space actually given back (stats) after deleting.
    #[test]
    fn unique_is_what_delete_frees() {
        let e = engine();
        let root = InodeId::ROOT;
        let vm = e.mkdir(root, b"vm", 0o755, Ctx::ROOT).unwrap().ino;
        file(&e, vm, "disk.raw", &unique_data(1, 64));
        file(&e, vm, "swap.raw", &unique_data(2, 8));
        e.clone_paths(b"/vm", &[b"/vm2".to_vec()]).unwrap();
        // vm2 diverges by 5 chunks of new data
        let d2 = e.resolve(b"/vm2/disk.raw").unwrap();
        e.write(d2, 10 * C as u64, &unique_data(3, 5)).unwrap();

        let a = e.du("/vm").unwrap();
        assert_eq!(a.files, 2);
        assert_eq!(a.logical_bytes, 72 * C as u64);
        assert_eq!(a.allocated_bytes, 72 * C as u64);
        // vm shares all but the 5 chunks vm2 overwrote
        assert_eq!(a.unique_bytes, 5 * C as u64, "{a:?}");
        assert_eq!(a.shared_bytes, 67 * C as u64);
        let b = e.du("/vm2").unwrap();
        assert_eq!(b.unique_bytes, 5 * C as u64, "{b:?}");
        let f = e.du("/vm2/swap.raw").unwrap();
        assert_eq!(f.unique_bytes, 0, "an untouched clone frees nothing");
        let all = e.du("/").unwrap();
        assert_eq!(
            all.unique_bytes, all.allocated_bytes,
            "everything is unique to the root"
        );

        // deleting vm2 frees what du said, as stored
        let before = e.stats().unwrap().stored_bytes;
        for n in [&b"disk.raw"[..], b"swap.raw"] {
            e.unlink(e.resolve(b"/vm2").unwrap(), n).unwrap();
        }
        e.rmdir(root, b"vm2").unwrap();
        let after = e.stats().unwrap().stored_bytes;
        assert_eq!(
            before - after + 5 * crate::store::pack::RECORD_HEADER_LEN as u64,
            b.freed_on_delete_bytes
        );
        // now vm owns everything
        let a = e.du("/vm").unwrap();
        assert_eq!(a.unique_bytes, a.allocated_bytes);
        assert!(e.du("/missing").is_err());
    }
}
