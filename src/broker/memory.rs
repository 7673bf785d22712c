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
use crate::history::{Recovery, StreamId};
use crate::policy::Policy;
use crate::protocol::Publication;

/// See the module documentation.
pub(crate) struct MemoryBroker {
    hub: Arc<dyn Fanout>,
    policy: Arc<Policy>,
    logs: Mutex<HashMap<String, Log>>,
    pub(super) health: BrokerHealth,
    pub(super) presence: super::presence::MemoryPresence,
}

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
        let event_field = self.policy.event_field_of(channel);
        let Some(rule) = self.policy.history_of(channel) else {
            self.hub
                .dispatch(Publication::message(channel, None, payload, event_field));
            return None;
        };
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if live_log(&mut logs, channel, rule.ttl).is_none() {
            logs.insert(
                channel.to_owned(),
                Log {
                    entries: VecDeque::new(),
                    last: StreamId::ZERO,
                    deleted: StreamId::ZERO,
                    touched: Instant::now(),
                },
            );
        }
        let log = logs.get_mut(channel)?;
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
        self.hub.dispatch(Publication::message(
            channel,
            Some(id),
            payload,
            event_field,
        ));
        Some(id)
    }

    /// The newest id, or a position just before now for an empty channel.
    /// Relays `payload` to this process's clients, without history.
    pub(super) fn relay(&self, channel: &str, payload: &[u8]) {
        let event_field = self.policy.event_field_of(channel);
        self.hub
            .dispatch(Publication::message(channel, None, payload, event_field));
    }

    pub(crate) fn position(&self, channel: &str) -> StreamId {
        let ttl = self.ttl(channel);
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        match live_log(&mut logs, channel, ttl) {
            Some(log) => log.last,
            None => just_before_now(),
        }
    }

    /// Everything after `since`, and whether some of it is gone.
    pub(crate) fn recover(&self, channel: &str, since: StreamId, limit: usize) -> Recovery {
        let Some(rule) = self.policy.history_of(channel) else {
            return Recovery {
                entries: Vec::new(),
                gap: true,
            };
        };
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        match live_log(&mut logs, channel, rule.ttl) {
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

    fn ttl(&self, channel: &str) -> Duration {
        self.policy
            .history_of(channel)
            .map_or(Duration::ZERO, |r| r.ttl)
    }
}

/// The channel's log, unless its TTL ran out (then it is dropped).
fn live_log<'a>(
    logs: &'a mut HashMap<String, Log>,
    channel: &str,
    ttl: Duration,
) -> Option<&'a mut Log> {
    let expired = logs
        .get(channel)
        .is_some_and(|l| !ttl.is_zero() && l.touched.elapsed() > ttl);
    if expired {
        logs.remove(channel);
    }
    logs.get_mut(channel)
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
