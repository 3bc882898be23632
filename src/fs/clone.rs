//! Clones: whole files and directory trees in O(1) per file, and chunk sharing for ranges
//! (`copy_file_range`).
//!
//! A cloned file gets a new inode whose chunk map root is the source's root with one more
//! reference (see `tree.rs`): nothing proportional to the file's size is copied or counted.

use std::collections::HashMap;

use redb::ReadableTable;

use super::dir::{add_entry, lookup_in, new_inode};
use super::inode::{InodeId, Kind, Time, FLAG_REPLICA, FLAG_SNAPSHOT};
use super::{check_name, tree, Engine, FsError, FsResult, W};

/// Split `a/b/c` into (`a/b`, `c`).
fn split_parent(path: &[u8]) -> FsResult<(&[u8], &[u8])> {
    let p = path.strip_suffix(b"/").unwrap_or(path);
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => Ok((&p[..i], &p[i + 1..])),
        None if !p.is_empty() => Ok((b"", p)),
        None => Err(FsError::Invalid("empty destination path")),
    }
}

fn resolve_w(w: &W<'_>, path: &[u8]) -> FsResult<InodeId> {
    super::dir::resolve_in(&w.dirents, path)
}

/// Why a clone request failed, naming the path it is about.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("source {0} does not exist")]
    SrcMissing(String),
    #[error("destination {0} already exists")]
    DstExists(String),
    #[error("destination folder {0} does not exist")]
    DstParentMissing(String),
    #[error("cannot clone {0} into itself")]
    IntoItself(String),
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl Engine {
    /// Clone the file or directory tree at `src` to each path in `dsts` (paths relative to the
    /// datastore root), in one durable transaction. Returns the new inodes.
    pub fn clone_paths(&self, src: &[u8], dsts: &[Vec<u8>]) -> Result<Vec<InodeId>, CloneError> {
        self.clone_paths_progress(src, dsts, &|_, _| {})
    }

    /// [`Engine::clone_paths`], reporting `(clones made, clones)` as it goes (`clone --count`
    /// of thousands). All or none: the clones appear together when the transaction commits.
    pub fn clone_paths_progress(
        &self,
        src: &[u8],
        dsts: &[Vec<u8>],
        progress: &dyn Fn(u64, u64),
    ) -> Result<Vec<InodeId>, CloneError> {
        let show = |p: &[u8]| format!("/{}", String::from_utf8_lossy(p).trim_start_matches('/'));
        // The clone must see data written up to now: flush the source file, or every file with
        // unflushed data when the source is a folder.
        match self.resolve(src) {
            Ok(ino) if self.getattr(ino).is_ok_and(|a| a.inode.kind != Kind::Dir) => {
                self.flush_ino(ino, false)?
            }
            _ => {
                let inos: Vec<InodeId> = self.files.iter().map(|e| *e.key()).collect();
                for ino in inos {
                    self.flush_ino(ino, false)?;
                }
            }
        }
        self.txn(true, |w| {
            let s = match resolve_w(w, src) {
                Err(FsError::NotFound) => return Ok(Err(CloneError::SrcMissing(show(src)))),
                r => r?,
            };
            let mut out = Vec::with_capacity(dsts.len());
            for dst in dsts {
                let (pp, name) = split_parent(dst)?;
                check_name(name)?;
                let parent = match resolve_w(w, pp) {
                    Err(FsError::NotFound) => {
                        return Ok(Err(CloneError::DstParentMissing(show(pp))))
                    }
                    r => r?,
                };
                if w.inode(parent)?.kind != Kind::Dir {
                    return Ok(Err(CloneError::DstParentMissing(show(pp))));
                }
                if lookup_in(w, parent, name)?.is_some() {
                    return Ok(Err(CloneError::DstExists(show(dst))));
                }
                if w.inode(s)?.kind == Kind::Dir && Self::is_within(w, parent, s)? {
                    return Ok(Err(CloneError::IntoItself(show(src))));
                }
                out.push(clone_tree(w, s, parent, name, CloneAs::Copy)?);
                progress(out.len() as u64, dsts.len() as u64);
            }
            Ok(Ok(out))
        })?
    }

    /// Copy `len` bytes from `src` at `off_in` to `dst` at `off_out`, sharing whole chunks
    /// instead of copying them where both offsets are chunk-aligned. A copy of a whole file
    /// onto an empty file shares its chunk map root: O(1), like a clone.
    /// Returns the bytes copied (short at the end of `src`).
    pub fn copy_range(
        &self,
        src: InodeId,
        off_in: u64,
        dst: InodeId,
        off_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        let c = self.chunk_size;
        let (lo, hi) = if src <= dst { (src, dst) } else { (dst, src) };
        let (st_lo, st_hi) = (self.entry(lo), self.entry(hi));
        let mut shared = 0u64;
        let total;
        {
            // Lock order: flush locks (inode order), then state locks (inode order). They are
            // held only while chunks are shared: the byte copy below goes through `write`,
            // which may flush these very files under memory pressure, and parking_lot locks
            // are not re-entrant (an unaligned 200 MiB copy deadlocked the whole datastore;
            // `copy_range_unaligned_larger_than_the_dirty_limit` protects this).
            let _f_lo = st_lo.flush.lock();
            let _f_hi = if lo != hi {
                Some(st_hi.flush.lock())
            } else {
                None
            };
            let mut g_lo = st_lo.state.write();
            self.flush_locked(lo, &mut g_lo, false, None)?;
            let mut g_hi = if lo != hi {
                Some(st_hi.state.write())
            } else {
                None
            };
            if let Some(g) = g_hi.as_deref_mut() {
                self.flush_locked(hi, g, false, None)?;
            }
            // Both files are flushed and locked: the tables hold their whole state.
            let (sa, da) = {
                let rtx = self.read_txn()?;
                let t = rtx.open_table(crate::schema::INODES)?;
                (super::get_inode(&t, src)?, super::get_inode(&t, dst)?)
            };
            if sa.kind != Kind::File || da.kind != Kind::File {
                return Err(FsError::Invalid("copy between non-regular files"));
            }
            if off_in >= sa.size {
                return Ok(0);
            }
            total = len.min(sa.size - off_in);
            off_out
                .checked_add(total)
                .filter(|&e| e <= super::MAX_FILE_SIZE)
                .ok_or(FsError::TooBig)?;
            let overlap = src == dst && off_in < off_out + total && off_out < off_in + total;
            if off_in.is_multiple_of(c) && off_out.is_multiple_of(c) && !overlap {
                let new_end = off_out + total;
                // The source's last chunk is zero past its EOF, so it can be shared when the
                // destination ends there too.
                let tail_ok = off_in + total == sa.size && da.size <= new_end;
                let n = total / c + u64::from(tail_ok && total % c != 0);
                shared = (n * c).min(total);
                if n > 0 {
                    self.txn(false, |w| {
                        let mut di = w.inode(dst)?;
                        let si = w.inode(src)?;
                        if off_in == 0
                            && off_out == 0
                            && shared == si.size
                            && di.root.node.is_none()
                            && src != dst
                        {
                            w.tree().incref_node(si.root.node)?;
                            di.root = si.root;
                            di.aux = si.aux;
                        } else {
                            let first = off_in / c;
                            let present: HashMap<u64, _> =
                                tree::collect(&*w.tree().nodes, si.root, first, first + n)?
                                    .into_iter()
                                    .collect();
                            let base = off_out / c;
                            let ups: Vec<_> = (0..n)
                                .map(|k| (base + k, present.get(&(first + k)).copied()))
                                .collect();
                            // The destination's slots take their own references.
                            for k in ups.iter().filter_map(|u| u.1) {
                                w.chunks.incref(k)?;
                            }
                            let (r, t) = w.tree().set(di.root, &ups)?;
                            di.root = r;
                            di.aux = t;
                        }
                        di.size = di.size.max(off_out + shared);
                        let now = Time::now();
                        di.mtime = now;
                        di.ctime = now;
                        w.put_inode(dst, &di)
                    })?;
                }
            }
        }
        // The rest goes through the page-sized path, 1 MiB at a time.
        let mut done = shared;
        while done < total {
            let n = (total - done).min(1 << 20) as u32;
            let buf = self.read(src, off_in + done, n)?;
            if buf.is_empty() {
                break;
            }
            self.write(dst, off_out + done, &buf)?;
            done += buf.len() as u64;
        }
        Ok(done)
    }
}

/// What a clone's inodes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloneAs {
    /// A new file or folder (`tessera clone`): times are now.
    Copy,
    /// A snapshot: times kept, every inode flagged read-only.
    Snapshot,
    /// A writable copy of a snapshot (restore, rollback): times kept, flags cleared.
    Restore,
    /// A received replica (`receive.rs`): times kept, read-only until promoted.
    Replica,
}

/// Clone inode `src` (with everything under it, for a directory) as `parent/name`. Walks
/// with an explicit stack of folders still to copy, not by recursion, so a folder nested any
/// depth deep cannot overflow the thread's stack (FUSE and control threads have small ones).
pub(crate) fn clone_tree(
    w: &mut W<'_>,
    src: InodeId,
    parent: InodeId,
    name: &[u8],
    how: CloneAs,
) -> FsResult<InodeId> {
    let (top, kind) = clone_one(w, src, parent, name, how)?;
    // (source folder, its copy) whose entries are still to be cloned.
    let mut todo = Vec::new();
    if kind == Kind::Dir {
        todo.push((src, top));
    }
    while let Some((s, d)) = todo.pop() {
        for (n, c) in children(w, s)? {
            let (ino, kind) = clone_one(w, c, d, &n, how)?;
            if kind == Kind::Dir {
                todo.push((c, ino));
            }
        }
    }
    Ok(top)
}

/// The entries of folder `dir` (name, inode), in readdir order.
pub(crate) fn children(w: &W<'_>, dir: InodeId) -> FsResult<Vec<(Vec<u8>, InodeId)>> {
    let names: Vec<Vec<u8>> = w
        .cookies
        .range((dir.0, 0)..(dir.0 + 1, 0))?
        .map(|r| r.map(|(_, v)| v.value().to_vec()))
        .collect::<Result<_, _>>()?;
    let mut v = Vec::with_capacity(names.len());
    for n in names {
        if let Some((c, _)) = lookup_in(w, dir, &n)? {
            v.push((n, c));
        }
    }
    Ok(v)
}

/// Clone one inode (not what a folder contains) as `parent/name`; returns the copy and its
/// kind.
fn clone_one(
    w: &mut W<'_>,
    src: InodeId,
    parent: InodeId,
    name: &[u8],
    how: CloneAs,
) -> FsResult<(InodeId, Kind)> {
    let si = w.inode(src)?;
    let mut ni = si.clone();
    let now = Time::now();
    match how {
        CloneAs::Copy => {
            ni.atime = now;
            ni.mtime = now;
            ni.ctime = now;
            ni.flags = 0;
        }
        CloneAs::Snapshot => ni.flags = FLAG_SNAPSHOT,
        CloneAs::Restore => {
            ni.ctime = now;
            ni.flags = 0;
        }
        CloneAs::Replica => ni.flags = FLAG_REPLICA,
    }
    ni.nlink = if si.kind == Kind::Dir { 2 } else { 1 };
    match si.kind {
        Kind::File => w.tree().incref_node(si.root.node)?,
        Kind::Dir => ni.aux = 3,
        _ => {}
    }
    let (ino, _) = new_inode(w, ni)?;
    if si.kind == Kind::Symlink {
        let t = w
            .symlinks
            .get(src.0)?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        w.symlinks.insert(ino.0, t.as_slice())?;
    }
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = w
        .xattrs
        .range((src.0, [].as_slice())..(src.0 + 1, [].as_slice()))?
        .map(|r| r.map(|(k, v)| (k.value().1.to_vec(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (k, v) in xattrs {
        w.xattrs.insert((ino.0, k.as_slice()), v.as_slice())?;
    }
    add_entry(w, parent, name, ino, si.kind == Kind::Dir)?;
    Ok((ino, si.kind))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fs::dir::Ctx;
    use crate::fs::Format;
    use crate::store::pack::MemPackIo;

    /// A folder nested 20,000 deep clones without overflowing the stack (the test thread's
    /// is 2 MiB; a recursive walk needs far more at this depth).
    #[test]
    fn clones_a_very_deep_folder() {
        const DEPTH: usize = 20_000;
        let e = Engine::in_memory(Format::default(), Arc::new(MemPackIo::default())).unwrap();
        let mut dir = InodeId::ROOT;
        for _ in 0..DEPTH {
            dir = e.mkdir(dir, b"d", 0o755, Ctx::ROOT).unwrap().ino;
        }
        e.symlink(dir, b"bottom", b"target", Ctx::ROOT).unwrap();
        let out = e.clone_paths(b"d", &[b"copy".to_vec()]).unwrap();
        assert_eq!(out.len(), 1);
        let mut path = b"copy".to_vec();
        for _ in 1..DEPTH {
            path.extend_from_slice(b"/d");
        }
        path.extend_from_slice(b"/bottom");
        let link = e.resolve(&path).unwrap();
        assert_eq!(e.readlink(link).unwrap(), b"target");
        // The copy's inodes are all linked and counted right.
        let r = e.fsck(&|_, _| {}).unwrap();
        assert!(
            r.problems.is_empty(),
            "fsck: {:?}",
            &r.problems[..r.problems.len().min(5)]
        );
    }
}
