//! Who is connecting: bearer tokens (JWT) and the app's session cookie.
//!
//! Credentials are tried in a fixed order: `Authorization: Bearer`, the
//! session cookie, then `?token=` where enabled (WebSocket clients may also
//! send an `auth` message). A credential that is presented but wrong is
//! refused with a reason; its value never reaches a log line. A connection
//! then carries its [`Principal`] and a [`Watch`] that tells the transport
//! when the credential is about to end, has ended, or was revoked.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Uri};
use serde_json::{Map, Value};
use tokio::time::{Instant, Interval, Sleep};

use crate::config::Config;
use crate::metrics::Metrics;

pub(crate) mod cookie;
pub(crate) mod jwks;
mod jwt;
mod time;
pub(crate) mod webhook;

pub use cookie::CookieStore;
pub use jwt::JwtVerifier;

/// Who is asking. `Principal::default()` is anonymous.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// The user id, when authenticated.
    pub user: Option<String>,
    /// Token claims, for `{claim.NAME}` in channel rules.
    pub claims: Map<String, Value>,
    /// Channels (names or `prefix*`) the token grants, for `claim` rules.
    pub grants: Vec<String>,
    /// When the credential ends.
    pub expires_at: Option<SystemTime>,
    /// The session behind a cookie login, re-read periodically.
    pub session: Option<SessionRef>,
}

impl Principal {
    /// Nothing known: no user, claims, grants, expiry or session.
    fn is_anonymous(&self) -> bool {
        self.user.is_none()
            && self.claims.is_empty()
            && self.grants.is_empty()
            && self.expires_at.is_none()
            && self.session.is_none()
    }

    /// The value of `{claim.NAME}`: a string or a number claim.
    pub fn claim(&self, name: &str) -> Option<String> {
        match self.claims.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// A user id read from a token's claim or a session's field: a non-empty
/// string, or a number (`"sub": 42` is user `42`).
pub(crate) fn user_id(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The token of an `Authorization: Bearer <token>` header; `None` for any
/// other scheme or an unreadable value.
pub(crate) fn bearer(value: &http::HeaderValue) -> Option<&str> {
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `presented` equals one of `secrets`, compared in constant time
/// and against every one (no early exit that would time which matched).
pub(crate) fn matches_a_secret<S: AsRef<[u8]>>(
    presented: &[u8],
    secrets: impl IntoIterator<Item = S>,
) -> bool {
    use subtle::ConstantTimeEq;
    let found = secrets
        .into_iter()
        .fold(subtle::Choice::from(0), |found, secret| {
            found | secret.as_ref().ct_eq(presented)
        });
    bool::from(found)
}

/// A login to recheck: a session id in the Redis store, or what the
/// webhook was given. Not `Debug`-printable: it is a bearer secret.
#[derive(Clone)]
pub enum SessionRef {
    /// A session id in the app's Redis session store.
    Store(String),
    /// The credential the app's webhook identified.
    Webhook(Arc<webhook::Credential>),
}

impl std::fmt::Debug for SessionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionRef(<redacted>)")
    }
}

/// Why a credential was refused. The reason is what the client sees (in
/// `WWW-Authenticate` and the JSON body) and what metrics count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No credential, where one is needed.
    Missing,
    /// Not a token, not a cookie: cannot be parsed.
    Malformed,
    /// Past its `exp` or the session's expiry.
    Expired,
    /// Before its `nbf`.
    NotYetValid,
    /// Signature does not verify.
    BadSignature,
    /// `alg` not on the allow-list (including `none`).
    BadAlgorithm,
    /// `iss` is not the configured issuer.
    BadIssuer,
    /// `aud` does not include the configured audience.
    BadAudience,
    /// `exp` or the user claim is missing.
    MissingClaim,
    /// The token names a key (`kid`) the IdP's key set does not have,
    /// even after fetching it again.
    UnknownKey,
    /// A time (`exp`, `nbf`, `iat`, a session's expiry) that is not a
    /// number of seconds between 1970 and 9999.
    InvalidClaim,
    /// The session id is not in the store (logged out, expired, made up).
    UnknownSession,
    /// The session exists but holds no user.
    NotLoggedIn,
    /// This kind of credential is not configured.
    NotAccepted,
    /// A token for another user on an already authenticated connection.
    UserMismatch,
    /// The session store could not be asked (503, not 401).
    StoreUnavailable,
    /// The app's session webhook gave no usable answer: down, slow, a 5xx,
    /// nonsense (503, not 401).
    WebhookUnavailable,
}

impl Failure {
    /// The short reason shown to clients and counted in metrics.
    pub const fn reason(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::BadSignature => "bad_signature",
            Failure::BadAlgorithm => "bad_algorithm",
            Failure::BadIssuer => "bad_issuer",
            Failure::BadAudience => "bad_audience",
            Failure::MissingClaim => "missing_claim",
            Failure::InvalidClaim => "invalid_claim",
            Failure::UnknownKey => "unknown_key",
            Failure::UnknownSession => "unknown_session",
            Failure::NotLoggedIn => "not_logged_in",
            Failure::NotAccepted => "not_accepted",
            Failure::UserMismatch => "user_mismatch",
            Failure::StoreUnavailable => "store_unavailable",
            Failure::WebhookUnavailable => "webhook_unavailable",
        }
    }

    /// Whether the credential could not be judged at all (what would judge
    /// it is down): the client may try again, and an open connection keeps
    /// its credential until the next recheck.
    pub(crate) const fn is_outage(self) -> bool {
        matches!(
            self,
            Failure::StoreUnavailable | Failure::WebhookUnavailable
        )
    }
}

/// Verifies credentials; built once from the configuration.
pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    session: Option<CookieStore>,
    webhook: Option<webhook::Webhook>,
    query_token: bool,
    expiring_notice: Duration,
    metrics: Metrics,
}

impl Authenticator {
    /// Loads keys and connects (lazily) to the session store. The error
    /// names the offending field. `config` has passed
    /// [`Config::validate`] (the server validates before it builds its
    /// parts): `auth.query_token` comes with `[auth.jwt]`.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Self, String> {
        let auth = &config.auth;
        let jwt = auth
            .jwt
            .as_ref()
            .map(|jwt| JwtVerifier::new(jwt, metrics.clone()))
            .transpose()?;
        let session = auth
            .session
            .as_ref()
            .map(|s| CookieStore::new(s, &config.redis))
            .transpose()?;
        let webhook = auth
            .webhook
            .as_ref()
            .map(|hook| webhook::Webhook::new(hook, metrics.clone()))
            .transpose()?;
        Ok(Self {
            jwt,
            session,
            webhook,
            query_token: auth.query_token,
            expiring_notice: auth.expiring_notice,
            metrics,
        })
    }

    /// What [`Authenticator::new`] checks, without a runtime and without a
    /// session store connection (`crier check-config`): the JWT keys are
    /// loaded, the session store's settings and Redis URL checked. Like
    /// `new`, it takes a validated `config`.
    pub fn check(config: &Config) -> Result<(), String> {
        let auth = &config.auth;
        if let Some(jwt) = &auth.jwt {
            JwtVerifier::new(jwt, Metrics::new())?;
        }
        if let Some(session) = &auth.session {
            CookieStore::check(session, &config.redis)?;
        }
        if let Some(hook) = &auth.webhook {
            webhook::Webhook::new(hook, Metrics::new())?;
        }
        Ok(())
    }

    /// The principal behind a request's credentials: `Ok(None)` when it
    /// carries none, an error when one is presented and wrong.
    pub async fn from_request(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        peer: std::net::IpAddr,
    ) -> Result<Option<Principal>, Failure> {
        let result = self.identify(headers, uri, peer).await;
        if let Err(failure) = &result {
            self.count(*failure);
        }
        result
    }

    async fn identify(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        peer: std::net::IpAddr,
    ) -> Result<Option<Principal>, Failure> {
        // A bearer token goes to the JWT verifier, or to the app when it
        // takes them (`Authorization` forwarded) and no verifier is set.
        let hook_takes_bearer =
            self.jwt.is_none() && self.webhook.as_ref().is_some_and(|h| h.takes_bearer());
        if let (Some(value), false) = (headers.get(http::header::AUTHORIZATION), hook_takes_bearer)
        {
            let token = bearer(value).ok_or(Failure::Malformed)?;
            return self.jwt_verify(token).await.map(Some);
        }
        if let Some(store) = &self.session {
            if let Some(id) = store.session_id(headers) {
                return store.load(&id?).await.map(Some);
            }
        }
        if let Some(hook) = &self.webhook {
            if let Some(credential) = hook.credential(headers, peer) {
                return hook.identify(Arc::new(credential)).await.map(Some);
            }
        }
        if self.query_token {
            if let Some(token) = crate::http::query_param(uri, "token") {
                return self.jwt_verify(&token).await.map(Some);
            }
        }
        Ok(None)
    }

    /// Verifies a token from a WebSocket `auth` message.
    pub async fn verify_token(&self, token: &str) -> Result<Principal, Failure> {
        let result = self.jwt_verify(token).await;
        if let Err(failure) = &result {
            self.count(*failure);
        }
        result
    }

    async fn jwt_verify(&self, token: &str) -> Result<Principal, Failure> {
        self.jwt
            .as_ref()
            .ok_or(Failure::NotAccepted)?
            .verify(token)
            .await
    }

    /// The IdP's key set, when configured: the server keeps it fresh.
    pub fn jwks(&self) -> Option<&Arc<jwks::Jwks>> {
        self.jwt.as_ref().and_then(|jwt| jwt.jwks())
    }

    /// Counts a refusal by reason.
    pub fn count(&self, failure: Failure) {
        self.metrics
            .auth_failures
            .with_label_values(&[failure.reason()])
            .inc();
    }
}

/// What a connection must do about its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthEvent {
    /// The credential ends in `in_secs` seconds: the client should refresh.
    Expiring {
        /// Seconds left.
        in_secs: u64,
    },
    /// The credential has ended (expired or revoked): close.
    Expired,
}

/// Follows one connection's credential: its expiry, and for session logins
/// a periodic re-read of the session (so a logout ends the connection).
///
/// Polled by hand ([`Watch::poll_next`]) rather than an `async fn`: an
/// idle connection's task carries the future it waits in, and an
/// `async fn` would reserve room for both of its timers in every
/// connection. Here the clocks are out of line, and exist only for a
/// credential that expires or is re-read.
pub(crate) struct Watch {
    auth: Arc<Authenticator>,
    /// Out of line, and none for an anonymous connection: a principal is
    /// five collections wide, and every idle connection's task would
    /// carry them (112 bytes, most often empty).
    principal: Option<Box<Principal>>,
    clocks: Option<Box<Clocks>>,
}

/// The clocks of a credential that expires or whose session is re-read.
struct Clocks {
    /// When the credential ends, on the monotonic clock.
    deadline: Option<Instant>,
    notified: bool,
    /// The timer of the next notice or of the end, once polled.
    timer: Option<Pin<Box<Sleep>>>,
    recheck: Option<Interval>,
    /// A session re-read in flight. Kept here, not in a future: transports
    /// poll the watch inside `select!`, and on a busy channel a delivery
    /// would otherwise cancel every re-read.
    reading: Option<SessionRead>,
}

type SessionRead = Pin<Box<dyn Future<Output = Result<Principal, Failure>> + Send>>;

impl Watch {
    /// Starts watching `principal`.
    pub(crate) fn new(auth: Arc<Authenticator>, principal: Principal) -> Self {
        let mut watch = Self {
            auth,
            principal: None,
            clocks: None,
        };
        watch.replace(principal);
        watch
    }

    /// The current principal.
    pub(crate) fn principal(&self) -> &Principal {
        or_anonymous(self.principal.as_deref())
    }

    /// A fresh credential (WebSocket `auth`): the clock starts again.
    pub(crate) fn replace(&mut self, principal: Principal) {
        let every = match (&principal.session, &self.auth.session, &self.auth.webhook) {
            (Some(SessionRef::Store(_)), Some(store), _) => Some(store.recheck()),
            (Some(SessionRef::Webhook(_)), _, Some(hook)) => Some(hook.recheck()),
            _ => None,
        };
        let recheck = every.map(|every| {
            let mut interval = tokio::time::interval_at(Instant::now() + every, every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let deadline = principal.expires_at.map(instant_at);
        self.clocks = (deadline.is_some() || recheck.is_some()).then(|| {
            Box::new(Clocks {
                deadline,
                notified: false,
                timer: None,
                recheck,
                reading: None,
            })
        });
        self.principal = (!principal.is_anonymous()).then(|| Box::new(principal));
    }

    /// Ready at the next thing the connection must act on; pending
    /// forever for an anonymous or never-expiring credential. Cancel-safe:
    /// a re-read in flight is kept here, and a notice is marked sent only
    /// when it is returned.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<AuthEvent> {
        loop {
            let Some(clocks) = self.clocks.as_deref_mut() else {
                return Poll::Pending;
            };
            if let Some(read) = clocks.reading.as_mut() {
                if let Poll::Ready(read) = read.as_mut().poll(cx) {
                    clocks.reading = None;
                    match self.judge(read) {
                        Some(event) => return Poll::Ready(event),
                        None => continue,
                    }
                }
            } else if let Some(recheck) = clocks.recheck.as_mut() {
                if recheck.poll_tick(cx).is_ready() {
                    clocks.reading =
                        start_read(&self.auth, or_anonymous(self.principal.as_deref()));
                    continue;
                }
            }
            let Some(deadline) = clocks.deadline else {
                return Poll::Pending;
            };
            let notice = (!clocks.notified).then(|| {
                deadline
                    .checked_sub(self.auth.expiring_notice)
                    .unwrap_or(deadline)
            });
            let at = notice.unwrap_or(deadline);
            let timer = clocks
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            ready!(timer.as_mut().poll(cx));
            if notice.is_none() {
                return Poll::Ready(AuthEvent::Expired);
            }
            clocks.notified = true;
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            return Poll::Ready(AuthEvent::Expiring { in_secs: left });
        }
    }

    /// A re-read session: gone or logged out ends the connection; an
    /// outage of the store or the webhook does not (the next recheck tries
    /// again).
    fn judge(&mut self, read: Result<Principal, Failure>) -> Option<AuthEvent> {
        match read {
            Ok(fresh) if fresh.user == self.principal().user => {
                if fresh.expires_at != self.principal().expires_at {
                    self.principal.get_or_insert_with(Box::default).expires_at = fresh.expires_at;
                    if let Some(clocks) = self.clocks.as_deref_mut() {
                        clocks.deadline = fresh.expires_at.map(instant_at);
                        clocks.notified = false;
                    }
                }
                None
            }
            Err(failure) if failure.is_outage() => None,
            Ok(_) | Err(_) => Some(AuthEvent::Expired),
        }
    }
}

/// `principal`, or the anonymous one.
fn or_anonymous(principal: Option<&Principal>) -> &Principal {
    static ANONYMOUS: std::sync::LazyLock<Principal> = std::sync::LazyLock::new(Principal::default);
    principal.unwrap_or(&ANONYMOUS)
}

/// A re-read of `principal`'s session, if it has one.
fn start_read(auth: &Arc<Authenticator>, principal: &Principal) -> Option<SessionRead> {
    let session = principal.session.clone()?;
    let auth = Arc::clone(auth);
    Some(Box::pin(async move {
        match (session, &auth.session, &auth.webhook) {
            (SessionRef::Store(id), Some(store), _) => store.load(&id).await,
            (SessionRef::Webhook(credential), _, Some(hook)) => hook.recheck_now(credential).await,
            _ => Err(Failure::NotAccepted),
        }
    }))
}

/// The monotonic deadline of wall-clock time `t`. Credential times are
/// capped at the year 9999 when parsed, so this does not overflow; if it
/// ever would, the deadline is simply as far as the clock goes.
fn instant_at(t: SystemTime) -> Instant {
    let now = Instant::now();
    match t.duration_since(SystemTime::now()) {
        Ok(ahead) => now
            .checked_add(ahead)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30)),
        Err(_) => now,
    }
}
