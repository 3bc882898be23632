//! `tessera fsck`: verify every invariant of an unmounted datastore; `--repair` rebuilds the
//! chunk index from the packs and every count from the chunk maps first.

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
    /// First rebuild what can be rebuilt: the chunk index from the packs (pointing damaged
    /// entries at intact copies), reference counts from the chunk maps, pack accounting.
    /// Files whose data is intact nowhere are named; they keep reading as errors.
    #[arg(long)]
    pub repair: bool,
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
    let mut repaired = None;
    if a.repair {
        let r = super::with_progress("scanning packs", |p| engine.repair(p)).map_err(|e| {
            anyhow!("repair failed: {e} (nothing was changed unless it says so above)")
        })?;
        if !a.json {
            println!(
                "repair: {} packs scanned, {} intact records, {} damaged stretches skipped; \
                 index: {} entries rebuilt, {} dropped; {} counts fixed; {} stray nodes removed",
                r.packs_scanned,
                r.records_intact,
                r.damaged_stretches,
                r.index_entries_rebuilt,
                r.index_entries_dropped,
                r.counts_fixed,
                r.nodes_dropped
            );
            if r.chunks_lost > 0 {
                println!(
                    "repair: {} chunks are intact nowhere; restore these files from a copy:",
                    r.chunks_lost
                );
            }
            for f in &r.damaged_files {
                println!("unrepairable file: {f}");
            }
        }
        repaired = Some(r);
    }
    let report = super::with_progress("verifying chunks", |p| engine.fsck(p))
        .map_err(|e| anyhow!("fsck could not read the datastore: {e}"))?;
    if a.json {
        let v = match &repaired {
            Some(r) => serde_json::json!({"repair": r, "check": report}),
            None => serde_json::to_value(&report)?,
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
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
        let hint = if a.repair {
            "restore the damaged files named above from a copy (or delete them), then run fsck again"
        } else {
            "run `tessera fsck --repair` to rebuild what can be rebuilt"
        };
        bail!(
            "{} problem(s) found in {}; {hint}",
            report.problems.len(),
            dir.display()
        );
    }
    if !a.json {
        println!("no problems found");
    }
    Ok(())
}
