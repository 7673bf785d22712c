//! The phases of a process's life, and the one signal that reaches every
//! connection when it is time to go.
//!
//! `Serving` → (SIGTERM) `ShuttingDown`: `/readyz` answers 503 at once but
//! everything keeps working for `shutdown.grace`, so load balancers stop
//! sending new clients → `Draining`: each connection, at its own random
//! moment within `shutdown.drain`, tells its client to reconnect and closes;
//! spreading those moments avoids a reconnect storm on the remaining
//! instances → exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    shutting_down: AtomicBool,
    drain: CancellationToken,
    window: Duration,
}

impl Lifecycle {
    /// A serving process whose drain lasts `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            shutting_down: AtomicBool::new(false),
            drain: CancellationToken::new(),
            window,
        }
    }

    /// SIGTERM received: stop being ready.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Whether `/readyz` must answer 503.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The grace period is over: connections start leaving.
    pub(crate) fn begin_drain(&self) {
        self.begin_shutdown();
        self.drain.cancel();
    }

    /// Cancelled when the drain begins.
    pub(crate) fn drain_started(&self) -> &CancellationToken {
        &self.drain
    }

    /// A connection's moment to leave, drawn once the drain began: a
    /// random wait within the drain window (spreading reconnects out), and
    /// the delay, in milliseconds, its client should wait before
    /// reconnecting.
    pub(crate) fn my_turn(&self) -> (Duration, u64) {
        let mut rng = rand::rng();
        let wait = rng.random_range(Duration::ZERO..=self.window);
        (wait, rng.random_range(100..=1_000u64))
    }
}
