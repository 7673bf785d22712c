//! `[auth]`: how crier recognises a client. Part of the configuration
//! contract (see `mod.rs`); every field documented here is mirrored in
//! docs/configuration.md and docs/authentication.md. The shapes, and the
//! checks their values alone allow, live here: loading keys and reaching
//! the session store or the webhook is the auth module's business.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, nonzero, positive, ConfigError};

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept `?token=<jwt>` in the URL. Off by default: URLs end up in
    /// proxy logs and browser history. Never logged by crier.
    pub query_token: bool,
    /// How long before a credential expires the client gets `expiring`.
    #[serde(with = "humantime_serde")]
    pub expiring_notice: Duration,
    /// Bearer tokens (JWT). Absent: tokens are not accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// The app's session cookie, read from its Redis session store.
    /// Absent: cookies are ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionConfig>,
    /// The app's own session, asked through a webhook: any framework.
    /// Absent: not asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookConfig>,
}

/// How the webhook is called.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum WebhookMethod {
    /// `POST`, with `{"ip", "origin"}` as its body.
    Post,
    /// `GET`, without a body.
    Get,
}

/// `[auth.webhook]`: for a connection with no bearer token, crier asks the
/// app who the client is, forwarding the configured cookies and headers
/// (and the client's address and origin). The app answers
/// `200 {"user": "42", "channels": […], "expires_at": <unix seconds>,
/// "info": {…}}`, or 401/403. Answers are cached per credential; when the
/// app cannot answer, crier refuses (503), never lets anyone in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// The app's endpoint, `https://` (or `http://` inside a trusted
    /// network).
    pub url: String,
    /// `POST` (default) or `GET`.
    pub method: WebhookMethod,
    /// Cookies of the client's request forwarded to the app (as a
    /// `Cookie` header), e.g. `["_myapp_session"]`.
    pub forward_cookies: Vec<String>,
    /// Headers of the client's request forwarded to the app, e.g.
    /// `["Authorization"]`.
    pub forward_headers: Vec<String>,
    /// How long an answer is reused for the same credential.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long a refusal (401/403) is reused.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// How long one call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Calls in flight at once, at most (more wait, within `timeout`).
    pub max_concurrency: usize,
    /// A logout in the app closes open connections within this time: each
    /// asks again every half `recheck`, taking an answer at most that old
    /// (so one credential's connections share their calls).
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
    /// CA certificates (PEM) to trust for `url`, besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl WebhookConfig {
    /// Something to forward, room for a call, and timings above zero.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.forward_cookies.is_empty() && self.forward_headers.is_empty() {
            return bad(
                "auth.webhook.forward_cookies",
                "name the cookies (or forward_headers) that identify a client to the app",
            );
        }
        positive(&[("auth.webhook.max_concurrency", self.max_concurrency)])?;
        nonzero(&[
            ("auth.webhook.timeout", self.timeout),
            ("auth.webhook.recheck", self.recheck),
        ])
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            method: WebhookMethod::Post,
            forward_cookies: Vec::new(),
            forward_headers: Vec::new(),
            cache_ttl: Duration::from_secs(30),
            negative_cache_ttl: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            max_concurrency: 64,
            recheck: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            query_token: false,
            expiring_notice: Duration::from_secs(60),
            jwt: None,
            session: None,
            webhook: None,
        }
    }
}

impl AuthConfig {
    /// Each configured credential's settings, and `query_token` only with
    /// tokens to verify: the authenticator relies on it.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(jwt) = &self.jwt {
            jwt.validate()?;
        }
        if let Some(hook) = &self.webhook {
            hook.validate()?;
        }
        if self.query_token && self.jwt.is_none() {
            return bad("auth.query_token", "needs [auth.jwt]");
        }
        Ok(())
    }
}

/// `[auth.jwt]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Allowed algorithms; a token whose `alg` is not listed is refused
    /// (so `none` and HS/RS confusion never get through). HS256, HS384,
    /// HS512 need `secret` or `secret_file`; RS256/384/512, ES256/384 and
    /// EdDSA need `public_key_file` or `jwks_url` (which may serve several
    /// families at once: `["RS256", "ES256"]`).
    pub algorithms: Vec<String>,
    /// Shared secret for the HS algorithms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// File holding the shared secret (trailing newline ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// PEM public key for the RS, ES and EdDSA algorithms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// The identity provider's key set (JWKS), e.g.
    /// `https://idp/realms/x/protocol/openid-connect/certs`: fetched at
    /// start, keys chosen by the token's `kid`, refreshed every
    /// `jwks_refresh` (sooner when the answer's `Cache-Control: max-age`
    /// is shorter, never more often than every 10 s) and when a token
    /// names an unknown `kid` (at most once per 10 s, however many such
    /// tokens come). The last good set is kept while the IdP fails.
    /// `http://` is accepted for in-cluster IdPs (with a warning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// How often the key set is fetched again.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// The shortest wait between two fetches caused by tokens naming an
    /// unknown `kid`: bounds what a flood of forged `kid`s costs the IdP
    /// (one request per interval).
    #[serde(with = "humantime_serde")]
    pub jwks_unknown_kid_interval: Duration,
    /// How long one fetch of the key set (or of the OpenID configuration)
    /// may take. Tokens naming an unknown `kid` wait for it at most this
    /// long, however many come at once: they share the fetch in flight.
    #[serde(with = "humantime_serde")]
    pub jwks_timeout: Duration,
    /// CA certificates (PEM) to trust for `jwks_url`, besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_ca_file: Option<PathBuf>,
    /// Find `jwks_url` in `<issuer>/.well-known/openid-configuration`
    /// (`jwks_uri`) instead of configuring it; needs `issuer`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub issuer_discovery: bool,
    /// Required `iss`, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Claim holding the user id.
    pub user_claim: String,
    /// Claim listing extra channels (names or `prefix*` patterns) the token
    /// grants, for rules with `subscribe = "claim"`.
    pub channels_claim: String,
}

impl JwtConfig {
    /// A key set that is fetched is fetched again after some time. (The
    /// keys themselves are checked by loading them, when the server is
    /// built.)
    fn validate(&self) -> Result<(), ConfigError> {
        let jwks = self.jwks_url.is_some() || self.issuer_discovery;
        if jwks && self.jwks_refresh.is_zero() {
            return bad("auth.jwt.jwks_refresh", "must be longer than 0s");
        }
        Ok(())
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            algorithms: vec!["HS256".into()],
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_unknown_kid_interval: Duration::from_secs(10),
            jwks_timeout: Duration::from_secs(10),
            jwks_ca_file: None,
            issuer_discovery: false,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
            channels_claim: "channels".into(),
        }
    }
}

/// How the session cookie is signed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Signing {
    /// express-session / cookie-signature: `s:<id>.<HMAC-SHA256, base64,
    /// no padding>`, URL-encoded.
    Express,
    /// The cookie is the bare session id.
    None,
}

/// `[auth.session]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Cookie name.
    pub cookie: String,
    /// Redis key of the session JSON; `{id}` is the session id.
    pub key: String,
    /// How the cookie value is signed.
    pub signing: Signing,
    /// Signing secrets; the first signs, all verify (rotation).
    pub secrets: Vec<String>,
    /// JSON pointer to the user id in the session.
    pub user_pointer: String,
    /// JSON pointer to the session's expiry (an ISO 8601 date, or epoch
    /// milliseconds); empty for none.
    pub expires_pointer: String,
    /// Redis holding the sessions, when not the pub/sub one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// How often an open connection checks that its session still exists
    /// (a logout closes it within this time).
    #[serde(with = "humantime_serde")]
    pub recheck: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            cookie: "connect.sid".into(),
            key: "sess:{id}".into(),
            signing: Signing::Express,
            secrets: Vec::new(),
            user_pointer: "/passport/user".into(),
            expires_pointer: "/cookie/expires".into(),
            redis_url: None,
            recheck: Duration::from_secs(30),
        }
    }
}
