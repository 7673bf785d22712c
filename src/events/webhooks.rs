//! Lifecycle webhooks: each event of the stream sent, in batches, to the
//! webhooks that want it — a Pusher app's (Pusher's body and signature,
//! so the app's existing handler accepts it) and crier's own
//! (`[[webhooks]]`).
//!
//! Exactly one instance sends each event: the instances read the stream
//! as one consumer group (`crier-webhooks`), so Redis hands each entry to
//! one of them, and an entry is acknowledged once every webhook that
//! wanted it has it (or gave up on it). Entries an instance took and
//! never acknowledged (it died) are claimed by another after a while.
//!
//! Each webhook has its own bounded queue and task: a slow or dead
//! receiver delays only its own events, never fan-out nor another
//! webhook. A failed call (no answer within `events.webhook_timeout`, or
//! not 2xx) is retried with backoff, in order, for
//! `events.webhook_retry_for`; then its events are dropped (counted;
//! they stay in the stream). A full queue drops new events (counted).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::events::{Entry, Stream};
use crate::broker::Broker;
use crate::config::{Config, EventWebhook, PusherApp, PusherWebhook};
use crate::metrics::Metrics;

/// The consumer group the instances read the stream as.
pub(crate) const GROUP: &str = "crier-webhooks";
/// How often the stream is read for new entries.
const READ_EVERY: Duration = Duration::from_millis(200);
/// Entries read at once.
const READ_COUNT: usize = 200;
/// Events in one call, at most.
const BATCH: usize = 100;
/// How often entries a dead instance left are looked for.
const CLAIM_EVERY: Duration = Duration::from_secs(5);
/// First and longest wait before a failed call is retried.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));

/// How a webhook's calls are signed, and which events it wants.
enum Kind {
    /// A Pusher app's webhook.
    Pusher {
        app: Arc<PusherApp>,
        hook: PusherWebhook,
    },
    /// crier's own.
    Crier(EventWebhook),
}

/// One webhook: where it goes, what it wants, and its queue.
struct Target {
    url: url::Url,
    kind: Kind,
    headers: Vec<(HeaderName, HeaderValue)>,
    queue: Mutex<VecDeque<Waiting>>,
    ready: Notify,
}

/// An event waiting for one webhook.
struct Waiting {
    /// Its stream entry, acknowledged once every webhook is done with it.
    entry: Arc<str>,
    event: Value,
    since: Instant,
}

/// Every webhook, and the stream entries they still hold.
pub(crate) struct Webhooks {
    targets: Vec<Arc<Target>>,
    /// Entry → webhooks still holding it.
    held: Mutex<HashMap<Arc<str>, usize>>,
    /// Entries every webhook is done with, to acknowledge.
    done: Mutex<Vec<String>>,
    client: crate::outbound::Client,
    queue_max: usize,
    retry_for: Duration,
    metrics: Metrics,
}

impl Webhooks {
    /// The webhooks `config` names; `None` if it names none. Fails on a
    /// CA file that cannot be read.
    pub(crate) fn new(config: &Config, metrics: Metrics) -> Result<Option<Self>, String> {
        let mut targets = Vec::new();
        let headers = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect::<Vec<_>>()
        };
        let url = |text: &str| url::Url::parse(text).map_err(|e| format!("{text}: {e}"));
        for app in &config.pusher.apps {
            for hook in &app.webhooks {
                targets.push(Target::new(
                    url(&hook.url)?,
                    headers(&hook.headers),
                    Kind::Pusher {
                        app: Arc::new(app.clone()),
                        hook: hook.clone(),
                    },
                ));
            }
        }
        for hook in &config.webhooks {
            targets.push(Target::new(
                url(&hook.url)?,
                headers(&hook.headers),
                Kind::Crier(hook.clone()),
            ));
        }
        if targets.is_empty() {
            return Ok(None);
        }
        let events = &config.events;
        let client = crate::outbound::Client::new(
            "events.webhook_ca_file",
            events.webhook_ca_file.as_deref(),
            events.webhook_timeout,
            64 * 1024,
        )?;
        Ok(Some(Self {
            targets,
            held: Mutex::default(),
            done: Mutex::default(),
            client,
            queue_max: events.webhook_queue,
            retry_for: events.webhook_retry_for,
            metrics,
        }))
    }

    /// Reads the stream as `consumer` and sends what it reads, until
    /// `stop`.
    pub(crate) async fn run(
        self: Arc<Self>,
        broker: &Broker,
        stream: &Stream,
        consumer: String,
        stop: CancellationToken,
    ) {
        let senders: Vec<_> = self
            .targets
            .iter()
            .map(|target| {
                tokio::spawn(Arc::clone(&self).send_until(Arc::clone(target), stop.clone()))
            })
            .collect();
        let mut grouped = false;
        let mut failing = false;
        let mut last_claim: Option<Instant> = None;
        let mut every = tokio::time::interval(READ_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => {}
            }
            let result = async {
                if !grouped {
                    broker.events_group(stream, GROUP).await?;
                    grouped = true;
                }
                let done = std::mem::take(&mut *lock(&self.done));
                if let Err(e) = broker.events_ack(stream, GROUP, &done).await {
                    lock(&self.done).extend(done);
                    return Err(e);
                }
                let mut entries = Vec::new();
                if last_claim.is_none_or(|t| t.elapsed() >= CLAIM_EVERY) {
                    last_claim = Some(Instant::now());
                    let idle = self.retry_for + CLAIM_EVERY * 2;
                    entries = broker
                        .events_claim(stream, GROUP, &consumer, idle, READ_COUNT)
                        .await?;
                }
                entries.extend(
                    broker
                        .events_read(stream, GROUP, &consumer, READ_COUNT)
                        .await?,
                );
                Ok(entries)
            }
            .await;
            match result {
                Ok(entries) => {
                    if failing {
                        tracing::info!("lifecycle webhooks: reading the events stream again");
                        failing = false;
                    }
                    for entry in entries {
                        self.route(entry);
                    }
                }
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "lifecycle webhooks: cannot read the events stream");
                    failing = true;
                }
                Err(_) => {}
            }
        }
        for sender in senders {
            let _ = sender.await;
        }
        let done = std::mem::take(&mut *lock(&self.done));
        let _ = broker.events_ack(stream, GROUP, &done).await;
    }

    /// Queues `entry` for every webhook that wants it; acknowledges it at
    /// once if none does.
    fn route(&self, entry: Entry) {
        let id: Arc<str> = entry.id.as_str().into();
        let mut holders = 0;
        for target in &self.targets {
            let Some(event) = target.wants(&entry) else {
                continue;
            };
            let mut queue = lock(&target.queue);
            if queue.len() >= self.queue_max {
                drop(queue);
                self.dropped("overflow", 1);
                tracing::warn!(url = %target.url, "lifecycle webhook: queue full, event dropped (it stays in the stream)");
                continue;
            }
            queue.push_back(Waiting {
                entry: Arc::clone(&id),
                event,
                since: Instant::now(),
            });
            drop(queue);
            self.metrics.event_webhook_queue.inc();
            holders += 1;
            target.ready.notify_one();
        }
        match holders {
            0 => lock(&self.done).push(entry.id),
            n => {
                lock(&self.held).insert(id, n);
            }
        }
    }

    /// One webhook's loop: batches from the front of its queue, in order,
    /// retried with backoff until they are sent or too old.
    async fn send_until(self: Arc<Self>, target: Arc<Target>, stop: CancellationToken) {
        let mut backoff = BACKOFF.0;
        loop {
            let batch: Vec<(Arc<str>, Value, Instant)> = lock(&target.queue)
                .iter()
                .take(BATCH)
                .map(|w| (Arc::clone(&w.entry), w.event.clone(), w.since))
                .collect();
            let Some(oldest) = batch.first().map(|(_, _, since)| *since) else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = target.ready.notified() => continue,
                }
            };
            let events: Vec<Value> = batch.iter().map(|(_, event, _)| event.clone()).collect();
            let result = target.call(&self.client, events).await;
            self.metrics
                .event_webhook_calls
                .with_label_values(&[match &result {
                    Ok(()) => "ok",
                    Err(Failed::Refused(_)) => "refused",
                    Err(Failed::NoAnswer(_)) => "error",
                }])
                .inc();
            match result {
                Ok(()) => backoff = BACKOFF.0,
                Err(e) if oldest.elapsed() < self.retry_for => {
                    tracing::warn!(url = %target.url, error = %e, retry_in = ?backoff, "lifecycle webhook failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                    continue;
                }
                Err(e) => {
                    tracing::error!(url = %target.url, error = %e, events = batch.len(), "lifecycle webhook: retried for too long, events dropped (they stay in the stream)");
                    self.dropped("expired", batch.len() as u64);
                }
            }
            let mut queue = lock(&target.queue);
            for _ in 0..batch.len() {
                queue.pop_front();
            }
            drop(queue);
            self.metrics.event_webhook_queue.sub(batch.len() as i64);
            self.release(batch.iter().map(|(entry, _, _)| entry));
        }
    }

    /// One webhook is done with these entries.
    fn release<'a>(&self, entries: impl Iterator<Item = &'a Arc<str>>) {
        let mut held = lock(&self.held);
        let mut done = Vec::new();
        for entry in entries {
            if let Some(n) = held.get_mut(entry) {
                *n -= 1;
                if *n == 0 {
                    held.remove(entry);
                    done.push(entry.to_string());
                }
            }
        }
        drop(held);
        lock(&self.done).extend(done);
    }

    fn dropped(&self, reason: &str, n: u64) {
        self.metrics
            .event_webhook_dropped
            .with_label_values(&[reason])
            .inc_by(n);
    }
}

/// Why a call failed.
#[derive(Debug)]
enum Failed {
    /// An answer, not 2xx.
    Refused(http::StatusCode),
    /// No answer.
    NoAnswer(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Refused(status) => write!(f, "answered {status}"),
            Failed::NoAnswer(why) => f.write_str(why),
        }
    }
}

impl Target {
    fn new(url: url::Url, headers: Vec<(HeaderName, HeaderValue)>, kind: Kind) -> Arc<Self> {
        Arc::new(Self {
            url,
            kind,
            headers,
            queue: Mutex::default(),
            ready: Notify::new(),
        })
    }

    /// The event as this webhook gets it, if it wants it.
    fn wants(&self, entry: &Entry) -> Option<Value> {
        let name = entry.get("name")?;
        let channel = entry.get("channel");
        let user = entry.get("user_id");
        match &self.kind {
            Kind::Pusher { app, hook } => {
                let listed = match hook.event_types.is_empty() {
                    true => crate::config::PUSHER_WEBHOOK_EVENTS[..4].contains(&name),
                    false => hook.event_types.iter().any(|t| t == name),
                };
                let pusher = crate::config::PUSHER_WEBHOOK_EVENTS.contains(&name);
                // The app's own name for the channel: other apps' channels
                // and crier's are not its business.
                let channel = crate::pusher::app_channel(app, channel?)?;
                let filter = &hook.filter;
                let starts = filter
                    .channel_name_starts_with
                    .as_deref()
                    .is_none_or(|head| channel.starts_with(head));
                let ends = filter
                    .channel_name_ends_with
                    .as_deref()
                    .is_none_or(|tail| channel.ends_with(tail));
                if !(listed && pusher && starts && ends) {
                    return None;
                }
                let mut event = json!({"name": name, "channel": channel});
                for field in ["user_id", "event", "data", "socket_id"] {
                    if let Some(value) = entry.get(field) {
                        event[field] = value.into();
                    }
                }
                Some(event)
            }
            Kind::Crier(hook) => {
                let listed = hook.events.is_empty() || hook.events.iter().any(|e| e == name);
                let matches = channel.is_none_or(|c| glob(&hook.channels, c));
                if !(listed && matches) {
                    return None;
                }
                let mut event = json!({"name": name});
                if let Some(channel) = channel {
                    event["channel"] = channel.into();
                }
                if let Some(user) = user {
                    event["user_id"] = user.into();
                }
                if let Some(time) = entry.get("time_ms").and_then(|t| t.parse::<u64>().ok()) {
                    event["time_ms"] = time.into();
                }
                Some(event)
            }
        }
    }

    /// One call with `events`: `{"time_ms", "events"}`, signed.
    async fn call(
        &self,
        client: &crate::outbound::Client,
        events: Vec<Value>,
    ) -> Result<(), Failed> {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let body = json!({"time_ms": time_ms, "events": events}).to_string();
        let mut request = http::Request::post(self.url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        match &self.kind {
            Kind::Pusher { app, .. } => {
                request = request.header("X-Pusher-Key", app.key.as_str()).header(
                    "X-Pusher-Signature",
                    crate::pusher::sign::hmac_hex(&app.secret, &body),
                );
            }
            Kind::Crier(hook) => {
                request = request.header(
                    "X-Crier-Signature",
                    crate::pusher::sign::hmac_hex(&hook.secret, &body),
                );
            }
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let answer = client
            .send(&self.url, request, Bytes::from(body))
            .await
            .map_err(Failed::NoAnswer)?;
        match answer.status.is_success() {
            true => Ok(()),
            false => Err(Failed::Refused(answer.status)),
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any text.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn star_matches_any_text() {
        assert!(glob("*", "anything"));
        assert!(glob("jobs.*", "jobs.42"));
        assert!(!glob("jobs.*", "job.42"));
        assert!(glob("*.log", "build.log"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c-y-b"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("ab*ba", "aba"), "the two ends may not overlap");
    }
}
