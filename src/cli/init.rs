//! `tessera init`: create a datastore.

use std::path::PathBuf;

use anyhow::{anyhow, Result};

use tessera::fs::{Engine, Format, FsError};
use tessera::store::remote::{Remote, TierConfig};

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
    /// Keep the chunks in an S3-compatible bucket: s3://BUCKET/PREFIX. Writes land in the
    /// folder first; sealed packs are uploaded in the background and evicted locally once
    /// uploaded. Credentials: the AWS environment variables (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY) or --credentials-file; never on the command line.
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    pub store: Option<String>,
    #[command(flatten)]
    pub tier: TierArgs,
}

/// Where and how to reach an object store (`init --store`, `restore`).
#[derive(clap::Args, Debug)]
pub struct TierArgs {
    /// S3-compatible endpoint (MinIO, Ceph RGW, Garage): e.g. http://10.0.0.5:9000.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Region of the bucket (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    pub region: Option<String>,
    /// A file with aws_access_key_id and aws_secret_access_key under [default] (the AWS
    /// credentials file format); its path is saved in the datastore, its keys are not.
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,
    /// Local disk for packs already uploaded and for data read back from the bucket. Packs
    /// not yet uploaded stay whatever this says. (`--cache-size` here is the same option; on
    /// serve and mount that name is the RAM chunk cache.)
    #[arg(long, visible_alias = "cache-size", default_value = "10G", value_name = "SIZE", value_parser = super::parse_bytes)]
    pub disk_cache: u64,
    /// Upload bandwidth cap in MiB per second (0: none).
    #[arg(long, default_value_t = 0, value_name = "MIB_PER_S")]
    pub upload_rate: u64,
}

impl TierArgs {
    /// The configuration these options describe for `url`.
    pub fn config(&self, url: &str) -> Result<TierConfig> {
        let credentials_file = match &self.credentials_file {
            Some(f) => Some(
                std::fs::canonicalize(f)
                    .map_err(|e| anyhow!("cannot use credentials file {}: {e}", f.display()))?,
            ),
            None => None,
        };
        let cfg = TierConfig {
            url: url.to_string(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials_file,
            cache_bytes: self.disk_cache,
            upload_rate: self.upload_rate << 20,
            pack_bytes: 0,
            seal_idle_secs: 0,
        };
        cfg.bucket_prefix().map_err(|e| anyhow!("{e}"))?;
        Ok(cfg)
    }
}

pub fn run(a: Args) -> Result<()> {
    let format = Format {
        chunk_size: a.chunk_size,
        zstd_level: a.zstd_level,
    };
    let tier = match &a.store {
        Some(url) => Some(tier_config(&a, url)?),
        None if a.tier.endpoint.is_some()
            || a.tier.region.is_some()
            || a.tier.credentials_file.is_some() =>
        {
            return Err(anyhow!(
                "--endpoint, --region and --credentials-file need --store s3://BUCKET/PREFIX"
            ))
        }
        None => None,
    };
    Engine::create_with_tier(&a.dir, format, tier.as_ref()).map_err(|e| match e {
        FsError::Exists => anyhow!(
            "{} is not empty; choose a new or empty folder",
            a.dir.display()
        ),
        e => anyhow!("cannot create datastore in {}: {e}", a.dir.display()),
    })?;
    if let Some(t) = &tier {
        println!(
            "chunks of {} are kept in {} (local disk cache {})",
            a.dir.display(),
            t.url,
            super::stats::human(t.cache_bytes)
        );
    }
    println!(
        "created datastore {} (chunk size {} KiB, zstd level {}); mount it with: tessera mount {} MOUNTPOINT",
        a.dir.display(),
        a.chunk_size / 1024,
        a.zstd_level,
        a.dir.display()
    );
    Ok(())
}

/// The tier of `--store`, checked against the bucket: reachable with these credentials, and
/// not already holding another datastore.
fn tier_config(a: &Args, url: &str) -> Result<TierConfig> {
    let cfg = a.tier.config(url)?;
    let remote = Remote::connect(&cfg).map_err(|e| anyhow!("{e}"))?;
    let held = remote.list("").map_err(|e| {
        anyhow!("cannot reach {url}: {e}; check the bucket name, --endpoint and the credentials")
    })?;
    if !held.is_empty() {
        return Err(anyhow!(
            "{url} already holds {} objects (another datastore?): choose an empty prefix, or \
             rebuild that datastore from it with tessera restore",
            held.len()
        ));
    }
    Ok(cfg)
}
