//! The hub: which local connection listens to which channel, and the fan-out
//! of each publication to them.
//!
//! The hub never awaits a client. A publication is pushed with `try_send`
//! into each listener's bounded queue; a full queue marks that connection
//! slow (its transport then closes it) and the others carry on. The map is
//! sharded so subscription churn on one channel does not stall fan-out on
//! another, and no lock is held across an `.await`.
//!
//! The hub also drives the broker's subscriptions: the first local listener
//! of a channel asks the broker to subscribe, and a channel without
//! listeners is unsubscribed after a short linger (so a reconnecting client
//! costs no Redis round trip).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::protocol::{Filter, Kind, Publication};

/// Unique id of a client connection within this process.
pub type ConnId = u64;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh connection id.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

/// What a connection's transport reads: its bounded queue, and the signal
/// that it fell behind.
pub struct Inbox {
    /// Publications for this connection, in order.
    pub rx: mpsc::Receiver<Arc<Publication>>,
    /// Cancelled when the queue overflowed: the transport must close.
    pub slow: CancellationToken,
}

/// The hub's side of one connection: where to push its publications.
#[derive(Clone)]
pub struct Outbox {
    id: ConnId,
    tx: mpsc::Sender<Arc<Publication>>,
    slow: Arc<SlowFlag>,
}

struct SlowFlag {
    fired: AtomicBool,
    token: CancellationToken,
}

/// A connection's queue: the transport keeps the [`Inbox`], the hub gets
/// clones of the [`Outbox`] for each channel it listens to. `on_slow` is
/// cancelled when the queue overflows; SSE passes its TCP connection's kill
/// token here, so a client that stopped reading is cut off even while hyper
/// is stuck writing to it.
pub fn queue(capacity: usize, on_slow: CancellationToken) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    let token = on_slow;
    let outbox = Outbox {
        id: next_conn_id(),
        tx,
        slow: Arc::new(SlowFlag {
            fired: AtomicBool::new(false),
            token: token.clone(),
        }),
    };
    (outbox, Inbox { rx, slow: token })
}

impl Outbox {
    /// The connection id.
    pub fn id(&self) -> ConnId {
        self.id
    }
}

/// A listener of one channel, with its optional event-type filter.
#[derive(Clone)]
struct Listener {
    outbox: Outbox,
    events: Option<Filter>,
}

/// Requests from the hub to the broker, handled in order.
#[derive(Debug)]
pub enum Control {
    /// Start receiving `channel`; set `ready` to true once subscribed (and
    /// back to false while the broker is disconnected).
    Subscribe {
        /// Channel name, without prefix.
        channel: String,
        /// Readiness of this channel at the broker.
        ready: watch::Sender<bool>,
        /// What the first subscriber already knows of the channel.
        start: ChannelStart,
    },
    /// Stop receiving `channel`.
    Unsubscribe {
        /// Channel name, without prefix.
        channel: String,
    },
}

/// What a subscriber learnt of a channel before subscribing — whether it
/// keeps history, and its newest id then — so that the broker, which needs
/// the same to recover the channel after an outage, does not ask again: a
/// subscribe reads the channel's rule and position once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStart {
    /// The channel's rule keeps history.
    pub history: bool,
    /// Its newest id when the subscriber looked (history channels).
    pub position: Option<crate::history::StreamId>,
}

struct Channel {
    listeners: Vec<Listener>,
    /// When the last listener left; swept after the linger.
    idle_since: Option<Instant>,
    ready: watch::Receiver<bool>,
}

type Shard = RwLock<HashMap<String, Channel>>;

/// Why a subscription could not be made.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    /// The broker did not confirm in time (Redis down).
    #[error("the broker is unavailable, try again later")]
    Unavailable,
}

/// See the module documentation.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    control: mpsc::UnboundedSender<Control>,
    linger: Duration,
    subscribe_timeout: Duration,
    metrics: Metrics,
}

impl Hub {
    /// A hub whose subscription requests go to `control`.
    pub fn new(
        control: mpsc::UnboundedSender<Control>,
        linger: Duration,
        subscribe_timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        let shards = (0..64).map(|_| RwLock::new(HashMap::new())).collect();
        Self {
            shards,
            hasher: RandomState::new(),
            control,
            linger,
            subscribe_timeout,
            metrics,
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let i = self.hasher.hash_one(channel) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds `outbox` as a listener of `channel` and waits until the broker
    /// delivers that channel, so that anything published after this returns
    /// reaches the client. On error the listener is removed again.
    pub async fn subscribe(
        &self,
        channel: &str,
        outbox: &Outbox,
        events: Option<Filter>,
        start: ChannelStart,
    ) -> Result<(), SubscribeError> {
        let ready = {
            let mut shard = write(self.shard(channel));
            let entry = shard.entry(channel.to_owned()).or_insert_with(|| {
                let (tx, rx) = watch::channel(false);
                // The receiving end lives as long as the broker task; if it is
                // gone the process is shutting down and waiting times out.
                let _ = self.control.send(Control::Subscribe {
                    channel: channel.to_owned(),
                    ready: tx,
                    start,
                });
                self.metrics.channels.inc();
                Channel {
                    listeners: Vec::new(),
                    idle_since: None,
                    ready: rx,
                }
            });
            // Subscribing again replaces the listener (and its filter).
            let listener = Listener {
                outbox: outbox.clone(),
                events,
            };
            let previous = match entry
                .listeners
                .iter()
                .position(|l| l.outbox.id == outbox.id)
            {
                Some(i) => Some(std::mem::replace(&mut entry.listeners[i], listener)),
                None => {
                    self.metrics.subscriptions.inc();
                    entry.listeners.push(listener);
                    None
                }
            };
            entry.idle_since = None;
            (entry.ready.clone(), previous)
        };
        let (mut ready, previous) = ready;
        let confirmed = tokio::time::timeout(self.subscribe_timeout, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok());
        match (confirmed, previous) {
            (true, _) => Ok(()),
            // A subscription the connection already had stays as it was: the
            // broker recovers it (or sends a `gap`) when it is back.
            (_, Some(previous)) => {
                self.restore(channel, previous);
                Err(SubscribeError::Unavailable)
            }
            (_, None) => {
                self.unsubscribe(channel, outbox.id);
                Err(SubscribeError::Unavailable)
            }
        }
    }

    /// Puts back the listener a failed re-subscribe replaced.
    fn restore(&self, channel: &str, previous: Listener) {
        let mut shard = write(self.shard(channel));
        if let Some(entry) = shard.get_mut(channel) {
            if let Some(l) = entry
                .listeners
                .iter_mut()
                .find(|l| l.outbox.id == previous.outbox.id)
            {
                *l = previous;
            }
        }
    }

    /// Removes connection `conn` from `channel`'s listeners. Cheap and
    /// synchronous, so it can run from `Drop`.
    pub fn unsubscribe(&self, channel: &str, conn: ConnId) {
        let mut shard = write(self.shard(channel));
        if let Some(entry) = shard.get_mut(channel) {
            let before = entry.listeners.len();
            entry.listeners.retain(|l| l.outbox.id != conn);
            if entry.listeners.len() < before {
                self.metrics.subscriptions.dec();
            }
            if entry.listeners.is_empty() && entry.idle_since.is_none() {
                entry.idle_since = Some(Instant::now());
            }
        }
    }

    /// Fans `publication` out to every local listener of its channel.
    /// Returns how many queues accepted it. Never blocks on a client.
    pub fn dispatch(&self, publication: Publication) -> usize {
        self.metrics.messages_received.inc();
        let publication = Arc::new(publication);
        let shard = read(self.shard(&publication.channel));
        let Some(entry) = shard.get(&publication.channel) else {
            return 0;
        };
        let mut queued = 0;
        // A gap notice concerns the whole channel: filters do not apply.
        let filtered = publication.kind == Kind::Message;
        for listener in &entry.listeners {
            if let (Some(filter), true) = (&listener.events, filtered) {
                let wanted = publication
                    .event
                    .as_deref()
                    .is_some_and(|e| filter.iter().any(|f| f == e));
                if !wanted {
                    continue;
                }
            }
            match listener.outbox.tx.try_send(Arc::clone(&publication)) {
                Ok(()) => queued += 1,
                Err(mpsc::error::TrySendError::Full(_)) => self.mark_slow(&listener.outbox),
                // The connection is closing; its guard removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        queued
    }

    fn mark_slow(&self, outbox: &Outbox) {
        if !outbox.slow.fired.swap(true, Ordering::AcqRel) {
            self.metrics.slow_client_disconnects.inc();
            outbox.slow.token.cancel();
        }
    }

    /// Unsubscribes, at the broker, channels idle for longer than the linger.
    /// Returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            shard.retain(|channel, entry| {
                let expired = entry
                    .idle_since
                    .is_some_and(|t| t.elapsed() >= self.linger && entry.listeners.is_empty());
                if expired {
                    // Sent under the shard lock: a later Subscribe of the same
                    // channel is queued after this Unsubscribe.
                    let _ = self.control.send(Control::Unsubscribe {
                        channel: channel.clone(),
                    });
                    dropped += 1;
                }
                !expired
            });
        }
        self.metrics.channels.sub(dropped as i64);
        dropped
    }

    /// Runs [`Hub::sweep`] periodically until `stop` is cancelled.
    pub async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.linger / 2).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => { self.sweep(); }
            }
        }
    }

    /// Number of listeners of `channel` on this instance.
    #[cfg(test)]
    fn listeners(&self, channel: &str) -> usize {
        read(self.shard(channel))
            .get(channel)
            .map_or(0, |c| c.listeners.len())
    }
}

/// The subscriptions of one connection; dropping it unsubscribes them all,
/// so a connection that ends in any way leaves nothing behind in the hub.
pub struct Subscriptions {
    hub: Arc<Hub>,
    outbox: Outbox,
    channels: Vec<String>,
}

impl Subscriptions {
    /// No subscriptions yet.
    pub fn new(hub: Arc<Hub>, outbox: Outbox) -> Self {
        Self {
            hub,
            outbox,
            channels: Vec::new(),
        }
    }

    /// Whether `channel` is already subscribed.
    pub fn contains(&self, channel: &str) -> bool {
        self.channels.iter().any(|c| c == channel)
    }

    /// The subscribed channels.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// How many channels are subscribed.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Subscribes `channel` (see [`Hub::subscribe`]). On error a channel
    /// this connection already had stays subscribed.
    pub async fn add(
        &mut self,
        channel: &str,
        events: Option<Filter>,
        start: ChannelStart,
    ) -> Result<(), SubscribeError> {
        self.hub
            .subscribe(channel, &self.outbox, events, start)
            .await?;
        if !self.contains(channel) {
            self.channels.push(channel.to_owned());
        }
        Ok(())
    }

    /// Unsubscribes `channel`; returns whether it was subscribed.
    pub fn remove(&mut self, channel: &str) -> bool {
        let Some(pos) = self.channels.iter().position(|c| c == channel) else {
            return false;
        };
        self.channels.swap_remove(pos);
        self.hub.unsubscribe(channel, self.outbox.id);
        true
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for channel in &self.channels {
            self.hub.unsubscribe(channel, self.outbox.id);
        }
    }
}

// A poisoned lock only means a panic elsewhere while holding it; the map
// itself is still consistent (every critical section is a single insert,
// retain or lookup), so carry on rather than take the process down.
fn write(shard: &Shard) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Channel>> {
    shard.write().unwrap_or_else(|e| e.into_inner())
}

fn read(shard: &Shard) -> std::sync::RwLockReadGuard<'_, HashMap<String, Channel>> {
    shard.read().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hub whose broker confirms every subscription at once, as the memory
    /// broker does.
    fn hub(linger: Duration) -> (Arc<Hub>, mpsc::UnboundedReceiver<Control>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub::new(tx, linger, Duration::from_secs(1), Metrics::new());
        (Arc::new(hub), rx)
    }

    fn confirm_all(mut rx: mpsc::UnboundedReceiver<Control>) -> mpsc::UnboundedReceiver<String> {
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                match c {
                    Control::Subscribe { channel, ready, .. } => {
                        let _ = ready.send(true);
                        let _ = log_tx.send(format!("sub {channel}"));
                    }
                    Control::Unsubscribe { channel } => {
                        let _ = log_tx.send(format!("unsub {channel}"));
                    }
                }
            }
        });
        log_rx
    }

    #[tokio::test]
    async fn full_queue_marks_only_that_connection_slow() {
        let (hub, rx) = hub(Duration::from_secs(60));
        let _log = confirm_all(rx);
        let (slow_out, slow_in) = queue(2, CancellationToken::new());
        let (fast_out, mut fast_in) = queue(100, CancellationToken::new());
        let mut a = Subscriptions::new(hub.clone(), slow_out);
        let mut b = Subscriptions::new(hub.clone(), fast_out);
        a.add("c", None, ChannelStart::default())
            .await
            .expect("subscribed");
        b.add("c", None, ChannelStart::default())
            .await
            .expect("subscribed");
        for i in 0..5 {
            hub.dispatch(Publication::new("c", format!("{i}").as_bytes()));
        }
        assert!(slow_in.slow.is_cancelled());
        assert!(!fast_in.slow.is_cancelled());
        assert_eq!(hub.metrics.slow_client_disconnects.get(), 1);
        for i in 0..5 {
            let p = fast_in.rx.recv().await.expect("delivered");
            assert!(p.frame.as_str().ends_with(&format!("\"data\":{i}}}")));
        }
    }

    #[tokio::test]
    async fn event_filter_and_unsubscribe_on_drop() {
        let (hub, rx) = hub(Duration::ZERO);
        let mut log = confirm_all(rx);
        let (out, mut inbox) = queue(10, CancellationToken::new());
        let mut subs = Subscriptions::new(hub.clone(), out);
        subs.add(
            "c",
            Some(vec!["keep".into()].into()),
            ChannelStart::default(),
        )
        .await
        .expect("subscribed");
        assert_eq!(log.recv().await.as_deref(), Some("sub c"));
        hub.dispatch(Publication::new("c", br#"{"type":"drop"}"#));
        hub.dispatch(Publication::new("c", br#"{"type":"keep"}"#));
        hub.dispatch(Publication::new("c", b"no type"));
        let p = inbox.rx.recv().await.expect("delivered");
        assert_eq!(p.event.as_deref(), Some("keep"));
        hub.dispatch(Publication::gap("c"));
        let p = inbox
            .rx
            .recv()
            .await
            .expect("gap delivered despite the filter");
        assert_eq!(p.kind, Kind::Gap);
        assert!(
            inbox.rx.try_recv().is_err(),
            "filtered events are not queued"
        );

        drop(subs);
        assert_eq!(hub.listeners("c"), 0);
        assert_eq!(hub.sweep(), 1);
        assert_eq!(log.recv().await.as_deref(), Some("unsub c"));
        assert_eq!(hub.metrics.subscriptions.get(), 0);
        assert_eq!(hub.metrics.channels.get(), 0);
    }

    #[tokio::test]
    async fn subscribing_twice_replaces_the_filter_and_counts_once() {
        let (hub, rx) = hub(Duration::from_secs(60));
        let _log = confirm_all(rx);
        let (out, mut inbox) = queue(10, CancellationToken::new());
        let mut subs = Subscriptions::new(hub.clone(), out);
        subs.add("c", Some(vec!["a".into()].into()), ChannelStart::default())
            .await
            .expect("subscribed");
        subs.add("c", Some(vec!["b".into()].into()), ChannelStart::default())
            .await
            .expect("subscribed");
        assert_eq!(hub.metrics.subscriptions.get(), 1);
        assert_eq!(hub.listeners("c"), 1);
        assert_eq!(hub.dispatch(Publication::new("c", br#"{"type":"a"}"#)), 0);
        assert_eq!(hub.dispatch(Publication::new("c", br#"{"type":"b"}"#)), 1);
        assert_eq!(
            inbox.rx.recv().await.expect("b").event.as_deref(),
            Some("b")
        );
        drop(subs);
        assert_eq!(hub.metrics.subscriptions.get(), 0);
    }

    #[tokio::test]
    async fn linger_keeps_a_channel_for_a_quick_return() {
        let (hub, rx) = hub(Duration::from_secs(60));
        let mut log = confirm_all(rx);
        let (out, _inbox) = queue(10, CancellationToken::new());
        let mut subs = Subscriptions::new(hub.clone(), out);
        subs.add("c", None, ChannelStart::default())
            .await
            .expect("subscribed");
        assert!(subs.remove("c"));
        assert_eq!(hub.sweep(), 0, "still lingering");
        subs.add("c", None, ChannelStart::default())
            .await
            .expect("resubscribed");
        assert_eq!(log.recv().await.as_deref(), Some("sub c"));
        assert!(log.try_recv().is_err(), "no second broker subscription");
    }

    #[tokio::test]
    async fn a_failed_resubscribe_keeps_the_existing_listener() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(
            tx,
            Duration::ZERO,
            Duration::from_millis(50),
            Metrics::new(),
        ));
        let (out, mut inbox) = queue(10, CancellationToken::new());
        let mut subs = Subscriptions::new(hub.clone(), out);
        let confirm = async {
            match rx.recv().await {
                Some(Control::Subscribe { ready, .. }) => {
                    ready.send_replace(true);
                    ready
                }
                other => panic!("expected a subscribe, got {other:?}"),
            }
        };
        let (added, ready) = tokio::join!(subs.add("c", None, ChannelStart::default()), confirm);
        added.expect("subscribed");
        // The broker goes away: a re-subscribe (new filter) cannot be
        // confirmed and fails, but the subscription stays, filter and all.
        ready.send_replace(false);
        let again = subs
            .add(
                "c",
                Some(vec!["only".into()].into()),
                ChannelStart::default(),
            )
            .await;
        assert_eq!(again, Err(SubscribeError::Unavailable));
        assert_eq!(subs.channels(), ["c"]);
        assert_eq!(hub.listeners("c"), 1);
        assert_eq!(hub.metrics.subscriptions.get(), 1);
        hub.dispatch(Publication::new("c", br#"{"type":"other"}"#));
        let got = inbox.rx.try_recv().expect("still listening, unfiltered");
        assert_eq!(got.event.as_deref(), Some("other"));
    }

    #[tokio::test]
    async fn unconfirmed_subscription_times_out_and_leaves_nothing() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(
            tx,
            Duration::ZERO,
            Duration::from_millis(50),
            Metrics::new(),
        ));
        let (out, _inbox) = queue(10, CancellationToken::new());
        let mut subs = Subscriptions::new(hub.clone(), out);
        assert_eq!(
            subs.add("c", None, ChannelStart::default()).await,
            Err(SubscribeError::Unavailable)
        );
        assert!(subs.is_empty());
        assert_eq!(hub.listeners("c"), 0);
        assert_eq!(hub.metrics.subscriptions.get(), 0);
    }
}
