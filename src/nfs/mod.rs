//! The NFSv3 front end: implements nfs3_server's file system traits over the engine, so
//! hypervisors see the same files, attributes and semantics as the FUSE mount. Each call
//! validates its handle, runs one engine operation and translates `FsError` into `nfsstat3`.
//!
//! File handles are 16 bytes (inode number, inode generation) behind the library's 8-byte
//! datastore id, so they survive restarts, and a handle of a deleted file answers
//! NFS3ERR_STALE even after its inode number is reused. Writes honour `stable_how`: UNSTABLE
//! data is buffered and made durable by COMMIT; the write verifier changes at every start of
//! the server (vendor/nfs3_server/PATCHES.md), so clients resend what a crash lost.

pub use crate::allow;
pub mod portmap;

use crate::fs::ops::{Direction, FrontEnd};
use std::collections::VecDeque;
use std::sync::Arc;

use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3, specdata3,
    stable_how, FSINFO3resok as fsinfo3, Nfs3Option, FSF3_CANSETTIME, FSF3_HOMOGENEOUS,
    FSF3_SYMLINK,
};
use nfs3_server::nfs3_types::nfs3::{post_op_attr, set_atime, set_mtime};
use nfs3_server::vfs::{
    DirEntryPlus, FileHandle, FsStat, NextResult, NfsFileSystem, NfsReadFileSystem,
    ReadDirPlusIterator, VFSCapabilities,
};

use crate::fs::data::{SetAttr, SetTime};
use crate::fs::dir::{Ctx, RenameFlags};
use crate::fs::inode::Generation;
use crate::fs::{Attr, Engine, FsError, InodeId, Kind, Time, MAX_FILE_SIZE, NAME_MAX};

/// Largest READ and WRITE (bytes). Matches the FUSE mount's request size and the record
/// limit of the RPC layer.
pub const IO_MAX: u32 = 1 << 20;

/// Directory entries fetched from the engine per batch of a READDIRPLUS.
const DIR_BATCH: usize = 256;

/// A file handle: inode number and the generation it had when the handle was made.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NfsHandle([u8; 16]);

impl NfsHandle {
    pub fn new(ino: InodeId, generation: Generation) -> NfsHandle {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&ino.0.to_le_bytes());
        b[8..].copy_from_slice(&generation.0.to_le_bytes());
        NfsHandle(b)
    }

    fn of(a: &Attr) -> NfsHandle {
        NfsHandle::new(a.ino, a.inode.generation)
    }

    pub fn ino(&self) -> InodeId {
        InodeId(u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")))
    }

    pub fn generation(&self) -> Generation {
        Generation(u64::from_le_bytes(self.0[8..].try_into().expect("8 bytes")))
    }
}

impl std::fmt::Debug for NfsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ino {} gen {}", self.ino().0, self.generation().0)
    }
}

impl FileHandle for NfsHandle {
    fn len(&self) -> usize {
        16
    }
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let b: [u8; 16] = bytes.try_into().ok()?;
        let h = NfsHandle(b);
        (h.ino().0 != 0).then_some(h)
    }
}

/// The one translation of engine errors into NFS status codes.
pub fn nfsstat(e: &FsError) -> nfsstat3 {
    match e {
        FsError::NotFound => nfsstat3::NFS3ERR_NOENT,
        FsError::Exists => nfsstat3::NFS3ERR_EXIST,
        FsError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        FsError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        FsError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        FsError::Invalid(_) | FsError::Range | FsError::NoAttr => nfsstat3::NFS3ERR_INVAL,
        FsError::NameTooLong => nfsstat3::NFS3ERR_NAMETOOLONG,
        FsError::Perm => nfsstat3::NFS3ERR_PERM,
        FsError::TooBig => nfsstat3::NFS3ERR_FBIG,
        FsError::NotSupported => nfsstat3::NFS3ERR_NOTSUPP,
        FsError::TooManyLinks => nfsstat3::NFS3ERR_MLINK,
        FsError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        FsError::Stream(_) | FsError::StreamCut(_) => nfsstat3::NFS3ERR_IO,
        FsError::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        FsError::Corrupt { .. } | FsError::BadMeta(_) | FsError::Io(_) | FsError::Meta(_) => {
            nfsstat3::NFS3ERR_IO
        }
    }
}

/// What a failed call answers: the engine's error, or STALE for a handle whose file is gone.
/// Whether an engine call may wait for the disk (see [`TesseraNfs::run_on`]).
#[derive(Clone, Copy)]
enum Blocks {
    Yes,
    Rarely,
}

enum Fail {
    Fs(FsError),
    Stale,
}

impl From<FsError> for Fail {
    fn from(e: FsError) -> Fail {
        Fail::Fs(e)
    }
}

/// Kernel caches of another front end of the same process (the FUSE mount) that must drop
/// what an NFS call changed, so a change made over NFS is seen through the mount at once.
pub trait PeerCaches: Send + Sync {
    /// Attributes and data of `ino` changed.
    fn inode(&self, ino: InodeId);
    /// The entry `name` of directory `parent` changed (removed, renamed, replaced).
    fn entry(&self, parent: InodeId, name: &[u8]);
}

/// The NFS file system: a thin adapter over a shared engine.
pub struct TesseraNfs {
    engine: Arc<Engine>,
    read_only: bool,
    peer: Option<Arc<dyn PeerCaches>>,
}

impl TesseraNfs {
    pub fn new(engine: Arc<Engine>, read_only: bool) -> TesseraNfs {
        TesseraNfs {
            engine,
            read_only,
            peer: None,
        }
    }

    /// Tell `peer` about every change made over NFS.
    pub fn with_peer(mut self, peer: Arc<dyn PeerCaches>) -> TesseraNfs {
        self.peer = Some(peer);
        self
    }

    fn changed(&self, ino: InodeId) {
        if let Some(p) = &self.peer {
            p.inode(ino);
        }
    }

    fn entry_changed(&self, parent: InodeId, name: &[u8]) {
        if let Some(p) = &self.peer {
            p.entry(parent, name);
            p.inode(parent);
        }
    }

    /// Run one engine operation that may wait for the disk (fsync, a durable commit).
    fn run<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Engine) -> Result<T, Fail>,
    ) -> Result<T, nfsstat3> {
        self.run_on(op, Blocks::Yes, f)
    }

    /// Run one engine operation. One that may wait for the disk runs with the runtime told
    /// to move other tasks off this worker thread; one that is mostly memory and page cache
    /// (READ, UNSTABLE WRITE, GETATTR) runs in place: the hand-off costs a thread wake-up per
    /// call, a large share of a 4 KiB WRITE (the runtime has a worker per core, and a call that
    /// runs in place is as short as a hand-off would be).
    fn run_on<T>(
        &self,
        op: &'static str,
        blocks: Blocks,
        f: impl FnOnce(&Engine) -> Result<T, Fail>,
    ) -> Result<T, nfsstat3> {
        let started = std::time::Instant::now();
        // One request: metadata changes become durable once, before the reply (RFC 1813).
        let call = || self.engine.request(|| f(&self.engine));
        let r = match blocks {
            Blocks::Yes => tokio::task::block_in_place(call),
            Blocks::Rarely => call(),
        };
        self.engine
            .ops
            .record(FrontEnd::Nfs, op, started, r.is_ok());
        r.map_err(|fail| match fail {
            Fail::Stale => nfsstat3::NFS3ERR_STALE,
            Fail::Fs(e) => {
                match &e {
                    FsError::Io(_) | FsError::Meta(_) | FsError::BadMeta(_) => {
                        tracing::error!("nfs {op}: {e}")
                    }
                    FsError::NoSpace | FsError::Corrupt { .. } => {
                        tracing::warn!("nfs {op}: {e}")
                    }
                    _ => tracing::debug!("nfs {op}: {e}"),
                }
                nfsstat(&e)
            }
        })
    }

    fn writable(&self) -> Result<(), nfsstat3> {
        if self.read_only {
            Err(nfsstat3::NFS3ERR_ROFS)
        } else {
            Ok(())
        }
    }

    fn fattr(&self, a: &Attr) -> fattr3 {
        fattr(a, self.engine.id())
    }

    /// CREATE UNCHECKED (`open_existing`: an existing file is opened and given the attributes)
    /// or GUARDED (an existing name is NFS3ERR_EXIST, decided by the engine when creating).
    fn make_file(
        &self,
        dir: &NfsHandle,
        n: &filename3<'_>,
        s: &sattr3,
        open_existing: bool,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        self.writable()?;
        let ctx = caller();
        let mut set = set_attr(s);
        let perm = set.mode.take().unwrap_or(0o644) as u16;
        let a = self.run("create", |e| {
            live(e, dir)?;
            let a = match e.mknod(dir.ino(), name(n), Kind::File, perm, 0, ctx) {
                Ok(a) => a,
                Err(FsError::Exists) if open_existing => {
                    let a = e.lookup(dir.ino(), name(n))?;
                    if a.inode.kind != Kind::File {
                        return Err(FsError::Exists.into());
                    }
                    a
                }
                Err(err) => return Err(err.into()),
            };
            if is_empty(&set) {
                Ok(a)
            } else {
                Ok(e.setattr(a.ino, &set)?)
            }
        })?;
        self.entry_changed(dir.ino(), name(n));
        self.changed(a.ino);
        Ok((NfsHandle::of(&a), self.fattr(&a)))
    }
}

/// The attributes of a live handle: STALE if its inode is gone or was reused.
fn live(e: &Engine, h: &NfsHandle) -> Result<Attr, Fail> {
    match e.getattr(h.ino()) {
        Ok(a) if a.inode.generation == h.generation() => Ok(a),
        Ok(_) | Err(FsError::NotFound) => Err(Fail::Stale),
        Err(e) => Err(Fail::Fs(e)),
    }
}

fn name<'a>(n: &'a filename3<'_>) -> &'a [u8] {
    &n.0
}

/// Owner of new files: the caller's AUTH_UNIX ids (root for other flavors).
fn caller() -> Ctx {
    nfs3_server::vfs::caller().map_or(Ctx::ROOT, |a| Ctx {
        uid: a.uid,
        gid: a.gid,
    })
}

fn nfstime(t: Time) -> nfstime3 {
    // NFSv3 times are unsigned 32-bit seconds: clamp what does not fit.
    nfstime3 {
        seconds: t.secs.clamp(0, i64::from(u32::MAX)) as u32,
        nseconds: t.nsecs,
    }
}

fn time_of(t: nfstime3) -> Time {
    Time {
        secs: i64::from(t.seconds),
        nsecs: t.nseconds.min(999_999_999),
    }
}

fn fattr(a: &Attr, fsid: u64) -> fattr3 {
    let i = &a.inode;
    let type_ = match i.kind {
        Kind::File => ftype3::NF3REG,
        Kind::Dir => ftype3::NF3DIR,
        Kind::Symlink => ftype3::NF3LNK,
        Kind::Fifo => ftype3::NF3FIFO,
        Kind::CharDev => ftype3::NF3CHR,
        Kind::BlockDev => ftype3::NF3BLK,
        Kind::Socket => ftype3::NF3SOCK,
    };
    fattr3 {
        type_,
        mode: u32::from(i.perm),
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        size: i.size,
        used: a.allocated,
        rdev: specdata3 {
            specdata1: libc::major(u64::from(i.rdev) as libc::dev_t),
            specdata2: libc::minor(u64::from(i.rdev) as libc::dev_t),
        },
        fsid,
        fileid: a.ino.0,
        atime: nfstime(i.atime),
        mtime: nfstime(i.mtime),
        ctime: nfstime(i.ctime),
    }
}

/// An NFS `sattr3` as the engine's attribute change.
fn set_attr(s: &sattr3) -> SetAttr {
    let opt = |o: &Nfs3Option<u32>| match o {
        Nfs3Option::Some(v) => Some(*v),
        Nfs3Option::None => None,
    };
    SetAttr {
        mode: opt(&s.mode).map(|m| m & 0o7777),
        uid: opt(&s.uid),
        gid: opt(&s.gid),
        size: match s.size {
            Nfs3Option::Some(v) => Some(v),
            Nfs3Option::None => None,
        },
        atime: match s.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(SetTime::Now),
            set_atime::SET_TO_CLIENT_TIME(t) => Some(SetTime::At(time_of(t))),
        },
        mtime: match s.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(SetTime::Now),
            set_mtime::SET_TO_CLIENT_TIME(t) => Some(SetTime::At(time_of(t))),
        },
        ctime: None,
    }
}

fn is_empty(s: &SetAttr) -> bool {
    s.mode.is_none()
        && s.uid.is_none()
        && s.gid.is_none()
        && s.size.is_none()
        && s.atime.is_none()
        && s.mtime.is_none()
}

/// An EXCLUSIVE create keeps the client's verifier in the new file's atime and mtime seconds
/// (as knfsd does) until the client's SETATTR replaces them, so a retransmitted CREATE finds
/// its own file and succeeds while another client's gets EXIST.
fn verf_times(v: &createverf3) -> (Time, Time) {
    let a = u32::from_be_bytes(v.0[..4].try_into().expect("4 bytes"));
    let m = u32::from_be_bytes(v.0[4..].try_into().expect("4 bytes"));
    (
        Time {
            secs: i64::from(a),
            nsecs: 0,
        },
        Time {
            secs: i64::from(m),
            nsecs: 0,
        },
    )
}

impl NfsReadFileSystem for TesseraNfs {
    type Handle = NfsHandle;

    fn root_dir(&self) -> NfsHandle {
        // The root inode is never deleted; its generation is fixed at creation.
        NfsHandle::new(InodeId::ROOT, Generation(1))
    }

    async fn lookup(&self, dir: &NfsHandle, n: &filename3<'_>) -> Result<NfsHandle, nfsstat3> {
        self.run("lookup", |e| {
            live(e, dir)?;
            Ok(NfsHandle::of(&e.lookup(dir.ino(), name(n))?))
        })
    }

    async fn getattr(&self, h: &NfsHandle) -> Result<fattr3, nfsstat3> {
        let a = self.run_on("getattr", Blocks::Rarely, |e| live(e, h))?;
        Ok(self.fattr(&a))
    }

    async fn read(
        &self,
        h: &NfsHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.read_with_attr(h, offset, count).await.1
    }

    async fn read_with_attr(
        &self,
        h: &NfsHandle,
        offset: u64,
        count: u32,
    ) -> (Option<fattr3>, Result<(Vec<u8>, bool), nfsstat3>) {
        let mut attr = None;
        let r = self.run_on("read", Blocks::Rarely, |e| {
            let (data, a) = match e.read_with_attr(h.ino(), offset, count.min(IO_MAX)) {
                Err(FsError::IsDir) | Err(FsError::Invalid(_)) => {
                    // Not a file: the error the handle's kind calls for (or STALE).
                    let a = live(e, h)?;
                    return Err(match a.inode.kind {
                        Kind::Dir => FsError::IsDir,
                        _ => FsError::Invalid("read of a non-file"),
                    }
                    .into());
                }
                Err(FsError::NotFound) => return Err(Fail::Stale),
                r => r?,
            };
            if a.inode.generation != h.generation() {
                return Err(Fail::Stale);
            }
            // EOF is judged against the size as of the read; a concurrent extension makes the
            // client read again, never miss data.
            let eof = offset.saturating_add(data.len() as u64) >= a.inode.size;
            e.ops
                .moved(FrontEnd::Nfs, Direction::Read, data.len() as u64);
            attr = Some(a);
            Ok((data, eof))
        });
        (attr.map(|a| self.fattr(&a)), r)
    }

    async fn readdirplus(
        &self,
        dir: &NfsHandle,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<NfsHandle>, nfsstat3> {
        self.run("readdir", |e| {
            let a = live(e, dir)?;
            if a.inode.kind != Kind::Dir {
                return Err(FsError::NotDir.into());
            }
            Ok(())
        })?;
        Ok(DirIter {
            engine: self.engine.clone(),
            fsid: self.engine.id(),
            dir: dir.ino(),
            cookie,
            batch: VecDeque::new(),
            eof: false,
        })
    }

    async fn readlink(&self, h: &NfsHandle) -> Result<nfspath3<'_>, nfsstat3> {
        let t = self.run("readlink", |e| {
            live(e, h)?;
            Ok(e.readlink(h.ino())?)
        })?;
        Ok(nfspath3::from(t))
    }

    async fn fsinfo(&self, root: &NfsHandle) -> Result<fsinfo3, nfsstat3> {
        let attr = self
            .getattr(root)
            .await
            .map_or(post_op_attr::None, post_op_attr::Some);
        Ok(fsinfo3 {
            obj_attributes: attr,
            rtmax: IO_MAX,
            rtpref: IO_MAX,
            rtmult: self.engine.chunk_size() as u32,
            wtmax: IO_MAX,
            wtpref: IO_MAX,
            wtmult: self.engine.chunk_size() as u32,
            dtpref: 64 * 1024,
            maxfilesize: MAX_FILE_SIZE - 1,
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        })
    }

    async fn fsstat(&self, root: &NfsHandle) -> Result<FsStat, nfsstat3> {
        self.run("fsstat", |e| {
            live(e, root)?;
            // Space is the backing disk's: what the datastore can still store physically.
            // Dedup and compression make the logical room larger, but a hypervisor placing
            // desktops must not be promised bytes that may not fit.
            let (total, avail) = e.disk_space();
            let used_files = e.inode_count()?;
            let files = u64::from(u32::MAX);
            Ok(FsStat {
                tbytes: total,
                fbytes: avail,
                abytes: avail,
                tfiles: files,
                ffiles: files.saturating_sub(used_files),
                afiles: files.saturating_sub(used_files),
            })
        })
    }

    fn name_max(&self) -> u32 {
        NAME_MAX as u32
    }
}

impl NfsFileSystem for TesseraNfs {
    fn capabilities(&self) -> VFSCapabilities {
        if self.read_only {
            VFSCapabilities::ReadOnly
        } else {
            VFSCapabilities::ReadWrite
        }
    }

    async fn setattr(&self, h: &NfsHandle, s: sattr3) -> Result<fattr3, nfsstat3> {
        self.writable()?;
        let set = set_attr(&s);
        let a = self.run("setattr", |e| {
            let a = live(e, h)?;
            if is_empty(&set) {
                return Ok(a);
            }
            Ok(e.setattr(h.ino(), &set)?)
        })?;
        self.changed(h.ino());
        Ok(self.fattr(&a))
    }

    async fn write(
        &self,
        h: &NfsHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        self.write_with_before(h, offset, data, stable).await.1
    }

    async fn write_with_before(
        &self,
        h: &NfsHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> (Option<fattr3>, Result<(fattr3, stable_how), nfsstat3>) {
        if let Err(e) = self.writable() {
            return (None, Err(e));
        }
        let mut before = None;
        // UNSTABLE data is buffered like a FUSE write and made durable by COMMIT (the verifier
        // tells clients when a restart lost it): it waits for the disk only under memory
        // pressure. DATA_SYNC and FILE_SYNC are answered only once the data and its metadata
        // are durable.
        let sync = !matches!(stable, stable_how::UNSTABLE);
        let blocks = if sync || self.engine.under_pressure() {
            Blocks::Yes // waits for the disk, or for the flusher to make room
        } else {
            Blocks::Rarely
        };
        let r = self.run_on("write", blocks, |e| {
            let (b, a) = e.write_with_attrs(h.ino(), offset, data, |a: &Attr| {
                before = Some(a.clone());
                match a.inode.kind {
                    _ if a.inode.generation != h.generation() => Err(Fail::Stale),
                    Kind::File => Ok(()),
                    _ => Err(FsError::Invalid("write to a non-file").into()),
                }
            })?;
            before = Some(b);
            e.ops
                .moved(FrontEnd::Nfs, Direction::Write, data.len() as u64);
            if sync {
                e.fsync(h.ino())?;
                Ok((e.getattr(h.ino())?, stable_how::FILE_SYNC))
            } else {
                Ok((a, stable_how::UNSTABLE))
            }
        });
        let before = before.map(|b| self.fattr(&b));
        match r {
            Ok((a, committed)) => {
                self.changed(h.ino());
                (before, Ok((self.fattr(&a), committed)))
            }
            Err(e) => (before, Err(e)),
        }
    }

    async fn create(
        &self,
        dir: &NfsHandle,
        n: &filename3<'_>,
        s: sattr3,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        self.make_file(dir, n, &s, true)
    }

    async fn create_exclusive(
        &self,
        dir: &NfsHandle,
        n: &filename3<'_>,
        verf: createverf3,
    ) -> Result<NfsHandle, nfsstat3> {
        self.writable()?;
        let ctx = caller();
        let (atime, mtime) = verf_times(&verf);
        let h = self.run("create", |e| {
            live(e, dir)?;
            match e.mknod(dir.ino(), name(n), Kind::File, 0o644, 0, ctx) {
                Ok(a) => {
                    let set = SetAttr {
                        atime: Some(SetTime::At(atime)),
                        mtime: Some(SetTime::At(mtime)),
                        ..SetAttr::default()
                    };
                    e.setattr(a.ino, &set)?;
                    Ok(NfsHandle::of(&a))
                }
                Err(FsError::Exists) => {
                    // A retransmission of our own CREATE finds the verifier we stored.
                    let a = e.lookup(dir.ino(), name(n))?;
                    let i = &a.inode;
                    if i.kind == Kind::File && i.atime == atime && i.mtime == mtime {
                        Ok(NfsHandle::of(&a))
                    } else {
                        Err(FsError::Exists.into())
                    }
                }
                Err(err) => Err(err.into()),
            }
        })?;
        self.entry_changed(dir.ino(), name(n));
        Ok(h)
    }

    async fn mkdir(
        &self,
        dir: &NfsHandle,
        n: &filename3<'_>,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        self.writable()?;
        let ctx = caller();
        let a = self.run("mkdir", |e| {
            live(e, dir)?;
            Ok(e.mkdir(dir.ino(), name(n), 0o755, ctx)?)
        })?;
        self.entry_changed(dir.ino(), name(n));
        Ok((NfsHandle::of(&a), self.fattr(&a)))
    }

    async fn remove(&self, dir: &NfsHandle, n: &filename3<'_>) -> Result<(), nfsstat3> {
        self.writable()?;
        // REMOVE takes non-directories only (a directory answers NFS3ERR_ISDIR); the kind is
        // checked by the engine inside the same transaction that removes the entry.
        let child = self.run("remove", |e| {
            live(e, dir)?;
            let a = e.lookup(dir.ino(), name(n))?;
            e.unlink(dir.ino(), name(n))?;
            Ok(a.ino)
        })?;
        self.entry_changed(dir.ino(), name(n));
        self.changed(child);
        Ok(())
    }

    async fn rmdir(&self, dir: &NfsHandle, n: &filename3<'_>) -> Result<(), nfsstat3> {
        self.writable()?;
        self.run("rmdir", |e| {
            live(e, dir)?;
            Ok(e.rmdir(dir.ino(), name(n))?)
        })?;
        self.entry_changed(dir.ino(), name(n));
        Ok(())
    }

    async fn create_guarded(
        &self,
        dir: &NfsHandle,
        n: &filename3<'_>,
        s: sattr3,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        self.make_file(dir, n, &s, false)
    }

    async fn rename<'a>(
        &self,
        from: &NfsHandle,
        from_name: &filename3<'a>,
        to: &NfsHandle,
        to_name: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        self.writable()?;
        self.run("rename", |e| {
            live(e, from)?;
            live(e, to)?;
            Ok(e.rename(
                from.ino(),
                name(from_name),
                to.ino(),
                name(to_name),
                RenameFlags::default(),
            )?)
        })?;
        self.entry_changed(from.ino(), name(from_name));
        self.entry_changed(to.ino(), name(to_name));
        Ok(())
    }

    async fn symlink<'a>(
        &self,
        dir: &NfsHandle,
        n: &filename3<'a>,
        target: &nfspath3<'a>,
        _attr: &sattr3,
    ) -> Result<(NfsHandle, fattr3), nfsstat3> {
        self.writable()?;
        let ctx = caller();
        let a = self.run("symlink", |e| {
            live(e, dir)?;
            Ok(e.symlink(dir.ino(), name(n), &target.0, ctx)?)
        })?;
        self.entry_changed(dir.ino(), name(n));
        Ok((NfsHandle::of(&a), self.fattr(&a)))
    }

    async fn commit(&self, h: &NfsHandle, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        // The whole file is made durable: ranges are not tracked separately, and a COMMIT
        // usually covers everything a client wrote since its last one.
        self.run("commit", |e| {
            live(e, h)?;
            Ok(e.fsync(h.ino())?)
        })
    }
}

/// A READDIRPLUS listing: engine entries in cookie order, fetched in batches with their
/// attributes. Cookies are the engine's stable per-entry cookies, so a listing resumed after
/// entries were created or removed neither repeats nor skips the entries that stayed.
struct DirIter {
    engine: Arc<Engine>,
    fsid: u64,
    dir: InodeId,
    cookie: u64,
    batch: VecDeque<DirEntryPlus<NfsHandle>>,
    eof: bool,
}

impl DirIter {
    fn fill(&mut self) -> Result<(), nfsstat3> {
        let engine = &self.engine;
        let (listed, entries) = tokio::task::block_in_place(|| -> Result<_, FsError> {
            let list = engine.readdir(self.dir, self.cookie, DIR_BATCH)?;
            let last = list.last().map(|d| d.cookie);
            let mut out = Vec::with_capacity(list.len());
            for d in list {
                // An entry removed since the listing was read is skipped, not an error.
                match engine.getattr(d.ino) {
                    Ok(a) => out.push((d, a)),
                    Err(FsError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((last, out))
        })
        .map_err(|e| nfsstat(&e))?;
        match listed {
            Some(c) => self.cookie = c,
            None => self.eof = true,
        }
        for (d, a) in entries {
            self.batch.push_back(DirEntryPlus {
                fileid: d.ino.0,
                name: filename3::from(d.name),
                cookie: d.cookie,
                name_attributes: Some(fattr(&a, self.fsid)),
                name_handle: Some(NfsHandle::of(&a)),
            });
        }
        Ok(())
    }
}

impl ReadDirPlusIterator<NfsHandle> for DirIter {
    async fn next(&mut self) -> NextResult<DirEntryPlus<NfsHandle>> {
        while self.batch.is_empty() && !self.eof {
            if let Err(e) = self.fill() {
                return NextResult::Err(e);
            }
        }
        match self.batch.pop_front() {
            Some(d) => NextResult::Ok(d),
            None => NextResult::Eof,
        }
    }
}

#[cfg(test)]
mod tests;
