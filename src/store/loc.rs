//! Where a chunk lives: [`ChunkKey`] (its key in the index and in chunk maps), [`ChunkLoc`]
//! (its record and reference count) and [`IndexEntry`], the value of the `chunk_index` table
//! (`crate::schema`), with their byte encodings (little-endian).

use super::chunk::{ChunkId, Codec};
use super::pack::PackId;

/// A stored chunk's key: in the index and in every chunk-map slot that references it.
///
/// 56 bits (7 bytes in a chunk-map leaf) instead of the 32-byte id: chunk maps hold one key
/// per 16 KiB of every file, so a full leaf is 1 827 bytes and two share a 4 KiB page
/// (format 2; see `store::index`). A chunk's key is its id's first 55 bits
/// ([`ChunkKey::preferred`]) unless another live chunk holds that key (a prefix collision:
/// about one pair per 2^55 / n^2, so a handful in a datastore of 10^8 chunks); then it is an
/// alias, bit 55 set, numbered from a counter and found through the `chunk_aliases` table. A
/// key names one chunk for as long as anything references it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub u64);

impl ChunkKey {
    /// Bytes of a key in a chunk-map leaf.
    pub const LEN: usize = 7;
    const ALIAS: u64 = 1 << 55;
    const PREFIX: u64 = Self::ALIAS - 1;

    /// The key a chunk gets when no other live chunk holds it.
    pub fn preferred(id: &ChunkId) -> ChunkKey {
        let p: [u8; 8] = id.0[..8].try_into().expect("32-byte id");
        ChunkKey(u64::from_le_bytes(p) & Self::PREFIX)
    }

    /// The `n`th alias key (prefix collisions); `n` below 2^55.
    pub fn alias(n: u64) -> ChunkKey {
        ChunkKey(Self::ALIAS | (n & Self::PREFIX))
    }

    /// The alias number of an alias key.
    pub fn alias_number(self) -> u64 {
        self.0 & Self::PREFIX
    }

    /// The 7-byte leaf encoding.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        self.0.to_le_bytes()[..Self::LEN]
            .try_into()
            .expect("7 of 8 bytes")
    }

    /// Decode 7 bytes (every 7-byte value is a key; `None` only for a short slice).
    pub fn from_bytes(b: &[u8]) -> Option<ChunkKey> {
        let mut w = [0u8; 8];
        w[..Self::LEN].copy_from_slice(b.get(..Self::LEN)?);
        let k = u64::from_le_bytes(w);
        (k <= Self::ALIAS | Self::PREFIX).then_some(ChunkKey(k))
    }

    pub fn is_alias(self) -> bool {
        self.0 & Self::ALIAS != 0
    }

    /// Could this key belong to `id`? (Preferred keys are derived from the id; aliases could
    /// belong to any.)
    pub fn may_be(self, id: &ChunkId) -> bool {
        self.is_alias() || self == ChunkKey::preferred(id)
    }
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A value of the `chunk_index` table: the chunk's id (reads are verified against it) and
/// where it lives. 61 bytes: id, then the [`ChunkLoc`] encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub loc: ChunkLoc,
}

impl IndexEntry {
    pub const LEN: usize = 32 + ChunkLoc::LEN;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..32].copy_from_slice(&self.id.0);
        b[32..].copy_from_slice(&self.loc.encode());
        b
    }

    pub fn decode(b: &[u8]) -> Option<IndexEntry> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(IndexEntry {
            id: ChunkId(b[..32].try_into().ok()?),
            loc: ChunkLoc::decode(&b[32..])?,
        })
    }
}

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
        let e = IndexEntry {
            id: ChunkId::of(b"x"),
            loc: l,
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        assert_eq!(IndexEntry::decode(&e.encode()[1..]), None);
    }

    #[test]
    fn keys_are_id_prefixes_or_aliases() {
        let id = ChunkId([0xff; 32]);
        let k = ChunkKey::preferred(&id);
        assert!(!k.is_alias() && k.may_be(&id));
        assert_eq!(k.0, (1 << 55) - 1);
        assert_eq!(ChunkKey::from_bytes(&k.to_bytes()), Some(k));
        let a = ChunkKey::alias(5);
        assert!(a.is_alias() && a.may_be(&id) && a != k);
        assert_eq!(a.alias_number(), 5);
        assert_eq!(ChunkKey::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(
            ChunkKey::from_bytes(&[0xff; 7]).map(|k| k.is_alias()),
            Some(true)
        );
        assert!(!ChunkKey::preferred(&ChunkId([0; 32])).may_be(&id));
    }
}
