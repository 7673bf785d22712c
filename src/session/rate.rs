//! How fast a client may talk: a token bucket per connection, and the
//! strikes after which a client that keeps flooding is closed.

use tokio::time::Instant;

/// Rate-limited commands in a row after which the connection is closed.
const MAX_STRIKES: u32 = 10;

/// What to do with a command that just arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within the rate: handle it.
    Go,
    /// Over the rate: refuse it (`rate_limited`), the connection stays.
    SlowDown,
    /// Over the rate again and again: close the connection.
    Close,
}

/// A connection's command rate: `limits.commands_per_second`, bursts of
/// `limits.command_burst`.
pub(crate) struct Commands {
    bucket: TokenBucket,
    /// Commands refused in a row for exceeding the rate.
    strikes: u32,
}

impl Commands {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            bucket: TokenBucket::new(rate, burst),
            strikes: 0,
        }
    }

    /// Judges one more command.
    pub(crate) fn take(&mut self) -> Verdict {
        if self.bucket.take() {
            self.strikes = 0;
            return Verdict::Go;
        }
        self.strikes += 1;
        if self.strikes >= MAX_STRIKES {
            Verdict::Close
        } else {
            Verdict::SlowDown
        }
    }
}

/// `rate` tokens per second, at most `burst` at once.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_refuses() {
        let mut bucket = TokenBucket::new(0, 3);
        assert!(bucket.take() && bucket.take() && bucket.take(), "the burst");
        assert!(!bucket.take(), "nothing refills at rate 0");
        assert!(!bucket.take());
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_at_its_rate() {
        let mut bucket = TokenBucket::new(1_000, 1);
        assert!(bucket.take());
        assert!(!bucket.take(), "burst spent");
        // 1,000 per second: one token back after a millisecond.
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(bucket.take(), "refilled");
    }

    #[test]
    fn a_flood_is_refused_then_closed_and_a_pause_forgives() {
        let mut commands = Commands::new(0, 1);
        assert_eq!(commands.take(), Verdict::Go);
        let verdicts: Vec<_> = (0..MAX_STRIKES).map(|_| commands.take()).collect();
        assert!(verdicts[..verdicts.len() - 1]
            .iter()
            .all(|v| *v == Verdict::SlowDown));
        assert_eq!(verdicts.last(), Some(&Verdict::Close));
    }
}
