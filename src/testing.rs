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
    pub use crate::protocol::{event_filter, MAX_EVENT_TYPES, MAX_EVENT_TYPE_LEN};
    pub use crate::transport::ws::Command;
}

/// The WebSocket driver, for a protocol of a test's own: implement
/// [`websocket::Protocol`] and serve it with [`websocket::serve`].
pub mod websocket {
    use std::sync::Arc;

    pub use crate::broker::presence::Members;
    pub use crate::metrics::Transport;
    pub use crate::protocol::{Encoding, Filter, Publication};
    pub use crate::refusal::Refusal;
    pub use crate::session::{Grant, Presence, Request, Session, Start, Subscribed};
    pub use crate::transport::websocket::{
        text_frame, Close, CloseCode, Conn, End, Farewell, Gone, Protocol,
    };

    use crate::app::{App, ConnInfo, Mount};
    use crate::config::Config;
    use crate::http::{rejected, Body};
    use crate::server::Running;

    /// Serves crier on `listener` as [`crate::serve`] does, and protocol
    /// `P` (a new one per connection) on `path`, admitted as `/ws` is.
    pub fn serve<P: Protocol + Default>(
        config: Config,
        listener: tokio::net::TcpListener,
        path: &'static str,
    ) -> anyhow::Result<Running> {
        let mount = Mount {
            path,
            handle: |app, req, info| Box::pin(handle::<P>(app, req, info)),
        };
        crate::server::serve_mounted(config, listener, Some(mount))
    }

    async fn handle<P: Protocol + Default>(
        app: Arc<App>,
        req: http::Request<hyper::body::Incoming>,
        info: ConnInfo,
    ) -> http::Response<Body> {
        let peer = info.peer.ip();
        let admitted =
            crate::session::admit(&app, P::TRANSPORT, req.headers(), req.uri(), peer, &[]);
        match admitted.await {
            Ok(admission) => {
                crate::transport::websocket::handle(&app, req, info, Ok((admission, P::default())))
            }
            Err(refusal) => rejected(&app.metrics, &refusal),
        }
    }
}
