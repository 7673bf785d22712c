//! The embedded broker: publications go straight to this process's hub,
//! and history lives in process memory with the same semantics as the Redis
//! streams (capped, with a TTL, ids `ms-seq` monotonic per channel).
//! For a single instance (development, small deployments, the demo).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BrokerHealth, Control, Fanout, Wiring};
use crate::config::HistoryRule;
use crate::history::{Recovery, StreamId};
use crate::policy::Policy;

/// See the module documentation.
pub(crate) struct MemoryBroker {
    hub: Arc<dyn Fanout>,
    policy: Arc<Policy>,
    logs: Mutex<Logs>,
    pub(super) health: BrokerHealth,
    pub(super) presence: super::presence::MemoryPresence,
}

/// The channels' histories, and what the rules say about the channels
/// published to: a publication must know whether its channel keeps history
/// (in Redis, the function knows), and looks that up once per channel, not
/// per publication.
#[derive(Default)]
struct Logs {
    logs: HashMap<String, Log>,
    /// Each channel's history rule, once looked up; cleared when it holds
    /// [`MEMO`] channels, so that a stream of one-off channel names costs
    /// a lookup each and no memory.
    rules: HashMap<String, Option<HistoryRule>>,
}

/// Channels whose history rule [`Logs`] remembers, at most.
const MEMO: usize = 4096;

/// One channel's history.
struct Log {
    entries: VecDeque<(StreamId, Vec<u8>)>,
    last: StreamId,
    /// The newest id ever trimmed away.
    deleted: StreamId,
    touched: Instant,
}

impl MemoryBroker {
    /// Confirms every subscription at once; always up.
    pub(super) fn start(wiring: Wiring, tasks: &TaskTracker, stop: CancellationToken) -> Self {
        let Wiring {
            hub,
            policy,
            mut control,
            health,
            metrics,
        } = wiring;
        health.set(true, &metrics);
        tasks.spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = control.recv() => r,
                };
                match request {
                    Some(Control::Subscribe { ready, .. }) => {
                        let _ = ready.send(true);
                    }
                    Some(Control::Unsubscribe { .. }) => {}
                    None => return,
                }
            }
        });
        MemoryBroker {
            hub,
            policy,
            logs: Mutex::default(),
            health,
            presence: Default::default(),
        }
    }

    /// Appends to the channel's history (when it keeps one) and delivers to
    /// local listeners, under one lock so ids and delivery order agree.
    pub(crate) fn publish(&self, channel: &str, payload: &[u8]) -> Option<StreamId> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rule) = logs.history_of(&self.policy, &*self.hub, channel) else {
            drop(logs);
            self.hub.publish(channel, None, payload);
            return None;
        };
        let log = logs.live(channel, rule.ttl, true)?;
        let now = now_ms();
        let id = if now > log.last.ms {
            StreamId { ms: now, seq: 0 }
        } else {
            StreamId {
                ms: log.last.ms,
                seq: log.last.seq + 1,
            }
        };
        log.entries.push_back((id, payload.to_vec()));
        while log.entries.len() as u64 > rule.size.max(1) {
            if let Some((old, _)) = log.entries.pop_front() {
                log.deleted = old;
            }
        }
        log.last = id;
        log.touched = Instant::now();
        self.hub.publish(channel, Some(id), payload);
        Some(id)
    }

    /// Relays `payload` to this process's clients, without history.
    pub(super) fn relay(&self, channel: &str, payload: &[u8]) {
        self.hub.publish(channel, None, payload);
    }

    /// The newest id, or a position just before now for an empty channel.
    pub(crate) fn position(&self, channel: &str, history: HistoryRule) -> StreamId {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        match logs.live(channel, history.ttl, false) {
            Some(log) => log.last,
            None => just_before_now(),
        }
    }

    /// Everything after `since`, and whether some of it is gone.
    pub(crate) fn recover(
        &self,
        channel: &str,
        history: HistoryRule,
        since: StreamId,
        limit: usize,
    ) -> Recovery {
        let rule = history;
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        match logs.live(channel, rule.ttl, false) {
            None => Recovery {
                entries: Vec::new(),
                gap: since.ms.saturating_add(rule.ttl.as_millis() as u64) < now_ms(),
            },
            Some(log) => Recovery {
                gap: log.deleted > since,
                entries: log
                    .entries
                    .iter()
                    .filter(|(id, _)| *id > since)
                    .take(limit)
                    .cloned()
                    .collect(),
            },
        }
    }
}

impl Logs {
    /// The history `channel` keeps: as remembered, or as the hub has it
    /// for a channel listened to here, or else looked up, once per channel.
    fn history_of(
        &mut self,
        policy: &Policy,
        hub: &dyn Fanout,
        channel: &str,
    ) -> Option<HistoryRule> {
        if let Some(rule) = self.rules.get(channel) {
            return *rule;
        }
        if self.rules.len() >= MEMO {
            self.rules.clear();
        }
        let rule = match hub.rule(channel) {
            Some(rule) => rule.history,
            None => policy.rule_of(channel).history,
        };
        self.rules.insert(channel.to_owned(), rule);
        rule
    }

    /// The channel's log, unless its TTL ran out (then it is dropped); a
    /// new one when `create` says so.
    fn live(&mut self, channel: &str, ttl: Duration, create: bool) -> Option<&mut Log> {
        let expired = self
            .logs
            .get(channel)
            .is_some_and(|l| !ttl.is_zero() && l.touched.elapsed() > ttl);
        if expired {
            self.logs.remove(channel);
        }
        if create && !self.logs.contains_key(channel) {
            let log = Log {
                entries: VecDeque::new(),
                last: StreamId::ZERO,
                deleted: StreamId::ZERO,
                touched: Instant::now(),
            };
            self.logs.insert(channel.to_owned(), log);
        }
        self.logs.get_mut(channel)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sorts after everything published before now and before anything
/// published from now on.
pub(crate) fn just_before_now() -> StreamId {
    StreamId {
        ms: now_ms().saturating_sub(1),
        seq: u64::MAX,
    }
}
