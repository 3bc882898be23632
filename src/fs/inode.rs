//! Inodes: ids, kinds, attributes and their fixed 96-byte on-disk encoding.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::tree::NodeId;
use super::tree::Root;

/// Inode number. 1 is the root directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeId(pub u64);

impl InodeId {
    pub const ROOT: InodeId = InodeId(1);
}

/// Incremented for every inode created, so a handle to a deleted inode never matches a
/// new inode that reuses its number (NFS file handles embed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Generation(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    CharDev = 5,
    BlockDev = 6,
    Socket = 7,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::CharDev,
            6 => Kind::BlockDev,
            7 => Kind::Socket,
            _ => return None,
        })
    }

    /// From the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            libc::S_IFSOCK => Kind::Socket,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the epoch (may be negative).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Time {
    pub secs: i64,
    pub nsecs: u32,
}

impl Time {
    pub fn now() -> Time {
        Time::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Time {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time {
                secs: d.as_secs() as i64,
                nsecs: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Time {
                        secs: -(d.as_secs() as i64),
                        nsecs: 0,
                    }
                } else {
                    Time {
                        secs: -(d.as_secs() as i64) - 1,
                        nsecs: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }

    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsecs)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(self.nsecs.into())
        }
    }
}

/// Attributes of one inode, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    /// Bytes.
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub generation: Generation,
    /// Regular files: the chunk map.
    pub root: Root,
    /// Regular files: number of non-hole chunk slots. Directories: next readdir cookie.
    pub aux: u64,
    /// `FLAG_*` bits. Byte 88 of the encoding, zero in inodes written before flags existed.
    pub flags: u8,
}

pub const INODE_LEN: usize = 96;

/// The inode belongs to a snapshot (`crate::fs::snapshot`): read-only to every operation but
/// the snapshot commands themselves.
pub const FLAG_SNAPSHOT: u8 = 1;
/// The inode belongs to a replica received from another datastore (`crate::fs::receive`):
/// read-only until `tessera promote`.
pub const FLAG_REPLICA: u8 = 2;

impl Inode {
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32, generation: Generation) -> Inode {
        let now = Time::now();
        Inode {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            generation,
            root: Root::default(),
            // Cookies 1 and 2 are "." and "..": entries start at 3.
            aux: if kind == Kind::Dir { 3 } else { 0 },
            flags: 0,
        }
    }

    pub fn mode(&self) -> u32 {
        let fmt = match self.kind {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
            Kind::Socket => libc::S_IFSOCK,
        };
        fmt | u32::from(self.perm)
    }

    pub fn encode(&self) -> [u8; INODE_LEN] {
        let mut b = [0u8; INODE_LEN];
        let mut w = 0usize;
        let mut put = |bytes: &[u8]| {
            b[w..w + bytes.len()].copy_from_slice(bytes);
            w += bytes.len();
        };
        put(&[self.kind as u8]);
        put(&self.perm.to_le_bytes());
        put(&self.uid.to_le_bytes());
        put(&self.gid.to_le_bytes());
        put(&self.nlink.to_le_bytes());
        put(&self.rdev.to_le_bytes());
        put(&self.size.to_le_bytes());
        for t in [self.atime, self.mtime, self.ctime] {
            put(&t.secs.to_le_bytes());
            put(&t.nsecs.to_le_bytes());
        }
        put(&self.generation.0.to_le_bytes());
        put(&self.root.node.0.to_le_bytes());
        put(&[self.root.height]);
        put(&self.aux.to_le_bytes());
        put(&[self.flags]);
        b
    }

    /// Part of a snapshot?
    pub fn is_snapshot(&self) -> bool {
        self.flags & FLAG_SNAPSHOT != 0
    }

    /// Part of a snapshot or of a replica not promoted: nothing may change it but the
    /// snapshot and replication commands.
    pub fn is_read_only(&self) -> bool {
        self.flags & (FLAG_SNAPSHOT | FLAG_REPLICA) != 0
    }

    pub fn decode(b: &[u8]) -> Option<Inode> {
        if b.len() != INODE_LEN {
            return None;
        }
        let mut r = 0usize;
        let mut take = |n: usize| {
            let s = &b[r..r + n];
            r += n;
            s
        };
        let kind = Kind::from_u8(take(1)[0])?;
        let perm = u16::from_le_bytes(take(2).try_into().ok()?);
        let uid = u32::from_le_bytes(take(4).try_into().ok()?);
        let gid = u32::from_le_bytes(take(4).try_into().ok()?);
        let nlink = u32::from_le_bytes(take(4).try_into().ok()?);
        let rdev = u32::from_le_bytes(take(4).try_into().ok()?);
        let size = u64::from_le_bytes(take(8).try_into().ok()?);
        let mut times = [Time::default(); 3];
        for t in &mut times {
            let secs = i64::from_le_bytes(take(8).try_into().ok()?);
            let nsecs = u32::from_le_bytes(take(4).try_into().ok()?);
            *t = Time { secs, nsecs };
        }
        let generation = Generation(u64::from_le_bytes(take(8).try_into().ok()?));
        let node = u64::from_le_bytes(take(8).try_into().ok()?);
        let height = take(1)[0];
        let aux = u64::from_le_bytes(take(8).try_into().ok()?);
        let flags = take(1)[0];
        Some(Inode {
            kind,
            perm,
            uid,
            gid,
            nlink,
            rdev,
            size,
            atime: times[0],
            mtime: times[1],
            ctime: times[2],
            generation,
            root: Root {
                node: NodeId(node),
                height,
            },
            aux,
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_roundtrip() {
        let mut i = Inode::new(Kind::File, 0o4755, 1000, 100, Generation(42));
        i.size = 1 << 40;
        i.root = Root {
            node: crate::fs::tree::NodeId(77),
            height: 2,
        };
        i.aux = 5;
        i.flags = FLAG_SNAPSHOT;
        i.atime = Time { secs: -5, nsecs: 7 };
        assert_eq!(Inode::decode(&i.encode()), Some(i));
    }

    #[test]
    fn negative_times_roundtrip_through_systemtime() {
        let t = Time {
            secs: -2,
            nsecs: 500,
        };
        assert_eq!(Time::from_system(t.to_system()), t);
    }
}
