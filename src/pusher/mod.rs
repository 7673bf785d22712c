//! The Pusher Channels protocol, for apps written against pusher-js,
//! laravel-echo and the Pusher server SDKs: the apps served
//! (`[[pusher.apps]]`), their signatures ([`sign`]) and channel kinds.
//! The WebSocket framing is [`crate::transport::pusher`], the HTTP API
//! [`crate::api::pusher`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::PusherApp;

pub(crate) mod sign;

/// The configured apps, found by key (WebSocket) or id (HTTP API).
#[derive(Default)]
pub(crate) struct Apps {
    by_key: HashMap<String, Arc<PusherApp>>,
    by_id: HashMap<String, Arc<PusherApp>>,
}

impl Apps {
    pub(crate) fn new(apps: &[PusherApp]) -> Self {
        let mut all = Self::default();
        for app in apps {
            let app = Arc::new(app.clone());
            all.by_key.insert(app.key.clone(), Arc::clone(&app));
            all.by_id.insert(app.id.clone(), app);
        }
        all
    }

    /// Whether any app is configured.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub(crate) fn by_key(&self, key: &str) -> Option<&Arc<PusherApp>> {
        self.by_key.get(key)
    }

    pub(crate) fn by_id(&self, id: &str) -> Option<&Arc<PusherApp>> {
        self.by_id.get(id)
    }
}

/// Longest Pusher channel name (Pusher's limit).
const MAX_NAME: usize = 164;

/// Whether `name` is a channel name Pusher accepts: 1 to 164 of ASCII
/// letters, digits and `_ - = @ , . ;`. No `:`, so an app's channels never
/// reach another app's namespace nor crier's own `user:42`-style channels.
pub(crate) fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a channel name of 1 to {MAX_NAME} bytes"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_-=@,.;".contains(*c)))
    {
        Some(c) => Err(format!(
            "`{}` is not allowed in a channel name (letters, digits and _-=@,.; only)",
            c.escape_default()
        )),
        None => Ok(()),
    }
}

/// The channel where an app reaches every connection signed in as one
/// user (`sendToUser`): `#server-to-user-{id}`.
pub(crate) const USER_CHANNEL: &str = "#server-to-user-";
/// The presence channel whose member is a user while any connection of
/// theirs is signed in anywhere (`#online-{id}`, crier's own: no Pusher
/// client can name it); whoever watches the user listens there.
pub(crate) const ONLINE_CHANNEL: &str = "#online-";
/// Longest signed-in user id: its `#server-to-user-` channel is a Pusher
/// channel name.
const MAX_USER_ID: usize = MAX_NAME - USER_CHANNEL.len();

/// Whether `id` can be a signed-in user's: 1 to 148 of the characters of
/// a channel name, so that `#server-to-user-{id}` is one.
pub(crate) fn valid_user_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_USER_ID {
        return Err(format!("a user id of 1 to {MAX_USER_ID} bytes"));
    }
    valid_name(id).map_err(|why| why.replace("channel name", "user id"))
}

/// The user whose `#server-to-user-{id}` channel `name` is, if it is one.
pub(crate) fn user_of_channel(name: &str) -> Option<&str> {
    name.strip_prefix(USER_CHANNEL)
        .filter(|id| valid_user_id(id).is_ok())
}

/// The user whose online channel (crier's name) `channel` is, if it is
/// one.
pub(crate) fn user_online(channel: &str) -> Option<&str> {
    local_name(channel).strip_prefix(ONLINE_CHANNEL)
}

/// An app's channel among crier's: `<namespace><name>` (see
/// [`PusherApp::namespace`]).
pub(crate) fn crier_channel(app: &PusherApp, name: &str) -> String {
    format!("{}{name}", app.namespace)
}

/// The app's own name of a crier channel, when the channel is one of the
/// app's: in its namespace, and a valid Pusher name after it.
pub(crate) fn app_channel<'a>(app: &PusherApp, channel: &'a str) -> Option<&'a str> {
    channel
        .strip_prefix(app.namespace.as_str())
        .filter(|name| valid_name(name).is_ok())
}

/// The name a Pusher client knows a crier channel by: what follows the
/// last `:` (an app's namespace ends with one, and Pusher names have
/// none), so one shared frame serves every listener of the channel.
pub(crate) fn local_name(channel: &str) -> &str {
    channel.rsplit_once(':').map_or(channel, |(_, name)| name)
}

/// The channel kinds of the protocol, by name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelKind {
    Public,
    Private,
    Presence,
    /// `private-encrypted-`: end-to-end encrypted. The app's server SDK
    /// encrypts each event before `POST /events`, and its auth endpoint
    /// hands the client the channel's key: crier checks the signature as
    /// for a private channel and relays the ciphertext untouched. Client
    /// events are refused, as Pusher refuses them.
    Encrypted,
}

impl ChannelKind {
    pub(crate) fn of(channel: &str) -> Self {
        // `cache-`, `private-cache-`, `presence-cache-`: the same, plus the
        // last event on subscribe.
        if channel.starts_with("private-encrypted-") {
            ChannelKind::Encrypted
        } else if channel.starts_with("private-") {
            ChannelKind::Private
        } else if channel.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }

    /// Whether subscribing needs the app's signature.
    pub(crate) fn signed(self) -> bool {
        self != ChannelKind::Public
    }
}

/// Whether a channel sends its last event on subscribe.
pub(crate) fn is_cache(channel: &str) -> bool {
    [
        "cache-",
        "private-cache-",
        "presence-cache-",
        "private-encrypted-cache-",
    ]
    .iter()
    .any(|p| channel.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_map_their_channels_into_their_namespace_and_back() {
        let app = |namespace: &str| PusherApp {
            id: "1".into(),
            key: "k".into(),
            secret: "s".repeat(16),
            client_events: false,
            namespace: namespace.into(),
            ..Default::default()
        };
        let (plain, second) = (app(""), app("app2:"));
        assert_eq!(crier_channel(&plain, "private-a"), "private-a");
        assert_eq!(crier_channel(&second, "private-a"), "app2:private-a");
        assert_eq!(app_channel(&second, "app2:private-a"), Some("private-a"));
        // Not the app's: another namespace, or a crier channel with a `:`.
        assert_eq!(app_channel(&second, "private-a"), None);
        assert_eq!(app_channel(&plain, "app2:private-a"), None);
        assert_eq!(app_channel(&plain, "user:alice"), None);
        assert_eq!(local_name("app2:private-a"), "private-a");
        assert_eq!(local_name("orders"), "orders");
        assert!(valid_name("presence-room.1;x=y@z,w").is_ok());
        assert!(valid_name(&"a".repeat(164)).is_ok());
        for bad in ["", "user:alice", "a b", "é", "#server-to-user-1"] {
            assert!(valid_name(bad).is_err(), "{bad}");
        }
        // A signed-in user's channel, by its Pusher name; the online
        // channel, by crier's.
        assert_eq!(user_of_channel("#server-to-user-u@1"), Some("u@1"));
        for bad in [
            "#server-to-user-",
            "#server-to-user-a:b",
            "server-to-user-1",
        ] {
            assert_eq!(user_of_channel(bad), None, "{bad}");
        }
        assert!(valid_user_id(&"u".repeat(148)).is_ok());
        assert!(valid_user_id(&"u".repeat(149)).is_err());
        assert_eq!(user_online("app2:#online-u1"), Some("u1"));
        assert_eq!(user_online("app2:presence-x"), None);
        assert!(valid_name(&"a".repeat(165)).is_err());
    }
}
