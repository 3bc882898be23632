//! Engine ingest and read benchmark (no FUSE): hash + dedup + compress + pack append.
//!
//! Writes BENCH_MB MiB (default 1024) of unique, compressible data into a datastore under
//! BENCH_DIR (default /var/tmp), then the same data again (already stored: dedup hits), then
//! reads it back after a reopen; the reference is the same bytes written and read with plain
//! file I/O (+ fdatasync) in the same folder, in the same run. Prints a markdown table.
//!
//! Run: `cargo bench --bench engine` (or `BENCH_MB=4096 cargo bench --bench engine`).

use std::io::{Read, Write};
use std::time::Instant;

use tessera::fs::dir::Ctx;
use tessera::fs::{Engine, Format, InodeId, Kind, Tuning};

const MIB: usize = 1 << 20;

/// 1 MiB of unique, text-like data (zstd-1 gets roughly 3x on it), different for each `n`.
fn block(n: u64, out: &mut [u8]) {
    const WORDS: [&[u8]; 8] = [
        b"desktop ",
        b"kernel ",
        b"page ",
        b"user ",
        b"log: ",
        b"ok ",
        b"0x1f ",
        b"\n",
    ];
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0;
    while i < out.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % 8) as usize];
        let take = w.len().min(out.len() - i);
        out[i..i + take].copy_from_slice(&w[..take]);
        i += take;
        if i % 4096 < 8 && i + 8 <= out.len() {
            // a counter every page keeps every 4 KiB block unique
            out[i..i + 8].copy_from_slice(&(n * 1024 + i as u64).to_le_bytes());
            i += 8;
        }
    }
}

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn main() {
    let mb: usize = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = tempfile::Builder::new()
        .prefix("tessera-bench")
        .tempdir_in(&base)
        .expect("temp dir");
    let total = mb * MIB;
    let mut buf = vec![0u8; MIB];

    // Reference: plain file on the same disk.
    let plain = tmp.path().join("plain.dat");
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&plain).unwrap();
        for n in 0..mb {
            block(n as u64, &mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_data().unwrap();
    }
    let plain_w = mbps(total, t.elapsed().as_secs_f64());
    // Drop the page cache of the reference file so its read comes from disk, like ours.
    let _ = std::process::Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status();
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&plain).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
    let plain_r = mbps(total, t.elapsed().as_secs_f64());
    std::fs::remove_file(&plain).unwrap();

    let ds = tmp.path().join("ds");
    Engine::create(&ds, Format::default()).unwrap();
    let e = Engine::open(&ds, Tuning::default()).unwrap();
    let a = e
        .mknod(InodeId::ROOT, b"a.raw", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let b = e
        .mknod(InodeId::ROOT, b"b.raw", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;

    let t = Instant::now();
    for n in 0..mb {
        block(n as u64, &mut buf);
        e.write(a, (n * MIB) as u64, &buf).unwrap();
    }
    e.fsync(a).unwrap();
    let unique_w = mbps(total, t.elapsed().as_secs_f64());

    let t = Instant::now();
    for n in 0..mb {
        block(n as u64, &mut buf);
        e.write(b, (n * MIB) as u64, &buf).unwrap();
    }
    e.fsync(b).unwrap();
    let dup_w = mbps(total, t.elapsed().as_secs_f64());

    let t = Instant::now();
    e.clone_paths(b"a.raw", &[b"c.raw".to_vec()]).unwrap();
    let clone_us = t.elapsed().as_secs_f64() * 1e6;
    let stats = e.stats().unwrap();
    drop(e);

    let _ = std::process::Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status();
    let e = Engine::open(&ds, Tuning::default()).unwrap();
    let t = Instant::now();
    let mut off = 0u64;
    while off < total as u64 {
        let d = e.read(a, off, MIB as u32).unwrap();
        off += d.len() as u64;
    }
    let read = mbps(total, t.elapsed().as_secs_f64());

    println!(
        "engine benchmark: {mb} MiB, datastore in {base}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| measure | tessera engine | plain file (same disk) | ratio |");
    println!("|---|---|---|---|");
    println!("| ingest, unique compressible (MB/s) | {unique_w:.0} | {plain_w:.0} (write+fdatasync) | {:.2}x |", unique_w / plain_w);
    println!(
        "| ingest, already stored (MB/s) | {dup_w:.0} | {plain_w:.0} | {:.2}x |",
        dup_w / plain_w
    );
    println!(
        "| read after reopen, cold (MB/s) | {read:.0} | {plain_r:.0} | {:.2}x |",
        read / plain_r
    );
    println!("| clone of the {mb} MiB file (µs) | {clone_us:.0} | | |");
    println!();
    println!(
        "stored {:.1} MiB for {:.1} MiB referenced: dedup {:.2}x, compression {:.2}x",
        stats.stored_bytes as f64 / MIB as f64,
        stats.referenced_bytes as f64 / MIB as f64,
        stats.dedup_ratio,
        stats.compression_ratio
    );
}
