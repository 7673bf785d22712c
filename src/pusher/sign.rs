//! Pusher's signatures: the channel authorization an app's auth endpoint
//! returns (`key:HMAC-SHA256(secret, "socket_id:channel[:channel_data]")`),
//! and the signed query string of every HTTP API request.
//!
//! Both are checked in constant time; a refusal says which part is wrong
//! (never the expected value).

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

use crate::auth::matches_a_secret;
use crate::config::PusherApp;

/// How far an HTTP API request's `auth_timestamp` may be from now.
pub(crate) const MAX_CLOCK_SKEW_SECS: u64 = 600;

/// HMAC-SHA256 of `text` under `secret`, as lowercase hex.
pub(crate) fn hmac_hex(secret: &str, text: &str) -> String {
    // An HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(text.as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The `auth` a subscription to `channel` must bring: what the Pusher
/// server SDKs' `authorizeChannel` returns.
pub(crate) fn channel_auth(
    app: &PusherApp,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let mut text = format!("{socket_id}:{channel}");
    if let Some(data) = channel_data {
        text.push(':');
        text.push_str(data);
    }
    format!("{}:{}", app.key, hmac_hex(&app.secret, &text))
}

/// Checks a subscription's `auth` against the app's secret.
pub(crate) fn verify_channel_auth(
    app: &PusherApp,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: Option<&str>,
) -> Result<(), &'static str> {
    let auth = auth.ok_or("no `auth` given: a private or presence channel needs a signature")?;
    let expected = channel_auth(app, socket_id, channel, channel_data);
    if matches_a_secret(auth.as_bytes(), [&expected]) {
        Ok(())
    } else {
        Err("invalid signature")
    }
}

/// The `auth` a sign-in as `user_data` must bring: what the Pusher
/// server SDKs' `authenticateUser` returns,
/// `key:HMAC-SHA256(secret, "socket_id::user::user_data")`.
pub(crate) fn user_auth(app: &PusherApp, socket_id: &str, user_data: &str) -> String {
    let text = format!("{socket_id}::user::{user_data}");
    format!("{}:{}", app.key, hmac_hex(&app.secret, &text))
}

/// Checks a sign-in's `auth` against the app's secret: a signature made
/// for another connection (another `socket_id`) or other user data fails.
pub(crate) fn verify_user_auth(
    app: &PusherApp,
    socket_id: &str,
    user_data: &str,
    auth: &str,
) -> Result<(), &'static str> {
    let expected = user_auth(app, socket_id, user_data);
    if matches_a_secret(auth.as_bytes(), [&expected]) {
        Ok(())
    } else {
        Err("invalid signature")
    }
}

/// Why an HTTP API request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unsigned {
    /// A signing parameter is missing or malformed.
    Missing(&'static str),
    /// `auth_key` names no key of this app.
    WrongKey,
    /// `auth_timestamp` is more than [`MAX_CLOCK_SKEW_SECS`] from now.
    Stale,
    /// `body_md5` does not match the body.
    BodyChanged,
    /// `auth_signature` does not match.
    BadSignature,
}

impl Unsigned {
    /// The message of the 401 answer.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Unsigned::Missing(what) => what,
            Unsigned::WrongKey => "auth_key does not belong to this app",
            Unsigned::Stale => "auth_timestamp is more than 600 seconds from the server's clock",
            Unsigned::BodyChanged => "body_md5 does not match the body",
            Unsigned::BadSignature => "invalid auth_signature",
        }
    }
}

/// Checks a signed HTTP API request: `method` and `path` as sent, its
/// query parameters (decoded), its body, and the time now (Unix seconds).
pub(crate) fn verify_request(
    app: &PusherApp,
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: &[u8],
    now: u64,
) -> Result<(), Unsigned> {
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let key = get("auth_key").ok_or(Unsigned::Missing("missing auth_key"))?;
    let signature = get("auth_signature").ok_or(Unsigned::Missing("missing auth_signature"))?;
    let timestamp: u64 = get("auth_timestamp")
        .ok_or(Unsigned::Missing("missing auth_timestamp"))?
        .parse()
        .map_err(|_| Unsigned::Missing("auth_timestamp is not a number of seconds"))?;
    if get("auth_version") != Some("1.0") {
        return Err(Unsigned::Missing("auth_version must be 1.0"));
    }
    if !matches_a_secret(key.as_bytes(), [&app.key]) {
        return Err(Unsigned::WrongKey);
    }
    if now.abs_diff(timestamp) > MAX_CLOCK_SKEW_SECS {
        return Err(Unsigned::Stale);
    }
    if !body.is_empty() {
        let md5 = hex(&Md5::digest(body));
        if get("body_md5") != Some(md5.as_str()) {
            return Err(Unsigned::BodyChanged);
        }
    }
    let mut signed: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("auth_signature"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    signed.sort();
    let params: Vec<String> = signed.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let text = format!("{method}\n{path}\n{}", params.join("&"));
    let expected = hmac_hex(&app.secret, &text);
    if matches_a_secret(signature.as_bytes(), [&expected]) {
        Ok(())
    } else {
        Err(Unsigned::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(key: &str, secret: &str) -> PusherApp {
        PusherApp {
            id: "1".into(),
            key: key.into(),
            secret: secret.into(),
            client_events: false,
            namespace: String::new(),
            ..Default::default()
        }
    }

    #[test]
    fn a_sign_in_is_bound_to_its_connection_and_its_user_data() {
        let app = app("278d425bdf160c739803", "7ad3773142a6692b25b8");
        let data = r#"{"id":"12345"}"#;
        let auth = user_auth(&app, "1234.1234", data);
        // What the SDKs sign: `socket_id::user::user_data`.
        let text = format!("1234.1234::user::{data}");
        assert_eq!(
            auth,
            format!(
                "278d425bdf160c739803:{}",
                hmac_hex("7ad3773142a6692b25b8", &text)
            )
        );
        assert!(verify_user_auth(&app, "1234.1234", data, &auth).is_ok());
        for (socket, data, auth) in [
            ("1234.1235", data, auth.as_str()),
            ("1234.1234", r#"{"id":"1"}"#, auth.as_str()),
            ("1234.1234", data, "278d425bdf160c739803:00"),
            ("1234.1234", data, ""),
        ] {
            assert!(
                verify_user_auth(&app, socket, data, auth).is_err(),
                "{socket} {data} {auth}"
            );
        }
    }

    #[test]
    fn channel_auth_matches_pushers_documented_example() {
        // From Pusher's "Channel authorization" reference.
        let app = app("278d425bdf160c739803", "7ad3773142a6692b25b8");
        let auth = channel_auth(&app, "1234.1234", "private-foobar", None);
        assert_eq!(
            auth,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        assert!(
            verify_channel_auth(&app, "1234.1234", "private-foobar", None, Some(&auth)).is_ok()
        );
        // Another socket, another channel, data added, a missing auth.
        for (socket, channel, data) in [
            ("1234.1235", "private-foobar", None),
            ("1234.1234", "private-foobaz", None),
            ("1234.1234", "private-foobar", Some("{}")),
        ] {
            assert_eq!(
                verify_channel_auth(&app, socket, channel, data, Some(&auth)),
                Err("invalid signature")
            );
        }
        assert!(verify_channel_auth(&app, "1234.1234", "private-foobar", None, None).is_err());
    }

    fn signed(
        app: &PusherApp,
        method: &str,
        path: &str,
        body: &[u8],
        ts: u64,
    ) -> Vec<(String, String)> {
        let mut query = vec![
            ("auth_key".to_owned(), app.key.clone()),
            ("auth_timestamp".to_owned(), ts.to_string()),
            ("auth_version".to_owned(), "1.0".to_owned()),
        ];
        if !body.is_empty() {
            query.push(("body_md5".into(), hex(&Md5::digest(body))));
        }
        let mut sorted = query.clone();
        sorted.sort();
        let text: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let sig = hmac_hex(
            &app.secret,
            &format!("{method}\n{path}\n{}", text.join("&")),
        );
        query.push(("auth_signature".into(), sig));
        query
    }

    #[test]
    fn a_signed_request_passes_and_every_tampering_is_named() {
        let app = app("key", "a-secret-of-16-bytes");
        let body = br#"{"name":"e","channels":["c"],"data":"{}"}"#;
        let now = 1_700_000_000;
        let query = signed(&app, "POST", "/apps/1/events", body, now);
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &query, body, now),
            Ok(())
        );
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &query, b"{}", now),
            Err(Unsigned::BodyChanged)
        );
        assert_eq!(
            verify_request(&app, "POST", "/apps/2/events", &query, body, now),
            Err(Unsigned::BadSignature)
        );
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &query, body, now + 601),
            Err(Unsigned::Stale)
        );
        let other = PusherApp {
            key: "other".into(),
            ..app.clone()
        };
        assert_eq!(
            verify_request(&other, "POST", "/apps/1/events", &query, body, now),
            Err(Unsigned::WrongKey)
        );
        let unsigned: Vec<_> = query
            .iter()
            .filter(|(k, _)| k != "auth_signature")
            .cloned()
            .collect();
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &unsigned, body, now),
            Err(Unsigned::Missing("missing auth_signature"))
        );
        // A parameter added after signing.
        let mut added = query.clone();
        added.push(("info".into(), "user_count".into()));
        assert_eq!(
            verify_request(&app, "POST", "/apps/1/events", &added, body, now),
            Err(Unsigned::BadSignature)
        );
    }
}
