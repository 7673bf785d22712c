//! What every request handler shares: configuration, hub, broker, policy,
//! metrics, lifecycle, and connection admission.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::Config;
use crate::http::Refused;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, Transport};
use crate::origin::Origins;
use crate::policy::Policy;

/// Shared state of one crier process.
pub struct App {
    /// The effective configuration.
    pub config: Config,
    /// Channel → local listeners.
    pub hub: Arc<Hub>,
    /// Where publications come from and go to.
    pub broker: Broker,
    /// Channel rules.
    pub policy: Arc<Policy>,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Serving, shutting down, draining.
    pub lifecycle: Lifecycle,
    /// Tasks that must finish before the process exits (WebSocket sessions).
    pub tasks: TaskTracker,
    /// Credentials.
    pub auth: Arc<Authenticator>,
    /// Allowed browser origins.
    pub origins: Origins,
    /// Bytes of resume replay held for clients, process-wide
    /// (`limits.max_replay_bytes_total`).
    pub replay_bytes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    per_key: Arc<Mutex<HashMap<LimitKey, usize>>>,
}

/// What per-user and per-IP connection limits count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LimitKey {
    User(String),
    Ip(IpAddr),
}

impl App {
    /// Assembles the shared state from the parts the server built (and
    /// checked the configuration with).
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        broker: Broker,
        policy: Arc<Policy>,
        auth: Arc<Authenticator>,
        origins: Origins,
        metrics: Metrics,
    ) -> Self {
        let lifecycle = Lifecycle::new(config.shutdown.drain);
        let connections = Arc::new(Semaphore::new(
            config.limits.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        let replay_bytes = Arc::new(Semaphore::new(
            config
                .limits
                .max_replay_bytes_total
                .min(Semaphore::MAX_PERMITS),
        ));
        Self {
            config,
            hub,
            broker,
            policy,
            metrics,
            lifecycle,
            tasks: TaskTracker::new(),
            auth,
            origins,
            replay_bytes,
            connections,
            per_key: Arc::default(),
        }
    }

    /// Ready to take new clients: broker delivering and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.broker.health().is_up() && !self.lifecycle.is_shutting_down()
    }

    /// Counts a WebSocket or SSE request refused before its stream opened.
    pub fn rejected(&self, refused: crate::http::Refused) -> http::Response<crate::http::Body> {
        self.metrics
            .rejected
            .with_label_values(&[refused.label()])
            .inc();
        refused.into_response()
    }

    /// Admits one more streaming connection from `ip` (for `user`, when
    /// authenticated), within the global, per-user and per-IP limits.
    pub fn admit(
        &self,
        transport: Transport,
        ip: IpAddr,
        user: Option<&str>,
    ) -> Result<Admitted, Refused> {
        let permit = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| Refused::AtCapacity)?;
        let limits = &self.config.limits;
        let mut keys = Vec::new();
        if limits.max_connections_per_ip > 0 {
            keys.push((LimitKey::Ip(ip), limits.max_connections_per_ip, "per_ip"));
        }
        if let (Some(user), true) = (user, limits.max_connections_per_user > 0) {
            keys.push((
                LimitKey::User(user.to_owned()),
                limits.max_connections_per_user,
                "per_user",
            ));
        }
        {
            let mut counts = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, which)) = keys
                .iter()
                .find(|(key, max, _)| counts.get(key).copied().unwrap_or(0) >= *max)
            {
                return Err(Refused::TooManyConnections(which));
            }
            for (key, _, _) in &keys {
                *counts.entry(key.clone()).or_insert(0) += 1;
            }
        }
        let gauge = self.metrics.connections(transport).clone();
        gauge.inc();
        Ok(Admitted {
            _permit: permit,
            gauge,
            keys: keys.into_iter().map(|(key, _, _)| key).collect(),
            counts: Arc::clone(&self.per_key),
        })
    }
}

impl App {
    /// Counts a connection that signed in after it was admitted (WebSocket
    /// `auth`) against that user's limit, as if it had come in signed in.
    pub fn admit_user(&self, admitted: &mut Admitted, user: &str) -> Result<(), Refused> {
        let max = self.config.limits.max_connections_per_user;
        let key = LimitKey::User(user.to_owned());
        if max == 0 || admitted.keys.contains(&key) {
            return Ok(());
        }
        let mut counts = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            return Err(Refused::TooManyConnections("per_user"));
        }
        *count += 1;
        admitted.keys.push(key);
        Ok(())
    }
}

/// A streaming connection's slot; frees it, its per-user and per-IP counts
/// and updates the gauge on drop.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
    keys: Vec<LimitKey>,
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

/// Facts about the TCP connection a request arrived on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Cancelling it drops the TCP connection, even if hyper is stuck
    /// writing to a client that stopped reading.
    pub kill: CancellationToken,
    /// How long a write to this client may make no progress.
    pub stall: crate::stall::StallTimeout,
}
