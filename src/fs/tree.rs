//! Chunk maps: a copy-on-write radix tree of chunk ids per file, shared by clones.
//!
//! Slot `i` of a file holds the id of the chunk covering bytes `[i*C, (i+1)*C)` (C = chunk
//! size) or nothing (a hole). Nodes have 256 slots: a leaf maps 256 chunks (4 MiB at 16 KiB),
//! a height-3 tree covers 4 Gi chunks (64 TiB at 16 KiB).
//!
//! # Sharing (Rodeh, "B-trees, shadowing, and clones"; btrfs)
//! Every node has a reference count: the number of inode roots and parent nodes pointing at it.
//! Cloning a file points the new inode at the same root and adds one reference: O(1).
//! Before a node is modified it is made private: if its count is above one, it is copied, the
//! copy's children each gain a reference (chunks for a leaf, nodes for an interior node) and
//! the original loses one. Counts are thus pushed down lazily, one level per first write, and
//! no write ever changes what another file reads.
//!
//! # Encoding of a node (little-endian; format 2)
//! `height u8` (0 = leaf), `count u16`, then:
//! - in a leaf, a 32-byte bitmap of the slots present, then `count` 7-byte chunk keys
//!   ([`ChunkKey`]) in slot order: a full leaf is 1 827 bytes, so two share a 4 KiB redb page
//!   (format 1 held 32-byte ids: 8 451 bytes in 12 KiB of pages);
//! - in an interior node, `count` entries sorted by slot: `slot u8`, child node id `u64` and
//!   the number of chunks present under that child `u64` (so a file's allocated size and
//!   full/empty subtrees are known without walking them).

use redb::{ReadableTable, Table};

use super::error::{FsError, FsResult};
use crate::store::{ChunkKey, ChunkTables};

pub const FANOUT_BITS: u32 = 8;
pub const FANOUT: usize = 1 << FANOUT_BITS;

/// A file's chunk-map root, kept in its inode: node id (`NodeId::NONE` = empty file) and
/// height (0 = the root is a leaf).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Root {
    pub node: NodeId,
    pub height: u8,
}

/// Identifies a chunk-map tree node (key of the `nodes` and `noderefs` tables). 0 is "none":
/// an empty subtree, or the root of an empty file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl NodeId {
    pub const NONE: NodeId = NodeId(0);

    pub fn is_none(self) -> bool {
        self == NodeId::NONE
    }
}

/// Number of chunk slots a node at `height` covers.
fn coverage(height: u8) -> u128 {
    1u128 << (FANOUT_BITS * (u32::from(height) + 1))
}

/// Number of chunk slots one child of a node at `height` covers.
fn child_span(height: u8) -> u64 {
    1u64 << (FANOUT_BITS * u32::from(height))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Box<[Option<ChunkKey>; FANOUT]>),
    /// (child node id or 0, chunks present under it)
    Interior(u8, Box<[(NodeId, u64); FANOUT]>),
}

impl Node {
    fn empty(height: u8) -> Node {
        if height == 0 {
            Node::Leaf(Box::new([None; FANOUT]))
        } else {
            Node::Interior(height, Box::new([(NodeId::NONE, 0); FANOUT]))
        }
    }

    /// Chunks present under this node.
    pub fn total(&self) -> u64 {
        match self {
            Node::Leaf(s) => s.iter().filter(|c| c.is_some()).count() as u64,
            Node::Interior(_, s) => s.iter().map(|c| c.1).sum(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Leaf(s) => s.iter().all(|c| c.is_none()),
            Node::Interior(_, s) => s.iter().all(|c| c.0.is_none()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Node::Leaf(s) => {
                out.push(0);
                let n = s.iter().filter(|c| c.is_some()).count() as u16;
                out.extend_from_slice(&n.to_le_bytes());
                let mut bitmap = [0u8; LEAF_BITMAP];
                for (i, c) in s.iter().enumerate() {
                    if c.is_some() {
                        bitmap[i / 8] |= 1 << (i % 8);
                    }
                }
                out.extend_from_slice(&bitmap);
                for c in s.iter().flatten() {
                    out.extend_from_slice(&c.to_bytes());
                }
            }
            Node::Interior(h, s) => {
                out.push(*h);
                let n = s.iter().filter(|c| !c.0.is_none()).count() as u16;
                out.extend_from_slice(&n.to_le_bytes());
                for (i, c) in s.iter().enumerate() {
                    if !c.0.is_none() {
                        out.push(i as u8);
                        out.extend_from_slice(&c.0 .0.to_le_bytes());
                        out.extend_from_slice(&c.1.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Node> {
        let height = *b.first()?;
        let n = u16::from_le_bytes(b.get(1..3)?.try_into().ok()?) as usize;
        let mut node = Node::empty(height);
        if let Node::Leaf(s) = &mut node {
            let leaf = LeafView::new(b)?;
            for (slot, k) in leaf.iter_from(0) {
                s[slot] = Some(k);
            }
            return Some(node);
        }
        let mut p = 3;
        for _ in 0..n {
            let slot = *b.get(p)? as usize;
            p += 1;
            match &mut node {
                Node::Leaf(_) => unreachable!("leaves are decoded above"),
                Node::Interior(_, s) => {
                    let id = u64::from_le_bytes(b.get(p..p + 8)?.try_into().ok()?);
                    let t = u64::from_le_bytes(b.get(p + 8..p + 16)?.try_into().ok()?);
                    s[slot] = (NodeId(id), t);
                    p += 16;
                }
            }
        }
        (p == b.len()).then_some(node)
    }
}

fn bad(id: NodeId) -> FsError {
    FsError::BadMeta(format!("chunk-map node {id} is missing or damaged"))
}

/// Load a node through any readable table (read or write transaction).
pub fn load<T: ReadableTable<u64, &'static [u8]>>(nodes: &T, id: NodeId) -> FsResult<Node> {
    let v = nodes.get(id.0)?.ok_or_else(|| bad(id))?;
    Node::decode(v.value()).ok_or_else(|| bad(id))
}

/// Bytes of a leaf's slot bitmap.
const LEAF_BITMAP: usize = FANOUT / 8;

/// An encoded leaf read in place: a slot's key is found from the bitmap (the number of
/// present slots before it) without decoding the other 255.
struct LeafView<'a> {
    bitmap: &'a [u8],
    keys: &'a [u8],
}

impl<'a> LeafView<'a> {
    /// `None` if `b` is not a well-formed leaf.
    fn new(b: &'a [u8]) -> Option<LeafView<'a>> {
        if *b.first()? != 0 {
            return None;
        }
        let n = u16::from_le_bytes(b.get(1..3)?.try_into().ok()?) as usize;
        let bitmap = b.get(3..3 + LEAF_BITMAP)?;
        let keys = &b[3 + LEAF_BITMAP..];
        let present: u32 = bitmap.iter().map(|x| x.count_ones()).sum();
        // Every 7-byte value is a valid key, so only the lengths need checking.
        (present as usize == n && keys.len() == n * ChunkKey::LEN)
            .then_some(LeafView { bitmap, keys })
    }

    fn has(&self, slot: usize) -> bool {
        self.bitmap[slot / 8] & (1 << (slot % 8)) != 0
    }

    /// Number of present slots below `slot`.
    fn rank(&self, slot: usize) -> usize {
        let full: u32 = self.bitmap[..slot / 8].iter().map(|x| x.count_ones()).sum();
        let part = (self.bitmap[slot / 8] & ((1u16 << (slot % 8)) - 1) as u8).count_ones();
        (full + part) as usize
    }

    fn key(&self, k: usize) -> ChunkKey {
        let l = ChunkKey::LEN;
        ChunkKey::from_bytes(&self.keys[k * l..(k + 1) * l]).expect("7 bytes are a key")
    }

    fn find(&self, slot: usize) -> Option<ChunkKey> {
        self.has(slot).then(|| self.key(self.rank(slot)))
    }

    /// Present slots `>= from`, in order, with their keys.
    fn iter_from(&self, from: usize) -> impl Iterator<Item = (usize, ChunkKey)> + '_ {
        let mut k = if from < FANOUT { self.rank(from) } else { 0 };
        (from..FANOUT).filter(|s| self.has(*s)).map(move |s| {
            let r = (s, self.key(k));
            k += 1;
            r
        })
    }
}

/// An encoded interior node read in place: lookups binary-search its sorted entries instead
/// of decoding all 256 slots.
struct View<'a> {
    b: &'a [u8],
    n: usize,
    esize: usize,
}

impl<'a> View<'a> {
    /// `None` if `b` is not an interior node of `height`.
    fn new(b: &'a [u8], height: u8) -> Option<View<'a>> {
        if height == 0 || *b.first()? != height {
            return None;
        }
        let n = u16::from_le_bytes(b.get(1..3)?.try_into().ok()?) as usize;
        let esize = 1 + 16;
        (b.len() == 3 + n * esize).then_some(View { b, n, esize })
    }

    fn slot(&self, k: usize) -> usize {
        self.b[3 + k * self.esize] as usize
    }

    fn payload(&self, k: usize) -> &'a [u8] {
        &self.b[3 + k * self.esize + 1..3 + (k + 1) * self.esize]
    }

    /// Index of the first entry whose slot is at least `slot`.
    fn first_at(&self, slot: usize) -> usize {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.slot(mid) < slot {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn find(&self, slot: usize) -> Option<&'a [u8]> {
        let k = self.first_at(slot);
        (k < self.n && self.slot(k) == slot).then(|| self.payload(k))
    }
}

fn child_of(p: &[u8]) -> NodeId {
    NodeId(u64::from_le_bytes(
        p[..8].try_into().expect("16-byte entry"),
    ))
}

/// The chunk at slot `idx`, if any.
pub fn get<T: ReadableTable<u64, &'static [u8]>>(
    nodes: &T,
    root: Root,
    idx: u64,
) -> FsResult<Option<ChunkKey>> {
    if root.node.is_none() || u128::from(idx) >= coverage(root.height) {
        return Ok(None);
    }
    let (mut id, mut h) = (root.node, root.height);
    loop {
        let v = nodes.get(id.0)?.ok_or_else(|| bad(id))?;
        let slot = ((idx >> (FANOUT_BITS * u32::from(h))) as usize) & (FANOUT - 1);
        if h == 0 {
            let leaf = LeafView::new(v.value()).ok_or_else(|| bad(id))?;
            return Ok(leaf.find(slot));
        }
        let view = View::new(v.value(), h).ok_or_else(|| bad(id))?;
        match view.find(slot) {
            None => return Ok(None),
            Some(p) => {
                id = child_of(p);
                h -= 1;
            }
        }
    }
}

/// Every present slot in `[from, to)`, in order.
pub fn collect<T: ReadableTable<u64, &'static [u8]>>(
    nodes: &T,
    root: Root,
    from: u64,
    to: u64,
) -> FsResult<Vec<(u64, ChunkKey)>> {
    let mut out = Vec::new();
    if !root.node.is_none() && from < to {
        collect_in(nodes, root.node, root.height, 0, from, to, &mut out)?;
    }
    Ok(out)
}

fn collect_in<T: ReadableTable<u64, &'static [u8]>>(
    nodes: &T,
    id: NodeId,
    height: u8,
    base: u64,
    from: u64,
    to: u64,
    out: &mut Vec<(u64, ChunkKey)>,
) -> FsResult<()> {
    let v = nodes.get(id.0)?.ok_or_else(|| bad(id))?;
    let span = child_span(height);
    let first = if from <= base {
        0
    } else {
        ((from - base) / span).min(FANOUT as u64) as usize
    };
    if height == 0 {
        let leaf = LeafView::new(v.value()).ok_or_else(|| bad(id))?;
        for (slot, k) in leaf.iter_from(first) {
            let cb = base + slot as u64;
            if cb >= to {
                break;
            }
            out.push((cb, k));
        }
        return Ok(());
    }
    let view = View::new(v.value(), height).ok_or_else(|| bad(id))?;
    // Entries whose span meets [from, to), found by binary search (not a scan of 256 slots).
    for k in view.first_at(first)..view.n {
        let cb = base + view.slot(k) as u64 * span;
        if cb >= to {
            break;
        }
        {
            collect_in(
                nodes,
                child_of(view.payload(k)),
                height - 1,
                cb,
                from,
                to,
                out,
            )?;
        }
    }
    Ok(())
}

/// First slot `>= from` that is present (`want_data`) or a hole (`!want_data`).
/// Slots beyond the tree's coverage are holes.
pub fn seek<T: ReadableTable<u64, &'static [u8]>>(
    nodes: &T,
    root: Root,
    from: u64,
    want_data: bool,
) -> FsResult<Option<u64>> {
    if root.node.is_none() || u128::from(from) >= coverage(root.height) {
        return Ok(if want_data { None } else { Some(from) });
    }
    let r = seek_in(nodes, root.node, root.height, 0, from, want_data)?;
    if r.is_none() && !want_data {
        return Ok(Some(coverage(root.height).min(u128::from(u64::MAX)) as u64));
    }
    Ok(r)
}

fn seek_in<T: ReadableTable<u64, &'static [u8]>>(
    nodes: &T,
    id: NodeId,
    height: u8,
    base: u64,
    from: u64,
    want_data: bool,
) -> FsResult<Option<u64>> {
    match load(nodes, id)? {
        Node::Leaf(s) => {
            for (i, c) in s.iter().enumerate() {
                let idx = base + i as u64;
                if idx >= from && c.is_some() == want_data {
                    return Ok(Some(idx));
                }
            }
        }
        Node::Interior(_, s) => {
            let span = child_span(height);
            for (i, c) in s.iter().enumerate() {
                let cb = base + i as u64 * span;
                if cb.saturating_add(span) <= from {
                    continue;
                }
                let start = from.max(cb);
                if c.0.is_none() {
                    if !want_data {
                        return Ok(Some(start));
                    }
                    continue;
                }
                if !want_data && c.1 == span {
                    continue; // full subtree: no hole in it
                }
                if let Some(r) = seek_in(nodes, c.0, height - 1, cb, start, want_data)? {
                    return Ok(Some(r));
                }
            }
        }
    }
    Ok(None)
}

/// Tree mutations inside one write transaction.
pub struct TreeTx<'a, 'txn> {
    pub nodes: &'a mut Table<'txn, u64, &'static [u8]>,
    pub refs: &'a mut Table<'txn, u64, u64>,
    pub chunks: &'a mut ChunkTables<'txn>,
    /// Next free node id (persisted by the caller).
    pub next_node: &'a mut u64,
}

impl TreeTx<'_, '_> {
    fn refcount(&self, id: NodeId) -> FsResult<u64> {
        Ok(self.refs.get(id.0)?.map_or(0, |v| v.value()))
    }

    fn put(&mut self, id: NodeId, node: &Node) -> FsResult<()> {
        self.nodes.insert(id.0, node.encode().as_slice())?;
        Ok(())
    }

    fn alloc(&mut self) -> NodeId {
        let id = NodeId(*self.next_node);
        *self.next_node += 1;
        id
    }

    /// One more reference to a node (a clone of a file shares its root).
    pub fn incref_node(&mut self, id: NodeId) -> FsResult<()> {
        if !id.is_none() {
            let r = self.refcount(id)?;
            if r == 0 {
                return Err(bad(id));
            }
            self.refs.insert(id.0, r + 1)?;
        }
        Ok(())
    }

    /// One reference fewer; a node nobody references releases its children and is deleted.
    pub fn decref_node(&mut self, id: NodeId) -> FsResult<()> {
        if id.is_none() {
            return Ok(());
        }
        let r = self.refcount(id)?;
        if r > 1 {
            self.refs.insert(id.0, r - 1)?;
            return Ok(());
        }
        let node = load(&*self.nodes, id)?;
        self.refs.remove(id.0)?;
        self.nodes.remove(id.0)?;
        match node {
            Node::Leaf(s) => {
                for c in s.iter().flatten() {
                    self.chunks.decref(*c)?;
                }
            }
            Node::Interior(_, s) => {
                for c in s.iter() {
                    self.decref_node(c.0)?;
                }
            }
        }
        Ok(())
    }

    /// Load a node for modification: a shared node is copied first (its children gain a
    /// reference, it loses one). Returns the id to write the modified node under.
    fn own(&mut self, id: NodeId) -> FsResult<(NodeId, Node)> {
        let node = load(&*self.nodes, id)?;
        let r = self.refcount(id)?;
        if r <= 1 {
            return Ok((id, node));
        }
        match &node {
            Node::Leaf(s) => {
                for c in s.iter().flatten() {
                    self.chunks.incref(*c)?;
                }
            }
            Node::Interior(_, s) => {
                for c in s.iter() {
                    self.incref_node(c.0)?;
                }
            }
        }
        self.refs.insert(id.0, r - 1)?;
        let new = self.alloc();
        self.refs.insert(new.0, 1)?;
        Ok((new, node))
    }

    /// Delete a private node that became empty.
    fn free(&mut self, id: NodeId) -> FsResult<()> {
        self.nodes.remove(id.0)?;
        self.refs.remove(id.0)?;
        Ok(())
    }

    /// Set slots (sorted by index, no duplicates) to chunks or holes. The caller has taken
    /// one reference to the chunk of every `Some` update (`ChunkTables::incref_or_insert`);
    /// the slot keeps it, or gives it back when it already held that chunk.
    /// Returns the new root and the number of chunks now present.
    pub fn set(
        &mut self,
        root: Root,
        updates: &[(u64, Option<ChunkKey>)],
    ) -> FsResult<(Root, u64)> {
        let mut root = root;
        let Some(max) = updates.iter().filter(|u| u.1.is_some()).map(|u| u.0).max() else {
            // Only holes: nothing beyond the coverage needs to grow.
            let ups: Vec<_> = updates
                .iter()
                .copied()
                .filter(|u| u128::from(u.0) < coverage(root.height))
                .collect();
            return self.set_bounded(root, &ups);
        };
        while u128::from(max) >= coverage(root.height) {
            if !root.node.is_none() {
                let mut n = Node::empty(root.height + 1);
                let total = load(&*self.nodes, root.node)?.total();
                if let Node::Interior(_, s) = &mut n {
                    s[0] = (root.node, total);
                }
                let id = self.alloc();
                self.put(id, &n)?;
                self.refs.insert(id.0, 1)?;
                root.node = id;
            }
            root.height += 1;
        }
        let ups: Vec<_> = updates
            .iter()
            .copied()
            .filter(|u| u128::from(u.0) < coverage(root.height))
            .collect();
        self.set_bounded(root, &ups)
    }

    fn set_bounded(
        &mut self,
        root: Root,
        ups: &[(u64, Option<ChunkKey>)],
    ) -> FsResult<(Root, u64)> {
        if ups.is_empty() {
            let total = if root.node.is_none() {
                0
            } else {
                load(&*self.nodes, root.node)?.total()
            };
            return Ok((root, total));
        }
        let (id, total) = self.set_in(root.node, root.height, 0, ups)?;
        Ok((
            Root {
                node: id,
                height: if id.is_none() { 0 } else { root.height },
            },
            total,
        ))
    }

    fn set_in(
        &mut self,
        id: NodeId,
        height: u8,
        base: u64,
        ups: &[(u64, Option<ChunkKey>)],
    ) -> FsResult<(NodeId, u64)> {
        let (id, mut node) = if id.is_none() {
            if ups.iter().all(|u| u.1.is_none()) {
                return Ok((NodeId::NONE, 0));
            }
            let id = self.alloc();
            self.refs.insert(id.0, 1)?;
            (id, Node::empty(height))
        } else {
            self.own(id)?
        };
        match &mut node {
            Node::Leaf(s) => {
                for &(idx, new) in ups {
                    let slot = (idx - base) as usize;
                    let old = s[slot];
                    // The slot gives up its old chunk, or the caller's extra reference when
                    // the chunk is the same (drops are applied at the end of the transaction,
                    // so the count never touches zero in between).
                    if let Some(o) = old {
                        self.chunks.decref(o)?;
                    }
                    s[slot] = new;
                }
            }
            Node::Interior(_, s) => {
                let span = child_span(height);
                let mut i = 0;
                while i < ups.len() {
                    let slot = ((ups[i].0 - base) / span) as usize;
                    let mut j = i;
                    while j < ups.len() && ((ups[j].0 - base) / span) as usize == slot {
                        j += 1;
                    }
                    let cb = base + slot as u64 * span;
                    s[slot] = self.set_in(s[slot].0, height - 1, cb, &ups[i..j])?;
                    i = j;
                }
            }
        }
        if node.is_empty() {
            self.free(id)?;
            return Ok((NodeId::NONE, 0));
        }
        self.put(id, &node)?;
        Ok((id, node.total()))
    }

    /// Drop every slot `>= keep` (truncate). Returns the new root and chunks present.
    pub fn truncate(&mut self, root: Root, keep: u64) -> FsResult<(Root, u64)> {
        self.clear(root, keep, u64::MAX)
    }

    /// Turn every slot in `[from, to)` into a hole (punch). Work and memory are proportional
    /// to the nodes the range touches at its edges plus the chunks it releases, never to the
    /// length of the range: punching 1 PiB of a sparse file visits a handful of nodes.
    /// Returns the new root and chunks present.
    pub fn clear(&mut self, root: Root, from: u64, to: u64) -> FsResult<(Root, u64)> {
        if root.node.is_none() {
            return Ok((Root::default(), 0));
        }
        if from >= to || u128::from(from) >= coverage(root.height) {
            let total = load(&*self.nodes, root.node)?.total();
            return Ok((root, total));
        }
        let (id, total) = self.clear_in(root.node, root.height, 0, from, to)?;
        Ok((
            Root {
                node: id,
                height: if id.is_none() { 0 } else { root.height },
            },
            total,
        ))
    }

    /// `clear` below node `id` (covering slots from `base`), which overlaps `[from, to)`.
    fn clear_in(
        &mut self,
        id: NodeId,
        height: u8,
        base: u64,
        from: u64,
        to: u64,
    ) -> FsResult<(NodeId, u64)> {
        let end = u128::from(base) + coverage(height);
        if base >= from && end <= u128::from(to) {
            self.decref_node(id)?;
            return Ok((NodeId::NONE, 0));
        }
        let (id, mut node) = self.own(id)?;
        match &mut node {
            Node::Leaf(s) => {
                let lo = from.saturating_sub(base) as usize;
                let hi = (u128::from(to) - u128::from(base)).min(FANOUT as u128) as usize;
                for slot in s.iter_mut().take(hi).skip(lo) {
                    if let Some(o) = slot.take() {
                        self.chunks.decref(o)?;
                    }
                }
            }
            Node::Interior(_, s) => {
                let span = child_span(height);
                for (i, c) in s.iter_mut().enumerate() {
                    let cb = base + i as u64 * span;
                    if !c.0.is_none()
                        && cb < to
                        && u128::from(cb) + u128::from(span) > u128::from(from)
                    {
                        *c = self.clear_in(c.0, height - 1, cb, from, to)?;
                    }
                }
            }
        }
        if node.is_empty() {
            self.free(id)?;
            return Ok((NodeId::NONE, 0));
        }
        self.put(id, &node)?;
        Ok((id, node.total()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_encoding_roundtrip() {
        let mut n = Node::empty(0);
        if let Node::Leaf(s) = &mut n {
            s[3] = Some(ChunkKey(7));
            s[8] = Some(ChunkKey(8));
            s[255] = Some(ChunkKey::alias(1));
        }
        let b = n.encode();
        assert_eq!(b.len(), 3 + 32 + 3 * 7);
        assert_eq!(Node::decode(&b), Some(n.clone()));
        assert_eq!(n.total(), 3);
        let v = LeafView::new(&b).unwrap();
        assert_eq!(v.find(8), Some(ChunkKey(8)));
        assert_eq!(v.find(255), Some(ChunkKey::alias(1)));
        assert_eq!(v.find(4), None);
        let from4: Vec<_> = v.iter_from(4).collect();
        assert_eq!(from4, vec![(8, ChunkKey(8)), (255, ChunkKey::alias(1))]);
        // A count that disagrees with the bitmap is damage, not a short read.
        let mut bad = b.clone();
        bad[1] = 2;
        assert_eq!(Node::decode(&bad), None);
        let mut i = Node::empty(2);
        if let Node::Interior(_, s) = &mut i {
            s[1] = (NodeId(44), 10);
        }
        assert_eq!(Node::decode(&i.encode()), Some(i));
        assert_eq!(Node::decode(&[0, 1, 0]), None);
    }

    #[test]
    fn coverage_grows_by_fanout() {
        assert_eq!(coverage(0), 256);
        assert_eq!(coverage(1), 65536);
        assert_eq!(child_span(1), 256);
    }
}
