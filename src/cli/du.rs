//! `tessera du`: per-file and per-folder (per-VM) space: logical, allocated, shared, unique,
//! and what deleting it would free. Mounted (through the serving process) or not.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use tessera::control::Request;
use tessera::fs::du::Usage;

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
    for p in &a.paths {
        let l = super::locate(p)?;
        let u = match super::access(&l.datastore)? {
            super::Access::Served(d) => serde_json::from_value(super::ask(
                &d,
                &Request::Du {
                    path: l.inner.clone(),
                },
            )?)?,
            super::Access::Own(_lock, engine) => engine
                .du(&l.inner)
                .map_err(|e| anyhow!("{}: {e}", p.display()))?,
        };
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
    Ok(())
}
