//! Extended attributes, stored per inode in the `xattrs` table.

use redb::ReadableTable;

use super::inode::{InodeId, Time};
use super::{Engine, FsError, FsResult};
use crate::schema::{INODES, XATTRS};

/// Largest attribute value (bytes), as on ext4 and in the VFS.
pub const XATTR_VALUE_MAX: usize = 65536;
/// Longest attribute name (bytes).
pub const XATTR_NAME_MAX: usize = 255;

/// How `setxattr` treats an existing attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// Fail with `Exists` if present.
    Create,
    /// Fail with `NoAttr` if absent.
    Replace,
}

impl Engine {
    pub fn getxattr(&self, ino: InodeId, name: &[u8]) -> FsResult<Vec<u8>> {
        let rtx = self.read_txn()?;
        if rtx.open_table(INODES)?.get(ino.0)?.is_none() {
            return Err(FsError::NotFound);
        }
        let t = rtx.open_table(XATTRS)?;
        let v = t.get((ino.0, name))?.ok_or(FsError::NoAttr)?;
        Ok(v.value().to_vec())
    }

    pub fn setxattr(
        &self,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> FsResult<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(FsError::TooBig);
        }
        self.meta_txn(|w| {
            let mut i = w.inode(ino)?;
            let exists = w.xattrs.get((ino.0, name))?.is_some();
            match mode {
                XattrMode::Create if exists => return Err(FsError::Exists),
                XattrMode::Replace if !exists => return Err(FsError::NoAttr),
                _ => {}
            }
            w.xattrs.insert((ino.0, name), value)?;
            i.ctime = Time::now();
            w.put_inode(ino, &i)
        })
    }

    /// Attribute names, each followed by a NUL byte (the `listxattr` format).
    pub fn listxattr(&self, ino: InodeId) -> FsResult<Vec<u8>> {
        let rtx = self.read_txn()?;
        if rtx.open_table(INODES)?.get(ino.0)?.is_none() {
            return Err(FsError::NotFound);
        }
        let t = rtx.open_table(XATTRS)?;
        let mut out = Vec::new();
        for r in t.range((ino.0, [].as_slice())..(ino.0 + 1, [].as_slice()))? {
            let (k, _) = r?;
            out.extend_from_slice(k.value().1);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: InodeId, name: &[u8]) -> FsResult<()> {
        self.meta_txn(|w| {
            let mut i = w.inode(ino)?;
            if w.xattrs.remove((ino.0, name))?.is_none() {
                return Err(FsError::NoAttr);
            }
            i.ctime = Time::now();
            w.put_inode(ino, &i)
        })
    }
}
