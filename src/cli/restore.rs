//! `tessera restore`: rebuild a datastore from its bucket alone.

use std::path::PathBuf;

use anyhow::{anyhow, Result};

use tessera::fs::{Engine, FsError, Tuning};

/// Rebuild an S3-backed datastore in a new folder from its bucket: the newest metadata backup,
/// with every pack read back from the bucket as needed (disaster recovery, or moving a
/// datastore to another machine). The old server must be stopped: the bucket has one writer.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The bucket and prefix the datastore was made with: s3://BUCKET/PREFIX.
    pub url: String,
    /// Folder to rebuild the datastore in (must be empty or absent).
    pub dir: PathBuf,
    #[command(flatten)]
    pub tier: super::init::TierArgs,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = a.tier.config(&a.url)?;
    let info = tessera::fs::tier_backup::restore(&cfg, &a.dir).map_err(|e| match e {
        FsError::Exists => anyhow!(
            "{} is not empty; choose a new or empty folder",
            a.dir.display()
        ),
        e => anyhow!("cannot restore {} into {}: {e}", a.url, a.dir.display()),
    })?;
    // It opens: the lease is free and the metadata is whole.
    let engine = Engine::open(&a.dir, Tuning::default())
        .map_err(|e| anyhow!("restored {} but cannot open it: {e}", a.dir.display()))?;
    let s = engine
        .stats()
        .map_err(|e| anyhow!("cannot read the restored datastore: {e}"))?;
    drop(engine);
    println!(
        "restored {} from {}: {} files, {} (metadata backup taken {} on {} from {}); serve it \
         with: tessera serve {}; tessera fsck {} verifies every chunk (it reads the whole bucket)",
        a.dir.display(),
        a.url,
        s.files,
        super::stats::human(s.logical_bytes),
        tessera::fs::snapshot::rfc3339(info.taken_unix),
        info.host,
        info.datastore,
        a.dir.display(),
        a.dir.display()
    );
    Ok(())
}
