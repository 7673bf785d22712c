//! The one door for `tests/` into crier's internals: the integration tests
//! (history keys and cursors) and tests/fuzz.rs (the parsers a client
//! controls) reach them here. Not an API: it is hidden from the docs, and it
//! holds exactly what those tests use, re-exported, so the rest of the crate
//! stays `pub(crate)` and the compiler still finds dead code.

/// Credentials: the verifiers and the session cookie's signature.
pub mod auth {
    pub use crate::auth::cookie::express_signature;
    pub use crate::auth::{Authenticator, CookieStore, JwtVerifier};
}

/// Stream ids, cursors and the Redis key layout of history.
pub mod history {
    pub use crate::history::{legacy_stream_key, stream_key, Cursor, StreamId};
}

/// The SSE and WebSocket query string.
pub mod http {
    pub use crate::http::{StreamQuery, MAX_QUERY_BYTES};
}

/// The metrics registry the verifiers count into.
pub mod metrics {
    pub use crate::metrics::Metrics;
}

/// WebSocket commands and the event filter.
pub mod protocol {
    pub use crate::protocol::{event_filter, Command, MAX_EVENT_TYPES, MAX_EVENT_TYPE_LEN};
}
