//! The phases of a process's life, and the one signal that reaches every
//! connection when it is time to go.
//!
//! `Serving` → (SIGTERM) `ShuttingDown`: `/readyz` answers 503 at once but
//! everything keeps working for `shutdown.grace`, so load balancers stop
//! sending new clients → `Draining`: each connection, at its own random
//! moment within `shutdown.drain`, tells its client to reconnect and closes;
//! spreading those moments avoids a reconnect storm on the remaining
//! instances → exit.
//!
//! The same clock rings every connection's heartbeat: one sweep for the
//! whole process ([`Lifecycle::run_clock`]) instead of a timer and a drain
//! waiter in each connection, which every delivery would otherwise poll.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the clock tells a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The drain began: the connection draws its moment to leave.
    Drain,
    /// Its heartbeat period went by.
    Heartbeat,
}

/// A connection the clock rings. Ringing must not block: it sets a flag
/// and wakes the connection's task.
pub(crate) trait Bell: Send + Sync {
    /// Tells the connection about `signal`.
    fn ring(&self, signal: Signal);
}

/// One connection on the clock: kept small (one per connection), with
/// its times in milliseconds of the clock's own epoch.
struct Entry {
    bell: Weak<dyn Bell>,
    /// When its heartbeat is next due.
    due_ms: u64,
    /// Its heartbeat period (at most 49 days).
    every_ms: u32,
    drained: bool,
}

/// See the module documentation.
pub(crate) struct Lifecycle {
    shutting_down: AtomicBool,
    drain: CancellationToken,
    window: Duration,
    /// Every open connection, by id.
    clock: Mutex<HashMap<u64, Entry>>,
    /// What the entries' times count from.
    epoch: Instant,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("shutting_down", &self.is_shutting_down())
            .field("draining", &self.drain.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// A serving process whose drain lasts `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            shutting_down: AtomicBool::new(false),
            drain: CancellationToken::new(),
            window,
            clock: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    fn clock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic elsewhere while holding the lock leaves the map usable.
        self.clock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts connection `id` on the clock: `bell` rings every `every`, and
    /// once when the drain begins (at once, if it already has).
    pub(crate) fn attach(&self, id: u64, bell: Weak<dyn Bell>, every: Duration) {
        // Read under the clock's lock: a drain that begins later sweeps
        // this entry; one that began already is rung here, once.
        let draining = {
            let mut clock = self.clock();
            let draining = self.drain.is_cancelled();
            let every_ms = u32::try_from(every.as_millis()).unwrap_or(u32::MAX);
            let entry = Entry {
                bell: bell.clone(),
                due_ms: self.now_ms() + u64::from(every_ms),
                every_ms,
                drained: draining,
            };
            clock.insert(id, entry);
            draining
        };
        if let (true, Some(bell)) = (draining, bell.upgrade()) {
            bell.ring(Signal::Drain);
        }
    }

    /// Milliseconds since the clock's epoch.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes connection `id` off the clock.
    pub(crate) fn detach(&self, id: u64) {
        self.clock().remove(&id);
    }

    /// Rings heartbeats every `tick` (a heartbeat is late by at most that
    /// much), and every connection at once when the drain begins, until
    /// `stop`.
    pub(crate) async fn run_clock(&self, tick: Duration, stop: CancellationToken) {
        let mut rung_drain = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
                _ = self.drain.cancelled(), if !rung_drain => rung_drain = true,
            }
            self.sweep();
        }
    }

    /// Rings what is due. The bells ring outside the lock.
    fn sweep(&self) {
        let now = self.now_ms();
        let draining = self.drain.is_cancelled();
        let mut due = Vec::new();
        for entry in self.clock().values_mut() {
            let drain = draining && !std::mem::replace(&mut entry.drained, true);
            let beat = entry.due_ms <= now;
            if beat {
                entry.due_ms = now + u64::from(entry.every_ms);
            }
            if drain || beat {
                if let Some(bell) = entry.bell.upgrade() {
                    due.push((bell, drain, beat));
                }
            }
        }
        for (bell, drain, beat) in due {
            if drain {
                bell.ring(Signal::Drain);
            }
            if beat {
                bell.ring(Signal::Heartbeat);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Rung(Mutex<Vec<Signal>>);

    impl Bell for Rung {
        fn ring(&self, signal: Signal) {
            self.0.lock().expect("lock").push(signal);
        }
    }

    fn rung(r: &Rung) -> Vec<Signal> {
        std::mem::take(&mut *r.0.lock().expect("lock"))
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_rings_heartbeats_and_the_drain_once() {
        let life = Arc::new(Lifecycle::new(Duration::from_secs(1)));
        let (a, b) = (Arc::new(Rung::default()), Arc::new(Rung::default()));
        life.attach(
            1,
            Arc::downgrade(&a) as Weak<dyn Bell>,
            Duration::from_secs(10),
        );
        life.attach(
            2,
            Arc::downgrade(&b) as Weak<dyn Bell>,
            Duration::from_secs(25),
        );
        let stop = CancellationToken::new();
        let clock = tokio::spawn({
            let (life, stop) = (Arc::clone(&life), stop.clone());
            async move { life.run_clock(Duration::from_secs(1), stop).await }
        });
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        assert_eq!(rung(&a), [Signal::Heartbeat]);
        assert_eq!(rung(&b), []);
        life.begin_drain();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rung(&a), [Signal::Drain], "at once, not at the next tick");
        assert_eq!(rung(&b), [Signal::Drain]);
        life.detach(1);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(rung(&a), [], "detached");
        assert_eq!(rung(&b), [Signal::Heartbeat], "the drain rings once");
        // A connection opened after the drain began hears of it at once.
        let c = Arc::new(Rung::default());
        life.attach(
            3,
            Arc::downgrade(&c) as Weak<dyn Bell>,
            Duration::from_secs(10),
        );
        assert_eq!(rung(&c), [Signal::Drain]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rung(&c), [], "and only once");
        stop.cancel();
        clock.await.expect("clock stops");
    }
}
