//! The object-store client of the S3 tier: where a datastore's bucket is (`TierConfig`, saved
//! in the datastore as `tier.json`), credentials, and blocking calls (multipart upload of a
//! pack file, ranged reads, listing, deletes, conditional puts) run on the tier's own small
//! async runtime, so the threads that serve NFS and FUSE never run object-store futures.

use std::future::Future;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    aws::AmazonS3Builder, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig, UpdateVersion,
};
use serde::{Deserialize, Serialize};

/// Name of the tier's configuration file in a datastore folder.
pub const TIER_FILE: &str = "tier.json";

/// Bytes per part of a multipart upload (S3's minimum is 5 MiB, except the last part).
const PART_BYTES: usize = 8 << 20;

/// Where a datastore's packs live beyond its disk, as `tessera init --store` recorded it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TierConfig {
    /// `s3://BUCKET/PREFIX`.
    pub url: String,
    /// An S3-compatible endpoint (MinIO, Ceph RGW, Garage, a test server); AWS when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A file with `aws_access_key_id` and `aws_secret_access_key` lines (the AWS credentials
    /// file format); without it, the usual AWS environment variables are used. Keys are
    /// never stored here or on the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// Local disk kept for packs that are uploaded and for ranges read back (bytes).
    pub cache_bytes: u64,
    /// Upload bandwidth cap (bytes per second; 0: none), so uploads leave the disk and the
    /// network to the desktops.
    #[serde(default)]
    pub upload_rate: u64,
    /// Pack size (bytes; 0: `tier::TIER_PACK_BYTES`). Smaller packs are uploaded sooner.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pack_bytes: u64,
    /// Seconds without appends after which the active pack is sealed and uploaded (0:
    /// `tier::SEAL_IDLE`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seal_idle_secs: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl TierConfig {
    pub fn load(ds: &Path) -> io::Result<Option<TierConfig>> {
        match std::fs::read(ds.join(TIER_FILE)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                io::Error::other(format!("{} is damaged: {e}", ds.join(TIER_FILE).display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, ds: &Path) -> io::Result<()> {
        let path = ds.join(TIER_FILE);
        let tmp = ds.join(format!("{TIER_FILE}.tmp"));
        {
            use std::io::Write;
            let mut f = crate::private::open_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(ds)?.sync_all()
    }

    /// Bucket and prefix of `url`.
    pub fn bucket_prefix(&self) -> io::Result<(String, String)> {
        parse_url(&self.url)
    }
}

/// `s3://BUCKET/PREFIX` -> (bucket, prefix without slashes at either end).
pub fn parse_url(url: &str) -> io::Result<(String, String)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{url:?} is not an object-store location: write s3://BUCKET/PREFIX"),
        )
    };
    let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad());
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// Access key and secret from an AWS-style credentials file (the `[default]` profile, or the
/// only keys in the file).
fn read_credentials(path: &Path) -> io::Result<(String, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read the credentials file {}: {e}", path.display()),
        )
    })?;
    let (mut key, mut secret, mut section) = (None, None, String::from("default"));
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        if section != "default" {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => key = Some(v.trim().to_string()),
                "aws_secret_access_key" => secret = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) => Ok((k, s)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the credentials file {} has no aws_access_key_id and aws_secret_access_key \
                 under [default]",
                path.display()
            ),
        )),
    }
}

/// Requests made, by kind (for `tessera stats` and the requests-per-GiB benchmark).
#[derive(Default, Debug)]
pub struct Requests {
    pub put: AtomicU64,
    pub get: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// A bucket prefix, reached through an [`ObjectStore`], with blocking calls.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    rt: tokio::runtime::Runtime,
    pub requests: Requests,
}

/// An object-store failure as an I/O error that names the object and says what to check.
fn io_err(what: &str, e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            io::ErrorKind::AlreadyExists
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("object store: {what}: {e}"))
}

impl Remote {
    /// The bucket of `cfg`, with credentials from its file or the AWS environment variables.
    pub fn connect(cfg: &TierConfig) -> io::Result<Remote> {
        let (bucket, prefix) = cfg.bucket_prefix()?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 10,
                retry_timeout: Duration::from_secs(120),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(60))
                    .with_connect_timeout(Duration::from_secs(10)),
            );
        if let Some(ep) = &cfg.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(r) = &cfg.region {
            b = b.with_region(r);
        } else if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if let Some(f) = &cfg.credentials_file {
            let (k, s) = read_credentials(f)?;
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        let store = b.build().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot use {}: {e}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                     give --credentials-file",
                    cfg.url
                ),
            )
        })?;
        Remote::new(Arc::new(store), &prefix, &cfg.url)
    }

    /// A prefix of any object store (tests use object_store's in-memory one).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> io::Result<Remote> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-s3")
            .enable_all()
            .build()?;
        Ok(Remote {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
            rt,
            requests: Requests::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(name)
        } else {
            ObjPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Run `f` on the tier's runtime and wait for it. Safe from any thread, a runtime's worker
    /// included: the waiting is a plain channel receive, not a nested `block_on`.
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("the object-store runtime is running")
    }

    /// Start `f` on the tier's runtime without waiting (prefetch).
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Upload the file at `src` as object `name`, in parts of [`PART_BYTES`], pausing between
    /// parts to stay under `rate` bytes per second (0: no cap). The object appears whole or
    /// not at all; a failed upload is aborted (no orphaned parts left billed).
    pub fn upload_file(&self, name: &str, src: &Path, rate: u64) -> io::Result<u64> {
        let mut file = std::fs::File::open(src)?;
        let path = self.path(name);
        let store = self.store.clone();
        let mut up = self
            .run(async move { store.put_multipart(&path).await })
            .map_err(|e| io_err(&format!("start upload of {name}"), e))?;
        self.requests.put.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        let result = (|| -> io::Result<()> {
            loop {
                let mut buf = vec![0u8; PART_BYTES];
                let mut n = 0;
                while n < buf.len() {
                    let r = file.read(&mut buf[n..])?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 && sent > 0 {
                    return Ok(());
                }
                buf.truncate(n);
                let part = up.put_part(PutPayload::from(buf));
                self.run(part)
                    .map_err(|e| io_err(&format!("upload part of {name}"), e))?;
                self.requests.put.fetch_add(1, Ordering::Relaxed);
                sent += n as u64;
                self.requests
                    .bytes_up
                    .fetch_add(n as u64, Ordering::Relaxed);
                if rate > 0 {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                if n < PART_BYTES {
                    return Ok(());
                }
            }
        })();
        match result {
            Ok(()) => {
                let done = self.run(async move {
                    let r = up.complete().await;
                    if r.is_err() {
                        let _ = up.abort().await;
                    }
                    r
                });
                self.requests.put.fetch_add(1, Ordering::Relaxed);
                done.map_err(|e| io_err(&format!("finish upload of {name}"), e))?;
                Ok(sent)
            }
            Err(e) => {
                let _ = self.run(async move { up.abort().await });
                Err(e)
            }
        }
    }

    /// Bytes `range` of object `name`.
    pub fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> io::Result<Bytes> {
        let (store, path) = (self.store.clone(), self.path(name));
        let want = range.end - range.start;
        let r = self.run(async move { store.get_range(&path, range).await });
        self.requests.get.fetch_add(1, Ordering::Relaxed);
        let b = r.map_err(|e| io_err(&format!("read {name}"), e))?;
        self.requests
            .bytes_down
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        if b.len() as u64 != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "object store: {name}: asked for {want} bytes, got {}",
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    /// A whole small object and its version (`None`: no such object).
    pub fn get(&self, name: &str) -> io::Result<Option<(Bytes, UpdateVersion)>> {
        let (store, path) = (self.store.clone(), self.path(name));
        let r = self.run(async move {
            let got = store.get(&path).await?;
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            Ok::<_, object_store::Error>((got.bytes().await?, version))
        });
        self.requests.get.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io_err(&format!("read {name}"), e)),
        }
    }

    /// Put a small object: always (`None`), only if absent (`Some(None)`), or only if still at
    /// `version` (`Some(Some(v))`). A lost race is `ErrorKind::AlreadyExists`.
    pub fn put(
        &self,
        name: &str,
        data: Vec<u8>,
        expect: Option<Option<UpdateVersion>>,
    ) -> io::Result<UpdateVersion> {
        let (store, path) = (self.store.clone(), self.path(name));
        let mode = match expect {
            None => PutMode::Overwrite,
            Some(None) => PutMode::Create,
            Some(Some(v)) => PutMode::Update(v),
        };
        let len = data.len() as u64;
        let r = self.run(async move {
            store
                .put_opts(&path, PutPayload::from(data), PutOptions::from(mode))
                .await
        });
        self.requests.put.fetch_add(1, Ordering::Relaxed);
        self.requests.bytes_up.fetch_add(len, Ordering::Relaxed);
        let r = r.map_err(|e| io_err(&format!("write {name}"), e))?;
        Ok(UpdateVersion {
            e_tag: r.e_tag,
            version: r.version,
        })
    }

    pub fn delete(&self, name: &str) -> io::Result<()> {
        let (store, path) = (self.store.clone(), self.path(name));
        let r = self.run(async move { store.delete(&path).await });
        self.requests.delete.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_err(&format!("delete {name}"), e)),
        }
    }

    /// Objects under `dir` (relative to the prefix): (name relative to the prefix, size).
    pub fn list(&self, dir: &str) -> io::Result<Vec<(String, u64)>> {
        let (store, path) = (self.store.clone(), self.path(dir));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let r = self.run(async move {
            let mut out = Vec::new();
            let mut s = store.list(Some(&path));
            while let Some(m) = s.next().await {
                let m = m?;
                out.push((m.location.to_string(), m.size));
            }
            Ok::<_, object_store::Error>(out)
        });
        self.requests.list.fetch_add(1, Ordering::Relaxed);
        let all = r.map_err(|e| io_err(&format!("list {}/{dir}", self.url), e))?;
        Ok(all
            .into_iter()
            .map(|(n, s)| (n.strip_prefix(&strip).unwrap_or(&n).to_string(), s))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(
            parse_url("s3://b/some/pre/").unwrap(),
            ("b".into(), "some/pre".into())
        );
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert!(parse_url("http://b/x").is_err());
        assert!(parse_url("s3:///x").is_err());
    }

    #[test]
    fn credentials_come_from_the_default_profile() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("creds");
        std::fs::write(
            &f,
            "[other]\naws_access_key_id = X\naws_secret_access_key = Y\n[default]\n\
             aws_access_key_id = AK\naws_secret_access_key = SK\n",
        )
        .unwrap();
        assert_eq!(read_credentials(&f).unwrap(), ("AK".into(), "SK".into()));
        std::fs::write(&f, "[default]\naws_access_key_id = AK\n").unwrap();
        assert!(read_credentials(&f).is_err());
    }

    #[test]
    fn uploads_reads_conditional_puts_and_lists_work_on_a_store() {
        let r = Remote::new(
            Arc::new(object_store::memory::InMemory::new()),
            "pre",
            "s3://mem/pre",
        )
        .unwrap();
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("p");
        let data: Vec<u8> = (0..(PART_BYTES * 2 + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&src, &data).unwrap();
        assert_eq!(
            r.upload_file("packs/1", &src, 0).unwrap(),
            data.len() as u64
        );
        assert_eq!(
            &r.get_range("packs/1", 10..PART_BYTES as u64 + 20).unwrap()[..],
            &data[10..PART_BYTES + 20]
        );
        assert_eq!(
            r.list("packs").unwrap(),
            vec![("packs/1".to_string(), data.len() as u64)]
        );
        let v = r.put("lease", b"a".to_vec(), Some(None)).unwrap();
        let again = r.put("lease", b"b".to_vec(), Some(None)).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        let v2 = r
            .put("lease", b"c".to_vec(), Some(Some(v.clone())))
            .unwrap();
        let stale = r.put("lease", b"d".to_vec(), Some(Some(v))).unwrap_err();
        assert_eq!(stale.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(r.get("lease").unwrap().unwrap().1, v2);
        r.delete("packs/1").unwrap();
        r.delete("packs/1").unwrap();
        assert!(r.list("packs").unwrap().is_empty());
        assert!(r.get("nothing").unwrap().is_none());
    }
}
