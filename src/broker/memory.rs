//! The embedded broker: publications go straight to this process's hub.
//! For a single instance (development, small deployments, the demo).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BrokerHealth;
use crate::hub::{Control, Hub};
use crate::metrics::Metrics;
use crate::protocol::Publication;

/// See the module documentation.
pub struct MemoryBroker {
    hub: Arc<Hub>,
    pub(super) health: BrokerHealth,
}

impl MemoryBroker {
    /// Confirms every subscription at once; always up.
    pub(super) fn start(
        hub: Arc<Hub>,
        mut control: mpsc::UnboundedReceiver<Control>,
        health: BrokerHealth,
        metrics: Metrics,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        health.set(true, &metrics);
        tasks.spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = control.recv() => r,
                };
                match request {
                    Some(Control::Subscribe { ready, .. }) => {
                        let _ = ready.send(true);
                    }
                    Some(Control::Unsubscribe { .. }) => {}
                    None => return,
                }
            }
        });
        MemoryBroker { hub, health }
    }

    /// Delivers to local listeners at once.
    pub fn publish(&self, channel: &str, payload: &[u8]) {
        self.hub.dispatch(Publication::new(channel, payload));
    }
}
