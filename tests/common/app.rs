//! A web app's session endpoint for crier's `[auth.webhook]`, as a test
//! server: it knows some session cookies (each a user, channels and an
//! optional expiry), answers 401 for the others, counts its calls, and can
//! log a session out or go down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The cookie the app's sessions travel in.
pub const COOKIE: &str = "_myapp_session";

#[derive(Default)]
struct State {
    sessions: Mutex<HashMap<String, Value>>,
    calls: AtomicUsize,
    /// Calls per session cookie value.
    calls_for: Mutex<HashMap<String, usize>>,
    down: AtomicBool,
    /// What the last call carried: its headers and body.
    last: Mutex<Option<(http::HeaderMap, Value)>>,
}

/// See the module documentation.
pub struct App {
    /// `http://127.0.0.1:PORT/crier/session`
    pub url: String,
    state: Arc<State>,
}

impl App {
    pub async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/crier/session",
            listener.local_addr().expect("addr")
        );
        let state = Arc::new(State::default());
        let served = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = Arc::clone(&served);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        App { url, state }
    }

    /// A logged-in session: its cookie value answers `answer`.
    pub fn login(&self, session: &str, answer: Value) {
        self.state
            .sessions
            .lock()
            .expect("lock")
            .insert(session.to_owned(), answer);
    }

    pub fn logout(&self, session: &str) {
        self.state.sessions.lock().expect("lock").remove(session);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Calls that brought the session cookie `session`.
    pub fn calls_for(&self, session: &str) -> usize {
        let calls = self.state.calls_for.lock().expect("lock");
        calls.get(session).copied().unwrap_or(0)
    }

    /// The headers and JSON body of the last call.
    pub fn last_call(&self) -> Option<(http::HeaderMap, Value)> {
        self.state.last.lock().expect("lock").clone()
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    *state.last.lock().expect("lock") = Some((parts.headers.clone(), body));
    let reply = |status: StatusCode, body: Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r
    };
    if state.down.load(Ordering::SeqCst) {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "down"}));
    }
    let session = parts
        .headers
        .get(http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| {
            c.split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| *k == COOKIE)
                .map(|(_, v)| v.to_owned())
        });
    if let Some(s) = &session {
        *state
            .calls_for
            .lock()
            .expect("lock")
            .entry(s.clone())
            .or_insert(0) += 1;
    }
    let found = session.and_then(|s| state.sessions.lock().expect("lock").get(&s).cloned());
    match found {
        Some(answer) => reply(StatusCode::OK, answer),
        None => reply(StatusCode::UNAUTHORIZED, json!({"error": "not logged in"})),
    }
}
