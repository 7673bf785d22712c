//! The Redis broker: one pub/sub connection per instance, whatever the number
//! of clients, subscribed only to channels that local clients listen to.
//!
//! A supervisor task owns that connection. It applies the hub's subscribe and
//! unsubscribe requests in order, hands every message to the hub, and when the
//! connection is lost it marks the broker (and every channel) not ready,
//! reconnects with capped, jittered exponential backoff and resubscribes every
//! live channel. redis-rs buffers pub/sub messages unboundedly between its
//! driver and this task, so this task must never wait on anything but Redis.
//!
//! Publishing uses a separate multiplexed connection that reconnects by itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BrokerHealth, PublishError};
use crate::config::RedisConfig;
use crate::hub::{Control, Hub};
use crate::metrics::Metrics;
use crate::protocol::Publication;

/// Channels subscribed per SUBSCRIBE command when resubscribing in bulk.
const RESUBSCRIBE_BATCH: usize = 512;
/// First reconnect delay; doubles per failed attempt up to `reconnect_max`.
const BACKOFF_START: Duration = Duration::from_millis(100);

/// See the module documentation.
pub struct RedisBroker {
    publisher: ConnectionManager,
    prefix: String,
    pub(super) health: BrokerHealth,
}

impl RedisBroker {
    pub(super) fn start(
        config: &RedisConfig,
        hub: Arc<Hub>,
        control: mpsc::UnboundedReceiver<Control>,
        health: BrokerHealth,
        metrics: Metrics,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, PublishError> {
        let url = config.url.as_deref().unwrap_or_default();
        let client = redis::Client::open(url)?;
        let publisher = ConnectionManager::new_lazy_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(config.connect_timeout))
                .set_number_of_retries(2)
                .set_max_delay(config.reconnect_max),
        )?;
        health.set(false, &metrics);
        let supervisor = Supervisor {
            client,
            prefix: config.channel_prefix.clone(),
            connect_timeout: config.connect_timeout,
            reconnect_max: config.reconnect_max,
            hub,
            control,
            channels: HashMap::new(),
            health: health.clone(),
            metrics,
            stop,
        };
        tasks.spawn(supervisor.run());
        Ok(RedisBroker {
            publisher,
            prefix: config.channel_prefix.clone(),
            health,
        })
    }

    /// `PUBLISH <prefix><channel> <payload>`.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        let mut conn = self.publisher.clone();
        redis::cmd("PUBLISH")
            .arg(format!("{}{channel}", self.prefix))
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }
}

/// Why the serving loop ended.
enum Ended {
    Stopped,
    Lost(String),
}

struct Supervisor {
    client: redis::Client,
    prefix: String,
    connect_timeout: Duration,
    reconnect_max: Duration,
    hub: Arc<Hub>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Every channel the hub wants, with its readiness signal.
    channels: HashMap<String, watch::Sender<bool>>,
    health: BrokerHealth,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Supervisor {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut connected_before = false;
        loop {
            match self.connect().await {
                Ok((mut sink, stream)) => match self.resubscribe_all(&mut sink).await {
                    Ok(()) => {
                        if connected_before {
                            self.metrics.redis_reconnects.inc();
                            tracing::info!(channels = self.channels.len(), "redis reconnected");
                        } else {
                            tracing::info!("redis pub/sub connected");
                        }
                        connected_before = true;
                        failures = 0;
                        self.set_ready(true);
                        let ended = self.serve(sink, stream).await;
                        self.set_ready(false);
                        match ended {
                            Ended::Stopped => return,
                            Ended::Lost(why) => {
                                tracing::warn!(error = %why, "redis pub/sub connection lost")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "redis resubscribe failed"),
                },
                Err(e) => {
                    if failures == 0 || failures % 20 == 0 {
                        tracing::warn!(error = %e, attempt = failures + 1, "cannot connect to redis");
                    }
                }
            }
            if self.stop.is_cancelled() {
                return;
            }
            let delay = backoff(failures, self.reconnect_max);
            failures = failures.saturating_add(1);
            if !self.wait_offline(delay).await {
                return;
            }
        }
    }

    async fn connect(&self) -> Result<(PubSubSink, PubSubStream), String> {
        let attempt = tokio::time::timeout(self.connect_timeout, self.client.get_async_pubsub());
        tokio::select! {
            _ = self.stop.cancelled() => Err("stopping".into()),
            r = attempt => match r {
                Ok(Ok(pubsub)) => Ok(pubsub.split()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("timed out after {:?}", self.connect_timeout)),
            },
        }
    }

    async fn resubscribe_all(&mut self, sink: &mut PubSubSink) -> Result<(), String> {
        let names: Vec<String> = self.channels.keys().map(|c| self.key(c)).collect();
        for batch in names.chunks(RESUBSCRIBE_BATCH) {
            self.bounded(sink.subscribe(batch)).await?;
        }
        Ok(())
    }

    /// Relays messages and applies control requests until the connection is
    /// lost or the process stops.
    async fn serve(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> Ended {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ended::Stopped,
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Ended::Lost("connection closed".into());
                    };
                    let Some(channel) = msg.get_channel_name().strip_prefix(self.prefix.as_str()) else {
                        continue;
                    };
                    self.hub.dispatch(Publication::new(channel, msg.get_payload_bytes()));
                }
                request = self.control.recv() => {
                    let Some(request) = request else { return Ended::Stopped };
                    let result = match request {
                        Control::Subscribe { channel, ready } => {
                            let key = self.key(&channel);
                            let done = self.bounded(sink.subscribe(&key)).await;
                            if done.is_ok() {
                                ready.send_replace(true);
                            }
                            self.channels.insert(channel, ready);
                            done
                        }
                        Control::Unsubscribe { channel } => {
                            self.channels.remove(&channel);
                            let key = self.key(&channel);
                            self.bounded(sink.unsubscribe(&key)).await
                        }
                    };
                    if let Err(e) = result {
                        return Ended::Lost(e);
                    }
                }
            }
        }
    }

    /// Sleeps `delay` while keeping track of what the hub wants.
    /// Returns false when the process stops.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = &mut sleep => return true,
                request = self.control.recv() => match request {
                    Some(Control::Subscribe { channel, ready }) => {
                        self.channels.insert(channel, ready);
                    }
                    Some(Control::Unsubscribe { channel }) => {
                        self.channels.remove(&channel);
                    }
                    None => return false,
                },
            }
        }
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.connect_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    fn set_ready(&self, up: bool) {
        self.health.set(up, &self.metrics);
        for ready in self.channels.values() {
            ready.send_replace(up);
        }
    }

    fn key(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
}

/// Full-jitter-ish exponential backoff: a random delay in `[d/2, d]` where
/// `d = min(BACKOFF_START * 2^failures, max)`, so instances that lost Redis
/// together do not reconnect in lockstep.
fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = BACKOFF_START.saturating_mul(1u32 << failures.min(16));
    let ceiling = exp.min(max).max(Duration::from_millis(1));
    let floor = ceiling / 2;
    rand::rng().random_range(floor..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

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
