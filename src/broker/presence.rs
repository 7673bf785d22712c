//! Presence storage: per channel, the members (user id and info) with the
//! connections each instance holds for them. In Redis (the `crier_presence_*`
//! functions, fleet-wide, with instances that stop beating swept) or in
//! process memory (one instance). Both announce a user's first connection
//! (`member_added`) and last (`member_removed`) on the channel itself, as
//! publications every instance relays.
//!
//! What a process holds and when it beats is [`crate::presence`]'s business.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{Broker, BrokerError};
use crate::history;
use crate::protocol::{envelope, SocketId, MEMBER_ADDED, MEMBER_REMOVED};

/// A channel's members, as one read answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// How many users are in the channel.
    pub count: u64,
    /// Some of them (all, up to the read's limit): user id and info (JSON).
    pub listed: Vec<(String, String)>,
}

/// One user an instance holds in a channel: for a beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) user: String,
    pub(crate) connections: u64,
    pub(crate) info: String,
}

/// Channel → user → (connections, info JSON).
pub(crate) type Rosters = HashMap<String, HashMap<String, (u64, String)>>;

/// Presence in process memory: one instance, so no beats and no sweeps.
#[derive(Default)]
pub(crate) struct MemoryPresence {
    channels: Mutex<Rosters>,
}

impl MemoryPresence {
    /// Adds `delta` connections of `user`; returns the user's connections
    /// and the announcement to publish, if any.
    fn adjust(
        &self,
        channel: &str,
        user: &str,
        delta: i64,
        info: Option<&str>,
        exclude: Option<SocketId>,
    ) -> (u64, Option<Vec<u8>>) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let members = channels.entry(channel.to_owned()).or_default();
        let had = members.get(user).map_or(0, |(n, _)| *n);
        let now = had.saturating_add_signed(delta);
        let id = serde_json::Value::from(user).to_string();
        if now == 0 {
            members.remove(user);
            if members.is_empty() {
                channels.remove(channel);
            }
            let data = format!(r#"{{"user_id":{id}}}"#);
            let gone = (had > 0).then(|| envelope(MEMBER_REMOVED, None, None, &data));
            return (0, gone);
        }
        let entry = members.entry(user.to_owned()).or_insert((0, "null".into()));
        entry.0 = now;
        // One record per user and channel, whatever the protocol: a join
        // without info (crier's own, `null`) never erases a Pusher
        // member's.
        if let Some(info) = info.filter(|i| *i != "null") {
            entry.1 = info.to_owned();
        }
        let data = format!(r#"{{"user_id":{id},"user_info":{}}}"#, entry.1);
        let came = (had == 0).then(|| envelope(MEMBER_ADDED, exclude, None, &data));
        (now, came)
    }

    fn members(&self, channel: &str, limit: usize) -> Members {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let Some(members) = channels.get(channel) else {
            return Members::default();
        };
        Members {
            count: members.len() as u64,
            listed: members
                .iter()
                .take(limit)
                .map(|(user, (_, info))| (user.clone(), info.clone()))
                .collect(),
        }
    }
}

impl Broker {
    /// Publishes `payload` live to every instance, without history (client
    /// events, presence announcements).
    pub(crate) async fn publish_live(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.relay(channel, payload);
                Ok(())
            }
            Broker::Redis(b) => b.redis.publish_live(channel, payload).await,
        }
    }

    /// Adds a connection of `user` (with `info`, JSON) held by `instance`
    /// to `channel`; `member_added`, if this is the user's first anywhere,
    /// skips the connection `exclude`. Returns the user's connections
    /// anywhere.
    pub(crate) async fn presence_join(
        &self,
        channel: &str,
        instance: u32,
        ttl: Duration,
        user: &str,
        info: &str,
        exclude: Option<SocketId>,
    ) -> Result<u64, BrokerError> {
        match self {
            Broker::Memory(b) => {
                let (total, announce) = b.presence.adjust(channel, user, 1, Some(info), exclude);
                if let Some(payload) = announce {
                    b.relay(channel, &payload);
                }
                Ok(total)
            }
            Broker::Redis(b) => {
                let exclude = exclude.map(|s| s.to_string()).unwrap_or_default();
                let (instance, ttl) = (instance.to_string(), ttl.as_millis().to_string());
                let args: [&[u8]; 7] = [
                    channel.as_bytes(),
                    instance.as_bytes(),
                    ttl.as_bytes(),
                    user.as_bytes(),
                    b"1",
                    info.as_bytes(),
                    exclude.as_bytes(),
                ];
                b.redis
                    .presence("crier_presence_join", channel, &args)
                    .await
            }
        }
    }

    /// Removes one connection of `user` held by `instance`. Returns the
    /// user's connections left anywhere.
    pub(crate) async fn presence_leave(
        &self,
        channel: &str,
        instance: u32,
        user: &str,
    ) -> Result<u64, BrokerError> {
        match self {
            Broker::Memory(b) => {
                let (total, announce) = b.presence.adjust(channel, user, -1, None, None);
                if let Some(payload) = announce {
                    b.relay(channel, &payload);
                }
                Ok(total)
            }
            Broker::Redis(b) => {
                let instance = instance.to_string();
                let args: [&[u8]; 3] = [channel.as_bytes(), instance.as_bytes(), user.as_bytes()];
                b.redis
                    .presence("crier_presence_leave", channel, &args)
                    .await
            }
        }
    }

    /// `instance`'s beat for `channel`: it is alive for `ttl` more and
    /// holds exactly `held` (nothing: it has left the channel). Returns
    /// how many users it had to correct.
    pub(crate) async fn presence_sync(
        &self,
        channel: &str,
        instance: u32,
        ttl: Duration,
        held: &[Held],
    ) -> Result<u64, BrokerError> {
        match self {
            // One process: what it holds is what the store holds.
            Broker::Memory(_) => Ok(0),
            Broker::Redis(b) => {
                let mut args: Vec<Vec<u8>> = vec![
                    channel.into(),
                    instance.to_string().into(),
                    ttl.as_millis().to_string().into(),
                ];
                for h in held {
                    args.push(h.user.clone().into());
                    args.push(h.connections.to_string().into());
                    args.push(h.info.clone().into());
                }
                let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                b.redis
                    .presence("crier_presence_sync", channel, &args)
                    .await
            }
        }
    }

    /// `channel`'s members: the count, and at most `limit` listed.
    pub(crate) async fn presence_members(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Members, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.presence.members(channel, limit)),
            Broker::Redis(b) => {
                let limit = limit.to_string();
                let args: [&[u8]; 2] = [channel.as_bytes(), limit.as_bytes()];
                let (count, flat): (u64, Vec<String>) = b
                    .redis
                    .presence("crier_presence_members", channel, &args)
                    .await?;
                let listed = flat
                    .chunks_exact(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                Ok(Members { count, listed })
            }
        }
    }

    /// Channels some crier instance listens to, fleet-wide (Redis), or
    /// `None` for the memory broker (the hub knows).
    pub(crate) async fn occupied(&self) -> Result<Option<Vec<String>>, BrokerError> {
        match self {
            Broker::Memory(_) => Ok(None),
            Broker::Redis(b) => b.redis.occupied().await.map(Some),
        }
    }
}

impl super::command::Redis {
    /// `FCALL` of a presence function with `channel`'s presence keys.
    async fn presence<T: redis::FromRedisValue>(
        &self,
        function: &str,
        channel: &str,
        args: &[&[u8]],
    ) -> Result<T, BrokerError> {
        let keys = history::presence_keys(self.prefix(), channel);
        self.fcall(function, &keys, args).await
    }
}
