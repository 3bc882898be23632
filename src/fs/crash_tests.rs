//! Crash tests: the engine over a metadata disk and packs that lose what was never synced.
//!
//! [`CrashDisk`] is a redb storage backend in memory that remembers which of its writes were
//! made durable by `sync_data`. Two crashes are simulated, each by building a new database
//! from an image of the disk (the old engine is simply forgotten, nothing is flushed):
//! - kill -9 of the process: the page cache survives, so every write reached the file, synced
//!   or not; packs keep every append. redb then drops its `Durability::None` commits, which is
//!   how acknowledged metadata used to be lost;
//! - power loss: the disk holds what was synced plus any subset of the later writes (page
//!   cache write-back has no order); packs keep their synced bytes plus a torn prefix of the
//!   rest.
//!
//! A property test runs random operation sequences with crashes between operations and checks
//! every acknowledged-durable operation and byte after each one, then fsck.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use proptest::prelude::*;
use redb::{Database, StorageBackend};

use super::data::{Falloc, SetAttr};
use super::dir::{Ctx, RenameFlags};
use super::*;
use crate::fs::testutil::{content as read_all, ino};
use crate::store::pack::MemPackIo;

/// A write or a length change the disk has seen but not synced.
#[derive(Debug)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct DiskState {
    /// What reads see (the page cache).
    current: Vec<u8>,
    /// What the disk holds for sure: the state at the last `sync_data`.
    durable: Vec<u8>,
    /// Changes since then, in order.
    pending: Vec<Pending>,
}

/// A redb backend that can crash (see the module doc).
#[derive(Debug, Clone, Default)]
pub(crate) struct CrashDisk(Arc<Mutex<DiskState>>);

impl CrashDisk {
    fn from_image(img: Vec<u8>) -> CrashDisk {
        CrashDisk(Arc::new(Mutex::new(DiskState {
            current: img.clone(),
            durable: img,
            pending: Vec::new(),
        })))
    }

    /// The file after a kill -9: every write, synced or not.
    fn kill_image(&self) -> Vec<u8> {
        self.0.lock().current.clone()
    }

    /// The file after a power loss: what was synced, plus the unsynced changes `keep` picks.
    fn power_image(&self, mut keep: impl FnMut() -> bool) -> Vec<u8> {
        let s = self.0.lock();
        let mut img = s.durable.clone();
        for p in &s.pending {
            if !keep() {
                continue;
            }
            match p {
                Pending::SetLen(n) => img.resize(*n as usize, 0),
                Pending::Write(off, data) => {
                    let end = *off as usize + data.len();
                    if img.len() < end {
                        img.resize(end, 0);
                    }
                    img[*off as usize..end].copy_from_slice(data);
                }
            }
        }
        img
    }
}

impl StorageBackend for CrashDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.lock().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.0.lock();
        let end = offset as usize + out.len();
        if end > s.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        out.copy_from_slice(&s.current[offset as usize..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        s.current.resize(len as usize, 0);
        s.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        s.durable = s.current.clone();
        s.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        let end = offset as usize + data.len();
        if s.current.len() < end {
            s.current.resize(end, 0);
        }
        s.current[offset as usize..end].copy_from_slice(data);
        s.pending.push(Pending::Write(offset, data.to_vec()));
        Ok(())
    }
}

const C: u32 = 4096;

/// Small write-back buffer, so writers flush under memory pressure (non-durable commits of
/// file data that a later durable commit may or may not cover).
fn tuning() -> Tuning {
    Tuning {
        dirty_limit: 64 << 10,
        ..Tuning::default()
    }
}

fn open(disk: &CrashDisk, io: &Arc<MemPackIo>) -> Engine {
    let db = Database::builder()
        .create_with_backend(disk.clone())
        .expect("open the metadata after a crash");
    Engine::with_parts(db, io.clone(), tuning()).expect("engine opens after a crash")
}

fn new_engine() -> (Engine, CrashDisk, Arc<MemPackIo>) {
    let disk = CrashDisk::default();
    let io = Arc::new(MemPackIo::default());
    let db = Database::builder()
        .create_with_backend(disk.clone())
        .unwrap();
    Engine::init_db(
        &db,
        Format {
            chunk_size: C,
            zstd_level: 1,
        },
    )
    .unwrap();
    let e = Engine::with_parts(db, io.clone(), tuning()).unwrap();
    (e, disk, io)
}

/// A file `f` written with one seed's chunks and fsynced, then rewritten with the chunks of
/// each seed in `rewrites`, each rewrite flushed without a durable commit; the fsynced content.
fn fsynced_then_rewritten(e: &Engine, rewrites: std::ops::Range<u64>) -> Vec<u8> {
    let f = e
        .mknod(InodeId::ROOT, b"f", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let chunk = |seed| crate::fs::testutil::unique_data(seed, 16, C as usize);
    let durable = chunk(1);
    e.write(f, 0, &durable).unwrap();
    e.fsync(f).unwrap();
    for seed in rewrites {
        e.write(f, 0, &chunk(seed)).unwrap();
        e.flush_ino(f, false).unwrap();
    }
    durable
}

/// After the crash that left `img`: `f` reads `durable` and fsck finds nothing.
fn reads_back_after(img: Vec<u8>, io: &Arc<MemPackIo>, durable: &[u8]) {
    let disk = CrashDisk::from_image(img);
    let e = open(&disk, io);
    assert!(
        read_all(&e, "f") == durable,
        "fsynced data lost to a rewrite"
    );
    let r = e.fsck(&|_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
}

/// Protects fsynced data from `store::reuse`: the place of a record whose death is not
/// durable yet is never written over, so after a kill -9 (metadata back at the last durable
/// commit, packs keeping every write) each record that commit references reads intact.
#[test]
fn a_record_is_written_over_only_once_its_death_is_durable() {
    let (e, disk, io) = new_engine();
    // Rewrites committed, never durably: the first one's records die, the next ones would
    // take their places if deaths counted before they are durable.
    let durable = fsynced_then_rewritten(&e, 2..6);
    let img = disk.kill_image();
    drop(e);
    reads_back_after(img, &io, &durable);
}

/// Protects fsynced data from `store::reuse`'s young records: a record flushed after the
/// last durable commit and rewritten before the next is written over at once (no durable
/// commit ever referenced it), and after a kill -9 or a power loss that follows, the fsynced
/// version reads back intact.
#[test]
fn a_record_never_durable_is_written_over_at_once_and_fsynced_data_survives() {
    for power_loss in [false, true] {
        let (e, disk, io) = new_engine();
        let durable = fsynced_then_rewritten(&e, 2..8);
        // Seeds 2..4 appended; from seed 4 on each flush goes over a record of seed - 2 (its
        // death a flush ago, never durable). The fsynced records' deaths are not durable.
        let (reused, _, _) = e.store.reused();
        assert!(
            reused >= 3 * 16,
            "only {reused} records written over young ones"
        );
        let img = if power_loss {
            io.crash_torn(|n| n / 2);
            let mut k = false;
            disk.power_image(|| {
                k = !k;
                k
            })
        } else {
            disk.kill_image()
        };
        drop(e);
        reads_back_after(img, &io, &durable);
    }
}

/// A file in the model: what is durable, and what happened to it since.
#[derive(Clone, Debug, Default)]
struct MFile {
    /// Content that must survive any crash.
    durable: Vec<u8>,
    /// Content as the engine shows it now.
    cur: Vec<u8>,
    /// Writes (and punches, as zeros) since `durable`: after a crash each byte they cover
    /// may hold the durable value or the value of any of them.
    pending: Vec<(u64, Vec<u8>)>,
    mode: u16,
}

impl MFile {
    fn settle(&mut self) {
        self.durable = self.cur.clone();
        self.pending.clear();
    }

    fn change(&mut self, off: u64, data: Vec<u8>, extend: bool) {
        let end = off as usize + data.len();
        if extend && self.cur.len() < end {
            self.cur.resize(end, 0);
        }
        let stop = end.min(self.cur.len());
        if (off as usize) < stop {
            self.cur[off as usize..stop].copy_from_slice(&data[..stop - off as usize]);
        }
        self.pending.push((off, data));
    }

    /// Is `got` a state this file may be in after a crash?
    fn allows(&self, got: &[u8]) -> Result<(), String> {
        let max_end = self
            .pending
            .iter()
            .map(|(o, d)| *o as usize + d.len())
            .max()
            .unwrap_or(0)
            .max(self.durable.len());
        if got.len() < self.durable.len() || got.len() > max_end {
            return Err(format!(
                "size {} outside [{}, {max_end}]",
                got.len(),
                self.durable.len()
            ));
        }
        for (i, &b) in got.iter().enumerate() {
            let base = self.durable.get(i).copied().unwrap_or(0);
            if b == base {
                continue;
            }
            let from_pending = self.pending.iter().any(|(o, d)| {
                let o = *o as usize;
                i >= o && i < o + d.len() && d[i - o] == b
            });
            if !from_pending {
                return Err(format!(
                    "byte {i} is {b:#04x}: neither the durable {base:#04x} nor any later write"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        f: u8,
    },
    Write {
        f: u8,
        off: u32,
        len: u32,
        seed: u8,
    },
    Punch {
        f: u8,
        off: u32,
        len: u32,
    },
    Truncate {
        f: u8,
        size: u32,
    },
    Chmod {
        f: u8,
        mode: u16,
    },
    Copy {
        src: u8,
        dst: u8,
        off_in: u32,
        off_out: u32,
        len: u32,
    },
    Clone {
        src: u8,
        dst: u8,
    },
    Rename {
        src: u8,
        dst: u8,
    },
    Unlink {
        f: u8,
    },
    Fsync {
        f: u8,
    },
    SyncAll,
    Kill,
    PowerLoss {
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0u8..5;
    prop_oneof![
        3 => f.clone().prop_map(|f| Op::Create { f }),
        6 => (f.clone(), 0u32..120_000, 1u32..30_000, any::<u8>())
            .prop_map(|(f, off, len, seed)| Op::Write { f, off, len, seed }),
        1 => (f.clone(), 0u32..120_000, 1u32..50_000).prop_map(|(f, off, len)| Op::Punch { f, off, len }),
        2 => (f.clone(), 0u32..130_000).prop_map(|(f, size)| Op::Truncate { f, size }),
        2 => (f.clone(), 0u16..0o777).prop_map(|(f, mode)| Op::Chmod { f, mode }),
        1 => (f.clone(), f.clone(), 0u32..60_000, 0u32..60_000, 1u32..100_000)
            .prop_map(|(src, dst, off_in, off_out, len)| Op::Copy { src, dst, off_in, off_out, len }),
        2 => (f.clone(), f.clone()).prop_map(|(src, dst)| Op::Clone { src, dst }),
        2 => (f.clone(), f.clone()).prop_map(|(src, dst)| Op::Rename { src, dst }),
        2 => f.clone().prop_map(|f| Op::Unlink { f }),
        2 => f.clone().prop_map(|f| Op::Fsync { f }),
        1 => Just(Op::SyncAll),
        2 => Just(Op::Kill),
        2 => any::<u64>().prop_map(|seed| Op::PowerLoss { seed }),
    ]
}

fn name(f: u8) -> String {
    format!("f{f}")
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    // Never all zeros, so a write is told apart from a hole; partly compressible.
    (0..len)
        .map(|i| seed.wrapping_add((i / 300) as u8) | 1)
        .collect()
}

/// A small deterministic generator for the power-loss choices.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Check the engine, just reopened after a crash, against the model; the observed state is
/// the durable state from then on.
fn check_after_crash(e: &Engine, m: &mut BTreeMap<String, MFile>, what: &str) {
    let names: Vec<String> = e
        .readdir(InodeId::ROOT, 0, 1000)
        .unwrap()
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let want: Vec<String> = m.keys().cloned().collect();
    assert_eq!(
        names, want,
        "after a {what}: the namespace lost acknowledged creates, renames or unlinks"
    );
    for (n, f) in m.iter_mut() {
        let a = e.getattr(ino(e, n)).unwrap();
        assert_eq!(
            a.inode.perm & 0o7777,
            f.mode,
            "after a {what}: chmod of {n} lost"
        );
        let got = read_all(e, n);
        if let Err(why) = f.allows(&got) {
            panic!("after a {what}: {n}: {why}");
        }
        f.cur = got;
        f.settle();
    }
    let r = e.fsck(&|_, _| {}).unwrap();
    assert!(
        r.problems.is_empty(),
        "fsck after a {what}: {:#?}",
        r.problems
    );
}

fn apply(
    e: Engine,
    disk: &mut CrashDisk,
    io: &Arc<MemPackIo>,
    m: &mut BTreeMap<String, MFile>,
    op: &Op,
) -> Engine {
    let r = InodeId::ROOT;
    match op.clone() {
        Op::Create { f } => {
            let n = name(f);
            if let std::collections::btree_map::Entry::Vacant(v) = m.entry(n) {
                e.mknod(r, v.key().as_bytes(), Kind::File, 0o644, 0, Ctx::ROOT)
                    .unwrap();
                v.insert(MFile {
                    mode: 0o644,
                    ..MFile::default()
                });
            }
        }
        Op::Write { f, off, len, seed } => {
            if let Some(mf) = m.get_mut(&name(f)) {
                let d = data(seed, len as usize);
                e.write(ino(&e, &name(f)), off.into(), &d).unwrap();
                mf.change(off.into(), d, true);
            }
        }
        Op::Punch { f, off, len } => {
            if let Some(mf) = m.get_mut(&name(f)) {
                e.fallocate(ino(&e, &name(f)), off.into(), len.into(), Falloc::PunchHole)
                    .unwrap();
                mf.change(off.into(), vec![0; len as usize], false);
            }
        }
        Op::Truncate { f, size } => {
            if let Some(mf) = m.get_mut(&name(f)) {
                let s = SetAttr {
                    size: Some(size.into()),
                    ..Default::default()
                };
                e.setattr(ino(&e, &name(f)), &s).unwrap();
                mf.cur.resize(size as usize, 0);
                mf.settle();
            }
        }
        Op::Chmod { f, mode } => {
            if let Some(mf) = m.get_mut(&name(f)) {
                let s = SetAttr {
                    mode: Some(mode.into()),
                    ..Default::default()
                };
                e.setattr(ino(&e, &name(f)), &s).unwrap();
                mf.mode = mode;
                // setattr flushes the file before its durable commit.
                mf.settle();
            }
        }
        Op::Copy {
            src,
            dst,
            off_in,
            off_out,
            len,
        } => {
            let (s, d) = (name(src), name(dst));
            if m.contains_key(&s) && m.contains_key(&d) && s != d {
                let n = e
                    .copy_range(
                        ino(&e, &s),
                        off_in.into(),
                        ino(&e, &d),
                        off_out.into(),
                        len.into(),
                    )
                    .unwrap();
                if n > 0 {
                    let bytes = m[&s].cur[off_in as usize..(off_in as usize + n as usize)].to_vec();
                    m.get_mut(&d).unwrap().change(off_out.into(), bytes, true);
                }
            }
        }
        Op::Clone { src, dst } => {
            let (s, d) = (name(src), name(dst));
            if m.contains_key(&s) && !m.contains_key(&d) {
                e.clone_paths(s.as_bytes(), &[d.clone().into_bytes()])
                    .unwrap();
                let sf = m.get_mut(&s).unwrap();
                sf.settle();
                let mut df = sf.clone();
                df.settle();
                m.insert(d, df);
            }
        }
        Op::Rename { src, dst } => {
            let (s, d) = (name(src), name(dst));
            if m.contains_key(&s) {
                e.rename(r, s.as_bytes(), r, d.as_bytes(), RenameFlags::default())
                    .unwrap();
                let f = m.remove(&s).unwrap();
                m.insert(d, f);
            }
        }
        Op::Unlink { f } => {
            if m.remove(&name(f)).is_some() {
                e.unlink(r, name(f).as_bytes()).unwrap();
            }
        }
        Op::Fsync { f } => {
            if let Some(mf) = m.get_mut(&name(f)) {
                e.fsync(ino(&e, &name(f))).unwrap();
                mf.settle();
            }
        }
        Op::SyncAll => {
            e.sync_all().unwrap();
            m.values_mut().for_each(MFile::settle);
        }
        Op::Kill => {
            let img = disk.kill_image();
            drop(e);
            *disk = CrashDisk::from_image(img);
            let e = open(disk, io);
            check_after_crash(&e, m, "kill -9");
            return e;
        }
        Op::PowerLoss { seed } => {
            let mut rng = XorShift(seed | 1);
            let img = disk.power_image(|| rng.next().is_multiple_of(2));
            io.crash_torn(|n| {
                if n == 0 {
                    0
                } else {
                    (rng.next() % (n as u64 + 1)) as usize
                }
            });
            drop(e);
            *disk = CrashDisk::from_image(img);
            let e = open(disk, io);
            check_after_crash(&e, m, "power loss");
            return e;
        }
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Protects the durability promises, metadata included: after a kill -9 or a power loss
    /// at any point between operations, every create, rename, unlink, chmod and truncate that
    /// returned is there, every byte an fsync (or a clone, truncate or sync) covered is
    /// there, every other byte is either its durable value or one a later write put there
    /// (never garbage), and fsck is clean.
    #[test]
    fn acknowledged_operations_survive_crashes(ops in proptest::collection::vec(op(), 1..40)) {
        crate::deadlock::watchdog();
        let (mut e, mut disk, io) = new_engine();
        let mut m = BTreeMap::new();
        for op in &ops {
            e = apply(e, &mut disk, &io, &mut m, op);
        }
        // A last power loss after everything.
        apply(e, &mut disk, &io, &mut m, &Op::PowerLoss { seed: 7 });
    }
}

/// Protects: a metadata operation is durable when it returns, alone (no later fsync): a
/// power loss that keeps none of the unsynced writes still has it.
#[test]
fn metadata_operations_are_durable_on_return() {
    let (e, mut disk, io) = new_engine();
    let r = InodeId::ROOT;
    let d = e.mkdir(r, b"vms", 0o755, Ctx::ROOT).unwrap().ino;
    e.mknod(d, b"a.raw", Kind::File, 0o600, 0, Ctx::ROOT)
        .unwrap();
    e.symlink(d, b"link", b"a.raw", Ctx::ROOT).unwrap();
    e.rename(d, b"a.raw", r, b"b.raw", RenameFlags::default())
        .unwrap();
    e.mknod(r, b"gone", Kind::File, 0o600, 0, Ctx::ROOT)
        .unwrap();
    e.unlink(r, b"gone").unwrap();
    let img = disk.power_image(|| false);
    io.crash();
    drop(e);
    disk = CrashDisk::from_image(img);
    let e = open(&disk, &io);
    let d = e.lookup(r, b"vms").expect("mkdir survives").ino;
    assert!(e.lookup(r, b"b.raw").is_ok(), "rename survives");
    assert!(e.lookup(d, b"a.raw").is_err(), "rename's source is gone");
    assert_eq!(
        e.readlink(e.lookup(d, b"link").unwrap().ino).unwrap(),
        b"a.raw"
    );
    assert!(e.lookup(r, b"gone").is_err(), "unlink survives");
}

/// Protects: snapshot create, rollback, restore and delete are durable when they return: after
/// a power loss right after them (nothing synced since), the snapshot holds the data written
/// before it was taken, the rollback and the restored copy stand, the deleted one is gone, and
/// fsck is clean.
#[test]
fn snapshot_operations_are_durable_on_return() {
    let (e, mut disk, io) = new_engine();
    let r = InodeId::ROOT;
    let d = e.mkdir(r, b"vm", 0o755, Ctx::ROOT).unwrap().ino;
    let f = e
        .mknod(d, b"disk", Kind::File, 0o600, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let v1 = data(1, 3 * C as usize);
    e.write(f, 0, &v1).unwrap(); // not fsynced: the snapshot must flush it
    e.snapshot_create("vm", Some("a")).unwrap();
    e.snapshot_create("vm", Some("b")).unwrap();
    e.write(f, 0, &data(2, C as usize)).unwrap();
    e.snapshot_rollback("vm", "a").unwrap();
    e.snapshot_restore("vm", "a", "copy").unwrap();
    e.snapshot_delete("vm", "b").unwrap();
    let img = disk.power_image(|| false);
    io.crash();
    drop(e);
    disk = CrashDisk::from_image(img);
    let e = open(&disk, &io);
    let read = |p: &str| {
        let i = e.resolve(p.as_bytes()).expect(p);
        e.read(i, 0, 1 << 20).unwrap()
    };
    assert_eq!(
        read(".snapshots/vm@a/disk"),
        v1,
        "snapshot a survives whole"
    );
    assert_eq!(read("vm/disk"), v1, "rollback survives");
    assert_eq!(read("copy/disk"), v1, "restore survives");
    assert!(e.resolve(b".snapshots/vm@b").is_err(), "delete survives");
    let names: Vec<String> = e
        .snapshot_list(None)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["a"]);
    let rep = e.fsck(&|_, _| {}).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// Protects: an unaligned `copy_file_range` larger than the write-back buffer completes
/// (it used to hold both files' flush locks while writing, and the writes flushed the same
/// files under memory pressure: a self-deadlock that hung the whole datastore).
#[test]
fn copy_range_unaligned_larger_than_the_dirty_limit() {
    crate::deadlock::watchdog();
    let (e, _, _) = new_engine();
    let e = Arc::new(e);
    let r = InodeId::ROOT;
    let s = e
        .mknod(r, b"src", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let d = e
        .mknod(r, b"dst", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let body = data(9, 4 << 20); // 64x the dirty limit, copied 1 MiB at a time
    e.write(s, 0, &body).unwrap();
    e.fsync(s).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let e2 = e.clone();
    std::thread::spawn(move || {
        let n = e2.copy_range(s, 1, d, 0, 4 << 20).unwrap();
        let m = e2.copy_range(d, 0, d, 3, 4096).unwrap();
        tx.send((n, m)).unwrap();
    });
    let (n, m) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("copy_range hung (deadlock)");
    assert_eq!((n, m), ((4 << 20) - 1, 4096));
    let got = e.read(d, 3, 100).unwrap();
    assert_eq!(got, body[1..101].to_vec());
}

/// Protects: punching or zeroing any range, up to the largest file size, takes memory and
/// time independent of the range's length (a 1 TiB punch used to allocate an entry per
/// chunk: GiBs), and keeps the data around it.
#[test]
fn punch_of_the_largest_range_is_cheap() {
    let (e, _, _) = new_engine();
    let r = InodeId::ROOT;
    let f = e
        .mknod(r, b"big", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let size = MAX_FILE_SIZE;
    let s = SetAttr {
        size: Some(size),
        ..Default::default()
    };
    e.setattr(f, &s).unwrap();
    let mid = size / 2 + 123;
    e.write(f, 100, &data(1, 10_000)).unwrap();
    e.write(f, mid, &data(2, 10_000)).unwrap();
    e.write(f, size - 5000, &data(3, 5000)).unwrap();
    e.fsync(f).unwrap();
    let t = std::time::Instant::now();
    // Keep the first 150 bytes and the last 10 of the file; zero everything between.
    e.fallocate(f, 150, size - 160, Falloc::PunchHole).unwrap();
    e.fallocate(f, 0, size, Falloc::ZeroRange { keep_size: true })
        .unwrap();
    e.write(f, 100, &data(1, 50)).unwrap();
    e.fallocate(f, 120, size - 130, Falloc::PunchHole).unwrap();
    e.fsync(f).unwrap();
    // No timing assertion: a punch walking every chunk would not finish at all.
    let _ = t.elapsed();
    assert_eq!(e.read(f, 100, 20).unwrap(), data(1, 20));
    assert_eq!(e.read(f, 120, 100).unwrap(), vec![0; 100]);
    assert_eq!(e.read(f, mid, 100).unwrap(), vec![0; 100]);
    assert_eq!(e.getattr(f).unwrap().inode.size, size);
    assert_eq!(e.seek(f, 0, true).unwrap(), Some(0));
    assert_eq!(e.seek(f, 4096, true).unwrap(), None, "one chunk left");
    let r = e.fsck(&|_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
}

/// Protects: the metadata changes of a request (an NFS call: a create and a setattr) are
/// durable when the request ends, with one durable commit for the request.
#[test]
fn a_request_is_durable_when_it_ends() {
    let (e, disk, io) = new_engine();
    let r = InodeId::ROOT;
    e.request(|| -> FsResult<()> {
        let a = e.mknod(r, b"vm.raw", Kind::File, 0o644, 0, Ctx::ROOT)?;
        let s = SetAttr {
            mode: Some(0o600),
            ..Default::default()
        };
        e.setattr(a.ino, &s)?;
        Ok(())
    })
    .unwrap();
    let img = disk.power_image(|| false);
    io.crash();
    drop(e);
    let e = open(&CrashDisk::from_image(img), &io);
    let a = e.lookup(r, b"vm.raw").expect("the create survives");
    assert_eq!(a.inode.perm & 0o7777, 0o600, "the setattr survives");
}

/// Protects resumable replication across a kill -9 of the receiving side: the chunks a receive
/// had appended to its packs, but not yet made durable in the index, are found in the packs
/// when the stream is sent again, so none crosses twice beyond the record in flight.
#[test]
fn a_receive_killed_between_durable_points_keeps_its_chunks() {
    use crate::fs::stream::{Frame, Reader};
    let (a, _, _) = new_engine();
    let d = a.mkdir(InodeId::ROOT, b"vm", 0o755, Ctx::ROOT).unwrap().ino;
    let f = a
        .mknod(d, b"disk", Kind::File, 0o600, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let v = crate::fs::testutil::unique_data(11, 5000, C as usize);
    a.write(f, 0, &v).unwrap();
    a.snapshot_create("vm", Some("s")).unwrap();
    let mut stream = Vec::new();
    a.send("vm", "s", None, &mut stream, None, &|_, _| {})
        .unwrap();

    // The receiver gets 60 % of the stream (a cut), then is killed before a durable point.
    let (b, disk, io) = new_engine();
    let cut = stream.len() * 6 / 10;
    let err = b
        .receive(
            Box::new(std::io::Cursor::new(stream[..cut].to_vec())),
            None,
            false,
            &|_, _| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("cut"), "{err}");
    // Chunks wholly in the part that arrived.
    let mut r = Reader::new(&stream[..cut]).unwrap();
    let mut arrived = 0u64;
    let mut largest = 0u64;
    while let Ok(fr) = r.next_frame() {
        if let Frame::Chunks(cs) = fr {
            arrived += cs.len() as u64;
            largest = largest.max(cs.len() as u64);
        }
    }
    assert!(
        arrived >= 2 * largest,
        "the cut comes after several records"
    );
    let img = disk.kill_image();
    drop(b);
    let b = open(&CrashDisk::from_image(img), &io);

    let rep = b
        .receive(
            Box::new(std::io::Cursor::new(stream)),
            None,
            false,
            &|_, _| {},
        )
        .unwrap();
    assert!(
        rep.chunks_already_held + largest >= arrived,
        "{} of the {arrived} chunks that arrived before the kill were kept (a record is {largest})",
        rep.chunks_already_held
    );
    let got = b.resolve(b"vm/disk").unwrap();
    let mut back = Vec::new();
    while back.len() < v.len() {
        back.extend(b.read(got, back.len() as u64, 1 << 20).unwrap());
    }
    assert!(back == v, "the received file differs");
    let rep = b.fsck(&|_, _| {}).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}
