//! What every request handler shares: configuration, hub, broker, policy,
//! metrics, lifecycle, and connection admission.

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

/// Shared state of one crier process.
pub(crate) struct App {
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
    /// Streams held, in all, per IP and per user.
    pub limits: ConnectionLimits,
    /// This running crier's number, fleet-wide: the instance part of its
    /// socket ids, and its name in the presence store. Random at start
    /// (one process may run several, as tests do).
    pub instance: u32,
    /// The presence this instance holds (see [`crate::presence`]).
    pub presence: crate::presence::Presence,
    /// The Pusher apps served, by key and by id.
    pub pusher: crate::pusher::Apps,
    /// One more WebSocket protocol served, for a test (see
    /// [`crate::testing`]).
    pub mount: Option<Mount>,
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
            hub,
            broker,
            policy,
            metrics,
            lifecycle,
            tasks: TaskTracker::new(),
            auth,
            origins,
            replay_bytes,
            limits,
            instance,
            presence: crate::presence::Presence::new(instance),
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
        crate::presence::members(&self.broker, &self.config.presence, channel).await
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
