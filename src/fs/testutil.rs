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

/// A new empty file `name` (mode 0644) in the root folder.
pub(crate) fn new_file(e: &Engine, name: &str) -> InodeId {
    e.mknod(
        InodeId::ROOT,
        name.as_bytes(),
        crate::fs::Kind::File,
        0o644,
        0,
        crate::fs::dir::Ctx::ROOT,
    )
    .unwrap()
    .ino
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

/// Write `bytes` at the start of the file at `path` (created 0644 in its existing folder).
pub(crate) fn put_path(e: &Engine, path: &str, bytes: &[u8]) -> InodeId {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let d = e.resolve(dir.as_bytes()).unwrap();
    let i = match e.lookup(d, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => {
            e.mknod(
                d,
                name.as_bytes(),
                super::Kind::File,
                0o644,
                0,
                super::dir::Ctx::ROOT,
            )
            .unwrap()
            .ino
        }
    };
    e.write(i, 0, bytes).unwrap();
    i
}

/// The whole content of the file at `path`, read 1 MiB at a time.
pub(crate) fn read_path(e: &Engine, path: &str) -> Vec<u8> {
    let i = e.resolve(path.as_bytes()).unwrap();
    let size = e.getattr(i).unwrap().inode.size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let b = e.read(i, out.len() as u64, 1 << 20).unwrap();
        assert!(!b.is_empty(), "short read of {path}");
        out.extend_from_slice(&b);
    }
    out
}
