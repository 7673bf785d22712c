//! The hub: which local connection listens to which channel, and the fan-out
//! of each publication to them.
//!
//! The hub never awaits a client. A publication is offered to each
//! listener's [`Sink`] (a connection's bounded queue, which refuses rather
//! than waits when full), and the others carry on. The map is sharded so
//! subscription churn on one channel does not stall fan-out on another, and
//! no lock is held across an `.await`, nor across a write to a socket: the
//! few listeners a publication is written to directly are picked under the
//! shard's lock and offered it after the lock is released.
//!
//! The hub also drives the broker's subscriptions: the first local listener
//! of a channel sends the broker a [`Control::Subscribe`], and a channel
//! without listeners is unsubscribed after a short linger (so a reconnecting
//! client costs no Redis round trip).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::broker::{ChannelStart, Control, Fanout};
use crate::events::Ledger;
use crate::history::StreamId;
use crate::metrics::Metrics;
use crate::policy::Rule;
use crate::protocol::{wanted, Chain, ChainSpec, Filter, Publication};
use crate::refusal::Refusal;

/// Where the hub puts one listener's publications: a connection's queue.
pub(crate) trait Sink: Send + Sync {
    /// Queues `publication` without waiting, or, when `direct` allows it
    /// and the connection is idle, writes it to the socket at once. A full
    /// queue refuses it (and marks its connection slow, which then
    /// closes); the hub carries on.
    fn offer(&self, publication: &Arc<Publication>, direct: bool) -> bool;

    /// The chain its connection may follow on each channel it listens to
    /// (see [`crate::protocol::Chain`]), if any.
    fn chain(&self) -> Option<ChainSpec> {
        None
    }
}

/// A listener of one channel, with its optional event-type filter.
#[derive(Clone)]
struct Listener {
    /// The connection's id: one listener per connection and channel.
    id: u64,
    sink: Arc<dyn Sink>,
    events: Option<Filter>,
    /// The key of the channel's chain this listener counts in.
    chain: Option<u8>,
}

struct Channel {
    listeners: Vec<Listener>,
    /// What the channel rules say about the channel, resolved when its
    /// first listener subscribed: a publication reads its event field here.
    rule: Arc<Rule>,
    /// When the last listener left; swept after the linger.
    idle_since: Option<Instant>,
    ready: watch::Receiver<bool>,
    /// The channel's chains, one per kind its listeners may follow.
    chains: Vec<ChannelChain>,
}

/// A channel's chain of one kind (a compression context its listeners
/// share), and how many listeners may follow it. It exists only while at
/// least [`CHAIN_FOLLOWERS`] may, and while the process holds fewer than
/// `ws.compression_contexts`: each holds a compressor's memory (about
/// 300 KiB).
struct ChannelChain {
    spec: ChainSpec,
    followers: usize,
    chain: Option<Box<dyn Chain>>,
}

/// A channel gets a chain once this many of its listeners may follow it:
/// one listener alone saves too little for a compressor's memory.
const CHAIN_FOLLOWERS: usize = 2;
type Shard = RwLock<HashMap<String, Channel>>;

/// Direct writes (see [`Sink::offer`]) go only to channels with at most
/// this many local listeners: they run on the dispatching task's core, one
/// write each, while a larger fan-out is spread over every core by the
/// connections' own tasks.
const DIRECT_FANOUT: usize = 256;
/// Direct writes may take this share of each [`DIRECT_WINDOW`] of wall
/// time, at most. They run on the broker's task, which must keep reading
/// Redis: past the share (a burst, or a machine short of CPU, where each
/// write takes longer), publications queue and the connections' tasks
/// write them, several per call, on every core.
const DIRECT_SHARE: Duration = Duration::from_millis(25);
/// See [`DIRECT_SHARE`].
const DIRECT_WINDOW: Duration = Duration::from_millis(100);

/// The wall time direct writes took in the current window.
struct DirectBudget {
    window: Instant,
    used: Duration,
}

impl DirectBudget {
    /// Whether a dispatch may write directly now.
    fn allows(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= DIRECT_WINDOW {
            self.window = now;
            self.used = Duration::ZERO;
        }
        self.used < DIRECT_SHARE
    }
}

/// See the module documentation.
pub(crate) struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    control: mpsc::UnboundedSender<Control>,
    linger: Duration,
    subscribe_timeout: Duration,
    metrics: Metrics,
    direct: Mutex<DirectBudget>,
    /// How many chains the process may hold (`ws.compression_contexts`),
    /// and how many it does.
    chains_max: usize,
    chains: std::sync::atomic::AtomicUsize,
    /// Where listeners coming and going are counted for lifecycle events
    /// (`[events]`), if they are on.
    ledger: Option<Arc<Ledger>>,
}

impl Hub {
    /// A hub whose subscription requests go to `control`.
    pub(crate) fn new(
        control: mpsc::UnboundedSender<Control>,
        linger: Duration,
        subscribe_timeout: Duration,
        chains_max: usize,
        ledger: Option<Arc<Ledger>>,
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
            direct: Mutex::new(DirectBudget {
                window: Instant::now(),
                used: Duration::ZERO,
            }),
            chains_max,
            chains: Default::default(),
            ledger,
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let i = self.hasher.hash_one(channel) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds connection `id` (its queue: `sink`) as a listener of `channel`,
    /// whose rule (resolved by the subscribe) is `rule`, and waits until the broker delivers that channel, so that anything
    /// published after this returns reaches the client. Subscribing again
    /// replaces the filter. On error a listener the connection already had
    /// stays as it was (the broker recovers it, or sends a `gap`, when it
    /// is back), and a new one is removed.
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
        id: u64,
        sink: &Arc<dyn Sink>,
        events: Option<Filter>,
        start: ChannelStart,
        rule: &Arc<Rule>,
    ) -> Result<(), Refusal> {
        let (mut ready, previous) = {
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
                    rule: Arc::clone(rule),
                    idle_since: None,
                    ready: rx,
                    chains: Vec::new(),
                }
            });
            let mut listener = Listener {
                id,
                sink: Arc::clone(sink),
                events,
                chain: None,
            };
            let previous = match entry.listeners.iter().position(|l| l.id == id) {
                Some(i) => {
                    listener.chain = entry.listeners[i].chain;
                    Some(std::mem::replace(&mut entry.listeners[i], listener))
                }
                None => {
                    self.metrics.subscriptions.inc();
                    listener.chain = sink.chain().map(|spec| self.follow(entry, spec));
                    entry.listeners.push(listener);
                    if let Some(ledger) = &self.ledger {
                        ledger.channel(channel, 1);
                    }
                    None
                }
            };
            entry.idle_since = None;
            (entry.ready.clone(), previous)
        };
        let confirmed = tokio::time::timeout(self.subscribe_timeout, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok());
        match (confirmed, previous) {
            (true, _) => Ok(()),
            (_, Some(previous)) => {
                self.restore(channel, previous);
                Err(Refusal::Unavailable)
            }
            (_, None) => {
                self.unsubscribe(channel, id);
                Err(Refusal::Unavailable)
            }
        }
    }

    /// Puts back the listener a failed re-subscribe replaced.
    fn restore(&self, channel: &str, previous: Listener) {
        let mut shard = write(self.shard(channel));
        if let Some(entry) = shard.get_mut(channel) {
            if let Some(l) = entry.listeners.iter_mut().find(|l| l.id == previous.id) {
                *l = previous;
            }
        }
    }

    /// Removes connection `id` from `channel`'s listeners. Cheap and
    /// synchronous, so it can run from `Drop`.
    pub(crate) fn unsubscribe(&self, channel: &str, id: u64) {
        let mut shard = write(self.shard(channel));
        if let Some(entry) = shard.get_mut(channel) {
            if let Some(at) = entry.listeners.iter().position(|l| l.id == id) {
                let gone = entry.listeners.remove(at);
                self.metrics.subscriptions.dec();
                if let Some(ledger) = &self.ledger {
                    ledger.channel(channel, -1);
                }
                if let Some(key) = gone.chain {
                    self.unfollow(entry, key);
                }
            }
            if entry.listeners.is_empty() && entry.idle_since.is_none() {
                entry.idle_since = Some(Instant::now());
            }
        }
    }

    /// Where listeners are counted for lifecycle events, if they are on.
    pub(crate) fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    /// Counts a listener that may follow `spec`'s chain on `entry`, making
    /// the chain when it has enough followers and the process has room.
    /// Returns the chain's key.
    fn follow(&self, entry: &mut Channel, spec: ChainSpec) -> u8 {
        let key = spec.key;
        let at = match entry.chains.iter().position(|c| c.spec.key == key) {
            Some(at) => at,
            None => {
                entry.chains.push(ChannelChain {
                    spec,
                    followers: 0,
                    chain: None,
                });
                entry.chains.len() - 1
            }
        };
        let c = &mut entry.chains[at];
        c.followers += 1;
        match &c.chain {
            Some(chain) => chain.joined(),
            None if c.followers >= CHAIN_FOLLOWERS && self.take_chain_room() => {
                c.chain = Some((c.spec.make)(&c.spec));
            }
            None => {}
        }
        key
    }

    /// A follower of `entry`'s chain `key` left; the chain goes (and its
    /// memory with it) when too few remain.
    fn unfollow(&self, entry: &mut Channel, key: u8) {
        let Some(at) = entry.chains.iter().position(|c| c.spec.key == key) else {
            return;
        };
        let c = &mut entry.chains[at];
        c.followers -= 1;
        if c.followers < CHAIN_FOLLOWERS && c.chain.take().is_some() {
            self.chains
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.metrics.ws_compression_contexts.dec();
        }
        if c.followers == 0 {
            entry.chains.swap_remove(at);
        }
    }

    /// Whether the process may hold one more chain (and counts it).
    fn take_chain_room(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let taken = self
            .chains
            .fetch_update(Relaxed, Relaxed, |n| (n < self.chains_max).then_some(n + 1))
            .is_ok();
        if taken {
            self.metrics.ws_compression_contexts.inc();
        }
        taken
    }

    /// The channels this process's clients listen to, sorted.
    pub(crate) fn channels(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .shards
            .iter()
            .flat_map(|shard| {
                read(shard)
                    .iter()
                    .filter(|(_, entry)| !entry.listeners.is_empty())
                    .map(|(name, _)| name.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names
    }

    /// Fans `publication` out to every local listener of its channel.
    /// Returns how many queues accepted it. Never blocks on a client.
    ///
    /// A publication for few listeners (at most `DIRECT_FANOUT`, within
    /// the direct-write budget) may be written straight to their sockets:
    /// those listeners are picked under the shard's read lock and offered
    /// it after the lock is released, so no lock of the hub is held across
    /// a write and a thread preempted mid-write holds up no subscribe,
    /// unsubscribe or sweep of the shard. Any other publication is only
    /// queued, under the lock, without copying the listener list. Nothing
    /// about a connection's order depends on the shard's lock: a
    /// connection's [`Sink`] orders its direct and queued writes by itself
    /// (see `session/queue.rs` and `link::Outlet`), and publications of one
    /// channel are dispatched one after another. An offer picked just
    /// before an unsubscribe may still arrive after it, as one queued just
    /// before it always could.
    pub(crate) fn dispatch(&self, publication: Publication) -> usize {
        let channel = publication.channel.clone();
        self.fan_out(&channel, |_| publication)
    }

    /// Fans a message of `channel` out to its local listeners, decoded
    /// with the channel's rule as its first listener resolved it: a
    /// publication never walks the channel rules, and one nobody here
    /// listens to is not even decoded.
    pub(crate) fn publish(&self, channel: &str, id: Option<StreamId>, payload: &[u8]) -> usize {
        self.fan_out(channel, |rule| {
            Publication::message(channel, id, payload, &rule.event_field)
        })
    }

    /// See [`Hub::dispatch`]: `make` builds the publication from the
    /// channel's rule, once a listener is known to exist.
    fn fan_out(&self, channel: &str, make: impl FnOnce(&Rule) -> Publication) -> usize {
        self.metrics.messages_received.inc();
        let started = Instant::now();
        let (publication, targets): (_, Vec<Arc<dyn Sink>>) = {
            let shard = read(self.shard(channel));
            let Some(entry) = shard.get(channel) else {
                return 0;
            };
            let mut publication = make(&entry.rule);
            // Links are made here, in the channel's order, before anyone
            // can write the publication.
            for chain in entry.chains.iter().filter_map(|c| c.chain.as_ref()) {
                publication.chained.extend(chain.next(&publication));
            }
            let publication = Arc::new(publication);
            let direct =
                entry.listeners.len() <= DIRECT_FANOUT && self.direct_budget().allows(started);
            if !direct {
                // Queued offers never touch a socket: offer under the lock,
                // with no copy of the (possibly very long) listener list.
                return entry
                    .listeners
                    .iter()
                    .filter(|l| wanted(l.events.as_ref(), &publication))
                    .filter(|l| l.sink.offer(&publication, false))
                    .count();
            }
            let targets = entry
                .listeners
                .iter()
                .filter(|l| wanted(l.events.as_ref(), &publication))
                .map(|l| Arc::clone(&l.sink))
                .collect();
            (publication, targets)
        };
        // A few listeners, written to directly: after releasing the lock.
        let queued = targets
            .iter()
            .filter(|sink| sink.offer(&publication, true))
            .count();
        self.direct_budget().used += started.elapsed();
        queued
    }

    fn direct_budget(&self) -> std::sync::MutexGuard<'_, DirectBudget> {
        self.direct.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unsubscribes, at the broker, channels idle for longer than the linger.
    /// Returns how many were dropped.
    pub(crate) fn sweep(&self) -> usize {
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
    pub(crate) async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
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

impl Fanout for Hub {
    fn publish(&self, channel: &str, id: Option<StreamId>, payload: &[u8]) -> usize {
        Hub::publish(self, channel, id, payload)
    }

    fn dispatch(&self, publication: Publication) -> usize {
        Hub::dispatch(self, publication)
    }

    fn rule(&self, channel: &str) -> Option<Arc<Rule>> {
        let shard = read(self.shard(channel));
        shard.get(channel).map(|entry| Arc::clone(&entry.rule))
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
    use std::sync::Mutex;

    use super::*;

    /// The rule of a channel no rule names, in dev mode.
    fn rule() -> Arc<Rule> {
        crate::policy::Policy::new(&[], true)
            .expect("no rules")
            .rule_of("c")
    }
    use crate::protocol::Kind;

    /// A hub whose broker confirms every subscription at once, as the memory
    /// broker does.
    fn hub(linger: Duration) -> (Arc<Hub>, mpsc::UnboundedReceiver<Control>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub::new(tx, linger, Duration::from_secs(1), 0, None, Metrics::new());
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

    /// A sink that keeps up to `room` publications and refuses the rest.
    #[derive(Default)]
    struct Recorder {
        room: usize,
        got: Mutex<Vec<Arc<Publication>>>,
    }

    impl Sink for Recorder {
        fn offer(&self, p: &Arc<Publication>, _direct: bool) -> bool {
            let mut got = self.got.lock().expect("lock");
            if got.len() >= self.room {
                return false;
            }
            got.push(Arc::clone(p));
            true
        }
    }

    fn recorder(room: usize) -> (Arc<Recorder>, Arc<dyn Sink>) {
        let r = Arc::new(Recorder {
            room,
            got: Mutex::default(),
        });
        let sink: Arc<dyn Sink> = r.clone();
        (r, sink)
    }

    fn events(r: &Recorder) -> Vec<Option<String>> {
        let got = r.got.lock().expect("lock");
        got.iter().map(|p| p.event.clone()).collect()
    }

    fn filter(names: &[&str]) -> Option<Filter> {
        Some(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn direct_writes_stop_for_the_rest_of_a_window_once_its_share_is_spent() {
        let start = Instant::now();
        let mut budget = DirectBudget {
            window: start,
            used: Duration::ZERO,
        };
        assert!(budget.allows(start));
        budget.used += DIRECT_SHARE.saturating_sub(Duration::from_millis(1));
        assert!(
            budget.allows(start + Duration::from_millis(50)),
            "a little left"
        );
        budget.used += Duration::from_millis(1);
        assert!(
            !budget.allows(start + Duration::from_millis(50)),
            "spent: queue instead"
        );
        assert!(
            budget.allows(start + DIRECT_WINDOW),
            "a new window starts afresh"
        );
        assert_eq!(budget.used, Duration::ZERO);
    }

    #[tokio::test]
    async fn a_full_sink_misses_only_its_own_deliveries() {
        let (hub, rx) = hub(Duration::from_secs(60));
        let _log = confirm_all(rx);
        let (slow, slow_sink) = recorder(2);
        let (fast, fast_sink) = recorder(100);
        let start = ChannelStart::default();
        hub.subscribe("c", 1, &slow_sink, None, start, &rule())
            .await
            .expect("subscribed");
        hub.subscribe("c", 2, &fast_sink, None, start, &rule())
            .await
            .expect("subscribed");
        let queued: Vec<_> = (0..5)
            .map(|i| hub.dispatch(Publication::new("c", format!("{i}").as_bytes())))
            .collect();
        assert_eq!(queued, [2, 2, 1, 1, 1]);
        assert_eq!(slow.got.lock().expect("lock").len(), 2);
        assert_eq!(fast.got.lock().expect("lock").len(), 5);
    }

    #[tokio::test]
    async fn event_filter_and_the_linger_sweep() {
        let (hub, rx) = hub(Duration::ZERO);
        let mut log = confirm_all(rx);
        let (got, sink) = recorder(10);
        hub.subscribe(
            "c",
            1,
            &sink,
            filter(&["keep"]),
            ChannelStart::default(),
            &rule(),
        )
        .await
        .expect("subscribed");
        assert_eq!(log.recv().await.as_deref(), Some("sub c"));
        hub.dispatch(Publication::new("c", br#"{"type":"drop"}"#));
        hub.dispatch(Publication::new("c", br#"{"type":"keep"}"#));
        hub.dispatch(Publication::new("c", b"no type"));
        hub.dispatch(Publication::gap("c"));
        assert_eq!(
            events(&got),
            [Some("keep".into()), Some("gap".into())],
            "the gap passes the filter"
        );
        assert_eq!(got.got.lock().expect("lock")[1].kind, Kind::Gap);

        hub.unsubscribe("c", 1);
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
        let (got, sink) = recorder(10);
        let start = ChannelStart::default();
        hub.subscribe("c", 1, &sink, filter(&["a"]), start, &rule())
            .await
            .expect("subscribed");
        hub.subscribe("c", 1, &sink, filter(&["b"]), start, &rule())
            .await
            .expect("subscribed");
        assert_eq!(hub.metrics.subscriptions.get(), 1);
        assert_eq!(hub.listeners("c"), 1);
        assert_eq!(hub.dispatch(Publication::new("c", br#"{"type":"a"}"#)), 0);
        assert_eq!(hub.dispatch(Publication::new("c", br#"{"type":"b"}"#)), 1);
        assert_eq!(events(&got), [Some("b".into())]);
        hub.unsubscribe("c", 1);
        assert_eq!(hub.metrics.subscriptions.get(), 0);
    }

    #[tokio::test]
    async fn linger_keeps_a_channel_for_a_quick_return() {
        let (hub, rx) = hub(Duration::from_secs(60));
        let mut log = confirm_all(rx);
        let (_got, sink) = recorder(10);
        let start = ChannelStart::default();
        hub.subscribe("c", 1, &sink, None, start, &rule())
            .await
            .expect("subscribed");
        hub.unsubscribe("c", 1);
        assert_eq!(hub.sweep(), 0, "still lingering");
        hub.subscribe("c", 1, &sink, None, start, &rule())
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
            0,
            None,
            Metrics::new(),
        ));
        let (got, sink) = recorder(10);
        let confirm = async {
            match rx.recv().await {
                Some(Control::Subscribe { ready, .. }) => {
                    ready.send_replace(true);
                    ready
                }
                other => panic!("expected a subscribe, got {other:?}"),
            }
        };
        let start = ChannelStart::default();
        let plain = rule();
        let added = hub.subscribe("c", 1, &sink, None, start, &plain);
        let (added, ready) = tokio::join!(added, confirm);
        added.expect("subscribed");
        // The broker goes away: a re-subscribe (new filter) cannot be
        // confirmed and fails, but the subscription stays, filter and all.
        ready.send_replace(false);
        let again = hub
            .subscribe("c", 1, &sink, filter(&["only"]), start, &rule())
            .await;
        assert_eq!(again, Err(Refusal::Unavailable));
        assert_eq!(hub.listeners("c"), 1);
        assert_eq!(hub.metrics.subscriptions.get(), 1);
        hub.dispatch(Publication::new("c", br#"{"type":"other"}"#));
        assert_eq!(
            events(&got),
            [Some("other".into())],
            "still listening, unfiltered"
        );
    }

    #[tokio::test]
    async fn unconfirmed_subscription_times_out_and_leaves_nothing() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(
            tx,
            Duration::ZERO,
            Duration::from_millis(50),
            0,
            None,
            Metrics::new(),
        ));
        let (_got, sink) = recorder(10);
        assert_eq!(
            hub.subscribe("c", 1, &sink, None, ChannelStart::default(), &rule())
                .await,
            Err(Refusal::Unavailable)
        );
        assert_eq!(hub.listeners("c"), 0);
        assert_eq!(hub.metrics.subscriptions.get(), 0);
    }
}
