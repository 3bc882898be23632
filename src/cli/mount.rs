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

/// glibc malloc arenas for the daemon. The default (8 per core) lets freed chunk buffers of
/// many FUSE and rayon threads pile up in separate arenas, adding resident memory under
/// random-write load; 4 arenas keep contention low and memory bounded.
const MALLOC_ARENAS: i32 = 4;

pub fn run(a: Args) -> Result<()> {
    // SAFETY: mallopt only changes allocator tuning; it is called before this process starts
    // any other thread, and M_ARENA_MAX accepts any positive value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
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
    raise_readahead(mnt.clone());
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

/// Kernel readahead for the mount (KiB). FUSE starts at 128 KiB; sequential reads of VM images
/// go about 1.5x faster with 1 MiB requests (fewer round trips, bigger coalesced pack reads).
const READAHEAD_KB: u32 = 1024;

/// Raise the mount's readahead through its backing-device entry in sysfs (best effort: needs
/// root). Runs on its own thread because `stat` of the mount point waits for the session.
fn raise_readahead(mnt: PathBuf) {
    std::thread::spawn(move || {
        use std::os::unix::fs::MetadataExt;
        let Ok(dev) = std::fs::metadata(&mnt).map(|m| m.dev()) else {
            return;
        };
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        if let Err(e) = std::fs::write(&path, READAHEAD_KB.to_string()) {
            tracing::debug!("could not raise readahead ({path}): {e}");
        }
    });
}
