//! Lifecycle events in Redis: an instance's changes and beats go to the
//! `crier_events` function (see `crier.lua`), which keeps the fleet's
//! counts and appends each transition, once, to the events stream.
//!
//! What a process holds and when it reports is [`crate::events`]'
//! business.

use std::time::Duration;

use super::{Broker, BrokerError};
use crate::history;

/// How `crier_events` reads the counts it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// Changes of the instance's counts since its last report.
    Change,
    /// The instance's whole counts (its beat): what it does not name, it
    /// holds none of.
    Sync,
}

/// Where and how the fleet's events are kept.
#[derive(Debug, Clone)]
pub(crate) struct Stream {
    /// The stream's name, without `redis.channel_prefix`.
    pub(crate) name: String,
    /// `MAXLEN ~` of the stream.
    pub(crate) max_len: u64,
    /// How long an end waits for a return before it is announced.
    pub(crate) delay: Duration,
    /// How long an instance's share outlives its last report.
    pub(crate) ttl: Duration,
}

impl Stream {
    /// The events stream `config` names (`[events]`), if any.
    pub(crate) fn of(config: &crate::config::Config) -> Option<Stream> {
        let events = &config.events;
        Some(Stream {
            name: events.stream.clone()?,
            max_len: events.max_len,
            delay: events.delay,
            ttl: config.presence.ttl,
        })
    }
}

impl Broker {
    /// Reports `instance`'s counts (`key` is `<kind>|<subject>`, see
    /// `crier.lua`). Returns the names of the events it appended. The
    /// memory broker keeps no stream (configuration refuses one without
    /// Redis): nothing to report there.
    pub(crate) async fn events(
        &self,
        stream: &Stream,
        instance: u32,
        report: Report,
        counts: &[(String, i64)],
    ) -> Result<Vec<String>, BrokerError> {
        let Broker::Redis(b) = self else {
            return Ok(Vec::new());
        };
        let head = [
            instance.to_string(),
            stream.ttl.as_millis().to_string(),
            stream.delay.as_millis().to_string(),
            stream.max_len.to_string(),
            match report {
                Report::Change => "change",
                Report::Sync => "sync",
            }
            .to_owned(),
        ];
        let numbers: Vec<String> = counts.iter().map(|(_, n)| n.to_string()).collect();
        let mut args: Vec<&[u8]> = head.iter().map(|a| a.as_bytes()).collect();
        for ((key, _), n) in counts.iter().zip(&numbers) {
            args.push(key.as_bytes());
            args.push(n.as_bytes());
        }
        let keys = history::events_keys(b.redis.prefix(), &stream.name);
        b.redis.fcall("crier_events", &keys, &args).await
    }
}

/// One entry of the events stream: its id and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(String, String)>,
}

impl Entry {
    /// The value of `field`, if the entry has it.
    pub(crate) fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, value)| value.as_str())
    }
}

/// Entries as Redis lists them: `[id, [field, value, …]]` each.
type RawEntries = Vec<(String, Vec<String>)>;

fn entries(raw: RawEntries) -> Vec<Entry> {
    raw.into_iter()
        .map(|(id, flat)| Entry {
            id,
            fields: flat
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect(),
        })
        .collect()
}

impl Broker {
    /// The events stream's key, and the command connection to it.
    fn events_stream<'a>(
        &'a self,
        stream: &Stream,
    ) -> Result<(&'a super::command::Redis, String), BrokerError> {
        match self {
            Broker::Redis(b) => {
                let [.., key] = history::events_keys(b.redis.prefix(), &stream.name);
                Ok((&b.redis, key))
            }
            Broker::Memory(_) => Err(BrokerError::Protocol("lifecycle events need Redis".into())),
        }
    }

    /// Makes the consumer group `group`, reading from the stream's end,
    /// unless it exists.
    pub(crate) async fn events_group(
        &self,
        stream: &Stream,
        group: &str,
    ) -> Result<(), BrokerError> {
        let (redis, key) = self.events_stream(stream)?;
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&key)
            .arg(group)
            .arg("$")
            .arg("MKSTREAM");
        match redis.query::<()>(cmd).await {
            Err(BrokerError::Redis(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Up to `count` entries no consumer of `group` has had yet, now
    /// `consumer`'s.
    pub(crate) async fn events_read(
        &self,
        stream: &Stream,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Entry>, BrokerError> {
        let (redis, key) = self.events_stream(stream)?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(group).arg(consumer);
        cmd.arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&key)
            .arg(">");
        let read: Option<Vec<(String, RawEntries)>> = redis.query(cmd).await?;
        Ok(read
            .into_iter()
            .flatten()
            .flat_map(|(_, raw)| entries(raw))
            .collect())
    }

    /// Up to `count` entries another consumer of `group` took and left
    /// unacknowledged for longer than `idle` (it died), now `consumer`'s.
    pub(crate) async fn events_claim(
        &self,
        stream: &Stream,
        group: &str,
        consumer: &str,
        idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, BrokerError> {
        let (redis, key) = self.events_stream(stream)?;
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&key).arg(group).arg(consumer);
        cmd.arg(idle.as_millis() as u64)
            .arg("0")
            .arg("COUNT")
            .arg(count);
        let (_, raw, _): (String, RawEntries, Vec<String>) = redis.query(cmd).await?;
        Ok(entries(raw))
    }

    /// The fleet's count of each of `keys` (`<kind>|<subject>`, see
    /// `crier.lua`: `c|<channel>` is a channel's listeners on every
    /// instance), as the last reports left it; 0 for none.
    pub(crate) async fn events_totals(
        &self,
        stream: &Stream,
        keys: &[String],
    ) -> Result<Vec<u64>, BrokerError> {
        let Broker::Redis(b) = self else {
            return Err(BrokerError::Protocol("lifecycle events need Redis".into()));
        };
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let [_, _, _, totals, ..] = history::events_keys(b.redis.prefix(), &stream.name);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&totals).arg(keys);
        let counts: Vec<Option<u64>> = b.redis.query(cmd).await?;
        Ok(counts.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Appends one event that happened once, on this instance (a Pusher
    /// client event, a cache miss): no fleet-wide count decides it.
    pub(crate) async fn events_append(
        &self,
        stream: &Stream,
        fields: &[(&str, &str)],
    ) -> Result<(), BrokerError> {
        let (redis, key) = self.events_stream(stream)?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key)
            .arg("MAXLEN")
            .arg("~")
            .arg(stream.max_len)
            .arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(*value);
        }
        redis.query::<String>(cmd).await.map(drop)
    }

    /// Marks `ids` done for `group`.
    pub(crate) async fn events_ack(
        &self,
        stream: &Stream,
        group: &str,
        ids: &[String],
    ) -> Result<(), BrokerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (redis, key) = self.events_stream(stream)?;
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&key).arg(group).arg(ids);
        redis.query::<u64>(cmd).await.map(drop)
    }
}
