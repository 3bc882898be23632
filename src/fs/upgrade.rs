//! Conversion of datastores written by older builds (the format history is in `crate::schema`).
//!
//! Format 1 -> 2: the chunk index was keyed by 32-byte ids and leaves held ids; format 2 keys
//! both by 8-byte `ChunkKey`s. One durable transaction re-keys the index and rewrites every
//! leaf, so a crash during the conversion leaves the datastore as it was (format 1), and
//! opening it again converts it again. Interior nodes, inodes and packs do not change.

use redb::{Database, Durability, ReadableDatabase, ReadableTable};

use super::tree::{Node, FANOUT};
use super::{FsError, FsResult};
use crate::schema::*;
use crate::store::chunk::ChunkId;
use crate::store::{ChunkKey, ChunkLoc, ChunkTables};

/// Leaves rewritten per pass over the `nodes` table (bounds the memory a pass holds).
const LEAVES_PER_PASS: usize = 4096;

/// Tests: fail the conversion after rewriting the leaves, before the commit (a crash then).
#[cfg(test)]
static FAIL_BEFORE_COMMIT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The format version recorded in `db`.
pub fn format_of(db: &Database) -> FsResult<u64> {
    let rtx = db.begin_read()?;
    let sup = rtx
        .open_table(SUPER)
        .map_err(|_| FsError::BadMeta("not a Tessera datastore".into()))?;
    let v = sup
        .get(K_FORMAT)?
        .ok_or_else(|| FsError::BadMeta(format!("superblock lacks {K_FORMAT}")))?;
    Ok(v.value())
}

/// Bring `db` to this build's format. Returns the version converted from, if any.
pub fn upgrade(db: &Database) -> FsResult<Option<u64>> {
    match format_of(db)? {
        FORMAT_VERSION => Ok(None),
        1 => {
            v1_to_v2(db)?;
            Ok(Some(1))
        }
        v => Err(FsError::BadMeta(format!(
            "datastore format {v} is newer than this build's (format {FORMAT_VERSION}): \
             open it with the Tessera release that wrote it, or a newer one"
        ))),
    }
}

/// A format-1 leaf: `0u8`, `count u16`, then `count` times `slot u8` and a 32-byte id.
fn decode_v1_leaf(b: &[u8]) -> Option<Vec<(usize, ChunkId)>> {
    if *b.first()? != 0 {
        return None;
    }
    let n = u16::from_le_bytes(b.get(1..3)?.try_into().ok()?) as usize;
    if b.len() != 3 + n * 33 {
        return None;
    }
    (0..n)
        .map(|k| {
            let e = &b[3 + k * 33..3 + (k + 1) * 33];
            let slot = e[0] as usize;
            (slot < FANOUT).then(|| (slot, ChunkId(e[1..].try_into().expect("32 bytes"))))
        })
        .collect()
}

fn v1_to_v2(db: &Database) -> FsResult<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| FsError::BadMeta(format!("cannot convert the datastore: {e}")))?;
    {
        let mut chunks = ChunkTables::open(&txn)?;
        {
            let old = txn.open_table(CHUNKS_V1)?;
            for e in old.iter()? {
                let (k, v) = e?;
                let id = ChunkId(*k.value());
                let loc = ChunkLoc::decode(v.value()).ok_or_else(|| {
                    FsError::BadMeta(format!(
                        "format-1 index entry of chunk {} does not decode; restore meta.redb \
                         from a backup, or run `tessera fsck --repair` with the release that \
                         wrote it, then open it again",
                        id.short()
                    ))
                })?;
                chunks.adopt(&id, &loc)?;
            }
        }
        let mut nodes = txn.open_table(NODES)?;
        let mut after = None;
        loop {
            let batch: Vec<(u64, Vec<u8>)> = {
                let range = match after {
                    None => nodes.range::<u64>(..)?,
                    Some(a) => nodes.range::<u64>(a + 1..)?,
                };
                let mut batch = Vec::new();
                for e in range {
                    let (k, v) = e?;
                    if v.value().first() == Some(&0) {
                        batch.push((k.value(), v.value().to_vec()));
                    }
                    after = Some(k.value());
                    if batch.len() == LEAVES_PER_PASS {
                        break;
                    }
                }
                batch
            };
            if batch.is_empty() {
                break;
            }
            for (node, b) in batch {
                let slots = decode_v1_leaf(&b).ok_or_else(|| {
                    FsError::BadMeta(format!(
                        "format-1 chunk-map node {node} does not decode; restore meta.redb \
                         from a backup"
                    ))
                })?;
                let mut leaf = Box::new([None::<ChunkKey>; FANOUT]);
                for (slot, id) in slots {
                    let key = match chunks.find(&id)? {
                        Some((k, _)) => k,
                        // Referenced but not indexed (a damaged format-1 datastore): kept as a
                        // lost chunk, which reads as damage and `fsck --repair` recounts.
                        None => chunks.adopt(&id, &ChunkLoc::lost(1))?,
                    };
                    leaf[slot] = Some(key);
                }
                nodes.insert(node, Node::Leaf(leaf).encode().as_slice())?;
            }
        }
    }
    txn.delete_table(CHUNKS_V1)?;
    txn.open_table(SUPER)?.insert(K_FORMAT, FORMAT_VERSION)?;
    #[cfg(test)]
    if FAIL_BEFORE_COMMIT.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(FsError::BadMeta(
            "injected failure before the commit".into(),
        ));
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::path::Path;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::fs::{Engine, Tuning};

    /// Unpack the format-1 fixture (a datastore written by the format-1 build; see
    /// fs-tests/cli.sh for what it holds) into `dir`.
    fn unpack_fixture(dir: &Path) {
        let f = std::fs::File::open(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fs-tests/fixtures/format1-datastore.tar.zst"),
        )
        .unwrap();
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(f)
            .unwrap()
            .read_to_end(&mut raw)
            .unwrap();
        tar::Archive::new(raw.as_slice()).unpack(dir).unwrap();
    }

    fn format_on_disk(dir: &Path) -> u64 {
        format_of(&Database::open(dir.join(crate::fs::META_FILE)).unwrap()).unwrap()
    }

    /// Protects the conversion promise in the README: a conversion that fails (or a crash)
    /// before its commit leaves format 1, intact, and the next open converts it; the converted
    /// datastore has the same files, byte for byte, and fsck finds nothing wrong.
    #[test]
    fn a_failed_conversion_leaves_format_1_and_the_next_open_converts_it() {
        let d = tempfile::tempdir().unwrap();
        unpack_fixture(d.path());
        assert_eq!(format_on_disk(d.path()), 1);
        FAIL_BEFORE_COMMIT.store(true, Ordering::SeqCst);
        let failed = Engine::open(d.path(), Tuning::default());
        FAIL_BEFORE_COMMIT.store(false, Ordering::SeqCst);
        assert!(failed.is_err());
        assert_eq!(format_on_disk(d.path()), 1);

        let e = Engine::open(d.path(), Tuning::default()).unwrap();
        let r = e.fsck(&|_, _| {}).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(d.path().join("meta.redb.format1").exists());
        let read = |p: &[u8]| {
            let i = e.resolve(p).unwrap();
            let size = e.getattr(i).unwrap().inode.size;
            e.read(i, 0, size as u32).unwrap()
        };
        // disk.raw: 5 random chunks, a hole, then its first 20000 bytes again at chunk 300.
        let disk = read(b"/vm1/disk.raw");
        assert_eq!(disk.len(), 16384 * 300 + 20000);
        assert_eq!(disk[..20000], disk[16384 * 300..]);
        assert!(disk[16384 * 5..16384 * 300].iter().all(|&b| b == 0));
        assert!(disk[..16384 * 5].iter().any(|&b| b != 0));
        // clone.raw: the clone, diverged by 8 bytes at 5000.
        let mut clone = read(b"/vm1/clone.raw");
        assert_eq!(&clone[5000..5008], b"diverged");
        clone[5000..5008].copy_from_slice(&disk[5000..5008]);
        assert_eq!(clone, disk);
        assert_eq!(read(b"/b.txt"), b"hello v1\n".repeat(5000));
        let link = e.resolve(b"/link").unwrap();
        assert_eq!(e.readlink(link).unwrap(), b"b.txt");
        drop(e);
        assert_eq!(format_on_disk(d.path()), FORMAT_VERSION);
    }
}
