//! `tessera serve --metrics ADDR`: Prometheus metrics on `http://ADDR/metrics` (loopback by
//! default). Requests, errors, latency and bytes per front end and kind (`fs::ops`), where the
//! data path's CPU goes (`fs::timing`), the read cache, write-back fill, compaction and scrub
//! progress, and space, read from the engine at each scrape. No per-file labels: the series are
//! a fixed, small set whatever the datastore holds.
//!
//! The answer is the Prometheus text format, or OpenMetrics when the scraper asks for it
//! (`Accept: application/openmetrics-text`).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::fs::Engine;

/// Scrapes answered at most this often: each reads the engine's space figures, which walks the
/// inode table; a scraper asking faster gets the figures of the last scrape.
const MIN_SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// Figures read from the engine at each scrape.
#[derive(Debug)]
struct EngineFigures {
    engine: Weak<Engine>,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for EngineFigures {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(engine) = self.engine.upgrade() else {
            return Ok(());
        };
        let s = match engine.stats() {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!("metrics: cannot read the datastore's figures: {err}");
                return Ok(());
            }
        };
        for (name, help, v) in [
            (
                "tessera_logical_bytes",
                "Size of all files",
                s.logical_bytes,
            ),
            (
                "tessera_referenced_bytes",
                "Bytes of stored chunks the files refer to, before dedup",
                s.referenced_bytes,
            ),
            (
                "tessera_unique_bytes",
                "Bytes of distinct chunks, before compression",
                s.unique_bytes,
            ),
            (
                "tessera_stored_bytes",
                "Bytes of distinct chunks as stored (compressed)",
                s.stored_bytes,
            ),
            ("tessera_pack_bytes", "Bytes of pack files", s.pack_bytes),
            (
                "tessera_reclaimable_bytes",
                "Dead records in packs, given back by compaction",
                s.reclaimable_bytes,
            ),
            (
                "tessera_uncompressed_bytes",
                "Records stored uncompressed on the write path, compressed by compaction",
                s.uncompressed_bytes,
            ),
            (
                "tessera_metadata_bytes",
                "Size of the metadata file",
                s.metadata_bytes,
            ),
            (
                "tessera_folder_bytes",
                "Size of the datastore folder",
                s.folder_bytes,
            ),
            (
                "tessera_disk_free_bytes",
                "Free space on the datastore's disk",
                s.disk_free_bytes,
            ),
            (
                "tessera_disk_total_bytes",
                "Size of the datastore's disk",
                s.disk_total_bytes,
            ),
            (
                "tessera_dirty_bytes",
                "Written data not flushed yet (write-back buffer fill)",
                s.dirty_bytes,
            ),
            (
                "tessera_dirty_limit_bytes",
                "Write-back buffer size: writers wait for the flusher past it",
                engine.tuning().dirty_limit,
            ),
            ("tessera_cache_bytes", "Read cache fill", s.cache_bytes),
            (
                "tessera_cache_capacity_bytes",
                "Read cache size (--cache-size)",
                s.cache_capacity_bytes,
            ),
        ] {
            gauge(&mut e, name, help, v as f64)?;
        }
        gauge(&mut e, "tessera_files", "Files", s.files as f64)?;
        gauge(
            &mut e,
            "tessera_chunks",
            "Distinct chunks stored",
            s.chunk_count as f64,
        )?;
        gauge(
            &mut e,
            "tessera_dedup_ratio",
            "Referenced over unique bytes",
            s.dedup_ratio,
        )?;
        gauge(
            &mut e,
            "tessera_compression_ratio",
            "Unique over stored bytes",
            s.compression_ratio,
        )?;
        counter(
            &mut e,
            "tessera_cache_hits",
            "Chunk reads served by the read cache",
            s.cache_hits,
        )?;
        counter(
            &mut e,
            "tessera_cache_misses",
            "Chunks loaded from packs for reads",
            s.cache_misses,
        )?;
        counter(
            &mut e,
            "tessera_pack_read_bytes",
            "Bytes read from pack files to serve reads",
            s.pack_read_bytes,
        )?;
        let stages = engine.timings().snapshot();
        {
            let c = ConstCounter::new(0.0f64);
            let mut m = e.encode_descriptor(
                "tessera_stage_cpu_seconds",
                "CPU time of the data path per stage (write buffer, read-modify-write loads, reads, hashing, compression, appends, flush commits, durable commits: fsync and COMMIT)",
                None,
                c.metric_type(),
            )?;
            for st in &stages {
                ConstCounter::new(st.seconds)
                    .encode(m.encode_family(&[("stage", st.stage.as_str())])?)?;
            }
        }
        {
            let c = ConstCounter::new(0u64);
            let mut m = e.encode_descriptor(
                "tessera_stage_calls",
                "Calls per data path stage",
                None,
                c.metric_type(),
            )?;
            for st in &stages {
                ConstCounter::new(st.calls)
                    .encode(m.encode_family(&[("stage", st.stage.as_str())])?)?;
            }
        }
        let w = engine.ops.work();
        counter(
            &mut e,
            "tessera_chunks_written",
            "Chunks flushed by writers (before dedup)",
            w.chunks_written,
        )?;
        counter(
            &mut e,
            "tessera_dedup_hits",
            "Flushed chunks already stored (deduplicated)",
            w.dedup_hits,
        )?;
        counter(
            &mut e,
            "tessera_gc_packs_compacted",
            "Packs compacted (background and tessera gc)",
            w.gc_packs,
        )?;
        counter(
            &mut e,
            "tessera_gc_moved_bytes",
            "Bytes copied by compaction",
            w.gc_moved_bytes,
        )?;
        counter(
            &mut e,
            "tessera_gc_freed_bytes",
            "Pack bytes given back by compaction",
            w.gc_freed_bytes,
        )?;
        counter(
            &mut e,
            "tessera_scrub_chunks_checked",
            "Chunks verified by scrub",
            w.scrub_chunks,
        )?;
        counter(
            &mut e,
            "tessera_scrub_damaged",
            "Damaged chunks found by scrub",
            w.scrub_damaged,
        )?;
        Ok(())
    }
}

/// The registry of one engine.
pub fn registry(engine: &Arc<Engine>) -> Registry {
    let mut r = Registry::default();
    let ops = engine.ops.clone();
    r.register(
        "tessera_requests",
        "Requests served, by front end (nfs, fuse) and kind",
        ops.requests,
    );
    r.register(
        "tessera_request_errors",
        "Requests answered with an error, by front end and kind",
        ops.errors,
    );
    r.register(
        "tessera_request_duration_seconds",
        "Time to serve a request, by front end and kind",
        ops.latency,
    );
    r.register(
        "tessera_io_bytes",
        "Bytes read and written through each front end",
        ops.bytes,
    );
    r.register_collector(Box::new(EngineFigures {
        engine: Arc::downgrade(engine),
    }));
    r
}

/// Encode `registry`: OpenMetrics if `openmetrics`, else the Prometheus text format.
pub fn encode(registry: &Registry, openmetrics: bool) -> String {
    let mut out = String::new();
    let r = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
    };
    if let Err(e) = r {
        tracing::warn!("metrics: cannot encode: {e}");
    }
    out
}

/// Serve `GET /metrics` on `addr` from a thread of its own, until the engine is dropped (the
/// thread then stops at the next request or within a second).
pub fn spawn(
    engine: &Arc<Engine>,
    addr: SocketAddr,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let registry = registry(engine);
    let weak = Arc::downgrade(engine);
    std::thread::Builder::new()
        .name("tessera-metrics".into())
        .spawn(move || {
            let mut last: Option<(std::time::Instant, bool, String)> = None;
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                let req = match server.recv_timeout(Duration::from_secs(1)) {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!("metrics: {e}");
                        continue;
                    }
                };
                if req.url() != "/metrics" || *req.method() != tiny_http::Method::Get {
                    let _ = req.respond(
                        tiny_http::Response::from_string("metrics are at /metrics\n")
                            .with_status_code(404),
                    );
                    continue;
                }
                let openmetrics = req.headers().iter().any(|h| {
                    h.field.equiv("Accept")
                        && h.value.as_str().contains("application/openmetrics-text")
                });
                let body = match &last {
                    Some((t, om, b)) if t.elapsed() < MIN_SCRAPE_INTERVAL && *om == openmetrics => {
                        b.clone()
                    }
                    _ => {
                        let b = encode(&registry, openmetrics);
                        last = Some((std::time::Instant::now(), openmetrics, b.clone()));
                        b
                    }
                };
                let ctype = if openmetrics {
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                } else {
                    "text/plain; version=0.0.4; charset=utf-8"
                };
                let header =
                    tiny_http::Header::from_bytes("Content-Type", ctype).expect("a valid header");
                let _ = req.respond(tiny_http::Response::from_string(body).with_header(header));
            }
        })
}
