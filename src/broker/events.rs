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

impl Broker {
    /// Reports `instance`'s counts (`key` is `<kind>|<subject>`, see
    /// `crier.lua`). Returns how many ends wait for their delay. The
    /// memory broker keeps no stream (configuration refuses one without
    /// Redis): nothing to report there.
    pub(crate) async fn events(
        &self,
        stream: &Stream,
        instance: u32,
        report: Report,
        counts: &[(String, i64)],
    ) -> Result<u64, BrokerError> {
        let Broker::Redis(b) = self else {
            return Ok(0);
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
