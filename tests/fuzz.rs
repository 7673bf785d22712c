//! Fuzz-style property tests over every parser a client controls: the SSE
//! and WebSocket query string, cursors (`Last-Event-ID`, `since`), WebSocket
//! command JSON, the session cookie and the bearer header. Each runs a few
//! thousand generated cases in the normal `cargo test`; set `FUZZ_CASES`
//! for a deeper run (`FUZZ_CASES=200000 cargo test --release --test fuzz`).
//!
//! Besides "no panic" (a panic fails the case), each property states what a
//! client is owed: limits hold, what was encoded decodes to itself, and
//! nothing forged is accepted.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use crier::config::{Config, JwtConfig, SessionConfig};
use crier::testing::auth::{Authenticator, CookieStore, JwtVerifier};
use crier::testing::history::{Cursor, StreamId};
use crier::testing::http::{StreamQuery, MAX_QUERY_BYTES};
use crier::testing::metrics::Metrics;
use crier::testing::protocol::{event_filter, Command, MAX_EVENT_TYPES, MAX_EVENT_TYPE_LEN};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use serde_json::{json, Value};

const SECRET: &str = "a-fuzz-test-hs256-secret-of-32-bytes!!";

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Query-string text: reserved characters, escapes (valid or not) and
/// the parameters crier reads.
fn query_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("channel=".to_string()),
        Just("events=".to_string()),
        Just("&".to_string()),
        Just(",".to_string()),
        Just("%".to_string()),
        Just("%FF".to_string()),
        Just("%2C".to_string()),
        Just("+".to_string()),
        "[a-z:*]{1,8}",
        "\\PC{1,4}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|p| p.concat())
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("subscribe"),
            Just("unsubscribe"),
            Just("auth"),
            Just("ping")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("channel".to_string()),
                    Just("events".to_string()),
                    Just("since".to_string()),
                    Just("token".to_string()),
                    Just("id".to_string()),
                    "[a-z]{1,5}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn stream_id() -> impl Strategy<Value = StreamId> {
    (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| StreamId { ms, seq })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

proptest! {
    #![proptest_config(proptest_config())]

    /// `/sse?…` and `/ws?…`: within limits or refused with a reason;
    /// channels kept once each, in order.
    #[test]
    fn query_strings_parse_within_limits(query in query_text()) {
        let uri: http::Uri = match format!("/sse?{query}").parse() {
            Ok(uri) => uri,
            Err(_) => return Ok(()), // not even a request line
        };
        match StreamQuery::parse(&uri) {
            Ok(q) => {
                let unique: HashSet<_> = q.channels.iter().collect();
                prop_assert_eq!(unique.len(), q.channels.len(), "duplicates kept");
                if let Some(events) = &q.events {
                    prop_assert!(events.len() <= MAX_EVENT_TYPES);
                    prop_assert!(events.iter().all(|e| e.len() <= MAX_EVENT_TYPE_LEN && !e.is_empty()));
                }
            }
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    /// What a page asks for is what crier reads back.
    #[test]
    fn generated_queries_round_trip(
        channels in proptest::collection::vec("[a-z]{1,3}:[\\PC&&[^ ]]{1,6}", 0..10),
        events in proptest::collection::vec("[a-z.]{1,10}", 0..10),
    ) {
        let mut query: Vec<String> = channels
            .iter()
            .map(|c| format!("channel={}", url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()))
            .collect();
        if !events.is_empty() {
            query.push(format!("events={}", events.join(",")));
        }
        let uri: http::Uri = format!("/sse?{}", query.join("&")).parse().expect("uri");
        let q = StreamQuery::parse(&uri).expect("valid");
        let mut seen = HashSet::new();
        let expected: Vec<_> = channels.iter().filter(|c| seen.insert(c.as_str())).cloned().collect();
        prop_assert_eq!(q.channels, expected);
        prop_assert_eq!(q.events.map(|e| e.to_vec()), (!events.is_empty()).then_some(events));
    }

    /// A query over the limit is refused, whatever it holds.
    #[test]
    fn long_queries_are_refused(extra in 1usize..2048, fill in "[a-z=&]{1,4}") {
        let query = fill.repeat((MAX_QUERY_BYTES + extra) / fill.len() + 1);
        let uri: http::Uri = format!("/sse?{query}").parse().expect("uri");
        prop_assert!(StreamQuery::parse(&uri).is_err());
    }

    /// `Last-Event-ID`: garbage is refused; what crier encodes decodes to
    /// itself.
    #[test]
    fn cursors_decode_only_what_was_encoded(
        text in "(c1\\.)?[A-Za-z0-9_=\\-]{0,64}",
        map in proptest::collection::btree_map("\\PC{1,12}", stream_id(), 0..8),
    ) {
        if let Ok(cursor) = Cursor::decode(&text) {
            prop_assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        }
        let cursor = Cursor(map.into_iter().collect::<BTreeMap<_, _>>());
        prop_assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
    }

    /// WebSocket `since`: ids parse exactly; anything else is refused.
    #[test]
    fn stream_ids_parse_exactly(id in stream_id(), text in "\\PC{0,24}") {
        prop_assert_eq!(id.to_string().parse::<StreamId>(), Ok(id));
        if let Ok(parsed) = text.parse::<StreamId>() {
            prop_assert_eq!(format!("{}-{}", parsed.ms, parsed.seq).parse::<StreamId>(), Ok(parsed));
        }
    }

    /// WebSocket commands: any JSON (or none) is either a command or an
    /// error, and an `events` list within limits is all that is kept.
    #[test]
    fn commands_parse_or_are_refused(value in json_value(), text in "\\PC{0,64}") {
        let _ = serde_json::from_str::<Command>(&text);
        if let Ok(cmd) = serde_json::from_value::<Command>(value) {
            if let Some(events) = cmd.events {
                let n = events.len();
                let long = events.iter().any(|e| e.len() > MAX_EVENT_TYPE_LEN);
                prop_assert_eq!(event_filter(events).is_ok(), n <= MAX_EVENT_TYPES && !long);
            }
        }
    }
}

/// The session cookie: a genuine signature is accepted, anything else —
/// random text, a tampered signature, another secret — never is.
#[test]
fn session_cookies_accept_only_genuine_signatures() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let store = CookieStore::new(
        &SessionConfig {
            secrets: vec!["fuzz secret".into()],
            ..SessionConfig::default()
        },
        &crier::config::RedisConfig {
            url: Some("redis://127.0.0.1:1".into()),
            ..Default::default()
        },
    )
    .expect("store");
    let headers = |cookie: &str| -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, HeaderValue::from_str(cookie).ok()?);
        Some(h)
    };
    let sign = |id: &str, secret: &str| {
        let signed = format!(
            "s:{id}.{}",
            crier::testing::auth::express_signature(id, secret)
        );
        percent_encoding::utf8_percent_encode(&signed, percent_encoding::NON_ALPHANUMERIC)
            .to_string()
    };
    proptest!(proptest_config(), |(
        id in "[A-Za-z0-9_\\-]{1,32}",
        noise in "[ -~]{0,80}",
        flip in 0usize..64,
    )| {
        let genuine = headers(&format!("a=1; connect.sid={}", sign(&id, "fuzz secret"))).expect("ascii");
        prop_assert_eq!(store.session_id(&genuine), Some(Ok(id.clone())));
        let forged = headers(&format!("connect.sid={}", sign(&id, "another secret"))).expect("ascii");
        prop_assert!(matches!(store.session_id(&forged), Some(Err(_))));
        // One character of the signature changed.
        let mut tampered = crier::testing::auth::express_signature(&id, "fuzz secret").into_bytes();
        let i = flip % tampered.len();
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let tampered = format!("s:{id}.{}", String::from_utf8(tampered).expect("ascii"));
        let h = headers(&format!("connect.sid={}", percent_encoding::utf8_percent_encode(&tampered, percent_encoding::NON_ALPHANUMERIC))).expect("ascii");
        prop_assert!(matches!(store.session_id(&h), Some(Err(_))));
        if let Some(h) = headers(&noise) {
            prop_assert!(!matches!(store.session_id(&h), Some(Ok(_))), "{noise:?} accepted");
        }
    });
}

/// The bearer header and the token inside it: random text is never a
/// principal, and a correctly signed token with any claims either verifies
/// (exactly when its times make sense) or is refused — never a panic.
#[test]
fn bearer_tokens_verify_only_when_genuine_and_well_formed() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let jwt = JwtConfig {
        secret: Some(SECRET.into()),
        ..JwtConfig::default()
    };
    let verifier = JwtVerifier::new(&jwt, Metrics::new()).expect("verifier");
    let mut config = Config::default();
    config.auth.jwt = Some(jwt);
    let auth = Authenticator::new(&config, Metrics::new()).expect("authenticator");
    let uri: http::Uri = "/sse?channel=a".parse().expect("uri");
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let exp = prop_oneof![
        Just(Value::Null),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        (0u64..100_000).prop_map(|ahead| json!(now() + ahead)),
        (0.0f64..100_000.0).prop_map(|ahead| json!(now() as f64 + ahead)),
        "\\PC{0,8}".prop_map(Value::String),
    ];
    proptest!(proptest_config(), |(
        header in "\\PC{0,120}",
        token in "[A-Za-z0-9_\\-.=]{0,200}",
        exp in exp,
        sub in prop_oneof![json_value(), "[a-z0-9]{1,8}".prop_map(Value::String)],
    )| {
        runtime.block_on(async {
            if let Ok(value) = HeaderValue::from_str(&header) {
                let mut h = HeaderMap::new();
                h.insert(http::header::AUTHORIZATION, value);
                prop_assert!(!matches!(auth.from_request(&h, &uri, std::net::Ipv4Addr::LOCALHOST.into()).await, Ok(Some(_))), "{header:?}");
            }
            prop_assert!(verifier.verify(&token).await.is_err(), "{token:?}");
            let claims = json!({"sub": sub, "exp": exp});
            let signed = encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign");
            let verified = verifier.verify(&signed).await;
            // jsonwebtoken allows `leeway` (5 s) past `exp`: around now, a
            // token may or may not verify; well ahead of now, it must.
            let in_range = |e: f64| e <= 253_402_300_799.0;
            let may_verify = exp.as_f64().is_some_and(|e| e >= now() as f64 - 7.0 && in_range(e));
            let must_verify = exp.as_f64().is_some_and(|e| e > now() as f64 + 7.0 && in_range(e));
            let valid_sub = matches!(&sub, Value::String(s) if !s.is_empty()) || sub.is_number();
            if let Ok(p) = &verified {
                prop_assert!(may_verify && valid_sub, "{claims} accepted as {p:?}");
                prop_assert!(p.expires_at.is_some());
            }
            if must_verify && valid_sub && exp.as_f64().is_some_and(|e| e < 1e15) {
                prop_assert!(verified.is_ok(), "{claims} refused: {verified:?}");
            }
            Ok(())
        })?;
    });
}
