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
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            stream: None,
            max_len: 100_000,
            delay: Duration::from_secs(5),
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
        Ok(())
    }
}
