//! Rate limiting of background work (compaction, scrub) so guest I/O keeps its speed: the
//! caller reports bytes done and sleeps whenever it is ahead of the allowed rate.

use std::time::{Duration, Instant};

/// Keeps a long task at or under `rate` bytes per second on average (`None`: unlimited).
pub struct Pacer {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    pub fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate: rate.filter(|&r| r > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// `n` more bytes were done; sleep until the average rate is back under the limit.
    pub fn done(&mut self, n: u64) {
        self.bytes += n;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            let spent = self.start.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protects: the pacer holds the average rate (it sleeps while ahead) and never sleeps
    /// when unlimited.
    #[test]
    fn holds_the_rate() {
        let t = Instant::now();
        let mut p = Pacer::new(Some(10 << 20));
        for _ in 0..4 {
            p.done(1 << 20);
        }
        // 4 MiB at 10 MiB/s: at least 0.4 s
        assert!(t.elapsed() >= Duration::from_millis(390));
        let t = Instant::now();
        let mut p = Pacer::new(None);
        p.done(u64::MAX / 2);
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
