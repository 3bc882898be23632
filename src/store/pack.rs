//! Pack files: append-only logs of self-describing chunk records, and the I/O seam under them.
//!
//! # On-disk format (all integers little-endian)
//! A pack file `packs/<id as 8 hex digits>.pack` starts with a 16-byte header:
//! `b"TESSPACK"`, format version `u32` (1), pack id `u32`. Records follow back to back:
//!
//! | bytes | field |
//! |---|---|
//! | 4  | magic `0x3143_5354` ("TSC1") |
//! | 1  | codec (0 raw, 1 zstd) |
//! | 3  | reserved, zero |
//! | 4  | raw_len: uncompressed length |
//! | 4  | stored_len: payload length |
//! | 32 | chunk id: blake3 of the uncompressed bytes |
//! | 4  | crc32 of the 48 header bytes before it and of the payload |
//! | stored_len | payload |
//!
//! Every record describes itself, so the chunk index can be rebuilt by scanning packs; the crc
//! tells a torn or overwritten record from a good one before anything is decompressed.
//! Packs are only appended to; space is given back by rewriting live records into a new pack.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::chunk::{ChunkId, Codec};

/// Identifies a pack file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub u32);

pub const PACK_HEADER_LEN: u64 = 16;
pub const PACK_MAGIC: &[u8; 8] = b"TESSPACK";
pub const PACK_VERSION: u32 = 1;
pub const RECORD_MAGIC: u32 = 0x3143_5354;
pub const RECORD_HEADER_LEN: usize = 52;

/// Header of one chunk record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub codec: Codec,
    pub raw_len: u32,
    pub stored_len: u32,
    pub id: ChunkId,
    pub crc: u32,
}

/// Serialise a record (header + payload) ready to append.
pub fn encode_record(id: &ChunkId, codec: Codec, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    write_record(&mut out, id, codec, raw_len, payload);
    out
}

/// Append a record (header + payload) to `out`.
pub fn write_record(out: &mut Vec<u8>, id: &ChunkId, codec: Codec, raw_len: u32, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.push(codec as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&id.0);
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start..]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Parse a record header; `None` if the magic or codec is wrong.
pub fn decode_header(b: &[u8]) -> Option<RecordHeader> {
    if b.len() < RECORD_HEADER_LEN || u32::from_le_bytes(b[0..4].try_into().ok()?) != RECORD_MAGIC {
        return None;
    }
    Some(RecordHeader {
        codec: Codec::from_u8(b[4])?,
        raw_len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        stored_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
        id: ChunkId(b[16..48].try_into().ok()?),
        crc: u32::from_le_bytes(b[48..52].try_into().ok()?),
    })
}

/// True when `crc` matches the header bytes and payload.
pub fn record_crc_ok(header_bytes: &[u8], payload: &[u8], crc: u32) -> bool {
    let mut h = crc32fast::Hasher::new();
    h.update(&header_bytes[..48]);
    h.update(payload);
    h.finalize() == crc
}

/// Byte I/O on pack files. The engine never touches pack files except through this trait, so
/// tests can run it in memory and simulate crashes that lose unsynced appends.
pub trait PackIo: Send + Sync {
    /// Create an empty pack (with its header) and make its directory entry durable.
    fn create(&self, pack: PackId) -> io::Result<()>;
    /// Append bytes at the end; returns the offset they were written at.
    fn append(&self, pack: PackId, data: &[u8]) -> io::Result<u64>;
    /// [`PackIo::append`] of records likely to be written over in place later (chunks
    /// rewritten in part: their next versions take these records' places, `store::reuse`),
    /// laid out for cheap small writes into them.
    fn append_rewritable(&self, pack: PackId, data: &[u8]) -> io::Result<u64> {
        self.append(pack, data)
    }
    /// Read exactly `len` bytes at `offset`.
    fn read_at(&self, pack: PackId, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Read exactly `buf.len()` bytes at `offset` into `buf` (a buffer the caller reuses).
    fn read_into(&self, pack: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.read_at(pack, offset, buf.len())?);
        Ok(())
    }
    /// [`PackIo::read_at`] for a scan (scrub, fsck, compaction, repair): reads every pack
    /// once, so a cache of pack bytes (the tier's) must not let it push out what desktops read.
    fn read_at_scan(&self, pack: PackId, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.read_at(pack, offset, len)
    }
    /// Make every append so far durable.
    fn sync(&self, pack: PackId) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self, pack: PackId) -> io::Result<u64>;
    /// Every pack that exists, sorted.
    fn list(&self) -> io::Result<Vec<PackId>>;
    /// Delete a pack (used by compaction).
    fn remove(&self, pack: PackId) -> io::Result<()>;
    /// `pack` is complete and synced: nothing will be appended to it again (the S3 tier
    /// uploads it).
    fn sealed(&self, _pack: PackId) {}
    /// Size at which the store starts a new pack.
    fn pack_target(&self) -> u64 {
        super::PACK_TARGET_BYTES
    }
    /// Idle time after which the active pack is sealed (object-store tier only).
    fn seal_idle(&self) -> std::time::Duration {
        super::tier::SEAL_IDLE
    }
    /// The object-store tier's state, if the packs have one.
    fn tier(&self) -> Option<super::tier::TierStats> {
        None
    }
    /// Wait until the tier holds every sealed pack (no tier: nothing to wait for).
    fn drain(&self, _patience: std::time::Duration) -> io::Result<()> {
        Ok(())
    }
    /// The object-store tier, if the packs have one.
    fn as_tier(&self) -> Option<&super::tier::TieredPackIo> {
        None
    }
    /// Whether [`PackIo::write_at`] works: dead records' places may be written over
    /// (`store::reuse`). Packs in an object store never change.
    fn rewrites(&self) -> bool {
        false
    }
    /// Write `data` over bytes of `pack` at `offset` (a dead record's place, never past the
    /// end); synced by [`PackIo::sync`] as appends are.
    fn write_at(&self, _pack: PackId, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "these packs are never written over",
        ))
    }
}

fn pack_header(pack: PackId) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&pack.0.to_le_bytes());
    h
}

/// Pack files kept open at most; others are reopened on demand (least recently used first
/// out). Each open pack is a file descriptor: 256 cover 64 GiB of packs in use at once and
/// leave room under the 1024 a login shell allows for FUSE, NFS clients and redb.
pub const MAX_OPEN_PACKS: usize = 256;

/// Open pack files, with the tick of their last use.
#[derive(Default)]
struct OpenFiles {
    map: HashMap<PackId, (Arc<File>, u64)>,
    tick: u64,
}

/// Where the next append to a pack goes, and the handle that wrote since the last sync (kept
/// open until then, so `sync` reports write-back errors on the descriptor that wrote).
struct End {
    end: u64,
    unsynced: Option<Arc<File>>,
    /// Write-back of the bytes below this offset has been started (`WRITEBACK_STEP`).
    kicked: u64,
}

/// Every this many bytes appended to a pack, the kernel is asked to start writing them to the
/// disk (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for the writes), as
/// RocksDB's `bytes_per_sync` does. Without it a large machine's page cache holds gigabytes of
/// dirty pack data (the default background threshold is 10 % of RAM) that the next fsync (a
/// client's COMMIT, a durable flush) then writes all at once, with the disk idle until then.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Ask the kernel to start writing `len` bytes of `f` at `off` back to the disk, without
/// waiting for it. Advisory: errors surface at the next fsync of the same descriptor.
fn start_writeback(f: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for as long as `f` is borrowed; sync_file_range reads no
    // memory of ours, and its result is deliberately ignored (see above).
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Pack files in a directory of the host filesystem.
pub struct DirPackIo {
    dir: PathBuf,
    /// Most files kept in `open`.
    max_open: usize,
    /// Reads use `pread` on these; a handle evicted while a read uses it closes after it.
    open: Mutex<OpenFiles>,
    /// Packs appended to by this process (a few bytes each). Appends to one pack are
    /// serialised by the store; this lock orders them with `len` and `sync`. Lock order:
    /// `open`, then `ends`.
    ends: Mutex<HashMap<PackId, End>>,
}

impl DirPackIo {
    pub fn new(dir: &Path) -> io::Result<DirPackIo> {
        Self::with_max_open(dir, MAX_OPEN_PACKS)
    }

    /// As `new`, keeping at most `max_open` (at least 1) pack files open.
    pub fn with_max_open(dir: &Path, max_open: usize) -> io::Result<DirPackIo> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(crate::private::DIR_MODE)
            .create(dir)?;
        Ok(DirPackIo {
            dir: dir.to_path_buf(),
            max_open: max_open.max(1),
            open: Mutex::new(OpenFiles::default()),
            ends: Mutex::new(HashMap::new()),
        })
    }

    /// The file holding `pack`.
    pub fn path(&self, pack: PackId) -> PathBuf {
        self.dir.join(format!("{:08x}.pack", pack.0))
    }

    /// Remember an open file, closing the least recently used one past the cap.
    fn keep(&self, files: &mut OpenFiles, pack: PackId, f: Arc<File>) {
        files.tick += 1;
        files.map.insert(pack, (f, files.tick));
        if files.map.len() > self.max_open {
            // O(open files), only when a pack had to be opened (a syscall anyway).
            if let Some(old) = files.map.iter().min_by_key(|(_, (_, t))| *t).map(|e| *e.0) {
                files.map.remove(&old);
            }
        }
    }

    fn file(&self, pack: PackId) -> io::Result<Arc<File>> {
        let mut files = self.open.lock();
        files.tick += 1;
        let tick = files.tick;
        if let Some((f, used)) = files.map.get_mut(&pack) {
            *used = tick;
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path(pack))?,
        );
        self.keep(&mut files, pack, f.clone());
        Ok(f)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Most bytes of one write when appending records likely to be written over in place
/// (`PackIo::append_rewritable`; 64 KiB). The kernel (6.x) sizes the page-cache folios of a
/// buffered write by the write, and ext4 walks every block of a folio for each later write into
/// it: a 16 KiB record written over a dead one (`store::reuse`) in a pack appended in 4 MiB
/// writes (2 MiB folios) took 8.4 us of system time against 3.5 us in one appended in 64 KiB
/// writes. Other appends stay one write: a 2 GiB copy appended in 64 KiB writes took twice the
/// system time once memory freed by a deleted file was there to reuse (`benches/README.md`,
/// "Folios of appended packs").
const APPEND_PIECE: u64 = 64 * 1024;

impl DirPackIo {
    /// Append `data` in writes that end on multiples of `piece` bytes.
    fn append_in_pieces(&self, pack: PackId, data: &[u8], piece: u64) -> io::Result<u64> {
        let f = self.file(pack)?;
        let mut ends = self.ends.lock();
        let e = match ends.entry(pack) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let end = f.metadata()?.len();
                v.insert(End {
                    end,
                    unsynced: None,
                    kicked: end,
                })
            }
        };
        let off = e.end;
        let w = e.unsynced.get_or_insert(f);
        // In pieces that end on multiples of `piece`, so the page cache holds the appended
        // bytes in folios of at most that size.
        let (mut at, mut rest) = (off, data);
        while !rest.is_empty() {
            let n = rest.len().min((piece - at % piece) as usize);
            w.write_all_at(&rest[..n], at)?;
            at += n as u64;
            rest = &rest[n..];
        }
        // A short write (full disk) leaves a torn record past `end`; the next append
        // overwrites it, and nothing references it.
        e.end = off + data.len() as u64;
        if e.end - e.kicked >= WRITEBACK_STEP {
            start_writeback(w, e.kicked, e.end - e.kicked);
            e.kicked = e.end;
        }
        Ok(off)
    }
}

impl PackIo for DirPackIo {
    fn create(&self, pack: PackId) -> io::Result<()> {
        let path = self.path(pack);
        let f = crate::private::open_options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        f.write_all_at(&pack_header(pack), 0)?;
        f.sync_all()?;
        // The new name must be durable before any metadata commit can reference the pack.
        sync_dir(&self.dir)?;
        let f = Arc::new(f);
        self.keep(&mut self.open.lock(), pack, f);
        self.ends.lock().insert(
            pack,
            End {
                end: PACK_HEADER_LEN,
                unsynced: None,
                kicked: PACK_HEADER_LEN,
            },
        );
        Ok(())
    }

    fn append(&self, pack: PackId, data: &[u8]) -> io::Result<u64> {
        self.append_in_pieces(pack, data, u64::MAX)
    }

    fn append_rewritable(&self, pack: PackId, data: &[u8]) -> io::Result<u64> {
        self.append_in_pieces(pack, data, APPEND_PIECE)
    }

    fn rewrites(&self) -> bool {
        true
    }

    fn write_at(&self, pack: PackId, offset: u64, data: &[u8]) -> io::Result<()> {
        // `sync` makes it durable: fsync covers every write to the file, through any handle.
        self.file(pack)?.write_all_at(data, offset)
    }

    fn read_at(&self, pack: PackId, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let f = self.file(pack)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn read_into(&self, pack: PackId, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(pack)?.read_exact_at(buf, offset)
    }

    fn sync(&self, pack: PackId) -> io::Result<()> {
        let written = self
            .ends
            .lock()
            .get_mut(&pack)
            .and_then(|e| e.unsynced.take());
        let r = match &written {
            Some(f) => f.sync_data(),
            None => self.file(pack)?.sync_data(),
        };
        if r.is_err() {
            // Keep the descriptor that wrote so a retry reports on it too.
            if let Some(e) = self.ends.lock().get_mut(&pack) {
                e.unsynced = e.unsynced.take().or(written);
            }
        }
        r
    }

    fn len(&self, pack: PackId) -> io::Result<u64> {
        if let Some(e) = self.ends.lock().get(&pack) {
            return Ok(e.end);
        }
        Ok(self.file(pack)?.metadata()?.len())
    }

    fn list(&self) -> io::Result<Vec<PackId>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".pack") {
                if let Ok(n) = u32::from_str_radix(hex, 16) {
                    out.push(PackId(n));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, pack: PackId) -> io::Result<()> {
        self.open.lock().map.remove(&pack);
        self.ends.lock().remove(&pack);
        std::fs::remove_file(self.path(pack))?;
        sync_dir(&self.dir)
    }
}

/// Bytes a `MemPackIo::write_at` replaced: (offset, the old bytes).
type Overwrite = (usize, Vec<u8>);

/// In-memory packs for tests. `crash()` drops every byte appended after the last `sync`,
/// which is what a power loss does to a real pack file.
#[derive(Default)]
pub struct MemPackIo {
    packs: Mutex<HashMap<PackId, (Vec<u8>, usize)>>,
    /// Bytes written over (`write_at`) since the pack's last sync: (offset, the bytes that
    /// were there), oldest first. A crash puts them back: a power loss may drop any write
    /// the disk was not told to keep, and the engine must not care.
    overwritten: Mutex<HashMap<PackId, Vec<Overwrite>>>,
    /// `pack_target` if set (tests of what spans several packs).
    target: Option<u64>,
}

impl MemPackIo {
    /// Packs that are full at `bytes`.
    pub fn with_pack_target(bytes: u64) -> MemPackIo {
        MemPackIo {
            target: Some(bytes),
            ..MemPackIo::default()
        }
    }

    /// Forget unsynced appends, as a power loss would.
    pub fn crash(&self) {
        self.undo_overwrites();
        for (data, synced) in self.packs.lock().values_mut() {
            data.truncate(*synced);
        }
    }

    /// Put back the bytes every unsynced `write_at` replaced, newest first.
    fn undo_overwrites(&self) {
        let mut packs = self.packs.lock();
        for (pack, writes) in self.overwritten.lock().drain() {
            if let Some((data, _)) = packs.get_mut(&pack) {
                for (off, old) in writes.into_iter().rev() {
                    let end = (off + old.len()).min(data.len());
                    if off < end {
                        data[off..end].copy_from_slice(&old[..end - off]);
                    }
                }
            }
        }
    }

    /// A power loss that tears the unsynced tail of each pack: `keep(n)` says how many of a
    /// pack's `n` unsynced bytes reached the disk (a prefix: appends are written in order),
    /// and the last kept byte of a torn record may be garbage, as a half-written sector is.
    pub fn crash_torn(&self, mut keep: impl FnMut(usize) -> usize) {
        self.undo_overwrites();
        for (data, synced) in self.packs.lock().values_mut() {
            let unsynced = data.len() - *synced;
            let k = keep(unsynced).min(unsynced);
            data.truncate(*synced + k);
            if k > 0 && k < unsynced {
                if let Some(b) = data.last_mut() {
                    *b ^= 0x5a;
                }
            }
        }
    }

    /// The packs that exist (tests).
    pub fn list_packs(&self) -> Vec<PackId> {
        self.list().unwrap_or_default()
    }

    /// Flip bits of one byte in place (corruption tests).
    pub fn corrupt(&self, pack: PackId, offset: usize, byte: u8) {
        if let Some((data, _)) = self.packs.lock().get_mut(&pack) {
            if offset < data.len() {
                data[offset] ^= byte;
            }
        }
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such pack")
}

impl PackIo for MemPackIo {
    fn pack_target(&self) -> u64 {
        self.target.unwrap_or(super::PACK_TARGET_BYTES)
    }
    fn create(&self, pack: PackId) -> io::Result<()> {
        let h = pack_header(pack).to_vec();
        self.packs
            .lock()
            .insert(pack, (h, PACK_HEADER_LEN as usize));
        Ok(())
    }
    fn append(&self, pack: PackId, data: &[u8]) -> io::Result<u64> {
        let mut packs = self.packs.lock();
        let (buf, _) = packs.get_mut(&pack).ok_or_else(not_found)?;
        let off = buf.len() as u64;
        buf.extend_from_slice(data);
        Ok(off)
    }
    fn read_at(&self, pack: PackId, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let packs = self.packs.lock();
        let (buf, _) = packs.get(&pack).ok_or_else(not_found)?;
        let s = offset as usize;
        buf.get(s..s + len)
            .map(|b| b.to_vec())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short pack"))
    }
    fn sync(&self, pack: PackId) -> io::Result<()> {
        let mut packs = self.packs.lock();
        let (buf, synced) = packs.get_mut(&pack).ok_or_else(not_found)?;
        *synced = buf.len();
        self.overwritten.lock().remove(&pack);
        Ok(())
    }
    fn rewrites(&self) -> bool {
        true
    }
    fn write_at(&self, pack: PackId, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut packs = self.packs.lock();
        let (buf, _) = packs.get_mut(&pack).ok_or_else(not_found)?;
        let (s, e) = (offset as usize, offset as usize + data.len());
        if e > buf.len() {
            return Err(io::Error::other("write past the end of a pack"));
        }
        self.overwritten
            .lock()
            .entry(pack)
            .or_default()
            .push((s, buf[s..e].to_vec()));
        buf[s..e].copy_from_slice(data);
        Ok(())
    }
    fn len(&self, pack: PackId) -> io::Result<u64> {
        Ok(self.packs.lock().get(&pack).ok_or_else(not_found)?.0.len() as u64)
    }
    fn list(&self) -> io::Result<Vec<PackId>> {
        let mut v: Vec<PackId> = self.packs.lock().keys().copied().collect();
        v.sort();
        Ok(v)
    }
    fn remove(&self, pack: PackId) -> io::Result<()> {
        self.packs.lock().remove(&pack);
        self.overwritten.lock().remove(&pack);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_crc_detects_flips() {
        let id = ChunkId::of(b"hello");
        let rec = encode_record(&id, Codec::Raw, 5, b"hello");
        let h = decode_header(&rec).unwrap();
        assert_eq!(h.id, id);
        assert_eq!(h.stored_len, 5);
        assert!(record_crc_ok(&rec, &rec[RECORD_HEADER_LEN..], h.crc));
        let mut bad = rec.clone();
        bad[RECORD_HEADER_LEN + 1] ^= 1;
        assert!(!record_crc_ok(&bad, &bad[RECORD_HEADER_LEN..], h.crc));
    }

    #[test]
    fn mem_crash_drops_unsynced_appends() {
        let io = MemPackIo::default();
        io.create(PackId(1)).unwrap();
        io.append(PackId(1), b"abc").unwrap();
        io.sync(PackId(1)).unwrap();
        io.append(PackId(1), b"def").unwrap();
        io.crash();
        assert_eq!(io.len(PackId(1)).unwrap(), PACK_HEADER_LEN + 3);
    }

    #[test]
    fn dir_io_appends_and_lists() {
        let d = tempfile::tempdir().unwrap();
        let io = DirPackIo::new(d.path()).unwrap();
        io.create(PackId(7)).unwrap();
        let off = io.append(PackId(7), b"xyz").unwrap();
        assert_eq!(off, PACK_HEADER_LEN);
        assert_eq!(io.read_at(PackId(7), off, 3).unwrap(), b"xyz");
        assert_eq!(io.list().unwrap(), vec![PackId(7)]);
    }

    /// Protects appends written in pieces (`append_rewritable`): batches larger than a piece, from
    /// offsets that are not on a piece boundary, land whole, back to back, where `append` said.
    #[test]
    fn dir_io_appends_large_batches_whole_in_pieces() {
        let d = tempfile::tempdir().unwrap();
        let io = DirPackIo::new(d.path()).unwrap();
        io.create(PackId(3)).unwrap();
        let sizes = [
            1usize,
            5 * APPEND_PIECE as usize + 17,
            APPEND_PIECE as usize,
            4 << 20,
        ];
        let mut expect = Vec::new();
        for (i, n) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|j| (j * 31 + i * 7) as u8).collect();
            let off = io.append_rewritable(PackId(3), &data).unwrap();
            expect.push((off, data));
        }
        let mut end = PACK_HEADER_LEN;
        for (off, data) in &expect {
            assert_eq!(*off, end, "appends not back to back");
            assert!(io.read_at(PackId(3), *off, data.len()).unwrap() == *data);
            end += data.len() as u64;
        }
        assert_eq!(io.len(PackId(3)).unwrap(), end);
    }

    /// Descriptors this process holds on files under `dir`.
    fn fds_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(dir)))
            .count()
    }

    #[test]
    fn dir_io_keeps_a_bounded_number_of_packs_open() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().canonicalize().unwrap();
        let io = DirPackIo::with_max_open(&dir, 4).unwrap();
        for p in 1..=40 {
            io.create(PackId(p)).unwrap();
            io.append(PackId(p), &p.to_le_bytes()).unwrap();
            io.sync(PackId(p)).unwrap();
            assert!(fds_under(&dir) <= 4, "{} packs open", fds_under(&dir));
        }
        // Read every pack twice: each is reopened on demand, the oldest closed.
        for _ in 0..2 {
            for p in 1..=40u32 {
                let b = io.read_at(PackId(p), PACK_HEADER_LEN, 4).unwrap();
                assert_eq!(b, p.to_le_bytes());
                assert_eq!(io.len(PackId(p)).unwrap(), PACK_HEADER_LEN + 4);
            }
            assert!(fds_under(&dir) <= 4, "{} packs open", fds_under(&dir));
        }
        // Appends after a reopen go to the end, not over it.
        let off = io.append(PackId(1), b"more").unwrap();
        assert_eq!(off, PACK_HEADER_LEN + 4);
        io.sync(PackId(1)).unwrap();
        let fresh = DirPackIo::with_max_open(&dir, 4).unwrap();
        assert_eq!(fresh.len(PackId(1)).unwrap(), PACK_HEADER_LEN + 8);
        assert_eq!(fresh.append(PackId(2), b"x").unwrap(), PACK_HEADER_LEN + 4);
    }

    #[test]
    fn dir_io_creates_private_packs() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("packs");
        let io = DirPackIo::new(&dir).unwrap();
        io.create(PackId(1)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir) & 0o077, 0);
        assert_eq!(mode(&dir.join("00000001.pack")) & 0o077, 0);
    }
}
