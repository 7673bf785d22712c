//! What both supervisors (one node, a Cluster) share besides the relay:
//! their common state ([`Supervision`]: the hub's requests, health, the
//! timings of `[redis]`), the [`Canary`] that tells whether their pub/sub
//! connection delivers, and [`backoff`], which paces their reconnects.

use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::command::Redis;
use super::relay::Relay;
use super::{BrokerHealth, Control, Wiring};
use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// What a supervisor owns whatever the topology.
pub(super) struct Supervision {
    /// Every channel the hub wants, and the way to it.
    pub(super) relay: Relay,
    /// The command connection.
    pub(super) redis: Redis,
    /// The hub's subscribe and unsubscribe requests, applied in order.
    pub(super) control: mpsc::UnboundedReceiver<Control>,
    pub(super) health: BrokerHealth,
    pub(super) metrics: Metrics,
    pub(super) stop: CancellationToken,
    /// The canary's channel (on a Cluster, each shard's canary is this name
    /// with a hash tag that lands on it).
    pub(super) canary: String,
    pub(super) canary_interval: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) reconnect_max: Duration,
}

impl Supervision {
    /// A supervisor's state, not ready until its canary comes back.
    pub(super) fn new(
        config: &RedisConfig,
        wiring: Wiring,
        redis: Redis,
        stop: CancellationToken,
    ) -> Self {
        let Wiring {
            hub,
            policy: _,
            control,
            health,
            metrics,
        } = wiring;
        health.set(false, &metrics);
        let canary = format!(
            "{}crier:canary:{:016x}",
            config.channel_prefix,
            rand::rng().random::<u64>()
        );
        Supervision {
            relay: Relay::new(hub, redis.clone(), metrics.clone()),
            redis,
            control,
            health,
            metrics,
            stop,
            canary,
            canary_interval: config.canary_interval,
            connect_timeout: config.connect_timeout,
            reconnect_max: config.reconnect_max,
        }
    }
}

/// First reconnect delay; doubles per failed attempt up to `reconnect_max`.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// Publish → receive through Redis, every half interval; unanswered for
/// longer than the interval means "connected but not receiving".
pub(super) struct Canary {
    interval: Duration,
    seq: u64,
    /// The oldest canary not yet received back.
    waiting: Option<(u64, Instant)>,
}

impl Canary {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            seq: 0,
            waiting: None,
        }
    }

    /// The next canary to send, unless one is still on its way.
    pub(super) fn next(&mut self) -> Option<u64> {
        if self.waiting.is_some() && !self.overdue() {
            return None;
        }
        self.seq += 1;
        if self.waiting.is_none() {
            self.waiting = Some((self.seq, Instant::now()));
        }
        Some(self.seq)
    }

    pub(super) fn lost(&self) -> bool {
        self.waiting
            .is_some_and(|(_, sent)| sent.elapsed() > self.interval * 3)
    }

    pub(super) fn overdue(&self) -> bool {
        self.waiting
            .is_some_and(|(_, sent)| sent.elapsed() > self.interval)
    }

    /// Redis took canary `seq` and says how many subscribers it reached.
    /// For the one awaited, the clock starts again now: a Redis busy with
    /// other commands (the history reads of thousands of resuming clients
    /// queue before it on the shared connection) is slow, not failing, and
    /// only what pub/sub does after Redis took the canary tells whether it
    /// delivers. Later canaries do not move the clock, so a connection that
    /// publishes but never receives still turns overdue. Returns false when
    /// no subscriber was reached: this connection's subscription on that
    /// server is gone, whatever the clock says.
    pub(super) fn published(&mut self, seq: u64, receivers: i64) -> bool {
        if let Some((waiting, _)) = self.waiting {
            if waiting == seq {
                self.waiting = Some((seq, Instant::now()));
            }
        }
        receivers > 0
    }

    /// A canary came back: record the lag of the one awaited.
    pub(super) fn answered(&mut self, payload: &[u8], metrics: &Metrics) {
        let seq: Option<u64> = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse().ok());
        if let (Some(seq), Some((waiting, sent))) = (seq, self.waiting) {
            if seq >= waiting {
                metrics.pubsub_lag.set(sent.elapsed().as_secs_f64());
                self.waiting = None;
            }
        }
    }
}

/// Full-jitter-ish exponential backoff: a random delay in `[d/2, d]` where
/// `d = min(BACKOFF_START * 2^failures, max)`, so instances that lost Redis
/// together do not reconnect in lockstep.
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1u32 << failures.min(16));
    let ceiling = exp.min(max).max(Duration::from_millis(1));
    let floor = ceiling / 2;
    rand::rng().random_range(floor..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_canary_waits_for_its_answer_then_turns_overdue() {
        let metrics = Metrics::new();
        let mut canary = Canary::new(Duration::from_millis(30));
        assert_eq!(canary.next(), Some(1));
        assert_eq!(canary.next(), None, "one on its way at a time");
        assert!(!canary.overdue() && !canary.lost());
        canary.answered(b"1", &metrics);
        assert_eq!(canary.next(), Some(2), "answered: the next one goes");
        // Unanswered past the interval: overdue (not ready), and a new one
        // goes out; past three intervals: lost (reconnect).
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(canary.overdue());
        assert_eq!(canary.next(), Some(3));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(canary.lost());
        // A late answer to an older canary than the one awaited counts too.
        canary.answered(b"2", &metrics);
        assert!(!canary.overdue() && !canary.lost());
        canary.answered(b"garbage", &metrics);
    }

    #[tokio::test]
    async fn the_canary_clock_starts_when_redis_takes_the_one_awaited() {
        let metrics = Metrics::new();
        let mut canary = Canary::new(Duration::from_millis(30));
        assert_eq!(canary.next(), Some(1));
        // Redis took it only after a while (busy with other commands).
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(canary.overdue(), "not yet taken");
        assert!(canary.published(1, 1), "a subscriber was reached");
        assert!(!canary.overdue(), "the clock starts when Redis took it");
        // Taken but never received: overdue again, and later canaries
        // taken by Redis do not hide it.
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(canary.overdue());
        assert_eq!(canary.next(), Some(2));
        assert!(canary.published(2, 1));
        assert!(canary.overdue(), "only the awaited one moves the clock");
        assert!(!canary.published(3, 0), "no subscriber reached");
        canary.answered(b"2", &metrics);
        assert!(!canary.overdue());
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(5);
        for failures in 0..40 {
            let d = backoff(failures, max);
            let ceiling = (BACKOFF_START * 2u32.pow(failures.min(16))).min(max);
            assert!(d <= ceiling && d >= ceiling / 2, "{failures}: {d:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(10, max)).collect();
        assert!(samples.len() > 1, "jittered");
    }
}
