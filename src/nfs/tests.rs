//! Tests of the NFS adapter over an in-memory engine: handle validity, write stability,
//! exclusive create, READDIRPLUS paging and the errors clients see. fs-tests/nfs.sh drives
//! the same paths through real clients and the RPC layer.

use std::sync::Arc;

use nfs3_server::nfs3_types::nfs3::{
    createverf3, filename3, nfspath3, nfsstat3, sattr3, set_size3, stable_how,
};
use nfs3_server::vfs::{NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator};

use super::*;
use crate::fs::{Format, Tuning};
use crate::store::pack::MemPackIo;

fn nfs() -> (TesseraNfs, Arc<MemPackIo>) {
    let io = Arc::new(MemPackIo::default());
    let e = Engine::in_memory(
        Format {
            chunk_size: 4096,
            zstd_level: 1,
        },
        io.clone(),
    )
    .unwrap();
    (TesseraNfs::new(Arc::new(e), false), io)
}

fn n(s: &str) -> filename3<'static> {
    filename3::from(s.as_bytes().to_vec())
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

async fn read_all(fs: &TesseraNfs, h: &NfsHandle) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let (d, eof) = fs.read(h, out.len() as u64, IO_MAX).await.unwrap();
        out.extend_from_slice(&d);
        if eof {
            return out;
        }
    }
}

/// Protects: a handle of a deleted file answers STALE, also when the inode number comes back
/// with another generation; live handles keep working.
#[tokio::test(flavor = "multi_thread")]
async fn deleted_or_reused_inodes_are_stale() {
    let (fs, _) = nfs();
    let root = fs.root_dir();
    let (h, _) = fs.create(&root, &n("a"), sattr3::default()).await.unwrap();
    assert!(fs.getattr(&h).await.is_ok());
    fs.remove(&root, &n("a")).await.unwrap();
    assert_eq!(fs.getattr(&h).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
    assert_eq!(
        fs.read(&h, 0, 10).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );
    let (h2, _) = fs.create(&root, &n("b"), sattr3::default()).await.unwrap();
    // the same inode number with an older generation, as after reuse
    let old = NfsHandle::new(h2.ino(), Generation(h2.generation().0.wrapping_sub(1)));
    assert_eq!(fs.getattr(&old).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
    assert_eq!(
        fs.write(&old, 0, b"x", stable_how::FILE_SYNC)
            .await
            .unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );
    assert!(fs.getattr(&h2).await.is_ok());
    assert!(
        NfsHandle::from_bytes(&[0u8; 16]).is_none(),
        "inode 0 is no handle"
    );
    assert!(NfsHandle::from_bytes(&[1u8; 3]).is_none());
}

/// Protects: FILE_SYNC is answered only for durable data (it survives losing every unsynced
/// pack byte), UNSTABLE is answered as UNSTABLE, and COMMIT makes UNSTABLE data durable.
#[tokio::test(flavor = "multi_thread")]
async fn write_stability_is_honest() {
    let (fs, io) = nfs();
    let root = fs.root_dir();
    let (h, _) = fs
        .create(&root, &n("vm.raw"), sattr3::default())
        .await
        .unwrap();
    let a = data(1, 3 * 4096 + 17);
    let (_, how) = fs.write(&h, 0, &a, stable_how::FILE_SYNC).await.unwrap();
    assert_eq!(how, stable_how::FILE_SYNC);
    let (_, how) = fs.write(&h, 0, &a, stable_how::DATA_SYNC).await.unwrap();
    assert_eq!(how, stable_how::FILE_SYNC);
    let b = data(2, 2 * 4096);
    let (_, how) = fs.write(&h, 65536, &b, stable_how::UNSTABLE).await.unwrap();
    assert_eq!(how, stable_how::UNSTABLE);
    fs.commit(&h, 0, 0).await.unwrap();
    let c = data(3, 4096);
    fs.write(&h, 131072, &c, stable_how::UNSTABLE)
        .await
        .unwrap(); // never committed

    let engine = Arc::try_unwrap(fs.engine).ok().expect("sole owner");
    let (db, _) = engine.into_parts();
    io.crash();
    let e = Engine::with_parts(db, io.clone(), Tuning::default()).unwrap();
    let fs = TesseraNfs::new(Arc::new(e), false);
    let got = read_all(&fs, &h).await;
    assert_eq!(&got[..a.len()], &a[..], "FILE_SYNC data lost");
    assert_eq!(&got[65536..65536 + b.len()], &b[..], "committed data lost");
}

/// Protects: a retransmitted CREATE EXCLUSIVE finds its own file; another verifier gets EXIST;
/// UNCHECKED create of an existing file opens it (and applies a size).
#[tokio::test(flavor = "multi_thread")]
async fn create_modes() {
    let (fs, _) = nfs();
    let root = fs.root_dir();
    let v = createverf3([1, 2, 3, 4, 5, 6, 7, 8]);
    let h1 = fs.create_exclusive(&root, &n("x"), v).await.unwrap();
    let h2 = fs.create_exclusive(&root, &n("x"), v).await.unwrap();
    assert_eq!(h1, h2);
    let other = createverf3([8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(
        fs.create_exclusive(&root, &n("x"), other)
            .await
            .unwrap_err(),
        nfsstat3::NFS3ERR_EXIST
    );
    fs.write(&h1, 0, b"hello", stable_how::UNSTABLE)
        .await
        .unwrap();
    let truncate = sattr3 {
        size: set_size3::Some(2),
        ..sattr3::default()
    };
    let (h3, attr) = fs.create(&root, &n("x"), truncate).await.unwrap();
    assert_eq!(h3, h1);
    assert_eq!(attr.size, 2);
    let (dh, _) = fs.mkdir(&root, &n("d")).await.unwrap();
    assert_eq!(
        fs.create(&root, &n("d"), sattr3::default())
            .await
            .unwrap_err(),
        nfsstat3::NFS3ERR_EXIST
    );
    // GUARDED create of an existing name is EXIST, decided when creating
    assert_eq!(
        fs.create_guarded(&root, &n("x"), sattr3::default())
            .await
            .unwrap_err(),
        nfsstat3::NFS3ERR_EXIST
    );
    assert_eq!(
        read_all(&fs, &h1).await,
        b"he",
        "a failed GUARDED create truncated nothing"
    );
    // REMOVE takes files only, RMDIR directories only
    fs.create(&dh, &n("f"), sattr3::default()).await.unwrap();
    assert_eq!(
        fs.remove(&root, &n("d")).await.unwrap_err(),
        nfsstat3::NFS3ERR_ISDIR
    );
    assert_eq!(
        fs.rmdir(&root, &n("d")).await.unwrap_err(),
        nfsstat3::NFS3ERR_NOTEMPTY
    );
    assert_eq!(
        fs.rmdir(&dh, &n("f")).await.unwrap_err(),
        nfsstat3::NFS3ERR_NOTDIR
    );
    fs.remove(&dh, &n("f")).await.unwrap();
    fs.rmdir(&root, &n("d")).await.unwrap();
    assert_eq!(
        fs.lookup(&root, &n("d")).await.unwrap_err(),
        nfsstat3::NFS3ERR_NOENT
    );
}

/// Protects: a READDIRPLUS listing resumed from a cookie after entries were created and
/// removed returns every entry that stayed exactly once, with handles and attributes.
#[tokio::test(flavor = "multi_thread")]
async fn readdir_cookies_survive_changes() {
    let (fs, _) = nfs();
    let root = fs.root_dir();
    let (d, _) = fs.mkdir(&root, &n("big")).await.unwrap();
    for i in 0..1000 {
        fs.create(&d, &n(&format!("e{i:04}")), sattr3::default())
            .await
            .unwrap();
    }
    let mut it = fs.readdirplus(&d, 0).await.unwrap();
    let mut seen = Vec::new();
    let mut cookie = 0;
    for _ in 0..300 {
        match it.next().await {
            NextResult::Ok(e) => {
                cookie = e.cookie;
                assert!(e.name_handle.is_some() && e.name_attributes.is_some());
                seen.push(String::from_utf8(e.name.0.to_vec()).unwrap());
            }
            _ => panic!("listing ended early"),
        }
    }
    for i in 0..200 {
        fs.create(&d, &n(&format!("new{i}")), sattr3::default())
            .await
            .unwrap();
    }
    fs.remove(&d, &n("e0999")).await.unwrap();
    let mut it = fs.readdirplus(&d, cookie).await.unwrap();
    loop {
        match it.next().await {
            NextResult::Ok(e) => seen.push(String::from_utf8(e.name.0.to_vec()).unwrap()),
            NextResult::Eof => break,
            NextResult::Err(e) => panic!("{e:?}"),
        }
    }
    let olds: Vec<&String> = seen.iter().filter(|s| s.starts_with('e')).collect();
    assert_eq!(olds.len(), 999, "every entry that stayed, once");
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "no entry twice");
    assert!(seen.iter().any(|s| s == ".") && seen.iter().any(|s| s == ".."));
}

/// Protects: rename, symlink/readlink, SETATTR size, and the read-only export's ROFS.
#[tokio::test(flavor = "multi_thread")]
async fn namespace_ops_and_read_only() {
    let (fs, _) = nfs();
    let root = fs.root_dir();
    let (h, _) = fs.create(&root, &n("a"), sattr3::default()).await.unwrap();
    fs.write(&h, 0, &data(4, 10000), stable_how::UNSTABLE)
        .await
        .unwrap();
    fs.rename(&root, &n("a"), &root, &n("b")).await.unwrap();
    assert_eq!(fs.lookup(&root, &n("b")).await.unwrap(), h);
    let target = nfspath3::from(b"b".to_vec());
    let (l, _) = fs
        .symlink(&root, &n("l"), &target, &sattr3::default())
        .await
        .unwrap();
    assert_eq!(&fs.readlink(&l).await.unwrap().0[..], b"b");
    let attr = fs
        .setattr(
            &h,
            sattr3 {
                size: set_size3::Some(100),
                ..sattr3::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(attr.size, 100);
    assert_eq!(read_all(&fs, &h).await, data(4, 100));
    assert!(
        fs.fsinfo(&root).await.unwrap().maxfilesize >= 16 << 40,
        "Linux clients cap files at maxfilesize"
    );

    let ro = TesseraNfs::new(fs.engine.clone(), true);
    assert_eq!(
        ro.write(&h, 0, b"x", stable_how::FILE_SYNC)
            .await
            .unwrap_err(),
        nfsstat3::NFS3ERR_ROFS
    );
    assert_eq!(
        ro.remove(&root, &n("b")).await.unwrap_err(),
        nfsstat3::NFS3ERR_ROFS
    );
    assert_eq!(read_all(&ro, &h).await, data(4, 100));
}

/// One ONC RPC call record (RFC 5531): AUTH_NONE credential and verifier, `args` packed.
fn rpc_call(xid: u32, procedure: u32, args: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for w in [xid, 0, 2, 100_003, 3, procedure, 0, 0, 0, 0] {
        body.extend_from_slice(&w.to_be_bytes());
    }
    body.extend_from_slice(args);
    let mut rec = (0x8000_0000u32 | body.len() as u32).to_be_bytes().to_vec();
    rec.extend_from_slice(&body);
    rec
}

/// Reads one big-endian u32 from `b` at `*at`, moving `*at` past it.
fn be32(b: &[u8], at: &mut usize) -> u32 {
    let v = u32::from_be_bytes(b[*at..*at + 4].try_into().unwrap());
    *at += 4;
    v
}

/// Protects: READ replies on the wire carry exactly the bytes read, padded to 4 bytes, each
/// in a record of the right length, also pipelined (data over 64 KiB leaves from its own
/// buffer after the packed reply, and its padding before the next record's mark; smaller data
/// is copied in with the replies around it: a slip in either shifts every reply after it).
#[tokio::test(flavor = "multi_thread")]
async fn read_replies_are_framed_on_the_wire() {
    use nfs3_server::tcp::{NFSTcp, NFSTcpListener};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (fs, _) = nfs();
    let root = fs.root_dir();
    let (h, _) = fs.create(&root, &n("f"), sattr3::default()).await.unwrap();
    // Over 64 KiB, so a whole-file READ takes the path of bulk data.
    let content = data(9, 20 * 4096 + 5);
    fs.write(&h, 0, &content, stable_how::FILE_SYNC)
        .await
        .unwrap();
    let generation = 7u64;
    let listener = NFSTcpListener::bind_with_generation("127.0.0.1:0", fs, generation)
        .await
        .unwrap();
    let port = listener.get_listen_port();
    let server = tokio::spawn(async move { listener.handle_forever().await });

    let mut fh = generation.to_le_bytes().to_vec();
    fh.extend_from_slice(h.as_bytes());
    // (offset, count): odd lengths (pads of 1, 3 and 2 bytes), the whole file (81 925 bytes,
    // bulk), a read past the end of the file (short, eof) and one at it (no data at all).
    let reads: [(u64, u32); 6] = [
        (1, 8191),
        (0, 1 << 20),
        (4093, 2),
        (12_000, 4),
        (81_923, 4),
        (81_925, 9),
    ];
    let mut calls = Vec::new();
    for (i, (off, count)) in reads.iter().enumerate() {
        let mut args = (fh.len() as u32).to_be_bytes().to_vec();
        args.extend_from_slice(&fh);
        args.extend_from_slice(&off.to_be_bytes());
        args.extend_from_slice(&count.to_be_bytes());
        calls.extend(rpc_call(100 + i as u32, 6, &args));
    }
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    sock.write_all(&calls).await.unwrap();

    let mut replies = std::collections::HashMap::new();
    for _ in reads {
        let mut mark = [0u8; 4];
        // Bounded: a reply the server never finishes fails the test instead of hanging it.
        let limit = std::time::Duration::from_secs(30);
        tokio::time::timeout(limit, sock.read_exact(&mut mark))
            .await
            .expect("a reply's record mark within 30 s")
            .unwrap();
        let mark = u32::from_be_bytes(mark);
        assert!(mark & 0x8000_0000 != 0, "one fragment per reply");
        let mut rec = vec![0u8; (mark & 0x7fff_ffff) as usize];
        tokio::time::timeout(limit, sock.read_exact(&mut rec))
            .await
            .expect("a reply's record within 30 s")
            .unwrap();
        let mut at = 0;
        let xid = be32(&rec, &mut at);
        // REPLY, MSG_ACCEPTED, verifier (flavor, empty body), SUCCESS, NFS3_OK
        for want in [1, 0, 0, 0, 0, 0] {
            assert_eq!(be32(&rec, &mut at), want, "reply header of call {xid}");
        }
        assert_eq!(be32(&rec, &mut at), 1, "attributes follow");
        at += 84; // fattr3
        let count = be32(&rec, &mut at) as usize;
        let eof = be32(&rec, &mut at) == 1;
        let len = be32(&rec, &mut at) as usize;
        assert_eq!(len, count, "count and data length of call {xid}");
        let bytes = rec[at..at + len].to_vec();
        at += len;
        assert!(rec[at..].iter().all(|&b| b == 0), "padding is zeros");
        assert_eq!(
            rec.len() - at,
            (4 - len % 4) % 4,
            "padded to 4 bytes, no more"
        );
        replies.insert(xid, (bytes, eof));
    }
    for (i, (off, count)) in reads.iter().enumerate() {
        let (bytes, eof) = &replies[&(100 + i as u32)];
        let s = (*off as usize).min(content.len());
        let e = (s + *count as usize).min(content.len());
        assert_eq!(bytes[..], content[s..e], "data of READ({off}, {count})");
        assert_eq!(*eof, e == content.len(), "eof of READ({off}, {count})");
    }
    server.abort();
}
