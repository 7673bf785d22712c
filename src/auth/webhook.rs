//! The app's own session, asked through a webhook (`[auth.webhook]`): for
//! frameworks whose sessions crier cannot read itself (Rails, Django,
//! Laravel, Phoenix, Spring, ASP.NET, Go…). crier forwards the configured
//! cookies and headers of the client's request, its address and origin,
//! and the app answers who that is.
//!
//! - Answers are cached per credential (a hash of what is forwarded, never
//!   the values themselves in a log): `cache_ttl` for a user,
//!   `negative_cache_ttl` for a refusal, never for an outage. Concurrent
//!   lookups of one credential share one call, so a reconnect storm is one
//!   call per credential, not one per connection.
//! - At most `max_concurrency` calls run at once, each within `timeout`.
//! - When the app cannot answer (down, slow, an error status, an answer
//!   that is not one), crier fails closed: the connection is refused as
//!   unavailable (503), never let in anonymously;
//!   `crier_webhook_calls_total{result="error"}` counts it.
//! - An open connection asks again every half `recheck`, and takes an
//!   answer no older than half `recheck`: connections sharing a credential
//!   (tabs, reconnects) share its rechecks, at most two calls per
//!   credential per `recheck` however many they are, and a logout in the
//!   app still ends every one of them within `recheck`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use super::{Failure, Principal, SessionRef};
use crate::config::{WebhookConfig, WebhookMethod};
use crate::metrics::Metrics;
use crate::outbound::Client;

/// Cached answers kept at most (each holds the forwarded credential and
/// the principal, about a kilobyte); past it, stale ones go first, and
/// if all are fresh (a flood of distinct cookies), all go.
const MAX_CACHED: usize = 10_000;
/// The largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// What identifies a client to the app: the forwarded cookies and
/// headers, its address and origin. Not `Debug`: it holds the app's
/// session secrets.
pub struct Credential {
    /// SHA-256 of what is forwarded: the cache key.
    key: [u8; 32],
    cookie: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    ip: IpAddr,
    origin: Option<String>,
}

/// The app's answer to `200`.
#[derive(Deserialize)]
struct Answer {
    user: Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    expires_at: Option<Value>,
    #[serde(default)]
    info: Option<Map<String, Value>>,
}

/// A call's outcome, shared by every lookup that waited for it.
struct Slot {
    outcome: OnceCell<(Result<Principal, Failure>, Instant)>,
}

/// See the module documentation.
pub(crate) struct Webhook {
    url: url::Url,
    config: WebhookConfig,
    forward_headers: Vec<HeaderName>,
    client: Client,
    cache: Mutex<HashMap<[u8; 32], Arc<Slot>>>,
    calls: Semaphore,
    metrics: Metrics,
}

impl Webhook {
    /// From `[auth.webhook]`; the error names the field.
    pub(crate) fn new(config: &WebhookConfig, metrics: Metrics) -> Result<Self, String> {
        let url = url::Url::parse(&config.url)
            .map_err(|e| format!("auth.webhook.url: `{}` is not a URL: {e}", config.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "auth.webhook.url: use https:// (or http:// inside a trusted network), not {}://",
                url.scheme()
            ));
        }
        let forward_headers = config
            .forward_headers
            .iter()
            .enumerate()
            .map(|(i, name)| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    format!("auth.webhook.forward_headers[{i}]: `{name}` is not a header name")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = Client::new(
            "auth.webhook.ca_file",
            config.ca_file.as_deref(),
            config.timeout,
            MAX_ANSWER,
        )?;
        Ok(Self {
            url,
            config: config.clone(),
            forward_headers,
            client,
            cache: Mutex::new(HashMap::new()),
            calls: Semaphore::new(config.max_concurrency),
            metrics,
        })
    }

    /// How often an open connection asks again: every half `recheck`,
    /// taking answers no older than that (see [`Webhook::recheck_now`]).
    pub(crate) fn recheck(&self) -> Duration {
        self.config.recheck / 2
    }

    /// Whether the webhook is asked for requests bearing a token
    /// (`Authorization` is forwarded).
    pub(crate) fn takes_bearer(&self) -> bool {
        self.forward_headers.contains(&http::header::AUTHORIZATION)
    }

    /// The credential a request brings, if it carries any of the forwarded
    /// cookies or headers.
    pub(crate) fn credential(&self, headers: &HeaderMap, ip: IpAddr) -> Option<Credential> {
        let cookies: Vec<String> = self
            .config
            .forward_cookies
            .iter()
            .filter_map(|name| {
                super::cookie::find_cookie(headers, name).map(|v| format!("{name}={v}"))
            })
            .collect();
        let forwarded: Vec<(HeaderName, HeaderValue)> = self
            .forward_headers
            .iter()
            .filter_map(|name| headers.get(name).map(|v| (name.clone(), v.clone())))
            .collect();
        if cookies.is_empty() && forwarded.is_empty() {
            return None;
        }
        let cookie = (!cookies.is_empty()).then(|| cookies.join("; "));
        let mut hash = Sha256::new();
        hash.update(cookie.as_deref().unwrap_or_default());
        for (name, value) in &forwarded {
            hash.update([0]);
            hash.update(name.as_str());
            hash.update([0]);
            hash.update(value.as_bytes());
        }
        Some(Credential {
            key: hash.finalize().into(),
            cookie,
            headers: forwarded,
            ip,
            origin: headers
                .get(http::header::ORIGIN)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        })
    }

    /// Who `credential` is: from the cache, or from the app (one call for
    /// every lookup of it meanwhile).
    pub(crate) async fn identify(&self, credential: Arc<Credential>) -> Result<Principal, Failure> {
        self.lookup(credential, None).await
    }

    /// Asks again for an open connection: an answer at most half
    /// `recheck` old, or a new call (or the one in flight). Rechecks come
    /// every half `recheck`, so a logout is seen within `recheck`.
    pub(crate) async fn recheck_now(
        &self,
        credential: Arc<Credential>,
    ) -> Result<Principal, Failure> {
        self.lookup(credential, Some(self.config.recheck / 2)).await
    }

    /// `max_age`: the oldest answer a recheck takes (else the cache's own
    /// time to live).
    async fn lookup(
        &self,
        credential: Arc<Credential>,
        max_age: Option<Duration>,
    ) -> Result<Principal, Failure> {
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let reusable = cache
                .get(&credential.key)
                .filter(|slot| match slot.outcome.get() {
                    // In flight: join it.
                    None => true,
                    Some((result, at)) => {
                        let ttl = self.ttl(result);
                        at.elapsed() < max_age.map_or(ttl, |age| age.min(ttl))
                    }
                });
            match reusable {
                Some(slot) => Arc::clone(slot),
                None => {
                    if cache.len() >= MAX_CACHED {
                        cache.retain(|_, slot| {
                            slot.outcome
                                .get()
                                .is_none_or(|(result, at)| at.elapsed() < self.ttl(result))
                        });
                        if cache.len() >= MAX_CACHED {
                            cache.clear();
                        }
                    }
                    let slot = Arc::new(Slot {
                        outcome: OnceCell::new(),
                    });
                    cache.insert(credential.key, Arc::clone(&slot));
                    slot
                }
            }
        };
        let (result, _) = slot
            .outcome
            .get_or_init(|| async {
                let result = self.call(&credential).await;
                let label = match &result {
                    Ok(_) => "ok",
                    Err(Failure::WebhookUnavailable) => "error",
                    Err(_) => "refused",
                };
                self.metrics.webhook_calls.with_label_values(&[label]).inc();
                (
                    result.map(|mut p| {
                        p.session = Some(SessionRef::Webhook(Arc::clone(&credential)));
                        p
                    }),
                    Instant::now(),
                )
            })
            .await;
        result.clone()
    }

    /// How long an outcome is reused.
    fn ttl(&self, result: &Result<Principal, Failure>) -> Duration {
        match result {
            Ok(_) => self.config.cache_ttl,
            Err(Failure::WebhookUnavailable) => Duration::ZERO,
            Err(_) => self.config.negative_cache_ttl,
        }
    }

    /// One call to the app.
    async fn call(&self, credential: &Credential) -> Result<Principal, Failure> {
        let unavailable = |why: String| {
            tracing::warn!(reason = %why, "session webhook: no usable answer, refusing (fail closed)");
            Failure::WebhookUnavailable
        };
        let _permit = tokio::time::timeout(self.config.timeout, self.calls.acquire())
            .await
            .map_err(|_| {
                unavailable(format!(
                    "{} calls in flight for {:?}",
                    self.config.max_concurrency, self.config.timeout
                ))
            })?
            .map_err(|_| Failure::WebhookUnavailable)?;
        let ip = credential.ip.to_string();
        let mut request = match self.config.method {
            WebhookMethod::Post => http::Request::post("/"),
            WebhookMethod::Get => http::Request::get("/"),
        }
        .header(http::header::ACCEPT, "application/json")
        .header("x-forwarded-for", &ip);
        if let Some(origin) = &credential.origin {
            request = request.header("x-crier-origin", origin);
        }
        if let Some(cookie) = &credential.cookie {
            request = request.header(http::header::COOKIE, cookie);
        }
        for (name, value) in &credential.headers {
            request = request.header(name, value);
        }
        let body = match self.config.method {
            WebhookMethod::Post => {
                request = request.header(http::header::CONTENT_TYPE, "application/json");
                let body = serde_json::json!({"ip": ip, "origin": credential.origin});
                Bytes::from(body.to_string())
            }
            WebhookMethod::Get => Bytes::new(),
        };
        let answer = self
            .client
            .send(&self.url, request, body)
            .await
            .map_err(&unavailable)?;
        match answer.status.as_u16() {
            200 => {}
            401 | 403 => return Err(Failure::UnknownSession),
            other => return Err(unavailable(format!("the app answered {other}"))),
        }
        // The error says where, never what: the answer is the app's secret.
        let answer: Answer = serde_json::from_slice(&answer.body).map_err(|e| {
            unavailable(format!(
                "the app's answer is not {{\"user\": …}} ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let user = super::user_id(Some(&answer.user))
            .ok_or_else(|| unavailable("the app's answer has no usable `user`".into()))?;
        let expires_at: Option<SystemTime> =
            match &answer.expires_at {
                None | Some(Value::Null) => None,
                Some(v) => Some(super::time::from_secs(v).ok_or_else(|| {
                    unavailable("the app's `expires_at` is not Unix seconds".into())
                })?),
            };
        if expires_at.is_some_and(|t| t <= SystemTime::now()) {
            return Err(Failure::Expired);
        }
        Ok(Principal {
            user: Some(user),
            claims: answer.info.unwrap_or_default(),
            grants: answer.channels.unwrap_or_default(),
            expires_at,
            session: None,
        })
    }
}
