//! The channels one connection listens to. The session that owns the set
//! ends them all ([`Subscriptions::clear`]) when it is dropped, so a
//! connection that ends in any way leaves nothing behind in the hub.
//!
//! The hub and the connection's queue are the session's, passed in where
//! needed rather than kept here: this set is in every idle connection's
//! task, and two more pointers to what the session already holds would
//! be three words of it.

use std::sync::Arc;

use super::queue::ConnId;
use crate::broker::ChannelStart;
use crate::hub::{Hub, Sink};
use crate::policy::Rule;
use crate::protocol::Filter;
use crate::refusal::Refusal;

/// See the module documentation.
pub(super) struct Subscriptions {
    id: ConnId,
    channels: Vec<String>,
}

impl Subscriptions {
    /// No subscriptions yet for connection `id`.
    pub(super) fn new(id: ConnId) -> Self {
        Self {
            id,
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

    /// Subscribes `channel` in `hub`, delivering to `sink` (see
    /// [`Hub::subscribe`]). On error a channel this connection already had
    /// stays subscribed.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn add(
        &mut self,
        hub: &Hub,
        sink: &Arc<dyn Sink>,
        channel: &str,
        events: Option<Filter>,
        start: ChannelStart,
        rule: &Arc<Rule>,
    ) -> Result<(), Refusal> {
        hub.subscribe(channel, self.id, sink, events, start, rule)
            .await?;
        if !self.contains(channel) {
            // Room for this one only: most connections have one or two
            // channels, and a list grown by doubling holds room for four.
            self.channels.reserve_exact(1);
            self.channels.push(channel.to_owned());
        }
        Ok(())
    }

    /// Unsubscribes `channel` from `hub`; returns whether it was
    /// subscribed.
    pub(super) fn remove(&mut self, hub: &Hub, channel: &str) -> bool {
        let Some(pos) = self.channels.iter().position(|c| c == channel) else {
            return false;
        };
        self.channels.swap_remove(pos);
        hub.unsubscribe(channel, self.id);
        true
    }

    /// Unsubscribes every channel from `hub`.
    pub(super) fn clear(&mut self, hub: &Hub) {
        for channel in self.channels.drain(..) {
            hub.unsubscribe(&channel, self.id);
        }
    }
}
