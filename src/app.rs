//! What every request handler shares: configuration, hub, broker, policy,
//! metrics, lifecycle, and connection admission.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::config::Config;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, Transport};
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
    pub policy: Policy,
    /// The metrics registry.
    pub metrics: Metrics,
    /// Serving, shutting down, draining.
    pub lifecycle: Lifecycle,
    /// Tasks that must finish before the process exits (WebSocket sessions).
    pub tasks: TaskTracker,
    connections: Arc<Semaphore>,
}

impl App {
    /// Assembles the shared state.
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        broker: Broker,
        metrics: Metrics,
        tasks: TaskTracker,
    ) -> Self {
        let policy = Policy::new(config.channels.clone(), config.dev);
        let lifecycle = Lifecycle::new(config.shutdown.drain);
        let connections = Arc::new(Semaphore::new(config.limits.max_connections));
        Self {
            config,
            hub,
            broker,
            policy,
            metrics,
            lifecycle,
            tasks,
            connections,
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

    /// Admits one more streaming connection, or `None` at `max_connections`.
    pub fn admit(&self, transport: Transport) -> Option<Admitted> {
        let permit = Arc::clone(&self.connections).try_acquire_owned().ok()?;
        let gauge = self.metrics.connections(transport).clone();
        gauge.inc();
        Some(Admitted {
            _permit: permit,
            gauge,
        })
    }
}

/// A streaming connection's slot; frees it and updates the gauge on drop.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gauge.dec();
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
}
