//! The replication stream (`tessera send` | `tessera receive`): a snapshot, or what changed
//! between two snapshots, as a sequence of framed records.
//!
//! ```text
//! magic "TESSERA-STREAM\0\x01" (16 bytes; the last byte is the version)
//! frame*: kind u8, length u32 LE, payload, crc32 u32 LE of (kind, length, payload)
//! ```
//! Frames, in order: one `Header` (JSON), then per entry of the snapshot's tree (parents before
//! children): the `Chunks` it needs that were not sent before and that the base snapshot does
//! not hold, its `Entry` (JSON), and for a regular file its `Map` frames; then one `End` (JSON,
//! totals to check). Chunks travel as stored (compressed, with their codec) and are verified
//! against their ids on receipt; a map names chunks by id, never by a datastore's local key.
//! Frames hold at most `FRAME_MAX` bytes, so memory stays bounded on both sides.
//!
//! Limits: the sender remembers the chunks it sent (8 bytes each: 512 MiB of memory per TiB
//! of unique data at 16 KiB chunks), so one chunk crosses once per stream.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::store::chunk::{ChunkId, Codec};
use crate::store::Encoded;

pub const MAGIC: &[u8; 16] = b"TESSERA-STREAM\0\x01";

/// Largest frame payload, bytes. A sender starts a new frame before a frame would pass
/// `FRAME_TARGET`; a receiver refuses anything larger than `FRAME_MAX`.
pub const FRAME_TARGET: usize = 4 << 20;
pub const FRAME_MAX: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Header = 1,
    Chunks = 2,
    Entry = 3,
    Map = 4,
    End = 5,
    /// Network replication: which of these chunk ids (32 bytes each) does the receiver hold?
    Have = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Header,
            2 => Kind::Chunks,
            3 => Kind::Entry,
            4 => Kind::Map,
            5 => Kind::End,
            6 => Kind::Have,
            _ => return None,
        })
    }
}

/// What the stream carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Id of the datastore it was sent from.
    pub source: u64,
    pub chunk_size: u64,
    /// The snapshot's path in the source datastore (`/vms/desk01`).
    pub path: String,
    pub snap: String,
    /// Unix seconds the snapshot was taken.
    pub created: u64,
    /// Incremental: the older snapshot of the same path the receiver must hold (its name and
    /// creation time, which the receiver checks).
    pub from: Option<(String, u64)>,
}

/// One file, folder or other inode of the snapshot's tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the snapshot's top (empty for the top itself), `/`-separated bytes.
    pub path: Vec<u8>,
    /// `crate::fs::inode::Kind` as its `u8`.
    pub kind: u8,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// (seconds, nanoseconds)
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub symlink: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A file whose `Map` frames change the same path of the base snapshot (only the slots that
    /// differ are sent); otherwise its maps hold every present slot.
    pub on_base: bool,
    /// A file with the same chunk map as this earlier file of the stream (a clone): no maps
    /// follow, the receiver shares that file's map.
    #[serde(default)]
    pub same_as: Option<Vec<u8>>,
}

/// Totals, to check the stream arrived whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub entries: u64,
    pub chunks: u64,
    /// Payload bytes of the chunks (as stored).
    pub chunk_bytes: u64,
}

/// A decoded frame.
#[derive(Debug)]
pub enum Frame {
    Header(Header),
    Chunks(Vec<Encoded>),
    Entry(Entry),
    /// (slot, chunk or hole)
    Map(Vec<(u64, Option<ChunkId>)>),
    End(End),
    Have(Vec<ChunkId>),
}

/// Writes frames.
pub struct Writer<W: Write> {
    out: W,
    /// Bytes written so far.
    pub bytes: u64,
    /// A frame being built, reused: a fresh multi-MiB buffer per frame costs page faults and
    /// zeroing of every page, a second per GiB sent.
    buf: Vec<u8>,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Writer<W>> {
        out.write_all(MAGIC)?;
        Ok(Writer {
            out,
            bytes: MAGIC.len() as u64,
            buf: Vec::new(),
        })
    }

    fn frame(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut head = [0u8; 5];
        head[0] = kind as u8;
        head[1..].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(payload);
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        self.out.write_all(&crc.finalize().to_le_bytes())?;
        self.bytes += 9 + payload.len() as u64;
        Ok(())
    }

    pub fn json<T: Serialize>(&mut self, kind: Kind, v: &T) -> io::Result<()> {
        let b = serde_json::to_vec(v).map_err(io::Error::other)?;
        self.frame(kind, &b)
    }

    /// A `Chunks` frame: per chunk, id (32), codec u8, raw length u32, payload length u32,
    /// payload.
    pub fn chunks(&mut self, cs: &[Encoded]) -> io::Result<()> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        for c in cs {
            b.extend_from_slice(&c.id.0);
            b.push(c.codec as u8);
            b.extend_from_slice(&c.raw_len.to_le_bytes());
            b.extend_from_slice(&(c.payload.len() as u32).to_le_bytes());
            b.extend_from_slice(&c.payload);
        }
        let r = self.frame(Kind::Chunks, &b);
        self.buf = b;
        r
    }

    /// A `Map` frame: per slot, slot u64, present u8, then the id (32) if present.
    pub fn map(&mut self, slots: &[(u64, Option<ChunkId>)]) -> io::Result<()> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        for (i, id) in slots {
            b.extend_from_slice(&i.to_le_bytes());
            match id {
                Some(id) => {
                    b.push(1);
                    b.extend_from_slice(&id.0);
                }
                None => b.push(0),
            }
        }
        let r = self.frame(Kind::Map, &b);
        self.buf = b;
        r
    }

    /// A `Have` frame: the chunk ids, 32 bytes each.
    pub fn have(&mut self, ids: &[ChunkId]) -> io::Result<()> {
        let mut b = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            b.extend_from_slice(&id.0);
        }
        self.frame(Kind::Have, &b)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Map slots per `Map` frame (41 bytes each at most: under `FRAME_TARGET`).
pub const MAP_SLOTS_PER_FRAME: usize = FRAME_TARGET / 41;

/// Reads frames.
pub struct Reader<R: Read> {
    inp: R,
    /// Bytes read so far.
    pub bytes: u64,
    /// The frame being read, reused (as the writer's).
    buf: Vec<u8>,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl<R: Read> Reader<R> {
    pub fn new(mut inp: R) -> io::Result<Reader<R>> {
        let mut m = [0u8; 16];
        inp.read_exact(&mut m).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => bad("the input is empty or not a Tessera stream"),
            _ => e,
        })?;
        if m[..15] != MAGIC[..15] {
            return Err(bad(
                "the input is not a Tessera stream (made by tessera send)",
            ));
        }
        if m[15] != MAGIC[15] {
            return Err(bad(format!(
                "stream version {} is not supported (this build reads version {})",
                m[15], MAGIC[15]
            )));
        }
        Ok(Reader {
            inp,
            bytes: 16,
            buf: Vec::new(),
        })
    }

    /// The next frame; a stream cut short is an error, never a silent end.
    pub fn next_frame(&mut self) -> io::Result<Frame> {
        let mut head = [0u8; 5];
        self.inp.read_exact(&mut head).map_err(cut)?;
        let kind =
            Kind::from_u8(head[0]).ok_or_else(|| bad("unknown record kind: damaged stream"))?;
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        if len > FRAME_MAX {
            return Err(bad(format!("record of {len} bytes: damaged stream")));
        }
        let mut payload = std::mem::take(&mut self.buf);
        payload.resize(len, 0);
        let r = self.read_payload(kind, &head, &mut payload);
        self.buf = payload;
        r
    }

    fn read_payload(
        &mut self,
        kind: Kind,
        head: &[u8; 5],
        payload: &mut [u8],
    ) -> io::Result<Frame> {
        let len = payload.len();
        self.inp.read_exact(payload).map_err(cut)?;
        let mut crc = [0u8; 4];
        self.inp.read_exact(&mut crc).map_err(cut)?;
        let mut h = crc32fast::Hasher::new();
        h.update(head);
        h.update(payload);
        if h.finalize() != u32::from_le_bytes(crc) {
            return Err(bad(format!(
                "checksum mismatch in the record at byte {}: damaged stream",
                self.bytes
            )));
        }
        self.bytes += 9 + len as u64;
        let json = |p: &[u8]| {
            bad(format!(
                "bad record: {}",
                String::from_utf8_lossy(p)
                    .chars()
                    .take(80)
                    .collect::<String>()
            ))
        };
        Ok(match kind {
            Kind::Header => {
                Frame::Header(serde_json::from_slice(payload).map_err(|_| json(payload))?)
            }
            Kind::Entry => {
                Frame::Entry(serde_json::from_slice(payload).map_err(|_| json(payload))?)
            }
            Kind::End => Frame::End(serde_json::from_slice(payload).map_err(|_| json(payload))?),
            Kind::Chunks => Frame::Chunks(decode_chunks(payload)?),
            Kind::Map => Frame::Map(decode_map(payload)?),
            Kind::Have => {
                if !payload.len().is_multiple_of(32) {
                    return Err(bad("bad chunk list: damaged stream"));
                }
                Frame::Have(
                    payload
                        .chunks_exact(32)
                        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
                        .collect(),
                )
            }
        })
    }
}

fn cut(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the stream ends early: it was cut (send it again)",
        ),
        _ => e,
    }
}

fn decode_chunks(b: &[u8]) -> io::Result<Vec<Encoded>> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < b.len() {
        if b.len() - p < 41 {
            return Err(bad("truncated chunk record"));
        }
        let id = ChunkId(b[p..p + 32].try_into().expect("32 bytes"));
        let codec = Codec::from_u8(b[p + 32]).ok_or_else(|| bad("unknown chunk codec"))?;
        let raw_len = u32::from_le_bytes(b[p + 33..p + 37].try_into().expect("4"));
        let plen = u32::from_le_bytes(b[p + 37..p + 41].try_into().expect("4")) as usize;
        p += 41;
        if b.len() - p < plen {
            return Err(bad("truncated chunk payload"));
        }
        out.push(Encoded {
            id,
            payload: b[p..p + plen].to_vec(),
            codec,
            raw_len,
        });
        p += plen;
    }
    Ok(out)
}

fn decode_map(b: &[u8]) -> io::Result<Vec<(u64, Option<ChunkId>)>> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < b.len() {
        if b.len() - p < 9 {
            return Err(bad("truncated map record"));
        }
        let slot = u64::from_le_bytes(b[p..p + 8].try_into().expect("8"));
        let present = b[p + 8];
        p += 9;
        match present {
            0 => out.push((slot, None)),
            1 if b.len() - p >= 32 => {
                out.push((slot, Some(ChunkId(b[p..p + 32].try_into().expect("32")))));
                p += 32;
            }
            _ => return Err(bad("bad map record")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protects: frames round-trip, and a flipped byte or a cut stream is an error, never a
    /// short or wrong result.
    #[test]
    fn frames_roundtrip_and_damage_is_caught() {
        let mut buf = Vec::new();
        {
            let mut w = Writer::new(&mut buf).unwrap();
            w.json(
                Kind::End,
                &End {
                    entries: 3,
                    chunks: 2,
                    chunk_bytes: 9,
                },
            )
            .unwrap();
            let id = ChunkId::of(b"x");
            w.chunks(&[Encoded {
                id,
                payload: b"x".to_vec(),
                codec: Codec::Raw,
                raw_len: 1,
            }])
            .unwrap();
            w.map(&[(5, Some(id)), (6, None)]).unwrap();
        }
        let mut r = Reader::new(&buf[..]).unwrap();
        assert!(matches!(r.next_frame().unwrap(), Frame::End(e) if e.entries == 3));
        assert!(
            matches!(r.next_frame().unwrap(), Frame::Chunks(c) if c.len() == 1 && c[0].payload == b"x")
        );
        assert!(
            matches!(r.next_frame().unwrap(), Frame::Map(m) if m.len() == 2 && m[1] == (6, None))
        );
        assert!(r.next_frame().is_err(), "the end of input is not a frame");
        for i in 16..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            let mut r = Reader::new(&b[..]).unwrap();
            let all_ok = (0..3).all(|_| r.next_frame().is_ok());
            assert!(!all_ok, "a flip at byte {i} went unnoticed");
        }
        let mut r = Reader::new(&buf[..buf.len() - 3]).unwrap();
        let err = (0..3).find_map(|_| r.next_frame().err()).unwrap();
        assert!(err.to_string().contains("cut"), "{err}");
        assert!(Reader::new(&b"not a stream at all"[..]).is_err());
    }
}
