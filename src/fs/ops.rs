//! Requests by front end (NFS, FUSE) and kind: counts, errors, latency histograms and bytes
//! moved, recorded by the front ends and exposed by `tessera serve --metrics`. The engine only
//! holds them, so both front ends record into one place and the exporter reads one place.

use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Which front end served a request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum FrontEnd {
    Nfs,
    Fuse,
}

/// Direction of data moved by reads and writes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    Read,
    Write,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub frontend: FrontEnd,
    /// The request's kind (`read`, `write`, `commit`, `lookup`...): a fixed, small set.
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub frontend: FrontEnd,
    pub direction: Direction,
}

/// Latency buckets in seconds: 10 us to about 10 s, a factor of 4 apart (11 buckets, so a
/// family of 30 kinds over 2 front ends stays a few hundred series).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 4.0, 11))
}

/// The counters; cheap to clone (each family and counter is shared).
#[derive(Clone)]
pub struct Ops {
    pub requests: Family<OpLabels, Counter>,
    pub errors: Family<OpLabels, Counter>,
    pub latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub bytes: Family<BytesLabels, Counter>,
    /// Background and requested work, counted as it is done (progress for dashboards).
    pub chunks_written: Counter,
    pub dedup_hits: Counter,
    pub gc_packs: Counter,
    pub gc_moved_bytes: Counter,
    pub gc_freed_bytes: Counter,
    pub scrub_chunks: Counter,
    pub scrub_damaged: Counter,
}

/// A snapshot of the work counters of [`Ops`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    pub chunks_written: u64,
    pub dedup_hits: u64,
    pub gc_packs: u64,
    pub gc_moved_bytes: u64,
    pub gc_freed_bytes: u64,
    pub scrub_chunks: u64,
    pub scrub_damaged: u64,
}

impl Default for Ops {
    fn default() -> Self {
        Ops {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            bytes: Family::default(),
            chunks_written: Counter::default(),
            dedup_hits: Counter::default(),
            gc_packs: Counter::default(),
            gc_moved_bytes: Counter::default(),
            gc_freed_bytes: Counter::default(),
            scrub_chunks: Counter::default(),
            scrub_damaged: Counter::default(),
        }
    }
}

impl Ops {
    /// Count one request of `op` on `frontend` that began at `started`.
    pub fn record(&self, frontend: FrontEnd, op: &'static str, started: Instant, ok: bool) {
        let l = OpLabels { frontend, op };
        self.requests.get_or_create(&l).inc();
        if !ok {
            self.errors.get_or_create(&l).inc();
        }
        self.latency
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn work(&self) -> Work {
        Work {
            chunks_written: self.chunks_written.get(),
            dedup_hits: self.dedup_hits.get(),
            gc_packs: self.gc_packs.get(),
            gc_moved_bytes: self.gc_moved_bytes.get(),
            gc_freed_bytes: self.gc_freed_bytes.get(),
            scrub_chunks: self.scrub_chunks.get(),
            scrub_damaged: self.scrub_damaged.get(),
        }
    }

    /// Count `n` bytes read or written through `frontend`.
    pub fn moved(&self, frontend: FrontEnd, direction: Direction, n: u64) {
        self.bytes
            .get_or_create(&BytesLabels {
                frontend,
                direction,
            })
            .inc_by(n);
    }
}
