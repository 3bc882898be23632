use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use messages::{CompleteRpcMessage, HandleResult, IncomingRpcMessage, PackedRpcMessage};
use nfs3_types::rpc::{
    RPC_VERSION_2, accept_stat_data, auth_flavor, auth_stat, auth_unix, call_body, fragment_header,
};
use nfs3_types::xdr_codec::{Pack, Unpack};
use nfs3_types::{nfs3 as nfs, portmap};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit, mpsc};
use tracing::{error, info, trace, warn};

use crate::context::RPCContext;
use crate::transaction_tracker::{self, TransactionError, TransactionLock};
use crate::vfs::NfsFileSystem;
use crate::{mount_handlers, nfs_handlers, portmap_handlers};

pub mod messages;

// Information from RFC 5531
// https://datatracker.ietf.org/doc/html/rfc5531

const NFS_ACL_PROGRAM: u32 = 100_227;
const NFS_ID_MAP_PROGRAM: u32 = 100_270;
const NFS_METADATA_PROGRAM: u32 = 200_024;

async fn handle_rpc_message<T>(
    mut context: RPCContext<T>,
    message: CompleteRpcMessage,
) -> anyhow::Result<HandleResult>
where
    T: NfsFileSystem,
{
    let message = IncomingRpcMessage::try_from(message)?;
    let xid = message.xid();
    let call = message.body();
    let prog = call.prog;

    if call.rpcvers != RPC_VERSION_2 {
        warn!("Invalid RPC version {} != {RPC_VERSION_2}", call.rpcvers);
        return message.into_rpc_mismatch();
    }

    let unix = call.cred.flavor == auth_flavor::AUTH_UNIX;
    if unix {
        let auth = auth_unix::unpack(&mut Cursor::new(&call.cred.body.0))?.0;
        context.auth = auth;
    }
    if prog != portmap::PROGRAM && !context.vfs.authorize(unix.then_some(&context.auth)) {
        warn!(
            "refusing a call from uid {} on {}",
            context.auth.uid, context.client_addr
        );
        return message.into_auth_error(auth_stat::AUTH_TOOWEAK);
    }

    let transaction = lock_transaction(
        &context.transaction_tracker,
        &context.client_addr,
        xid,
        call,
    );
    if let Err(msg) = transaction {
        match msg {
            Some(err) => return message.into_error_reply(err),
            None => {
                // This is a retransmission, so we don't need to do anything
                return Ok(HandleResult::NoReply);
            }
        }
    }

    let caller = unix.then(|| context.auth.clone());
    crate::vfs::with_caller(caller, dispatch(context, message, prog)).await
}

async fn dispatch<T>(
    context: RPCContext<T>,
    message: IncomingRpcMessage,
    prog: u32,
) -> anyhow::Result<HandleResult>
where
    T: NfsFileSystem,
{
    match prog {
        portmap::PROGRAM => portmap_handlers::handle_portmap(context, message).await,
        nfs3_types::mount::PROGRAM => mount_handlers::handle_mount(context, message).await,
        nfs::PROGRAM => nfs_handlers::handle_nfs(context, message).await,
        NFS_ACL_PROGRAM | NFS_ID_MAP_PROGRAM | NFS_METADATA_PROGRAM => {
            trace!("ignoring NFS_ACL packet");
            message.into_error_reply(accept_stat_data::PROG_UNAVAIL)
        }
        _ => {
            warn!("Unknown RPC Program number {prog} != {}", nfs::PROGRAM);
            message.into_error_reply(accept_stat_data::PROG_UNAVAIL)
        }
    }
}

/// Handles the RPC message and returns a result. The handler is an async function
pub async fn handle<I, O, T>(
    context: RPCContext<T>,
    mut message: IncomingRpcMessage,
    handler: impl AsyncFnOnce(RPCContext<T>, u32, I) -> O,
) -> anyhow::Result<HandleResult>
where
    I: Unpack,
    O: Pack + Send + 'static,
    T: NfsFileSystem,
{
    let Some(args) = unpack_args::<I>(&mut message) else {
        return message.into_error_reply(accept_stat_data::GARBAGE_ARGS);
    };
    let result = handler(context, message.xid(), args).await;
    message.into_success_reply(&result)
}

/// Tessera patch: [`handle`] for a procedure whose reply ends with bulk data (READ): the
/// handler packs its reply with that opaque empty and returns the data beside it, which goes
/// on the wire from its own buffer (`CompleteRpcMessage::set_trailing_opaque`). Upstream
/// copied every byte read into the reply's buffer.
pub async fn handle_with_data<I, O, T>(
    context: RPCContext<T>,
    mut message: IncomingRpcMessage,
    handler: impl AsyncFnOnce(RPCContext<T>, u32, I) -> (O, Vec<u8>),
) -> anyhow::Result<HandleResult>
where
    I: Unpack,
    O: Pack + Send + 'static,
    T: NfsFileSystem,
{
    let Some(args) = unpack_args::<I>(&mut message) else {
        return message.into_error_reply(accept_stat_data::GARBAGE_ARGS);
    };
    let (result, data) = handler(context, message.xid(), args).await;
    let mut reply = message.into_success_reply(&result)?;
    if let HandleResult::Reply(r) = &mut reply
        && !data.is_empty()
    {
        r.set_trailing_opaque(data)?;
    }
    Ok(reply)
}

/// A call's arguments, or `None` (logged) when they do not unpack to exactly the record.
fn unpack_args<I: Unpack>(message: &mut IncomingRpcMessage) -> Option<I> {
    let mut cursor = message.take_data();
    let (args, _) = match I::unpack(&mut cursor) {
        Ok(ok) => ok,
        Err(err) => {
            error!("Failed to unpack message: {err}");
            return None;
        }
    };
    if cursor.position() != cursor.get_ref().len() as u64 {
        error!("Unpacked message size does not match expected size");
        return None;
    }
    Some(args)
}

fn lock_transaction(
    transaction_tracker: &transaction_tracker::TransactionTracker,
    client_addr: &str,
    xid: u32,
    call: &call_body<'_>,
) -> Result<TransactionLock, Option<accept_stat_data>> {
    let transaction = transaction_tracker.start_transaction(client_addr, xid, Instant::now());

    match transaction {
        Ok(lock) => Ok(lock),
        Err(TransactionError::AlreadyExists) => {
            info!(
                "Retransmission detected, xid: {xid}, client_addr: {client_addr}, call: {call:?}",
            );
            Err(None)
        }
        Err(TransactionError::TooManyRequests) => {
            warn!("Too many requests, xid: {xid}, client_addr: {client_addr}, call: {call:?}",);

            Err(Some(accept_stat_data::SYSTEM_ERR))
        }
    }
}

/// Tessera patch: replies written together by the connection's writer, at most this many
/// bytes of small replies per write (a reply over it is written on its own).
pub const COALESCE_BYTES: usize = 256 * 1024;

/// Tessera patch: write `batch`'s records in order, the small ones gathered into one buffer
/// (one syscall), a large one (a READ's data) from its own buffer after its header. Gives up
/// when the socket accepts no byte for `stall` (a client that stopped reading its replies):
/// upstream waited forever, so a dead client pinned the memory of every reply queued for it.
#[allow(clippy::cast_possible_truncation)]
pub async fn write_replies<IO: tokio::io::AsyncWrite + Unpin>(
    socket: &mut IO,
    batch: &mut [QueuedReply],
    stall: Duration,
) -> Result<(), anyhow::Error> {
    let mut out: Vec<u8> = Vec::new();
    for r in batch.iter_mut() {
        let len = r.reply.wire_len();
        let (body, data) = std::mem::take(&mut r.reply).into_parts();
        assert!(len < (1 << 31));
        let header = fragment_header::new(len as u32, true).into_xdr_buf();
        out.extend_from_slice(&header);
        if !data.is_empty() && data.len() <= 64 * 1024 {
            // A small READ's data: copied after its body, so the reply shares the write
            // (a separate write of 4 KiB cost more than the copy).
            out.extend_from_slice(&body);
            out.extend_from_slice(&data);
            out.extend_from_slice(&[0; 3][..messages::xdr_pad(data.len())]);
        } else if !data.is_empty() {
            // Bulk data (a READ's): the body after what is gathered, then the data from its
            // own buffer, its padding left to start the next write.
            out.extend_from_slice(&body);
            write_all_progressing(socket, &out, stall).await?;
            out.clear();
            write_all_progressing(socket, &data, stall).await?;
            out.extend_from_slice(&[0; 3][..messages::xdr_pad(data.len())]);
        } else if body.len() > 64 * 1024 {
            // Large: flush what is gathered, then the body without copying it.
            write_all_progressing(socket, &out, stall).await?;
            out.clear();
            write_all_progressing(socket, &body, stall).await?;
        } else {
            out.extend_from_slice(&body);
        }
    }
    if !out.is_empty() {
        write_all_progressing(socket, &out, stall).await?;
    }
    Ok(())
}

/// Tessera patch: `write_all` that fails with `TimedOut` when one write makes no progress
/// for `stall`.
async fn write_all_progressing<IO: tokio::io::AsyncWrite + Unpin>(
    socket: &mut IO,
    mut data: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    while !data.is_empty() {
        match tokio::time::timeout(stall, socket.write(data)).await {
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no progress writing a reply for {} s", stall.as_secs()),
                ));
            }
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Tessera patch: a reply waiting to be written, with the connection's call slot and
/// byte budget it holds until it has left for the socket.
pub struct QueuedReply {
    pub reply: CompleteRpcMessage,
    #[allow(dead_code)] // held for its Drop: released once the reply is written
    pub held: (
        OwnedSemaphorePermit,
        OwnedSemaphorePermit,
        SemaphorePermit<'static>,
    ),
}

pub type SocketMessageType = Result<QueuedReply, anyhow::Error>;

/// Tessera patch: calls served at once per connection (below the transaction tracker's
/// limit of 256 active calls per client). A call holds its slot until its reply has been
/// written to the socket, not just computed.
pub const MAX_INFLIGHT_CALLS: usize = 128;

/// Tessera patch: the most READ data, and the largest READDIR/READDIRPLUS reply, the
/// server makes for one call (bytes; the rtmax Tessera announces), whatever count the
/// client asks.
pub const MAX_REPLY_DATA: u32 = 1024 * 1024;

/// Tessera patch: bytes of calls and replies one connection may hold at once (received
/// calls being served plus replies not yet written to the socket). Each call reserves
/// the larger of its record and the largest reply it can get (about 1 MiB for a READ or
/// a READDIR, 4 KiB for other procedures) before it is served, and keeps the reservation
/// until its reply is written. So a client that pipelines 1 MiB READs and never reads
/// the replies pins at most 32 MiB (32 READs), plus one record being received
/// (<= 1 MiB + 64 KiB) and the 256 KiB pipe below; TCP pushes back on the rest.
pub const CONNECTION_BYTE_BUDGET: usize = 32 * 1024 * 1024;

/// Tessera patch: bytes of calls and replies all connections of the process may hold at once,
/// on top of each connection's own budget: four connections whose clients stopped reading
/// fill it, and the others wait until the write-stall timeout drops them. So the server's
/// memory stays bounded whatever any number of clients do (the engine's own caches and
/// write-back buffer come on top: README, "Bounded memory").
pub const SERVER_BYTE_BUDGET: usize = 128 * 1024 * 1024;

static SERVER_BUDGET: Semaphore = Semaphore::const_new(SERVER_BYTE_BUDGET / BUDGET_UNIT);

/// Budget permits are KiB: a 32 MiB budget is 32768 permits.
const BUDGET_UNIT: usize = 1024;
/// Reply room reserved for a procedure without bulk data (attributes, handles, a name or
/// a symlink target of at most 4 KiB, RPC headers).
const SMALL_REPLY: usize = 8 * 1024;
/// RPC header, attributes and lengths around the data of a READ or READDIR reply.
const REPLY_OVERHEAD: usize = 1024;

/// Tessera patch: the largest reply a call record can get, read from its header and
/// arguments without decoding the whole call. Unparsable records get `SMALL_REPLY`: they
/// are answered with an error, or end the connection.
fn reply_bound(call: &[u8]) -> usize {
    reply_bound_of(call).unwrap_or(SMALL_REPLY)
}

fn reply_bound_of(call: &[u8]) -> Option<usize> {
    let mut x = WireReader(call);
    let _xid = x.u32()?;
    let _msg_type = x.u32()?;
    let _rpcvers = x.u32()?;
    let (prog, vers, procedure) = (x.u32()?, x.u32()?, x.u32()?);
    x.opaque()?; // credential: flavor, body
    x.opaque()?; // verifier
    if prog != nfs::PROGRAM || vers != nfs::VERSION {
        return Some(SMALL_REPLY);
    }
    let count = match procedure {
        // READ: file handle, offset, count
        6 => {
            x.opaque_body()?;
            x.u32()?;
            x.u32()?;
            x.u32()?
        }
        // READDIR: dir handle, cookie, cookie verifier, count
        16 => {
            x.opaque_body()?;
            x.skip(16)?;
            x.u32()?
        }
        // READDIRPLUS: dir handle, cookie, cookie verifier, dircount, maxcount
        17 => {
            x.opaque_body()?;
            x.skip(16)?;
            x.u32()?;
            x.u32()?
        }
        _ => return Some(SMALL_REPLY),
    };
    Some(count.min(MAX_REPLY_DATA) as usize + REPLY_OVERHEAD)
}

/// XDR reader over a call record; every getter fails cleanly on short input.
struct WireReader<'a>(&'a [u8]);

impl WireReader<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.0 = self.0.get(n..)?;
        Some(())
    }
    /// An opaque body: length, then the bytes padded to 4.
    fn opaque_body(&mut self) -> Option<()> {
        let len = self.u32()? as usize;
        self.skip(len.checked_next_multiple_of(4)?)
    }
    /// An opaque_auth: flavor, then its body.
    fn opaque(&mut self) -> Option<()> {
        self.u32()?;
        self.opaque_body()
    }
}

/// The Socket Message Handler reads from a `TcpStream` and spawns off
/// subtasks to handle each message. replies are queued into the
/// `reply_send_channel`.
#[derive(Debug)]
pub struct SocketMessageHandler<T: NfsFileSystem + 'static> {
    // Tessera patch: calls of this connection being served or waiting for their reply
    // to be written. When all are taken the reader waits, so TCP pushes back on the
    // client; upstream spawned without bound and answered SYSTEM_ERR past 256 active
    // calls, failing deep-queue clients, and released the slot before the reply was
    // written, so replies to a client that did not read piled up without bound.
    inflight: Arc<Semaphore>,
    // Tessera patch: CONNECTION_BYTE_BUDGET, in BUDGET_UNIT permits.
    budget: Arc<Semaphore>,
    reply_send_channel: mpsc::UnboundedSender<SocketMessageType>,
    context: RPCContext<T>,
}

/// Tessera patch: tells whether a connection has calls outstanding (idle timeout).
#[derive(Clone, Debug)]
pub struct CallProbe(Arc<Semaphore>);

impl CallProbe {
    /// No call is being served and no reply waits to be written.
    pub fn idle(&self) -> bool {
        self.0.available_permits() == MAX_INFLIGHT_CALLS
    }
}

impl<T> SocketMessageHandler<T>
where
    T: NfsFileSystem + 'static,
{
    /// Creates a new `SocketMessageHandler` with the receiver for queued message replies
    // Tessera patch: no pipe between the socket and the handler; the connection's reading
    // loop passes its buffered socket to `read_record` (upstream copied every byte from the
    // socket into a `DuplexStream` and out again, a copy and a task wake-up per read).
    pub fn new(context: RPCContext<T>) -> (Self, mpsc::UnboundedReceiver<SocketMessageType>) {
        // Unbounded in messages, but bounded by what each message holds: at most
        // MAX_INFLIGHT_CALLS replies and CONNECTION_BYTE_BUDGET bytes.
        let (msgsend, msgrecv) = mpsc::unbounded_channel();
        (
            Self {
                inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_CALLS)),
                budget: Arc::new(Semaphore::new(CONNECTION_BYTE_BUDGET / BUDGET_UNIT)),
                reply_send_channel: msgsend,
                context,
            },
            msgrecv,
        )
    }

    /// Tessera patch: a probe of this connection's outstanding calls.
    pub fn call_probe(&self) -> CallProbe {
        CallProbe(self.inflight.clone())
    }

    /// Tessera patch: read one whole record (all its fragments) from `input`. Not
    /// cancel-safe: bytes of a record are consumed as they arrive, so a caller that gives
    /// up on a record must drop the connection.
    pub async fn read_record(
        &mut self,
        input: &mut (impl AsyncRead + Unpin),
    ) -> Result<CompleteRpcMessage, anyhow::Error> {
        let mut record = PackedRpcMessage::new();
        while !record.recv(input).await? {}
        match record {
            PackedRpcMessage::Complete(data) => Ok(data),
            PackedRpcMessage::Incomplete(_) => unreachable!("recv completes the record"),
        }
    }

    /// Tessera patch: serve a record read by `read_record` on its own task, once the
    /// connection has a call slot and budget for it (waiting here is what stops the
    /// connection's reading loop, so TCP pushes back on a client past its limits).
    pub async fn dispatch(&mut self, message: CompleteRpcMessage) -> Result<(), anyhow::Error> {
        let context = self.context.clone();
        let send = self.reply_send_channel.clone();
        // Tessera patch: reserve the call's slot and its bytes before serving it;
        // both are released when its reply has been written (or when it has none).
        let bytes = message
            .as_bytes()
            .len()
            .max(reply_bound(message.as_bytes()));
        let units = bytes
            .div_ceil(BUDGET_UNIT)
            .min(CONNECTION_BYTE_BUDGET / BUDGET_UNIT);
        let slot = self.inflight.clone().acquire_owned().await?;
        let reserved = self
            .budget
            .clone()
            .acquire_many_owned(u32::try_from(units)?)
            .await?;
        let server = SERVER_BUDGET.acquire_many(u32::try_from(units)?).await?;
        tokio::spawn(async move {
            let result = handle_rpc_message(context, message).await;
            match result {
                Ok(HandleResult::Reply(reply)) => {
                    let _ = send.send(Ok(QueuedReply {
                        reply,
                        held: (slot, reserved, server),
                    }));
                }
                Ok(HandleResult::NoReply) => {
                    // No reply needed
                }
                Err(err) => {
                    error!("Error handling RPC message: {err}");
                    let _ = send.send(Err(anyhow!("Error handling RPC message")));
                }
            }
        });

        Ok(())
    }
}
