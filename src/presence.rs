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
//! corrects whatever a failed join or leave left wrong; an instance that
//! stops beating (killed, cut off from Redis) has its members removed by
//! the others' next beat or read once its `ttl` has passed.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Held, Members, Rosters};
use crate::config::PresenceConfig;
use crate::protocol::SocketId;
use crate::refusal::Refusal;

/// What this process holds: channel → user → (connections, info). A
/// channel stays, empty, until a beat told the store so.
#[derive(Default)]
pub(crate) struct Presence {
    held: Mutex<Rosters>,
}

/// This process's id in the store: the instance part of its socket ids.
fn instance() -> u32 {
    SocketId::of(0).instance
}

impl Presence {
    fn held(&self) -> std::sync::MutexGuard<'_, Rosters> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
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
            }
        }
    }
}

impl Presence {
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
        self.hold(channel, user, info);
        let joined = broker
            .presence_join(channel, instance(), config.ttl, user, 1, info, Some(socket))
            .await;
        if let Err(e) = joined {
            // The next beat tells the store whatever this left there.
            self.release(channel, user);
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
        self.release(channel, user);
        if let Err(e) = broker.presence_leave(channel, instance(), user).await {
            // The next beat tells the store what this process holds.
            tracing::warn!(error = %e, %channel, "presence: cannot leave, the next beat will");
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

impl Presence {
    /// One beat over every channel held.
    async fn beat(&self, broker: &Broker, ttl: std::time::Duration) {
        let snapshot: Vec<(String, Vec<Held>)> = self
            .held()
            .iter()
            .map(|(channel, users)| {
                let held = users
                    .iter()
                    .map(|(user, (connections, info))| Held {
                        user: user.clone(),
                        connections: *connections,
                        info: info.clone(),
                    })
                    .collect();
                (channel.clone(), held)
            })
            .collect();
        for (channel, held) in snapshot {
            match broker.presence_sync(&channel, instance(), ttl, &held).await {
                Ok(changed) => {
                    if changed > 0 {
                        tracing::info!(%channel, changed, "presence: the store was corrected");
                    }
                    if held.is_empty() {
                        let mut now = self.held();
                        if now.get(&channel).is_some_and(HashMap::is_empty) {
                            now.remove(&channel);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, %channel, "presence: beat failed"),
            }
        }
    }
}
