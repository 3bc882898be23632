//! Namespace operations: lookup, create, link, unlink, rename, readdir, path resolution.
//!
//! A directory's entries live in `dirents` (by name) and `dircookie` (by cookie). Cookies
//! come from a per-directory counter that only grows, so a listing resumed from a cookie is
//! stable while entries are added or removed. Each directory also has a `..` entry in
//! `dirents` naming its parent (not listed under a cookie).

use redb::ReadableTable;

use super::inode::{Generation, Inode, InodeId, Kind, Time};
use super::{check_name, get_inode, Attr, Engine, FsError, FsResult, W};
use crate::schema::*;

/// Who is asking: owner of what gets created.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
}

impl Ctx {
    pub const ROOT: Ctx = Ctx { uid: 0, gid: 0 };
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: InodeId,
    pub kind: Kind,
    pub name: Vec<u8>,
    /// Resume the listing after this entry by passing this cookie.
    pub cookie: u64,
}

/// Flags of rename.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    /// Fail with `Exists` if the target exists.
    pub noreplace: bool,
    /// Atomically swap source and target (both must exist).
    pub exchange: bool,
}

pub(crate) fn lookup_in(
    w: &W<'_>,
    parent: InodeId,
    name: &[u8],
) -> FsResult<Option<(InodeId, u64)>> {
    Ok(w.dirents.get((parent.0, name))?.map(|v| {
        let (c, k) = v.value();
        (InodeId(c), k)
    }))
}

/// The directory `ino`, checked to be one.
pub(crate) fn dir_inode(w: &W<'_>, ino: InodeId) -> FsResult<Inode> {
    let i = w.inode(ino)?;
    if i.kind != Kind::Dir {
        return Err(FsError::NotDir);
    }
    Ok(i)
}

/// Add `name -> child` to `parent`, updating the parent's times (and link count for a subdir).
pub(crate) fn add_entry(
    w: &mut W<'_>,
    parent: InodeId,
    name: &[u8],
    child: InodeId,
    is_dir: bool,
) -> FsResult<()> {
    let mut p = dir_inode(w, parent)?;
    let cookie = p.aux;
    p.aux += 1;
    let now = Time::now();
    p.mtime = now;
    p.ctime = now;
    if is_dir {
        p.nlink += 1;
    }
    w.put_inode(parent, &p)?;
    w.dirents.insert((parent.0, name), (child.0, cookie))?;
    w.cookies.insert((parent.0, cookie), name)?;
    if is_dir {
        w.dirents
            .insert((child.0, b"..".as_slice()), (parent.0, 0))?;
    }
    Ok(())
}

/// Remove the entry `name` (with its cookie) from `parent`.
pub(crate) fn remove_entry(
    w: &mut W<'_>,
    parent: InodeId,
    name: &[u8],
    cookie: u64,
    was_dir: bool,
) -> FsResult<()> {
    w.dirents.remove((parent.0, name))?;
    w.cookies.remove((parent.0, cookie))?;
    let mut p = w.inode(parent)?;
    let now = Time::now();
    p.mtime = now;
    p.ctime = now;
    if was_dir {
        p.nlink = p.nlink.saturating_sub(1);
    }
    w.put_inode(parent, &p)
}

/// Allocate a new inode number and generation and store `inode` under it.
pub(crate) fn new_inode(w: &mut W<'_>, mut inode: Inode) -> FsResult<(InodeId, Inode)> {
    let ino = InodeId(w.counter(K_NEXT_INODE, 2)?);
    inode.generation = Generation(w.counter(K_NEXT_GENERATION, 2)?);
    w.put_inode(ino, &inode)?;
    Ok((ino, inode))
}

/// Delete an inode and everything it owns (chunk map, symlink target, xattrs).
pub(crate) fn purge(w: &mut W<'_>, ino: InodeId) -> FsResult<()> {
    let inode = match w.inode(ino) {
        Ok(i) => i,
        Err(FsError::NotFound) => return Ok(()),
        Err(e) => return Err(e),
    };
    if inode.kind == Kind::File {
        w.tree().decref_node(inode.root.node)?;
    }
    if inode.kind == Kind::Dir {
        w.dirents.remove((ino.0, b"..".as_slice()))?;
    }
    w.symlinks.remove(ino.0)?;
    let names: Vec<Vec<u8>> = w
        .xattrs
        .range((ino.0, [].as_slice())..(ino.0 + 1, [].as_slice()))?
        .map(|r| r.map(|(k, _)| k.value().1.to_vec()))
        .collect::<Result<_, _>>()?;
    for n in names {
        w.xattrs.remove((ino.0, n.as_slice()))?;
    }
    w.inodes.remove(ino.0)?;
    Ok(())
}

/// The inode at `path` (relative to the root, `/`-separated, symlinks not followed), looked up
/// in a read or write transaction's `dirents` table.
pub(crate) fn resolve_in<T: ReadableTable<(u64, &'static [u8]), (u64, u64)>>(
    dirents: &T,
    path: &[u8],
) -> FsResult<InodeId> {
    let mut cur = InodeId::ROOT;
    for comp in path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        let v = dirents.get((cur.0, comp))?.ok_or(FsError::NotFound)?;
        cur = InodeId(v.value().0);
    }
    Ok(cur)
}

fn has_entries(w: &W<'_>, dir: InodeId) -> FsResult<bool> {
    Ok(w.cookies
        .range((dir.0, 0)..(dir.0 + 1, 0))?
        .next()
        .is_some())
}

impl Engine {
    /// One link of `ino` went away; the inode goes with its last link unless it is open.
    /// Returns true when the inode was deleted.
    pub(crate) fn drop_link(&self, w: &mut W<'_>, ino: InodeId) -> FsResult<bool> {
        let mut i = w.inode(ino)?;
        i.nlink = if i.kind == Kind::Dir {
            0
        } else {
            i.nlink.saturating_sub(1)
        };
        i.ctime = Time::now();
        if i.nlink > 0 {
            w.put_inode(ino, &i)?;
            return Ok(false);
        }
        if self.is_open(ino) {
            w.put_inode(ino, &i)?;
            w.orphans.insert(ino.0, ())?;
            return Ok(false);
        }
        purge(w, ino)?;
        Ok(true)
    }

    pub fn lookup(&self, parent: InodeId, name: &[u8]) -> FsResult<Attr> {
        if name.len() > super::NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let rtx = self.read_txn()?;
        let p = get_inode(&rtx.open_table(INODES)?, parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let child = if name == b"." {
            parent
        } else {
            let d = rtx.open_table(DIRENTS)?;
            let v = d.get((parent.0, name))?.ok_or(FsError::NotFound)?;
            InodeId(v.value().0)
        };
        drop(rtx);
        self.getattr(child)
    }

    /// Create a non-directory, non-symlink inode (regular file, fifo, device, socket).
    pub fn mknod(
        &self,
        parent: InodeId,
        name: &[u8],
        kind: Kind,
        perm: u16,
        rdev: u32,
        ctx: Ctx,
    ) -> FsResult<Attr> {
        if matches!(kind, Kind::Dir | Kind::Symlink) {
            return Err(FsError::Invalid("mknod of a directory or symlink"));
        }
        self.create_inode(parent, name, kind, perm, rdev, ctx, None)
    }

    pub fn mkdir(&self, parent: InodeId, name: &[u8], perm: u16, ctx: Ctx) -> FsResult<Attr> {
        self.create_inode(parent, name, Kind::Dir, perm, 0, ctx, None)
    }

    pub fn symlink(&self, parent: InodeId, name: &[u8], target: &[u8], ctx: Ctx) -> FsResult<Attr> {
        if target.is_empty() || target.len() > 4095 {
            return Err(FsError::Invalid("symlink target must be 1 to 4095 bytes"));
        }
        self.create_inode(parent, name, Kind::Symlink, 0o777, 0, ctx, Some(target))
    }

    #[allow(clippy::too_many_arguments)]
    fn create_inode(
        &self,
        parent: InodeId,
        name: &[u8],
        kind: Kind,
        perm: u16,
        rdev: u32,
        ctx: Ctx,
        target: Option<&[u8]>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let (ino, inode) = self.meta_txn(|w| {
            let p = dir_inode(w, parent)?;
            if p.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if lookup_in(w, parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            let mut perm = perm;
            let mut gid = ctx.gid;
            if p.perm & (libc::S_ISGID as u16) != 0 {
                // BSD group semantics on setgid directories; subdirectories inherit the bit.
                gid = p.gid;
                if kind == Kind::Dir {
                    perm |= libc::S_ISGID as u16;
                }
            }
            let mut i = Inode::new(kind, perm, ctx.uid, gid, Generation(0));
            i.rdev = rdev;
            if let Some(t) = target {
                i.size = t.len() as u64;
            }
            let (ino, i) = new_inode(w, i)?;
            if let Some(t) = target {
                w.symlinks.insert(ino.0, t)?;
            }
            add_entry(w, parent, name, ino, kind == Kind::Dir)?;
            Ok((ino, i))
        })?;
        Ok(self.attr_of(ino, inode, None))
    }

    pub fn readlink(&self, ino: InodeId) -> FsResult<Vec<u8>> {
        let rtx = self.read_txn()?;
        let i = get_inode(&rtx.open_table(INODES)?, ino)?;
        if i.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        let t = rtx.open_table(SYMLINKS)?;
        let v = t
            .get(ino.0)?
            .ok_or_else(|| FsError::BadMeta(format!("symlink {} has no target", ino.0)))?;
        Ok(v.value().to_vec())
    }

    /// A new hard link `newparent/newname` to `ino`.
    pub fn link(&self, ino: InodeId, newparent: InodeId, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        let inode = self.meta_txn(|w| {
            let mut i = w.inode(ino)?;
            if i.kind == Kind::Dir {
                return Err(FsError::Perm);
            }
            if i.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if i.nlink >= 65000 {
                return Err(FsError::TooManyLinks);
            }
            let p = dir_inode(w, newparent)?;
            if p.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if lookup_in(w, newparent, newname)?.is_some() {
                return Err(FsError::Exists);
            }
            i.nlink += 1;
            i.ctime = Time::now();
            w.put_inode(ino, &i)?;
            add_entry(w, newparent, newname, ino, false)?;
            Ok(i)
        })?;
        let st = self.files.get(&ino).map(|s| s.clone());
        let g = st.as_ref().map(|s| s.state.read());
        Ok(self.attr_of(ino, inode, g.as_deref()))
    }

    pub fn unlink(&self, parent: InodeId, name: &[u8]) -> FsResult<()> {
        let deleted = self.meta_txn(|w| {
            dir_inode(w, parent)?;
            let (child, cookie) = lookup_in(w, parent, name)?.ok_or(FsError::NotFound)?;
            if w.inode(child)?.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            remove_entry(w, parent, name, cookie, false)?;
            Ok(self.drop_link(w, child)?.then_some(child))
        })?;
        if let Some(ino) = deleted {
            self.drop_state(ino);
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: InodeId, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid("rmdir of ."));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.meta_txn(|w| {
            dir_inode(w, parent)?;
            let (child, cookie) = lookup_in(w, parent, name)?.ok_or(FsError::NotFound)?;
            if w.inode(child)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if has_entries(w, child)? {
                return Err(FsError::NotEmpty);
            }
            remove_entry(w, parent, name, cookie, true)?;
            self.drop_link(w, child)?;
            Ok(())
        })
    }

    /// Is `dir` equal to `ancestor` or inside it?
    pub(crate) fn is_within(w: &W<'_>, mut dir: InodeId, ancestor: InodeId) -> FsResult<bool> {
        for _ in 0..4096 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == InodeId::ROOT {
                return Ok(false);
            }
            dir = lookup_in(w, dir, b"..")?
                .map(|(p, _)| p)
                .ok_or(FsError::NotFound)?;
        }
        Err(FsError::BadMeta(
            "directory parent chain too deep or looping".into(),
        ))
    }

    pub fn rename(
        &self,
        parent: InodeId,
        name: &[u8],
        newparent: InodeId,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        check_name(newname)?;
        if name == b"." || name == b".." {
            return Err(FsError::Invalid("rename of . or .."));
        }
        let deleted = self.meta_txn(|w| {
            dir_inode(w, parent)?;
            dir_inode(w, newparent)?;
            let (src, scookie) = lookup_in(w, parent, name)?.ok_or(FsError::NotFound)?;
            let src_dir = w.inode(src)?.kind == Kind::Dir;
            let dst = lookup_in(w, newparent, newname)?;
            if src_dir && newparent != parent && Self::is_within(w, newparent, src)? {
                return Err(FsError::Invalid("cannot move a directory into itself"));
            }
            let now = Time::now();
            if flags.exchange {
                let (d, dcookie) = dst.ok_or(FsError::NotFound)?;
                let dst_dir = w.inode(d)?.kind == Kind::Dir;
                if dst_dir && parent != newparent && Self::is_within(w, parent, d)? {
                    return Err(FsError::Invalid("cannot move a directory into itself"));
                }
                w.dirents.insert((parent.0, name), (d.0, scookie))?;
                w.dirents.insert((newparent.0, newname), (src.0, dcookie))?;
                if parent != newparent {
                    for (ino, is_dir, to) in [(src, src_dir, newparent), (d, dst_dir, parent)] {
                        if is_dir {
                            w.dirents.insert((ino.0, b"..".as_slice()), (to.0, 0))?;
                        }
                    }
                    let delta = i64::from(src_dir) - i64::from(dst_dir);
                    for (p, dl) in [(parent, -delta), (newparent, delta)] {
                        let mut pi = w.inode(p)?;
                        pi.nlink = (i64::from(pi.nlink) + dl) as u32;
                        w.put_inode(p, &pi)?;
                    }
                }
                for ino in [src, d, parent, newparent] {
                    let mut i = w.inode(ino)?;
                    i.ctime = now;
                    if ino == parent || ino == newparent {
                        i.mtime = now;
                    }
                    w.put_inode(ino, &i)?;
                }
                return Ok(None);
            }
            let mut deleted = None;
            if let Some((d, dcookie)) = dst {
                if flags.noreplace {
                    return Err(FsError::Exists);
                }
                if d == src {
                    return Ok(None);
                }
                let di = w.inode(d)?;
                if src_dir {
                    if di.kind != Kind::Dir {
                        return Err(FsError::NotDir);
                    }
                    if has_entries(w, d)? {
                        return Err(FsError::NotEmpty);
                    }
                } else if di.kind == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                remove_entry(w, newparent, newname, dcookie, di.kind == Kind::Dir)?;
                if self.drop_link(w, d)? {
                    deleted = Some(d);
                }
            }
            remove_entry(w, parent, name, scookie, src_dir)?;
            add_entry(w, newparent, newname, src, src_dir)?;
            let mut si = w.inode(src)?;
            si.ctime = now;
            w.put_inode(src, &si)?;
            Ok(deleted)
        })?;
        if let Some(d) = deleted {
            self.drop_state(d);
        }
        Ok(())
    }

    /// Up to `max` entries of directory `ino` after `cookie` (0 = from the start), `.` and `..`
    /// first (cookies 1 and 2).
    pub fn readdir(&self, ino: InodeId, cookie: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        let rtx = self.read_txn()?;
        let inodes = rtx.open_table(INODES)?;
        let i = get_inode(&inodes, ino)?;
        if i.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let dirents = rtx.open_table(DIRENTS)?;
        let mut out = Vec::new();
        if cookie < 1 {
            out.push(DirEntry {
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
                cookie: 1,
            });
        }
        if cookie < 2 {
            let p = dirents
                .get((ino.0, b"..".as_slice()))?
                .map_or(ino.0, |v| v.value().0);
            out.push(DirEntry {
                ino: InodeId(p),
                kind: Kind::Dir,
                name: b"..".to_vec(),
                cookie: 2,
            });
        }
        let cookies = rtx.open_table(DIRCOOKIE)?;
        for r in cookies.range((ino.0, cookie.max(2) + 1)..(ino.0 + 1, 0))? {
            if out.len() >= max {
                break;
            }
            let (k, v) = r?;
            let name = v.value().to_vec();
            let Some(e) = dirents.get((ino.0, name.as_slice()))? else {
                continue;
            };
            let child = InodeId(e.value().0);
            let ci = get_inode(&inodes, child)?;
            // `/.snapshots` is entered by name only (see `snapshot.rs`).
            if ino == InodeId::ROOT && name == super::snapshot::SNAP_DIR && ci.is_snapshot() {
                continue;
            }
            let kind = ci.kind;
            out.push(DirEntry {
                ino: child,
                kind,
                name,
                cookie: k.value().1,
            });
        }
        Ok(out)
    }

    /// The inode at `path` (components separated by `/`, relative to the root; symlinks are
    /// not followed).
    pub fn resolve(&self, path: &[u8]) -> FsResult<InodeId> {
        resolve_in(&self.read_txn()?.open_table(DIRENTS)?, path)
    }

    /// A path of `ino` for messages (first name found; slow, for error reports only).
    pub fn path_of(&self, ino: InodeId) -> String {
        let find = || -> FsResult<Option<String>> {
            let rtx = self.read_txn()?;
            let dirents = rtx.open_table(DIRENTS)?;
            let mut parts = Vec::new();
            let mut cur = ino;
            while cur != InodeId::ROOT && parts.len() < 256 {
                let mut found = None;
                for r in dirents.iter()? {
                    let (k, v) = r?;
                    let (p, name) = k.value();
                    if v.value().0 == cur.0 && name != b".." {
                        found = Some((InodeId(p), String::from_utf8_lossy(name).into_owned()));
                        break;
                    }
                }
                let Some((p, n)) = found else { return Ok(None) };
                parts.push(n);
                cur = p;
            }
            parts.reverse();
            Ok(Some(format!("/{}", parts.join("/"))))
        };
        match find() {
            Ok(Some(p)) => p,
            _ => format!("<inode {}>", ino.0),
        }
    }
}
