//! `tessera mount`: serve a datastore on a FUSE mount point, in the foreground.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use tessera::control::{self, LockError};
use tessera::fs::{Engine, Tuning};
use tessera::fuse::{config, TesseraFuse};

/// Mount a datastore with FUSE; runs until unmounted (fusermount3 -u) or interrupted.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Where to mount it (an existing empty folder).
    pub mountpoint: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Seconds between background flushes of written data (durable commits).
    #[arg(long, default_value_t = 5)]
    pub flush_interval: u64,
}

pub fn run(a: Args) -> Result<()> {
    let dir = super::datastore_arg(&a.dir)?;
    let mnt = std::fs::canonicalize(&a.mountpoint).with_context(|| {
        format!(
            "mount point {} does not exist; create it first",
            a.mountpoint.display()
        )
    })?;
    if !mnt.is_dir() {
        bail!("mount point {} is not a folder", mnt.display());
    }
    let _lock = control::lock(&dir).map_err(|e| match e {
        LockError::Busy(pid) => anyhow!(
            "datastore {} is already in use by process {pid}",
            dir.display()
        ),
        e => anyhow!("{e}"),
    })?;
    let engine = Arc::new(
        Engine::open(&dir, Tuning::default())
            .map_err(|e| anyhow!("cannot open datastore {}: {e}", dir.display()))?,
    );
    let _flusher = engine.spawn_flusher(Duration::from_secs(a.flush_interval.max(1)));
    let sock =
        control::serve(engine.clone(), &dir).context("cannot listen on the control socket")?;
    let mut session = fuser::Session::new(
        TesseraFuse::new(engine.clone()),
        &mnt,
        &config(&dir, a.threads),
    )
    .with_context(|| {
        format!(
            "cannot mount on {} (is fuse3 installed and /dev/fuse usable?)",
            mnt.display()
        )
    })?;
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            tracing::info!("signal received: unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::error!("unmount failed: {e}");
            }
        }
    });
    tracing::info!("serving {} on {}", dir.display(), mnt.display());
    let r = session.run();
    let _ = std::fs::remove_file(&sock);
    engine
        .sync_all()
        .map_err(|e| anyhow!("final flush failed: {e}"))?;
    r.context("FUSE session failed")?;
    tracing::info!("unmounted {}; all data flushed", mnt.display());
    Ok(())
}
