//! `tessera du`: per-file and per-folder (per-VM) space: logical, allocated, shared, unique,
//! and what deleting it would free. Mounted (through the serving process) or not.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use tessera::control::Request;
use tessera::fs::du::Usage;
use tessera::fs::stats::Stats;

/// Show the space of files or folders (VMs): what they share and what deleting them frees.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files or folders on a Tessera mount or inside a datastore folder.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print JSON (a list, one object per path).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut out: Vec<Usage> = Vec::new();
    // The datastore-wide lines (metadata, reserve) once per datastore, after the table.
    let mut stores: Vec<(PathBuf, Stats)> = Vec::new();
    for p in &a.paths {
        let l = super::locate(p)?;
        let first = !stores.iter().any(|s| s.0 == l.datastore);
        let (u, st) = match super::access(&l.datastore)? {
            super::Access::Served(d) => {
                let u = serde_json::from_value(super::ask(
                    &d,
                    &Request::Du {
                        path: l.inner.clone(),
                    },
                )?)?;
                let st = match first && !a.json {
                    true => Some(serde_json::from_value(super::ask(&d, &Request::Stats)?)?),
                    false => None,
                };
                (u, st)
            }
            super::Access::Own(_lock, engine) => {
                let u = engine
                    .du(&l.inner)
                    .map_err(|e| anyhow!("{}: {e}", p.display()))?;
                let st = match first && !a.json {
                    true => Some(
                        engine
                            .stats()
                            .map_err(|e| anyhow!("cannot read stats: {e}"))?,
                    ),
                    false => None,
                };
                (u, st)
            }
        };
        if let Some(st) = st {
            stores.push((l.datastore.clone(), st));
        }
        out.push(Usage {
            path: p.display().to_string(),
            ..u
        });
    }
    if out.is_empty() {
        bail!("no path given");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let h = super::stats::human;
    println!(
        "{:>11} {:>11} {:>11} {:>11} {:>11}  PATH",
        "LOGICAL", "ALLOCATED", "SHARED", "UNIQUE", "FREED"
    );
    for u in &out {
        println!(
            "{:>11} {:>11} {:>11} {:>11} {:>11}  {}",
            h(u.logical_bytes),
            h(u.allocated_bytes),
            h(u.shared_bytes),
            h(u.unique_bytes),
            h(u.freed_on_delete_bytes),
            u.path
        );
    }
    // What no file owns: the figures that, with the packs, add up to the datastore folder.
    for (dir, st) in &stores {
        println!(
            "datastore {}: packs {} ({} reclaimable), metadata {} (backup {}), space reserve {}, folder {}",
            dir.display(),
            h(st.pack_bytes),
            h(st.reclaimable_bytes),
            h(st.metadata_bytes),
            h(st.metadata_backup_bytes),
            h(st.reserve_bytes),
            h(st.folder_bytes)
        );
    }
    Ok(())
}
