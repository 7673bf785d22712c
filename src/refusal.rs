//! Why crier says no: one vocabulary for every refusal a client can meet —
//! a request before its stream opens, a command on an open WebSocket, a
//! publish call, a Pusher HTTP API request — so that a reason is named once
//! and every wire protocol maps it in one place: HTTP in
//! [`crate::http::refused`] (the Pusher HTTP API keeps its own body,
//! `{"error": reason}`, in `api::pusher`), crier's WebSocket `error` frame
//! in `transport::ws`'s `reply::refused`.

use std::borrow::Cow;

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request or command itself is wrong; the text says how.
    BadRequest(String),
    /// Missing or refused credentials; the text is the machine-readable
    /// reason (`expired`, `bad_signature`, …).
    Unauthorized(&'static str),
    /// Not allowed. Says nothing about whether the channel exists.
    Forbidden(&'static str),
    /// No such thing to ask about: an unknown Pusher app, or a path the
    /// Pusher HTTP API does not have.
    NotFound,
    /// More channels than `limits.max_subscriptions_per_connection`.
    TooManySubscriptions {
        /// The limit.
        limit: usize,
    },
    /// A body or frame over its limit; the text names the limit.
    TooLarge(String),
    /// `/ws` without a WebSocket upgrade.
    UpgradeRequired,
    /// At `limits.max_connections`: try another instance.
    AtCapacity,
    /// At the per-user or per-IP connection limit.
    TooManyConnections {
        /// `per_user` or `per_ip`.
        which: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Too many commands: slow down.
    RateLimited,
    /// The broker is down: try again.
    Unavailable,
    /// The session store is down: try again.
    SessionStoreUnavailable,
}

impl Refusal {
    /// The refusal's code on the wire (`error` in HTTP bodies, `code` in
    /// WebSocket `error` frames).
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) | Refusal::UpgradeRequired => "bad_request",
            Refusal::Unauthorized(_) => "unauthorized",
            Refusal::Forbidden(_) => "forbidden",
            Refusal::NotFound => "not_found",
            Refusal::TooManySubscriptions { .. } => "too_many_subscriptions",
            Refusal::TooLarge(_) => "too_large",
            Refusal::TooManyConnections { .. } => "too_many_connections",
            Refusal::RateLimited => "rate_limited",
            Refusal::AtCapacity | Refusal::Unavailable | Refusal::SessionStoreUnavailable => {
                "unavailable"
            }
        }
    }

    /// A short label for metrics (`crier_connections_rejected_total`) and
    /// logs: finer than [`Refusal::code`] where an operator needs to tell
    /// causes apart.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Refusal::UpgradeRequired => "upgrade_required",
            Refusal::AtCapacity => "max_connections",
            Refusal::TooManyConnections { which, .. } => which,
            Refusal::SessionStoreUnavailable => "session_store_unavailable",
            other => other.code(),
        }
    }

    /// What the client is told, for a person reading it.
    pub fn reason(&self) -> Cow<'static, str> {
        match self {
            Refusal::BadRequest(text) | Refusal::TooLarge(text) => Cow::Owned(text.clone()),
            Refusal::Unauthorized(reason) | Refusal::Forbidden(reason) => Cow::Borrowed(reason),
            Refusal::TooManySubscriptions { limit } => {
                Cow::Owned(format!("at most {limit} channels per connection"))
            }
            Refusal::NotFound => Cow::Borrowed("not found"),
            Refusal::UpgradeRequired => Cow::Borrowed("this endpoint speaks WebSocket"),
            Refusal::AtCapacity => Cow::Borrowed("connection limit reached, try another instance"),
            Refusal::TooManyConnections { which, limit } => Cow::Owned(format!(
                "connection limit reached: at most {limit} connections {}",
                which.replace('_', " ")
            )),
            Refusal::RateLimited => Cow::Borrowed("too many commands, slow down"),
            Refusal::Unavailable => Cow::Borrowed("the broker is unavailable, try again later"),
            Refusal::SessionStoreUnavailable => {
                Cow::Borrowed("the session store is unavailable, try again later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_coarse_labels_fine_and_reasons_name_the_limit() {
        let per_user = Refusal::TooManyConnections {
            which: "per_user",
            limit: 3,
        };
        assert_eq!(per_user.code(), "too_many_connections");
        assert_eq!(per_user.label(), "per_user");
        assert!(per_user.reason().contains("at most 3 connections per user"));
        assert_eq!(Refusal::AtCapacity.code(), "unavailable");
        assert_eq!(Refusal::AtCapacity.label(), "max_connections");
        assert_eq!(
            Refusal::TooManySubscriptions { limit: 64 }.reason(),
            "at most 64 channels per connection"
        );
        assert_eq!(Refusal::Forbidden("forbidden").label(), "forbidden");
    }
}
