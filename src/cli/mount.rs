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
        nfs_threads: None,
        limits: Default::default(),
        daemon: a.daemon,
    })
}
