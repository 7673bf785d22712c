//! `[events]`: lifecycle events (a channel occupied or vacated, a member
//! added or removed, a user online or offline), decided fleet-wide in
//! Redis and appended to a stream apps read. Part of the configuration
//! contract (see `mod.rs`); what the events are is `crate::events`'
//! business.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, ConfigError};

/// Lifecycle events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// The Redis stream each event is appended to (under
    /// `redis.channel_prefix`), e.g. `crier:events`. Unset: no lifecycle
    /// events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The stream is trimmed to about this many entries (`MAXLEN ~`).
    pub max_len: u64,
    /// A channel vacated, a member removed or a user offline is announced
    /// only if it has not come back after this long: a page reload is not
    /// a leave and a join.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// A webhook call that does not answer within this long failed.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// How long a webhook's events are retried (with backoff) before
    /// they are dropped (counted; they stay in the stream).
    #[serde(with = "humantime_serde")]
    pub webhook_retry_for: Duration,
    /// Events waiting for one webhook, at most; more are dropped
    /// (counted and logged).
    pub webhook_queue: usize,
    /// A CA file (PEM) trusted for `https://` webhooks, beside the
    /// system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_ca_file: Option<std::path::PathBuf>,
}

/// `[[webhooks]]`: crier's own webhook, for any channel's lifecycle
/// events (crier's `/ws` and `/sse` channels, and every event Pusher has
/// no name for: `user_online`, `user_offline`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventWebhook {
    /// `http://` or `https://`.
    pub url: String,
    /// Signs each body: `X-Crier-Signature` is the HMAC-SHA256 of the body
    /// under it, in hex. Redacted by `check-config`.
    pub secret: String,
    /// Which events (see `[events]`). Empty: all of them.
    #[serde(default)]
    pub events: Vec<String>,
    /// Which channels: a pattern as in `[[channels]]` (`*` matches any
    /// text). Events without a channel (`user_online`, `user_offline`)
    /// are sent whatever it says.
    #[serde(default = "every_channel")]
    pub channels: String,
    /// Extra request headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn every_channel() -> String {
    "*".into()
}

/// Every lifecycle event's name.
pub const EVENT_NAMES: [&str; 6] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "user_online",
    "user_offline",
];

/// An `http://` or `https://` URL.
pub(super) fn check_url(field: &str, url: &str) -> Result<(), ConfigError> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => bad(field, format!("{url:?} is not an http:// or https:// URL")),
    }
}

/// Header names and values a request can carry.
pub(super) fn check_headers(
    field: &str,
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            return bad(field, format!("{name:?}: not a valid header"));
        }
    }
    Ok(())
}

/// Checks `[[webhooks]]`.
pub(super) fn check_webhooks(hooks: &[EventWebhook]) -> Result<(), ConfigError> {
    for (i, hook) in hooks.iter().enumerate() {
        let field = |name: &str| format!("webhooks[{i}].{name}");
        check_url(&field("url"), &hook.url)?;
        if hook.secret.len() < 16 {
            return bad(&field("secret"), "too short: use at least 16 characters");
        }
        for name in &hook.events {
            if !EVENT_NAMES.contains(&name.as_str()) {
                return bad(
                    &field("events"),
                    format!("{name:?} is not one of {}", EVENT_NAMES.join(", ")),
                );
            }
        }
        if hook.channels.is_empty() {
            return bad(
                &field("channels"),
                "must be a pattern, e.g. \"*\" or \"jobs.*\"",
            );
        }
        check_headers(&field("headers"), &hook.headers)?;
    }
    Ok(())
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            stream: None,
            max_len: 100_000,
            delay: Duration::from_secs(5),
            webhook_timeout: Duration::from_secs(5),
            webhook_retry_for: Duration::from_secs(300),
            webhook_queue: 10_000,
            webhook_ca_file: None,
        }
    }
}

impl EventsConfig {
    /// A stream name that is a key crier can own, and a length that keeps
    /// something. (A delay of 0 announces every end at once.)
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(stream) = &self.stream {
            if stream.is_empty() || stream.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(
                    "events.stream",
                    "must be a Redis key without spaces, e.g. \"crier:events\"",
                );
            }
        }
        if self.max_len == 0 {
            return bad("events.max_len", "must be above 0");
        }
        if self.webhook_queue == 0 {
            return bad("events.webhook_queue", "must be above 0");
        }
        super::nonzero(&[("events.webhook_timeout", self.webhook_timeout)])
    }
}
