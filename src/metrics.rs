//! The one Prometheus registry of the process. Every metric name is declared
//! here, once; other modules get a cheap clone of [`Metrics`] and touch
//! pre-resolved handles, never a label lookup on the hot path.

use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The client transports: crier's own WebSocket and SSE, and the Pusher
/// protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /ws`
    Ws,
    /// `GET /sse`
    Sse,
    /// `GET /app/{key}` (the Pusher protocol)
    Pusher,
}

impl Transport {
    /// Label value and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Pusher => "pusher",
        }
    }
}

/// Handles to every metric crier exports.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// The metrics themselves; reach them through `Deref`.
pub struct Inner {
    registry: Registry,
    connections_ws: IntGauge,
    connections_pusher: IntGauge,
    connections_sse: IntGauge,
    delivered_ws: IntCounter,
    delivered_pusher: IntCounter,
    delivered_sse: IntCounter,
    /// Publications received from the broker (once per publication, not per client).
    pub messages_received: IntCounter,
    /// Clients disconnected because their queue was full.
    pub slow_client_disconnects: IntCounter,
    /// Successful reconnections to Redis after a lost connection.
    pub redis_reconnects: IntCounter,
    /// 1 while the broker is connected.
    pub broker_up: IntGauge,
    /// Client subscriptions (one per connection and channel).
    pub subscriptions: IntGauge,
    /// Distinct channels this instance listens to.
    pub channels: IntGauge,
    /// Requests refused before a stream opened, by reason.
    pub rejected: IntCounterVec,
    /// Publications accepted by the publish API.
    pub api_publications: IntCounter,
    /// Refused credentials, by reason.
    pub auth_failures: IntCounterVec,
    /// Round trip of the last canary through Redis pub/sub.
    pub pubsub_lag: Gauge,
    /// Messages delivered from history after an outage or on resume.
    pub recovered_messages: IntCounter,
    /// `gap` notices sent (history could not cover a disconnect).
    pub gaps: IntCounter,
    /// Fetches of the identity provider's key set, by result (`ok`,
    /// `error`).
    pub jwks_fetches: IntCounterVec,
    /// Keys in the key set in use.
    pub jwks_keys: IntGauge,
    /// Calls to the app's session webhook, by result (`ok`, `refused`,
    /// `error`).
    pub webhook_calls: IntCounterVec,
    /// Who holds this deployment's Redis function library: 1 on the
    /// current state (`own`, `newer`, `conflict`, `unchecked`, `error`).
    pub redis_library: IntGaugeVec,
    /// WebSocket connections that negotiated permessage-deflate.
    pub ws_compressed_connections: IntGauge,
    /// Channels holding a compression context their listeners share.
    pub ws_compression_contexts: IntGauge,
    /// Lifecycle events appended to the events stream by this instance's
    /// reports, by name (summed over the fleet: each event once).
    pub events: IntCounterVec,
    /// Lifecycle webhook calls, by result (`ok`, `refused`: not 2xx,
    /// `error`: no answer).
    pub event_webhook_calls: IntCounterVec,
    /// Lifecycle events waiting to be sent to a webhook.
    pub event_webhook_queue: IntGauge,
    /// Lifecycle events a webhook never got, by reason (`overflow`: its
    /// queue was full; `expired`: retried for `events.webhook_retry_for`).
    pub event_webhook_dropped: IntCounterVec,
    /// SSE streams sent with `Content-Encoding: deflate`.
    pub sse_compressed_connections: IntGauge,
    /// Publications compressed: once each per wire protocol, shared by
    /// every connection that negotiated compression.
    pub ws_compressed_frames: IntCounter,
    /// Bytes of the publications compressed, by `stage`: `before` and
    /// `after` compression.
    pub ws_compression_bytes: IntCounterVec,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    ///
    /// # Panics
    /// Only on a duplicate or malformed metric name, a programming error that
    /// the first test run shows.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let connections = IntGaugeVec::new(
            Opts::new("crier_connections", "Open client connections by transport."),
            &["transport"],
        )
        .expect("metric");
        let delivered = IntCounterVec::new(
            Opts::new(
                "crier_messages_delivered_total",
                "Messages written to clients, by transport.",
            ),
            &["transport"],
        )
        .expect("metric");
        // Always 1; the labels say which build is running (join on it, or
        // count versions during a rollout).
        let build_info = IntGaugeVec::new(
            Opts::new("crier_build_info", "The running crier's version; always 1."),
            &["version"],
        )
        .expect("metric");
        build_info.with_label_values(&[crate::VERSION]).set(1);
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("metric");
        let inner = Inner {
            connections_ws: connections.with_label_values(&["ws"]),
            connections_pusher: connections.with_label_values(&["pusher"]),
            connections_sse: connections.with_label_values(&["sse"]),
            delivered_ws: delivered.with_label_values(&["ws"]),
            delivered_pusher: delivered.with_label_values(&["pusher"]),
            delivered_sse: delivered.with_label_values(&["sse"]),
            messages_received: counter(
                "crier_messages_received_total",
                "Publications received from the broker.",
            ),
            slow_client_disconnects: counter(
                "crier_slow_client_disconnects_total",
                "Clients disconnected because they could not keep up.",
            ),
            redis_reconnects: counter(
                "crier_redis_reconnects_total",
                "Reconnections to Redis after a lost pub/sub connection.",
            ),
            broker_up: gauge("crier_broker_up", "1 while the broker is connected."),
            subscriptions: gauge(
                "crier_subscriptions",
                "Client subscriptions (connection x channel).",
            ),
            channels: gauge("crier_channels", "Distinct channels with local listeners."),
            rejected: IntCounterVec::new(
                Opts::new(
                    "crier_connections_rejected_total",
                    "Connections refused before a stream opened, by reason.",
                ),
                &["reason"],
            )
            .expect("metric"),
            api_publications: counter(
                "crier_api_publications_total",
                "Publications accepted by POST /api/publish.",
            ),
            pubsub_lag: Gauge::new(
                "crier_pubsub_lag_seconds",
                "Round trip of the last canary published through Redis and received back.",
            )
            .expect("metric"),
            recovered_messages: counter(
                "crier_recovered_messages_total",
                "Messages delivered from history after an outage or on resume.",
            ),
            gaps: counter(
                "crier_gaps_total",
                "Gap notices sent: history could not cover a disconnect.",
            ),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "crier_auth_failures_total",
                    "Refused credentials, by reason.",
                ),
                &["reason"],
            )
            .expect("metric"),
            jwks_fetches: IntCounterVec::new(
                Opts::new(
                    "crier_jwks_fetches_total",
                    "Fetches of the identity provider's key set (JWKS), by result.",
                ),
                &["result"],
            )
            .expect("metric"),
            jwks_keys: gauge("crier_jwks_keys", "Keys in the JWKS key set in use."),
            webhook_calls: IntCounterVec::new(
                Opts::new(
                    "crier_webhook_calls_total",
                    "Calls to the app's session webhook, by result (error: crier refused as unavailable).",
                ),
                &["result"],
            )
            .expect("metric"),
            redis_library: IntGaugeVec::new(
                Opts::new(
                    "crier_redis_library",
                    "1 on who holds this deployment's Redis function library: own, newer (a newer \
                     configuration of the deployment), conflict (another deployment: not ready), \
                     unchecked, error.",
                ),
                &["state"],
            )
            .expect("metric"),
            ws_compressed_connections: gauge(
                "crier_ws_compressed_connections",
                "WebSocket connections that negotiated permessage-deflate.",
            ),
            ws_compression_contexts: gauge(
                "crier_ws_compression_contexts",
                "Channels holding a compression context their WebSocket listeners share \
                 (ws.compression_contexts at most).",
            ),
            events: IntCounterVec::new(
                Opts::new(
                    "crier_events_total",
                    "Lifecycle events appended to the events stream by this instance's reports, by \
                     name; summed over the fleet, each event counts once.",
                ),
                &["name"],
            )
            .expect("metric"),
            event_webhook_calls: IntCounterVec::new(
                Opts::new(
                    "crier_event_webhook_calls_total",
                    "Lifecycle webhook calls, by result: ok, refused (not 2xx), error (no answer).",
                ),
                &["result"],
            )
            .expect("metric"),
            event_webhook_queue: gauge(
                "crier_event_webhook_queue",
                "Lifecycle events waiting to be sent to a webhook.",
            ),
            event_webhook_dropped: IntCounterVec::new(
                Opts::new(
                    "crier_event_webhook_dropped_total",
                    "Lifecycle events a webhook never got (they stay in the stream), by reason: \
                     overflow (its queue was full), expired (retried for events.webhook_retry_for).",
                ),
                &["reason"],
            )
            .expect("metric"),
            sse_compressed_connections: gauge(
                "crier_sse_compressed_connections",
                "SSE streams sent compressed (Content-Encoding: deflate).",
            ),
            ws_compressed_frames: counter(
                "crier_ws_compressed_frames_total",
                "Publications compressed, once per wire protocol for every connection that \
                 negotiated permessage-deflate.",
            ),
            ws_compression_bytes: IntCounterVec::new(
                Opts::new(
                    "crier_ws_compression_bytes_total",
                    "Bytes of the publications compressed, before and after compression.",
                ),
                &["stage"],
            )
            .expect("metric"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(build_info),
            Box::new(connections),
            Box::new(delivered),
            Box::new(inner.messages_received.clone()),
            Box::new(inner.slow_client_disconnects.clone()),
            Box::new(inner.redis_reconnects.clone()),
            Box::new(inner.broker_up.clone()),
            Box::new(inner.subscriptions.clone()),
            Box::new(inner.channels.clone()),
            Box::new(inner.rejected.clone()),
            Box::new(inner.api_publications.clone()),
            Box::new(inner.auth_failures.clone()),
            Box::new(inner.pubsub_lag.clone()),
            Box::new(inner.recovered_messages.clone()),
            Box::new(inner.gaps.clone()),
            Box::new(inner.jwks_fetches.clone()),
            Box::new(inner.jwks_keys.clone()),
            Box::new(inner.webhook_calls.clone()),
            Box::new(inner.redis_library.clone()),
            Box::new(inner.ws_compressed_connections.clone()),
            Box::new(inner.ws_compression_contexts.clone()),
            Box::new(inner.events.clone()),
            Box::new(inner.event_webhook_calls.clone()),
            Box::new(inner.event_webhook_queue.clone()),
            Box::new(inner.event_webhook_dropped.clone()),
            Box::new(inner.sse_compressed_connections.clone()),
            Box::new(inner.ws_compressed_frames.clone()),
            Box::new(inner.ws_compression_bytes.clone()),
        ];
        for c in collectors {
            inner.registry.register(c).expect("register metric");
        }
        #[cfg(target_os = "linux")]
        inner
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("register process metrics");
        Metrics(Arc::new(inner))
    }

    /// Gauge of open connections for `t`.
    pub fn connections(&self, t: Transport) -> &IntGauge {
        match t {
            Transport::Ws => &self.connections_ws,
            Transport::Pusher => &self.connections_pusher,
            Transport::Sse => &self.connections_sse,
        }
    }

    /// Counter of messages delivered over `t`.
    pub fn delivered(&self, t: Transport) -> &IntCounter {
        match t {
            Transport::Ws => &self.delivered_ws,
            Transport::Pusher => &self.delivered_pusher,
            Transport::Sse => &self.delivered_sse,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One more on a gauge while it lives.
pub(crate) struct Counted(IntGauge);

impl Counted {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}
