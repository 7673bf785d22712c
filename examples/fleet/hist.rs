//! Histograms the fleet's client workers fill and the coordinator merges.
//!
//! A worker sends its buckets as plain arrays of counts (one line of JSON
//! per answer), so the coordinator can add the workers' arrays element by
//! element and take percentiles over the whole fleet, not an average of
//! the workers' percentiles.

use std::cell::Cell;

/// Latency buckets: powers of 2^(1/4) microseconds (each 19 % wide), as
/// `bench` reports them, so the two benchmarks' percentiles compare.
pub const LOG_BUCKETS: usize = 160;

/// Second buckets relative to a moment (a drain's start): from
/// `SECONDS_FROM` s before it to `SECOND_BUCKETS + SECONDS_FROM - 1` s
/// after; earlier and later land in the end buckets.
pub const SECOND_BUCKETS: usize = 43;
pub const SECONDS_FROM: i64 = -2;

/// The log bucket of a latency in microseconds.
pub fn log_bucket(us: u64) -> usize {
    (((us.max(1) as f64).log2() * 4.0) as usize).min(LOG_BUCKETS - 1)
}

/// The second bucket of `t` (µs since the epoch) relative to `t0`.
pub fn second_bucket(t: u64, t0: u64) -> usize {
    let secs = (t as i64 - t0 as i64).div_euclid(1_000_000);
    (secs - SECONDS_FROM).clamp(0, SECOND_BUCKETS as i64 - 1) as usize
}

/// The seconds a second bucket covers, for a report: `[from, to)`.
pub fn second_range(bucket: usize) -> (i64, i64) {
    let from = bucket as i64 + SECONDS_FROM;
    (from, from + 1)
}

/// Counts a single-threaded worker adds to without locks.
pub struct Counts(Vec<Cell<u64>>);

impl Counts {
    pub fn new(len: usize) -> Self {
        Self((0..len).map(|_| Cell::new(0)).collect())
    }
    pub fn add(&self, bucket: usize) {
        let cell = &self.0[bucket];
        cell.set(cell.get() + 1);
    }
    pub fn to_vec(&self) -> Vec<u64> {
        self.0.iter().map(Cell::get).collect()
    }
}

/// Adds `from` to `into`, element by element.
pub fn merge(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

/// Upper bound, in milliseconds, of the log bucket holding quantile `q`
/// (NaN when empty).
pub fn quantile_ms(buckets: &[u64], q: f64) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    let target = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, b) in buckets.iter().enumerate() {
        seen += b;
        if seen >= target {
            return upper_ms(i);
        }
    }
    f64::NAN
}

/// Upper bound, in milliseconds, of the highest non-empty log bucket.
pub fn max_ms(buckets: &[u64]) -> f64 {
    buckets
        .iter()
        .rposition(|&b| b > 0)
        .map_or(f64::NAN, upper_ms)
}

fn upper_ms(bucket: usize) -> f64 {
    2f64.powf((bucket + 1) as f64 / 4.0) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let mut b = vec![0; LOG_BUCKETS];
        b[log_bucket(1_000)] += 99;
        b[log_bucket(100_000)] += 1;
        assert!(quantile_ms(&b, 0.5) < 1.2);
        assert!(quantile_ms(&b, 1.0) >= 100.0);
        assert!(max_ms(&b) >= 100.0);
        assert_eq!(second_bucket(5_500_000, 1_000_000), 4 + 2);
        assert_eq!(second_bucket(0, 10_000_000), 0);
        assert_eq!(second_range(2), (0, 1));
    }
}
