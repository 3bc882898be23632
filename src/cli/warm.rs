//! `tessera warm`: preload a template's chunks into the serving process's read cache before a
//! boot storm.

use std::path::PathBuf;

use anyhow::{bail, Result};

use tessera::control::Request;
use tessera::fs::warm::WarmReport;

/// Load the blocks of files or folders (golden images) into the read cache of the process
/// serving their datastore, so clones booting at once read them from memory.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files or folders on a Tessera mount or inside a served datastore folder.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print JSON (a list, one object per path).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut out: Vec<WarmReport> = Vec::new();
    for p in &a.paths {
        let l = super::locate(p)?;
        let d = match super::access(&l.datastore)? {
            super::Access::Served(d) => d,
            super::Access::Own(..) => bail!(
                "nothing serves {}: the read cache lives in the serving process; start `tessera serve {} --nfs` (or --mount) first",
                l.datastore.display(),
                l.datastore.display()
            ),
        };
        let r: WarmReport = serde_json::from_value(super::ask_with_progress(
            &d,
            &Request::Warm {
                path: l.inner.clone(),
            },
            "loading chunks",
        )?)?;
        if !a.json {
            println!(
                "{}: {} in {} chunks of {} file(s), {} read from packs; cache {} of {}",
                p.display(),
                super::stats::human(r.bytes),
                r.chunks,
                r.files,
                r.loaded,
                super::stats::human(r.cache_bytes),
                super::stats::human(r.cache_capacity_bytes)
            );
            if r.cache_full {
                println!(
                    "  the cache is full: the rest was left out (raise --cache-size of tessera serve)"
                );
            }
            if r.damaged > 0 {
                println!(
                    "  {} chunks could not be read: run tessera scrub {}",
                    r.damaged,
                    l.datastore.display()
                );
            }
        }
        out.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
