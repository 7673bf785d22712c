//! Fleet-wide presence: who is in a channel.
//!
//! A signed-in connection that joins a presence channel is a *member*: its
//! user counts once however many connections the user has, on however many
//! instances. The store ([`crate::broker`]: Redis, or process memory)
//! announces a user's first connection anywhere (`member_added`) and last
//! (`member_removed`) on the channel itself, so every instance relays them
//! like any publication.
//!
//! This process keeps what it holds — channel → user → connections and
//! info — and, every `presence.heartbeat`, tells the store exactly that
//! ([`run`]). The beat keeps its members alive for `presence.ttl`, and
//! corrects whatever a failed join or leave left wrong (or a Redis that
//! lost its data); an instance that stops beating (killed, cut off from
//! Redis) has its members removed by the others' next beat or read of the
//! channel once its `ttl` has passed.
//!
//! A channel's joins, leaves and beats run one at a time in this process
//! (a lock per channel, striped): a beat always tells the store what the
//! process holds once its earlier joins and leaves are done, never a
//! snapshot a join overtook.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Held, Members, Rosters};
use crate::config::PresenceConfig;
use crate::events::Ledger;
use crate::protocol::SocketId;
use crate::refusal::Refusal;

/// Locks a channel's writes hash to: enough that unrelated channels
/// rarely wait on each other.
const STRIPES: usize = 64;

/// What this process holds: channel → user → (connections, info). A
/// channel stays, empty, until a beat told the store so.
pub(crate) struct Presence {
    held: Mutex<Rosters>,
    /// Orders each channel's writes to the store (see the module docs).
    stripes: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    /// This instance's id in the store (the instance part of its socket
    /// ids).
    instance: u32,
    /// Where members' connections are counted for lifecycle events, if
    /// they are on.
    ledger: Option<Arc<Ledger>>,
    /// Channels listened to here for their members' comings and goings
    /// with no member here (watchlists), and how many listen: each beat
    /// reads them, which removes the members of instances that stopped
    /// beating, so that their watchers hear them leave.
    watched: Mutex<std::collections::HashMap<String, usize>>,
}

impl Presence {
    /// The presence of the crier instance `instance`.
    pub(crate) fn new(instance: u32, ledger: Option<Arc<Ledger>>) -> Self {
        Self {
            instance,
            ledger,
            watched: Mutex::default(),
            held: Mutex::default(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Presence {
    fn held(&self) -> std::sync::MutexGuard<'_, Rosters> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock ordering `channel`'s writes.
    fn stripe(&self, channel: &str) -> &tokio::sync::Mutex<()> {
        &self.stripes[self.hasher.hash_one(channel) as usize % self.stripes.len()]
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more connection here watches `channel` (see `watched`).
    pub(crate) fn watch(&self, channel: &str) {
        *self.watched().entry(channel.to_owned()).or_insert(0) += 1;
    }

    /// One connection less watches `channel`.
    pub(crate) fn unwatch(&self, channel: &str) {
        let mut watched = self.watched();
        if let Some(count) = watched.get_mut(channel) {
            *count -= 1;
            if *count == 0 {
                watched.remove(channel);
            }
        }
    }

    /// Counts one more connection of `user` here.
    fn hold(&self, channel: &str, user: &str, info: &str) {
        let mut held = self.held();
        let entry = held
            .entry(channel.to_owned())
            .or_default()
            .entry(user.to_owned())
            .or_insert((0, String::new()));
        entry.0 += 1;
        info.clone_into(&mut entry.1);
        if let Some(ledger) = &self.ledger {
            ledger.member(channel, user, 1);
        }
    }

    /// Counts one connection of `user` less here.
    fn release(&self, channel: &str, user: &str) {
        let mut held = self.held();
        if let Some(users) = held.get_mut(channel) {
            if let Some(entry) = users.get_mut(user) {
                entry.0 = entry.0.saturating_sub(1);
                if entry.0 == 0 {
                    users.remove(user);
                }
                if let Some(ledger) = &self.ledger {
                    ledger.member(channel, user, -1);
                }
            }
        }
    }

    /// What this process holds in `channel`, for a beat.
    fn held_in(&self, channel: &str) -> Option<Vec<Held>> {
        let held = self.held();
        let users = held.get(channel)?;
        Some(
            users
                .iter()
                .map(|(user, (connections, info))| Held {
                    user: user.clone(),
                    connections: *connections,
                    info: info.clone(),
                })
                .collect(),
        )
    }

    /// Joins `channel` as `user` (with `info`, JSON) for the connection
    /// `socket` (which does not hear its own `member_added`), and reads the
    /// members, this user included. On an error nothing is held.
    pub(crate) async fn join(
        &self,
        broker: &Broker,
        config: &PresenceConfig,
        channel: &str,
        user: &str,
        info: &str,
        socket: SocketId,
    ) -> Result<Members, Refusal> {
        let joined = {
            let _order = self.stripe(channel).lock().await;
            self.hold(channel, user, info);
            let joined = broker
                .presence_join(channel, self.instance, config.ttl, user, info, Some(socket))
                .await;
            if joined.is_err() {
                // The next beat tells the store whatever this left there.
                self.release(channel, user);
            }
            joined
        };
        if let Err(e) = joined {
            tracing::warn!(error = %e, %channel, "presence: cannot join");
            return Err(Refusal::Unavailable);
        }
        match members(broker, config, channel).await {
            Ok(members) => Ok(members),
            Err(refusal) => {
                self.leave(broker, channel, user).await;
                Err(refusal)
            }
        }
    }

    /// One connection of `user` leaves `channel`.
    pub(crate) async fn leave(&self, broker: &Broker, channel: &str, user: &str) {
        let _order = self.stripe(channel).lock().await;
        self.release(channel, user);
        if let Err(e) = broker.presence_leave(channel, self.instance, user).await {
            // The next beat tells the store what this process holds.
            tracing::warn!(error = %e, %channel, "presence: cannot leave, the next beat will");
        }
    }

    /// One beat over every channel held.
    async fn beat(&self, broker: &Broker, ttl: Duration) {
        let channels: Vec<String> = self.held().keys().cloned().collect();
        for channel in channels {
            let _order = self.stripe(&channel).lock().await;
            let Some(held) = self.held_in(&channel) else {
                continue;
            };
            match broker
                .presence_sync(&channel, self.instance, ttl, &held)
                .await
            {
                Ok(changed) => {
                    if changed > 0 {
                        tracing::info!(%channel, changed, "presence: the store was corrected");
                    }
                    if held.is_empty() {
                        self.held().remove(&channel);
                    }
                }
                Err(e) => tracing::warn!(error = %e, %channel, "presence: beat failed"),
            }
        }
        // Watched channels without a member here: a read sweeps them.
        let watched: Vec<String> = {
            let held = self.held();
            let watched = self.watched();
            watched
                .keys()
                .filter(|c| !held.contains_key(*c))
                .cloned()
                .collect()
        };
        for channel in watched {
            if let Err(e) = broker.presence_members(&channel, 0).await {
                tracing::warn!(error = %e, %channel, "presence: watched channel not read");
            }
        }
    }
}

/// `channel`'s members: the count, and at most `presence.max_listed`.
pub(crate) async fn members(
    broker: &Broker,
    config: &PresenceConfig,
    channel: &str,
) -> Result<Members, Refusal> {
    broker
        .presence_members(channel, config.max_listed)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, %channel, "presence: cannot read members");
            Refusal::Unavailable
        })
}

/// Beats until `stop`: every `presence.heartbeat`, tells the store what
/// this process holds in each channel.
pub(crate) async fn run(
    presence: &Presence,
    broker: &Broker,
    config: &PresenceConfig,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(config.heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => presence.beat(broker, config.ttl).await,
        }
    }
}
