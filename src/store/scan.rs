//! Reading packs without the index: every intact record of a pack, found by parsing records
//! one after the other and resynchronising on the record magic after damage (`fsck --repair`
//! rebuilds the index from this).

use std::collections::HashMap;

use super::chunk::{self, ChunkId};
use super::pack::{
    decode_header, record_crc_ok, PackId, PACK_HEADER_LEN, RECORD_HEADER_LEN, RECORD_MAGIC,
};
use super::{ChunkLoc, Store, StoreError, MAX_RECORD_PAYLOAD};

/// What a scan of one pack found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub records_intact: u64,
    /// Stretches of pack bytes that did not parse as intact records (skipped).
    pub damaged_stretches: u64,
}

impl Store {
    /// Every intact record of `pack` into `found` (the first intact copy of each chunk wins):
    /// header, crc32, decompression and blake3 against the id are all checked.
    pub fn scan_pack(
        &self,
        pack: PackId,
        found: &mut HashMap<ChunkId, ChunkLoc>,
    ) -> Result<ScanStats, StoreError> {
        let io = self.io();
        let len = io.len(pack)?;
        let mut r = ScanStats::default();
        let mut off = PACK_HEADER_LEN;
        let mut in_damage = false;
        while off + RECORD_HEADER_LEN as u64 <= len {
            let intact = (|| {
                let h = io.read_at_scan(pack, off, RECORD_HEADER_LEN).ok()?;
                let hd = decode_header(&h)?;
                if hd.stored_len > MAX_RECORD_PAYLOAD
                    || off + (RECORD_HEADER_LEN as u64) + u64::from(hd.stored_len) > len
                {
                    return None;
                }
                let payload = io
                    .read_at_scan(pack, off + RECORD_HEADER_LEN as u64, hd.stored_len as usize)
                    .ok()?;
                if !record_crc_ok(&h, &payload, hd.crc) {
                    return None;
                }
                let raw = chunk::decode(&payload, hd.codec, hd.raw_len as usize)?;
                (ChunkId::of(&raw) == hd.id).then_some(hd)
            })();
            match intact {
                Some(hd) => {
                    in_damage = false;
                    r.records_intact += 1;
                    found.entry(hd.id).or_insert(ChunkLoc {
                        pack,
                        offset: off,
                        stored_len: hd.stored_len,
                        raw_len: hd.raw_len,
                        codec: hd.codec,
                        refs: 0,
                    });
                    off += RECORD_HEADER_LEN as u64 + u64::from(hd.stored_len);
                }
                None => {
                    if !in_damage {
                        r.damaged_stretches += 1;
                        in_damage = true;
                    }
                    // Resynchronise: the next record magic after this offset.
                    off = match self.next_magic(pack, off + 1, len)? {
                        Some(o) => o,
                        None => break,
                    };
                }
            }
        }
        Ok(r)
    }

    /// Offset of the next record magic in `pack` at or after `from`.
    fn next_magic(&self, pack: PackId, from: u64, len: u64) -> Result<Option<u64>, StoreError> {
        const WINDOW: u64 = 1 << 20;
        let magic = RECORD_MAGIC.to_le_bytes();
        let mut at = from;
        while at + 4 <= len {
            let n = WINDOW.min(len - at) as usize;
            let buf = self.io().read_at_scan(pack, at, n)?;
            if let Some(i) = buf.windows(4).position(|w| w == magic) {
                return Ok(Some(at + i as u64));
            }
            // overlap by 3 bytes so a magic across windows is found
            at += (n as u64).saturating_sub(3).max(1);
        }
        Ok(None)
    }
}
