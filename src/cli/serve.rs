//! `tessera serve`: one process owns a datastore and serves it over NFSv3 (with a
//! portmapper), on a FUSE mount point, or both at once, in the foreground. `tessera mount`
//! is `serve` with a mount point only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use nfs3_server::tcp::{ConnectionLimits, NFSTcp, NFSTcpListener};
use tessera::control::{self, LockError};
use tessera::fs::InodeId;
use tessera::fs::{Engine, Tuning, META_BACKUP, META_FILE};
use tessera::fuse::{config, TesseraFuse};
use tessera::nfs::allow::{AllowList, Net};
use tessera::nfs::portmap::{self, Services};
use tessera::nfs::{PeerCaches, TesseraNfs};

/// The FUSE mount's kernel caches, told about changes made over NFS. Errors are ignored:
/// the kernel answers ENOENT for what it has not cached.
struct FuseCaches(fuser::Notifier);

impl PeerCaches for FuseCaches {
    fn inode(&self, ino: InodeId) {
        // offset 0, length 0: attributes and all cached data of the inode
        let _ = self.0.inval_inode(fuser::INodeNo(ino.0), 0, 0);
    }

    fn entry(&self, parent: InodeId, name: &[u8]) {
        use std::os::unix::ffi::OsStrExt;
        let _ = self
            .0
            .inval_entry(fuser::INodeNo(parent.0), std::ffi::OsStr::from_bytes(name));
    }
}

/// Serve a datastore over NFSv3 and/or FUSE until interrupted (Ctrl-C, SIGTERM).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The datastore folder.
    pub dir: PathBuf,
    /// Export over NFSv3 on this address (default 127.0.0.1:2049: loopback only, so a
    /// datastore is never exposed by accident).
    #[arg(long, value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:2049")]
    pub nfs: Option<SocketAddr>,
    /// Also mount the datastore with FUSE on this folder.
    #[arg(long, value_name = "DIR")]
    pub mount: Option<PathBuf>,
    /// NFS export path clients mount (default: / and the datastore folder's name).
    #[arg(long, value_name = "PATH")]
    pub export: Option<String>,
    /// Export read-only: writes, creates and removes answer NFS3ERR_ROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Serve only these clients (address or network, e.g. 10.0.0.0/8; repeatable).
    /// Default: every client that can reach the NFS address.
    #[arg(long, value_name = "NET")]
    pub allow: Vec<Net>,
    /// Portmapper port on the NFS address, TCP and UDP (0: none). Clients that take
    /// nfs://HOST/path URLs (qemu, libnfs, ESXi) ask it where NFS is.
    #[arg(long, default_value_t = 111, value_name = "PORT")]
    pub portmap: u16,
    /// Threads serving NFS calls (default: one fewer than the cores, at least one, so the
    /// background flusher, which hashes and stores what the calls wrote, keeps a core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub nfs_threads: Option<u16>,
    #[command(flatten)]
    pub limits: NfsLimits,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Per-connection limits of the NFS server. Hidden: the defaults suit any datastore; tests
/// lower them to check them in seconds.
#[derive(clap::Args, Debug, Clone)]
pub struct NfsLimits {
    /// NFS connections served at once; more are closed at accept and logged.
    #[arg(long, default_value_t = nfs3_server::tcp::MAX_CONNECTIONS, hide = true)]
    pub nfs_max_connections: usize,
    /// Seconds an NFS reply may wait without the client reading a byte before its
    /// connection is dropped.
    #[arg(long, default_value_t = 60, hide = true, value_name = "SECONDS")]
    pub nfs_write_timeout: u64,
    /// Seconds an NFS connection with no call outstanding may stay silent before it is
    /// closed (and a call may stall half-sent).
    #[arg(long, default_value_t = 15 * 60, hide = true, value_name = "SECONDS")]
    pub nfs_idle_timeout: u64,
}

impl Default for NfsLimits {
    fn default() -> Self {
        NfsLimits {
            nfs_max_connections: nfs3_server::tcp::MAX_CONNECTIONS,
            nfs_write_timeout: 60,
            nfs_idle_timeout: 15 * 60,
        }
    }
}

/// Options of a serving process, shared by `serve` and `mount`.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Receive replicas from other datastores' `tessera replicate` on this address (default
    /// 127.0.0.1:9479: loopback only). `--allow` of `serve` applies to it too.
    #[arg(long, value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:9479")]
    pub replication: Option<SocketAddr>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Seconds between background flushes of written data (durable commits).
    #[arg(long, default_value_t = 5)]
    pub flush_interval: u64,
    /// Seconds between checks for space to reclaim in the background (0: only `tessera gc`).
    #[arg(long, default_value_t = 60)]
    pub gc_interval: u64,
    /// Most MiB per second background reclamation copies (0: unlimited).
    #[arg(long, default_value_t = 64, value_name = "MIB_PER_S")]
    pub gc_rate: u64,
    /// Memory for the read cache of decompressed, verified chunks, shared by every file: size
    /// it to the golden images' boot working set so a boot storm of clones reads each block
    /// from disk once (`tessera warm` preloads it). Examples: 512M, 2G.
    #[arg(long, default_value = "48M", value_name = "SIZE", value_parser = super::parse_bytes)]
    pub cache_size: u64,
    /// Memory for the metadata's page cache (chunk maps and the chunk index): each flush
    /// copies the pages it changes, and pages not in the cache are read back first. More
    /// desktops writing at once touch more of them. Examples: 96M, 256M.
    #[arg(long, default_value = "96M", value_name = "SIZE", value_parser = super::parse_bytes)]
    pub meta_cache_size: u64,
    /// Store new data uncompressed while less than this much waits for compression, and
    /// compress it in the background once its packs have been idle 10 minutes (or at once
    /// with `tessera gc`): a copy onto the datastore runs at the speed of hashing instead of
    /// zstd's. Past it (or an eighth of the free disk), data is compressed as it is written.
    /// 0 compresses everything at once. Examples: 4G, 0.
    #[arg(long, default_value = "4G", value_name = "SIZE", value_parser = super::parse_bytes)]
    pub raw_backlog: u64,
    /// Written file data held in memory before it is flushed to packs, all files together.
    /// More makes each flush transaction cover more chunks (cheaper per chunk) at about as
    /// much more resident memory; writers wait for the flusher past it. Examples: 96M, 256M.
    #[arg(long, default_value = "96M", value_name = "SIZE", value_parser = parse_dirty_limit)]
    pub dirty_limit: u64,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (default 127.0.0.1:9477: loopback
    /// only; give an address of a private network for a Prometheus server elsewhere).
    #[arg(long, value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:9477")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// The smallest `--dirty-limit` (bytes): below it a write of a few chunks would wait for the
/// flusher every time (its batches are at least 64 chunks anyway).
const MIN_DIRTY_LIMIT: u64 = 1 << 20;

impl DaemonArgs {
    /// The engine's run-time tuning these options ask for.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            cache_bytes: self.cache_size,
            meta_cache_bytes: self.meta_cache_size,
            raw_backlog: self.raw_backlog,
            dirty_limit: self.dirty_limit,
            ..Tuning::default()
        }
    }
}

/// `--dirty-limit`: a size of at least [`MIN_DIRTY_LIMIT`].
fn parse_dirty_limit(s: &str) -> Result<u64, String> {
    let n = super::parse_bytes(s)?;
    if n < MIN_DIRTY_LIMIT {
        return Err(format!(
            "{s:?} is too small for the write-back buffer (give at least 1M; default 96M)"
        ));
    }
    Ok(n)
}

/// The export path for `--export` (or the datastore folder's name).
fn export_name(a: &Args, dir: &std::path::Path) -> String {
    let raw = match &a.export {
        Some(e) => e.clone(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    format!("/{}", raw.trim_matches('/'))
}

pub fn run(a: Args) -> Result<()> {
    if a.nfs.is_none() && a.mount.is_none() {
        bail!("nothing to serve: give --nfs [ADDR:PORT], --mount DIR, or both");
    }
    let dir = super::datastore_arg(&a.dir)?;
    let mnt = match &a.mount {
        Some(m) => {
            let mnt = std::fs::canonicalize(m).with_context(|| {
                format!(
                    "mount point {} does not exist; create it first",
                    m.display()
                )
            })?;
            if !mnt.is_dir() {
                bail!("mount point {} is not a folder", mnt.display());
            }
            Some(mnt)
        }
        None => None,
    };
    let _lock = control::lock(&dir).map_err(|e| match e {
        LockError::Busy(pid) => anyhow!(
            "datastore {} is already in use by process {pid}",
            dir.display()
        ),
        e => anyhow!("{e}"),
    })?;
    let tmp = dir.join(format!("{META_BACKUP}.tmp"));
    // A failed copy (a full disk, say) must not keep the datastore from being served, which
    // is how deletes and compaction free space: the previous backup stays.
    let copied = match copy_synced(&dir.join(META_FILE), &tmp) {
        Ok(()) => true,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("cannot refresh the metadata backup {META_BACKUP}: {e}");
            false
        }
    };
    let engine = match Engine::open(&dir, a.daemon.tuning()) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            bail!("cannot open datastore {}: {e}", dir.display());
        }
    };
    // It opened: the copy becomes the backup an admin restores if the file is ever damaged.
    if copied {
        std::fs::rename(&tmp, dir.join(META_BACKUP))?;
        std::fs::File::open(&dir)?.sync_all()?;
    }
    let _flusher = engine.spawn_flusher(Duration::from_secs(a.daemon.flush_interval.max(1)));
    // An S3-backed datastore: the metadata goes into the bucket too, so the bucket alone
    // restores it (`tessera restore`).
    let _backups = engine.spawn_metadata_backups(tessera::fs::tier_backup::BACKUP_EVERY);
    if a.daemon.gc_interval > 0 {
        let d = &a.daemon;
        let rate = (d.gc_rate > 0).then_some(d.gc_rate << 20);
        engine.spawn_reclaimer(Duration::from_secs(d.gc_interval), rate);
    }
    // Scheduled snapshots (`tessera snapshot schedule`) and replication (`tessera replicate
    // --every`): checked twice a minute, the finest interval a schedule takes being one minute.
    let _snapshots = engine.spawn_snapshot_scheduler(Duration::from_secs(30));
    let _replication = tessera::replicate::spawn_scheduler(&engine, Duration::from_secs(30));
    if let Some(addr) = a.daemon.replication {
        let at = tessera::replicate::serve(engine.clone(), addr, AllowList(a.allow.clone()))
            .with_context(|| format!("cannot receive replicas on {addr} (in use? choose another with --replication ADDR:PORT)"))?;
        tracing::info!("receiving replicas on {at}");
    }
    let sock =
        control::serve(engine.clone(), &dir).context("cannot listen on the control socket")?;
    let _metrics = match a.daemon.metrics {
        Some(addr) => {
            let t = tessera::metrics::spawn(&engine, addr).with_context(|| {
                format!("cannot serve metrics on {addr} (in use? choose another with --metrics ADDR:PORT)")
            })?;
            tracing::info!("metrics on http://{addr}/metrics");
            Some(t)
        }
        None => None,
    };

    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let mut session = match &mnt {
        Some(mnt) => Some(
            fuser::Session::new(
                TesseraFuse::new(engine.clone()),
                mnt,
                &config(&dir, a.daemon.threads),
            )
            .with_context(|| {
                format!(
                    "cannot mount on {} (is fuse3 installed and /dev/fuse usable?)",
                    mnt.display()
                )
            })?,
        ),
        None => None,
    };
    let mut unmounter = session.as_mut().map(|s| s.unmount_callable());
    // NFS runs on its own runtime; engine calls block, so workers hand off with
    // block_in_place and the blocking pool grows as calls wait on disk.
    let peer = session
        .as_ref()
        .map(|s| Arc::new(FuseCaches(s.notifier())) as Arc<dyn PeerCaches>);
    let runtime = match a.nfs {
        Some(addr) => Some(start_nfs(&a, addr, &dir, engine.clone(), peer)?),
        None => None,
    };
    let flusher = engine.clone();
    std::thread::spawn(move || {
        let mut first = true;
        for _ in signals.forever() {
            if first {
                first = false;
                tracing::info!("signal received: stopping");
                if let Some(u) = unmounter.as_mut() {
                    if let Err(e) = u.unmount() {
                        tracing::error!(
                            "unmount failed: {e} (busy?); send the signal again to flush and exit anyway"
                        );
                    }
                }
                let _ = stop_tx.send(());
            } else {
                // The mount did not go away (a process keeps it busy): flush everything
                // written, make it durable, and exit without waiting for the FUSE session.
                tracing::warn!("second signal: flushing and exiting without the unmount");
                let code = match flusher.sync_all() {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!("final flush failed: {e}");
                        1
                    }
                };
                std::process::exit(code);
            }
        }
    });
    let fuse_result = match (session, &mnt) {
        (Some(session), Some(mnt)) => {
            raise_readahead(mnt.clone());
            tracing::info!("serving {} on {}", dir.display(), mnt.display());
            // Returns when unmounted, by a signal or by fusermount3 -u; NFS stops with it.
            session.run()
        }
        _ => {
            let _ = stop_rx.recv();
            Ok(())
        }
    };
    if let Some(rt) = runtime {
        // In-flight calls finish or are dropped; nothing acknowledged as stable depends on
        // them, and UNSTABLE data is flushed below before the verifier changes.
        rt.shutdown_timeout(Duration::from_secs(5));
    }
    let _ = std::fs::remove_file(&sock);
    engine
        .sync_all()
        .map_err(|e| anyhow!("final flush failed: {e}"))?;
    // Everything is durable; shrink the metadata file while nothing uses it (any size of
    // free space: the next open would otherwise find it).
    if let Err(e) = engine.compact_metadata(0) {
        tracing::warn!("cannot compact the metadata file: {e}");
    }
    // With an object-store tier, leave the bucket complete: every pack and the metadata;
    // then the deletes that backup let go (objects of compacted packs).
    match engine.backup_metadata() {
        Err(e) => tracing::error!(
            "cannot back the metadata up into the bucket at stop: {e}; the bucket lacks what \
             changed since the last backup until the datastore is served again"
        ),
        Ok(Some(_)) => {
            if !engine.finish_deletes(Duration::from_secs(10)) {
                tracing::warn!(
                    "objects of compacted packs are left in the bucket; the next compaction \
                     deletes them"
                );
            }
        }
        Ok(None) => {}
    }
    fuse_result.context("FUSE session failed")?;
    tracing::info!("stopped serving {}; all data flushed", dir.display());
    Ok(())
}

/// Copy `from` to `to` (private: mode 0600) and make the copy durable.
fn copy_synced(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(to);
    let mut out = tessera::private::open_options()
        .write(true)
        .create_new(true)
        .open(to)?;
    std::io::copy(&mut std::fs::File::open(from)?, &mut out)?;
    out.sync_all()
}

/// Cores this process may run on.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// NFS runtime workers for `cores` cores: one fewer, at least one. The flusher (and its pool)
/// does more CPU work per write than the call itself (loading, hashing and appending the
/// chunk, the commit): with a worker on every core as well, they take turns on the cores and
/// every turn is a context switch. On 2 cores one worker gave a lower write p99 in every one
/// of five alternated pairs (3.2-4.4 ms against 4.4-5.3 at QD16) for about the same IOPS; four
/// workers had given the same IOPS as two with a higher tail (benches/README.md, "NFS
/// workers"). Measured on 2 cores only.
fn nfs_workers(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

fn start_nfs(
    a: &Args,
    addr: SocketAddr,
    dir: &std::path::Path,
    engine: Arc<Engine>,
    peer: Option<Arc<dyn PeerCaches>>,
) -> Result<tokio::runtime::Runtime> {
    let workers = a
        .nfs_threads
        .map_or_else(|| nfs_workers(cores()), usize::from);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("nfs")
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the NFS runtime")?;
    let export = export_name(a, dir);
    let allow = AllowList(a.allow.clone());
    if allow.0.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!("exporting to every host that can reach {addr}; restrict with --allow NET");
    }
    let mut fs = TesseraNfs::new(engine.clone(), a.read_only);
    if let Some(peer) = peer {
        fs = fs.with_peer(peer);
    }
    let mut listener = rt
        .block_on(NFSTcpListener::bind_with_generation(
            &addr.to_string(),
            fs,
            engine.id(),
        ))
        .with_context(|| {
            format!(
                "cannot listen for NFS on {addr} (another NFS server, e.g. nfs-kernel-server or \
                 ganesha? give another --nfs ADDR:PORT)"
            )
        })?;
    listener.with_export_name(&export);
    listener.with_max_connections(a.limits.nfs_max_connections.max(1));
    listener.with_connection_limits(ConnectionLimits {
        write_stall: Duration::from_secs(a.limits.nfs_write_timeout.max(1)),
        idle: Duration::from_secs(a.limits.nfs_idle_timeout.max(1)),
    });
    let filter = allow.clone();
    listener.with_client_filter(Arc::new(move |ip: IpAddr| filter.allows(ip)));
    let nfs_port = listener.get_listen_port();
    if a.portmap != 0 {
        let pm = SocketAddr::new(addr.ip(), a.portmap);
        let svc = Services {
            nfs_port,
            pmap_port: a.portmap,
        };
        match rt.block_on(portmap::serve(pm, svc, allow)) {
            Ok(()) => tracing::info!("portmapper on {pm} (tcp, udp)"),
            Err(e) => tracing::warn!(
                "no portmapper on {pm}: {e}; clients must be given port {nfs_port} \
                 (is rpcbind running? stop it or pass --portmap 0)"
            ),
        }
    }
    let shown = if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        "all addresses".to_string()
    } else {
        addr.ip().to_string()
    };
    tracing::info!(
        "exporting {} as {export} over NFSv3 on {shown} port {nfs_port}{}",
        dir.display(),
        if a.read_only { " (read-only)" } else { "" }
    );
    rt.spawn(async move {
        if let Err(e) = listener.handle_forever().await {
            tracing::error!("NFS listener stopped: {e}");
        }
    });
    Ok(rt)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `tessera serve ds --nfs ARGS...`, parsed.
    fn serve(args: &[&str]) -> Result<Args, clap::Error> {
        let argv = ["tessera", "serve", "ds", "--nfs"].iter().chain(args);
        match super::super::Cli::try_parse_from(argv)?.cmd {
            super::super::Cmd::Serve(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn daemon(args: &[&str]) -> Result<DaemonArgs, clap::Error> {
        serve(args).map(|a| a.daemon)
    }

    /// Protects `--dirty-limit`: the size given reaches the engine, the default stays the
    /// 96 MiB the memory bound is measured with, and a size too small to flush is refused.
    #[test]
    fn dirty_limit_reaches_the_engine() {
        assert_eq!(daemon(&[]).unwrap().tuning().dirty_limit, 96 << 20);
        assert_eq!(Tuning::default().dirty_limit, 96 << 20);
        let t = daemon(&["--dirty-limit", "256M", "--cache-size", "1G"])
            .unwrap()
            .tuning();
        assert_eq!((t.dirty_limit, t.cache_bytes), (256 << 20, 1 << 30));
        let e = daemon(&["--dirty-limit", "4K"]).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
    }

    /// Protects `--meta-cache-size`: the default is the 96 MiB the memory bound and the
    /// 4-desktop pool were measured with (the engine's default too), and a size given reaches
    /// the engine.
    #[test]
    fn meta_cache_size_reaches_the_engine() {
        assert_eq!(daemon(&[]).unwrap().tuning().meta_cache_bytes, 96 << 20);
        assert_eq!(Tuning::default().meta_cache_bytes, 96 << 20);
        let t = daemon(&["--meta-cache-size", "256M"]).unwrap().tuning();
        assert_eq!(t.meta_cache_bytes, 256 << 20);
    }

    /// Protects the NFS runtime's size: one worker fewer than the cores (the flusher keeps
    /// one), never none, and `--nfs-threads` overrides it but cannot be 0.
    #[test]
    fn nfs_workers_leave_the_flusher_a_core() {
        assert_eq!(
            [1, 2, 4, 16].map(nfs_workers),
            [1, 1, 3, 15],
            "workers for 1, 2, 4, 16 cores"
        );
        assert_eq!(serve(&[]).unwrap().nfs_threads, None);
        assert_eq!(serve(&["--nfs-threads", "3"]).unwrap().nfs_threads, Some(3));
        assert!(serve(&["--nfs-threads", "0"]).is_err());
    }
}
