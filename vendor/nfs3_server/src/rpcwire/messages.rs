use std::io::Cursor;

use anyhow::bail;
use bytes::BufMut;
use nfs3_types::rpc::{
    accept_stat_data, accepted_reply, auth_stat, call_body, fragment_header, msg_body, opaque_auth,
    rejected_reply, reply_body, rpc_msg,
};
use nfs3_types::xdr_codec::{Pack, Unpack, Void};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug)]
pub enum PackedRpcMessage {
    Incomplete(IncompleteRpcMessage),
    Complete(CompleteRpcMessage),
}

impl PackedRpcMessage {
    pub fn new() -> Self {
        Self::Incomplete(IncompleteRpcMessage::default())
    }
    pub async fn recv(&mut self, input: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<bool> {
        match self {
            Self::Incomplete(incomplete) => {
                let eof = incomplete.recv(input).await?;
                if eof {
                    let data = std::mem::take(incomplete);
                    *self = Self::Complete(CompleteRpcMessage(data.0, Vec::new()));
                }
                Ok(eof)
            }
            Self::Complete(_) => Ok(true),
        }
    }
}

/// Tessera patch: the largest RPC record accepted: a 1 MiB WRITE (wtmax) plus
/// generous room for headers and credentials.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024 + 64 * 1024;

/// Contains collected RPC message fragments without their headers.
#[derive(Default, Debug)]
pub struct IncompleteRpcMessage(Vec<u8>);

impl IncompleteRpcMessage {
    async fn recv(&mut self, input: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<bool> {
        let mut header_buf = [0_u8; 4];
        input.read_exact(&mut header_buf).await?;
        let header: fragment_header = header_buf.into();
        let prev_length = self.0.len();
        let fragment_length = header.fragment_length() as usize;
        // Tessera patch: bound a record before allocating it. Upstream resized
        // to whatever the header claimed (up to 2 GiB per fragment, fragments
        // without limit), so a few bytes from any peer could exhaust memory.
        if prev_length + fragment_length > MAX_RECORD_BYTES {
            bail!(
                "RPC record of {} bytes is over the limit of {MAX_RECORD_BYTES}",
                prev_length + fragment_length
            );
        }
        // Tessera patch: read into the spare capacity instead of zero-filling the
        // fragment first and copying over it (the zeroing was 2 % of the server's CPU
        // under the VDI profile).
        let end = prev_length + fragment_length;
        self.0.reserve_exact(fragment_length);
        while self.0.len() < end {
            let want = end - self.0.len();
            if input.read_buf(&mut (&mut self.0).limit(want)).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }

        Ok(header.eof())
    }
}

#[derive(Debug, Default)]
pub struct CompleteRpcMessage(Vec<u8>, Vec<u8>);

impl CompleteRpcMessage {
    /// Tessera patch: the record, to size its reservation before it is served.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Tessera patch: the reply's bytes: the packed body, then bulk data that goes on the wire
    /// after it from its own buffer (a READ's data; empty for every other reply), then the
    /// zero bytes that pad the data to a multiple of 4 (XDR).
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>) {
        (self.0, self.1)
    }

    /// Tessera patch: the reply's length on the wire, padding included.
    pub fn wire_len(&self) -> usize {
        self.0.len() + self.1.len() + xdr_pad(self.1.len())
    }

    /// Tessera patch: make `data` the contents of the variable-length opaque the packed body
    /// ends with, which was packed empty (its length word 0), without copying `data` into the
    /// body: upstream packed a READ's data into a fresh buffer, a copy of every byte read
    /// (a twentieth of the server's CPU in a sequential copy back).
    pub fn set_trailing_opaque(&mut self, data: Vec<u8>) -> anyhow::Result<()> {
        let n = self.0.len();
        if n < 4 || self.0[n - 4..] != [0; 4] || !self.1.is_empty() {
            bail!("reply does not end with an empty opaque");
        }
        let len = u32::try_from(data.len())?;
        self.0[n - 4..].copy_from_slice(&len.to_be_bytes());
        self.1 = data;
        Ok(())
    }
}

/// Zero bytes after `len` bytes of opaque data (XDR pads to 4 bytes).
pub const fn xdr_pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

pub struct IncomingRpcMessage {
    xid: u32,
    body: call_body<'static>,
    data: Option<Vec<u8>>,
    message_start: usize, // offset of the start of the message in the data buffer
}

impl TryFrom<CompleteRpcMessage> for IncomingRpcMessage {
    type Error = anyhow::Error;

    fn try_from(packed: CompleteRpcMessage) -> Result<Self, Self::Error> {
        let packed = packed.0;
        let (rpc, pos) = match rpc_msg::unpack(&mut Cursor::new(&packed)) {
            Ok(ok) => ok,
            Err(err) => {
                bail!("Failed to unpack RPC message: {err}");
            }
        };

        let xid = rpc.xid;
        let body = match rpc.body {
            msg_body::CALL(call) => call,
            msg_body::REPLY(_) => {
                bail!("Expected a CALL message, got REPLY. XID: {xid}");
            }
        };

        Ok(Self {
            xid,
            body,
            data: Some(packed),
            message_start: pos,
        })
    }
}

impl IncomingRpcMessage {
    pub const fn xid(&self) -> u32 {
        self.xid
    }
    pub const fn body(&self) -> &call_body<'static> {
        &self.body
    }

    pub const fn take_data(&mut self) -> Cursor<Vec<u8>> {
        let data = self.data.take().expect("Data already taken");
        let mut cursor = Cursor::new(data);
        cursor.set_position(self.message_start as u64);
        cursor
    }

    pub fn into_success_reply<T>(self, message: &T) -> anyhow::Result<HandleResult>
    where
        T: Pack + 'static,
    {
        let rpc = rpc_msg {
            xid: self.xid,
            body: msg_body::REPLY(reply_body::MSG_ACCEPTED(accepted_reply {
                verf: opaque_auth::default(),
                reply_data: accept_stat_data::SUCCESS,
            })),
        };

        pack(&rpc, message).map(HandleResult::Reply)
    }

    pub fn into_rpc_mismatch(self) -> anyhow::Result<HandleResult> {
        use nfs3_types::rpc::RPC_VERSION_2;

        let reply =
            reply_body::MSG_DENIED(rejected_reply::rpc_mismatch(RPC_VERSION_2, RPC_VERSION_2));

        let rpc = rpc_msg {
            xid: self.xid,
            body: msg_body::REPLY(reply),
        };
        pack(&rpc, &Void).map(HandleResult::Reply)
    }

    pub fn into_auth_error(self, stat: auth_stat) -> anyhow::Result<HandleResult> {
        let rpc = rpc_msg {
            xid: self.xid,
            body: msg_body::REPLY(reply_body::MSG_DENIED(rejected_reply::auth_error(stat))),
        };
        pack(&rpc, &Void).map(HandleResult::Reply)
    }

    pub fn into_error_reply(self, err: accept_stat_data) -> anyhow::Result<HandleResult> {
        let rpc = rpc_msg {
            xid: self.xid,
            body: msg_body::REPLY(reply_body::MSG_ACCEPTED(accepted_reply {
                verf: opaque_auth::default(),
                reply_data: err,
            })),
        };
        pack(&rpc, &Void).map(HandleResult::Reply)
    }
}

pub enum HandleResult {
    Reply(CompleteRpcMessage),
    NoReply,
}

fn pack<T>(rpc: &rpc_msg, message: &T) -> anyhow::Result<CompleteRpcMessage>
where
    T: Pack + 'static,
{
    let size = rpc
        .packed_size()
        .checked_add(message.packed_size())
        .expect("Failed to calculate size");

    let mut cursor = Cursor::new(Vec::with_capacity(size));
    rpc.pack(&mut cursor)?;
    message.pack(&mut cursor)?;
    Ok(CompleteRpcMessage(cursor.into_inner(), Vec::new()))
}
