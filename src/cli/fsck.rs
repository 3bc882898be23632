//! `tessera fsck`: verify every invariant of an unmounted datastore.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use tessera::control::{self, LockError};
use tessera::fs::{Engine, Tuning};

/// Check a datastore (it must not be mounted); exit status 1 if anything is wrong.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = super::datastore_arg(&a.dir)?;
    let _lock = control::lock(&dir).map_err(|e| match e {
        LockError::Busy(pid) => {
            anyhow!(
                "datastore {} is in use by process {pid}; unmount it before running fsck",
                dir.display()
            )
        }
        e => anyhow!("{e}"),
    })?;
    let engine = Engine::open(&dir, Tuning::default())
        .map_err(|e| anyhow!("cannot open datastore {}: {e}", dir.display()))?;
    let report = super::with_progress("verifying chunks", |p| engine.fsck(p))
        .map_err(|e| anyhow!("fsck could not read the datastore: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} inodes, {} chunk-map nodes, {} chunks ({} MiB verified)",
            report.inodes,
            report.nodes,
            report.chunks,
            report.chunk_bytes_verified >> 20
        );
        for p in &report.problems {
            println!("problem: {p}");
        }
        for f in &report.damaged_files {
            println!("damaged file: {f}");
        }
    }
    if !report.problems.is_empty() {
        bail!(
            "{} problem(s) found in {}",
            report.problems.len(),
            dir.display()
        );
    }
    if !a.json {
        println!("no problems found");
    }
    Ok(())
}
