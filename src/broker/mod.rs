//! Brokers carry publications from apps to every crier instance.
//!
//! Two implementations behind one enum: `redis` (production, any number of
//! instances) and `memory` (embedded, one process). Both take subscription
//! requests from the hub as [`Control`] messages and hand each publication to
//! [`Hub::dispatch`]. A broker task never waits on a client: dispatch only
//! pushes into bounded queues.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::{Control, Hub};
use crate::metrics::Metrics;

mod memory;
mod redis;

pub use self::redis::RedisBroker;
pub use memory::MemoryBroker;

/// A publication could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Redis refused or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// Whether the broker currently delivers publications; backs `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct BrokerHealth(Arc<AtomicBool>);

impl BrokerHealth {
    /// Connected and subscribed.
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, up: bool, metrics: &Metrics) {
        self.0.store(up, Ordering::Release);
        metrics.broker_up.set(i64::from(up));
    }
}

/// The configured broker.
pub enum Broker {
    /// In-process, one instance.
    Memory(MemoryBroker),
    /// Redis pub/sub.
    Redis(RedisBroker),
}

impl Broker {
    /// Starts the broker named by `config`, serving `hub`'s control requests
    /// until `stop` is cancelled.
    pub fn start(
        config: &Config,
        hub: Arc<Hub>,
        control: mpsc::UnboundedReceiver<Control>,
        metrics: Metrics,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, PublishError> {
        let health = BrokerHealth::default();
        Ok(match &config.redis.url {
            None => Broker::Memory(MemoryBroker::start(
                hub, control, health, metrics, tasks, stop,
            )),
            Some(_) => Broker::Redis(RedisBroker::start(
                &config.redis,
                hub,
                control,
                health,
                metrics,
                tasks,
                stop,
            )?),
        })
    }

    /// Publishes `payload` on `channel` (no prefix: the broker adds it).
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        match self {
            Broker::Memory(b) => {
                b.publish(channel, payload);
                Ok(())
            }
            Broker::Redis(b) => b.publish(channel, payload).await,
        }
    }

    /// Connected and delivering.
    pub fn health(&self) -> &BrokerHealth {
        match self {
            Broker::Memory(b) => &b.health,
            Broker::Redis(b) => &b.health,
        }
    }

    /// `memory` or `redis`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }
}
