//! The identity provider's key set (JWKS, RFC 7517), for bearer tokens
//! signed by keys the IdP publishes and rotates.
//!
//! - Fetched at start ([`Jwks::run`]), then every `jwks_refresh`, or
//!   sooner when the answer's `Cache-Control: max-age` says so (never more
//!   often than every [`MIN_REFRESH`]).
//! - A token naming a `kid` the set lacks triggers one fetch (the IdP
//!   rotated), at most once per `jwks_unknown_kid_interval` (10 s) whatever
//!   the number of such tokens: a flood of forged `kid`s costs the IdP one
//!   request per interval. Concurrent lookups share the fetch in flight,
//!   so a hanging IdP costs each of them one `jwks_timeout` at most, not
//!   one per lookup queued before it.
//! - With `issuer_discovery`, the OpenID configuration must name exactly
//!   the configured issuer (OpenID Connect Discovery §4.3): a document
//!   naming another is refused like a failed fetch, or whoever answers for
//!   that URL could pick the keys crier trusts for the issuer.
//! - A fetch that fails or answers garbage keeps the last good set, and
//!   says so in the log and in `crier_jwks_fetches_total{result="error"}`.
//! - Only signing keys of the RSA, EC and OKP types are taken (never a
//!   symmetric `oct` key). The verifier checks the token's `alg` against
//!   the allow-list first, then against the key: its type, and its own
//!   `alg` when it names one (a key published for ES384 never verifies an
//!   ES256 token). RSA keys under 2048 bits (RFC 7518 §3.3) are skipped,
//!   and logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::JwtConfig;
use crate::metrics::Metrics;
use crate::outbound::Client;

/// The shortest refresh period a `max-age` can ask for.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(10);
/// How soon a failed fetch is tried again (unless `jwks_refresh` is
/// shorter).
const RETRY: Duration = Duration::from_secs(30);
/// The largest key set read.
const MAX_BYTES: usize = 1024 * 1024;

/// One usable key.
struct Key {
    kid: Option<String>,
    family: AlgorithmFamily,
    /// The key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    key: Arc<DecodingKey>,
}

/// What a lookup found.
pub(crate) enum Lookup {
    Found(Arc<DecodingKey>),
    /// No key with this `kid` (or, without a `kid`, no single key fits).
    Unknown,
    /// The key exists but is not for this algorithm.
    WrongAlgorithm,
}

/// See the module documentation.
pub struct Jwks {
    /// Where the set is: configured, or found by discovery.
    url: ArcSwap<Option<url::Url>>,
    /// For `issuer_discovery`: the issuer whose configuration names it.
    issuer: Option<String>,
    client: Client,
    keys: ArcSwap<Vec<Key>>,
    allowed: Vec<Algorithm>,
    refresh: Duration,
    unknown_kid_interval: Duration,
    /// When the last fetch started; held while a fetch runs.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches finished so far. A lookup that sees it change while it
    /// waits for `fetching` waited for a fetch in flight, which answered
    /// it: starting another then would queue one fetch per lookup behind
    /// an IdP that hangs.
    finished: AtomicU64,
    metrics: Metrics,
}

impl Jwks {
    /// From `[auth.jwt]`; `None` without `jwks_url` or `issuer_discovery`.
    /// The error names the field.
    pub(crate) fn new(
        config: &JwtConfig,
        allowed: &[Algorithm],
        metrics: Metrics,
    ) -> Result<Option<Self>, String> {
        let url = match (&config.jwks_url, config.issuer_discovery) {
            (None, false) => return Ok(None),
            (Some(_), true) => {
                return Err(
                    "auth.jwt.issuer_discovery: set jwks_url or issuer_discovery, not both".into(),
                )
            }
            (Some(raw), false) => Some(check_url("auth.jwt.jwks_url", raw)?),
            (None, true) => {
                let issuer = config.issuer.as_deref().ok_or(
                    "auth.jwt.issuer_discovery: needs auth.jwt.issuer (the IdP's base URL)",
                )?;
                check_url("auth.jwt.issuer", issuer)?;
                None
            }
        };
        if allowed.iter().all(|a| a.family() == AlgorithmFamily::Hmac) {
            return Err(
                "auth.jwt.jwks_url: a key set serves RS, ES or EdDSA algorithms; list one in auth.jwt.algorithms"
                    .into(),
            );
        }
        if config.jwks_timeout.is_zero() {
            return Err("auth.jwt.jwks_timeout: must be more than 0".into());
        }
        let client = Client::new(
            "auth.jwt.jwks_ca_file",
            config.jwks_ca_file.as_deref(),
            config.jwks_timeout,
            MAX_BYTES,
        )?;
        Ok(Some(Self {
            url: ArcSwap::from_pointee(url),
            issuer: config
                .issuer_discovery
                .then(|| config.issuer.clone())
                .flatten(),
            client,
            keys: ArcSwap::from_pointee(Vec::new()),
            allowed: allowed.to_vec(),
            refresh: config.jwks_refresh,
            unknown_kid_interval: config.jwks_unknown_kid_interval,
            fetching: tokio::sync::Mutex::new(None),
            finished: AtomicU64::new(0),
            metrics,
        }))
    }

    /// The key for a token signed with `alg`, naming `kid`.
    pub(crate) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let keys = self.keys.load();
        let fits = |k: &&Key| k.family == alg.family();
        let key = match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut fitting = keys.iter().filter(fits);
                match (fitting.next(), fitting.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        };
        match key {
            None => Lookup::Unknown,
            Some(k) if !fits(&k) || k.alg.is_some_and(|a| a != alg) => Lookup::WrongAlgorithm,
            Some(k) => Lookup::Found(Arc::clone(&k.key)),
        }
    }

    /// A token named a `kid` the set lacks: fetch again, unless a fetch
    /// started less than `jwks_unknown_kid_interval` ago (then the set is as
    /// fresh as it gets). A fetch in flight is waited for and shared: it is
    /// as recent as any this lookup could start.
    pub(crate) async fn refresh_for_unknown_kid(&self) {
        let seen = self.finished.load(Ordering::Acquire);
        let mut last = self.fetching.lock().await;
        if self.finished.load(Ordering::Acquire) != seen {
            return;
        }
        if last.is_some_and(|t| t.elapsed() < self.unknown_kid_interval) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch("a token names an unknown kid").await;
    }

    /// Fetches at once, then keeps the set fresh until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let wait = {
                let mut last = self.fetching.lock().await;
                *last = Some(Instant::now());
                self.fetch("refresh").await
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One fetch; returns when to fetch next. Call with `fetching` held.
    async fn fetch(&self, why: &str) -> Duration {
        let result = self.try_fetch().await;
        self.finished.fetch_add(1, Ordering::Release);
        match result {
            Ok((keys, max_age)) => {
                self.metrics.jwks_fetches.with_label_values(&["ok"]).inc();
                self.metrics.jwks_keys.set(keys.len() as i64);
                tracing::info!(keys = keys.len(), why, "JWKS key set fetched");
                self.keys.store(Arc::new(keys));
                match max_age {
                    Some(age) => age.max(MIN_REFRESH).min(self.refresh),
                    None => self.refresh,
                }
            }
            Err(e) => {
                self.metrics
                    .jwks_fetches
                    .with_label_values(&["error"])
                    .inc();
                tracing::warn!(
                    error = %e,
                    why,
                    kept = self.keys.load().len(),
                    "JWKS fetch failed: keeping the last good key set"
                );
                self.refresh.min(RETRY)
            }
        }
    }

    async fn try_fetch(&self) -> Result<(Vec<Key>, Option<Duration>), String> {
        let url = match self.url.load().as_ref() {
            Some(url) => url.clone(),
            None => {
                let url = self.discover().await?;
                self.url.store(Arc::new(Some(url.clone())));
                url
            }
        };
        let answer = self.get(&url).await?;
        let max_age = answer
            .headers
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let set: JwkSet = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("{url}: not a JWK set: {e}"))?;
        let keys = self.usable(&set);
        if keys.is_empty() {
            return Err(format!(
                "{url}: no usable key (none of type RSA, EC or OKP for the allowed algorithms)"
            ));
        }
        Ok((keys, max_age))
    }

    /// `jwks_uri` from the issuer's OpenID configuration.
    async fn discover(&self) -> Result<url::Url, String> {
        let issuer = self.issuer.as_deref().ok_or("no jwks_url and no issuer")?;
        let base = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let url = url::Url::parse(&base).map_err(|e| format!("{base}: {e}"))?;
        let answer = self.get(&url).await?;
        let config: serde_json::Value =
            serde_json::from_slice(&answer.body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        // OpenID Connect Discovery §4.3: exactly the issuer asked for.
        match config["issuer"].as_str() {
            Some(named) if named == issuer => {}
            Some(named) => {
                return Err(format!(
                    "{url}: the document names the issuer `{named}`, not the configured `{issuer}` \
                     (they must be equal, character for character)"
                ))
            }
            None => {
                return Err(format!(
                    "{url}: no issuer (the configured one is `{issuer}`)"
                ))
            }
        }
        let jwks_uri = config["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{url}: no jwks_uri"))?;
        check_url("jwks_uri", jwks_uri)
    }

    async fn get(&self, url: &url::Url) -> Result<crate::outbound::Answer, String> {
        let request = http::Request::get("/").header(http::header::ACCEPT, "application/json");
        let answer = self
            .client
            .send(url, request, Bytes::new())
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !answer.status.is_success() {
            return Err(format!("{url}: answered {}", answer.status));
        }
        Ok(answer)
    }

    /// The keys of `set` crier may verify with.
    fn usable(&self, set: &JwkSet) -> Vec<Key> {
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
                AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
                AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
                // Symmetric keys are never published for verification.
                _ => continue,
            };
            if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
                continue;
            }
            // A key naming an algorithm keeps it: a token may use the key
            // only with that one (and only if the allow-list has it).
            let alg = match jwk.common.key_algorithm {
                Some(a) => match a.to_string().parse::<Algorithm>() {
                    Ok(alg) if alg.family() == family => Some(alg),
                    _ => continue,
                },
                None => None,
            };
            if !self.allowed.iter().any(|a| a.family() == family) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if family == AlgorithmFamily::Rsa {
                let bits = super::jwt::rsa_bits(&key).unwrap_or(0);
                if bits < super::jwt::MIN_RSA_BITS {
                    tracing::warn!(
                        kid = jwk.common.key_id.as_deref().unwrap_or(""),
                        bits,
                        "JWKS: an RSA key under 2048 bits is skipped (RFC 7518 §3.3)"
                    );
                    continue;
                }
            }
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                family,
                alg,
                key: Arc::new(key),
            });
        }
        keys
    }
}

/// An `http(s)://` URL; plain `http://` is warned about.
fn check_url(field: &str, raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{field}: `{raw}` is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" => {
            tracing::warn!(
                field,
                "plain http:// for the identity provider: only inside a trusted network"
            );
            Ok(url)
        }
        other => Err(format!(
            "{field}: use https:// (or http:// in-cluster), not {other}://"
        )),
    }
}

/// `max-age` of a `Cache-Control` value.
fn max_age(value: &str) -> Option<Duration> {
    value.split(',').find_map(|part| {
        let secs = part.trim().strip_prefix("max-age=")?;
        secs.trim_matches('"').parse().ok().map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_among_other_directives() {
        assert_eq!(
            max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            max_age("max-age=\"60\", must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
