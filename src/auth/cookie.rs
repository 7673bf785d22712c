//! Session cookies, checked against the app's own Redis session store:
//! the app's login session, read through its cookie (named for the cookie,
//! because in crier a "session" is a client connection, `crate::session`).
//!
//! The default fits express-session + connect-redis: the cookie
//! `connect.sid` holds `s:<id>.<signature>`, URL-encoded, where the signature
//! is HMAC-SHA256 of the id with the app's secret, base64 without padding
//! (the `cookie-signature` package). A forged or unsigned cookie is refused
//! *before* Redis is asked, so guessing session ids costs an attacker
//! nothing but costs crier nothing either.

use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::Value;
use sha2::Sha256;

use super::{time, Failure, Principal, SessionRef};
use crate::config::{RedisConfig, SessionConfig, Signing};
use crate::redis_client as client;

/// The app's session store.
pub struct CookieStore {
    config: SessionConfig,
    redis: ConnectionManager,
}

impl CookieStore {
    /// Connects lazily to `auth.session.redis_url`, else to the broker's
    /// Redis (`redis`, whose TLS settings apply to both).
    pub fn new(config: &SessionConfig, redis: &RedisConfig) -> Result<Self, String> {
        let client = Self::check(config, redis)?;
        let redis = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(1),
        )
        .map_err(|e| format!("auth.session.redis_url: {e}"))?;
        Ok(Self {
            config: config.clone(),
            redis,
        })
    }

    /// Validates `[auth.session]` without connecting; returns the store's
    /// client. A store of its own (`redis_url`) carries its credentials in
    /// its URL; the broker's Redis comes with `[redis]`'s.
    pub fn check(config: &SessionConfig, redis: &RedisConfig) -> Result<redis::Client, String> {
        let client =
            match (&config.redis_url, &redis.url) {
                (Some(own), _) => {
                    let tls_only = RedisConfig {
                        tls: redis.tls.clone(),
                        ..RedisConfig::default()
                    };
                    client::open("auth.session.redis_url", own, &tls_only)?
                }
                (None, Some(shared)) => client::open("redis.url", shared, redis)?,
                (None, None) => return Err(
                    "auth.session.redis_url: the session store needs a Redis URL: redis.url, or \
                     its own auth.session.redis_url (needed with [redis.sentinel])"
                        .into(),
                ),
            };
        if config.cookie.is_empty() {
            return Err("auth.session.cookie: must not be empty".into());
        }
        if config.signing == Signing::Express && config.secrets.is_empty() {
            return Err("auth.session.secrets: express signing needs the app's secret(s)".into());
        }
        if !config.key.contains("{id}") {
            return Err("auth.session.key: must contain {id}".into());
        }
        for (field, pointer) in [
            ("auth.session.user_pointer", &config.user_pointer),
            ("auth.session.expires_pointer", &config.expires_pointer),
        ] {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return Err(format!("{field}: a JSON pointer starts with `/`"));
            }
        }
        if config.recheck.is_zero() {
            return Err("auth.session.recheck: must be longer than 0s".into());
        }
        Ok(client)
    }

    /// How often open connections re-read their session.
    pub fn recheck(&self) -> Duration {
        self.config.recheck
    }

    /// The session id in the request's cookie, if the cookie is there.
    /// A cookie with a bad signature is an error, found without Redis.
    pub fn session_id(&self, headers: &HeaderMap) -> Option<Result<String, Failure>> {
        let raw = find_cookie(headers, &self.config.cookie)?;
        Some(self.unsign(&raw))
    }

    fn unsign(&self, raw: &str) -> Result<String, Failure> {
        let value = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| Failure::Malformed)?;
        match self.config.signing {
            Signing::None if !value.is_empty() => Ok(value.into_owned()),
            Signing::None => Err(Failure::Malformed),
            Signing::Express => {
                let signed = value.strip_prefix("s:").ok_or(Failure::BadSignature)?;
                let (id, signature) = signed.rsplit_once('.').ok_or(Failure::BadSignature)?;
                let signatures = self.config.secrets.iter().map(|s| express_signature(id, s));
                let valid = super::matches_a_secret(signature.as_bytes(), signatures);
                if valid && !id.is_empty() {
                    Ok(id.to_owned())
                } else {
                    Err(Failure::BadSignature)
                }
            }
        }
    }

    /// Reads session `id` from Redis and turns it into a principal.
    pub async fn load(&self, id: &str) -> Result<Principal, Failure> {
        let key = self.config.key.replace("{id}", id);
        let mut conn = self.redis.clone();
        let raw: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "session store unavailable");
                Failure::StoreUnavailable
            })?;
        let raw = raw.ok_or(Failure::UnknownSession)?;
        let session: Value = serde_json::from_slice(&raw).map_err(|_| Failure::Malformed)?;
        let user = super::user_id(session.pointer(&self.config.user_pointer))
            .ok_or(Failure::NotLoggedIn)?;
        // An expiry that is there but not a usable time refuses the
        // session, rather than letting it live forever.
        let expires_at = match session.pointer(&self.config.expires_pointer) {
            None | Some(Value::Null) => None,
            Some(_) if self.config.expires_pointer.is_empty() => None,
            Some(v) => Some(parse_time(v).ok_or(Failure::InvalidClaim)?),
        };
        if expires_at.is_some_and(|t| t <= SystemTime::now()) {
            return Err(Failure::Expired);
        }
        Ok(Principal {
            user: Some(user),
            expires_at,
            session: Some(SessionRef::Store(id.to_owned())),
            ..Principal::default()
        })
    }
}

/// cookie-signature's `sign(value, secret)` without the `value.` prefix.
pub fn express_signature(value: &str, secret: &str) -> String {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(value.as_bytes());
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(mac.finalize().into_bytes())
}

/// The first cookie named `name` across all `Cookie` headers.
pub(super) fn find_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_owned())
}

/// An ISO 8601 date (what express-session stores) or epoch milliseconds.
fn parse_time(v: &Value) -> Option<SystemTime> {
    match v {
        Value::String(s) => humantime::parse_rfc3339_weak(s).ok(),
        _ => time::from_millis(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn store(secrets: &[&str]) -> CookieStore {
        let config = SessionConfig {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..SessionConfig::default()
        };
        let redis = RedisConfig {
            url: Some("redis://127.0.0.1:1".into()),
            ..RedisConfig::default()
        };
        CookieStore::new(&config, &redis).expect("store")
    }

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, cookie.parse().expect("header"));
        h
    }

    #[test]
    fn signature_matches_cookie_signature() {
        // From the cookie-signature package's own test suite (and Node's
        // crypto): sign('hello', 'tobiiscool').
        assert_eq!(
            express_signature("hello", "tobiiscool"),
            "DGDUkGlIkCzPz+C0B064FNgHdEjox7ch8tOBGslZ5QI"
        );
    }

    #[tokio::test]
    async fn unsigns_express_cookies_and_refuses_forgeries() {
        let s = store(&["new secret", "old secret"]);
        let id = "aBc-123_xyz";
        let make = |secret: &str| {
            let raw = format!("s:{id}.{}", express_signature(id, secret));
            let encoded: String =
                percent_encoding::utf8_percent_encode(&raw, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            headers(&format!("theme=dark; connect.sid={encoded}; other=1"))
        };
        assert_eq!(s.session_id(&make("new secret")), Some(Ok(id.to_string())));
        assert_eq!(
            s.session_id(&make("old secret")),
            Some(Ok(id.to_string())),
            "rotated secret"
        );
        assert_eq!(
            s.session_id(&make("wrong")),
            Some(Err(Failure::BadSignature))
        );
        assert_eq!(
            s.session_id(&headers(&format!("connect.sid={id}"))),
            Some(Err(Failure::BadSignature)),
            "unsigned"
        );
        assert_eq!(s.session_id(&headers("theme=dark")), None);
    }

    #[test]
    fn parses_express_dates() {
        let t = parse_time(&Value::String("2030-01-02T03:04:05.678Z".into())).expect("date");
        assert_eq!(
            t.duration_since(UNIX_EPOCH)
                .expect("after epoch")
                .as_millis(),
            1_893_553_445_678
        );
    }
}
