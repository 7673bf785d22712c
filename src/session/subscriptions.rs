//! The channels one connection listens to. Dropping the set unsubscribes
//! them all, so a connection that ends in any way leaves nothing behind in
//! the hub.

use std::sync::Arc;

use super::queue::ConnId;
use crate::broker::ChannelStart;
use crate::hub::{Hub, Sink};
use crate::policy::Rule;
use crate::protocol::Filter;
use crate::refusal::Refusal;

/// See the module documentation.
pub(super) struct Subscriptions {
    hub: Arc<Hub>,
    id: ConnId,
    sink: Arc<dyn Sink>,
    channels: Vec<String>,
}

impl Subscriptions {
    /// No subscriptions yet for connection `id`, whose queue is `sink`.
    pub(super) fn new(hub: Arc<Hub>, id: ConnId, sink: Arc<dyn Sink>) -> Self {
        Self {
            hub,
            id,
            sink,
            channels: Vec::new(),
        }
    }

    /// The connection's id.
    pub(super) fn id(&self) -> ConnId {
        self.id
    }

    /// Whether `channel` is already subscribed.
    pub(super) fn contains(&self, channel: &str) -> bool {
        self.channels.iter().any(|c| c == channel)
    }

    /// The subscribed channels.
    pub(super) fn channels(&self) -> &[String] {
        &self.channels
    }

    /// Subscribes `channel` (see [`Hub::subscribe`]). On error a channel
    /// this connection already had stays subscribed.
    pub(super) async fn add(
        &mut self,
        channel: &str,
        events: Option<Filter>,
        start: ChannelStart,
        rule: &Arc<Rule>,
    ) -> Result<(), Refusal> {
        self.hub
            .subscribe(channel, self.id, &self.sink, events, start, rule)
            .await?;
        if !self.contains(channel) {
            // Room for this one only: most connections have one or two
            // channels, and a list grown by doubling holds room for four.
            self.channels.reserve_exact(1);
            self.channels.push(channel.to_owned());
        }
        Ok(())
    }

    /// Unsubscribes `channel`; returns whether it was subscribed.
    pub(super) fn remove(&mut self, channel: &str) -> bool {
        let Some(pos) = self.channels.iter().position(|c| c == channel) else {
            return false;
        };
        self.channels.swap_remove(pos);
        self.hub.unsubscribe(channel, self.id);
        true
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for channel in &self.channels {
            self.hub.unsubscribe(channel, self.id);
        }
    }
}
