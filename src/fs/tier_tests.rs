//! Tests of an S3-backed datastore: the engine over the object-store tier, on a real folder,
//! with object_store's in-memory store behind a fault injector (`crate::store::faulty`).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::testutil::{put_path, read_path, unique_data};
use super::{Engine, Format, Tuning};
use crate::store::faulty::Faulty;
use crate::store::pack::PackIo;
use crate::store::remote::{Remote, TierConfig};
use crate::store::tier::{TierStats, TieredPackIo};

const C: usize = 16384;

fn config(cache_bytes: u64) -> TierConfig {
    TierConfig {
        url: "s3://mem/ds".into(),
        endpoint: None,
        region: None,
        credentials_file: None,
        cache_bytes,
        upload_rate: 0,
        // Small packs: a few MiB of data make many objects.
        pack_bytes: 1 << 20,
        seal_idle_secs: 1,
    }
}

fn remote(store: &Arc<Faulty>) -> Arc<Remote> {
    Arc::new(Remote::new(store.clone(), "ds", "s3://mem/ds").unwrap())
}

/// An engine on `dir` whose packs go to `store` (the datastore is created if absent).
fn open(dir: &Path, store: &Arc<Faulty>, cache_bytes: u64) -> std::io::Result<Engine> {
    let cfg = config(cache_bytes);
    if !dir.join(super::META_FILE).exists() {
        Engine::create_with_tier(dir, Format::default(), Some(&cfg)).unwrap();
    }
    let io = TieredPackIo::with_remote(dir, &dir.join(super::PACK_DIR), cfg, remote(store))?;
    Engine::open_with(
        dir,
        Tuning::default(),
        Some(Arc::new(io) as Arc<dyn PackIo>),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))
}

fn tier(e: &Engine) -> TierStats {
    e.store.tier().unwrap()
}

/// Seal, then wait until every pack is in the bucket.
fn drain(e: &Engine) {
    e.sync_all().unwrap();
    e.store.drain_uploads(Duration::from_secs(60)).unwrap();
}

/// Protects the tier's central promise: with one request in four failing (500s, timeouts,
/// resets, cut multipart uploads), every pack still reaches the bucket, the folder is cut
/// down to the cache size once uploads are confirmed, and every byte reads back, from the
/// bucket where the local copy was evicted.
#[test]
fn packs_reach_the_bucket_through_failures_and_read_back_after_eviction() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let store = Arc::new(Faulty::new(0));
    let e = open(&ds, &store, 2 << 20).unwrap();
    store.faults.every.store(4, Ordering::Relaxed);
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), unique_data(100 + i, 64, C)))
        .collect();
    for (name, data) in &files {
        put_path(&e, name, data);
    }
    drain(&e);
    let t = tier(&e);
    assert!(
        store.faults.failed.load(Ordering::Relaxed) > 0,
        "no fault was injected"
    );
    assert_eq!(t.uploads_pending, 0);
    assert!(t.objects >= 8, "{t:?}");
    assert!(
        t.cached_pack_bytes + t.cache_block_bytes <= t.cache_limit_bytes,
        "the folder keeps more than its cache: {t:?}"
    );
    let before = t.bytes_downloaded;
    for (name, data) in &files {
        assert!(read_path(&e, name) == *data, "{name} reads back wrong");
    }
    assert!(
        tier(&e).bytes_downloaded > before,
        "nothing was read back from the bucket"
    );
    // And after a restart, from the bucket alone where evicted.
    drop(e);
    let e = open(&ds, &store, 2 << 20).unwrap();
    for (name, data) in &files {
        assert!(
            read_path(&e, name) == *data,
            "{name} reads back wrong after a restart"
        );
    }
    let report = e.fsck(&|_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Protects "never a wrong byte from the bucket": an object whose bytes changed in the bucket
/// reads as an error (the store verifies every chunk against its id), never as data.
#[test]
fn a_damaged_object_reads_as_an_error_not_as_wrong_bytes() {
    use object_store::ObjectStoreExt;
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let store = Arc::new(Faulty::new(0));
    let e = open(&ds, &store, 0).unwrap();
    let data = unique_data(7, 32, C);
    put_path(&e, "f", &data);
    drain(&e);
    drop(e);
    // Flip one byte in the middle of every pack object.
    let packs = remote(&store).list("packs").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for (name, _) in packs {
            let p = object_store::path::Path::from(format!("ds/{name}"));
            let mut b = store
                .inner
                .get(&p)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
            store.inner.put(&p, b.into()).await.unwrap();
        }
    });
    let e = open(&ds, &store, 0).unwrap();
    let i = super::testutil::ino(&e, "f");
    let mut errors = 0;
    for off in (0..data.len()).step_by(C) {
        match e.read(i, off as u64, C as u32) {
            Ok(b) => assert_eq!(b, data[off..off + C], "wrong bytes at {off}"),
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 0, "the damage was not noticed");
}

/// Protects one writer per bucket prefix: a second datastore opened on the same prefix is
/// refused and told which host holds it; once the first stops, it may start.
#[test]
fn a_second_writer_is_refused_by_the_lease() {
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty::new(0));
    let a = open(&d.path().join("a"), &store, 1 << 20).unwrap();
    let Err(err) = open(&d.path().join("b"), &store, 1 << 20) else {
        panic!("a second writer opened the prefix");
    };
    assert!(err.to_string().contains("is in use by host"), "{err}");
    drop(a);
    open(&d.path().join("b"), &store, 1 << 20).unwrap();
}

/// Protects restore and deferred deletes: objects of packs that compaction removed stay in
/// the bucket until a metadata backup without them is there (deletes pending shows them),
/// then go; and `restore` rebuilds the datastore from the bucket alone, every file identical
/// and fsck clean.
#[test]
fn compaction_deletes_objects_after_a_backup_and_restore_rebuilds_from_the_bucket() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let store = Arc::new(Faulty::new(0));
    let e = open(&ds, &store, 1 << 20).unwrap();
    let keep: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("keep{i}"), unique_data(200 + i, 48, C)))
        .collect();
    for (n, data) in &keep {
        put_path(&e, n, data);
    }
    for i in 0..3 {
        put_path(&e, &format!("gone{i}"), &unique_data(300 + i, 48, C));
    }
    drain(&e);
    for i in 0..3 {
        e.unlink(super::InodeId::ROOT, format!("gone{i}").as_bytes())
            .unwrap();
    }
    e.sync_all().unwrap();
    let objects = tier(&e).objects;
    let r = e.gc(0.9, &|_, _| {}).unwrap();
    assert!(r.packs_compacted > 0, "{r:?}");
    drain(&e);
    let t = tier(&e);
    assert!(
        t.deletes_pending > 0,
        "removed packs were deleted before a backup: {t:?}"
    );
    e.backup_metadata().unwrap().unwrap();
    let start = std::time::Instant::now();
    while tier(&e).deletes_pending > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", tier(&e));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tier(&e).objects < objects + 3, "{:?}", tier(&e));
    drop(e);

    let again = d.path().join("restored");
    let info = super::tier_backup::restore_from(&remote(&store), &config(1 << 20), &again).unwrap();
    assert!(info.object.starts_with("meta/"));
    let e = open(&again, &store, 1 << 20).unwrap();
    for (n, data) in &keep {
        assert!(read_path(&e, n) == *data, "{n} differs after restore");
    }
    assert!(e.lookup(super::InodeId::ROOT, b"gone0").is_err());
    let report = e.fsck(&|_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Protects the bucket from growing with orphans: the delete of a compacted pack's object
/// waits for a metadata backup, in memory only, so a crash before it leaves the object behind.
/// The next open counts it as reclaimable, background reclamation finds it due, and the next
/// compaction removes it (deleted after the next backup); every file still reads back.
#[test]
fn objects_of_compacted_packs_left_by_a_crash_are_swept_by_the_next_compaction() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let store = Arc::new(Faulty::new(0));
    let e = open(&ds, &store, 1 << 20).unwrap();
    let keep = unique_data(400, 48, C);
    put_path(&e, "keep", &keep);
    for i in 0..3 {
        put_path(&e, &format!("gone{i}"), &unique_data(410 + i, 48, C));
    }
    drain(&e);
    for i in 0..3 {
        e.unlink(super::InodeId::ROOT, format!("gone{i}").as_bytes())
            .unwrap();
    }
    e.sync_all().unwrap();
    assert!(e.gc(0.9, &|_, _| {}).unwrap().packs_compacted > 0);
    drain(&e);
    assert!(tier(&e).deletes_pending > 0);
    // A crash: the pending deletes are forgotten, no backup was taken.
    drop(e);

    let e = open(&ds, &store, 1 << 20).unwrap();
    let uses = e.store.pack_use(&e.read_txn().unwrap()).unwrap();
    let orphans = e.store.unaccounted_packs(&uses).unwrap();
    assert!(!orphans.is_empty(), "the crash left no orphan object");
    let orphan_bytes: u64 = orphans.iter().map(|o| o.1).sum();
    assert!(e.stats().unwrap().reclaimable_bytes >= orphan_bytes);
    assert_eq!(e.reclaim_threshold().unwrap(), Some(0.0));
    let r = e.gc(0.0, &|_, _| {}).unwrap();
    assert!(r.packs_compacted >= orphans.len() as u64, "{r:?}");
    drain(&e);
    e.backup_metadata().unwrap().unwrap();
    assert!(e.finish_deletes(Duration::from_secs(30)), "{:?}", tier(&e));
    let uses = e.store.pack_use(&e.read_txn().unwrap()).unwrap();
    assert!(e.store.unaccounted_packs(&uses).unwrap().is_empty());
    let objects: Vec<_> = e.store.pack_files().unwrap();
    assert_eq!(tier(&e).objects, objects.len() as u64, "{:?}", tier(&e));
    assert!(read_path(&e, "keep") == keep);
    let report = e.fsck(&|_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Protects the disk cache from scans: a scrub reads every object of the bucket back through
/// the cache, and must not evict the blocks a desktop reads (its blocks enter as the least
/// recently used and evict each other). After the scrub, the blocks a desktop read before it
/// are all still cached.
#[test]
fn a_scrub_of_the_bucket_does_not_evict_what_desktops_read() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    let store = Arc::new(Faulty::new(0));
    let cache = 6 << 20;
    open(&ds, &store, cache).unwrap();
    let io = TieredPackIo::with_remote(
        &ds,
        &ds.join(super::PACK_DIR),
        config(cache),
        remote(&store),
    )
    .unwrap();
    // A RAM chunk cache of 16 chunks: rereads go to the packs.
    let tuning = Tuning {
        cache_bytes: 0,
        ..Tuning::default()
    };
    let e = Engine::open_with(&ds, tuning, Some(Arc::new(io) as Arc<dyn PackIo>)).unwrap();
    let files: Vec<Vec<u8>> = (0..10).map(|i| unique_data(500 + i, 64, C)).collect();
    for (i, data) in files.iter().enumerate() {
        put_path(&e, &format!("f{i}"), data);
    }
    drain(&e);
    // f0 went first: its packs were uploaded first and are evicted once the uploader, after
    // its last upload, brings the uploaded packs kept down to half the cache.
    let start = std::time::Instant::now();
    while tier(&e).cached_pack_bytes > cache / 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "{:?}", tier(&e));
        std::thread::sleep(Duration::from_millis(20));
    }
    let io = e.store.tier_io().unwrap();
    let blocks = || io.cached_blocks();
    // A desktop's read of the first pack (straight from the pack I/O: the RAM chunk cache
    // would otherwise answer some reads without touching the disk cache).
    let (first, len) = e.store.pack_files().unwrap()[0];
    io.read_at(first, 0, len.min(3 << 19) as usize).unwrap();
    let desktop = blocks();
    assert!(
        !desktop.is_empty(),
        "the first pack was not read from the bucket"
    );
    let before_scrub = tier(&e).requests_get;
    let r = e.scrub(&|_, _| {}).unwrap();
    assert!(r.damaged.is_empty(), "{r:?}");
    assert!(
        tier(&e).requests_get > before_scrub + 4,
        "the scrub read little from the bucket: the test does not test the cache"
    );
    let after = blocks();
    assert!(
        desktop.is_subset(&after),
        "the scrub evicted the blocks a desktop read before it: {desktop:?} then {after:?}"
    );
    assert!(read_path(&e, "f0") == files[0]);
}

/// Protects the fencing: a server whose lease another server took over (a split brain: the
/// first was thought dead) stops uploading and deleting, and says so, rather than writing
/// into a prefix that has another writer.
#[test]
fn a_server_whose_lease_was_taken_stops_uploading() {
    use object_store::ObjectStoreExt;
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(Faulty::new(0));
    let e = open(&d.path().join("a"), &store, 1 << 20).unwrap();
    let other = br#"{"host":"other-host","pid":1,"datastore":"/srv/x","expires_unix":99999999999}"#;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let p = object_store::path::Path::from("ds/lease.json");
        store.inner.put(&p, other.to_vec().into()).await.unwrap();
    });
    let start = std::time::Instant::now();
    while tier(&e).fenced.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the takeover went unnoticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let objects = tier(&e).objects;
    put_path(&e, "f", &unique_data(9, 80, C));
    e.sync_all().unwrap();
    let err = e.store.drain_uploads(Duration::from_secs(5)).unwrap_err();
    assert!(err.to_string().contains("took the lease"), "{err}");
    // Time enough for an uploader that ignored the fence to upload the sealed pack.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(tier(&e).objects, objects, "a fenced server uploaded");
    assert_eq!(tier(&e).uploads_pending, 1);
    // Its data is still all there locally.
    assert!(read_path(&e, "f") == unique_data(9, 80, C));
}
