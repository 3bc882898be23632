//! `tessera mount`: serve a datastore on a FUSE mount point, in the foreground (what
//! `tessera serve DIR --mount MNT` does).

use std::path::PathBuf;

use anyhow::Result;

/// Mount a datastore with FUSE; runs until unmounted (fusermount3 -u) or interrupted.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Where to mount it (an existing empty folder).
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub daemon: super::serve::DaemonArgs,
}

pub fn run(a: Args) -> Result<()> {
    super::serve::run(super::serve::Args {
        dir: a.dir,
        nfs: None,
        mount: Some(a.mountpoint),
        export: None,
        read_only: false,
        allow: Vec::new(),
        portmap: 0,
        limits: Default::default(),
        daemon: a.daemon,
    })
}

/// Kernel readahead for the mount (KiB). FUSE starts at 128 KiB; sequential reads of VM images
/// go about 1.5x faster with 1 MiB requests (fewer round trips, bigger coalesced pack reads).
const READAHEAD_KB: u32 = 1024;

/// Raise the mount's readahead through its backing-device entry in sysfs (best effort: needs
/// root). Runs on its own thread because `stat` of the mount point waits for the session.
pub(super) fn raise_readahead(mnt: PathBuf) {
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
