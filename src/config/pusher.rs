//! `[pusher]` (the Pusher Channels protocol: apps, activity timeout,
//! client events) and `[presence]` (who is in a channel, fleet-wide). Part
//! of the configuration contract (see `mod.rs`): the shapes, and the checks
//! their values alone allow.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, nonzero, positive, ConfigError};

/// `[pusher]`: the Pusher apps this instance serves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PusherConfig {
    /// The apps, each with its id, key and secret. None: the Pusher
    /// endpoints (`/app/{key}`, `/apps/{id}/…`) answer 404.
    pub apps: Vec<PusherApp>,
    /// How long a client may stay silent before it pings (sent to clients
    /// in `pusher:connection_established`). crier itself pings every
    /// `ws.ping_interval` and closes a client silent for `ws.idle_timeout`
    /// (4201).
    #[serde(with = "humantime_serde")]
    pub activity_timeout: Duration,
    /// `client-*` events a connection may send per second (Pusher's limit
    /// is 10); more get `pusher:error` 4301.
    pub client_events_per_second: u32,
    /// Users one signed-in connection may watch (its `user_data`'s
    /// `watchlist`; Pusher's limit is 100): a longer list refuses the
    /// sign-in.
    pub max_watchlist: usize,
}

/// `[[pusher.apps]]`: one Pusher app.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PusherApp {
    /// The app id: the `/apps/{id}/…` HTTP API path.
    pub id: String,
    /// The public key clients connect with (`/app/{key}`).
    pub key: String,
    /// Signs channel authorizations and HTTP API requests. Redacted by
    /// `check-config`.
    pub secret: String,
    /// Whether members of private and presence channels may send
    /// `client-*` events to each other.
    #[serde(default)]
    pub client_events: bool,
    /// Where the app's channels live among crier's: the app's channel `X`
    /// is crier's channel `<namespace>X`, for channel rules, history,
    /// presence, Redis publishers and crier's own `/ws` and `/sse`
    /// clients. Each app's channels are its own: no two apps share a
    /// namespace, and at most one app has the empty one (its channels are
    /// crier's, by the same names). A namespace ends with `:`, which
    /// Pusher channel names cannot contain, so no app reaches another's
    /// channels, nor crier's own channels with a `:` in their name.
    #[serde(default)]
    pub namespace: String,
    /// Where the app's lifecycle events are sent, as Pusher sends them
    /// (needs `events.stream`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<PusherWebhook>,
    /// Close a connection that has not signed in (`pusher:signin`) this
    /// long after it opened, with 4009 (Pusher's "authorized
    /// connections"). None: signing in is optional.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_authentication_timeout: Option<Duration>,
    /// Whether the app's subscribers get `pusher_internal:subscription_count`
    /// (the channel's listeners across the fleet, when it changed, at most
    /// once a second) and the HTTP API answers `info=subscription_count`.
    /// Needs `events.stream`: the fleet's counts are kept there.
    #[serde(default)]
    pub subscription_count: bool,
}

/// One of a Pusher app's webhooks: Pusher's events of the app's channels,
/// batched and signed with the app's secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PusherWebhook {
    /// `http://` or `https://`.
    pub url: String,
    /// Which events: `channel_occupied`, `channel_vacated`,
    /// `member_added`, `member_removed`, `client_event`, `cache_miss`.
    /// Empty: the first four (the last two only when listed, as Pusher
    /// has them: each client event and cache miss is a stream entry).
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Which channels, by the app's own names.
    #[serde(default)]
    pub filter: WebhookFilter,
    /// Extra request headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// Pusher's webhook filter: the channels whose names start and end so.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookFilter {
    /// Only channels whose (app) name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_name_starts_with: Option<String>,
    /// Only channels whose (app) name ends with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_name_ends_with: Option<String>,
}

/// The events a Pusher webhook can carry; the first four unless it lists
/// some.
pub const PUSHER_WEBHOOK_EVENTS: [&str; 6] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
];

impl PusherApp {
    /// Whether one of the app's webhooks lists `event` (`client_event`,
    /// `cache_miss`: recorded only then).
    pub fn webhooks_list(&self, event: &str) -> bool {
        self.webhooks
            .iter()
            .any(|hook| hook.event_types.iter().any(|t| t == event))
    }
}

impl Default for PusherConfig {
    fn default() -> Self {
        Self {
            apps: Vec::new(),
            activity_timeout: Duration::from_secs(120),
            client_events_per_second: 10,
            max_watchlist: 100,
        }
    }
}

impl PusherConfig {
    /// Timings and rates above zero; each app named, keyed and signed on
    /// its own, in a namespace of its own.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[("pusher.activity_timeout", self.activity_timeout)])?;
        if self.client_events_per_second == 0 {
            return bad(
                "pusher.client_events_per_second",
                "must be greater than 0 (turn client events off per app with client_events = false)",
            );
        }
        positive(&[("pusher.max_watchlist", self.max_watchlist)])?;
        let mut seen = HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let field = |name: &str| format!("pusher.apps[{i}].{name}");
            if app.user_authentication_timeout == Some(Duration::ZERO) {
                let why = "must be greater than 0 (leave it out to make signing in optional)";
                return bad(&field("user_authentication_timeout"), why);
            }
            for (name, value) in [("id", &app.id), ("key", &app.key), ("secret", &app.secret)] {
                if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c == '/') {
                    return bad(&field(name), "must be non-empty, without spaces or `/`");
                }
            }
            if app.secret.len() < 16 {
                return bad(&field("secret"), "too short: use at least 16 characters");
            }
            if !seen.insert(("id", app.id.clone())) || !seen.insert(("key", app.key.clone())) {
                return bad(&field("id"), "two apps share an id or a key");
            }
            let ns = &app.namespace;
            let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:".contains(c);
            if !ns.is_empty() && (!ns.ends_with(':') || ns.len() > 64 || !ns.chars().all(allowed)) {
                return bad(
                    &field("namespace"),
                    format!(
                        "must end with `:` (at most 64 ASCII letters, digits, `_`, `-`, `.` \
                         and `:`), e.g. \"{}:\"",
                        app.id
                    ),
                );
            }
            for (w, hook) in app.webhooks.iter().enumerate() {
                let field = |name: &str| format!("pusher.apps[{i}].webhooks[{w}].{name}");
                super::events::check_url(&field("url"), &hook.url)?;
                for name in &hook.event_types {
                    if !PUSHER_WEBHOOK_EVENTS.contains(&name.as_str()) {
                        return bad(
                            &field("event_types"),
                            format!(
                                "{name:?} is not one of {}",
                                PUSHER_WEBHOOK_EVENTS.join(", ")
                            ),
                        );
                    }
                }
                super::events::check_headers(&field("headers"), &hook.headers)?;
            }
            if !seen.insert(("namespace", ns.clone())) {
                let why = match ns.is_empty() {
                    true => format!(
                        "two apps without a namespace would share every channel: give this app \
                         one, e.g. namespace = \"{}:\"",
                        app.id
                    ),
                    false => "two apps share a namespace (and so every channel)".into(),
                };
                return bad(&field("namespace"), why);
            }
        }
        Ok(())
    }
}

/// `[presence]`: who is in a presence channel, across every instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// How often an instance tells Redis its members are still there.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long the members of an instance that stopped telling (it
    /// crashed, or lost Redis) are kept: they are removed, with
    /// `member_removed`, at most `ttl` + `heartbeat` after its last word.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Members listed in one answer (a subscription's member list, the
    /// presence APIs); the count is always exact. Bounds what a channel
    /// with very many members costs one read.
    pub max_listed: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            ttl: Duration::from_secs(45),
            max_listed: 1000,
        }
    }
}

impl PresenceConfig {
    /// Beats above zero, members kept longer than a beat, and someone
    /// listed.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[("presence.heartbeat", self.heartbeat)])?;
        if self.ttl <= self.heartbeat {
            return bad(
                "presence.ttl",
                "must be longer than presence.heartbeat, or live members expire between beats",
            );
        }
        positive(&[("presence.max_listed", self.max_listed)])
    }
}
