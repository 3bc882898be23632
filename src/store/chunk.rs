//! Chunk identity and the per-chunk codec: blake3 ids, zstd compression, verification.
//!
//! A chunk is always `chunk_size` bytes of file data (the tail of a file is zero-padded), so its
//! id depends only on content, never on where in a file it sits.

use std::fmt;

/// blake3 hash of a chunk's uncompressed bytes: the chunk's identity in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hash `data` (the full, uncompressed chunk).
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Short hex form for logs.
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

/// How a chunk's payload is stored in its pack record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is: zstd did not make it smaller.
    Raw = 0,
    /// zstd frame.
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// True when every byte is zero. Such chunks are never stored: they are holes.
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in u128 words: about 10x faster than a byte loop on 16 KiB chunks.
    let (head, body, tail) = unsafe {
        // SAFETY: u128 has no invalid bit patterns and align_to only reinterprets the aligned
        // middle part of the slice; head and tail stay u8 slices.
        data.align_to::<u128>()
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Compress `data` at `level`; returns the payload and its codec. A chunk that does not shrink
/// by at least 1/32 is kept raw so reads of incompressible data skip decompression.
pub fn encode(data: &[u8], level: i32) -> (Vec<u8>, Codec) {
    match zstd::bulk::compress(data, level) {
        Ok(c) if c.len() < data.len() - data.len() / 32 => (c, Codec::Zstd),
        _ => (data.to_vec(), Codec::Raw),
    }
}

/// Decode a payload back to the `raw_len` bytes of the chunk; `None` if it does not decode.
pub fn decode(payload: &[u8], codec: Codec, raw_len: usize) -> Option<Vec<u8>> {
    match codec {
        Codec::Raw => (payload.len() == raw_len).then(|| payload.to_vec()),
        Codec::Zstd => {
            let out = zstd::bulk::decompress(payload, raw_len).ok()?;
            (out.len() == raw_len).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_handles_unaligned_slices() {
        let mut v = vec![0u8; 16 * 1024 + 3];
        assert!(is_zero(&v[1..]));
        v[16 * 1024 + 2] = 1;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..16 * 1024]));
    }

    #[test]
    fn codec_roundtrip_and_raw_fallback() {
        let text = vec![b'a'; 16384];
        let (p, c) = encode(&text, 1);
        assert_eq!(c, Codec::Zstd);
        assert_eq!(decode(&p, c, text.len()).unwrap(), text);
        let noise: Vec<u8> = (0..16384u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (p, c) = encode(&noise, 1);
        if c == Codec::Raw {
            assert_eq!(p, noise);
        }
        assert_eq!(decode(&p, c, noise.len()).unwrap(), noise);
        assert!(decode(&p[..p.len() - 1], c, noise.len()).is_none());
    }
}
