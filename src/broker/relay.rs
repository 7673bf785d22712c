//! The relay from Redis to the hub, shared by both supervisors (one node,
//! a Cluster): every channel the hub wants and what the broker knows of it,
//! and the one path a message takes to the hub — live, recovered from
//! history after an outage, or a `gap` where it cannot be — deduplicated by
//! history id, so that a recovery and live pub/sub never deliver one
//! message twice.
//!
//! It owns no connection: the supervisors subscribe and reconnect, and
//! tell the relay what arrived and when to recover.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::command::Redis;
use super::{ChannelStart, Fanout};
use crate::history::{self, StreamId};
use crate::metrics::Metrics;
use crate::protocol::Publication;

/// Most messages recovered per channel after an outage.
const RECOVERY_LIMIT: usize = 10_000;

/// What the broker knows of one channel the hub wants.
pub(super) struct Wanted {
    /// Readiness signal shared with the hub's waiters.
    pub(super) ready: watch::Sender<bool>,
    /// For history channels: the newest id relayed (or the position at
    /// subscription), where recovery resumes after an outage.
    pub(super) last: Option<StreamId>,
    /// The channel's rule keeps history.
    pub(super) history: bool,
    /// A connection that carried its subscription was lost since it last
    /// recovered: recover once it is subscribed again (Cluster; the node
    /// supervisor recovers every channel when it reconnects).
    pub(super) pending: bool,
}

/// The relay: the channels the hub wants, and where their messages go.
pub(super) struct Relay {
    hub: Arc<dyn Fanout>,
    redis: Redis,
    metrics: Metrics,
    /// The prefix of crier's channels in Redis.
    prefix: String,
    channels: HashMap<String, Wanted>,
}

impl Relay {
    pub(super) fn new(hub: Arc<dyn Fanout>, redis: Redis, metrics: Metrics) -> Self {
        let prefix = redis.prefix().to_owned();
        Relay {
            hub,
            redis,
            metrics,
            prefix,
            channels: HashMap::new(),
        }
    }

    /// The hub wants `channel`, from what its first subscriber learnt:
    /// recovery resumes from the subscriber's position, or sends a gap
    /// where it had none.
    pub(super) fn want(
        &mut self,
        channel: String,
        ready: watch::Sender<bool>,
        start: ChannelStart,
    ) {
        let ChannelStart { history, position } = start;
        let wanted = Wanted {
            ready,
            last: position,
            history,
            pending: false,
        };
        self.channels.insert(channel, wanted);
    }

    /// The hub no longer wants `channel`.
    pub(super) fn forget(&mut self, channel: &str) {
        self.channels.remove(channel);
    }

    /// How many channels the hub wants.
    pub(super) fn len(&self) -> usize {
        self.channels.len()
    }

    /// The channels the hub wants, by name (no prefix).
    pub(super) fn names(&self) -> Vec<String> {
        self.channels.keys().cloned().collect()
    }

    /// The channels the hub wants, by their Redis name.
    pub(super) fn keys(&self) -> Vec<String> {
        self.channels.keys().map(|name| self.key(name)).collect()
    }

    /// Every channel's state.
    pub(super) fn wanted(&mut self) -> impl Iterator<Item = &mut Wanted> {
        self.channels.values_mut()
    }

    /// Sets every channel's readiness.
    pub(super) fn set_ready(&self, up: bool) {
        for channel in self.channels.values() {
            channel.ready.send_replace(up);
        }
    }

    /// `channel`'s name in Redis.
    pub(super) fn key(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }

    /// The state of the channel named `key` in Redis, if the hub wants it.
    pub(super) fn by_key(&mut self, key: &str) -> Option<&mut Wanted> {
        let name = key.strip_prefix(self.prefix.as_str())?;
        self.channels.get_mut(name)
    }

    /// A message received live on the Redis channel `key`; crier's own
    /// channels and others' are left alone.
    pub(super) async fn message(&mut self, key: &str, payload: &[u8]) {
        let Some(channel) = key.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        let (id, payload) = history::split_marked(payload);
        self.channel(channel).live(id, payload).await;
    }

    /// Reads from history what `channel` missed since the last message
    /// relayed, and relays it (or a gap).
    pub(super) async fn recover(&mut self, channel: &str) {
        self.channel(channel).recover().await;
    }

    /// [`Self::recover`] for the channel named `key` in Redis.
    pub(super) async fn recover_key(&mut self, key: &str) {
        if let Some(channel) = key.strip_prefix(self.prefix.as_str()) {
            let channel = channel.to_owned();
            self.recover(&channel).await;
        }
    }

    /// `channel`'s relay.
    fn channel<'a>(&'a mut self, channel: &'a str) -> ChannelRelay<'a> {
        ChannelRelay {
            hub: &*self.hub,
            redis: &self.redis,
            metrics: &self.metrics,
            state: self.channels.get_mut(channel),
            channel,
        }
    }
}

/// What a channel missed while its subscription was lost.
enum Missed {
    /// Lost for good: the client must resync.
    Gap,
    /// Recovered from history.
    Message(StreamId, Vec<u8>),
}

/// What `channel` missed after `last` (and before `before`, when given):
/// its history since then (with a gap first where Redis lost some), or a
/// gap for a channel without history or one whose history cannot be read.
async fn missed(
    redis: &Redis,
    metrics: &Metrics,
    channel: &str,
    history: bool,
    last: Option<StreamId>,
    before: Option<StreamId>,
) -> Vec<Missed> {
    let (true, Some(since)) = (history, last) else {
        return vec![Missed::Gap];
    };
    match redis.recover(channel, since, RECOVERY_LIMIT).await {
        Ok(mut recovery) => {
            if let Some(before) = before {
                recovery.entries.retain(|(id, _)| *id < before);
            }
            let count = recovery.entries.len();
            metrics.recovered_messages.inc_by(count as u64);
            if count > 0 {
                tracing::info!(%channel, count, "recovered from history");
            }
            recovery
                .gap
                .then_some(Missed::Gap)
                .into_iter()
                .chain(
                    recovery
                        .entries
                        .into_iter()
                        .map(|(id, payload)| Missed::Message(id, payload)),
                )
                .collect()
        }
        Err(e) => {
            tracing::warn!(%channel, error = %e, "history recovery failed");
            vec![Missed::Gap]
        }
    }
}

/// One channel's relay to the hub: where its messages go and what the
/// broker knows of it (none once the hub no longer wants it).
struct ChannelRelay<'a> {
    hub: &'a dyn Fanout,
    redis: &'a Redis,
    metrics: &'a Metrics,
    state: Option<&'a mut Wanted>,
    channel: &'a str,
}

impl ChannelRelay<'_> {
    /// Hands a publication to the hub, unless the channel's last relayed
    /// id already covers it (a recovery and live pub/sub can both bring it).
    fn one(&mut self, id: Option<StreamId>, payload: &[u8]) {
        if let (Some(id), Some(state)) = (id, self.state.as_mut()) {
            if state.last.is_some_and(|last| last >= id) {
                return;
            }
            state.last = Some(id);
        }
        self.hub.publish(self.channel, id, payload);
    }

    /// Tells the channel's listeners that messages were lost.
    fn gap(&self) {
        self.metrics.gaps.inc();
        self.hub.dispatch(Publication::gap(self.channel));
    }

    /// Relays what the channel missed, in order.
    fn missed(&mut self, missed: Vec<Missed>) {
        for missed in missed {
            match missed {
                Missed::Gap => self.gap(),
                Missed::Message(id, payload) => self.one(Some(id), &payload),
            }
        }
    }

    /// Reads from history what the channel missed since the last message
    /// relayed, and relays it.
    async fn recover(&mut self) {
        let Some(state) = &self.state else { return };
        let (last, history) = (state.last, state.history);
        let missed = missed(self.redis, self.metrics, self.channel, history, last, None).await;
        self.missed(missed);
    }

    /// A message received live, relayed after what it skipped: when its id
    /// is not the one `crier_publish` wrote right after the last relayed,
    /// the subscription lapsed without crier noticing (a failover in
    /// progress, a node connection the client library re-established), and
    /// the messages in between are read from history and relayed first, in
    /// order. A read that fails is a gap: nothing is lost silently.
    async fn live(mut self, id: Option<StreamId>, payload: &[u8]) {
        let last = self
            .state
            .as_ref()
            .filter(|state| state.history)
            .and_then(|state| state.last);
        if let (Some(last), Some(id)) = (last, id) {
            if last.skips_to(id) {
                let skipped = missed(
                    self.redis,
                    self.metrics,
                    self.channel,
                    true,
                    Some(last),
                    Some(id),
                )
                .await;
                self.missed(skipped);
            }
        }
        self.one(id, payload);
    }
}
