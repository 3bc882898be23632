//! Where a chunk lives: [`ChunkLoc`], the value of the `chunks` table (`crate::schema`), and
//! its byte encoding (29 bytes, little-endian).

use super::chunk::Codec;
use super::pack::PackId;

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
