//! The FUSE front end: translates fuser requests into engine calls and engine errors into
//! errnos. Each callback converts its arguments, calls one engine method and replies once.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::data::{Falloc, SetAttr, SetTime};
use crate::fs::dir::{Ctx, RenameFlags as Rf};
use crate::fs::ops::{Direction, FrontEnd};
use crate::fs::xattr::XattrMode;
use crate::fs::{Attr, Engine, FsError, InodeId, Kind, Time};

/// How long the kernel may cache attributes and entries. Short, because clones made through
/// the control socket (and NFS, later) change the namespace behind the kernel's back.
const TTL: Duration = Duration::from_secs(1);

/// The one translation of engine errors into errnos.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::Invalid(_) => Errno::EINVAL,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::Perm => Errno::EPERM,
        FsError::NoAttr => Errno::NO_XATTR,
        FsError::Range => Errno::ERANGE,
        FsError::TooBig => Errno::EFBIG,
        FsError::NotSupported => Errno::EOPNOTSUPP,
        FsError::TooManyLinks => Errno::EMLINK,
        FsError::ReadOnly => Errno::EROFS,
        FsError::Stream(_) | FsError::StreamCut(_) => Errno::EIO,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::Corrupt { .. } | FsError::BadMeta(_) | FsError::Io(_) | FsError::Meta(_) => {
            Errno::EIO
        }
    }
}

/// The FUSE filesystem: a thin adapter over a shared engine.
pub struct TesseraFuse {
    engine: Arc<Engine>,
}

impl TesseraFuse {
    pub fn new(engine: Arc<Engine>) -> Self {
        TesseraFuse { engine }
    }

    fn fail(&self, op: &str, e: &FsError) -> Errno {
        match e {
            FsError::Io(_) | FsError::Meta(_) | FsError::BadMeta(_) => tracing::error!("{op}: {e}"),
            FsError::NoSpace => tracing::warn!("{op}: {e}"),
            _ => tracing::debug!("{op}: {e}"),
        }
        errno(e)
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn fattr(a: &Attr, blksize: u32) -> FileAttr {
    let i = &a.inode;
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: i.size,
        blocks: a.allocated.div_ceil(512),
        atime: i.atime.to_system(),
        mtime: i.mtime.to_system(),
        ctime: i.ctime.to_system(),
        crtime: i.ctime.to_system(),
        kind: file_type(i.kind),
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize,
        flags: 0,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(Time::from_system(s)),
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl TesseraFuse {
    /// Count a request for the metrics (`fs::ops`).
    fn record(&self, op: &'static str, started: Instant, ok: bool) {
        self.engine.ops.record(FrontEnd::Fuse, op, started, ok);
    }

    fn blksize(&self) -> u32 {
        self.engine.chunk_size() as u32
    }

    fn entry(&self, r: Result<Attr, FsError>, op: &str, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(
                &TTL,
                &fattr(&a, self.blksize()),
                Generation(a.inode.generation.0),
            ),
            Err(e) => reply.error(self.fail(op, &e)),
        }
    }

    fn empty(&self, r: Result<(), FsError>, op: &str, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.fail(op, &e)),
        }
    }

    fn xattr_reply(&self, r: Result<Vec<u8>, FsError>, size: u32, op: &str, reply: ReplyXattr) {
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(self.fail(op, &e)),
        }
    }
}

impl fuser::Filesystem for TesseraFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // 1 MiB requests: fewer round trips for sequential I/O of VM images.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.engine.sync_all() {
            tracing::error!("final flush at unmount failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = Instant::now();
        let r = self.engine.lookup(InodeId(parent.0), name.as_bytes());
        self.record("lookup", t, r.is_ok());
        self.entry(r, "lookup", reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let t = Instant::now();
        let r = self.engine.getattr(InodeId(ino.0));
        self.record("getattr", t, r.is_ok());
        match r {
            Ok(a) => reply.attr(&TTL, &fattr(&a, self.blksize())),
            Err(e) => reply.error(self.fail("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(Time::from_system),
        };
        match self.engine.setattr(InodeId(ino.0), &s) {
            Ok(a) => reply.attr(&TTL, &fattr(&a, self.blksize())),
            Err(e) => reply.error(self.fail("setattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.engine.readlink(InodeId(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(self.fail("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = Kind::from_mode(mode) else {
            return reply.error(Errno::EINVAL);
        };
        let r = self.engine.mknod(
            InodeId(parent.0),
            name.as_bytes(),
            kind,
            (mode & 0o7777) as u16,
            rdev,
            ctx(req),
        );
        self.entry(r, "mknod", reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.engine.mkdir(
            InodeId(parent.0),
            name.as_bytes(),
            (mode & 0o7777) as u16,
            ctx(req),
        );
        self.entry(r, "mkdir", reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(
            self.engine.unlink(InodeId(parent.0), name.as_bytes()),
            "unlink",
            reply,
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(
            self.engine.rmdir(InodeId(parent.0), name.as_bytes()),
            "rmdir",
            reply,
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.engine.symlink(
            InodeId(parent.0),
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            ctx(req),
        );
        self.entry(r, "symlink", reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let f = Rf {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        let r = self.engine.rename(
            InodeId(parent.0),
            name.as_bytes(),
            InodeId(newparent.0),
            newname.as_bytes(),
            f,
        );
        self.empty(r, "rename", reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.engine
                .link(InodeId(ino.0), InodeId(newparent.0), newname.as_bytes()),
            "link",
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match self.engine.open_handle(InodeId(ino.0), write) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(self.fail("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = Instant::now();
        let r = self.engine.read(InodeId(ino.0), offset, size);
        self.record("read", t, r.is_ok());
        match r {
            Ok(d) => {
                self.engine
                    .ops
                    .moved(FrontEnd::Fuse, Direction::Read, d.len() as u64);
                reply.data(&d)
            }
            Err(e) => reply.error(self.fail("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let ino = InodeId(ino.0);
        let t = Instant::now();
        let r = self.engine.write(ino, offset, data).and_then(|n| {
            // O_SYNC / O_DSYNC writes are durable before they are acknowledged.
            if flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0 {
                self.engine.fsync(ino)?;
            }
            Ok(n)
        });
        self.record("write", t, r.is_ok());
        match r {
            Ok(n) => {
                self.engine
                    .ops
                    .moved(FrontEnd::Fuse, Direction::Write, n as u64);
                reply.written(n as u32)
            }
            Err(e) => reply.error(self.fail("write", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(self.engine.release_handle(InodeId(ino.0)), "release", reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = Instant::now();
        let r = self.engine.fsync(InodeId(ino.0));
        self.record("fsync", t, r.is_ok());
        self.empty(r, "fsync", reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.engine.getattr(InodeId(ino.0)) {
            Ok(a) if a.inode.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(self.fail("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.engine.readdir(InodeId(ino.0), offset, 512) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino.0),
                        e.cookie,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(self.fail("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.engine.readdir(InodeId(ino.0), offset, 256) {
            Ok(entries) => {
                for e in entries {
                    let Ok(a) = self.engine.getattr(e.ino) else {
                        continue;
                    };
                    let full = reply.add(
                        INodeNo(e.ino.0),
                        e.cookie,
                        OsStr::from_bytes(&e.name),
                        &TTL,
                        &fattr(&a, self.blksize()),
                        Generation(a.inode.generation.0),
                    );
                    if full {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(self.fail("readdirplus", &e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(self.engine.barrier(), "fsyncdir", reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (total, avail) = self.engine.disk_space();
        let bsize = 4096u64;
        let files = self.engine.inode_count().unwrap_or(0);
        // Inodes are rows in the metadata database: their limit is the disk, not a table.
        let ffree = avail / 256;
        reply.statfs(
            total / bsize,
            avail / bsize,
            avail / bsize,
            files + ffree,
            ffree,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        self.empty(
            self.engine
                .setxattr(InodeId(ino.0), name.as_bytes(), value, mode),
            "setxattr",
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.xattr_reply(
            self.engine.getxattr(InodeId(ino.0), name.as_bytes()),
            size,
            "getxattr",
            reply,
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.xattr_reply(
            self.engine.listxattr(InodeId(ino.0)),
            size,
            "listxattr",
            reply,
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(
            self.engine.removexattr(InodeId(ino.0), name.as_bytes()),
            "removexattr",
            reply,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only checks existence.
        self.empty(
            self.engine.getattr(InodeId(ino.0)).map(|_| ()),
            "access",
            reply,
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let kind = Kind::from_mode(mode).unwrap_or(Kind::File);
        let r = self
            .engine
            .mknod(
                InodeId(parent.0),
                name.as_bytes(),
                kind,
                (mode & 0o7777) as u16,
                0,
                ctx(req),
            )
            .and_then(|a| self.engine.open_handle(a.ino, true));
        match r {
            Ok(a) => reply.created(
                &TTL,
                &fattr(&a, self.blksize()),
                Generation(a.inode.generation.0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(self.fail("create", &e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls (FICLONE never reaches FUSE; cp uses copy_file_range, which shares chunks).
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let m = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if !keep_size {
                return reply.error(Errno::EOPNOTSUPP);
            }
            Falloc::PunchHole
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            Falloc::ZeroRange { keep_size }
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            Falloc::Allocate { keep_size }
        } else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        self.empty(
            self.engine.fallocate(InodeId(ino.0), offset, length, m),
            "fallocate",
            reply,
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return reply.error(Errno::EINVAL),
        };
        match self.engine.seek(InodeId(ino.0), offset as u64, data) {
            Ok(Some(o)) => reply.offset(o as i64),
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(self.fail("lseek", &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The reply carries a u32 count; the kernel loops for the rest.
        let len = len.min(u64::from(u32::MAX) & !0xFFFF);
        match self.engine.copy_range(
            InodeId(ino_in.0),
            offset_in,
            InodeId(ino_out.0),
            offset_out,
            len,
        ) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(self.fail("copy_file_range", &e)),
        }
    }
}

/// Mount options used for every Tessera mount.
pub fn config(datastore: &Path, threads: usize) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::FSName(datastore.display().to_string()),
        fuser::MountOption::Subtype("tessera".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    c.acl = fuser::SessionACL::All;
    c.n_threads = Some(threads.max(1));
    c.clone_fd = true;
    c
}
