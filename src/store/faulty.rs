//! Tests only: an object store that fails on purpose. Every `every`-th request fails the way a
//! bad network or a struggling server does (a 500, a 503 Slow Down, a timeout, a reset, a cut
//! multipart upload), and every request can be slowed down (throttling), so the tier's tests show that nothing
//! acknowledged is lost, nothing wrong is read, and uploads resume.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result, UploadPart,
};

/// Shared fault switches.
#[derive(Debug, Default)]
pub struct Faults {
    /// Fail about one request in this many (0: none).
    pub every: AtomicU64,
    /// Milliseconds each request waits first (throttling).
    pub delay_ms: AtomicU64,
    count: AtomicU64,
    /// Requests failed so far.
    pub failed: AtomicU64,
}

impl Faults {
    fn strike(&self, what: &str) -> Result<()> {
        let every = self.every.load(Ordering::Relaxed);
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        // Pseudo-random (a hash of the request's number), so the failures do not fall in
        // step with a fixed pattern of requests and fail the same step every time.
        let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
        if every > 0 && h.is_multiple_of(every) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let source = match n % 4 {
                0 => "injected: 500 Internal Server Error",
                1 => "injected: operation timed out",
                2 => "injected: 503 Slow Down (throttled)",
                _ => "injected: connection reset by peer",
            };
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: format!("{what}: {source}").into(),
            });
        }
        Ok(())
    }

    async fn pause(&self) {
        let ms = self.delay_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// An in-memory store behind [`Faults`].
#[derive(Debug)]
pub struct Faulty {
    pub inner: Arc<InMemory>,
    pub faults: Arc<Faults>,
}

impl Faulty {
    pub fn new(every: u64) -> Faulty {
        let faults = Faults::default();
        faults.every.store(every, Ordering::Relaxed);
        Faulty {
            inner: Arc::new(InMemory::new()),
            faults: Arc::new(faults),
        }
    }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

/// A multipart upload whose parts (and completion) can fail: a cut upload.
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    faults: Arc<Faults>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        match self.faults.strike("upload part") {
            Ok(()) => self.inner.put_part(data),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.faults.pause().await;
        self.faults.strike("complete upload")?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.faults.pause().await;
        self.faults.strike("put")?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.faults.pause().await;
        self.faults.strike("start upload")?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            faults: self.faults.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.faults.pause().await;
        self.faults.strike("get")?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let faults = self.faults.clone();
        let inner = self.inner.clone();
        locations
            .then(move |l| {
                let (faults, inner) = (faults.clone(), inner.clone());
                async move {
                    let l = l?;
                    faults.pause().await;
                    faults.strike("delete")?;
                    let mut s = inner.delete_stream(futures::stream::iter([Ok(l)]).boxed());
                    s.next().await.expect("one result per location")
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.faults.strike("list") {
            Ok(()) => self.inner.list(prefix),
            Err(e) => futures::stream::iter([Err(e)]).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.faults.strike("list")?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.faults.strike("copy")?;
        self.inner.copy_opts(from, to, options).await
    }
}
