//! Where the engine's time goes: CPU time and call counts per stage of the data path.
//!
//! Each stage accumulates the CPU time of the thread running it (CLOCK_THREAD_CPUTIME_ID),
//! not wall time: on a loaded machine wall time also counts the waits for a core, which
//! would charge every stage for the others. Stages that run on several threads at once
//! (hashing and compression run on all cores) add up every thread's time, so a stage's
//! seconds compare with the process's CPU time. `tessera stats` shows them for a serving
//! datastore; benches/README.md turns them into the cost of one 4 KiB random write. Frequent
//! stages are sampled (one call in [`SAMPLE_EVERY`] is measured), so the clock costs well
//! under a percent of the CPU; totals are estimates, exact in the long run. A stage timed
//! inside another (a write that loads the chunk it lands in) is charged to itself only: the
//! outer stage's time leaves it out, so the stages add up to the CPU they used.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A stage of the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A write call into the write-back buffer, without the loads it makes (`RmwRead`).
    Write,
    /// Loading the stored chunk a partial write lands in (read, decompress, verify): by the
    /// flush, or by the write past half the dirty limit or after `dirty::MAX_RANGES` ranges.
    RmwRead,
    /// A read call (chunk map lookups, pack reads, decompression, verification).
    Read,
    /// blake3 of flushed chunks.
    Hash,
    /// Compressing new chunks (incompressibility check included).
    Compress,
    /// Appending records to packs (copies into the page cache).
    Append,
    /// The metadata transaction of a flush: chunk-map and index updates, the redb commit
    /// (not made durable here).
    Commit,
    /// Durable commits: pack fdatasync and the redb durable commit (fsync, COMMIT, metadata
    /// operations, the periodic flush).
    Durable,
}

impl Stage {
    /// Called once per request or per chunk (sampled), not once per batch.
    fn is_frequent(self) -> bool {
        matches!(
            self,
            Stage::Write | Stage::RmwRead | Stage::Read | Stage::Hash | Stage::Compress
        )
    }
}

const STAGES: [(Stage, &str); 8] = [
    (Stage::Write, "write"),
    (Stage::RmwRead, "rmw_read"),
    (Stage::Read, "read"),
    (Stage::Hash, "hash"),
    (Stage::Compress, "compress"),
    (Stage::Append, "append"),
    (Stage::Commit, "commit"),
    (Stage::Durable, "durable"),
];

/// Calls per stage of which one is timed (see [`Timings::time`]).
pub const SAMPLE_EVERY: u64 = 8;

thread_local! {
    /// Inside a measured stage on this thread: the CPU ns its nested stages took so far
    /// (`None` outside any measured stage).
    static NESTED_NS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Per-stage accumulators.
#[derive(Default)]
pub struct Timings {
    ns: [AtomicU64; STAGES.len()],
    calls: [AtomicU64; STAGES.len()],
}

/// One stage's totals since the datastore was opened.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageTime {
    pub stage: String,
    pub calls: u64,
    /// Seconds spent in the stage, summed over threads.
    pub seconds: f64,
}

impl Timings {
    /// Run `f`, charging the CPU time it takes on this thread to `stage`. One call in
    /// [`SAMPLE_EVERY`] is measured and counts for that many: the thread CPU clock is a
    /// system call (about 0.5 us), which on every 4 KiB write cost a few percent of the CPU.
    /// Rare stages (appends, commits) are measured every time.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let i = stage as usize;
        let every = if stage.is_frequent() { SAMPLE_EVERY } else { 1 };
        let n = self.calls[i].fetch_add(1, Ordering::Relaxed);
        let sampled = n.is_multiple_of(every);
        // Inside a measured stage every nested call is measured, sampled or not, so the
        // outer stage can leave out exactly what its nested stages took.
        let outer = NESTED_NS.with(Cell::get);
        if !sampled && outer.is_none() {
            return f();
        }
        /// Puts the enclosing stage's count back even if `f` unwinds (otherwise every later
        /// call on this thread would be measured as if nested).
        struct Restore(Option<u64>, u64);
        impl Drop for Restore {
            fn drop(&mut self) {
                let total = thread_cpu_ns().saturating_sub(self.1);
                NESTED_NS.with(|c| c.set(self.0.map(|o| o + total)));
            }
        }
        NESTED_NS.with(|c| c.set(Some(0)));
        let t = thread_cpu_ns();
        let restore = Restore(outer, t);
        let r = f();
        let total = thread_cpu_ns().saturating_sub(t);
        let nested = NESTED_NS.with(Cell::get).unwrap_or(0);
        drop(restore);
        if sampled {
            let own = total.saturating_sub(nested);
            self.ns[i].fetch_add(own * every, Ordering::Relaxed);
        }
        r
    }

    /// Charge `ns` measured by the caller to one call of `stage` (rare calls: every one is
    /// measured).
    pub(crate) fn add(&self, stage: Stage, ns: u64) {
        let i = stage as usize;
        self.ns[i].fetch_add(ns, Ordering::Relaxed);
        self.calls[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<StageTime> {
        STAGES
            .iter()
            .map(|&(s, name)| StageTime {
                stage: name.to_string(),
                calls: self.calls[s as usize].load(Ordering::Relaxed),
                seconds: self.ns[s as usize].load(Ordering::Relaxed) as f64 / 1e9,
            })
            .collect()
    }
}

/// CPU time of the calling thread, in nanoseconds (0 if the clock is unavailable).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and
    // CLOCK_THREAD_CPUTIME_ID is a clock id every Linux kernel accepts.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_named_in_order_and_accumulate() {
        for (i, (s, _)) in STAGES.iter().enumerate() {
            assert_eq!(
                *s as usize, i,
                "STAGES must list stages in declaration order"
            );
        }
        let t = Timings::default();
        // CPU time, not wall time: a sleep costs (almost) nothing. The first call of a stage
        // is measured (and counts for SAMPLE_EVERY calls).
        t.time(Stage::Read, || {
            std::thread::sleep(std::time::Duration::from_millis(20))
        });
        let slept = t.snapshot()[Stage::Read as usize].seconds;
        assert!(
            slept < 0.01 * SAMPLE_EVERY as f64,
            "a sleep was charged {slept} s"
        );
        // A busy measured call is charged its CPU time on this thread (2 ms of it, however
        // long the machine makes it wait for a core), times SAMPLE_EVERY; the unmeasured
        // calls after it add calls, not time.
        let before = thread_cpu_ns();
        t.time(Stage::Hash, || {
            while thread_cpu_ns() - before < 2_000_000 {
                std::hint::black_box(blake3::hash(b"busy"));
            }
        });
        let spent = (thread_cpu_ns() - before) as f64 / 1e9;
        for _ in 1..SAMPLE_EVERY {
            t.time(Stage::Hash, || ());
        }
        let snap = t.snapshot();
        let hash = snap.iter().find(|s| s.stage == "hash").unwrap();
        assert_eq!(hash.calls, SAMPLE_EVERY);
        let per_call = hash.seconds / SAMPLE_EVERY as f64;
        assert!(
            (0.0019..=spent).contains(&per_call),
            "2 ms of work was charged {per_call} s per sampled call"
        );
        assert!(snap
            .iter()
            .filter(|s| s.stage != "hash" && s.stage != "read")
            .all(|s| s.calls == 0));
        // A rare stage is measured on every call: a second durable commit is not missed.
        t.time(Stage::Durable, || ());
        let before = thread_cpu_ns();
        t.time(Stage::Durable, || {
            while thread_cpu_ns() - before < 1_000_000 {
                std::hint::black_box(blake3::hash(b"busy"));
            }
        });
        let durable = t.snapshot()[Stage::Durable as usize].seconds;
        assert!(
            durable >= 0.0009,
            "the second durable commit was charged {durable} s"
        );
    }

    /// Protects the per-I/O breakdown in benches/vdi.sh: a stage timed inside another (a
    /// write loading its chunk) is charged once, to itself, not to both, so the stages add up
    /// to the CPU used and the front end's share (the rest) is not understated.
    #[test]
    fn a_nested_stage_is_charged_to_itself_only() {
        let busy = |ms: u64| {
            let start = thread_cpu_ns();
            while thread_cpu_ns() - start < ms * 1_000_000 {
                std::hint::black_box(blake3::hash(b"busy"));
            }
        };
        let t = Timings::default();
        // Rare stages (measured on every call) outside, a sampled one inside: the nested call
        // is measured even when its own sampling would skip it.
        t.time(Stage::Read, || ());
        t.time(Stage::Commit, || {
            busy(2);
            t.time(Stage::Read, || busy(3));
            t.time(Stage::Append, || {
                busy(1);
                t.time(Stage::Hash, || busy(1));
            });
        });
        let secs = |s: Stage| t.snapshot()[s as usize].seconds;
        let commit = secs(Stage::Commit);
        assert!(
            (0.0019..0.0035).contains(&commit),
            "the outer stage was charged {commit} s for 2 ms of its own work"
        );
        let append = secs(Stage::Append);
        assert!(
            (0.0009..0.0025).contains(&append),
            "the middle stage was charged {append} s for 1 ms of its own work"
        );
        // The second call of a sampled stage counts a call only (its 3 ms are left out of
        // the outer stage, and stay out of its own total); the first inner hash is sampled
        // and charged for SAMPLE_EVERY calls.
        let read = secs(Stage::Read);
        assert!(read < 0.001, "an unsampled call was charged: {read} s");
        let hash = secs(Stage::Hash) / SAMPLE_EVERY as f64;
        assert!((0.0009..0.0025).contains(&hash), "hash: {hash} s");
        // A stage that unwinds leaves the thread outside any stage again.
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.time(Stage::Durable, || panic!("a failing stage"))
        }));
        assert!(unwound.is_err());
        assert_eq!(NESTED_NS.with(Cell::get), None);
    }
}
