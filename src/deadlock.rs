//! Test builds only: a watchdog that fails the run when locks deadlock.
//!
//! Test builds enable parking_lot's deadlock detection (Cargo.toml, dev-dependencies): every
//! parking_lot `Mutex`/`RwLock`/`Condvar` records which thread waits for which lock, and
//! `check_deadlock` finds the cycles, a thread waiting for a lock it already holds included.
//! The race, crash and property tests start this watchdog; it checks every 100 ms and aborts
//! the test process with the backtrace of every deadlocked thread, so a lock-order mistake
//! fails the run at once, with the locks named, instead of hanging it until CI's time limit.
//! Limit: locks of other crates (redb's std mutexes) are not seen.

use std::io::Write;
use std::sync::Once;
use std::time::Duration;

/// Start the watchdog (once per test process).
pub(crate) fn watchdog() {
    static START: Once = Once::new();
    START.call_once(|| {
        std::thread::Builder::new()
            .name("deadlock-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(100));
                let cycles = parking_lot::deadlock::check_deadlock();
                if cycles.is_empty() {
                    continue;
                }
                // Straight to fd 2: the test harness captures `eprintln!` of threads spawned
                // by a test, and the capture is lost when the process aborts.
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "DEADLOCK: {} cycle(s) of threads waiting on locks",
                    cycles.len()
                );
                for (i, threads) in cycles.iter().enumerate() {
                    for t in threads {
                        let _ = writeln!(
                            err,
                            "cycle {i}, thread {:?}:\n{:?}",
                            t.thread_id(),
                            t.backtrace()
                        );
                    }
                }
                std::process::abort();
            })
            .expect("spawn the deadlock watchdog");
    });
}
