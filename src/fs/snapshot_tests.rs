//! Snapshot tests: read-only enforcement at every entry point, rollback and restore, space and
//! reclamation, retention and schedules, and a proptest of snapshot operations interleaved with
//! writes against a model, with fsck after every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::data::SetAttr;
use super::dir::{Ctx, RenameFlags};
use super::snapshot::{Keep, SNAP_DIR};
use super::*;
use crate::fs::testutil::{put_path as put, read_path as read};
use crate::store::pack::MemPackIo;

const C: usize = 4096;

fn engine() -> Engine {
    Engine::in_memory(
        Format {
            chunk_size: C as u32,
            zstd_level: 1,
        },
        Arc::new(MemPackIo::default()),
    )
    .unwrap()
}

fn reopen(e: Engine) -> Engine {
    e.sync_all().unwrap();
    let (db, io) = e.into_parts();
    Engine::with_parts(db, io, Tuning::default()).unwrap()
}

fn assert_clean(e: &Engine) {
    let r = e.fsck(&|_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "fsck: {:#?}", r.problems);
}

fn data(seed: u64, chunks: usize) -> Vec<u8> {
    crate::fs::testutil::unique_data(seed, chunks, C)
}

fn names(e: &Engine, path: &str) -> Vec<String> {
    let d = e.resolve(path.as_bytes()).unwrap();
    e.readdir(d, 0, 10_000)
        .unwrap()
        .into_iter()
        .map(|x| String::from_utf8(x.name).unwrap())
        .filter(|n| n != "." && n != "..")
        .collect()
}

fn vm(e: &Engine) {
    e.mkdir(InodeId::ROOT, b"vms", 0o755, Ctx::ROOT).unwrap();
    let v = e.resolve(b"vms").unwrap();
    e.mkdir(v, b"desk01", 0o755, Ctx::ROOT).unwrap();
    put(e, "vms/desk01/disk.raw", &data(1, 64));
    put(e, "vms/desk01/nvram", b"nvram v1");
}

/// Protects: a snapshot keeps what the folder held when it was taken while the folder changes;
/// it is readable at `/.snapshots/<path>@<name>`, left out of the root's listing, and every way
/// of changing it fails with ReadOnly (data, size, mode, entries, renames, links), through
/// restarts too.
#[test]
fn snapshot_is_a_read_only_point_in_time_copy() {
    let e = engine();
    vm(&e);
    let s = e
        .snapshot_create("/vms/desk01", Some("before-patch"))
        .unwrap();
    assert_eq!(s.location, "/.snapshots/vms/desk01@before-patch");
    // The live folder changes afterwards.
    let disk = e.resolve(b"vms/desk01/disk.raw").unwrap();
    e.write(disk, 5 * C as u64, &data(2, 3)).unwrap();
    put(&e, "vms/desk01/new.log", b"new");
    let d = e.resolve(b"vms/desk01").unwrap();
    e.unlink(d, b"nvram").unwrap();

    let snap = "/.snapshots/vms/desk01@before-patch";
    assert_eq!(read(&e, &format!("{snap}/disk.raw")), data(1, 64));
    assert_eq!(read(&e, &format!("{snap}/nvram")), b"nvram v1");
    let mut n = names(&e, snap);
    n.sort();
    assert_eq!(n, ["disk.raw", "nvram"]);
    assert!(!names(&e, "/").contains(&".snapshots".to_string()));
    assert!(e.lookup(InodeId::ROOT, SNAP_DIR).is_ok());

    let sd = e.resolve(snap.as_bytes()).unwrap();
    let sf = e.resolve(format!("{snap}/disk.raw").as_bytes()).unwrap();
    let ro = |r: FsResult<()>, what: &str| {
        assert!(matches!(r, Err(FsError::ReadOnly)), "{what}: {r:?}");
    };
    ro(e.write(sf, 0, b"x").map(|_| ()), "write");
    ro(
        e.write_with_attrs(sf, 0, b"x", |_| Ok::<(), FsError>(()))
            .map(|_| ()),
        "NFS write",
    );
    ro(
        e.setattr(
            sf,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )
        .map(|_| ()),
        "truncate",
    );
    ro(
        e.setattr(
            sf,
            &SetAttr {
                mode: Some(0o777),
                ..Default::default()
            },
        )
        .map(|_| ()),
        "chmod",
    );
    ro(
        e.mknod(sd, b"x", Kind::File, 0o644, 0, Ctx::ROOT)
            .map(|_| ()),
        "create",
    );
    ro(e.mkdir(sd, b"x", 0o755, Ctx::ROOT).map(|_| ()), "mkdir");
    ro(e.unlink(sd, b"nvram"), "unlink");
    ro(
        e.rename(sd, b"nvram", d, b"stolen", RenameFlags::default()),
        "rename out",
    );
    ro(e.link(sf, d, b"hard").map(|_| ()), "link");
    ro(
        e.setxattr(sf, b"user.x", b"1", super::xattr::XattrMode::Any),
        "setxattr",
    );
    ro(e.open_handle(sf, true).map(|_| ()), "open for writing");
    e.open_handle(sf, false).unwrap();
    e.release_handle(sf).unwrap();
    ro(
        e.rename(
            InodeId::ROOT,
            SNAP_DIR,
            InodeId::ROOT,
            b"moved",
            RenameFlags::default(),
        ),
        "rename /.snapshots",
    );
    ro(
        e.rename(
            e.resolve(b"/.snapshots/vms").unwrap(),
            b"desk01@before-patch",
            d,
            b"moved",
            RenameFlags::default(),
        ),
        "rename a snapshot out",
    );
    assert!(
        e.mknod(InodeId::ROOT, SNAP_DIR, Kind::File, 0o644, 0, Ctx::ROOT)
            .is_err(),
        "the name is taken"
    );
    assert_clean(&e);
    let e = reopen(e);
    assert_eq!(read(&e, &format!("{snap}/disk.raw")), data(1, 64));
    assert_eq!(e.snapshot_list(None).unwrap().len(), 1);
    assert_clean(&e);
}

/// Protects: rollback makes the folder hold exactly the snapshot (changed files back, new ones
/// gone, deleted ones back), keeps the inode numbers of files present in both (NFS handles stay
/// valid), discards unflushed writes made before it, and keeps newer snapshots; restore makes
/// a writable copy; a deleted VM comes back with rollback.
#[test]
fn rollback_and_restore() {
    let e = engine();
    vm(&e);
    let disk = e.resolve(b"vms/desk01/disk.raw").unwrap();
    e.snapshot_create("/vms/desk01", Some("a")).unwrap();
    e.write(disk, 0, &data(3, 8)).unwrap();
    put(&e, "vms/desk01/new.log", b"new");
    e.snapshot_create("/vms/desk01", Some("b")).unwrap();
    let after_b = read(&e, "vms/desk01/disk.raw");
    let d = e.resolve(b"vms/desk01").unwrap();
    e.unlink(d, b"nvram").unwrap();
    // Unflushed when the rollback starts.
    e.write(disk, 10 * C as u64, &data(4, 2)).unwrap();

    e.snapshot_rollback("/vms/desk01", "a").unwrap();
    assert_eq!(e.resolve(b"vms/desk01/disk.raw").unwrap(), disk);
    assert_eq!(read(&e, "vms/desk01/disk.raw"), data(1, 64));
    assert_eq!(read(&e, "vms/desk01/nvram"), b"nvram v1");
    let mut n = names(&e, "vms/desk01");
    n.sort();
    assert_eq!(n, ["disk.raw", "nvram"]);
    // The newer snapshot is still there, and rolling forward to it works.
    let l = e.snapshot_list(Some("vms/desk01")).unwrap();
    assert_eq!(
        l.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    e.snapshot_rollback("/vms/desk01", "b").unwrap();
    assert_eq!(read(&e, "vms/desk01/disk.raw"), after_b);
    assert_eq!(read(&e, "vms/desk01/new.log"), b"new");

    // Restore: a writable copy.
    e.snapshot_restore("/vms/desk01", "a", "/vms/desk01-old")
        .unwrap();
    assert_eq!(read(&e, "vms/desk01-old/disk.raw"), data(1, 64));
    let c = e.resolve(b"vms/desk01-old/disk.raw").unwrap();
    e.write(c, 0, b"writable").unwrap();
    assert!(matches!(
        e.snapshot_restore("/vms/desk01", "a", "/vms/desk01-old"),
        Err(FsError::Exists)
    ));

    // A deleted VM folder comes back.
    let v = e.resolve(b"vms").unwrap();
    let mut gone = Vec::new();
    e.txn(true, |w| e.remove_tree(w, v, b"desk01", &mut gone))
        .unwrap();
    e.snapshot_rollback("/vms/desk01", "a").unwrap();
    assert_eq!(read(&e, "vms/desk01/disk.raw"), data(1, 64));
    assert_clean(&e);
}

/// Protects: reclamation respects snapshots (data only a snapshot holds survives gc byte for
/// byte), `du` tells what a snapshot holds alone, and deleting it frees that after gc; the
/// empty mirror folders go with the last snapshot.
#[test]
fn snapshots_hold_space_until_deleted() {
    let e = engine();
    vm(&e);
    e.snapshot_create("/vms/desk01", Some("s")).unwrap();
    // Overwrite the whole disk: the old data is now only in the snapshot.
    put(&e, "vms/desk01/disk.raw", &data(9, 64));
    e.sync_all().unwrap();
    e.gc(1.0, &|_, _| {}).unwrap();
    assert_eq!(read(&e, "/.snapshots/vms/desk01@s/disk.raw"), data(1, 64));
    let u = e.du("/.snapshots/vms/desk01@s").unwrap();
    assert_eq!(u.unique_bytes, 64 * C as u64, "{u:?}");
    let before = e.stats().unwrap().stored_bytes;
    e.snapshot_delete("/vms/desk01", "s").unwrap();
    let after = e.stats().unwrap().stored_bytes;
    assert!(
        before - after >= 64 * C as u64 * 9 / 10,
        "deleting the snapshot frees its data: {before} -> {after}"
    );
    assert!(
        names(&e, "/.snapshots").is_empty(),
        "mirror folders removed"
    );
    assert!(matches!(
        e.snapshot_delete("/vms/desk01", "s"),
        Err(FsError::NotFound)
    ));
    assert_clean(&e);
}

/// Protects: names and paths are checked (no root, no snapshot of a snapshot, no duplicate,
/// no `@` or `/` in names), and a snapshot of a single file works.
#[test]
fn bad_requests_are_refused_and_files_snapshot_too() {
    let e = engine();
    vm(&e);
    assert!(e.snapshot_create("/", Some("x")).is_err());
    assert!(e.snapshot_create("/vms/desk01", Some("a@b")).is_err());
    assert!(e.snapshot_create("/vms/desk01", Some("a/b")).is_err());
    assert!(e.snapshot_create("/vms/desk01", Some(".x")).is_err());
    assert!(matches!(
        e.snapshot_create("/nope", Some("x")),
        Err(FsError::NotFound)
    ));
    e.snapshot_create("/vms/desk01/nvram", Some("f")).unwrap();
    assert!(matches!(
        e.snapshot_create("/vms/desk01/nvram", Some("f")),
        Err(FsError::Exists)
    ));
    assert!(e
        .snapshot_create("/.snapshots/vms/desk01/nvram@f", Some("g"))
        .is_err());
    put(&e, "vms/desk01/nvram", b"nvram v2");
    assert_eq!(read(&e, "/.snapshots/vms/desk01/nvram@f"), b"nvram v1");
    e.snapshot_rollback("vms/desk01/nvram", "f").unwrap();
    assert_eq!(read(&e, "vms/desk01/nvram"), b"nvram v1");
    // Default names are the UTC time.
    let s = e.snapshot_create("/vms/desk01", None).unwrap();
    assert_eq!(s.name.len(), "20261130-052011".len(), "{}", s.name);
    assert_clean(&e);
}

/// Protects: retention keeps the newest N, one per hour and one per day as asked, like a backup
/// tool's prune.
#[test]
fn keep_rules_choose_like_a_prune() {
    let h = 3600u64;
    // Newest first: two in hour 50, one in hour 49, one in hour 26 (day 1), one in hour 2.
    let t = [50 * h + 30, 50 * h + 10, 49 * h, 26 * h, 2 * h];
    let k = |last, hourly, daily| {
        Keep {
            last,
            hourly,
            daily,
        }
        .choose(&t)
    };
    assert_eq!(k(2, 0, 0), [true, true, false, false, false]);
    assert_eq!(k(0, 2, 0), [true, false, true, false, false]);
    assert_eq!(k(0, 0, 3), [true, false, false, true, true]);
    assert_eq!(k(1, 1, 1), [true, false, false, false, false]);
    assert_eq!(snapshot::rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(snapshot::rfc3339(1_796_016_011), "2026-11-30T05:20:11Z");
    assert_eq!(snapshot::default_name(1_796_016_011), "20261130-052011");
}

/// Protects: a schedule snapshots a path every interval and prunes only its own snapshots by
/// its rules; a manual snapshot is never pruned by it.
#[test]
fn schedules_take_and_prune() {
    let e = engine();
    vm(&e);
    e.snapshot_create("/vms/desk01", Some("manual")).unwrap();
    let keep = Keep {
        last: 2,
        hourly: 0,
        daily: 0,
    };
    e.snapshot_schedule("/vms/desk01", Some((600, keep)))
        .unwrap();
    assert!(e
        .snapshot_schedule("/vms/desk01", Some((10, keep)))
        .is_err());
    assert!(e
        .snapshot_schedule("/vms/desk01", Some((600, Keep::default())))
        .is_err());
    let t0 = 1_800_000_000u64;
    let r = e.run_snapshot_schedules(t0).unwrap();
    assert_eq!(r.created.len(), 1);
    assert!(r.created[0].name.starts_with("auto-"));
    // Not due yet.
    assert!(e
        .run_snapshot_schedules(t0 + 599)
        .unwrap()
        .created
        .is_empty());
    for k in 1..=3 {
        e.run_snapshot_schedules(t0 + 600 * k).unwrap();
    }
    let l = e.snapshot_list(Some("/vms/desk01")).unwrap();
    let auto: Vec<u64> = l
        .iter()
        .filter(|s| s.scheduled)
        .map(|s| s.created)
        .collect();
    assert_eq!(auto, [t0 + 1200, t0 + 1800]);
    assert!(l.iter().any(|s| s.name == "manual"));
    e.snapshot_schedule("/vms/desk01", None).unwrap();
    assert!(e
        .run_snapshot_schedules(t0 + 9999)
        .unwrap()
        .created
        .is_empty());
    assert_clean(&e);
}

#[derive(Clone, Debug)]
enum Op {
    Write { f: u8, off: u16, len: u16, seed: u8 },
    Truncate { f: u8, size: u16 },
    Unlink { f: u8 },
    Snap { s: u8 },
    Delete { s: u8 },
    Rollback { s: u8 },
    Restore { s: u8 },
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, 0..20_000u16, 1..9000u16, any::<u8>())
            .prop_map(|(f, off, len, seed)| Op::Write { f, off, len, seed }),
        1 => (0..3u8, 0..20_000u16).prop_map(|(f, size)| Op::Truncate { f, size }),
        1 => (0..3u8).prop_map(|f| Op::Unlink { f }),
        2 => (0..3u8).prop_map(|s| Op::Snap { s }),
        1 => (0..3u8).prop_map(|s| Op::Delete { s }),
        2 => (0..3u8).prop_map(|s| Op::Rollback { s }),
        1 => (0..3u8).prop_map(|s| Op::Restore { s }),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

type Tree = BTreeMap<String, Vec<u8>>;

fn check_tree(e: &Engine, dir: &str, want: &Tree) -> Result<(), TestCaseError> {
    let mut got = names(e, dir);
    got.sort();
    let keys: Vec<String> = want.keys().cloned().collect();
    prop_assert_eq!(&got, &keys, "names in {}", dir);
    for (n, v) in want {
        prop_assert!(
            read(e, &format!("{dir}/{n}")) == *v,
            "{}/{} differs",
            dir,
            n
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Protects: any interleaving of writes, truncates, deletes, snapshot create, delete,
    /// rollback and restore, gc and restarts leaves the VM folder, every snapshot and every
    /// restored copy byte-identical to the model, and fsck clean after every step.
    #[test]
    fn snapshots_match_model(ops in proptest::collection::vec(op(), 1..30)) {
        crate::deadlock::watchdog();
        let mut e = engine();
        e.mkdir(InodeId::ROOT, b"vm", 0o755, Ctx::ROOT).unwrap();
        let mut live = Tree::new();
        let mut snaps: BTreeMap<u8, Tree> = BTreeMap::new();
        let mut restored: BTreeMap<u8, Tree> = BTreeMap::new();
        for op in &ops {
            match *op {
                Op::Write { f, off, len, seed } => {
                    let n = format!("f{f}");
                    let bytes: Vec<u8> = (0..len).map(|i| seed.wrapping_add((i / 97) as u8)).collect();
                    let v = live.entry(n.clone()).or_default();
                    let end = off as usize + len as usize;
                    if v.len() < end { v.resize(end, 0); }
                    v[off as usize..end].copy_from_slice(&bytes);
                    let i = match e.resolve(format!("vm/{n}").as_bytes()) {
                        Ok(i) => i,
                        Err(_) => e.mknod(e.resolve(b"vm").unwrap(), n.as_bytes(), Kind::File, 0o644, 0, Ctx::ROOT).unwrap().ino,
                    };
                    e.write(i, u64::from(off), &bytes).unwrap();
                }
                Op::Truncate { f, size } => {
                    let n = format!("f{f}");
                    if let Some(v) = live.get_mut(&n) {
                        v.resize(size as usize, 0);
                        let i = e.resolve(format!("vm/{n}").as_bytes()).unwrap();
                        e.setattr(i, &SetAttr { size: Some(u64::from(size)), ..Default::default() }).unwrap();
                    }
                }
                Op::Unlink { f } => {
                    let n = format!("f{f}");
                    if live.remove(&n).is_some() {
                        e.unlink(e.resolve(b"vm").unwrap(), n.as_bytes()).unwrap();
                    }
                }
                Op::Snap { s } => {
                    let r = e.snapshot_create("vm", Some(&format!("s{s}")));
                    if let std::collections::btree_map::Entry::Vacant(v) = snaps.entry(s) {
                        r.unwrap();
                        v.insert(live.clone());
                    } else {
                        prop_assert!(matches!(r, Err(FsError::Exists)));
                    }
                }
                Op::Delete { s } => {
                    let r = e.snapshot_delete("vm", &format!("s{s}"));
                    prop_assert_eq!(r.is_ok(), snaps.remove(&s).is_some());
                }
                Op::Rollback { s } => {
                    let r = e.snapshot_rollback("/vm", &format!("s{s}"));
                    match snaps.get(&s) {
                        Some(t) => { r.unwrap(); live = t.clone(); }
                        None => prop_assert!(matches!(r, Err(FsError::NotFound))),
                    }
                }
                Op::Restore { s } => {
                    if let Some(t) = snaps.get(&s) {
                        let dst = format!("r{s}");
                        if restored.remove(&s).is_some() {
                            let mut gone = Vec::new();
                            e.txn(true, |w| e.remove_tree(w, InodeId::ROOT, dst.as_bytes(), &mut gone)).unwrap();
                        }
                        e.snapshot_restore("vm", &format!("s{s}"), &dst).unwrap();
                        restored.insert(s, t.clone());
                    }
                }
                Op::Gc => {
                    e.sync_all().unwrap();
                    e.gc(1.0, &|_, _| {}).unwrap();
                }
                Op::Reopen => e = reopen(e),
            }
            check_tree(&e, "vm", &live)?;
            for (s, t) in &snaps {
                check_tree(&e, &format!(".snapshots/vm@s{s}"), t)?;
            }
            for (s, t) in &restored {
                check_tree(&e, &format!("r{s}"), t)?;
            }
            e.sync_all().unwrap();
            assert_clean(&e);
        }
    }
}
