//! Resume, per connection: subscribe a channel so that nothing is missed and
//! nothing is delivered twice, and keep the connection's position in each
//! history channel (what SSE sends as its cursor).
//!
//! The order is what makes it exact: read the starting position (the
//! client's, or the channel's newest id), subscribe live (the hub buffers
//! into the connection's queue from then on), read history after the
//! position, deliver it, then deliver the queue — dropping every message
//! whose id is not newer than what this connection already delivered. Any
//! instance can do this: the position travels with the client.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::subscriptions::Subscriptions;
use super::Start;
use crate::app::App;
use crate::broker::ChannelStart;
use crate::history::{Cursor, StreamId};
use crate::hub::Sink;
use crate::policy::Rule;
use crate::protocol::{wanted, Filter, Kind, Publication};
use crate::refusal::Refusal;

/// What this connection has delivered, per history channel: a list, not
/// a map (a connection has few channels, and an empty list is half the
/// size of an empty map in every connection).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    last: Vec<(String, StreamId)>,
}

impl Tracker {
    /// Whether `p` is new for this connection (and record it). Messages
    /// without an id (no history) and gap notices always pass.
    pub(super) fn accept(&mut self, p: &Publication) -> bool {
        let (Kind::Message, Some(id)) = (p.kind, p.id) else {
            return true;
        };
        match self.last.iter_mut().find(|(c, _)| *c == p.channel) {
            Some((_, last)) if *last >= id => false,
            Some((_, last)) => {
                *last = id;
                true
            }
            None => {
                self.last.push((p.channel.clone(), id));
                true
            }
        }
    }

    /// The cursor covering every history channel of this connection.
    pub(crate) fn cursor(&self) -> Cursor {
        Cursor(self.last.iter().map(|(c, id)| (c.clone(), *id)).collect())
    }

    /// Whether `channel` is the only history channel of this connection
    /// (its cursor is then the publication's own).
    pub(crate) fn is_only(&self, channel: &str) -> bool {
        self.last.len() == 1 && self.last[0].0 == channel
    }

    /// Sets the position in `channel`.
    fn set(&mut self, channel: &str, id: StreamId) {
        match self.last.iter_mut().find(|(c, _)| c == channel) {
            Some((_, last)) => *last = id,
            None => self.last.push((channel.to_owned(), id)),
        }
    }

    /// Forgets a channel (unsubscribed).
    pub(super) fn forget(&mut self, channel: &str) {
        self.last.retain(|(c, _)| c != channel);
    }
}

/// What one connection may replay before it goes live: a count and a size,
/// plus this process's share of replay memory. Replay is the one place
/// where a small request (an old cursor on many channels) makes crier hold
/// a lot, so every replayed message is paid for here first. The session
/// drops the budget (and the process's share with it) once the replay has
/// been handed to its writer.
pub(super) struct Budget {
    messages: usize,
    bytes: usize,
    /// A replayed message's bytes as the connection's wire protocol sends
    /// it: the one encoding its client receives, not every encoding a
    /// publication may have.
    encoded: fn(&Publication) -> usize,
    /// Bytes each replayed message costs on top of its encoding (for SSE,
    /// the cursor line).
    per_message: usize,
    instance: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl Budget {
    /// The per-connection limits of `app`; `encoded` is a message's size as
    /// the wire protocol sends it, `per_message` that protocol's own
    /// overhead per replayed message.
    pub(super) fn new(app: &App, encoded: fn(&Publication) -> usize, per_message: usize) -> Self {
        let limits = &app.config.limits;
        Self {
            messages: limits.max_replay_messages,
            bytes: limits.max_replay_bytes,
            encoded,
            per_message,
            instance: Arc::clone(&app.gate.replay_bytes),
            held: None,
        }
    }

    /// Takes `replay` out of the budget, or returns false (and takes
    /// nothing) when it does not fit.
    fn take(&mut self, replay: &[Arc<Publication>]) -> bool {
        let bytes = replay.iter().fold(0usize, |sum, p| {
            sum.saturating_add((self.encoded)(p) + self.per_message)
        });
        if replay.len() > self.messages || bytes > self.bytes {
            return false;
        }
        let permit = u32::try_from(bytes)
            .ok()
            .and_then(|n| Arc::clone(&self.instance).try_acquire_many_owned(n).ok());
        let Some(permit) = permit else {
            return false;
        };
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        self.messages -= replay.len();
        self.bytes -= bytes;
        true
    }
}

/// A channel just subscribed, and what to send before its live messages.
pub(super) struct Opened {
    /// Missed messages (oldest first), or a gap notice. Send each through
    /// [`Tracker::accept`], as live messages.
    pub(super) replay: Vec<Arc<Publication>>,
    /// For a resume (from a cursor): whether everything missed was replayed.
    pub(super) recovered: Option<bool>,
    /// Where this connection starts in the channel (before the replay).
    pub(super) position: Option<StreamId>,
    /// For [`Start::LastEvent`]: whether the channel had a last event.
    pub(super) last_event: Option<bool>,
}

/// Subscribes `channel`, whose rule is `rule`, from `start`, within
/// `budget`: one read of the channel's position and one of its history,
/// whatever the start. A subscribe that fails leaves a subscription the
/// connection already had as it was.
#[allow(clippy::too_many_arguments)]
pub(super) async fn open(
    app: &App,
    subs: &mut Subscriptions,
    sink: &Arc<dyn Sink>,
    tracker: &mut Tracker,
    budget: &mut Budget,
    channel: &str,
    rule: &Arc<Rule>,
    events: Option<Filter>,
    start: Start,
) -> Result<Opened, Refusal> {
    let Some(history) = rule.history else {
        let hub = &app.delivery.hub;
        subs.add(hub, sink, channel, events, ChannelStart::default(), rule)
            .await?;
        // A client that had a position, or is coming back, missed what was
        // published meanwhile; `since=oldest` asks for history, and a
        // channel without it has nothing to replay.
        let gap = matches!(start, Start::After(_) | Start::Returning { .. });
        if gap {
            app.metrics.gaps.inc();
        }
        return Ok(Opened {
            replay: if gap {
                vec![Arc::new(Publication::gap(channel))]
            } else {
                Vec::new()
            },
            recovered: matches!(start, Start::After(_)).then_some(false),
            position: None,
            last_event: (start == Start::LastEvent).then_some(false),
        });
    };
    // The channel's newest id: where a new listener starts, and the bound a
    // client's cursor must be within.
    let newest = app
        .delivery
        .broker
        .position(channel, history)
        .await
        .map_err(|_| Refusal::Unavailable)?;
    let existed = subs.contains(channel);
    let channel_start = ChannelStart {
        history: true,
        position: Some(newest),
    };
    let hub = &app.delivery.hub;
    subs.add(hub, sink, channel, events.clone(), channel_start, rule)
        .await?;
    // `since=oldest` (`StreamId::ZERO`): every message still in history.
    // What trimming removed before it is not a loss to this client.
    let from_oldest = matches!(start, Start::Oldest | Start::Returning { oldest: true });
    let since = match start {
        // A cursor this channel never issued (another Redis, a restored
        // backup, a forged id): everything until now is unknown to the
        // client, and waiting for ids to catch up with it would drop every
        // live message meanwhile. Resync from now.
        Start::After(since) if since > newest => {
            tracing::debug!(%channel, %since, %newest, "cursor from the future: gap");
            return Ok(gap_at(app, tracker, channel, newest));
        }
        Start::After(since) => Some(since),
        _ if from_oldest => Some(StreamId::ZERO),
        Start::LastEvent => newest.before(),
        _ => None,
    };
    let from = since.unwrap_or(newest);
    // One more than the budget allows, to tell "all of it" from "more".
    let fetch = budget.messages.saturating_add(1);
    let recovery = match app
        .delivery
        .broker
        .recover(channel, history, from, fetch)
        .await
    {
        Ok(recovery) => recovery,
        Err(_) => {
            if !existed {
                subs.remove(&app.delivery.hub, channel);
            }
            return Err(Refusal::Unavailable);
        }
    };
    // A cache channel's last event is the newest id, when history still
    // holds it (a channel that never had one reports a position just
    // before now). Anything after it came since, and is replayed too.
    let last_event = (start == Start::LastEvent)
        .then(|| recovery.entries.first().map(|(id, _)| *id) == Some(newest));
    let position = match last_event {
        Some(false) => newest,
        _ => from,
    };
    tracker.set(channel, position);

    // Delivered through the connection's tracker like live messages, so
    // the position advances as each one is actually sent.
    let replay = replayed(channel, rule, &events, &recovery.entries);
    let fits = recovery.entries.len() < fetch && budget.take(&replay);
    let cursor = matches!(
        start,
        Start::After(_) | Start::Oldest | Start::Returning { oldest: true }
    );
    // A gap means messages after the start are gone: nothing to a client
    // asking from the oldest there is, or for the last event only (a
    // history of one message always has one before its last).
    let lost = recovery.gap && !from_oldest && last_event.is_none();
    if lost || !fits {
        // The client resyncs: only what comes after the channel's newest
        // message is still to be delivered.
        let newest = recovery
            .entries
            .last()
            .map_or(newest, |(id, _)| (*id).max(newest));
        return Ok(Opened {
            recovered: cursor.then_some(false),
            last_event: last_event.map(|_| false),
            ..gap_at(app, tracker, channel, newest)
        });
    }
    app.metrics.recovered_messages.inc_by(replay.len() as u64);
    Ok(Opened {
        replay,
        recovered: cursor.then_some(true),
        position: Some(position),
        last_event,
    })
}

/// History entries as the publications a subscriber replays, keeping only
/// the events it asked for.
fn replayed(
    channel: &str,
    rule: &Rule,
    events: &Option<Filter>,
    entries: &[(StreamId, Vec<u8>)],
) -> Vec<Arc<Publication>> {
    entries
        .iter()
        .map(|(id, payload)| Publication::message(channel, Some(*id), payload, &rule.event_field))
        .filter(|p| wanted(events.as_ref(), p))
        .map(Arc::new)
        .collect()
}

/// A `gap` for `channel`, this connection resuming after `newest`.
fn gap_at(app: &App, tracker: &mut Tracker, channel: &str, newest: StreamId) -> Opened {
    app.metrics.gaps.inc();
    tracker.set(channel, newest);
    Opened {
        replay: vec![Arc::new(Publication::gap(channel))],
        recovered: Some(false),
        position: Some(newest),
        last_event: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(channel: &str, id: &str) -> Publication {
        Publication::message(channel, Some(id.parse().expect("id")), b"{}", "/type")
    }

    #[test]
    fn the_tracker_passes_each_history_message_once_per_channel() {
        let mut tracker = Tracker::default();
        assert!(tracker.accept(&message("a", "5-0")));
        assert!(!tracker.accept(&message("a", "5-0")), "a duplicate");
        assert!(!tracker.accept(&message("a", "4-9")), "an older one");
        assert!(tracker.accept(&message("a", "5-1")));
        assert!(tracker.accept(&message("b", "1-0")), "channels are apart");
        // No id (no history) and gap notices always pass.
        let plain = Publication::new("a", b"{}");
        assert!(tracker.accept(&plain) && tracker.accept(&plain));
        let gap = Publication::gap("a");
        assert!(tracker.accept(&gap) && tracker.accept(&gap));
    }

    #[test]
    fn the_cursor_covers_every_history_channel() {
        let mut tracker = Tracker::default();
        tracker.accept(&message("a", "5-1"));
        assert!(tracker.is_only("a"));
        tracker.accept(&message("b", "7-0"));
        assert!(!tracker.is_only("a"));
        let cursor = tracker.cursor();
        assert_eq!(cursor.0.get("a"), Some(&"5-1".parse().expect("id")));
        assert_eq!(cursor.0.get("b"), Some(&"7-0".parse().expect("id")));
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        tracker.forget("b");
        assert!(tracker.is_only("a"));
        assert!(
            tracker.accept(&message("b", "1-0")),
            "forgotten: starts over"
        );
    }
}
