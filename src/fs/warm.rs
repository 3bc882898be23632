//! `tessera warm`: load a template's chunks into the read cache before a boot storm, so the
//! first desktop to boot reads memory like the twentieth.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::inode::{InodeId, Kind};
use super::{get_inode, tree, Engine, FsResult};
use crate::schema::{DIRENTS, INODES, NODES};
use crate::store::ChunkKey;

/// Chunks loaded per call into the store (one batch of coalesced pack reads), at most...
const WARM_BATCH: usize = 256;
/// ...and at most this share of the cache: a chunk loaded into a full cache is admitted as
/// cold, where quick_cache keeps about 3 % of its capacity, and must get its second touch
/// (`Store::warm`) before the rest of its batch pushes it out.
const WARM_BATCH_SHARE: u64 = 64;

/// What `warm` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WarmReport {
    pub path: String,
    pub files: u64,
    /// Distinct chunks of the files (clones and duplicates count once), and their bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks read from packs (the rest were cached already).
    pub loaded: u64,
    /// Chunks that could not be read (damage: `tessera scrub` names the files).
    pub damaged: u64,
    /// The cache was full before every chunk was loaded: the rest were left out.
    pub cache_full: bool,
    pub cache_bytes: u64,
    pub cache_capacity_bytes: u64,
}

impl Engine {
    /// Load every chunk of the file or folder at `path` (inside the datastore) into the read
    /// cache, as far as it holds them. Loaded chunks count as read twice, like the blocks every
    /// boot reads, so a scan does not push them out before the storm. `progress(done, total)`
    /// counts chunks.
    pub fn warm(&self, path: &str, progress: &dyn Fn(u64, u64)) -> FsResult<WarmReport> {
        let top = self.resolve(path.as_bytes())?;
        let rtx = self.read_txn()?;
        let inodes = rtx.open_table(INODES)?;
        let dirents = rtx.open_table(DIRENTS)?;
        let nodes = rtx.open_table(NODES)?;
        let mut report = WarmReport {
            path: path.to_string(),
            ..WarmReport::default()
        };
        // The files, then their distinct chunks in file order (a template's boot order is
        // roughly its file order, so a cache too small keeps the start of each file).
        let mut files: Vec<InodeId> = Vec::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            let i = get_inode(&inodes, d)?;
            match i.kind {
                Kind::File => files.push(d),
                Kind::Dir => {
                    for e in dirents.range((d.0, [].as_slice())..(d.0 + 1, [].as_slice()))? {
                        let (k, v) = e?;
                        let name = k.value().1;
                        if name != b".." && name != b"." {
                            stack.push(InodeId(v.value().0));
                        }
                    }
                }
                _ => {}
            }
        }
        let mut seen: HashSet<ChunkKey> = HashSet::new();
        let mut keys: Vec<ChunkKey> = Vec::new();
        for f in &files {
            let i = get_inode(&inodes, *f)?;
            report.files += 1;
            for (_, k) in tree::collect(&nodes, i.root, 0, u64::MAX)? {
                if seen.insert(k) {
                    keys.push(k);
                }
            }
        }
        drop(seen);
        let capacity = self.store.cache_stats().capacity_chunks;
        if keys.len() as u64 > capacity {
            keys.truncate(capacity as usize);
            report.cache_full = true;
        }
        let total = keys.len() as u64;
        let per = WARM_BATCH.min((capacity / WARM_BATCH_SHARE).max(1) as usize);
        for (n, batch) in keys.chunks(per).enumerate() {
            progress((n * per) as u64, total);
            let w = self.store.warm(&rtx, batch);
            report.loaded += w.loaded;
            report.damaged += w.damaged;
        }
        progress(total, total);
        report.chunks = total;
        report.bytes = total * self.chunk_size;
        let c = self.store.cache_stats();
        report.cache_bytes = c.chunks * self.chunk_size;
        report.cache_capacity_bytes = c.capacity_chunks * self.chunk_size;
        if report.damaged > 0 {
            tracing::warn!(
                "warm {path}: {} chunks could not be read; run tessera scrub to name the files",
                report.damaged
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::super::dir::Ctx;
    use super::super::{Engine, Format, Tuning};
    use super::*;
    use crate::fs::testutil::{content, ino, unique_data};
    use crate::store::pack::MemPackIo;

    const C: usize = 4096;

    /// An engine whose read cache holds `cache_chunks` chunks, with `files` written (name,
    /// chunks, seed) and flushed, reopened so the cache starts cold.
    fn engine(cache_chunks: u64, files: &[(&str, usize, u64)]) -> Engine {
        let format = Format {
            chunk_size: C as u32,
            zstd_level: 1,
        };
        let e = Engine::in_memory(format, Arc::new(MemPackIo::default())).unwrap();
        for (name, chunks, seed) in files {
            let i = e
                .mknod(
                    InodeId::ROOT,
                    name.as_bytes(),
                    Kind::File,
                    0o644,
                    0,
                    Ctx::ROOT,
                )
                .unwrap()
                .ino;
            e.write(i, 0, &unique_data(*seed, *chunks, C)).unwrap();
        }
        e.sync_all().unwrap();
        let (db, io) = e.into_parts();
        let tuning = Tuning {
            cache_bytes: cache_chunks * C as u64,
            ..Tuning::default()
        };
        Engine::with_parts(db, io, tuning).unwrap()
    }

    fn cache(e: &Engine) -> (u64, u64) {
        let s = e.store.cache_stats();
        (s.hits, s.misses)
    }

    /// Protects the boot storm: clones of one image read at the same moment load each chunk
    /// from its pack once; the other readers wait for that load instead of repeating it.
    #[test]
    fn concurrent_reads_of_one_chunk_load_it_once() {
        let e = Arc::new(engine(4096, &[("golden.raw", 512, 1)]));
        e.clone_paths(
            b"golden.raw",
            &[b"c1".to_vec(), b"c2".to_vec(), b"c3".to_vec()],
        )
        .unwrap();
        let names = [
            "golden.raw",
            "c1",
            "c2",
            "c3",
            "golden.raw",
            "c1",
            "c2",
            "c3",
        ];
        let start = Arc::new(Barrier::new(names.len()));
        let readers: Vec<_> = names
            .iter()
            .map(|n| {
                let (e, start, n) = (e.clone(), start.clone(), n.to_string());
                std::thread::spawn(move || {
                    let i = ino(&e, &n);
                    start.wait();
                    // Chunk by chunk, as a booting guest reads small blocks.
                    for k in 0..512u64 {
                        assert_eq!(e.read(i, k * C as u64, C as u32).unwrap().len(), C);
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        let (hits, misses) = cache(&e);
        assert_eq!(misses, 512, "every chunk loaded once ({hits} hits)");
        assert_eq!(hits, 7 * 512);
        assert_eq!(content(&e, "c3"), unique_data(1, 512, C));
    }

    /// Protects: a scan (a guest's antivirus sweep, a backup reading a whole desktop) does not
    /// push out of the cache the chunks that are read again and again.
    #[test]
    fn a_scan_does_not_push_out_chunks_read_again_and_again() {
        let e = engine(256, &[("golden.raw", 128, 1), ("scan.raw", 2048, 2)]);
        let read_all = |name: &str| {
            let i = ino(&e, name);
            let size = e.getattr(i).unwrap().inode.size;
            for off in (0..size).step_by(C) {
                e.read(i, off, C as u32).unwrap();
            }
        };
        read_all("golden.raw");
        read_all("golden.raw");
        read_all("scan.raw");
        let before = cache(&e);
        read_all("golden.raw");
        let (hits, misses) = cache(&e);
        assert!(
            hits - before.0 >= 120,
            "golden after the scan: {} hits, {} misses",
            hits - before.0,
            misses - before.1
        );
    }

    /// Protects `tessera warm`: warming a template loads its chunks once; its clones then read
    /// from the cache only, even after a scan.
    #[test]
    fn warm_loads_a_template_and_its_clones_read_from_the_cache() {
        const CACHE: u64 = 2048;
        const GOLDEN: usize = 1024;
        let e = engine(
            CACHE,
            &[
                ("golden.raw", GOLDEN, 1),
                ("scan.raw", 4 * CACHE as usize, 2),
                ("other.raw", CACHE as usize, 3),
            ],
        );
        // A full cache, as on a server that has been up a while.
        let other = ino(&e, "other.raw");
        for off in (0..CACHE * C as u64).step_by(C) {
            e.read(other, off, C as u32).unwrap();
        }
        e.mkdir(InodeId::ROOT, b"pool", 0o755, Ctx::ROOT).unwrap();
        e.clone_paths(b"golden.raw", &[b"pool/d1".to_vec(), b"pool/d2".to_vec()])
            .unwrap();
        let r = e.warm("/golden.raw", &|_, _| {}).unwrap();
        assert_eq!(
            (r.files, r.chunks, r.loaded),
            (1, GOLDEN as u64, GOLDEN as u64),
            "{r:?}"
        );
        assert!(!r.cache_full);
        let i = ino(&e, "scan.raw");
        for off in (0..4 * CACHE * C as u64).step_by(C) {
            e.read(i, off, C as u32).unwrap();
        }
        let before = cache(&e);
        let d1 = e.lookup(e.resolve(b"pool").unwrap(), b"d1").unwrap().ino;
        for off in (0..GOLDEN as u64 * C as u64).step_by(C) {
            e.read(d1, off, C as u32).unwrap();
        }
        let (hits, misses) = cache(&e);
        assert!(
            misses - before.1 <= GOLDEN as u64 / 20,
            "{} misses, {} hits",
            misses - before.1,
            hits - before.0
        );
        // The folder of clones holds the same chunks: nothing more to load.
        let r = e.warm("/pool", &|_, _| {}).unwrap();
        assert_eq!(
            (r.files, r.chunks, r.loaded),
            (2, GOLDEN as u64, 0),
            "{r:?}"
        );
        // More than the cache holds: it says so and stops.
        let r = e.warm("/scan.raw", &|_, _| {}).unwrap();
        assert!(r.cache_full && r.chunks == CACHE, "{r:?}");
    }
}
