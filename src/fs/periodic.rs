//! Background work of a serving process that runs on an interval (reclamation, snapshot and
//! replication schedules), on its own thread, for as long as the engine lives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;

/// How often a waiting thread checks that the engine still lives: it ends within this long of
/// the engine being dropped.
const CHECK: Duration = Duration::from_millis(500);

impl Engine {
    /// Run `f` every `interval` on a thread named `name`. The thread holds no strong reference
    /// to the engine while it waits, and ends once the engine is dropped.
    pub fn spawn_periodic(
        self: &Arc<Self>,
        name: &str,
        interval: Duration,
        f: impl Fn(&Arc<Engine>) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                let start = Instant::now();
                while start.elapsed() < interval {
                    std::thread::sleep(CHECK.min(interval));
                    if weak.strong_count() == 0 {
                        return;
                    }
                }
                let Some(e) = weak.upgrade() else { return };
                f(&e);
            })
            .unwrap_or_else(|err| panic!("cannot start the {name} thread: {err}"))
    }
}
