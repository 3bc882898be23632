//! A minimal portmapper (RFC 1833, program 100000 version 2) on TCP and UDP, so clients
//! that can only name a host (qemu's and libnfs's `nfs://HOST/path`, ESXi, Linux mount)
//! find the NFS and MOUNT services on Tessera's port. It answers NULL, GETPORT and DUMP;
//! SET/UNSET/CALLIT are refused, since nothing else registers here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::allow::AllowList;

pub const PMAP_PROG: u32 = 100_000;
pub const PMAP_VERS: u32 = 2;
pub const NFS_PROG: u32 = 100_003;
pub const MOUNT_PROG: u32 = 100_005;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// Largest portmapper record accepted (bytes); real calls are under 200.
const MAX_RECORD: usize = 8 * 1024;
/// An idle TCP client is dropped after this long.
const IDLE: Duration = Duration::from_secs(30);
/// TCP clients served at once; more are closed at accept. A client asks once or twice and
/// leaves, so this only matters against a peer opening connections in a loop (each lives up
/// to 4 x IDLE and holds up to MAX_RECORD bytes).
const MAX_TCP_CLIENTS: usize = 64;

/// What the portmapper knows: the port of NFS v3 and MOUNT v1/v3 (TCP only) and its own.
#[derive(Clone, Copy, Debug)]
pub struct Services {
    pub nfs_port: u16,
    pub pmap_port: u16,
}

impl Services {
    /// GETPORT: the port of (program, version, protocol), 0 when not served.
    pub fn port_of(&self, prog: u32, vers: u32, prot: u32) -> u32 {
        match (prog, vers, prot) {
            (NFS_PROG, 3, IPPROTO_TCP) | (MOUNT_PROG, 1 | 3, IPPROTO_TCP) => {
                u32::from(self.nfs_port)
            }
            (PMAP_PROG, PMAP_VERS, IPPROTO_TCP | IPPROTO_UDP) => u32::from(self.pmap_port),
            _ => 0,
        }
    }

    fn mappings(&self) -> [(u32, u32, u32, u32); 5] {
        let (n, p) = (u32::from(self.nfs_port), u32::from(self.pmap_port));
        [
            (PMAP_PROG, PMAP_VERS, IPPROTO_TCP, p),
            (PMAP_PROG, PMAP_VERS, IPPROTO_UDP, p),
            (NFS_PROG, 3, IPPROTO_TCP, n),
            (MOUNT_PROG, 3, IPPROTO_TCP, n),
            (MOUNT_PROG, 1, IPPROTO_TCP, n),
        ]
    }
}

/// XDR reader over a call; every getter fails cleanly on short input.
struct Xdr<'a>(&'a [u8]);

impl Xdr<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_first_chunk::<4>()?;
        self.0 = t;
        Some(u32::from_be_bytes(*h))
    }

    /// Skip an opaque_auth (flavor, then up to 400 bytes of body padded to 4).
    fn skip_auth(&mut self) -> Option<()> {
        self.u32()?;
        let len = self.u32()? as usize;
        if len > 400 {
            return None;
        }
        let padded = len.next_multiple_of(4);
        self.0 = self.0.get(padded..)?;
        Some(())
    }
}

/// The reply to one RPC call record, or `None` for input that gets no reply (not a call,
/// truncated, not RPC version 2).
pub fn answer(call: &[u8], svc: &Services) -> Option<Vec<u8>> {
    let mut x = Xdr(call);
    let xid = x.u32()?;
    if x.u32()? != 0 || x.u32()? != 2 {
        return None; // not a CALL, or not RPC version 2
    }
    let (prog, vers, proc_) = (x.u32()?, x.u32()?, x.u32()?);
    x.skip_auth()?;
    x.skip_auth()?;
    let mut out = Vec::with_capacity(64);
    let mut put = |v: u32| out.extend_from_slice(&v.to_be_bytes());
    // xid, REPLY, MSG_ACCEPTED, verifier AUTH_NULL with an empty body
    for v in [xid, 1, 0, 0, 0] {
        put(v);
    }
    if prog != PMAP_PROG {
        put(1); // PROG_UNAVAIL
    } else if vers != PMAP_VERS {
        // PROG_MISMATCH: clients of rpcbind v3/v4 fall back to version 2.
        for v in [2, PMAP_VERS, PMAP_VERS] {
            put(v);
        }
    } else {
        match proc_ {
            0 => put(0), // NULL: SUCCESS, no result
            3 => {
                // GETPORT(mapping{prog, vers, prot, port})
                let (p, v, t) = (x.u32(), x.u32(), x.u32());
                match (p, v, t, x.u32()) {
                    (Some(p), Some(v), Some(t), Some(_)) => {
                        put(0);
                        put(svc.port_of(p, v, t));
                    }
                    _ => put(4), // GARBAGE_ARGS
                }
            }
            4 => {
                // DUMP: a linked list of mappings
                put(0);
                for (p, v, t, port) in svc.mappings() {
                    for w in [1, p, v, t, port] {
                        put(w);
                    }
                }
                put(0);
            }
            _ => put(3), // PROC_UNAVAIL
        }
    }
    Some(out)
}

/// Serve the portmapper on `addr` over TCP and UDP until the runtime stops, to the clients
/// the export allows.
pub async fn serve(addr: SocketAddr, svc: Services, allow: AllowList) -> std::io::Result<()> {
    let tcp = TcpListener::bind(addr).await?;
    let udp = UdpSocket::bind(addr).await?;
    let allow_udp = allow.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match udp.recv_from(&mut buf).await {
                Ok((n, peer)) if allow_udp.allows(peer.ip()) => {
                    if let Some(reply) = answer(&buf[..n], &svc) {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("portmap udp: {e}"),
            }
        }
    });
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CLIENTS));
    tokio::spawn(async move {
        loop {
            match tcp.accept().await {
                Ok((_, peer)) if !allow.allows(peer.ip()) => {}
                Ok((s, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(
                            "portmapper: refusing a connection from {peer}: \
                             {MAX_TCP_CLIENTS} connections already open (the limit)"
                        );
                        continue;
                    };
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(IDLE * 4, serve_tcp(s, svc)).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::debug!("portmap accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// One TCP client: record-marked calls (RFC 5531 section 11), one reply each.
async fn serve_tcp(mut s: TcpStream, svc: Services) -> std::io::Result<()> {
    loop {
        let mut record = Vec::new();
        loop {
            let mut h = [0u8; 4];
            tokio::time::timeout(IDLE, s.read_exact(&mut h)).await??;
            let h = u32::from_be_bytes(h);
            let len = (h & 0x7fff_ffff) as usize;
            if record.len() + len > MAX_RECORD {
                return Ok(()); // oversized: drop the connection
            }
            let start = record.len();
            record.resize(start + len, 0);
            tokio::time::timeout(IDLE, s.read_exact(&mut record[start..])).await??;
            if h & 0x8000_0000 != 0 {
                break;
            }
        }
        let Some(reply) = answer(&record, &svc) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 4);
        framed.extend_from_slice(&(0x8000_0000 | reply.len() as u32).to_be_bytes());
        framed.extend_from_slice(&reply);
        s.write_all(&framed).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(prog: u32, vers: u32, proc_: u32, args: &[u32]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [7, 0, 2, prog, vers, proc_, 0, 0, 0, 0] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        for w in args {
            v.extend_from_slice(&w.to_be_bytes());
        }
        v
    }

    fn words(b: &[u8]) -> Vec<u32> {
        b.chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    const SVC: Services = Services {
        nfs_port: 2049,
        pmap_port: 111,
    };

    /// Protects: qemu/libnfs URLs without a port find NFS and MOUNT on Tessera's port.
    #[test]
    fn getport_finds_nfs_and_mount_over_tcp_only() {
        for (prog, vers, prot, want) in [
            (NFS_PROG, 3, IPPROTO_TCP, 2049),
            (MOUNT_PROG, 3, IPPROTO_TCP, 2049),
            (NFS_PROG, 3, IPPROTO_UDP, 0),
            (NFS_PROG, 4, IPPROTO_TCP, 0),
            (123, 1, IPPROTO_TCP, 0),
        ] {
            let r = answer(&call(PMAP_PROG, 2, 3, &[prog, vers, prot, 0]), &SVC).unwrap();
            assert_eq!(words(&r), vec![7, 1, 0, 0, 0, 0, want]);
        }
    }

    /// Protects: malformed calls get no reply or an RPC error, never a panic.
    #[test]
    fn garbage_is_refused() {
        assert!(answer(&[], &SVC).is_none());
        assert!(answer(&[0, 0, 0, 1, 0, 0], &SVC).is_none());
        let mut c = call(PMAP_PROG, 2, 3, &[NFS_PROG]);
        assert_eq!(words(&answer(&c, &SVC).unwrap())[5], 4); // GARBAGE_ARGS
        c.truncate(30);
        assert!(answer(&c, &SVC).is_none());
        // a credential claiming a huge body
        let mut v = call(PMAP_PROG, 2, 0, &[]);
        v[29] = 0xff;
        v[30] = 0xff;
        assert!(answer(&v, &SVC).is_none());
        assert_eq!(words(&answer(&call(1, 2, 0, &[]), &SVC).unwrap())[5], 1);
        assert_eq!(
            words(&answer(&call(PMAP_PROG, 4, 3, &[]), &SVC).unwrap())[5..],
            [2, 2, 2]
        );
        assert_eq!(
            words(&answer(&call(PMAP_PROG, 2, 9, &[]), &SVC).unwrap())[5],
            3
        );
        // proptest-style sweep: every prefix of a valid call is handled
        let full = call(PMAP_PROG, 2, 3, &[NFS_PROG, 3, IPPROTO_TCP, 0]);
        for n in 0..full.len() {
            let _ = answer(&full[..n], &SVC);
        }
    }

    #[test]
    fn dump_lists_the_services() {
        let r = words(&answer(&call(PMAP_PROG, 2, 4, &[]), &SVC).unwrap());
        assert_eq!(r[5], 0);
        assert_eq!(r[6..11], [1, PMAP_PROG, 2, IPPROTO_TCP, 111]);
        assert!(r
            .windows(5)
            .any(|w| w == [1, NFS_PROG, 3, IPPROTO_TCP, 2049]));
        assert_eq!(*r.last().unwrap(), 0);
        assert_eq!((r.len() - 7) / 5, 5);
    }
}
