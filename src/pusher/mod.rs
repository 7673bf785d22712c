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

/// The channel kinds of the protocol, by name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelKind {
    Public,
    Private,
    Presence,
    /// `private-encrypted-`: end-to-end encrypted by the clients, which
    /// crier does not support (it would need the app's master key).
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
