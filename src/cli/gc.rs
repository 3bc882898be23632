//! `tessera gc`: give the space of deleted data back by compacting packs (mounted or not).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use tessera::control::Request;
use tessera::fs::gc::GcReport;

/// Compact packs whose live share fell below a threshold; frees disk space of deleted data.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Compact packs with less than this share of live data (0.0 to 1.0). The default
    /// compacts every pack with at least 5 % dead data.
    #[arg(long, default_value_t = tessera::fs::gc::DEFAULT_MIN_LIVE)]
    pub min_live: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Copy at most this many MiB per second (0: unlimited), to spare guest I/O.
    #[arg(long, default_value_t = 0, value_name = "MIB_PER_S")]
    pub max_rate: u64,
}

pub fn run(a: Args) -> Result<()> {
    if !(0.0..=1.0).contains(&a.min_live) {
        bail!(
            "--min-live must be between 0.0 and 1.0 (got {})",
            a.min_live
        );
    }
    let dir = super::datastore_arg(&a.dir)?;
    let r: GcReport = match super::access(&dir)? {
        super::Access::Served(d) => serde_json::from_value(super::ask_with_progress(
            &d,
            &Request::Gc {
                min_live: a.min_live,
                max_rate_mib: a.max_rate,
            },
            "compacting packs",
        )?)?,
        super::Access::Own(_lock, engine) => {
            let rate = (a.max_rate > 0).then_some(a.max_rate << 20);
            super::with_progress("compacting packs", |p| engine.gc_paced(a.min_live, rate, p))
                .map_err(|e| anyhow!("gc failed: {e}"))?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "compacted {} pack(s): moved {} chunks ({} MiB), freed {} MiB",
            r.packs_compacted,
            r.chunks_moved,
            r.bytes_moved >> 20,
            r.bytes_freed >> 20
        );
        if r.chunks_compressed > 0 {
            println!(
                "compressed {} chunks that were written uncompressed",
                r.chunks_compressed
            );
        }
        if r.packs_left_with_dead > 0 {
            println!(
                "left {} MiB dead in {} pack(s): each is at least {:.0}% live (--min-live {}), \
                 or is being written to",
                r.bytes_left_dead >> 20,
                r.packs_left_with_dead,
                r.min_live * 100.0,
                r.min_live
            );
        }
        if r.packs_skipped_damaged > 0 {
            println!(
                "{} pack(s) with damaged records were left alone: run tessera fsck",
                r.packs_skipped_damaged
            );
        }
    }
    Ok(())
}
