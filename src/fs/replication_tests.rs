//! Replication tests: `send` | `receive` between two datastores (full, incremental, into a
//! datastore that already holds the data), damaged and cut streams, promote and failback.

use std::sync::Arc;

use super::data::SetAttr;
use super::dir::Ctx;
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

fn assert_clean(e: &Engine) {
    let r = e.fsck(&|_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "fsck: {:#?}", r.problems);
}

/// Half-compressible, distinct per seed and chunk.
fn data(seed: u64, chunks: usize) -> Vec<u8> {
    let mut v = crate::fs::testutil::unique_data(seed, chunks, C);
    for (i, b) in v.iter_mut().enumerate() {
        if i % 2 == 0 {
            *b = 0;
        }
    }
    v
}

fn send(e: &Engine, path: &str, snap: &str, from: Option<&str>) -> (Vec<u8>, send::SendReport) {
    let mut out = Vec::new();
    let r = e
        .send(path, snap, from, &mut out, None, &|_, _| {})
        .unwrap();
    (out, r)
}

fn receive(e: &Engine, s: &[u8], target: Option<&str>) -> FsResult<receive::ReceiveReport> {
    e.receive(
        Box::new(std::io::Cursor::new(s.to_vec())),
        target,
        false,
        &|_, _| {},
    )
}

/// A VM folder: a 256-chunk disk, a config with an xattr, a symlink, a subfolder.
fn vm(e: &Engine) {
    e.mkdir(InodeId::ROOT, b"vms", 0o755, Ctx::ROOT).unwrap();
    let v = e.resolve(b"vms").unwrap();
    let d = e.mkdir(v, b"desk01", 0o750, Ctx::ROOT).unwrap().ino;
    put(e, "vms/desk01/disk.raw", &data(1, 256));
    let cfg = put(e, "vms/desk01/desk01.vmx", b"memsize = 4096\n");
    e.setxattr(cfg, b"user.owner", b"pool-a", xattr::XattrMode::Any)
        .unwrap();
    e.symlink(d, b"current", b"disk.raw", Ctx::ROOT).unwrap();
    let logs = e.mkdir(d, b"logs", 0o755, Ctx::ROOT).unwrap().ino;
    let _ = logs;
    put(e, "vms/desk01/logs/boot.log", b"booted\n");
}

fn same_tree(a: &Engine, pa: &str, b: &Engine, pb: &str) {
    for f in ["disk.raw", "desk01.vmx", "logs/boot.log"] {
        assert_eq!(
            read(a, &format!("{pa}/{f}")),
            read(b, &format!("{pb}/{f}")),
            "{f} differs"
        );
    }
    let l = b.resolve(format!("{pb}/current").as_bytes()).unwrap();
    assert_eq!(b.readlink(l).unwrap(), b"disk.raw");
    let cfg = b.resolve(format!("{pb}/desk01.vmx").as_bytes()).unwrap();
    assert_eq!(b.getxattr(cfg, b"user.owner").unwrap(), b"pool-a");
    let d = b.getattr(b.resolve(pb.as_bytes()).unwrap()).unwrap().inode;
    assert_eq!(d.perm, 0o750);
}

/// Protects: a full stream rebuilds the VM folder byte for byte on another datastore (data,
/// symlinks, xattrs, modes) as a read-only replica with a snapshot of the same name and time;
/// chunks travel as stored (the stream is about the compressed size); an incremental stream
/// after 1 % of the disk changed carries only those chunks, and applies in place (inode numbers
/// kept); both datastores pass fsck.
#[test]
fn full_then_incremental() {
    let (a, b) = (engine(), engine());
    vm(&a);
    let s1 = a.snapshot_create("/vms/desk01", Some("s1")).unwrap();
    let (stream, sr) = send(&a, "/vms/desk01", "s1", None);
    assert_eq!(sr.entries, 6);
    assert!(sr.chunks >= 256, "{sr:?}");
    let stored = a.stats().unwrap().stored_bytes;
    assert!(
        (stream.len() as u64) < stored * 11 / 10 + 64 * 1024,
        "the stream ({} B) is about the stored size ({stored} B)",
        stream.len()
    );
    let r = receive(&b, &stream, None).unwrap();
    assert_eq!(r.path, "/vms/desk01");
    let snap = r.snapshot.unwrap();
    assert_eq!((snap.name.as_str(), snap.created), ("s1", s1.created));
    same_tree(&a, "vms/desk01", &b, "vms/desk01");
    same_tree(&a, "vms/desk01", &b, ".snapshots/vms/desk01@s1");
    // Read-only until promoted.
    let disk = b.resolve(b"vms/desk01/disk.raw").unwrap();
    assert!(matches!(b.write(disk, 0, b"x"), Err(FsError::ReadOnly)));
    assert!(matches!(
        b.unlink(b.resolve(b"vms/desk01").unwrap(), b"disk.raw"),
        Err(FsError::ReadOnly)
    ));
    assert_clean(&b);

    // 1 % of the disk changes (3 chunks), a file is added, one deleted, one truncated.
    let ad = a.resolve(b"vms/desk01/disk.raw").unwrap();
    for k in [10u64, 100, 200] {
        a.write(ad, k * C as u64, &data(50 + k, 1)).unwrap();
    }
    put(&a, "vms/desk01/logs/new.log", b"new\n");
    let ld = a.resolve(b"vms/desk01/logs").unwrap();
    a.unlink(ld, b"boot.log").unwrap();
    put(&a, "vms/desk01/logs/boot.log", b"rebooted\n");
    let cfg = a.resolve(b"vms/desk01/desk01.vmx").unwrap();
    a.setattr(
        cfg,
        &SetAttr {
            size: Some(6),
            ..Default::default()
        },
    )
    .unwrap();
    a.snapshot_create("/vms/desk01", Some("s2")).unwrap();
    let (inc, ir) = send(&a, "/vms/desk01", "s2", Some("s1"));
    assert!(ir.chunks <= 6, "incremental sends only new chunks: {ir:?}");
    assert!(
        inc.len() < 64 * 1024,
        "incremental stream is {} B",
        inc.len()
    );
    let r = receive(&b, &inc, None).unwrap();
    assert!(r.incremental);
    assert_eq!(
        b.resolve(b"vms/desk01/disk.raw").unwrap(),
        disk,
        "inode kept"
    );
    same_tree(&a, "vms/desk01", &b, "vms/desk01");
    assert_eq!(read(&b, "vms/desk01/logs/new.log"), b"new\n");
    assert_eq!(read(&b, "vms/desk01/desk01.vmx"), b"memsiz");
    // The old snapshot is still whole.
    assert_eq!(
        read(&b, ".snapshots/vms/desk01@s1/logs/boot.log"),
        b"booted\n"
    );
    // Receiving the same stream twice is refused.
    assert!(receive(&b, &inc, None).is_err());
    assert_clean(&a);
    assert_clean(&b);
}

/// Protects: a datastore that already holds the golden image receives a VM made from it with
/// almost nothing new: the receiver counts every chunk as already held, stores nothing new.
#[test]
fn receiver_that_holds_the_data_stores_nothing_new() {
    let (a, b) = (engine(), engine());
    vm(&a);
    a.snapshot_create("/vms/desk01", Some("gold")).unwrap();
    let (s, _) = send(&a, "/vms/desk01", "gold", None);
    receive(&b, &s, Some("/templates/gold")).unwrap();
    let before = b.stats().unwrap().stored_bytes;
    a.clone_paths(b"/vms/desk01", &[b"/vms/desk02".to_vec()])
        .unwrap();
    a.snapshot_create("/vms/desk02", Some("s1")).unwrap();
    let (s2, _) = send(&a, "/vms/desk02", "s1", None);
    let r = receive(&b, &s2, None).unwrap();
    assert_eq!(r.chunks_already_held, r.chunks, "{r:?}");
    assert_eq!(b.stats().unwrap().stored_bytes, before);
    same_tree(&a, "vms/desk02", &b, "vms/desk02");
    assert_clean(&b);
}

/// Protects: a damaged or cut stream is refused with a clear error and leaves no replica and no
/// snapshot, fsck clean; a damaged one leaves no chunk either, a cut one keeps what arrived for
/// the same stream sent again (which then stores none of it twice), and a forged chunk is
/// refused.
#[test]
fn damaged_and_cut_streams_leave_nothing() {
    let a = engine();
    vm(&a);
    a.snapshot_create("/vms/desk01", Some("s1")).unwrap();
    let (s, _) = send(&a, "/vms/desk01", "s1", None);
    let b = engine();
    for (what, bad) in [
        ("cut", s[..s.len() / 2].to_vec()),
        ("flipped", {
            let mut x = s.clone();
            let i = x.len() / 3;
            x[i] ^= 1;
            x
        }),
        ("no end", s[..s.len() - 20].to_vec()),
        ("not a stream", b"hello".to_vec()),
    ] {
        let e = receive(&b, &bad, None).unwrap_err();
        if what == "cut" || what == "no end" {
            assert!(matches!(e, FsError::StreamCut(_)), "{what}: {e:?}");
        } else {
            assert!(matches!(e, FsError::Stream(_)), "{what}: {e:?}");
        }
        assert!(
            b.resolve(b"vms/desk01").is_err(),
            "{what}: a replica was left"
        );
        assert!(b.snapshot_list(None).unwrap().is_empty());
        if what == "flipped" {
            assert_eq!(b.stats().unwrap().chunk_count, 0, "{what}: chunks held");
        }
        assert_clean(&b);
    }
    // A well-framed stream whose chunk does not match its id (a buggy or hostile sender).
    let mut forged = Vec::new();
    {
        let mut w = stream::Writer::new(&mut forged).unwrap();
        w.json(
            stream::Kind::Header,
            &stream::Header {
                source: 1,
                chunk_size: C as u64,
                path: "/vms/forged".into(),
                snap: "s1".into(),
                created: 1,
                from: None,
            },
        )
        .unwrap();
        let good = data(5, 1);
        let id = crate::store::chunk::ChunkId::of(&data(6, 1));
        w.chunks(&[crate::store::Encoded::uncompressed(id, &good)])
            .unwrap();
    }
    let held = b.stats().unwrap().chunk_count;
    let e = receive(&b, &forged, None).unwrap_err();
    assert!(e.to_string().contains("does not match its id"), "{e}");
    assert_eq!(
        b.stats().unwrap().chunk_count,
        held,
        "a forged chunk was stored"
    );
    // The real stream still goes in afterwards, finding what the cut ones left.
    let r = receive(&b, &s, None).unwrap();
    assert!(r.chunks_already_held > 0, "{r:?}");
    same_tree(&a, "vms/desk01", &b, "vms/desk01");
    assert_eq!(
        b.stats().unwrap().chunk_count,
        a.stats().unwrap().chunk_count,
        "the staging's hold is gone"
    );
    assert!(b.resolve(b".snapshots/.receiving").map_or(true, |d| b
        .readdir(d, 0, 10)
        .unwrap()
        .len()
        == 2));
    assert_clean(&b);
}

/// Protects: failover and failback: promote makes the replica writable; an incremental
/// stream into a promoted (writable) path needs --force and then replaces what changed there;
/// wrong bases are refused.
#[test]
fn promote_and_failback() {
    let (a, b) = (engine(), engine());
    vm(&a);
    a.snapshot_create("/vms/desk01", Some("s1")).unwrap();
    let (s1, _) = send(&a, "/vms/desk01", "s1", None);
    receive(&b, &s1, None).unwrap();
    // Site A is lost: B takes over.
    assert!(b.promote("/vms/desk01").unwrap() >= 6);
    assert!(b.promote("/vms/desk01").is_err(), "already promoted");
    let bd = b.resolve(b"vms/desk01/disk.raw").unwrap();
    b.write(bd, 0, &data(77, 2)).unwrap();
    b.snapshot_create("/vms/desk01", Some("s2")).unwrap();
    // Failback: B's changes since s1 go back to A, which still has s1.
    let (back, r) = send(&b, "/vms/desk01", "s2", Some("s1"));
    assert!(r.chunks <= 2, "{r:?}");
    // A's copy is writable: refused without --force.
    assert!(matches!(
        a.receive(
            Box::new(std::io::Cursor::new(back.clone())),
            None,
            false,
            &|_, _| {}
        ),
        Err(FsError::Stream(_))
    ));
    a.receive(
        Box::new(std::io::Cursor::new(back.clone())),
        None,
        true,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(
        read(&a, "vms/desk01/disk.raw"),
        read(&b, "vms/desk01/disk.raw")
    );
    a.promote("/vms/desk01").unwrap();
    // An incremental against a snapshot the target does not have is refused.
    let c = engine();
    assert!(matches!(receive(&c, &back, None), Err(FsError::Stream(_))));
    assert_clean(&a);
    assert_clean(&b);
    assert_clean(&c);
}
