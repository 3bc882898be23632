//! Engine ingest and read benchmark (no FUSE): hash + dedup + pack append (+ compression).
//!
//! Writes BENCH_MIB MiB (2^20 bytes; default 1024; BENCH_MB is an older name of the same knob,
//! also in MiB) of unique, compressible data into a datastore under BENCH_DIR (default
//! /var/tmp), then the same data again (already stored: dedup hits), then image-like data;
//! compresses what was stored uncompressed with `gc` (timed), reads the first file back after a
//! reopen, and ingests the first data again into a datastore that compresses as it writes; the reference is the same bytes written and read with plain file I/O (+ fdatasync) in
//! the same folder, in the same run. Rates are MB/s (10^6 bytes per second). Prints a markdown
//! table and writes benches/results/engine.json (or $BENCH_RESULTS_DIR/engine.json) through
//! benches/results.py, like the scripts' benches/lib.sh. The reads are "cold" only if dropping
//! the page cache worked (needs root); otherwise they are labelled warm.
//!
//! Run: `cargo bench --bench engine` (or `BENCH_MIB=4096 cargo bench --bench engine`).

use std::io::{Read, Write};
use std::time::Instant;

use tessera::fs::dir::Ctx;
use tessera::fs::{Engine, Format, InodeId, Kind, Tuning};

const MIB: usize = 1 << 20;

/// 1 MiB of text-like data (zstd-1 gets roughly 3x on it); built once.
fn template() -> Vec<u8> {
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
    let mut out = Vec::with_capacity(MIB + 16);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while out.len() < MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 8) as usize]);
    }
    out.truncate(MIB);
    out
}

/// Block `n` of the "text" kind: the template with a counter stamped into every 4 KiB, so
/// every block (and every chunk) is unique while generating it costs one copy. Compresses
/// about 5x, in many short matches: the slow case for zstd.
fn block(tpl: &[u8], n: u64, out: &mut [u8]) {
    out.copy_from_slice(tpl);
    for (k, page) in out.chunks_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(n * 256 + k as u64).to_le_bytes());
    }
}

/// Block `n` of the "image" kind, closer to a VM disk (about 2x with zstd-1, like the
/// ../shared corpus): each 4 KiB page is half noise, half a long run copied from the template.
fn image_block(tpl: &[u8], n: u64, out: &mut [u8]) {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for (k, page) in out.chunks_mut(4096).enumerate() {
        for w in page[..2048].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let at = ((x >> 11) as usize + k * 977) % (tpl.len() - 2048);
        page[2048..].copy_from_slice(&tpl[at..at + 2048]);
    }
}

/// MB/s: 10^6 bytes per second.
/// Write `mb` MiB made by `gen` into `f` from offset 0, then fsync it: MB/s.
fn ingest(e: &Engine, f: InodeId, mb: usize, gen: impl Fn(u64, &mut [u8])) -> f64 {
    let mut buf = vec![0u8; MIB];
    let t = Instant::now();
    for n in 0..mb {
        gen(n as u64, &mut buf);
        e.write(f, (n * MIB) as u64, &buf).unwrap();
    }
    e.fsync(f).unwrap();
    mbps(mb * MIB, t.elapsed().as_secs_f64())
}

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// sync, then drop the page cache; false (and a warning) if the kernel refused (not root, or
/// /proc/sys read-only): what follows is then not a cold read.
fn drop_caches() -> bool {
    let ok = std::process::Command::new("sh")
        .args(["-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("engine bench: dropping the page cache failed: the read is warm, not cold");
    }
    ok
}

/// The figures of this run, as benches/lib.sh records them (see benches/results.py).
struct Record(String);

impl Record {
    fn line(&mut self, fields: &[&str]) {
        self.0.push_str(&fields.join("\t"));
        self.0.push('\n');
    }
    fn metric(&mut self, id: &str, unit: &str, label: &str, extra: &[&str]) {
        let mut f = vec!["metric", id, unit, label];
        f.extend_from_slice(extra);
        self.line(&f);
    }
    fn value(&mut self, id: &str, system: &str, v: f64) {
        self.line(&["value", id, system, &format!("{v:.6}")]);
    }
}

fn main() {
    let mb: usize = std::env::var("BENCH_MIB")
        .or_else(|_| std::env::var("BENCH_MB"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let started = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    // The commit and work tree measured, taken now rather than when the run ends.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::process::Command::new("python3")
        .arg(root.join("benches/results.py"))
        .arg("source")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = tempfile::Builder::new()
        .prefix("tessera-bench")
        .tempdir_in(&base)
        .expect("temp dir");
    let total = mb * MIB;
    let mut buf = vec![0u8; MIB];
    let tpl = template();

    // Reference: plain file on the same disk.
    let plain = tmp.path().join("plain.dat");
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&plain).unwrap();
        for n in 0..mb {
            block(&tpl, n as u64, &mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_data().unwrap();
    }
    let plain_w = mbps(total, t.elapsed().as_secs_f64());
    // Drop the page cache of the reference file so its read comes from disk, like ours.
    let plain_cold = drop_caches();
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&plain).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
    let plain_r = mbps(total, t.elapsed().as_secs_f64());
    std::fs::remove_file(&plain).unwrap();

    let ds = tmp.path().join("ds");
    Engine::create(&ds, Format::default()).unwrap();
    // As `tessera mount` runs it: with the background flusher.
    let e = std::sync::Arc::new(Engine::open(&ds, Tuning::default()).unwrap());
    let _flusher = e.spawn_flusher(std::time::Duration::from_secs(5));
    let a = e
        .mknod(InodeId::ROOT, b"a.raw", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let b = e
        .mknod(InodeId::ROOT, b"b.raw", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;

    let unique_w = ingest(&e, a, mb, |n, b| block(&tpl, n, b));

    let dup_w = ingest(&e, b, mb, |n, b| block(&tpl, n, b));

    let img = e
        .mknod(InodeId::ROOT, b"img.raw", Kind::File, 0o644, 0, Ctx::ROOT)
        .unwrap()
        .ino;
    let image_w = ingest(&e, img, mb, |n, b| image_block(&tpl, n, b));

    let t = Instant::now();
    e.clone_paths(b"a.raw", &[b"c.raw".to_vec()]).unwrap();
    let clone_us = t.elapsed().as_secs_f64() * 1e6;
    // The unique data was stored uncompressed (`Tuning::raw_backlog`): compress it as
    // `tessera gc` would (the background does it once the packs are cold), timed, so the read
    // below is of data at rest.
    let raw_stored = e.stats().unwrap().stored_bytes;
    std::thread::sleep(tessera::fs::gc::ACTIVE_QUIET);
    let t = Instant::now();
    e.gc(tessera::fs::gc::DEFAULT_MIN_LIVE, &|_, _| {}).unwrap();
    let gc_w = mbps(2 * total, t.elapsed().as_secs_f64());
    let stats = e.stats().unwrap();
    drop(e);

    // Compressing as it writes (`--raw-backlog 0`, and any S3-backed datastore).
    let ds2 = tmp.path().join("ds-inline");
    Engine::create(&ds2, Format::default()).unwrap();
    let inline_w = {
        let e = std::sync::Arc::new(
            Engine::open(
                &ds2,
                Tuning {
                    raw_backlog: 0,
                    ..Tuning::default()
                },
            )
            .unwrap(),
        );
        let _flusher = e.spawn_flusher(std::time::Duration::from_secs(5));
        let f = e
            .mknod(InodeId::ROOT, b"a.raw", Kind::File, 0o644, 0, Ctx::ROOT)
            .unwrap()
            .ino;
        ingest(&e, f, mb, |n, b| block(&tpl, n, b))
    };
    std::fs::remove_dir_all(&ds2).unwrap();

    let tessera_cold = drop_caches();
    let e = Engine::open(&ds, Tuning::default()).unwrap();
    let t = Instant::now();
    let mut off = 0u64;
    while off < total as u64 {
        let d = e.read(a, off, MIB as u32).unwrap();
        off += d.len() as u64;
    }
    let read = mbps(total, t.elapsed().as_secs_f64());

    let cold = plain_cold && tessera_cold;
    let read_label = if cold {
        "read after reopen, cold (MB/s)"
    } else {
        "read after reopen, WARM: page-cache drop failed (MB/s)"
    };
    println!(
        "engine benchmark: {mb} MiB, datastore in {base}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| measure | tessera engine | plain file (same disk) | ratio |");
    println!("|---|---|---|---|");
    println!("| ingest, unique text-like, ~5x (MB/s) | {unique_w:.0} | {plain_w:.0} (write+fdatasync) | {:.2}x |", unique_w / plain_w);
    println!(
        "| ingest, unique image-like, ~2x (MB/s) | {image_w:.0} | {plain_w:.0} | {:.2}x |",
        image_w / plain_w
    );
    println!(
        "| ingest, already stored (MB/s) | {dup_w:.0} | {plain_w:.0} | {:.2}x |",
        dup_w / plain_w
    );
    println!(
        "| ingest, unique text-like, compressed as written (MB/s) | {inline_w:.0} | {plain_w:.0} | {:.2}x |",
        inline_w / plain_w
    );
    println!("| tessera gc compressing the unique data (MB/s) | {gc_w:.0} | | |");
    println!(
        "| {read_label} | {read:.0} | {plain_r:.0} | {:.2}x |",
        read / plain_r
    );
    println!("| clone of the {mb} MiB file (µs) | {clone_us:.0} | | |");
    println!();
    println!(
        "stored {:.1} MiB for {:.1} MiB referenced ({:.1} MiB before gc): dedup {:.2}x, compression {:.2}x",
        stats.stored_bytes as f64 / MIB as f64,
        stats.referenced_bytes as f64 / MIB as f64,
        raw_stored as f64 / MIB as f64,
        stats.dedup_ratio,
        stats.compression_ratio
    );

    // Results file, through benches/results.py (commit, date, machine added there).
    let mut r = Record(String::new());
    r.line(&["started", &started]);
    let cmd = format!("BENCH_MIB={mb} cargo bench --bench engine");
    r.line(&["command", &cmd]);
    if !source.is_empty() {
        r.line(&["source", &source]);
    }
    if let Ok(exe) = std::env::current_exe() {
        let built = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%dT%H:%M:%SZ")
            .arg("-r")
            .arg(&exe)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        r.line(&["binary", &exe.to_string_lossy(), &built]);
    }
    r.line(&["param", "BENCH_MIB", &mb.to_string(), "1024"]);
    let refs = ["subject=tessera", "refs=plain file", "better=higher"];
    let ingest = [
        (
            "ingest_text",
            "ingest, unique text-like data (~5x compressible)",
            unique_w,
            ">= 500 MB/s",
        ),
        (
            "ingest_image",
            "ingest, unique image-like data (~2x compressible)",
            image_w,
            ">= 500 MB/s",
        ),
        (
            "ingest_dup",
            "ingest, data already stored",
            dup_w,
            ">= 2000 MB/s",
        ),
        (
            "ingest_inline",
            "ingest, unique text-like data, compressed as written (--raw-backlog 0)",
            inline_w,
            "",
        ),
    ];
    for (id, label, v, target) in ingest {
        let target = format!("target={target}");
        let mut extra = refs.to_vec();
        if !target.ends_with('=') {
            extra.push(&target);
        }
        if id != "ingest_image" {
            extra.push("headline=1");
        }
        if id == "ingest_text" {
            extra.push("note=plain file: the same bytes written with write(2) + fdatasync");
        }
        r.metric(id, "MB/s", label, &extra);
        r.value(id, "tessera", v);
        r.value(id, "plain file", plain_w);
    }
    let cache = if cold { "cache=cold" } else { "cache=warm" };
    r.metric(
        "read",
        "MB/s",
        "read after reopen",
        &[refs[0], refs[1], refs[2], cache],
    );
    r.value("read", "tessera", read);
    r.value("read", "plain file", plain_r);
    r.metric(
        "clone_us",
        "µs",
        &format!("clone of the {mb} MiB file (engine call)"),
        &["better=lower"],
    );
    r.value("clone_us", "tessera", clone_us);
    r.metric(
        "gc_compress",
        "MB/s",
        "tessera gc compressing the unique data stored uncompressed (logical MB/s)",
        &["better=higher"],
    );
    r.value("gc_compress", "tessera", gc_w);
    r.metric(
        "raw_stored_mib",
        "MiB",
        "stored in packs before that",
        &["better=lower"],
    );
    r.value("raw_stored_mib", "tessera", raw_stored as f64 / MIB as f64);
    r.metric(
        "stored_mib",
        "MiB",
        "stored in packs (compressed)",
        &["better=lower"],
    );
    r.value(
        "stored_mib",
        "tessera",
        stats.stored_bytes as f64 / MIB as f64,
    );
    r.metric("referenced_mib", "MiB", "referenced by the files", &[]);
    r.value(
        "referenced_mib",
        "tessera",
        stats.referenced_bytes as f64 / MIB as f64,
    );
    r.metric(
        "dedup_ratio",
        "x",
        "dedup ratio (referenced / unique)",
        &["better=higher"],
    );
    r.value("dedup_ratio", "tessera", stats.dedup_ratio);
    r.metric(
        "compression_ratio",
        "x",
        "compression ratio (unique / stored)",
        &["better=higher"],
    );
    r.value("compression_ratio", "tessera", stats.compression_ratio);

    let out = std::env::var("BENCH_RESULTS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("benches/results"));
    let rec = tmp.path().join("engine.rec");
    std::fs::write(&rec, &r.0).unwrap();
    let ok = std::process::Command::new("python3")
        .arg(root.join("benches/results.py"))
        .args(["write", "engine"])
        .arg(&rec)
        .arg(&out)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "benches/results.py failed: no results file written");
}
