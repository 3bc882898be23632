//! `fsck`: verify every invariant of a datastore that nobody is writing to.
//!
//! Checked: the superblock; every inode decodes; directory entries, cookies and `..` agree;
//! link counts; every inode is reachable from the root; chunk-map node reference counts and
//! per-subtree chunk counts match the trees; every referenced chunk is in the index with the
//! right reference count; every indexed chunk's record is intact (crc, decompression, blake3);
//! the store-wide counters match.

use crate::store::chunk::ChunkId;
use crate::store::ChunkLoc;
use std::collections::{HashMap, HashSet};

use redb::{ReadTransaction, ReadableTable};
use serde::Serialize;

use super::inode::{Inode, InodeId, Kind};
use super::tree::{self, Node};
use super::{Engine, FsResult};
use crate::schema::*;
use crate::store::{ChunkKey, IndexEntry};

/// Chunks fsck verifies per batch in pack order (about 100 bytes each in memory).
const VERIFY_BATCH: usize = 1 << 20;

/// Result of a check: `problems` is empty for a sound datastore.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub inodes: u64,
    pub nodes: u64,
    pub chunks: u64,
    pub chunk_bytes_verified: u64,
    pub problems: Vec<String>,
    /// Files (by path) whose data is damaged.
    pub damaged_files: Vec<String>,
}

struct Walk<'a> {
    nodes: &'a redb::ReadOnlyTable<u64, &'static [u8]>,
    node_refs: HashMap<u64, u64>,
    chunk_refs: HashMap<ChunkKey, u64>,
    chunk_owner: HashMap<ChunkKey, InodeId>,
    visited: HashSet<u64>,
    problems: Vec<String>,
}

impl Walk<'_> {
    /// Count one reference to `id` and, the first time, walk it; returns its chunk total.
    fn visit(&mut self, id: u64, height: u8, owner: InodeId) -> u64 {
        *self.node_refs.entry(id).or_insert(0) += 1;
        let node = match tree::load(self.nodes, tree::NodeId(id)) {
            Ok(n) => n,
            Err(e) => {
                self.problems.push(format!("inode {}: {e}", owner.0));
                return 0;
            }
        };
        let first = self.visited.insert(id);
        match &node {
            Node::Leaf(s) => {
                if height != 0 {
                    self.problems
                        .push(format!("node {id}: leaf found at height {height}"));
                }
                if first {
                    for c in s.iter().flatten() {
                        *self.chunk_refs.entry(*c).or_insert(0) += 1;
                        self.chunk_owner.entry(*c).or_insert(owner);
                    }
                }
            }
            Node::Interior(h, s) => {
                if *h != height {
                    self.problems
                        .push(format!("node {id}: height {h}, expected {height}"));
                }
                if first && height > 0 {
                    for (slot, (child, total)) in s.iter().enumerate() {
                        if !child.is_none() {
                            let t = self.visit(child.0, height - 1, owner);
                            if t != *total {
                                self.problems.push(format!(
                                    "node {id} slot {slot}: records {total} chunks under child {child}, found {t}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        node.total()
    }
}

impl Engine {
    /// Check the datastore. `progress(done, total)` is called while chunks are verified.
    pub fn fsck(&self, progress: &dyn Fn(u64, u64)) -> FsResult<Report> {
        let rtx = self.read_txn()?;
        let mut r = Report::default();
        let inodes = self.check_namespace(&rtx, &mut r)?;
        check_snapshots(&rtx, &inodes, &mut r)?;
        let nodes_t = rtx.open_table(NODES)?;
        let mut walk = Walk {
            nodes: &nodes_t,
            node_refs: HashMap::new(),
            chunk_refs: HashMap::new(),
            chunk_owner: HashMap::new(),
            visited: HashSet::new(),
            problems: Vec::new(),
        };
        for (ino, i) in &inodes {
            if i.kind == Kind::File && !i.root.node.is_none() {
                let t = walk.visit(i.root.node.0, i.root.height, *ino);
                if t != i.aux {
                    walk.problems.push(format!(
                        "inode {}: records {} chunks, its map has {t}",
                        ino.0, i.aux
                    ));
                }
            } else if i.kind == Kind::File && i.aux != 0 {
                walk.problems.push(format!(
                    "inode {}: empty map but {} chunks recorded",
                    ino.0, i.aux
                ));
            }
        }
        r.problems.append(&mut walk.problems);
        let refs_t = rtx.open_table(NODEREFS)?;
        for e in refs_t.iter()? {
            let (k, v) = e?;
            let (id, n) = (k.value(), v.value());
            match walk.node_refs.get(&id) {
                None => r
                    .problems
                    .push(format!("node {id} is not referenced by any file (leaked)")),
                Some(&c) if c != n => r.problems.push(format!(
                    "node {id}: reference count {n}, but {c} references found"
                )),
                _ => {}
            }
        }
        for id in walk.node_refs.keys() {
            if refs_t.get(*id)?.is_none() {
                r.problems.push(format!(
                    "node {id} is referenced but has no reference count"
                ));
            }
        }
        let mut max_node = 0;
        for e in nodes_t.iter()? {
            let id = e?.0.value();
            max_node = max_node.max(id);
            r.nodes += 1;
            if !walk.visited.contains(&id) {
                r.problems
                    .push(format!("node {id} is stored but unreachable"));
            }
        }
        let sup = rtx.open_table(SUPER)?;
        if sup.get(K_NEXT_NODE)?.map_or(1, |v| v.value()) <= max_node {
            r.problems
                .push("next node id is not above every node id".into());
        }
        self.check_chunks(&rtx, &walk, &mut r, progress)?;
        r.inodes = inodes.len() as u64;
        Ok(r)
    }

    fn check_namespace(
        &self,
        rtx: &ReadTransaction,
        r: &mut Report,
    ) -> FsResult<Vec<(InodeId, Inode)>> {
        let mut inodes = Vec::new();
        let mut max_ino = 0;
        for e in rtx.open_table(INODES)?.iter()? {
            let (k, v) = e?;
            max_ino = max_ino.max(k.value());
            match Inode::decode(v.value()) {
                Some(i) => inodes.push((InodeId(k.value()), i)),
                None => r
                    .problems
                    .push(format!("inode {} does not decode", k.value())),
            }
        }
        let sup = rtx.open_table(SUPER)?;
        if sup.get(K_NEXT_INODE)?.map_or(2, |v| v.value()) <= max_ino {
            r.problems
                .push("next inode number is not above every inode".into());
        }
        let kinds: HashMap<InodeId, Kind> = inodes.iter().map(|(i, n)| (*i, n.kind)).collect();
        if kinds.get(&InodeId::ROOT) != Some(&Kind::Dir) {
            r.problems.push("root directory is missing".into());
        }
        let orphans: HashSet<u64> = rtx
            .open_table(ORPHANS)?
            .iter()?
            .map(|e| e.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        let mut links: HashMap<InodeId, u32> = HashMap::new();
        let mut subdirs: HashMap<InodeId, u32> = HashMap::new();
        let mut parent_of: HashMap<InodeId, InodeId> = HashMap::new();
        let dirents = rtx.open_table(DIRENTS)?;
        let cookies = rtx.open_table(DIRCOOKIE)?;
        for e in dirents.iter()? {
            let (k, v) = e?;
            let ((p, name), (c, cookie)) = (k.value(), v.value());
            let (p, c) = (InodeId(p), InodeId(c));
            let shown = String::from_utf8_lossy(name);
            if kinds.get(&p) != Some(&Kind::Dir) {
                r.problems.push(format!(
                    "entry {shown:?} is in inode {}, which is not a directory",
                    p.0
                ));
                continue;
            }
            if name == b".." {
                parent_of.insert(p, c);
                continue;
            }
            match kinds.get(&c) {
                None => r.problems.push(format!(
                    "entry {shown:?} in directory {} names missing inode {}",
                    p.0, c.0
                )),
                Some(k) => {
                    *links.entry(c).or_insert(0) += 1;
                    if *k == Kind::Dir {
                        *subdirs.entry(p).or_insert(0) += 1;
                        if let Some(prev) = parent_of.get(&c) {
                            if *prev != p {
                                r.problems.push(format!(
                                    "directory {} has {} as parent, but is in {}",
                                    c.0, prev.0, p.0
                                ));
                            }
                        }
                    }
                }
            }
            match cookies.get((p.0, cookie))? {
                Some(n) if n.value() == name => {}
                _ => r.problems.push(format!(
                    "entry {shown:?} in directory {} has no readdir cookie",
                    p.0
                )),
            }
        }
        for e in cookies.iter()? {
            let (k, v) = e?;
            let (p, _) = k.value();
            if dirents.get((p, v.value()))?.is_none() {
                r.problems.push(format!(
                    "readdir cookie in directory {p} names a missing entry"
                ));
            }
        }
        let symlinks = rtx.open_table(SYMLINKS)?;
        for (ino, i) in &inodes {
            let found = links.get(ino).copied().unwrap_or(0);
            if i.kind == Kind::Dir {
                let expect = 2 + subdirs.get(ino).copied().unwrap_or(0);
                if i.nlink != expect && !orphans.contains(&ino.0) {
                    r.problems.push(format!(
                        "directory {}: link count {}, expected {expect}",
                        ino.0, i.nlink
                    ));
                }
                if !parent_of.contains_key(ino) {
                    r.problems
                        .push(format!("directory {} has no parent entry", ino.0));
                }
                if *ino != InodeId::ROOT && found != 1 && !orphans.contains(&ino.0) {
                    r.problems
                        .push(format!("directory {} is linked {found} times", ino.0));
                }
            } else if i.nlink != found {
                r.problems.push(format!(
                    "inode {}: link count {}, but {found} entries",
                    ino.0, i.nlink
                ));
            }
            if found == 0 && *ino != InodeId::ROOT && !orphans.contains(&ino.0) {
                r.problems
                    .push(format!("inode {} is not in any directory (lost)", ino.0));
            }
            if i.kind == Kind::Symlink && symlinks.get(ino.0)?.is_none() {
                r.problems.push(format!("symlink {} has no target", ino.0));
            }
        }
        Ok(inodes)
    }

    /// Read and verify `pending` chunks in pack order (the index is in key order, random
    /// across packs: in pack order each stretch of a pack is read once, which on an S3-backed
    /// datastore is the difference between reading each block of the bucket once and once per
    /// chunk). Empties `pending`.
    fn verify_in_pack_order(
        &self,
        pending: &mut Vec<(ChunkLoc, ChunkId, ChunkKey)>,
        walk: &Walk<'_>,
        r: &mut Report,
        damaged: &mut HashSet<InodeId>,
    ) {
        pending.sort_unstable_by_key(|(l, _, _)| (l.pack, l.offset));
        for (loc, id, key) in pending.drain(..) {
            match self.store.read_loc(&id, &loc) {
                Ok(d) => r.chunk_bytes_verified += d.len() as u64,
                Err(e) => {
                    r.problems.push(format!("chunk {}: {e}", id.short()));
                    if let Some(o) = walk.chunk_owner.get(&key) {
                        damaged.insert(*o);
                    }
                }
            }
        }
    }

    fn check_chunks(
        &self,
        rtx: &ReadTransaction,
        walk: &Walk<'_>,
        r: &mut Report,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<()> {
        let chunks = rtx.open_table(CHUNKS)?;
        let total = redb::ReadableTableMetadata::len(&chunks)?;
        let (mut unique, mut stored, mut count) = (0u64, 0u64, 0u64);
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut damaged: HashSet<InodeId> = HashSet::new();
        let aliases = rtx.open_table(CHUNK_ALIASES)?;
        let mut alias_count = 0u64;
        let mut pending = Vec::new();
        for (n, e) in chunks.iter()?.enumerate() {
            let (k, v) = e?;
            let key = ChunkKey(k.value());
            let Some(IndexEntry { id, loc }) = IndexEntry::decode(v.value()) else {
                r.problems
                    .push(format!("index entry of chunk key {key} does not decode"));
                continue;
            };
            if !key.may_be(&id) {
                r.problems.push(format!(
                    "chunk {} is stored under key {key}, which is not its own",
                    id.short()
                ));
            }
            if key.is_alias() {
                alias_count += 1;
                if aliases.get(&id.0)?.map(|a| a.value()) != Some(key.0) {
                    r.problems.push(format!(
                        "chunk {} has alias key {key} but no alias entry",
                        id.short()
                    ));
                }
            }
            count += 1;
            unique += u64::from(loc.raw_len);
            stored += u64::from(loc.stored_len);
            *live.entry(loc.pack.0).or_insert(0) += crate::store::record_bytes(&loc);
            let found = walk.chunk_refs.get(&key).copied().unwrap_or(0);
            if found != loc.refs {
                r.problems.push(format!(
                    "chunk {}: reference count {}, but {found} references found",
                    id.short(),
                    loc.refs
                ));
            }
            pending.push((loc, id, key));
            if pending.len() >= VERIFY_BATCH {
                self.verify_in_pack_order(&mut pending, walk, r, &mut damaged);
            }
            if n % 256 == 0 {
                progress(n as u64, total);
            }
        }
        self.verify_in_pack_order(&mut pending, walk, r, &mut damaged);
        progress(total, total);
        r.chunks = count;
        for key in walk.chunk_refs.keys() {
            if chunks.get(key.0)?.is_none() {
                r.problems
                    .push(format!("chunk key {key} is referenced but not stored"));
                if let Some(o) = walk.chunk_owner.get(key) {
                    damaged.insert(*o);
                }
            }
        }
        let alias_entries = redb::ReadableTableMetadata::len(&aliases)?;
        if alias_entries != alias_count {
            r.problems.push(format!(
                "{alias_entries} chunk aliases recorded, {alias_count} chunks stored under one"
            ));
        }
        let counters = rtx.open_table(COUNTERS)?;
        let get = |k| -> FsResult<u64> { Ok(counters.get(k)?.map_or(0, |v| v.value())) };
        for (k, v) in [
            (C_CHUNK_COUNT, count),
            (C_UNIQUE_BYTES, unique),
            (C_STORED_BYTES, stored),
        ] {
            if get(k)? != v {
                r.problems
                    .push(format!("counter {k} is {}, actual {v}", get(k)?));
            }
        }
        for (p, u) in self.store.pack_use(rtx)? {
            let want = live.get(&p.0).copied().unwrap_or(0);
            if u.live != want {
                r.problems.push(format!(
                    "pack {:08x}: live bytes {} recorded, {want} actual",
                    p.0, u.live
                ));
            }
        }
        r.damaged_files = damaged.into_iter().map(|i| self.path_of(i)).collect();
        r.damaged_files.sort();
        Ok(())
    }
}

/// Every listed snapshot's top inode exists and is flagged read-only; every flagged inode is
/// under `/.snapshots` (a flag anywhere else would make a live file read-only).
fn check_snapshots(
    rtx: &ReadTransaction,
    inodes: &[(InodeId, Inode)],
    r: &mut Report,
) -> FsResult<()> {
    let by_ino: HashMap<InodeId, &Inode> = inodes.iter().map(|(i, n)| (*i, n)).collect();
    match rtx.open_table(crate::schema::SNAPSHOTS) {
        Ok(t) => {
            for e in t.iter()? {
                let (k, v) = e?;
                let (path, name) = k.value();
                let top = InodeId(v.value().0);
                let what = format!(
                    "snapshot {} of /{}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(path)
                );
                match by_ino.get(&top) {
                    None => r
                        .problems
                        .push(format!("{what}: its inode {} is missing", top.0)),
                    Some(i) if !i.is_snapshot() => r
                        .problems
                        .push(format!("{what}: its inode {} is not read-only", top.0)),
                    Some(_) => {}
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let flagged = inodes.iter().filter(|(_, i)| i.is_snapshot()).count();
    if flagged > 0 {
        // Walk /.snapshots: every flagged inode must be found there.
        let dirents = rtx.open_table(DIRENTS)?;
        let root = rtx
            .open_table(SUPER)?
            .get(crate::schema::K_SNAP_ROOT)?
            .map(|v| InodeId(v.value()));
        let mut under = HashSet::new();
        let mut stack: Vec<InodeId> = root.into_iter().collect();
        while let Some(d) = stack.pop() {
            if !under.insert(d) {
                continue;
            }
            for e in dirents.range((d.0, [].as_slice())..(d.0 + 1, [].as_slice()))? {
                let (k, v) = e?;
                if k.value().1 != b"..".as_slice() {
                    stack.push(InodeId(v.value().0));
                }
            }
        }
        for (ino, i) in inodes {
            if i.is_snapshot() && !under.contains(ino) {
                r.problems.push(format!(
                    "inode {} is read-only (a snapshot's) but not under /.snapshots",
                    ino.0
                ));
            }
        }
    }
    Ok(())
}
