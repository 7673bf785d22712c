//! Lifecycle events, exact across the fleet: a channel occupied (its first
//! listener anywhere) and vacated (its last one gone), a presence member
//! added and removed, a signed-in user online and offline.
//!
//! No instance decides them alone. Each keeps a [`Ledger`] of what it
//! holds — listeners per channel, connections per presence member and per
//! user — and reports it to Redis: every change within moments, and its
//! whole ledger every `presence.heartbeat` (which heals a change that
//! failed to reach Redis). Redis sums the fleet's counts and appends each
//! transition, once, to the events stream (`crier_events` in
//! `crier.lua`). An end waits `events.delay` for a return (a page reload
//! is neither a leave nor a join); an instance that stops reporting (it
//! was killed, or lost Redis) loses its share after `presence.ttl`, so
//! its channels are vacated too.

pub(crate) mod webhooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::events::{Report, Stream};
use crate::broker::Broker;

/// How long changes gather before they are reported together: a burst
/// of connections costs one call.
const GATHER: Duration = Duration::from_millis(50);
/// How often an instance reports even without changes, so that ends whose
/// delay has passed are announced on time.
const TICK: Duration = Duration::from_secs(1);

/// What this process holds, by `<kind>|<subject>` key (see `crier.lua`),
/// and the changes not yet reported.
#[derive(Default)]
pub(crate) struct Ledger {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    held: HashMap<String, u64>,
    /// Per key, the units that came and those that went since the last
    /// report: kept apart, so that a listener who came and went between
    /// two reports still occupies and vacates its channel.
    changes: HashMap<String, (i64, i64)>,
}

impl Ledger {
    /// A listener of `channel` came (`1`) or went (`-1`).
    pub(crate) fn channel(&self, channel: &str, delta: i64) {
        self.add(format!("c|{channel}"), delta);
    }

    /// A connection of presence member `user` in `channel` came or went.
    pub(crate) fn member(&self, channel: &str, user: &str, delta: i64) {
        self.add(format!("m|{channel}\0{user}"), delta);
    }

    /// A connection signed in as `user` came or went.
    pub(crate) fn user(&self, user: &str, delta: i64) {
        self.add(format!("u|{user}"), delta);
    }

    fn add(&self, key: String, delta: i64) {
        {
            let mut state = self.state();
            let held = state.held.entry(key.clone()).or_default();
            *held = held.saturating_add_signed(delta);
            if *held == 0 {
                state.held.remove(&key);
            }
            let (came, went) = state.changes.entry(key).or_default();
            match delta > 0 {
                true => *came += delta,
                false => *went += delta,
            }
        }
        self.changed.notify_one();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The changes since the last call: every arrival first, then every
    /// departure (so no count dips to zero that did not).
    fn take_changes(&self) -> Vec<(String, i64)> {
        let changes = std::mem::take(&mut self.state().changes);
        let mut report: Vec<(String, i64)> = Vec::with_capacity(changes.len() * 2);
        let mut went = Vec::new();
        for (key, (up, down)) in changes {
            if down != 0 {
                went.push((key.clone(), down));
            }
            if up != 0 {
                report.push((key, up));
            }
        }
        report.extend(went);
        report
    }

    /// Everything held, for a beat. Changes not yet reported are in it.
    fn whole(&self) -> Vec<(String, i64)> {
        let mut state = self.state();
        state.changes.clear();
        state
            .held
            .iter()
            .map(|(key, n)| (key.clone(), i64::try_from(*n).unwrap_or(i64::MAX)))
            .collect()
    }
}

/// How an instance reports its ledger.
pub(crate) struct Reporting {
    /// Where Redis keeps the counts and appends the events.
    pub(crate) stream: Stream,
    /// The instance, fleet-wide.
    pub(crate) instance: u32,
    /// How often it reports its whole ledger (`presence.heartbeat`).
    pub(crate) beat: Duration,
    /// Whether webhooks read the stream (see [`run`]).
    pub(crate) webhooks: bool,
}

/// Reports `ledger` as `reporting` says until `stop`, then once more (the
/// connections closed by the drain). A failed report is logged once
/// until one succeeds; the next beat tells Redis the whole truth again.
///
/// With webhooks, the first report waits until their consumer group
/// exists: it reads from the stream's end as it was made, so an event
/// appended before would never reach them.
pub(crate) async fn run(
    ledger: Arc<Ledger>,
    broker: &Broker,
    metrics: &crate::metrics::Metrics,
    reporting: Reporting,
    stop: CancellationToken,
) {
    let Reporting {
        stream,
        instance,
        beat,
        webhooks,
    } = reporting;
    let mut grouped = !webhooks;
    let mut beats = tokio::time::interval(beat);
    let mut ticks = tokio::time::interval(TICK);
    for timer in [&mut beats, &mut ticks] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut failing = false;
    loop {
        let report = tokio::select! {
            _ = stop.cancelled() => break,
            _ = beats.tick() => Report::Sync,
            _ = ticks.tick() => Report::Change,
            _ = ledger.changed.notified() => {
                tokio::time::sleep(GATHER).await;
                Report::Change
            }
        };
        if !grouped {
            match broker.events_group(&stream, webhooks::GROUP).await {
                Ok(()) => grouped = true,
                // Redis is not there yet: nothing could be reported either.
                Err(_) => continue,
            }
        }
        let counts = match report {
            Report::Sync => ledger.whole(),
            Report::Change => ledger.take_changes(),
        };
        let result = broker.events(&stream, instance, report, &counts).await;
        if let Ok(names) = &result {
            for name in names {
                metrics.events.with_label_values(&[name]).inc();
            }
        }
        match (result, failing) {
            (Ok(_), true) => {
                tracing::info!("lifecycle events: reporting to Redis again");
                failing = false;
            }
            (Err(e), false) => {
                tracing::warn!(error = %e, "lifecycle events: cannot report to Redis; the next beat tells it everything");
                failing = true;
            }
            _ => {}
        }
    }
    let _ = broker
        .events(&stream, instance, Report::Sync, &ledger.whole())
        .await;
}
