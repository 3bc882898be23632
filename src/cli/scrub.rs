//! `tessera scrub`: verify every stored chunk, mounted or not; exit 1 if anything is damaged.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use tessera::control::Request;
use tessera::fs::scrub::ScrubReport;

/// Read every stored chunk and check it against its id; name damaged files and offsets.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Read at most this many MiB per second (0: unlimited). Default: 256 while the datastore
    /// is being served (so guest I/O keeps its speed), unlimited otherwise.
    #[arg(long, value_name = "MIB_PER_S")]
    pub max_rate: Option<u64>,
}

/// Default scrub rate while serving (MiB/s).
const SERVED_RATE: u64 = 256;

pub fn run(a: Args) -> Result<()> {
    let dir = super::datastore_arg(&a.dir)?;
    let r: ScrubReport = match super::access(&dir)? {
        super::Access::Served(d) => serde_json::from_value(super::ask_with_progress(
            &d,
            &Request::Scrub {
                max_rate_mib: a.max_rate.unwrap_or(SERVED_RATE),
            },
            "verifying chunks",
        )?)?,
        super::Access::Own(_lock, engine) => {
            let rate = a.max_rate.filter(|&r| r > 0).map(|r| r << 20);
            super::with_progress("verifying chunks", |p| engine.scrub_paced(rate, p))
                .map_err(|e| anyhow!("scrub failed: {e}"))?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "checked {} chunks ({} MiB)",
            r.chunks_checked,
            r.bytes_checked >> 20
        );
        for d in &r.damaged {
            println!("damaged: {} at offset {}", d.path, d.offset);
        }
    }
    if !r.damaged_chunks.is_empty() {
        bail!(
            "{} damaged chunk(s) in {} place(s); restore the named files from a copy, or delete them",
            r.damaged_chunks.len(),
            r.damaged.len()
        );
    }
    Ok(())
}
