//! What every request handler shares: the configuration and metrics, and
//! three handles: delivery (hub, broker, rules, presence), the gate
//! (credentials, origins, connection limits) and the process (its phase,
//! tasks and number).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::Config;
use crate::hub::Hub;
use crate::lifecycle::Lifecycle;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::origin::Origins;
use crate::policy::Policy;

/// Shared state of one crier process, in a few handles: what a handler
/// needs is the configuration and metrics, plus one or two of them.
pub(crate) struct App {
    /// The effective configuration.
    pub(crate) config: Config,
    /// The metrics registry.
    pub(crate) metrics: Metrics,
    /// Where publications come from and go to, and the rules.
    pub(crate) delivery: Delivery,
    /// Who may connect, and what connections may hold.
    pub(crate) gate: Gate,
    /// This running crier: its number, its phase, its tasks.
    pub(crate) process: Process,
    /// The Pusher apps served, by key and by id.
    pub(crate) pusher: crate::pusher::Apps,
    /// One more WebSocket protocol served, for a test (see
    /// [`crate::testing`]).
    pub(crate) mount: Option<Mount>,
}

/// Where publications come from and go to.
pub(crate) struct Delivery {
    /// Channel → local listeners.
    pub(crate) hub: Arc<Hub>,
    /// Where publications come from and go to.
    pub(crate) broker: Broker,
    /// Channel rules.
    pub(crate) policy: Arc<Policy>,
    /// The presence this instance holds (see [`crate::presence`]).
    pub(crate) presence: crate::presence::Presence,
    /// What this instance holds, for lifecycle events (`[events]`), if
    /// they are on (see [`crate::events`]).
    pub(crate) ledger: Option<Arc<crate::events::Ledger>>,
}

/// Who may connect, and what connections may hold.
pub(crate) struct Gate {
    /// Credentials.
    pub(crate) auth: Arc<Authenticator>,
    /// Allowed browser origins.
    pub(crate) origins: Origins,
    /// Streams held, in all, per IP and per user.
    pub(crate) limits: ConnectionLimits,
    /// Bytes of resume replay held for clients, process-wide
    /// (`limits.max_replay_bytes_total`).
    pub(crate) replay_bytes: Arc<Semaphore>,
}

/// This running crier.
pub(crate) struct Process {
    /// Serving, shutting down, draining.
    pub(crate) lifecycle: Lifecycle,
    /// Tasks that must finish before the process exits (WebSocket sessions).
    pub(crate) tasks: TaskTracker,
    /// This running crier's number, fleet-wide: the instance part of its
    /// socket ids, and its name in the presence store. Random at start
    /// (one process may run several, as tests do).
    pub(crate) instance: u32,
}

/// Answers one request.
pub(crate) type Handler = fn(
    Arc<App>,
    http::Request<hyper::body::Incoming>,
    ConnInfo,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = http::Response<crate::http::Body>> + Send>,
>;

/// A WebSocket protocol served on one more path: how a test runs a
/// protocol of its own on the driver.
#[derive(Clone, Copy)]
pub(crate) struct Mount {
    /// The path it answers, exactly.
    pub(crate) path: &'static str,
    /// Answers a request for it.
    pub(crate) handle: Handler,
}

impl App {
    /// Assembles the shared state from the parts the server built (and
    /// checked the configuration with).
    pub(crate) fn new(
        config: Config,
        hub: Arc<Hub>,
        broker: Broker,
        policy: Arc<Policy>,
        auth: Arc<Authenticator>,
        origins: Origins,
        metrics: Metrics,
    ) -> Self {
        let ledger = hub.ledger().cloned();
        let lifecycle = Lifecycle::new(config.shutdown.drain);
        let instance = crate::protocol::SocketId::new_instance();
        let limits = ConnectionLimits::new(&config.limits);
        let replay_bytes = Arc::new(Semaphore::new(
            config
                .limits
                .max_replay_bytes_total
                .min(Semaphore::MAX_PERMITS),
        ));
        Self {
            metrics,
            delivery: Delivery {
                hub,
                broker,
                policy,
                presence: crate::presence::Presence::new(instance, ledger.clone()),
                ledger,
            },
            gate: Gate {
                auth,
                origins,
                limits,
                replay_bytes,
            },
            process: Process {
                lifecycle,
                tasks: TaskTracker::new(),
                instance,
            },
            pusher: crate::pusher::Apps::new(&config.pusher.apps),
            mount: None,
            config,
        }
    }
}

impl App {
    /// A presence channel's members: the count, and at most
    /// `presence.max_listed`.
    pub(crate) async fn members(
        &self,
        channel: &str,
    ) -> Result<crate::broker::Members, crate::refusal::Refusal> {
        crate::presence::members(&self.delivery.broker, &self.config.presence, channel).await
    }

    /// How many listeners each of `channels` has across the fleet (Pusher's
    /// subscription count), as the instances' lifecycle reports left it:
    /// needs `events.stream` (refused as unavailable without).
    pub(crate) async fn listeners(
        &self,
        channels: &[String],
    ) -> Result<Vec<u64>, crate::refusal::Refusal> {
        let stream = crate::broker::events::Stream::of(&self.config)
            .ok_or(crate::refusal::Refusal::Unavailable)?;
        let keys: Vec<String> = channels.iter().map(|c| format!("c|{c}")).collect();
        self.delivery
            .broker
            .events_totals(&stream, &keys)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "subscription counts: cannot read them");
                crate::refusal::Refusal::Unavailable
            })
    }
}

/// Facts about the TCP connection a request arrived on.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Where a stream takes the connection out of hyper.
    pub handoff: Arc<crate::link::Handoff>,
    /// The socket's share of the descriptor budget: a stream that takes
    /// the socket over keeps a copy for as long as it holds the socket.
    pub slot: crate::fdlimit::Slot,
}
