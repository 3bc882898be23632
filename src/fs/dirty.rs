//! One chunk of the write-back buffer: whole, or written in part with the stored chunk under
//! it (its base) not loaded yet.
//!
//! A 4 KiB write into a stored 16 KiB chunk used to load that chunk on the request path
//! (chunk-map lookup, pread, decompress, verify: 30-50 us, the largest single part of a random
//! write's CPU). The write now only copies its bytes and records the range; the flush loads
//! the bases of the chunks it takes in one batch on all cores and fills in the bytes nobody
//! wrote (`Engine::complete_partial`). Reads overlay the written ranges on the base. A chunk
//! whose writes end up covering it whole is never loaded at all.

use std::ops::Range;
use std::sync::Arc;

/// Separate written ranges a partial chunk may hold; a write that would add more loads the
/// base first (under the file's lock, the old way). Bounds the range list, and the cost of
/// each write's merge and each read's overlay, against a writer that scatters tiny writes.
pub(crate) const MAX_RANGES: usize = 32;

/// The newest unflushed bytes of one chunk.
#[derive(Clone, Debug)]
pub(crate) struct DirtyChunk {
    /// `chunk_size` bytes. Bytes outside `written` (when partial) are zero, not meaningful.
    buf: Box<[u8]>,
    /// `None`: whole, every byte is the chunk's newest content. `Some`: only these byte
    /// ranges were written (sorted, disjoint, never touching); the other bytes are the base's.
    written: Option<Vec<Range<u32>>>,
}

/// The written bytes of one partial chunk inside a read's range (`bytes` holds the range,
/// `ranges` are relative to its start), copied so the read can drop the file's lock.
pub(crate) struct Patch {
    bytes: Vec<u8>,
    ranges: Vec<Range<usize>>,
}

impl Patch {
    /// Put the written bytes over `out` (the base's bytes for the same range).
    pub(crate) fn apply(&self, out: &mut [u8]) {
        for r in &self.ranges {
            out[r.clone()].copy_from_slice(&self.bytes[r.clone()]);
        }
    }
}

impl DirtyChunk {
    /// A chunk written whole.
    pub(crate) fn whole(buf: Box<[u8]>) -> Self {
        DirtyChunk { buf, written: None }
    }

    /// A chunk with nothing written yet over its base.
    pub(crate) fn empty(len: usize) -> Self {
        DirtyChunk {
            buf: vec![0u8; len].into_boxed_slice(),
            written: Some(Vec::new()),
        }
    }

    /// Every byte is known: no base is needed.
    pub(crate) fn is_whole(&self) -> bool {
        self.written.is_none()
    }

    /// How many separate ranges are written (0 for a whole chunk).
    pub(crate) fn range_count(&self) -> usize {
        self.written.as_ref().map_or(0, Vec::len)
    }

    /// The chunk's bytes, if whole.
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        self.is_whole().then_some(&self.buf[..])
    }

    /// Copy `src` in at byte `at`.
    pub(crate) fn write(&mut self, at: usize, src: &[u8]) {
        let end = at + src.len();
        self.buf[at..end].copy_from_slice(src);
        let len = self.buf.len();
        let Some(w) = self.written.as_mut() else {
            return;
        };
        // Merge [at, end) with every range it overlaps or touches.
        let (mut s, mut e) = (at as u32, end as u32);
        let first = w.partition_point(|r| r.end < s);
        let mut last = first;
        while last < w.len() && w[last].start <= e {
            s = s.min(w[last].start);
            e = e.max(w[last].end);
            last += 1;
        }
        w.splice(first..last, std::iter::once(s..e));
        if w.len() == 1 && w[0] == (0..len as u32) {
            self.written = None;
        }
    }

    /// Whether every byte of `r` is known without the base.
    pub(crate) fn covers(&self, r: &Range<usize>) -> bool {
        match &self.written {
            None => true,
            Some(w) => {
                r.is_empty()
                    || w.iter()
                        .any(|x| x.start as usize <= r.start && r.end <= x.end as usize)
            }
        }
    }

    /// The buffer's bytes in `r` (meaningful where [`DirtyChunk::covers`] says so).
    pub(crate) fn slice(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The written bytes inside `r`, to put over the base's bytes of `r` later.
    pub(crate) fn patch(&self, r: Range<usize>) -> Patch {
        let ranges = match &self.written {
            None => std::iter::once(0..r.len()).collect(),
            Some(w) => w
                .iter()
                .map(|x| (x.start as usize).max(r.start)..(x.end as usize).min(r.end))
                .filter(|x| x.start < x.end)
                .map(|x| x.start - r.start..x.end - r.start)
                .collect(),
        };
        Patch {
            bytes: self.buf[r].to_vec(),
            ranges,
        }
    }

    /// The stored chunk `base` as a chunk to write into, taking its buffer when nothing else
    /// holds it (a base loaded for this write alone), or else copying it.
    pub(crate) fn from_stored(base: Arc<Vec<u8>>, len: usize) -> Self {
        match Arc::try_unwrap(base) {
            Ok(b) if b.len() == len => DirtyChunk::whole(b.into_boxed_slice()),
            other => {
                let mut d = DirtyChunk::empty(len);
                match other {
                    Ok(b) => d.complete(Some(&b)),
                    Err(shared) => d.complete(Some(&shared)),
                }
                d
            }
        }
    }

    /// [`DirtyChunk::complete`] from a stored chunk loaded for this completion: the written
    /// ranges are copied over the base's buffer, which becomes this chunk's (unless something
    /// else holds it, then the base is copied in as by `complete`). Copies a 4 KiB write
    /// rather than the 12 KiB around it, and the write-back buffer's own 16 KiB, touched only
    /// where written, is freed before its other pages are faulted in: page faults were a few
    /// percent of the daemon's CPU under random 4 KiB writes.
    pub(crate) fn complete_from(&mut self, base: Arc<Vec<u8>>) {
        let Some(w) = self.written.as_ref() else {
            return;
        };
        match Arc::try_unwrap(base) {
            Ok(mut b) if b.len() == self.buf.len() => {
                for r in w.iter().map(|r| r.start as usize..r.end as usize) {
                    b[r.clone()].copy_from_slice(&self.buf[r]);
                }
                self.buf = b.into_boxed_slice();
                self.written = None;
            }
            Ok(b) => self.complete(Some(&b)),
            Err(shared) => self.complete(Some(&shared)),
        }
    }

    /// Fill the bytes nobody wrote from `base` (the stored chunk; `None`: a hole, zeros, which
    /// those bytes already are). The chunk is whole afterwards.
    pub(crate) fn complete(&mut self, base: Option<&[u8]>) {
        let Some(w) = self.written.take() else {
            return;
        };
        if let Some(b) = base {
            let mut at = 0usize;
            for r in w
                .iter()
                .map(|r| r.start as usize..r.end as usize)
                .chain(std::iter::once(self.buf.len()..self.buf.len()))
            {
                self.buf[at..r.start].copy_from_slice(&b[at..r.start]);
                at = r.end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Protects the partial chunk against a model (each byte: written value or base):
        /// after any writes, every read range (covered or patched over the base) and the
        /// completed chunk hold exactly the model's bytes, and `covers` is exact.
        #[test]
        fn partial_chunk_matches_a_byte_model(
            writes in prop::collection::vec((0usize..64, 1usize..24, any::<u8>()), 0..40),
            reads in prop::collection::vec((0usize..64, 0usize..64), 1..10),
            hole in any::<bool>(),
            owned in any::<bool>(),
        ) {
            const LEN: usize = 64;
            let base: Vec<u8> = (0..LEN as u8).map(|b| b.wrapping_mul(7) | 1).collect();
            let mut model: Vec<Option<u8>> = vec![None; LEN];
            let mut c = DirtyChunk::empty(LEN);
            for (at, n, v) in writes {
                let n = n.min(LEN - at);
                c.write(at, &vec![v; n]);
                model[at..at + n].fill(Some(v));
            }
            let want = |i: usize| model[i].unwrap_or(if hole { 0 } else { base[i] });
            prop_assert_eq!(c.is_whole(), model.iter().all(Option::is_some));
            prop_assert!(c.range_count() <= LEN / 2 + 1);
            for (a, b) in reads {
                let r = a.min(b)..a.max(b);
                let known = model[r.clone()].iter().all(Option::is_some);
                prop_assert_eq!(c.covers(&r), known);
                let mut out: Vec<u8> = r.clone().map(|i| if hole { 0 } else { base[i] }).collect();
                c.patch(r.clone()).apply(&mut out);
                let expect: Vec<u8> = r.clone().map(want).collect();
                prop_assert_eq!(&out, &expect);
                if known {
                    prop_assert_eq!(c.slice(r.clone()), &expect[..]);
                }
            }
            if owned && !hole {
                c.complete_from(Arc::new(base.clone()));
            } else {
                c.complete((!hole).then_some(&base[..]));
            }
            let expect: Vec<u8> = (0..LEN).map(want).collect();
            prop_assert_eq!(c.bytes(), Some(&expect[..]));
        }
    }

    #[test]
    fn writes_that_cover_the_chunk_make_it_whole() {
        let mut c = DirtyChunk::empty(16);
        c.write(8, &[2; 8]);
        assert_eq!(c.range_count(), 1);
        c.write(0, &[1; 8]);
        assert!(c.is_whole(), "adjacent ranges merge into the whole chunk");
        assert_eq!(
            c.bytes().unwrap(),
            &[1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
        );
    }
}
