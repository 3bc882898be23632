//! `tessera stats`: space figures of a datastore, mounted or not.

use std::path::PathBuf;

use anyhow::{anyhow, Result};

use tessera::control::Request;
use tessera::fs::stats::Stats;

/// Show logical and physical space, dedup and compression ratios.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Print JSON (for monitoring).
    #[arg(long)]
    pub json: bool,
}

pub(super) fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

pub fn run(a: Args) -> Result<()> {
    let dir = super::datastore_arg(&a.dir)?;
    let v = match super::access(&dir)? {
        super::Access::Served(d) => super::ask(&d, &Request::Stats)?,
        super::Access::Own(_lock, engine) => serde_json::to_value(
            engine
                .stats()
                .map_err(|e| anyhow!("cannot read stats: {e}"))?,
        )?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s: Stats = serde_json::from_value(v)?;
    println!("datastore         {}", dir.display());
    println!("files             {} in {} folders", s.files, s.directories);
    println!("logical size      {}", human(s.logical_bytes));
    println!("data referenced   {}", human(s.referenced_bytes));
    println!(
        "unique data       {} in {} chunks of {}",
        human(s.unique_bytes),
        s.chunk_count,
        human(s.chunk_size)
    );
    println!("stored (zstd)     {}", human(s.stored_bytes));
    println!("dedup ratio       {:.2}x", s.dedup_ratio);
    println!("compression ratio {:.2}x", s.compression_ratio);
    println!("total saving      {:.2}x", s.total_ratio);
    println!(
        "pack files        {} ({}, {:.0}% live), reclaimable {}",
        s.pack_count,
        human(s.pack_bytes),
        s.pack_fill * 100.0,
        human(s.reclaimable_bytes)
    );
    let looked = s.cache_hits + s.cache_misses;
    println!(
        "read cache        {} of {}, {:.1}% of chunk reads served from it; {} read from packs",
        human(s.cache_bytes),
        human(s.cache_capacity_bytes),
        if looked == 0 {
            0.0
        } else {
            100.0 * s.cache_hits as f64 / looked as f64
        },
        human(s.pack_read_bytes)
    );
    if s.records_reused > 0 {
        println!(
            "written in place  {} in {} records over dead records of the same size (since served)",
            human(s.reused_bytes),
            s.records_reused
        );
    }
    if s.uncompressed_bytes > 0 {
        println!(
            "to compress       {} written uncompressed; compressed once idle 10 min, or now by tessera gc",
            human(s.uncompressed_bytes)
        );
    }
    let in_tables: u64 = s.metadata_tables.iter().map(|t| t.page_bytes).sum();
    println!(
        "metadata          {} ({:.1}% of pack bytes; {} in tables, {} free pages and redb's own)",
        human(s.metadata_bytes),
        100.0 * s.metadata_bytes as f64 / s.pack_bytes.max(1) as f64,
        human(in_tables),
        human(s.metadata_bytes.saturating_sub(in_tables))
    );
    for t in s.metadata_tables.iter().filter(|t| t.entries > 0) {
        println!(
            "  {:<15} {:>12} {:>10} entries, {} stored",
            t.table,
            human(t.page_bytes),
            t.entries,
            human(t.stored_bytes)
        );
    }
    println!(
        "metadata backup   {} (meta.redb.bak, taken when last served)",
        human(s.metadata_backup_bytes)
    );
    println!(
        "space reserve     {} (kept free for compaction on a full disk)",
        human(s.reserve_bytes)
    );
    if s.other_bytes > 0 {
        println!("other files       {}", human(s.other_bytes));
    }
    println!(
        "datastore folder  {} in all (packs, metadata, backup, reserve{})",
        human(s.folder_bytes),
        if s.other_bytes > 0 { ", other" } else { "" }
    );
    if let Some(t) = &s.tier {
        println!(
            "object store      {}: {} objects, {}",
            t.url,
            t.objects,
            human(t.object_bytes)
        );
        println!(
            "  uploads pending {} packs, {}; deletes pending {}",
            t.uploads_pending,
            human(t.upload_bytes_pending),
            t.deletes_pending
        );
        println!(
            "  local cache     {} of {} ({} of uploaded packs kept, {} read back); not yet \
             uploaded: {}",
            human(t.cached_pack_bytes + t.cache_block_bytes),
            human(t.cache_limit_bytes),
            human(t.cached_pack_bytes),
            human(t.cache_block_bytes),
            human(t.local_pack_bytes.saturating_sub(t.cached_pack_bytes))
        );
        println!(
            "  requests        {} put, {} get, {} list, {} delete; {} up, {} down",
            t.requests_put,
            t.requests_get,
            t.requests_list,
            t.requests_delete,
            human(t.bytes_uploaded),
            human(t.bytes_downloaded)
        );
        if let Some(e) = &t.last_error {
            println!("  last error      {e}");
        }
        if let Some(f) = &t.fenced {
            println!("  STOPPED         {f}");
        }
    }
    println!(
        "disk              {} free of {}",
        human(s.disk_free_bytes),
        human(s.disk_total_bytes)
    );
    if s.snapshots > 0 {
        println!("snapshots         {} (tessera snapshot list)", s.snapshots);
    }
    for r in &s.replication {
        let age = |t: u64| tessera::fs::snapshot::rfc3339(t);
        let every = if r.every > 0 {
            format!("every {} s", r.every)
        } else {
            "by hand".to_string()
        };
        let last = if r.last_point > 0 {
            format!("point of {} (lag {} s)", age(r.last_point), r.lag)
        } else {
            "nothing replicated yet".to_string()
        };
        println!("replication       {} -> {}, {every}: {last}", r.path, r.to);
        if !r.last_error.is_empty() {
            println!(
                "  last run failed at {}: {}",
                age(r.last_error_at),
                r.last_error
            );
        }
    }
    let busy: Vec<_> = s.stages.iter().filter(|t| t.calls > 0).collect();
    if !busy.is_empty() {
        // CPU-seconds per stage since the serving process opened the datastore.
        println!(
            "time per stage    (since the datastore was opened; CPU seconds over all threads)"
        );
        for t in busy {
            println!(
                "  {:<15} {:>10.3} s  {:>12} calls  {:>9.1} us/call",
                t.stage,
                t.seconds,
                t.calls,
                t.seconds * 1e6 / t.calls as f64
            );
        }
    }
    Ok(())
}
