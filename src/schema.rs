//! The whole key-value schema of the metadata database (`meta.redb`), in one place.
//!
//! | table | key | value |
//! |---|---|---|
//! | `super`     | name `&str` | `u64` counter or setting (see the `K_*` constants) |
//! | `inodes`    | inode `u64` | [`crate::fs::inode::Inode`] encoding (fixed 96 bytes) |
//! | `dirents`   | (parent `u64`, name bytes) | (child inode `u64`, cookie `u64`) |
//! | `dircookie` | (parent `u64`, cookie `u64`) | name bytes: readdir order, stable while entries are added |
//! | `symlinks`  | inode `u64` | target bytes |
//! | `xattrs`    | (inode `u64`, name bytes) | value bytes |
//! | `nodes`     | node `u64` | chunk-map tree node ([`crate::fs::tree`] encoding) |
//! | `noderefs`  | node `u64` | reference count `u64` (roots and parent nodes pointing at it) |
//! | `chunks`    | chunk id `[u8; 32]` | [`ChunkLoc`] encoding (29 bytes) |
//! | `packs`     | pack `u32` | (live bytes `u64`, dead bytes `u64`) of stored records |
//! | `counters`  | name `&str` | `u64` store-wide totals (see the `C_*` constants) |
//! | `orphans`   | inode `u64` | `()`: unlinked inodes still open; purged at next open |
//!
//! Every integer inside a byte value is little-endian. The format version is `super.format`.

use redb::TableDefinition;

use crate::store::chunk::Codec;
use crate::store::pack::PackId;

pub const SUPER: TableDefinition<&str, u64> = TableDefinition::new("super");
pub const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub const DIRENTS: TableDefinition<(u64, &[u8]), (u64, u64)> = TableDefinition::new("dirents");
pub const DIRCOOKIE: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dircookie");
pub const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
pub const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
pub const NODES: TableDefinition<u64, &[u8]> = TableDefinition::new("nodes");
pub const NODEREFS: TableDefinition<u64, u64> = TableDefinition::new("noderefs");
pub const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
pub const PACKS: TableDefinition<u32, (u64, u64)> = TableDefinition::new("packs");
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
pub const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");

/// On-disk format version written by this build.
pub const FORMAT_VERSION: u64 = 1;

pub const K_FORMAT: &str = "format";
pub const K_CHUNK_SIZE: &str = "chunk_size";
pub const K_ZSTD_LEVEL: &str = "zstd_level";
pub const K_NEXT_INODE: &str = "next_inode";
pub const K_NEXT_NODE: &str = "next_node";
pub const K_NEXT_GENERATION: &str = "next_generation";
/// A random id given to the datastore when it is created (NFS file handles carry it, so
/// handles of another datastore, or of one re-created at the same path, read as stale).
pub const K_DATASTORE_ID: &str = "datastore_id";
/// Bumped by every durable barrier commit, so the commit is never empty.
pub const K_BARRIERS: &str = "barriers";
/// Number of distinct chunks stored.
pub const C_CHUNK_COUNT: &str = "chunk_count";
/// Sum of the uncompressed length of distinct chunks.
pub const C_UNIQUE_BYTES: &str = "unique_bytes";
/// Sum of the stored (compressed) payload length of distinct chunks.
pub const C_STORED_BYTES: &str = "stored_bytes";

/// Where a chunk lives and how many chunk-map leaf slots reference it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pack: PackId,
    /// Offset of the record header in the pack.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
    /// Leaf slots referencing this chunk; the entry is deleted when it reaches zero.
    pub refs: u64,
}

impl ChunkLoc {
    pub const LEN: usize = 29;

    /// Where a chunk that `fsck --repair` found intact nowhere is "stored": no pack has this
    /// id, so reads of it fail as damage (EIO) while its entry keeps the reference count of
    /// the files that still use it. Storing the same content again replaces the location.
    pub const LOST_PACK: PackId = PackId(u32::MAX);

    /// An entry for a lost chunk (see `LOST_PACK`).
    pub fn lost(refs: u64) -> ChunkLoc {
        ChunkLoc {
            pack: Self::LOST_PACK,
            offset: 0,
            stored_len: 0,
            raw_len: 0,
            codec: Codec::Raw,
            refs,
        }
    }

    pub fn is_lost(&self) -> bool {
        self.pack == Self::LOST_PACK
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.pack.0.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20] = self.codec as u8;
        b[21..29].copy_from_slice(&self.refs.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<ChunkLoc> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(ChunkLoc {
            pack: PackId(u32::from_le_bytes(b[0..4].try_into().ok()?)),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            stored_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            codec: Codec::from_u8(b[20])?,
            refs: u64::from_le_bytes(b[21..29].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunkloc_roundtrip() {
        let l = ChunkLoc {
            pack: PackId(3),
            offset: 1 << 40,
            stored_len: 77,
            raw_len: 16384,
            codec: Codec::Zstd,
            refs: 9,
        };
        assert_eq!(ChunkLoc::decode(&l.encode()), Some(l));
        assert_eq!(ChunkLoc::decode(&[0u8; 3]), None);
    }
}
