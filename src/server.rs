//! Assembly and lifecycle of one crier process: build the parts, accept
//! connections, route requests, and shut down in phases.
//!
//! `main` and the tests both go through [`start`] / [`serve`], so what the
//! tests exercise is what runs in production.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{App, ConnInfo, Mount};
use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::fdlimit::{Admit, Budget, Slot};
use crate::http::{full, text, Body};
use crate::hub::Hub;
use crate::link::Handoff;
use crate::metrics::Metrics;
use crate::origin::Origins;
use crate::policy::Policy;
use crate::refusal::Refusal;
use crate::stall::{StallGuard, StallTimeout};
use crate::transport::{sse, ws};

/// The dev console served at `/` in dev mode.
const DEMO_PAGE: &str = include_str!("demo.html");

/// A running crier.
pub struct Running {
    addr: SocketAddr,
    sigterm: CancellationToken,
    done: JoinHandle<()>,
}

impl Running {
    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What SIGTERM does: not ready at once, serve for the grace period,
    /// then drain. Returns immediately; see [`Running::stopped`].
    pub fn shutdown(&self) {
        self.sigterm.cancel();
    }

    /// Resolves when every connection has left and the process may exit.
    pub async fn stopped(self) {
        let _ = self.done.await;
    }
}

/// The credentials this instance accepts, for the start-up line.
fn auth_modes(config: &Config) -> String {
    let auth = &config.auth;
    let jwks = auth
        .jwt
        .as_ref()
        .is_some_and(|j| j.jwks_url.is_some() || j.issuer_discovery);
    let modes: Vec<&str> = [
        (auth.jwt.is_some() && !jwks, "jwt"),
        (jwks, "jwt+jwks"),
        (auth.session.is_some(), "session"),
        (auth.webhook.is_some(), "webhook"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if modes.is_empty() {
        "none".into()
    } else {
        modes.join(",")
    }
}

/// What serving builds from the configuration before it binds or starts
/// anything. Building them is also the check of the settings only they can
/// judge ([`Config::validate`] checks the rest, and imports none of them):
/// a failure is a [`ConfigError`] naming the field, which `main` turns into
/// exit code 64.
struct Parts {
    metrics: Metrics,
    policy: Arc<Policy>,
    auth: Arc<Authenticator>,
    origins: Origins,
}

impl Parts {
    fn build(config: &Config) -> Result<Self, ConfigError> {
        let metrics = Metrics::new();
        let (policy, auth, origins) =
            build_with(config, |config| Authenticator::new(config, metrics.clone()))?;
        Ok(Self {
            metrics,
            policy: Arc::new(policy),
            auth: Arc::new(auth),
            origins,
        })
    }
}

/// The checks serving makes when it builds its parts, without a runtime
/// and without connecting to Redis: for `crier check-config` (and `crier
/// publish`), so that they refuse what serving would refuse.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    build_with(config, Authenticator::check).map(drop)
}

/// Validates `config` ([`Config::load`] did, but a configuration built
/// in code, as tests and embedders build it, has not been: the parts rely
/// on it), checks the Redis addresses (by opening clients; the broker opens
/// its own when it connects), then builds the channel rules, the
/// authenticator and the allowed origins, in that order. `auth` builds the
/// authenticator (serving) or only checks it (`check`: its session store
/// needs a runtime).
fn build_with<A>(
    config: &Config,
    auth: impl FnOnce(&Config) -> Result<A, String>,
) -> Result<(Policy, A, Origins), ConfigError> {
    config.validate()?;
    crate::broker::check(&config.redis).map_err(ConfigError::new)?;
    let policy = Policy::new(&config.channels, config.dev)
        .map_err(ConfigError::new)?
        .with_event_field(&config.event_field);
    let auth = auth(config).map_err(ConfigError::new)?;
    let origins = Origins::new(&config.allowed_origins, config.dev).map_err(ConfigError::new)?;
    Ok((policy, auth, origins))
}

/// Binds `config.listen` and serves. The parts are built first: a bad
/// configuration is reported as such, whether the address is free or not.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let parts = Parts::build(&config)?;
    let addr = config.listen_addr();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    launch(config, parts, listener, None)
}

/// Serves on an already bound listener.
pub fn serve(config: Config, listener: TcpListener) -> anyhow::Result<Running> {
    serve_mounted(config, listener, None)
}

/// Serves on an already bound listener, with one more WebSocket protocol
/// (for a test: see [`crate::testing`]).
pub(crate) fn serve_mounted(
    config: Config,
    listener: TcpListener,
    mount: Option<Mount>,
) -> anyhow::Result<Running> {
    let parts = Parts::build(&config)?;
    launch(config, parts, listener, mount)
}

/// The shared state of a crier: hub, broker (started, with its tasks and
/// the hub's sweeper on `background`) and the parts.
fn assemble(
    config: Config,
    parts: Parts,
    background: &TaskTracker,
    stop_background: &CancellationToken,
    mount: Option<Mount>,
) -> anyhow::Result<Arc<App>> {
    let Parts {
        metrics,
        policy,
        auth,
        origins,
    } = parts;
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let ledger = config
        .events
        .stream
        .is_some()
        .then(|| Arc::new(crate::events::Ledger::default()));
    let hub = Arc::new(Hub::new(
        control_tx,
        config.redis.linger,
        config.redis.subscribe_timeout,
        config.ws.compression_contexts,
        ledger.clone(),
        metrics.clone(),
    ));
    let broker = Broker::start(
        &config,
        Arc::clone(&hub) as Arc<dyn crate::broker::Fanout>,
        Arc::clone(&policy),
        control_rx,
        metrics.clone(),
        background,
        stop_background.clone(),
    )?;
    background.spawn(Arc::clone(&hub).sweep_until(stop_background.clone()));
    let mut app = App::new(config, hub, broker, policy, auth, origins, metrics);
    app.mount = mount;
    Ok(Arc::new(app))
}

fn launch(
    config: Config,
    parts: Parts,
    listener: TcpListener,
    mount: Option<Mount>,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr()?;
    // Background parts (broker, sweeper) stop after every client has left.
    let background = TaskTracker::new();
    let stop_background = CancellationToken::new();
    let app = assemble(config, parts, &background, &stop_background, mount)?;
    let config = &app.config;
    let redis = crate::broker::describe(&config.redis);
    // Where a browser on this machine finds the demo page.
    let demo = config.dev.then(|| {
        let mut local = addr;
        if local.ip().is_unspecified() {
            local.set_ip(match local.ip() {
                std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{local}/")
    });
    tracing::info!(
        %addr,
        broker = app.delivery.broker.kind(),
        redis,
        channel_rules = config.channels.len(),
        auth = auth_modes(config),
        dev = config.dev,
        demo,
        "crier listening"
    );
    if config.dev {
        tracing::warn!("dev mode: every channel is open to anyone; do not expose this instance");
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // `main` has raised the soft limit by now: the budget is what is left.
    let fds = crate::fdlimit::current();
    if let Some(warning) = fds.and_then(|l| crate::fdlimit::warning(config, &l)) {
        tracing::warn!("{warning}");
    }
    let budget = Budget::new(
        fds.map_or(u64::MAX, |l| l.soft),
        crate::fdlimit::reserve(config),
    );

    // Heartbeats are late by at most a quarter of the shortest period.
    let shortest = app.config.sse.heartbeat.min(app.config.ws.ping_interval);
    let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let clock_app = Arc::clone(&app);
    let stop_clock = stop_background.clone();
    background.spawn(async move {
        clock_app
            .process
            .lifecycle
            .run_clock(tick, stop_clock)
            .await
    });
    if let Some(jwks) = app.gate.auth.jwks() {
        background.spawn(Arc::clone(jwks).run(stop_background.clone()));
    }
    let beat_app = Arc::clone(&app);
    let stop_beats = stop_background.clone();
    background.spawn(async move {
        let app = &beat_app;
        crate::presence::run(
            &app.delivery.presence,
            &app.delivery.broker,
            &app.config.presence,
            stop_beats,
        )
        .await
    });
    let stream = crate::broker::events::Stream::of(&app.config);
    if let (Some(ledger), Some(stream)) = (&app.delivery.ledger, stream) {
        let webhooks = crate::events::webhooks::Webhooks::new(&app.config, app.metrics.clone())
            .map_err(|e| anyhow::anyhow!("events.webhook_ca_file: {e}"))?;
        if let Some(webhooks) = webhooks {
            let (hooks_app, stream, stop) =
                (Arc::clone(&app), stream.clone(), stop_background.clone());
            background.spawn(async move {
                let consumer = format!("{:08x}", hooks_app.process.instance);
                Arc::new(webhooks)
                    .run(&hooks_app.delivery.broker, &stream, consumer, stop)
                    .await
            });
        }
        let (ledger, events_app) = (Arc::clone(ledger), Arc::clone(&app));
        let stop_events = stop_background.clone();
        background.spawn(async move {
            let app = &events_app;
            let reporting = crate::events::Reporting {
                stream,
                instance: app.process.instance,
                beat: app.config.presence.heartbeat,
                webhooks: app.config.has_webhooks(),
            };
            crate::events::run(
                ledger,
                &app.delivery.broker,
                &app.metrics,
                reporting,
                stop_events,
            )
            .await
        });
    }
    let (counts_app, stop_counts) = (Arc::clone(&app), stop_background.clone());
    background.spawn(crate::transport::pusher::subscription_counts(
        counts_app,
        stop_counts,
    ));
    let sigterm = CancellationToken::new();
    let done = tokio::spawn(run(
        app,
        listener,
        budget,
        sigterm.clone(),
        background,
        stop_background,
    ));
    Ok(Running {
        addr,
        sigterm,
        done,
    })
}

async fn run(
    app: Arc<App>,
    listener: TcpListener,
    budget: Budget,
    sigterm: CancellationToken,
    background: TaskTracker,
    stop_background: CancellationToken,
) {
    let accepting = tokio::spawn(accept_loop(Arc::clone(&app), listener, budget));

    sigterm.cancelled().await;
    let shutdown = &app.config.shutdown;
    tracing::info!(grace = ?shutdown.grace, drain = ?shutdown.drain, "shutdown: not ready, still serving");
    app.process.lifecycle.begin_shutdown();
    tokio::time::sleep(shutdown.grace).await;

    tracing::info!("draining: clients are told to reconnect");
    app.process.lifecycle.begin_drain();
    let _ = accepting.await;
    app.process.tasks.close();
    // Every connection leaves by itself within the drain window; the margin
    // covers the last writes, and a signed-in Pusher user's linger before
    // it is offline for its watchers.
    let deadline =
        shutdown.drain + Duration::from_secs(1) + crate::transport::pusher::WATCHLIST_LINGER;
    if tokio::time::timeout(deadline, app.process.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = app.process.tasks.len(),
            "connections still open after the drain, closing them"
        );
    }
    stop_background.cancel();
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), background.wait()).await;
    tracing::info!("stopped");
}

/// Accepts until the drain begins. One bad connection never stops it.
///
/// Every socket takes a slot of the descriptor `budget` (see
/// [`crate::fdlimit`]); one accepted with no slot free is answered by
/// [`overflow`], so `/healthz` answers even at the limit. Should accept
/// still fail for want of descriptors (or memory), the loop backs off and
/// says so at most once per [`AcceptErrors::REPORT_EVERY`].
async fn accept_loop(app: Arc<App>, listener: TcpListener, budget: Budget) {
    // HTTP/1.1 only: what browsers speak to crier (TLS, and with it HTTP/2,
    // ends at the ingress), and the upgrade WebSocket needs. Leaving out
    // hyper-util's HTTP/2 detection saves memory on every connection.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.ws.handshake_timeout)
        .max_header_size(crate::http::MAX_HEAD_BYTES);
    let drain = app.process.lifecycle.drain_started().clone();
    let mut errors = AcceptErrors::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_connection_error(&e) => {
                    // That client gave up before we took it: nothing to wait for.
                    tracing::debug!(error = %e, "accept: connection already gone");
                    continue;
                }
                Err(e) => {
                    let (pause, report) = errors.failed(std::time::Instant::now());
                    if let Some(failures) = report {
                        let hint = if is_out_of_descriptors(&e) {
                            "out of file descriptors: raise the open-file limit or lower \
                             limits.max_connections"
                        } else {
                            "backing off"
                        };
                        tracing::warn!(error = %e, failures, backoff = ?pause, "accept failed: {hint}");
                    }
                    tokio::select! {
                        _ = drain.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            },
        };
        errors.accepted();
        match budget.admit() {
            Admit::Serve(slot) => {
                let _ = stream.set_nodelay(true);
                let task = connection(Arc::clone(&app), stream, peer, slot, builder.clone());
                app.process.tasks.spawn(task);
            }
            Admit::Overflow(permit) => {
                app.process
                    .tasks
                    .spawn(overflow(Arc::clone(&app), stream, permit));
            }
            Admit::Close => drop(stream),
        }
    }
}

/// Errors of one connection that ended before it was accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    )
}

/// `EMFILE` (this process's limit) or `ENFILE` (the system's).
fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // The same numbers on Linux and the BSDs.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(ENFILE | EMFILE))
}

/// Accept failures in a row: how long to back off (10 ms doubling to 1 s,
/// as pingora does) and when to say so. A process at its descriptor limit
/// fails every accept until a connection closes; one log line per failure
/// would flood the log, so one line per [`Self::REPORT_EVERY`] carries the
/// count since the last.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// The next pause; zero after a successful accept.
    backoff: Duration,
    /// Failures not yet reported.
    unreported: u64,
    /// When the last line was logged.
    reported: Option<std::time::Instant>,
}

impl AcceptErrors {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const REPORT_EVERY: Duration = Duration::from_secs(10);

    /// One more failure at `now`: the pause before the next accept, and
    /// the number of failures to report now, if it is time.
    fn failed(&mut self, now: std::time::Instant) -> (Duration, Option<u64>) {
        self.backoff = (self.backoff * 2).clamp(Self::FIRST, Self::MAX);
        self.unreported += 1;
        let due = self
            .reported
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::REPORT_EVERY);
        let report = due.then(|| {
            self.reported = Some(now);
            std::mem::take(&mut self.unreported)
        });
        (self.backoff, report)
    }

    /// An accept went through: the next failure starts the backoff again
    /// (the report interval stays).
    fn accepted(&mut self) {
        self.backoff = Duration::ZERO;
    }
}

/// How long a socket accepted beyond the descriptor budget may stay.
const OVERFLOW_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one socket accepted beyond the descriptor budget: `/healthz` and
/// `/readyz` as usual, so probes do not restart a pod that is merely full,
/// and 503 for everything else; then the connection closes.
async fn overflow(app: Arc<App>, stream: TcpStream, _permit: tokio::sync::OwnedSemaphorePermit) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(OVERFLOW_TIMEOUT)
        .max_header_size(crate::http::MAX_HEAD_BYTES);
    let service = service_fn(move |req: Request<Incoming>| {
        let app = Arc::clone(&app);
        async move {
            Ok::<_, Infallible>(match (req.method(), req.uri().path()) {
                (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
                (&Method::GET, "/readyz") => readyz(&app),
                _ => crate::http::rejected(&app.metrics, &Refusal::AtCapacity),
            })
        }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(OVERFLOW_TIMEOUT, conn).await;
}

/// Serves one TCP connection with hyper, until it ends or a stream takes
/// it over (see [`crate::link`]).
async fn connection(
    app: Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    builder: http1::Builder,
) {
    let stall = StallTimeout::new(app.config.sse.write_timeout);
    let handoff = Arc::new(Handoff::default());
    let info = ConnInfo {
        peer,
        handoff: Arc::clone(&handoff),
        slot,
    };
    let drain = app.process.lifecycle.drain_started().clone();
    let service_app = Arc::clone(&app);
    let service = service_fn(move |req| {
        let app = Arc::clone(&service_app);
        let info = info.clone();
        async move { Ok::<_, Infallible>(route(app, req, info).await) }
    });
    let guarded = StallGuard::new(stream, stall.clone());
    let mut conn = builder
        .serve_connection(TokioIo::new(guarded), service)
        .with_upgrades();
    let mut draining = false;
    loop {
        tokio::select! {
            result = &mut conn => {
                match result {
                    Err(e) if crate::stall::is_stall(&e) => {
                        app.metrics.slow_client_disconnects.inc();
                        tracing::info!(client.addr = %peer, "client stopped reading: connection closed");
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, client.addr = %peer, "connection ended with an error");
                    }
                    Ok(()) => {}
                }
                return;
            }
            _ = handoff.signalled() => break,
            _ = drain.cancelled(), if !draining => {
                // Idle keep-alive connections close now; open streams end
                // at their turn in the drain.
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    }
    // A stream's head is encoded: once hyper has flushed it, the socket
    // leaves hyper for the stream's own task.
    let Some(takeover) = handoff.take() else {
        return;
    };
    if !head_written(&mut conn, &stall).await {
        return;
    }
    if let Some(parts) = conn.into_parts() {
        takeover(parts.io.into_inner().into_inner());
    }
}

/// Drives `conn`, whose response head hyper has just encoded into its own
/// buffer (the stream's body signalled), until that head is on the socket:
/// hyper's writes went through the guard and a flush, which hyper makes only
/// once its buffer is empty, reached the socket after the head was encoded.
/// `false`: the connection ended first. Only then may the socket leave
/// hyper: hyper's write buffer does not come with it, and a head still in
/// it would be lost, the client getting a body with no status line.
async fn head_written<C: Future + Unpin>(conn: &mut C, stall: &StallTimeout) -> bool {
    // A flush from before the head was encoded (the request's, or one the
    // head's first write did not follow because the socket was full) says
    // nothing about the head.
    stall.expect_flush();
    std::future::poll_fn(|cx| {
        if !stall.flushed() && Pin::new(&mut *conn).poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        if stall.flushed() {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    })
    .await
}

async fn route(app: Arc<App>, req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(&app),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(full(app.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        // The handlers' futures are boxed: hyper keeps room for the
        // request future for as long as the connection lives, and a
        // handler's path through admission, subscribe and resume is deep
        // but needed only once.
        (&Method::GET, "/sse") => Box::pin(sse::handle(app, req, info)).await,
        (&Method::GET, "/ws") => Box::pin(ws::handle(app, req, info)).await,
        // A plain `EventSource` needs no preflight; a fetch-based SSE client
        // sending `Authorization` or `Last-Event-ID` does.
        (&Method::OPTIONS, "/sse") => crate::origin::preflight(
            &app.gate.origins,
            req.headers(),
            "GET",
            "authorization, last-event-id, cache-control",
        ),
        (&Method::OPTIONS, "/api/publish") => crate::origin::preflight(
            &app.gate.origins,
            req.headers(),
            "POST",
            "authorization, content-type",
        ),
        (&Method::POST, "/api/publish") => Box::pin(crate::api::publish(app, req, info)).await,
        (&Method::GET, "/api/presence") => Box::pin(crate::api::presence(app, req, info)).await,
        (&Method::GET, path) if app.mount.is_some_and(|m| m.path == path) => {
            let handle = app.mount.map(|m| m.handle);
            match handle {
                Some(handle) => handle(app, req, info).await,
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
        (&Method::GET, path) if path.starts_with("/app/") && !app.pusher.is_empty() => {
            let key = path["/app/".len()..].to_owned();
            Box::pin(crate::transport::pusher::handle(app, req, info, &key)).await
        }
        (_, path) if path.starts_with("/apps/") && !app.pusher.is_empty() => {
            Box::pin(crate::api::pusher::handle(app, req)).await
        }
        (&Method::GET, "/") if app.config.dev => {
            let mut r = Response::new(full(DEMO_PAGE));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/") => text(
            StatusCode::OK,
            "crier event gateway: /sse, /ws, /api/publish, /healthz, /readyz, /metrics\n",
        ),
        (_, "/healthz" | "/readyz" | "/metrics" | "/sse" | "/ws" | "/api/publish") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn readyz(app: &App) -> Response<Body> {
    if app.process.lifecycle.is_shutting_down() {
        text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !app.delivery.broker.health().is_up() {
        text(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::link::HandoffBody;
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use std::task::{Context, Waker};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A client's connection as crier's side sees it: the requests arrive
    /// at once, and the socket takes one write, then is full (it takes
    /// nothing) until the test says it drained.
    #[derive(Default)]
    struct Socket {
        requests: Vec<u8>,
        state: Arc<Mutex<Wire>>,
    }

    #[derive(Default)]
    struct Wire {
        written: Vec<u8>,
        writes_taken: usize,
        drained: bool,
        waker: Option<Waker>,
    }

    impl Wire {
        fn drain(&mut self) {
            self.drained = true;
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }

    impl AsyncRead for Socket {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.requests.is_empty() {
                // An open connection whose client says nothing more.
                return Poll::Pending;
            }
            let requests = std::mem::take(&mut self.requests);
            buf.put_slice(&requests);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let mut wire = self.state.lock().expect("wire");
            if wire.writes_taken >= 1 && !wire.drained {
                wire.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            wire.writes_taken += 1;
            wire.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Issue 20: a stream's socket left hyper with its head still in
    /// hyper's buffer (the socket was momentarily full when hyper wrote it,
    /// and an earlier flush was taken for the head's), so the client got
    /// body chunks with no status line. Here a first response on the
    /// keep-alive connection is flushed, then the stream's head meets a
    /// full socket: the socket must not leave hyper before the head is on it.
    #[tokio::test]
    async fn a_stream_leaves_hyper_only_once_its_head_is_on_the_socket() {
        let state = Arc::new(Mutex::new(Wire::default()));
        let socket = Socket {
            requests: b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n\
                        GET /sse HTTP/1.1\r\nhost: x\r\n\r\n"
                .to_vec(),
            state: Arc::clone(&state),
        };
        let stall = StallTimeout::new(Duration::from_secs(5));
        let handoff = Arc::new(Handoff::default());
        let service_handoff = Arc::clone(&handoff);
        let service = service_fn(move |req: Request<Incoming>| {
            let handoff = Arc::clone(&service_handoff);
            async move {
                let response: Response<Body> = if req.uri().path() == "/sse" {
                    Response::new(HandoffBody(handoff).boxed_unsync())
                } else {
                    Response::new(full("ok\n"))
                };
                Ok::<_, Infallible>(response)
            }
        });
        let guarded = StallGuard::new(socket, stall.clone());
        let mut conn = http1::Builder::new().serve_connection(TokioIo::new(guarded), service);
        tokio::select! {
            _ = &mut conn => panic!("the connection ended"),
            () = handoff.signalled() => {}
        }
        let before = String::from_utf8_lossy(&state.lock().expect("wire").written).into_owned();
        assert!(
            before.starts_with("HTTP/1.1 200 OK\r\n") && before.matches("HTTP/1.1").count() == 1,
            "only the first response is out: {before:?}"
        );
        let (written, ()) = tokio::join!(head_written(&mut conn, &stall), async {
            state.lock().expect("wire").drain();
        });
        assert!(written, "the connection is still open");
        drop(conn.into_parts());
        let wire = state.lock().expect("wire");
        let text = String::from_utf8_lossy(&wire.written);
        assert_eq!(
            text.matches("HTTP/1.1 200 OK\r\n").count(),
            2,
            "the stream's head went out before the socket left hyper: {text:?}"
        );
    }

    /// A configuration that loads: `Config::validate` has nothing against
    /// it, only building the parts can refuse it.
    fn load(toml: &str) -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, toml).expect("write config");
        Config::load(Some(&path), std::iter::empty(), &Overrides::default()).expect("loads")
    }

    /// At the descriptor limit every accept fails until a connection
    /// closes: the pause doubles from 10 ms to 1 s, and one line per 10 s
    /// carries the count, not one line per failure.
    #[test]
    fn accept_failures_back_off_and_are_reported_with_a_count() {
        let start = std::time::Instant::now();
        let mut errors = AcceptErrors::default();
        let (pause, report) = errors.failed(start);
        assert_eq!((pause, report), (Duration::from_millis(10), Some(1)));
        let mut pauses = Vec::new();
        for i in 1..=200u32 {
            let (pause, report) = errors.failed(start + Duration::from_millis(i.into()));
            assert_eq!(report, None, "failure {i} reported");
            pauses.push(pause);
        }
        assert_eq!(pauses[0], Duration::from_millis(20));
        assert_eq!(*pauses.last().expect("some"), Duration::from_secs(1));
        let (_, report) = errors.failed(start + Duration::from_secs(10));
        assert_eq!(report, Some(201), "the failures since the last line");
        errors.accepted();
        let (pause, report) = errors.failed(start + Duration::from_secs(11));
        assert_eq!((pause, report), (Duration::from_millis(10), None));
    }

    /// A configuration built in code, never loaded, is validated all the
    /// same before any part is built: the parts rely on it (the
    /// authenticator on `auth.query_token` coming with `[auth.jwt]`).
    #[test]
    fn a_configuration_built_in_code_is_validated_before_the_parts() {
        let mut config = Config::default();
        config.auth.query_token = true;
        let built = Parts::build(&config).err().map(|e| e.to_string());
        let checked = check(&config).err().map(|e| e.to_string());
        let said = "invalid configuration: auth.query_token: needs [auth.jwt]";
        assert_eq!(built.as_deref(), Some(said));
        assert_eq!(checked.as_deref(), Some(said));
    }

    #[tokio::test]
    async fn building_the_parts_names_the_field_and_check_config_agrees() {
        let cases = [
            ("[redis]\nurl = \"http://x\"\n", "redis.url: "),
            (
                "[redis.cluster]\nnodes = [\"redis://a:6379\", \"c:6379\"]\n",
                "redis.cluster.nodes[1]: ",
            ),
            (
                "[redis.sentinel]\nmaster = \"m\"\nnodes = [\"http://s:26379\"]\n",
                "redis.sentinel.nodes[0]: ",
            ),
            (
                "[[channels]]\npattern = \"a\"\nsubscribe = \"anyone\"\n\
                 [[channels]]\npattern = \"a*b\"\nsubscribe = \"anyone\"\n",
                "channels[1].pattern: ",
            ),
            (
                "[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"short\"\n",
                "auth.jwt.secret: ",
            ),
            (
                "[auth.session]\nsecrets = [\"s\"]\n",
                "auth.session.redis_url: ",
            ),
            (
                "allowed_origins = [\"https://a.com\", \"a.com\"]\n",
                "allowed_origins[1]: ",
            ),
        ];
        for (toml, field) in cases {
            let config = load(toml);
            let checked = check(&config).expect_err(toml).to_string();
            assert!(
                checked.starts_with(&format!("invalid configuration: {field}")),
                "{toml}: {checked}"
            );
            let built = Parts::build(&config)
                .err()
                .unwrap_or_else(|| panic!("{toml}: built"))
                .to_string();
            assert_eq!(built, checked, "{toml}");
        }
        let good = load(
            "[redis]\nurl = \"redis://127.0.0.1:1\"\n\
             [[channels]]\npattern = \"user:{user}\"\nsubscribe = \"user\"\n\
             [auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"a-jwt-secret-of-at-least-32-bytes!!\"\n\
             [auth.session]\nsecrets = [\"s\"]\n",
        );
        assert!(check(&good).is_ok());
        assert!(Parts::build(&good).is_ok());
    }
}

/// Issue 22: the channel rules are walked once per subscribe, and never
/// per publication: the rule a subscribe resolves is kept on the hub's
/// entry for the channel, and a publication is decoded with it there.
#[cfg(test)]
mod rule_walks {
    use super::*;
    use crate::metrics::Transport;
    use crate::session::{admit, Event, Request, Session, Start, Wire};

    #[tokio::test]
    async fn a_subscribe_walks_the_rules_once_and_a_publication_never() {
        let config: Config = toml::from_str(
            "[[channels]]\npattern = \"ops:*\"\nsubscribe = \"anyone\"\nevent_field = \"/kind\"\n\
             [[channels]]\npattern = \"news:*\"\nsubscribe = \"anyone\"\n\
             history = { size = 10, ttl = \"1m\" }\nevent_field = \"/what\"\n",
        )
        .expect("config");
        let background = TaskTracker::new();
        let stop = CancellationToken::new();
        let parts = Parts::build(&config).expect("parts");
        let app = assemble(config, parts, &background, &stop, None).expect("app");
        let uri: http::Uri = "/ws".parse().expect("uri");
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let headers = http::HeaderMap::new();
        let admitted = admit(&app, Transport::Ws, &headers, &uri, peer.ip(), &[]);
        let wire = Wire {
            transport: Transport::Ws,
            heartbeat: Duration::from_secs(60),
            idle_timeout: None,
            replay_overhead: 0,
            replay_bytes: |p| p.frame.len(),
            peer,
        };
        let mut session = Session::open(Arc::clone(&app), admitted.await.expect("admitted"), wire);
        let walks = || app.delivery.policy.walks();

        let before = walks();
        session
            .subscribe(Request::new("ops:1"))
            .await
            .expect("ops:1");
        assert_eq!(walks() - before, 1, "one walk for a subscribe");
        let history = Request {
            start: Start::Oldest,
            ..Request::new("news:1")
        };
        session.subscribe(history).await.expect("news:1");
        assert_eq!(walks() - before, 2, "one walk for a subscribe with history");

        let subscribed = walks();
        for n in 0..3 {
            app.delivery
                .broker
                .publish("ops:1", format!(r#"{{"kind":"k{n}"}}"#).as_bytes())
                .await
                .expect("published");
            app.delivery
                .broker
                .publish("news:1", format!(r#"{{"what":"w{n}"}}"#).as_bytes())
                .await
                .expect("published");
        }
        let mut events = Vec::new();
        while events.len() < 6 {
            match tokio::time::timeout(Duration::from_secs(5), session.next()).await {
                Ok(Event::Deliver(p)) => events.push(p.event.clone().expect("an event type")),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => panic!("only {events:?} delivered"),
            }
        }
        assert_eq!(
            events,
            ["k0", "w0", "k1", "w1", "k2", "w2"],
            "each rule's event field"
        );
        assert_eq!(walks(), subscribed, "no walk for six publications");
        drop(session);
        stop.cancel();
    }
}
