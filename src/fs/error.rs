//! `FsError`: what engine operations fail with. Front ends translate it exhaustively
//! (`FsError -> errno` for FUSE, `FsError -> nfsstat3` for NFS, `FsError -> message` for the CLI).

use std::io;

use crate::store::chunk::ChunkId;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("name too long (limit 255 bytes)")]
    NameTooLong,
    #[error("operation not permitted")]
    Perm,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("file too large")]
    TooBig,
    #[error("not supported")]
    NotSupported,
    #[error("too many links")]
    TooManyLinks,
    #[error(
        "read-only: snapshots cannot be changed (`tessera snapshot restore` makes a writable copy)"
    )]
    ReadOnly,
    #[error("{0}")]
    Stream(String),
    /// A stream or replication session that ended early (pipe or connection closed): what
    /// arrived is kept for the same stream sent again, unlike a damaged one.
    #[error("{0}")]
    StreamCut(String),
    #[error("no space left on the datastore's disk")]
    NoSpace,
    #[error("data damaged in inode {ino} at offset {offset}: {detail}")]
    Corrupt {
        ino: u64,
        offset: u64,
        detail: String,
    },
    #[error("metadata damaged: {0}")]
    BadMeta(String),
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("metadata database error: {0}")]
    Meta(redb::Error),
}

fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        if is_enospc(&e) {
            FsError::NoSpace
        } else {
            FsError::Io(e)
        }
    }
}

impl From<redb::Error> for FsError {
    fn from(e: redb::Error) -> Self {
        match &e {
            redb::Error::Io(io) if is_enospc(io) => FsError::NoSpace,
            _ => FsError::Meta(e),
        }
    }
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for FsError {
            fn from(e: $t) -> Self { redb::Error::from(e).into() }
        }
    )*};
}
redb_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError
);

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io(io) => io.into(),
            StoreError::Meta(m) => m.into(),
            // The caller that knows the inode and offset rewraps these with `at()`.
            StoreError::Corrupt { id, detail } => FsError::Corrupt {
                ino: 0,
                offset: 0,
                detail: format!("chunk {}: {detail}", id.short()),
            },
            StoreError::Missing(id) => missing(id),
            StoreError::MissingKey(k) => FsError::Corrupt {
                ino: 0,
                offset: 0,
                detail: format!("chunk key {k} missing from the index"),
            },
            StoreError::BadIndex(k) => FsError::Corrupt {
                ino: 0,
                offset: 0,
                detail: format!("the index entry of chunk key {k} is damaged"),
            },
        }
    }
}

fn missing(id: ChunkId) -> FsError {
    FsError::Corrupt {
        ino: 0,
        offset: 0,
        detail: format!("chunk {} missing from the index", id.short()),
    }
}

impl FsError {
    /// Attach the file and offset a damage report is about.
    pub fn at(self, ino: u64, offset: u64) -> FsError {
        match self {
            FsError::Corrupt { detail, .. } => FsError::Corrupt {
                ino,
                offset,
                detail,
            },
            e => e,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
