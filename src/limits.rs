//! How many streams this instance holds: in all (`limits.max_connections`),
//! per client IP and per user. A slot is taken when a stream is admitted
//! and given back when its [`Admitted`] is dropped, however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::refusal::Refusal;

/// What per-user and per-IP connection limits count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LimitKey {
    User(String),
    Ip(IpAddr),
}

/// The instance's connection counts. See the module documentation.
pub(crate) struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_ip: usize,
    per_user: usize,
    counts: Arc<Mutex<HashMap<LimitKey, usize>>>,
}

impl ConnectionLimits {
    /// Empty counts for `limits`.
    pub(crate) fn new(limits: &LimitsConfig) -> Self {
        Self {
            total: Arc::new(Semaphore::new(
                limits.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            per_ip: limits.max_connections_per_ip,
            per_user: limits.max_connections_per_user,
            counts: Arc::default(),
        }
    }

    /// Admits one more stream from `ip` (for `user`, when signed in);
    /// `gauge` counts it while it lasts.
    pub(crate) fn admit(
        &self,
        ip: IpAddr,
        user: Option<&str>,
        gauge: IntGauge,
    ) -> Result<Admitted, Refusal> {
        let permit = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| Refusal::AtCapacity)?;
        let mut keys = Vec::new();
        if self.per_ip > 0 {
            keys.push((LimitKey::Ip(ip), self.per_ip, "per_ip"));
        }
        if let (Some(user), true) = (user, self.per_user > 0) {
            keys.push((LimitKey::User(user.to_owned()), self.per_user, "per_user"));
        }
        {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, limit, which)) = keys
                .iter()
                .find(|(key, max, _)| counts.get(key).copied().unwrap_or(0) >= *max)
            {
                return Err(Refusal::TooManyConnections {
                    which,
                    limit: *limit,
                });
            }
            for (key, _, _) in &keys {
                *counts.entry(key.clone()).or_insert(0) += 1;
            }
        }
        gauge.inc();
        Ok(Admitted {
            _permit: permit,
            gauge,
            keys: keys.into_iter().map(|(key, _, _)| key).collect(),
            counts: Arc::clone(&self.counts),
        })
    }

    /// Counts a stream that signed in after it was admitted (WebSocket
    /// `auth`) against that user's limit, as if it had come in signed in.
    pub(crate) fn admit_user(&self, admitted: &mut Admitted, user: &str) -> Result<(), Refusal> {
        let key = LimitKey::User(user.to_owned());
        if self.per_user == 0 || admitted.keys.contains(&key) {
            return Ok(());
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.per_user {
            return Err(Refusal::TooManyConnections {
                which: "per_user",
                limit: self.per_user,
            });
        }
        *count += 1;
        let mut keys = std::mem::take(&mut admitted.keys).into_vec();
        keys.push(key);
        admitted.keys = keys.into_boxed_slice();
        Ok(())
    }
}

/// A stream's slot; frees it, its per-user and per-IP counts and updates
/// the gauge on drop.
pub(crate) struct Admitted {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
    /// A slice, not a list: it is set at admission (and grows at most
    /// once, at a sign-in), and a list's spare word is in every idle
    /// connection's task.
    keys: Box<[LimitKey]>,
    counts: Arc<Mutex<HashMap<LimitKey, usize>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gauge.dec();
        if self.keys.is_empty() {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for key in &self.keys {
            if let Some(n) = counts.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn gauge() -> IntGauge {
        IntGauge::new("g", "test").expect("gauge")
    }

    #[test]
    fn slots_are_counted_per_ip_and_user_and_given_back_on_drop() {
        let limits = ConnectionLimits::new(&LimitsConfig {
            max_connections: 3,
            max_connections_per_ip: 2,
            max_connections_per_user: 1,
            ..LimitsConfig::default()
        });
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let g = gauge();
        let a = limits.admit(ip, Some("u"), g.clone()).expect("first");
        let refused = limits.admit(other, Some("u"), g.clone()).err();
        assert_eq!(refused.map(|r| r.label()), Some("per_user"));
        let mut b = limits.admit(ip, None, g.clone()).expect("anonymous");
        let refused = limits.admit(ip, None, g.clone()).err();
        assert_eq!(refused.map(|r| r.label()), Some("per_ip"));
        assert!(limits.admit_user(&mut b, "u").is_err(), "u is at its limit");
        let c = limits.admit(other, None, g.clone()).expect("third");
        let refused = limits.admit(other, None, g.clone()).err();
        assert_eq!(refused, Some(Refusal::AtCapacity));
        assert_eq!(g.get(), 3);
        drop((a, c));
        assert_eq!(g.get(), 1);
        limits
            .admit_user(&mut b, "u")
            .expect("u's slot is free again");
    }
}
