//! Test helpers shared by the engine's test modules.

use super::{Engine, InodeId};

/// `chunks` chunks of `chunk` bytes that no other seed or chunk repeats, incompressible
/// (xorshift64).
pub(crate) fn unique_data(seed: u64, chunks: usize, chunk: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..chunks * chunk)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The inode of `name` in the root folder.
pub(crate) fn ino(e: &Engine, name: &str) -> InodeId {
    e.lookup(InodeId::ROOT, name.as_bytes()).unwrap().ino
}

/// The whole content of `name` in the root folder, read 1 MiB at a time.
pub(crate) fn content(e: &Engine, name: &str) -> Vec<u8> {
    let i = ino(e, name);
    let size = e.getattr(i).unwrap().inode.size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let chunk = e.read(i, out.len() as u64, 1 << 20).unwrap();
        assert!(!chunk.is_empty(), "short read of {name}");
        out.extend_from_slice(&chunk);
    }
    out
}
