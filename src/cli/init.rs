//! `tessera init`: create a datastore.

use std::path::PathBuf;

use anyhow::{anyhow, Result};

use tessera::fs::{Engine, Format, FsError};

/// Create a new, empty datastore in a folder.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder to create the datastore in (must be empty or absent).
    pub dir: PathBuf,
    /// Chunk size: the unit of dedup, a power of two from 4K to 64K.
    #[arg(long, default_value = "16K", value_parser = super::parse_size)]
    pub chunk_size: u32,
    /// zstd compression level for new chunks (1 = fastest, 19 = smallest).
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
}

pub fn run(a: Args) -> Result<()> {
    let format = Format {
        chunk_size: a.chunk_size,
        zstd_level: a.zstd_level,
    };
    Engine::create(&a.dir, format).map_err(|e| match e {
        FsError::Exists => anyhow!(
            "{} is not empty; choose a new or empty folder",
            a.dir.display()
        ),
        e => anyhow!("cannot create datastore in {}: {e}", a.dir.display()),
    })?;
    println!(
        "created datastore {} (chunk size {} KiB, zstd level {}); mount it with: tessera mount {} MOUNTPOINT",
        a.dir.display(),
        a.chunk_size / 1024,
        a.zstd_level,
        a.dir.display()
    );
    Ok(())
}
