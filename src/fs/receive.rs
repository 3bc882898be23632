//! `tessera receive`: build a read-only replica from a stream of `tessera send`, and `tessera
//! promote` to make a replica writable (failover).
//!
//! The tree is built in a staging folder, `/.snapshots/.receiving/<n>/tree`, read-only to
//! everything else; each chunk received is verified against its id, appended if the datastore
//! does not hold it yet, and held from the moment it is indexed by a staging file
//! (`.../held`), so reclamation cannot take it before the maps that use it arrive. A damaged
//! stream leaves nothing behind (the staging folder is removed). A stream cut short keeps
//! what arrived for the same stream sent again (`STAGING_KEEP`); after a kill -9 of this side,
//! the chunks appended since the last durable point are found again in the packs
//! (`Store::orphan_records`). At the end one durable transaction moves the
//! result into place: a new replica at the target path, or, for an incremental stream, the
//! replica changed in place (files present in both keep their inodes), plus a snapshot of the
//! same name and time as the sender's, the base of the next incremental stream.

use std::collections::HashMap;
use std::io::Read;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::clone::{children, clone_tree, CloneAs};
use super::dir::{add_entry, lookup_in, new_inode};
use super::inode::{Generation, Inode, InodeId, Kind, Time, FLAG_REPLICA, FLAG_SNAPSHOT};
use super::snapshot::{
    check_snap_name, entry_name, flagged_dir, mirror_parent, norm, snap_root, SnapshotInfo,
};
use super::stream::{Frame, Reader};
use super::{check_name, Engine, FsError, FsResult, W};
use crate::schema::{SNAPSHOTS, SNAP_RECEIVED};
use crate::store::chunk::ChunkId;
use crate::store::{ChunkKey, ChunkLoc, Encoded};

/// Records read ahead of the one being stored (4 MiB each at most).
const READ_AHEAD: usize = 8;

/// Name of the staging folder under `/.snapshots`.
const RECEIVING: &[u8] = b".receiving";

/// How long the staging folder of a cut receive waits to be resumed before a later receive
/// removes it (and the chunks it holds become reclaimable).
const STAGING_KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Answers a `Have` frame: which of its chunks this datastore holds (network replication).
pub type Answer<'a> = &'a mut dyn FnMut(&[bool]) -> FsResult<()>;

/// The staging folder's name for one stream: resumes find it again.
fn staging_key(source: u64, path: &str, snap: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&source.to_le_bytes());
    h.update(path.as_bytes());
    h.update(&[0]);
    h.update(snap.as_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// Check a `Chunks` frame as it is read: each chunk the datastore's size, its payload within
/// the record limit, and its content matching its id (decompressed and hashed on all cores).
/// Sizes first: nothing is decompressed past a chunk's size.
fn check_chunks(chunk_size: u64) -> impl Fn(Frame) -> std::io::Result<Frame> {
    move |f| {
        if let Frame::Chunks(cs) = &f {
            let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
            for e in cs {
                if u64::from(e.raw_len) != chunk_size
                    || e.payload.len() > crate::store::MAX_RECORD_PAYLOAD as usize
                {
                    return Err(bad("a chunk of the wrong size: damaged stream".into()));
                }
            }
            cs.par_iter()
                .try_for_each(|e| e.verify().map_err(|d| bad(format!("{d}: damaged stream"))))?;
        }
        Ok(f)
    }
}

/// A stream that ended early (as opposed to one that is damaged).
fn is_cut(e: &FsError) -> bool {
    matches!(e, FsError::StreamCut(_) | FsError::Io(_))
}

/// What a receive did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    /// The replica's path in this datastore.
    pub path: String,
    pub snapshot: Option<SnapshotInfo>,
    pub entries: u64,
    /// Chunks the stream carried, and of those, how many this datastore already held.
    pub chunks: u64,
    pub chunks_already_held: u64,
    /// Chunk payload bytes in the stream (as stored).
    pub chunk_bytes: u64,
    pub stream_bytes: u64,
    pub incremental: bool,
}

fn stream_err(e: std::io::Error) -> FsError {
    match e.kind() {
        std::io::ErrorKind::InvalidData => FsError::Stream(e.to_string()),
        std::io::ErrorKind::UnexpectedEof => FsError::StreamCut(e.to_string()),
        _ => FsError::Io(e),
    }
}

/// State of one receive.
struct Staging {
    /// `/.snapshots/.receiving/<n>`.
    dir: InodeId,
    /// Its name in `.receiving`.
    name: Vec<u8>,
    /// The holder of received chunks, and its next free slot.
    held: InodeId,
    next_slot: u64,
    /// Entries built so far by relative path.
    built: HashMap<Vec<u8>, InodeId>,
    /// The file whose maps come next: (inode, slots it may have).
    file: Option<(InodeId, u64)>,
    /// Keys of chunks received or held in this session (at most `KEYS_KEPT`): the maps that
    /// follow use them without looking each chunk up by id again.
    keys: HashMap<ChunkId, ChunkKey>,
    /// Map slots received and not set yet, by file (`apply_maps`), and how many.
    maps: Vec<(InodeId, Vec<MapSlot>)>,
    map_slots: usize,
}

/// A map slot as received: slot number, and its chunk (`None`: a hole).
type MapSlot = (u64, Option<ChunkId>);

/// Map slots buffered before they are set (about 48 bytes each): a few files' maps, so the
/// chunks they share get one reference update, not one per file.
const MAP_SLOTS_BUFFERED: usize = 1 << 19;

/// Chunk keys remembered by a receive (about 48 bytes each): several batches of a stream.
const KEYS_KEPT: usize = 1 << 18;

impl Staging {
    fn remember(&mut self, keys: impl IntoIterator<Item = (ChunkId, ChunkKey)>) {
        for (id, k) in keys {
            if self.keys.len() >= KEYS_KEPT {
                // The maps that use older ones have arrived: a stream sends a batch's chunks
                // just before the batch's entries.
                self.keys.clear();
            }
            self.keys.insert(id, k);
        }
    }
}

impl Engine {
    /// Receive a stream from `inp` into `target` (default: the path it was sent from).
    /// `progress(entries done, 0)`.
    pub fn receive(
        &self,
        inp: Box<dyn Read + Send>,
        target: Option<&str>,
        force: bool,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<ReceiveReport> {
        self.receive_with(inp, target, force, None, progress)
    }

    /// [`Engine::receive`] answering the sender's `Have` frames through `answer` (network
    /// replication: the chunks held are held for the rest of the receive and not sent).
    pub fn receive_with(
        &self,
        inp: Box<dyn Read + Send>,
        target: Option<&str>,
        force: bool,
        answer: Option<Answer<'_>>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<ReceiveReport> {
        let _one = self.receive_lock.lock();
        self.remove_stale_staging()?;
        let mut r = Reader::new(inp).map_err(stream_err)?;
        let Frame::Header(h) = r.next_frame().map_err(stream_err)? else {
            return Err(FsError::Stream(
                "the stream does not start with its header".into(),
            ));
        };
        if h.chunk_size != self.chunk_size {
            return Err(FsError::Stream(format!(
                "the stream's chunk size ({} bytes) differs from this datastore's ({}): receive into a datastore made with `tessera init --chunk-size {}`",
                h.chunk_size, self.chunk_size, h.chunk_size
            )));
        }
        let p = norm(target.unwrap_or(&h.path))?;
        if p.is_empty() {
            return Err(FsError::Invalid(
                "receive into a path inside the datastore, not its root",
            ));
        }
        check_snap_name(&h.snap)?;
        // Where it goes, and the base an incremental stream applies to.
        let existing = self.resolve(p.as_bytes()).ok();
        let base = match &h.from {
            Some((from, created)) => {
                let b = self.snapshot_ino(&p, from).map_err(|_| {
                    FsError::Stream(format!(
                        "/{p} has no snapshot {from}, the base of this incremental stream: send a full stream first (without --from), or name the path that has it"
                    ))
                })?;
                let have = self
                    .snapshot_list(Some(&p))?
                    .into_iter()
                    .find(|s| s.name == *from)
                    .map(|s| s.created);
                if have != Some(*created) {
                    return Err(FsError::Stream(format!(
                        "snapshot {from} of /{p} is not the one this stream was made against (taken at another time)"
                    )));
                }
                let Some(cur) = existing else {
                    return Err(FsError::Stream(format!(
                        "/{p} does not exist: an incremental stream applies to the replica it was made for"
                    )));
                };
                if !self.getattr(cur)?.inode.is_read_only() && !force {
                    return Err(FsError::Stream(format!(
                        "/{p} is writable (promoted, or never a replica): --force replaces what changed there since {from}"
                    )));
                }
                Some(b)
            }
            None => {
                if existing.is_some() {
                    return Err(FsError::Exists);
                }
                None
            }
        };
        if self.snapshot_ino(&p, &h.snap).is_ok() {
            return Err(FsError::Stream(format!(
                "/{p} already has a snapshot {}: this stream was received before",
                h.snap
            )));
        }
        let key = staging_key(h.source, &p, &h.snap);
        let mut st = self.staging_begin(&key)?;
        // Resuming after a kill -9 of this side: the chunks it caught between their append and
        // the next durable point are in the packs still; keep them, so they are not sent
        // again. (After a clean stop there are none, and nothing is read.)
        self.adopt_orphans(&mut st)?;
        let mut rep = ReceiveReport {
            path: format!("/{p}"),
            incremental: base.is_some(),
            ..ReceiveReport::default()
        };
        // Frames are read and checked on their own thread, a few ahead, so the network (or
        // pipe) is read while the previous record is verified, stored and committed. The
        // thread ends at the stream's end, at an error, or when the input closes (the caller
        // closes it once this returns).
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Frame>>(READ_AHEAD);
        let chunk_size = self.chunk_size;
        let (btx, brx) = std::sync::mpsc::channel::<u64>();
        std::thread::Builder::new()
            .name("tessera-recv-rd".into())
            .spawn(move || loop {
                // Chunks are checked here, on all cores, while the previous record is stored.
                let f = r.next_frame().and_then(check_chunks(chunk_size));
                let last = !matches!(f, Ok(ref x) if !matches!(x, Frame::End(_)));
                if tx.send(f).is_err() || last {
                    let _ = btx.send(r.bytes);
                    return;
                }
            })?;
        // What was held is made durable about every second by a helper thread, so a receive
        // cut by a crash of this side resumes from there too; the fsyncs happen there, not in
        // the way of storing the next record.
        let out = std::thread::scope(|scope| {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let keeper = std::thread::Builder::new()
                .name("tessera-recv-sync".into())
                .spawn_scoped(scope, move || -> FsResult<()> {
                    use std::sync::mpsc::RecvTimeoutError;
                    while let Err(RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(std::time::Duration::from_secs(1))
                    {
                        self.make_durable()?;
                    }
                    Ok(())
                })?;
            let out = self.receive_frames(&rx, &mut st, base, &mut rep, answer, progress);
            drop(stop);
            let kept = keeper
                .join()
                .unwrap_or_else(|_| Err(FsError::BadMeta("the durability thread panicked".into())));
            out.and(kept)
        });
        let out = out.and_then(|()| self.receive_finish(&p, &h, &st, base.is_some()));
        match out {
            Ok(info) => {
                rep.snapshot = Some(info);
                rep.stream_bytes = brx.recv().unwrap_or(0);
                Ok(rep)
            }
            // A cut (the connection or the pipe closed early): what arrived stays held, and
            // the same stream sent again resumes from there (chunks already here are not
            // asked for again over the network, nor stored twice).
            Err(e) if is_cut(&e) => Err(e),
            Err(e) => {
                if let Err(e2) = self.staging_remove(&st.name) {
                    tracing::warn!("cannot remove the staging folder of a failed receive: {e2}");
                }
                Err(e)
            }
        }
    }

    fn receive_frames(
        &self,
        r: &std::sync::mpsc::Receiver<std::io::Result<Frame>>,
        st: &mut Staging,
        base: Option<InodeId>,
        rep: &mut ReceiveReport,
        mut answer: Option<Answer<'_>>,
        progress: &dyn Fn(u64, u64),
    ) -> FsResult<()> {
        let c = self.chunk_size;
        loop {
            let f = r.recv().map_err(|_| {
                FsError::StreamCut("the stream reader stopped: the stream was cut".into())
            })?;
            match f.map_err(stream_err)? {
                Frame::Have(ids) => {
                    let Some(a) = answer.as_deref_mut() else {
                        return Err(FsError::Stream(
                            "a chunk query in a stream read from a pipe".into(),
                        ));
                    };
                    let held = self.hold_present(st, &ids)?;
                    rep.chunks_already_held += held.iter().filter(|h| **h).count() as u64;
                    a(&held)?;
                }
                Frame::Header(_) => {
                    return Err(FsError::Stream("a second header: damaged stream".into()))
                }
                Frame::Chunks(cs) => {
                    rep.chunks += cs.len() as u64;
                    rep.chunk_bytes += cs.iter().map(|e| e.payload.len() as u64).sum::<u64>();
                    // From the first append to the commit that indexes it (gc waits).
                    let _appending = self.store.append_session();
                    let ids: Vec<ChunkId> = cs.iter().map(|e| e.id).collect();
                    let held = self.store.contains_many(&*self.read_txn()?, &ids)?;
                    let new: Vec<Encoded> = cs
                        .into_iter()
                        .zip(&held)
                        .filter(|(_, h)| !**h)
                        .map(|(e, _)| e)
                        .collect();
                    rep.chunks_already_held += (ids.len() - new.len()) as u64;
                    let locs: HashMap<ChunkId, ChunkLoc> = new
                        .iter()
                        .map(|e| e.id)
                        .zip(self.store.append_many(&new)?)
                        .collect();
                    let (held_ino, first) = (st.held, st.next_slot);
                    let r = self.txn(false, |w| {
                        w.snapshots_writable = true;
                        let mut ups = Vec::with_capacity(ids.len());
                        for (k, id) in ids.iter().enumerate() {
                            // Another copy may have arrived meanwhile: `reference` counts ours dead.
                            let key = w.chunks.reference(id, locs.get(id))?.key;
                            ups.push((first + k as u64, Some(key)));
                        }
                        set_slots(w, held_ino, &ups, Some((first + ids.len() as u64) * c))?;
                        Ok(ups)
                    });
                    let ups = match r {
                        Ok(ups) => ups,
                        Err(e) => {
                            self.settle_failed_appends(&locs, &Default::default());
                            return Err(e);
                        }
                    };
                    st.next_slot += ids.len() as u64;
                    st.remember(ids.into_iter().zip(ups.into_iter().filter_map(|(_, k)| k)));
                }
                Frame::Entry(e) => {
                    if e.same_as.is_some() {
                        // A clone of a file received earlier: its maps must be in place.
                        self.apply_maps(st)?;
                    }
                    self.receive_entry(st, base, &e)?;
                    rep.entries += 1;
                    progress(rep.entries, 0);
                }
                Frame::Map(slots) => {
                    let Some((ino, n_slots)) = st.file else {
                        return Err(FsError::Stream(
                            "a map without its file: damaged stream".into(),
                        ));
                    };
                    if slots.iter().any(|(s, _)| *s >= n_slots) {
                        return Err(FsError::Stream(
                            "a map slot past the end of its file: damaged stream".into(),
                        ));
                    }
                    st.map_slots += slots.len();
                    match st.maps.last_mut() {
                        Some((i, m)) if *i == ino => m.extend(slots),
                        _ => st.maps.push((ino, slots)),
                    }
                    if st.map_slots >= MAP_SLOTS_BUFFERED {
                        self.apply_maps(st)?;
                    }
                }
                Frame::End(end) => {
                    if end.entries != rep.entries
                        || end.chunks != rep.chunks
                        || end.chunk_bytes != rep.chunk_bytes
                    {
                        return Err(FsError::Stream(format!(
                            "the stream says {} entries and {} chunks, {} arrived: damaged stream",
                            end.entries, end.chunks, rep.chunks
                        )));
                    }
                    if !st.built.contains_key(&Vec::new()) {
                        return Err(FsError::Stream("the stream holds no entries".into()));
                    }
                    return self.apply_maps(st);
                }
            }
        }
    }

    /// Set the buffered map slots in the staging tree, in one transaction: one reference
    /// update per distinct chunk across all of them (files of one family share most chunks),
    /// in key order.
    fn apply_maps(&self, st: &mut Staging) -> FsResult<()> {
        let maps = std::mem::take(&mut st.maps);
        st.map_slots = 0;
        if maps.is_empty() {
            return Ok(());
        }
        self.txn(false, |w| {
            w.snapshots_writable = true;
            let mut uses: HashMap<ChunkId, u64> = HashMap::new();
            for (_, slots) in &maps {
                for id in slots.iter().filter_map(|(_, id)| id.as_ref()) {
                    *uses.entry(*id).or_insert(0) += 1;
                }
            }
            let mut keys = HashMap::with_capacity(uses.len());
            // Most were received (or held) in this session: their key is known.
            let mut known: Vec<(ChunkKey, ChunkId, u64)> = Vec::new();
            let mut unknown: Vec<(ChunkId, u64)> = Vec::new();
            for (id, n) in uses {
                match st.keys.get(&id) {
                    Some(&k) => known.push((k, id, n)),
                    None => unknown.push((id, n)),
                }
            }
            known.sort_unstable_by_key(|x| x.0);
            for (k, id, n) in known {
                if w.chunks.incref_known(k, &id, n)? {
                    keys.insert(id, k);
                } else {
                    unknown.push((id, n));
                }
            }
            for (id, n) in unknown {
                match w.chunks.find(&id)? {
                    Some((k, l)) if !l.is_lost() => {
                        w.chunks.incref_by(k, n)?;
                        keys.insert(id, k);
                    }
                    _ => {
                        return Err(FsError::Stream(format!(
                            "the stream uses chunk {} without sending it, and this datastore does not hold it: damaged stream, or a base that differs",
                            id.short()
                        )))
                    }
                }
            }
            for (ino, slots) in &maps {
                let ups: Vec<_> = slots
                    .iter()
                    .map(|(s, id)| (*s, id.map(|id| keys[&id])))
                    .collect();
                set_slots(w, *ino, &ups, None)?;
            }
            Ok(())
        })
    }

    /// Create one received entry in the staging tree.
    fn receive_entry(
        &self,
        st: &mut Staging,
        base: Option<InodeId>,
        e: &super::stream::Entry,
    ) -> FsResult<()> {
        let kind = Kind::from_u8(e.kind)
            .ok_or_else(|| FsError::Stream("unknown file kind: damaged stream".into()))?;
        let (parent, name): (InodeId, Vec<u8>) = if e.path.is_empty() {
            (st.dir, b"tree".to_vec())
        } else {
            let (pp, n) = match e.path.iter().rposition(|&b| b == b'/') {
                Some(i) => (e.path[..i].to_vec(), e.path[i + 1..].to_vec()),
                None => (Vec::new(), e.path.clone()),
            };
            check_name(&n)
                .map_err(|_| FsError::Stream("a bad name in the stream: damaged stream".into()))?;
            let p = *st.built.get(&pp).ok_or_else(|| {
                FsError::Stream("an entry before its folder: damaged stream".into())
            })?;
            (p, n)
        };
        // The same file in the base snapshot, for an incremental map.
        let base_file = match (e.on_base, base) {
            (true, Some(b)) => {
                let mut cur = b;
                let rtx = self.read_txn()?;
                let d = rtx.open_table(crate::schema::DIRENTS)?;
                for comp in e.path.split(|&x| x == b'/').filter(|c| !c.is_empty()) {
                    cur = d
                        .get((cur.0, comp))?
                        .map(|v| InodeId(v.value().0))
                        .ok_or_else(|| {
                            FsError::Stream(
                                "the stream changes a file its base does not hold".into(),
                            )
                        })?;
                }
                Some(cur)
            }
            (true, None) => {
                return Err(FsError::Stream(
                    "an incremental entry in a full stream".into(),
                ))
            }
            _ => None,
        };
        let c = self.chunk_size;
        let n_slots = e.size.div_ceil(c);
        let twin = match &e.same_as {
            Some(p) => Some(*st.built.get(p).ok_or_else(|| {
                FsError::Stream(
                    "a file shares the map of a file not received: damaged stream".into(),
                )
            })?),
            None => None,
        };
        let ino = self.txn(false, |w| {
            w.snapshots_writable = true;
            let mut i = Inode::new(kind, e.perm, e.uid, e.gid, Generation(0));
            i.rdev = e.rdev;
            i.size = e.size;
            i.atime = Time {
                secs: e.atime.0,
                nsecs: e.atime.1,
            };
            i.mtime = Time {
                secs: e.mtime.0,
                nsecs: e.mtime.1,
            };
            i.flags = FLAG_SNAPSHOT;
            // A clone of a file received earlier, or the base's file an incremental map
            // changes: the new file starts from its chunk map.
            let shared = match (twin, base_file) {
                (Some(t), _) => Some((t, "a file shares the map of a non-file: damaged stream")),
                (None, Some(b)) => Some((b, "the stream's base file is not a file")),
                (None, None) => None,
            };
            if let Some((from, not_a_file)) = shared {
                let fi = w.inode(from)?;
                if fi.kind != Kind::File || kind != Kind::File {
                    return Err(FsError::Stream(not_a_file.into()));
                }
                w.tree().incref_node(fi.root.node)?;
                let (root, total) = w.tree().truncate(fi.root, n_slots)?;
                i.root = root;
                i.aux = total;
            }
            let (ino, _) = new_inode(w, i)?;
            if let Some(t) = &e.symlink {
                w.symlinks.insert(ino.0, t.as_slice())?;
            }
            for (k, v) in &e.xattrs {
                w.xattrs.insert((ino.0, k.as_slice()), v.as_slice())?;
            }
            add_entry(w, parent, &name, ino, kind == Kind::Dir)?;
            Ok(ino)
        })?;
        st.built.insert(e.path.clone(), ino);
        st.file = (kind == Kind::File && twin.is_none()).then_some((ino, n_slots));
        Ok(())
    }

    /// Put the staged tree in place and record its snapshot, in one durable transaction.
    fn receive_finish(
        &self,
        p: &str,
        h: &super::stream::Header,
        st: &Staging,
        incremental: bool,
    ) -> FsResult<SnapshotInfo> {
        let top = st.built[&Vec::new()];
        let mut gone = Vec::new();
        self.txn(true, |w| {
            w.snapshots_writable = true;
            let (pp, base) = p.rsplit_once('/').unwrap_or(("", p));
            let parent = mkdir_p(w, pp)?;
            if incremental {
                let (cur, _) = lookup_in(w, parent, base.as_bytes())?.ok_or(FsError::NotFound)?;
                self.rollback_one(
                    w,
                    parent,
                    base.as_bytes(),
                    cur,
                    top,
                    CloneAs::Replica,
                    &mut gone,
                )?;
            } else {
                if lookup_in(w, parent, base.as_bytes())?.is_some() {
                    return Err(FsError::Exists);
                }
                clone_tree(w, top, parent, base.as_bytes(), CloneAs::Replica)?;
            }
            let mp = mirror_parent(w, p)?;
            let entry = entry_name(p, &h.snap);
            if lookup_in(w, mp, &entry)?.is_some() {
                return Err(FsError::Exists);
            }
            let snap = clone_tree(w, top, mp, &entry, CloneAs::Snapshot)?;
            let mut t = w.txn.open_table(SNAPSHOTS)?;
            t.insert(
                (p.as_bytes(), h.snap.as_bytes()),
                (snap.0, h.created, SNAP_RECEIVED),
            )?;
            drop(t);
            let recv = receiving_dir(w)?;
            self.remove_tree(w, recv, &st.name, &mut gone)?;
            Ok(())
        })?;
        for ino in gone {
            self.drop_state(ino);
        }
        Ok(self
            .snapshot_list(Some(p))?
            .into_iter()
            .find(|s| s.name == h.snap)
            .expect("just recorded"))
    }

    /// The staging folder of the stream `key`: the one a cut receive of the same stream left
    /// (its held chunks kept, its tree rebuilt), or a new one.
    fn staging_begin(&self, key: &str) -> FsResult<Staging> {
        let c = self.chunk_size;
        let mut gone = Vec::new();
        let st = self.txn(false, |w| {
            w.snapshots_writable = true;
            let recv = receiving_dir(w)?;
            let name = key.as_bytes().to_vec();
            if let Some((dir, _)) = lookup_in(w, recv, &name)? {
                if lookup_in(w, dir, b"tree")?.is_some() {
                    self.remove_tree(w, dir, b"tree", &mut gone)?;
                }
                let (held, _) = lookup_in(w, dir, b"held")?.ok_or_else(|| {
                    FsError::BadMeta("a staging folder without its held chunks".into())
                })?;
                let next_slot = w.inode(held)?.size.div_ceil(c);
                return Ok(Staging {
                    dir,
                    name,
                    held,
                    next_slot,
                    built: HashMap::new(),
                    file: None,
                    keys: HashMap::new(),
                    maps: Vec::new(),
                    map_slots: 0,
                });
            }
            let dir = flagged_dir(w, InodeId::ROOT)?;
            add_entry(w, recv, &name, dir, true)?;
            let mut i = Inode::new(Kind::File, 0o400, 0, 0, Generation(0));
            i.flags = FLAG_SNAPSHOT;
            let (held, _) = new_inode(w, i)?;
            add_entry(w, dir, b"held", held, false)?;
            Ok(Staging {
                dir,
                name,
                held,
                next_slot: 0,
                built: HashMap::new(),
                file: None,
                keys: HashMap::new(),
                maps: Vec::new(),
                map_slots: 0,
            })
        })?;
        for ino in gone {
            self.drop_state(ino);
        }
        Ok(st)
    }

    /// Hold (in the staging holder) the intact records the index lost to a crash
    /// (`Store::orphan_records`); returns how many.
    fn adopt_orphans(&self, st: &mut Staging) -> FsResult<u64> {
        let orphans = self.store.orphan_records(&*self.read_txn()?)?;
        if orphans.is_empty() {
            return Ok(0);
        }
        let c = self.chunk_size;
        let (held_ino, first, n) = (st.held, st.next_slot, orphans.len() as u64);
        let keys = self.txn(true, |w| {
            w.snapshots_writable = true;
            let mut ups = Vec::with_capacity(orphans.len());
            for (k, (id, loc)) in orphans.iter().enumerate() {
                ups.push((
                    first + k as u64,
                    Some(w.chunks.reference(id, Some(loc))?.key),
                ));
            }
            // Stored again meanwhile by another writer: that record stays dead space.
            w.chunks
                .settle_appended(orphans.iter().map(|(id, loc)| (id, loc)))?;
            set_slots(w, held_ino, &ups, Some((first + n) * c))?;
            Ok(ups)
        })?;
        st.next_slot += n;
        st.remember(
            orphans
                .iter()
                .map(|o| o.0)
                .zip(keys.into_iter().filter_map(|(_, k)| k)),
        );
        tracing::info!("receive: resuming with {n} chunks a crash had left out of the index");
        Ok(n)
    }

    /// Hold (in the staging holder) those of `ids` this datastore has: they cannot be
    /// reclaimed before the maps that use them arrive. Returns which it has.
    fn hold_present(&self, st: &mut Staging, ids: &[ChunkId]) -> FsResult<Vec<bool>> {
        let c = self.chunk_size;
        let (held_ino, first) = (st.held, st.next_slot);
        let mut keys = Vec::new();
        let (have, n) = self.txn(false, |w| {
            w.snapshots_writable = true;
            let mut have = Vec::with_capacity(ids.len());
            let mut ups = Vec::new();
            for id in ids {
                let key = w.chunks.incref_present(id)?;
                if let Some(key) = key {
                    ups.push((first + ups.len() as u64, Some(key)));
                    keys.push((*id, key));
                }
                have.push(key.is_some());
            }
            if !ups.is_empty() {
                set_slots(w, held_ino, &ups, Some((first + ups.len() as u64) * c))?;
            }
            Ok((have, ups.len() as u64))
        })?;
        st.next_slot += n;
        st.remember(keys);
        Ok(have)
    }

    fn staging_remove(&self, name: &[u8]) -> FsResult<()> {
        let mut gone = Vec::new();
        self.txn(true, |w| {
            w.snapshots_writable = true;
            let recv = receiving_dir(w)?;
            if lookup_in(w, recv, name)?.is_some() {
                self.remove_tree(w, recv, name, &mut gone)?;
            }
            Ok(())
        })?;
        for ino in gone {
            self.drop_state(ino);
        }
        Ok(())
    }

    /// Staging folders of receives cut more than `STAGING_KEEP` ago and never resumed.
    fn remove_stale_staging(&self) -> FsResult<()> {
        let now = Time::now().secs;
        let stale: Vec<Vec<u8>> = self.txn(false, |w| {
            let Some(root) = snap_root(w, false)? else {
                return Ok(Vec::new());
            };
            let Some((d, _)) = lookup_in(w, root, RECEIVING)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for (n, ino) in children(w, d)? {
                if now - w.inode(ino)?.ctime.secs > STAGING_KEEP.as_secs() as i64 {
                    out.push(n);
                }
            }
            Ok(out)
        })?;
        for n in stale {
            tracing::info!("removing the staging folder of a receive cut long ago");
            self.staging_remove(&n)?;
        }
        Ok(())
    }

    /// Make the replica at `path` writable: the failover step. Its snapshots stay; a later
    /// incremental receive into it needs `--force` (it would replace what changed here).
    pub fn promote(&self, path: &str) -> FsResult<u64> {
        let p = norm(path)?;
        self.txn(true, |w| {
            w.snapshots_writable = true;
            let top = super::dir::resolve_in(&w.dirents, p.as_bytes())?;
            let ti = w.inode(top)?;
            if ti.flags & FLAG_REPLICA == 0 {
                return Err(FsError::Invalid("not a replica (nothing to promote)"));
            }
            let mut n = 0;
            let mut stack = vec![top];
            while let Some(ino) = stack.pop() {
                let mut i = w.inode(ino)?;
                if i.kind == Kind::Dir {
                    stack.extend(children(w, ino)?.into_iter().map(|(_, c)| c));
                }
                if i.flags & FLAG_REPLICA != 0 {
                    i.flags &= !FLAG_REPLICA;
                    i.ctime = Time::now();
                    w.put_inode(ino, &i)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }
}

/// Set chunk-map slots of file `ino` (their references already taken) and, if given, its size.
fn set_slots(
    w: &mut W<'_>,
    ino: InodeId,
    ups: &[(u64, Option<crate::store::ChunkKey>)],
    size: Option<u64>,
) -> FsResult<()> {
    let mut i = w.inode(ino)?;
    let (root, total) = w.tree().set(i.root, ups)?;
    i.root = root;
    i.aux = total;
    if let Some(s) = size {
        i.size = s;
    }
    w.put_inode(ino, &i)
}

/// `/.snapshots/.receiving`, created on demand.
fn receiving_dir(w: &mut W<'_>) -> FsResult<InodeId> {
    let root = snap_root(w, true)?.expect("created");
    Ok(match lookup_in(w, root, RECEIVING)? {
        Some((d, _)) => d,
        None => {
            let d = flagged_dir(w, InodeId::ROOT)?;
            add_entry(w, root, RECEIVING, d, true)?;
            d
        }
    })
}

/// The folder at `path` (relative to the root), created with its parents as needed (owned like
/// the root). A read-only folder on the way is refused.
fn mkdir_p(w: &mut W<'_>, path: &str) -> FsResult<InodeId> {
    let mut cur = InodeId::ROOT;
    for c in path.split('/').filter(|c| !c.is_empty()) {
        cur = match lookup_in(w, cur, c.as_bytes())? {
            Some((ino, _)) => {
                let i = w.inode(ino)?;
                if i.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                if i.is_read_only() {
                    return Err(FsError::ReadOnly);
                }
                ino
            }
            None => {
                let owner = w.inode(InodeId::ROOT)?;
                let (ino, _) = new_inode(
                    w,
                    Inode::new(Kind::Dir, 0o755, owner.uid, owner.gid, Generation(0)),
                )?;
                add_entry(w, cur, c.as_bytes(), ino, true)?;
                ino
            }
        };
    }
    Ok(cur)
}
