use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::context::RPCContext;
use crate::rpcwire::{COALESCE_BYTES, SocketMessageHandler, write_replies};
use crate::transaction_tracker::{Cleaner, TransactionTracker};
use crate::units::KIBIBYTE;
use crate::vfs::adapters::ReadOnlyAdapter;
use crate::vfs::{NfsFileSystem, NfsReadFileSystem};

/// A NFS Tcp Connection Handler
pub struct NFSTcpListener<T: NfsFileSystem + 'static> {
    listener: TcpListener,
    port: u16,
    arcfs: Arc<T>,
    mount_signal: Option<mpsc::Sender<bool>>,
    export_name: Arc<String>,
    transaction_tracker: Arc<TransactionTracker>,
    file_handle_converter: crate::vfs::handle::FileHandleConverter,
    stop_notify: Arc<tokio::sync::Notify>,
    // Tessera patch: which peers may connect (None: all)
    client_filter: Option<ClientFilter>,
    // Tessera patch: connections served at once, and their stall limits
    max_connections: usize,
    limits: ConnectionLimits,
}

/// Tessera patch: decides from the peer address whether a connection is served.
pub type ClientFilter = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

impl<T: NfsFileSystem + 'static> Drop for NFSTcpListener<T> {
    fn drop(&mut self) {
        self.stop_notify.notify_waiters();
    }
}

#[must_use]
pub fn generate_host_ip(hostnum: u16) -> String {
    format!(
        "127.88.{}.{}",
        ((hostnum >> 8) & 0xFF) as u8,
        (hostnum & 0xFF) as u8
    )
}

/// Tessera patch: how long a connection may stall before it is dropped.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// A reply the socket accepts no byte of for this long drops the connection (the
    /// client stopped reading, or is gone without a reset).
    pub write_stall: Duration,
    /// A connection that sends nothing for this long while it has no call outstanding is
    /// closed (a dead client); clients reconnect on their own.
    pub idle: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            write_stall: Duration::from_secs(60),
            idle: Duration::from_secs(15 * 60),
        }
    }
}

/// Tessera patch: concurrent connections served by default; more are closed at accept.
/// With `CONNECTION_BYTE_BUDGET` (32 MiB) each, replies and calls of all clients hold at
/// most about 8 GiB even in the worst case; a datastore has a handful of hypervisors.
pub const MAX_CONNECTIONS: usize = 256;

/// processes an established socket
// Tessera patch: only the test re-export uses it now; the listener passes its limits.
#[cfg_attr(not(feature = "__test_reexports"), allow(dead_code))]
pub(crate) async fn process_socket<IO, T>(
    socket: IO,
    context: RPCContext<T>,
) -> Result<(), anyhow::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    T: NfsFileSystem + 'static,
{
    process_socket_limited(socket, context, ConnectionLimits::default()).await
}

/// Tessera patch: reading calls and writing replies run side by side (upstream wrote
/// replies from the reading loop, so a reply the client did not read also stopped the
/// reading, and a reader waiting for call slots would have blocked the writes that free
/// them). Replies are written with a stall timeout and the connection closes when idle.
async fn process_socket_limited<IO, T>(
    socket: IO,
    context: RPCContext<T>,
    limits: ConnectionLimits,
) -> Result<(), anyhow::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    T: NfsFileSystem + 'static,
{
    let client = context.client_addr.clone();
    let (mut message_handler, mut msgrecvchan) = SocketMessageHandler::new(context.clone());
    let calls = message_handler.call_probe();
    let (rd, mut wr) = tokio::io::split(socket);
    // Tessera patch: the calls are read from the socket through one buffer, by this loop
    // (upstream read the socket here and piped the bytes to a message loop on another task).
    let reading = async {
        let mut input = tokio::io::BufReader::with_capacity(128 * KIBIBYTE as usize, rd);
        loop {
            // Wait for the first byte of a call; `fill_buf` consumes nothing, so the idle
            // timeout may cancel it without losing data.
            match tokio::time::timeout(limits.idle, input.fill_buf()).await {
                Err(_) if calls.idle() => {
                    info!(
                        "closing the connection from {client}: no call for {} s",
                        limits.idle.as_secs()
                    );
                    return Ok(());
                }
                Err(_) => continue,
                Ok(Ok(b)) if b.is_empty() => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(ref e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(Err(e)) => {
                    debug!("Message handling closed : {e}");
                    return Err(e.into());
                }
            }
            // The rest of the record. Part of it is consumed as it arrives, so a client
            // that stalls inside a record for the idle limit is dropped, not waited on.
            let record =
                match tokio::time::timeout(limits.idle, message_handler.read_record(&mut input))
                    .await
                {
                    Err(_) => {
                        info!(
                            "closing the connection from {client}: a call stalled for {} s",
                            limits.idle.as_secs()
                        );
                        return Ok(());
                    }
                    Ok(Err(e)) => {
                        // A malformed or oversized record: the connection is useless after it.
                        debug!("Message loop broken due to {e}");
                        return Err(e);
                    }
                    Ok(Ok(r)) => r,
                };
            message_handler.dispatch(record).await?;
        }
    };
    let writing = async {
        loop {
            match msgrecvchan.recv().await {
                Some(Err(e)) => {
                    debug!("Message handling closed : {e}");
                    return Err(e);
                }
                Some(Ok(first)) => {
                    // Tessera patch: the replies already queued go out in one write (up to
                    // COALESCE_BYTES), each record with its header: upstream wrote a header
                    // and a body per reply, two syscalls and often two TCP segments for a
                    // 4 KiB WRITE's reply, a large share of the server's CPU at deep queues.
                    // Tessera patch: when no other reply is queued yet, give the runtime one
                    // turn first: the reading side parses the calls already received and
                    // dispatches them, and those that finish at once (most WRITEs land in the
                    // write-back buffer) queue their replies to share this write. Without it
                    // nearly every write carried one reply under qemu's QD16 (3.4 with it),
                    // and each write costs a loopback TCP send, the client's wake-up and its
                    // read. The turn costs a reply that is alone (QD1) a few microseconds.
                    if msgrecvchan.is_empty() {
                        tokio::task::yield_now().await;
                    }
                    let mut batch = vec![first];
                    let mut bytes = batch[0].reply.wire_len();
                    let mut failed = None;
                    while bytes < COALESCE_BYTES {
                        match msgrecvchan.try_recv() {
                            Ok(Ok(r)) => {
                                bytes += r.reply.wire_len();
                                batch.push(r);
                            }
                            Ok(Err(e)) => {
                                failed = Some(e);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // Upstream logged a failed write and went on, with a partial record
                    // on the wire; the connection is useless after it.
                    if let Err(e) = write_replies(&mut wr, &mut batch, limits.write_stall).await {
                        let stalled = e
                            .downcast_ref::<io::Error>()
                            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut);
                        if stalled {
                            warn!("dropping the connection from {client}: {e}");
                        } else {
                            debug!("connection from {client} failed: {e}");
                        }
                        return Err(e);
                    }
                    // the replies have left for the socket: their slots and bytes are free
                    drop(batch);
                    if let Some(e) = failed {
                        debug!("Message handling closed : {e}");
                        return Err(e);
                    }
                }
                None => {
                    return Err(anyhow::anyhow!("Unexpected socket context termination"));
                }
            }
        }
    };
    tokio::select! {
        r = reading => r,
        w = writing => w,
    }
}

pub trait NFSTcp: Send + Sync {
    /// Gets the true listening port. Useful if the bound port number is 0
    fn get_listen_port(&self) -> u16;

    /// Gets the true listening IP. Useful on windows when the IP may be random
    fn get_listen_ip(&self) -> IpAddr;

    /// Sets a mount listener. A "true" signal will be sent on a mount
    /// and a "false" will be sent on an unmount
    fn set_mount_listener(&mut self, signal: mpsc::Sender<bool>);

    /// Loops forever and never returns handling all incoming connections.
    fn handle_forever(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl<RO> NFSTcpListener<ReadOnlyAdapter<RO>>
where
    RO: NfsReadFileSystem + 'static,
{
    /// Create a new `NFSTcpListener` with a read-only file system.
    ///
    /// It binds to a ipstr of the form [ip address]:port. For instance,
    /// "127.0.0.1:12000". `fs` is an instance of an implementation
    /// of [`NfsReadFileSystem`].
    pub async fn bind_ro(ipstr: &str, fs: RO) -> io::Result<Self> {
        Self::bind(ipstr, ReadOnlyAdapter::new(fs)).await
    }
}

impl<T: NfsFileSystem + 'static> NFSTcpListener<T> {
    /// Create a new `NFSTcpListener`.
    ///
    /// It binds to a ipstr of the form [ip address]:port. For instance,
    /// "127.0.0.1:12000". `fs` is an instance of an implementation
    /// of [`NfsFileSystem`].
    pub async fn bind(ipstr: &str, fs: T) -> io::Result<Self> {
        Self::bind_inner(ipstr, fs, None).await
    }

    /// Create a new `NFSTcpListener` with a specific generation number.
    ///
    /// The generation number is embedded in file handles and used to detect
    /// stale handles from previous server instances. When multiple NFS server
    /// instances share the same generation number, file handles remain valid
    /// across all instances (e.g. behind a load balancer).
    pub async fn bind_with_generation(
        ipstr: &str,
        fs: T,
        generation_number: u64,
    ) -> io::Result<Self> {
        Self::bind_inner(ipstr, fs, Some(generation_number)).await
    }

    async fn bind_inner(ipstr: &str, fs: T, generation_number: Option<u64>) -> io::Result<Self> {
        let (ip, port) = ipstr.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "IP Address must be of form ip:port",
            )
        })?;
        let port = port.parse::<u16>().map_err(|_| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "Port not in range 0..=65535",
            )
        })?;

        let arcfs: Arc<T> = Arc::new(fs);

        if ip == "auto" {
            let mut num_tries_left = 32;

            for try_ip in 1u16.. {
                let ip = generate_host_ip(try_ip);

                let result = Self::bind_internal(&ip, port, arcfs.clone(), generation_number).await;

                match result {
                    Err(_) => {
                        if num_tries_left == 0 {
                            return result;
                        }
                        num_tries_left -= 1;
                    }
                    Ok(_) => {
                        return result;
                    }
                }
            }
            unreachable!(); // Does not detect automatically that loop above never terminates.
        } else {
            // Otherwise, try this.
            Self::bind_internal(ip, port, arcfs, generation_number).await
        }
    }

    async fn bind_internal(
        ip: &str,
        port: u16,
        arcfs: Arc<T>,
        generation_number: Option<u64>,
    ) -> io::Result<Self> {
        let ipstr = format!("{ip}:{port}");
        let listener = TcpListener::bind(&ipstr).await?;
        info!("Listening on {:?}", &ipstr);

        let port = match listener.local_addr().expect("failed to get local address") {
            SocketAddr::V4(s) => s.port(),
            SocketAddr::V6(s) => s.port(),
        };

        let file_handle_converter = generation_number.map_or_else(
            crate::vfs::handle::FileHandleConverter::new,
            crate::vfs::handle::FileHandleConverter::with_generation_number,
        );

        Ok(Self {
            listener,
            port,
            arcfs,
            mount_signal: None,
            export_name: Arc::from("/".to_string()),
            transaction_tracker: Self::new_transaction_tracker(),
            stop_notify: Arc::new(tokio::sync::Notify::new()),
            file_handle_converter,
            client_filter: None,
            max_connections: MAX_CONNECTIONS,
            limits: ConnectionLimits::default(),
        })
    }

    fn new_transaction_tracker() -> Arc<TransactionTracker> {
        const TRANSACTION_LIFETIME: Duration = Duration::from_secs(60);
        const MAX_ACTIVE_TRANSACTIONS: u16 = 256;
        const TRANSACTION_TRIM_THRESHOLD: usize = 2048;

        Arc::new(TransactionTracker::new(
            TRANSACTION_LIFETIME,
            MAX_ACTIVE_TRANSACTIONS,
            TRANSACTION_TRIM_THRESHOLD,
        ))
    }

    /// Tessera patch: serve only connections whose peer address passes
    /// `filter`; others are closed at once, before any RPC is read.
    pub fn with_client_filter(&mut self, filter: ClientFilter) {
        self.client_filter = Some(filter);
    }

    /// Tessera patch: serve at most `max` connections at once (default
    /// `MAX_CONNECTIONS`); more are closed at accept and logged.
    pub fn with_max_connections(&mut self, max: usize) {
        self.max_connections = max;
    }

    /// Tessera patch: the stall and idle limits of each connection.
    pub fn with_connection_limits(&mut self, limits: ConnectionLimits) {
        self.limits = limits;
    }

    /// Sets an optional NFS export name.
    ///
    /// - `export_name`: The desired export name without slashes.
    ///
    /// Example: Name `foo` results in the export path `/foo`.
    /// Default path is `/` if not set.
    pub fn with_export_name<S: AsRef<str>>(&mut self, export_name: S) {
        self.export_name = Arc::new(format!(
            "/{}",
            export_name
                .as_ref()
                .trim_end_matches('/')
                .trim_start_matches('/')
        ));
    }
}

impl<T: NfsFileSystem + 'static> NFSTcp for NFSTcpListener<T> {
    /// Gets the true listening port. Useful if the bound port number is 0
    fn get_listen_port(&self) -> u16 {
        let addr = self
            .listener
            .local_addr()
            .expect("failed to get local address");
        addr.port()
    }

    fn get_listen_ip(&self) -> IpAddr {
        let addr = self
            .listener
            .local_addr()
            .expect("failed to get local address");
        addr.ip()
    }

    /// Sets a mount listener. A "true" signal will be sent on a mount
    /// and a "false" will be sent on an unmount
    fn set_mount_listener(&mut self, signal: mpsc::Sender<bool>) {
        self.mount_signal = Some(signal);
    }

    /// Loops forever and never returns handling all incoming connections.
    async fn handle_forever(&self) -> io::Result<()> {
        let cleaner_future = Cleaner::new(
            self.transaction_tracker.clone(),
            Duration::from_secs(10),
            Arc::clone(&self.stop_notify),
        )
        .run();
        tokio::spawn(cleaner_future);
        // Tessera patch: one permit per connection being served.
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_connections));

        loop {
            // Tessera patch: an accept error (EMFILE, ECONNABORTED...) must not
            // end the server; upstream returned it and stopped serving.
            let (socket, peer) = match self.listener.accept().await {
                Ok(ok) => ok,
                Err(e) => {
                    error!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Some(filter) = &self.client_filter {
                if !filter(peer.ip()) {
                    tracing::warn!("refusing a connection from {peer}: not in the allowed clients");
                    drop(socket);
                    continue;
                }
            }
            // Tessera patch: a cap on connections, so many clients (or one opening
            // connections in a loop) cannot exhaust memory or file descriptors.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(
                    "refusing a connection from {peer}: {} connections already open (the limit)",
                    self.max_connections
                );
                drop(socket);
                continue;
            };
            let context = RPCContext {
                local_port: self.port,
                client_addr: peer.to_string(),
                auth: nfs3_types::rpc::auth_unix::default(),
                vfs: self.arcfs.clone(),
                mount_signal: self.mount_signal.clone(),
                export_name: self.export_name.clone(),
                transaction_tracker: self.transaction_tracker.clone(),
                file_handle_converter: self.file_handle_converter,
            };
            info!("Accepting connection from {}", context.client_addr);
            debug!("Accepting socket {:?} {:?}", socket, context);
            let limits = self.limits;
            tokio::spawn(async move {
                let _ = socket.set_nodelay(true);
                let _ = process_socket_limited(socket, context, limits).await;
                drop(slot);
            });
        }
    }
}
