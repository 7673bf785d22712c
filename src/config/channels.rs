//! `[[channels]]`: the rules deciding who may listen to which channel, and
//! which channels keep history. Part of the configuration contract (see
//! `mod.rs`): the shapes, and the checks their values alone allow. What a
//! pattern means, and whether it is one crier understands, is the policy's
//! business: it parses the patterns once, when the server is built.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, check_pointer, ConfigError};

/// One `[[channels]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    /// Channel name, or a prefix ending in `*` that matches any non-empty
    /// rest (`public:*` matches `public:a` and `public:a:b`). May hold
    /// `{user}` and `{claim.NAME}`, filled from the authenticated principal:
    /// `user:{user}` matches only the connected user's own channel.
    pub pattern: String,
    /// Who may subscribe.
    pub subscribe: Subscribe,
    /// Keep history for the matching channels (`crier_publish` appends to
    /// it); absent: no history, no resume, `gap` after a disconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryRule>,
    /// JSON pointer to the payload's event type for the matching channels
    /// (e.g. `/event`); absent: the top-level `event_field`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_field: Option<String>,
    /// Track who is in the matching channels (fleet-wide presence): a
    /// signed-in subscriber is a member, the others hear `join` and
    /// `leave`, and may ask for the member list. Pusher `presence-`
    /// channels always track it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub presence: bool,
}

impl ChannelRule {
    /// Checks the rule, the `i`th of `[[channels]]`: its event field is a
    /// JSON pointer, its history a size crier keeps.
    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        if let Some(Err(e)) = self.event_field.as_deref().map(check_pointer) {
            return bad(&format!("channels[{i}].event_field"), e);
        }
        if self
            .history
            .is_some_and(|h| h.size == 0 || h.size > 1_000_000)
        {
            return bad(
                &format!("channels[{i}].history.size"),
                "must be between 1 and 1000000",
            );
        }
        Ok(())
    }
}

/// Who may subscribe to the channels a rule matches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Subscribe {
    /// Everyone, authenticated or not.
    Anyone,
    /// Authenticated users only.
    User,
    /// Only clients granted the channel: listed in their token's channels
    /// claim, or (Pusher protocol) a subscription the app signed.
    Claim,
}

/// `history = { size = 1000, ttl = "1h" }` on a channel rule.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// Messages kept per channel (approximately: `XADD MAXLEN ~`).
    pub size: u64,
    /// How long a channel's history outlives its last message.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}
