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

use std::collections::HashMap;
use std::sync::Arc;

use crate::app::App;
use crate::history::{Cursor, StreamId};
use crate::hub::{SubscribeError, Subscriptions};
use crate::protocol::{Kind, Publication};

/// Most messages replayed per channel on resume.
const REPLAY_LIMIT: usize = 10_000;

/// What this connection has delivered, per history channel.
#[derive(Debug, Default)]
pub struct Tracker {
    last: HashMap<String, StreamId>,
}

impl Tracker {
    /// Whether `p` is new for this connection (and record it). Messages
    /// without an id (no history) and gap notices always pass.
    pub fn accept(&mut self, p: &Publication) -> bool {
        let (Kind::Message, Some(id)) = (p.kind, p.id) else {
            return true;
        };
        match self.last.get_mut(&p.channel) {
            Some(last) if *last >= id => false,
            Some(last) => {
                *last = id;
                true
            }
            None => {
                self.last.insert(p.channel.clone(), id);
                true
            }
        }
    }

    /// The cursor covering every history channel of this connection.
    pub fn cursor(&self) -> Cursor {
        Cursor(self.last.iter().map(|(c, id)| (c.clone(), *id)).collect())
    }

    /// Whether `channel` is the only history channel of this connection
    /// (its cursor is then the publication's own).
    pub fn is_only(&self, channel: &str) -> bool {
        self.last.len() == 1 && self.last.contains_key(channel)
    }

    /// Forgets a channel (unsubscribed).
    pub fn forget(&mut self, channel: &str) {
        self.last.remove(channel);
    }
}

/// A channel just subscribed, and what to send before its live messages.
pub struct Opened {
    /// Missed messages (oldest first), or a gap notice. Send each through
    /// [`Tracker::accept`], as live messages.
    pub replay: Vec<Arc<Publication>>,
    /// For a resume (`since` given): whether everything missed was replayed.
    pub recovered: Option<bool>,
    /// Where this connection starts in the channel (before the replay).
    pub position: Option<StreamId>,
}

/// Subscribes `channel`, resuming after `since` when given. `resuming`
/// says the client is coming back (SSE `Last-Event-ID`), so a channel
/// without history gets a gap notice: what it missed is gone.
pub async fn open(
    app: &App,
    subs: &mut Subscriptions,
    tracker: &mut Tracker,
    channel: &str,
    events: Option<Vec<String>>,
    since: Option<StreamId>,
    resuming: bool,
) -> Result<Opened, SubscribeError> {
    let Some(_) = app.policy.history_of(channel) else {
        subs.add(channel, events).await?;
        let gap = since.is_some() || resuming;
        if gap {
            app.metrics.gaps.inc();
        }
        return Ok(Opened {
            replay: if gap {
                vec![Arc::new(Publication::gap(channel))]
            } else {
                Vec::new()
            },
            recovered: since.map(|_| false),
            position: None,
        });
    };
    let start = match since {
        Some(since) => since,
        None => app
            .broker
            .position(channel)
            .await
            .map_err(|_| SubscribeError::Unavailable)?,
    };
    subs.add(channel, events.clone()).await?;
    let recovery = app
        .broker
        .recover(channel, start, REPLAY_LIMIT)
        .await
        .map_err(|_| {
            subs.remove(channel);
            SubscribeError::Unavailable
        })?;
    tracker.last.insert(channel.to_owned(), start);

    // A full page means more may be missing than one replay carries.
    let truncated = recovery.entries.len() >= REPLAY_LIMIT;
    let mut replay = Vec::new();
    if recovery.gap || truncated {
        app.metrics.gaps.inc();
        replay.push(Arc::new(Publication::gap(channel)));
        // The client resyncs: only what comes after the newest retained
        // message is still to be delivered.
        if let Some((newest, _)) = recovery.entries.last() {
            tracker.last.insert(channel.to_owned(), *newest);
        }
    } else {
        // Delivered through the connection's tracker like live messages,
        // so the position advances as each one is actually sent.
        let event_field = app.policy.event_field_of(channel);
        for (id, payload) in &recovery.entries {
            let p = Publication::message(channel, Some(*id), payload, event_field);
            let wanted = events
                .as_ref()
                .is_none_or(|filter| p.event.as_ref().is_some_and(|e| filter.contains(e)));
            if wanted {
                replay.push(Arc::new(p));
            }
        }
        app.metrics.recovered_messages.inc_by(replay.len() as u64);
    }
    Ok(Opened {
        replay,
        recovered: since.map(|_| !(recovery.gap || truncated)),
        position: tracker.last.get(channel).copied(),
    })
}
