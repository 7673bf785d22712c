//! The Redis broker: one pub/sub connection per instance, whatever the number
//! of clients, subscribed only to channels that local clients listen to.
//!
//! A supervisor task owns that connection. It applies the hub's subscribe and
//! unsubscribe requests in order, hands every message to the hub, and when the
//! connection is lost it marks the broker (and every channel) not ready,
//! reconnects with capped, jittered exponential backoff, resubscribes every
//! live channel and recovers what was published meanwhile: from the history
//! stream for channels that keep one, a `gap` notice for the others. A
//! canary published through Redis and received back backs readiness, so an
//! instance that is connected but not receiving is not ready either.
//! redis-rs buffers pub/sub messages unboundedly between its driver and this
//! task, so this task must never wait on anything but Redis.
//!
//! Publishing, history reads and the canary use a separate multiplexed
//! connection that reconnects by itself.
//!
//! Both go to the primary that [`Target`] finds (the configured node, or the
//! one the sentinels name), checked with `ROLE` at every connection. A
//! primary that stops being one — a `READONLY` answer, or `ROLE` saying
//! `slave` at a canary — ends the pub/sub connection: the supervisor then
//! finds the primary again, reconnects both connections to it, resubscribes
//! and recovers, exactly as after any other outage.
//!
//! The command connection is `broker::command`; the relay to the hub and
//! its recovery, shared with the Cluster, `broker::relay`; the canary and
//! backoff, `broker::supervision`. This file is the node's supervisor.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::command::Redis;
use super::failure::{classify, RedisFailure};
use super::supervision::{backoff, Canary, Supervision};
use super::target::Target;
use super::{BrokerError, ChannelStart, Control};
use crate::config::{Config, RedisConfig};

/// Channels in one `SUBSCRIBE`, at most: resubscribing in bulk, or the
/// hub's subscribes that were waiting together.
const SUBSCRIBE_BATCH: usize = 512;

/// Starts the supervisor of one Redis node, or of the primary the
/// sentinels name.
pub(super) fn spawn(
    config: &RedisConfig,
    duty: Supervision,
    tasks: &TaskTracker,
) -> Result<(), BrokerError> {
    let target =
        Target::of(config).ok_or_else(|| BrokerError::Protocol("no Redis configured".into()))?;
    let supervisor = NodeSupervisor {
        duty,
        target,
        config: config.clone(),
        address: None,
    };
    tasks.spawn(supervisor.run());
    Ok(())
}

/// The command connection of one publication from outside a running crier
/// to a single Redis or a Sentinel-managed primary: see
/// [`super::publish_once`].
pub(super) async fn connect_once(config: &Config) -> Result<Redis, BrokerError> {
    let target = Target::of(&config.redis)
        .ok_or_else(|| BrokerError::Protocol("no Redis configured".into()))?;
    let primary = target
        .primary(&config.redis, config.redis.connect_timeout)
        .await
        .map_err(BrokerError::Protocol)?;
    let redis = Redis::once(config);
    redis.connect_to(primary.client)?;
    Ok(redis)
}

/// Why the serving loop ended.
enum Ended {
    Stopped,
    Lost(String),
}

/// The node's supervisor: owns the pub/sub connection (see the module
/// documentation).
struct NodeSupervisor {
    duty: Supervision,
    target: Target,
    config: RedisConfig,
    /// The primary's address (password redacted), once found.
    address: Option<String>,
}

impl NodeSupervisor {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut connected_before = false;
        loop {
            match self.connect().await {
                Ok((mut sink, stream)) => match self.resubscribe_all(&mut sink).await {
                    Ok(()) => {
                        self.load_library().await;
                        if connected_before {
                            self.duty.metrics.redis_reconnects.inc();
                            tracing::info!(
                                channels = self.duty.relay.len(),
                                "redis reconnected, recovering"
                            );
                            self.recover_all().await;
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
                        tracing::warn!(error = %e, redis = %self.target, attempt = failures + 1, "cannot connect to redis");
                    }
                }
            }
            if self.duty.stop.is_cancelled() {
                return;
            }
            let delay = backoff(failures, self.duty.reconnect_max);
            failures = failures.saturating_add(1);
            if !self.wait_offline(delay).await {
                return;
            }
        }
    }

    /// Checks the function library on the multiplexed connection, loading
    /// it where this configuration should ([`Redis::check_library`]). Right
    /// after an outage that connection may not have noticed it yet (its
    /// first command fails with a broken pipe and starts its reconnect), or
    /// Redis may still be loading its data: those are retried for up to
    /// `connect_timeout`. Only Redis answering that it has no `FUNCTION`
    /// command blames its version. Whatever fails here, `FCALL` loads the
    /// library again when Redis says a function is missing.
    async fn load_library(&self) {
        let deadline = Instant::now() + self.duty.connect_timeout;
        let mut attempt = 0;
        loop {
            let e = match self.duty.redis.check_library(&self.duty.metrics).await {
                Ok(_) => return,
                Err(e) => e,
            };
            let transient = match &e {
                BrokerError::Redis(e) => match classify(e) {
                    RedisFailure::NoSuchCommand => {
                        tracing::error!(error = %e, "cannot load the crier function library (Redis >= 7 needed): no history");
                        return;
                    }
                    failure => failure == RedisFailure::Transient,
                },
                // No answer in time.
                BrokerError::Protocol(_) => true,
                BrokerError::NoLibrary | BrokerError::LibraryConflict { .. } => false,
            };
            if !transient || Instant::now() >= deadline {
                tracing::error!(error = %e, "cannot load the crier function library: no history until it is loaded");
                return;
            }
            let pause = backoff(attempt, self.duty.connect_timeout / 4);
            attempt += 1;
            tokio::select! {
                _ = self.duty.stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Finds the primary (asking the sentinels again, if any), points the
    /// command connection at it when it moved, and opens the pub/sub
    /// connection to it.
    async fn connect(&mut self) -> Result<(PubSubSink, PubSubStream), String> {
        let attempt = async {
            let primary = self
                .target
                .primary(&self.config, self.duty.connect_timeout)
                .await?;
            let pubsub =
                tokio::time::timeout(self.duty.connect_timeout, primary.client.get_async_pubsub())
                    .await
                    .map_err(|_| {
                        format!(
                            "{}: timed out after {:?}",
                            primary.address, self.duty.connect_timeout
                        )
                    })?
                    .map_err(|e| {
                        format!("{}: {}", primary.address, crate::redis_client::describe(&e))
                    })?;
            Ok::<_, String>((primary, pubsub))
        };
        let (primary, pubsub) = tokio::select! {
            _ = self.duty.stop.cancelled() => return Err("stopping".into()),
            r = attempt => r?,
        };
        if self.address.as_deref() != Some(primary.address.as_str()) {
            if let Some(old) = &self.address {
                tracing::info!(from = %old, to = %primary.address, "the redis primary moved");
            }
            self.duty
                .redis
                .connect_to(primary.client)
                .map_err(|e| e.to_string())?;
            self.address = Some(primary.address);
        }
        // A demotion seen before this connection concerns the old primary.
        let _ = futures_util::FutureExt::now_or_never(self.duty.redis.demoted.notified());
        Ok(pubsub.split())
    }

    async fn resubscribe_all(&mut self, sink: &mut PubSubSink) -> Result<(), String> {
        let mut names = self.duty.relay.keys();
        names.push(self.duty.canary.clone());
        for batch in names.chunks(SUBSCRIBE_BATCH) {
            self.bounded(sink.subscribe(batch)).await?;
        }
        Ok(())
    }

    /// After an outage: what each channel missed, from its history, or a
    /// `gap` where there is none. Connections drop what they already have.
    async fn recover_all(&mut self) {
        for name in self.duty.relay.names() {
            self.duty.relay.recover(&name).await;
        }
    }

    /// Relays messages, applies control requests and runs the canary until
    /// the connection is lost or the process stops.
    async fn serve(&mut self, mut sink: PubSubSink, mut stream: PubSubStream) -> Ended {
        let mut canary = Canary::new(self.duty.canary_interval);
        // Canaries Redis took, and how many subscribers each reached.
        let (taken_tx, mut taken) = mpsc::unbounded_channel::<(u64, i64)>();
        let mut tick = tokio::time::interval(self.duty.canary_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.duty.stop.cancelled() => return Ended::Stopped,
                _ = self.duty.redis.demoted.notified() => {
                    return Ended::Lost("the server is no longer the primary (READONLY, or ROLE says so): finding the primary again".into());
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return Ended::Lost("connection closed".into());
                    };
                    if msg.get_channel_name() == self.duty.canary {
                        // A canary came back: this connection delivers (and
                        // the library was checked just before it was sent).
                        canary.answered(msg.get_payload_bytes(), &self.duty.metrics);
                        self.duty.health.set(self.duty.redis.library_ok.load(Ordering::Acquire), &self.duty.metrics);
                        continue;
                    }
                    self.duty.relay.message(msg.get_channel_name(), msg.get_payload_bytes()).await;
                }
                Some((seq, receivers)) = taken.recv() => {
                    if !canary.published(seq, receivers) {
                        return Ended::Lost("the canary reached no subscriber: this connection's subscriptions are gone".into());
                    }
                }
                _ = tick.tick() => {
                    if canary.overdue() && self.duty.health.is_up() {
                        tracing::warn!("canary not received back: connected but not receiving, not ready");
                        self.duty.health.set(false, &self.duty.metrics);
                    }
                    if !self.duty.redis.library_ok.load(Ordering::Acquire) && self.duty.health.is_up() {
                        self.duty.health.set(false, &self.duty.metrics);
                    }
                    // Still nothing after a few intervals: this connection is
                    // broken in a way Redis did not report. Start over; the
                    // reconnect recovers what was missed from history.
                    if canary.lost() {
                        return Ended::Lost("canary lost: connection not delivering".into());
                    }
                    if let Some(seq) = canary.next() {
                        let redis = self.duty.redis.clone();
                        let metrics = self.duty.metrics.clone();
                        let (target, config) = (self.target.clone(), self.config.clone());
                        let current = self.address.clone();
                        let timeout = self.duty.connect_timeout;
                        let taken = taken_tx.clone();
                        let mut cmd = redis::cmd("PUBLISH");
                        cmd.arg(&self.duty.canary).arg(seq.to_string());
                        // Never wait on it here: a stalled Redis must not
                        // stall the relay.
                        tokio::spawn(async move {
                            // Redis can lose the library (FUNCTION FLUSH) with
                            // nothing crier does failing: only apps' FCALLs
                            // would; another configuration may have loaded its
                            // own. Check (and reload) with every canary.
                            redis.check_role().await;
                            // The sentinels moved the primary (`+switch-master`)
                            // while the old one still answers as a primary.
                            if let Some(now) = target.sentinels_say(&config, timeout).await {
                                if Some(&now) != current.as_ref() {
                                    redis.demoted.notify_one();
                                }
                            }
                            let _ = redis.check_library(&metrics).await;
                            if let Ok(receivers) = redis.query::<i64>(cmd).await {
                                let _ = taken.send((seq, receivers));
                            }
                        });
                    }
                }
                request = self.duty.control.recv() => {
                    let Some(request) = request else { return Ended::Stopped };
                    if let Err(e) = self.control(&mut sink, request).await {
                        return Ended::Lost(e);
                    }
                }
            }
        }
    }

    /// Carries out `first` and every request already waiting behind it,
    /// in order: consecutive subscribes go as one `SUBSCRIBE` (one round
    /// trip), so a burst of them (the clients of a drained instance
    /// arriving, each with channels of its own) does not queue behind one
    /// round trip each until the hub's wait for them times out.
    async fn control(&mut self, sink: &mut PubSubSink, first: Control) -> Result<(), String> {
        let mut subscribes = Vec::new();
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Control::Subscribe {
                    channel,
                    ready,
                    start,
                } => subscribes.push((channel, ready, start)),
                Control::Unsubscribe { channel } => {
                    // In order: what was asked before it goes first.
                    self.subscribe(sink, std::mem::take(&mut subscribes))
                        .await?;
                    self.duty.relay.forget(&channel);
                    let key = self.duty.relay.key(&channel);
                    self.bounded(sink.unsubscribe(&key)).await?;
                }
            }
            if subscribes.len() < SUBSCRIBE_BATCH {
                next = self.duty.control.try_recv().ok();
            }
        }
        self.subscribe(sink, subscribes).await
    }

    /// Subscribes `channels` with one command.
    async fn subscribe(
        &mut self,
        sink: &mut PubSubSink,
        channels: Vec<(String, watch::Sender<bool>, ChannelStart)>,
    ) -> Result<(), String> {
        if channels.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = channels
            .iter()
            .map(|(channel, _, _)| self.duty.relay.key(channel))
            .collect();
        let done = self.bounded(sink.subscribe(&keys)).await;
        for (channel, ready, start) in channels {
            if done.is_ok() {
                ready.send_replace(true);
            }
            // Outage recovery of this channel starts where the subscriber read.
            self.duty.relay.want(channel, ready, start);
        }
        done
    }

    /// Sleeps `delay` while keeping track of what the hub wants.
    /// Returns false when the process stops.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.duty.stop.cancelled() => return false,
                _ = &mut sleep => return true,
                request = self.duty.control.recv() => match request {
                    Some(Control::Subscribe { channel, ready, start }) => {
                        self.duty.relay.want(channel, ready, start);
                    }
                    Some(Control::Unsubscribe { channel }) => {
                        self.duty.relay.forget(&channel);
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
        match tokio::time::timeout(self.duty.connect_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    /// Channels are ready once (re)subscribed; the instance as a whole only
    /// once a canary has come back (see `serve`).
    fn set_ready(&self, up: bool) {
        if !up {
            self.duty.health.set(false, &self.duty.metrics);
        }
        self.duty.relay.set_ready(up);
    }
}
