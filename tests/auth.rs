//! Who may listen: bearer tokens, session cookies, channel rules, expiry,
//! origins and limits — against real Redis and real clients.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::crier::{test_config, Instance, WAIT};
use common::redis::RedisServer;
use common::sse;
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, Config, JwtConfig, SessionConfig, Subscribe};
use http::StatusCode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

const HS_SECRET: &str = "an-hs256-test-secret-of-32-bytes!!";
const ISSUER: &str = "https://auth.example.com";
const AUDIENCE: &str = "crier";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR")).into()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn rules() -> Vec<ChannelRule> {
    let rule = |pattern: &str, subscribe| ChannelRule {
        pattern: pattern.into(),
        subscribe,
        history: None,
        event_field: None,
        presence: false,
    };
    vec![
        rule("public:*", Subscribe::Anyone),
        rule("user:{user}", Subscribe::User),
        rule("org:{claim.org}:*", Subscribe::User),
        rule("ops:*", Subscribe::Claim),
    ]
}

fn jwt_config(algorithms: &[&str], public_key: Option<&str>) -> Config {
    let mut config = test_config(None);
    config.channels = rules();
    config.auth.jwt = Some(JwtConfig {
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        secret: algorithms
            .iter()
            .any(|a| a.starts_with("HS"))
            .then(|| HS_SECRET.into()),
        public_key_file: public_key.map(fixture_path),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        ..JwtConfig::default()
    });
    config
}

fn claims(user: &str, exp: u64) -> Value {
    json!({"sub": user, "exp": exp, "iss": ISSUER, "aud": AUDIENCE})
}

fn sign(alg: Algorithm, claims: &Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).expect("rsa"),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture("ec_private.pem")).expect("ec"),
        other => panic!("no test key for {other:?}"),
    };
    encode(&Header::new(alg), claims, &key).expect("sign")
}

fn sign_hs_with(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An SSE request with `token`; returns the status and the refusal reason.
async fn sse_with_token(
    crier: &Instance,
    channel: &str,
    token: &str,
) -> (StatusCode, Option<String>) {
    let auth = format!("Bearer {token}");
    let response = sse::connect(&crier.sse_url(&[channel]), &[("authorization", &auth)]).await;
    let status = response.status;
    if status == StatusCode::OK {
        return (status, None);
    }
    let challenge = response
        .headers
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    let body: Value = serde_json::from_str(&response.body_text().await).expect("json body");
    if status == StatusCode::UNAUTHORIZED {
        let reason = body["reason"].as_str().expect("reason").to_string();
        let challenge = challenge.expect("401 carries WWW-Authenticate");
        assert!(
            challenge.starts_with("Bearer") && challenge.contains(&reason),
            "{challenge}"
        );
        return (status, Some(reason));
    }
    (status, body["error"].as_str().map(str::to_owned))
}

/// Issue 21.8: a token in the URL while query tokens are off is not read;
/// the 401 says so and names the key that turns them on.
#[tokio::test]
async fn a_query_token_while_they_are_off_gets_a_hint() {
    let crier = Instance::start(jwt_config(&["HS256"], None)).await;
    let token = sign(Algorithm::HS256, &claims("42", now() + 600));
    let url = crier.http(&format!("/sse?channel=user:42&token={token}"));
    let response = sse::connect(&url, &[]).await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    let challenge = response
        .headers
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string())
        .expect("401 carries WWW-Authenticate");
    let body: Value = serde_json::from_str(&response.body_text().await).expect("json body");
    let reason = body["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("missing: ?token= is ignored"),
        "{reason}"
    );
    assert!(reason.contains("auth.query_token = true"), "{reason}");
    assert!(challenge.contains(reason), "{challenge}");
    // The same on WebSocket.
    let refused = WsClient::try_connect(
        &crier.ws(&format!("/ws?channel=user:42&token={token}")),
        &[],
    )
    .await
    .err()
    .expect("refused");
    let tungstenite::Error::Http(response) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(body.contains("auth.query_token = true"), "{body}");
    // Without a token in the URL: the plain reason.
    let response = sse::connect(&crier.sse_url(&["user:42"]), &[]).await;
    let body: Value = serde_json::from_str(&response.body_text().await).expect("json body");
    assert_eq!(body["reason"], "missing");
    // With query tokens on, the token is read.
    let mut config = jwt_config(&["HS256"], None);
    config.auth.query_token = true;
    let on = Instance::start(config).await;
    let response = sse::connect(
        &on.http(&format!("/sse?channel=user:42&token={token}")),
        &[],
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);
}

/// Acceptance 1: HS256, RS256 and ES256 tokens; every way a token can be
/// wrong is refused with its reason, and nothing is subscribed.
#[tokio::test]
async fn tokens_are_verified_and_refusals_carry_the_reason() {
    let crier = Instance::start(jwt_config(&["HS256", "RS256"], Some("rsa_public.pem"))).await;
    let exp = now() + 600;
    let ch = "user:42";
    for alg in [Algorithm::HS256, Algorithm::RS256] {
        let (status, _) = sse_with_token(&crier, ch, &sign(alg, &claims("42", exp))).await;
        assert_eq!(status, StatusCode::OK, "{alg:?}");
    }

    let mut expired = claims("42", now() - 120);
    let refused = [
        (sign(Algorithm::HS256, &expired), "expired"),
        (
            sign(Algorithm::HS256, &{
                let mut c = claims("42", exp);
                c["nbf"] = json!(now() + 120);
                c
            }),
            "not_yet_valid",
        ),
        (
            sign(Algorithm::RS256, &{
                let mut c = claims("42", exp);
                c["iss"] = json!("https://evil.example.com");
                c
            }),
            "bad_issuer",
        ),
        (
            sign(Algorithm::HS256, &{
                let mut c = claims("42", exp);
                c["aud"] = json!("someone-else");
                c
            }),
            "bad_audience",
        ),
        (
            sign_hs_with(b"another-secret-of-at-least-32-bytes", &claims("42", exp)),
            "bad_signature",
        ),
        (
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT"}"#),
                b64(claims("42", exp).to_string().as_bytes())
            ),
            "bad_algorithm",
        ),
        (
            sign(
                Algorithm::HS256,
                &json!({"sub": "42", "iss": ISSUER, "aud": AUDIENCE}),
            ),
            "missing_claim",
        ),
        ("not-a-jwt".to_string(), "malformed"),
        // A configured issuer and audience must be present, not just match.
        (
            sign(
                Algorithm::HS256,
                &json!({"sub": "42", "exp": exp, "aud": AUDIENCE}),
            ),
            "missing_claim",
        ),
        (
            sign(
                Algorithm::HS256,
                &json!({"sub": "42", "exp": exp, "iss": ISSUER}),
            ),
            "missing_claim",
        ),
    ];
    for (token, reason) in &refused {
        assert_eq!(
            sse_with_token(&crier, ch, token).await,
            (StatusCode::UNAUTHORIZED, Some(reason.to_string())),
            "{reason}"
        );
    }
    // The WebSocket upgrade is refused the same way, before upgrading.
    expired["sub"] = json!("42");
    let auth = format!("Bearer {}", sign(Algorithm::HS256, &expired));
    match WsClient::try_connect(&crier.ws("/ws"), &[("authorization", &auth)]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), StatusCode::UNAUTHORIZED),
        other => panic!("expected 401, got {:?}", other.map(|_| "a connection")),
    }
    assert_eq!(
        crier.metric("crier_subscriptions").await,
        0.0,
        "nothing subscribed"
    );
    assert_eq!(
        crier
            .metric("crier_auth_failures_total{reason=\"expired\"}")
            .await,
        2.0
    );
    assert_eq!(
        crier
            .metric("crier_auth_failures_total{reason=\"bad_algorithm\"}")
            .await,
        1.0
    );

    // ES256 only: RS256 tokens, and HS256 "signed" with the public key
    // (algorithm confusion), are refused as bad algorithms.
    let es = Instance::start(jwt_config(&["ES256"], Some("ec_public.pem"))).await;
    let (status, _) = sse_with_token(&es, ch, &sign(Algorithm::ES256, &claims("42", exp))).await;
    assert_eq!(status, StatusCode::OK);
    let confused = sign_hs_with(&fixture("ec_public.pem"), &claims("42", exp));
    assert_eq!(
        sse_with_token(&es, ch, &confused).await,
        (StatusCode::UNAUTHORIZED, Some("bad_algorithm".into()))
    );
    let rs = sign(Algorithm::RS256, &claims("42", exp));
    assert_eq!(
        sse_with_token(&es, ch, &rs).await,
        (StatusCode::UNAUTHORIZED, Some("bad_algorithm".into()))
    );

    // With the RSA public key as an HMAC secret, on an instance that does
    // accept HS256: the signature is simply wrong.
    let confused = sign_hs_with(&fixture("rsa_public.pem"), &claims("42", exp));
    assert_eq!(
        sse_with_token(&crier, ch, &confused).await,
        (StatusCode::UNAUTHORIZED, Some("bad_signature".into()))
    );
}

/// The `Cookie` header express-session sets.
fn express_cookie(id: &str, secret: &str) -> String {
    format!(
        "connect.sid={}",
        common::browser::express_cookie_value(id, secret)
    )
}

/// What connect-redis stores for a logged-in passport session.
fn session_json(user: u64, expires_in: i64) -> String {
    let expires = SystemTime::now() + Duration::from_secs(expires_in.unsigned_abs());
    let expires = if expires_in < 0 {
        SystemTime::now() - Duration::from_secs(expires_in.unsigned_abs())
    } else {
        expires
    };
    json!({
        "cookie": {
            "originalMaxAge": 86_400_000,
            "expires": humantime::format_rfc3339_millis(expires).to_string(),
            "secure": false, "httpOnly": true, "path": "/"
        },
        "passport": {"user": user}
    })
    .to_string()
}

fn session_config(redis: &RedisServer) -> Config {
    let mut config = test_config(Some(redis.url()));
    config.channels = rules();
    config.auth.session = Some(SessionConfig {
        secrets: vec!["keyboard cat".into(), "old keyboard cat".into()],
        ..SessionConfig::default()
    });
    config
}

async fn keyspace_lookups(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "stats"]).await;
    ["keyspace_hits:", "keyspace_misses:"]
        .iter()
        .map(|field| {
            info.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("INFO stats field")
        })
        .sum()
}

/// Acceptance 2: express-session cookies against the app's Redis store.
#[tokio::test]
async fn express_session_cookie_identifies_the_user() {
    let redis = RedisServer::start().await;
    let crier = Instance::start(session_config(&redis)).await;
    let id = "hUcIEaZcwMJmB3Mt1pmIy0DO-Jn0aExy";
    redis
        .cli(&["SET", &format!("sess:{id}"), &session_json(42, 3600)])
        .await;

    let cookie = express_cookie(id, "keyboard cat");
    let mut events = sse::connect(&crier.sse_url(&["user:42"]), &[("cookie", &cookie)])
        .await
        .into_events();
    redis
        .publish("user:42", r#"{"type":"note","for":42}"#)
        .await;
    assert_eq!(
        events.next_message(WAIT).await.expect("event").json()["data"]["for"],
        42
    );
    let other = sse::connect(&crier.sse_url(&["user:43"]), &[("cookie", &cookie)]).await;
    assert_eq!(
        other.status,
        StatusCode::FORBIDDEN,
        "user 42 cannot hear user 43"
    );

    let rotated = express_cookie(id, "old keyboard cat");
    let ok = sse::connect(&crier.sse_url(&["user:42"]), &[("cookie", &rotated)]).await;
    assert_eq!(ok.status, StatusCode::OK, "second secret still accepted");

    let reason = |response: sse::SseResponse| async move {
        assert_eq!(response.status, StatusCode::UNAUTHORIZED);
        let body: Value = serde_json::from_str(&response.body_text().await).expect("json");
        body["reason"].as_str().expect("reason").to_string()
    };

    let lookups = keyspace_lookups(&redis).await;
    let tampered = express_cookie(id, "guessed secret");
    let r = sse::connect(&crier.sse_url(&["user:42"]), &[("cookie", &tampered)]).await;
    assert_eq!(reason(r).await, "bad_signature");
    let unsigned = format!("connect.sid={id}");
    let r = sse::connect(&crier.sse_url(&["user:42"]), &[("cookie", &unsigned)]).await;
    assert_eq!(reason(r).await, "bad_signature");
    assert_eq!(
        keyspace_lookups(&redis).await,
        lookups,
        "forged cookies are refused without asking Redis"
    );

    let unknown = express_cookie("no-such-session", "keyboard cat");
    let r = sse::connect(&crier.sse_url(&["user:42"]), &[("cookie", &unknown)]).await;
    assert_eq!(reason(r).await, "unknown_session");

    let old = "expired-session-id";
    redis
        .cli(&["SET", &format!("sess:{old}"), &session_json(42, -60)])
        .await;
    let r = sse::connect(
        &crier.sse_url(&["user:42"]),
        &[("cookie", &express_cookie(old, "keyboard cat"))],
    )
    .await;
    assert_eq!(reason(r).await, "expired");
}

/// Acceptance 3: `{user}`, `{claim.org}` and `claim` rules; no rule means
/// forbidden; anonymous clients are asked to authenticate.
#[tokio::test]
async fn channel_rules_follow_the_principal() {
    let crier = Instance::start(jwt_config(&["HS256"], None)).await;
    let mut c = claims("42", now() + 600);
    c["org"] = json!("acme");
    c["channels"] = json!(["ops:deploys", "ops:db:*"]);
    let auth = format!("Bearer {}", sign(Algorithm::HS256, &c));
    let mut ws = WsClient::try_connect(&crier.ws("/ws"), &[("authorization", &auth)])
        .await
        .expect("authenticated upgrade");
    let cases = [
        ("user:42", "subscribed"),
        ("user:43", "forbidden"),
        ("org:acme:news", "subscribed"),
        ("org:globex:news", "forbidden"),
        ("ops:deploys", "subscribed"),
        ("ops:db:primary", "subscribed"),
        ("ops:billing", "forbidden"),
        ("private:x", "forbidden"),
        ("public:lobby", "subscribed"),
    ];
    for (i, (channel, expected)) in cases.iter().enumerate() {
        let reply = ws.subscribe(channel, i as u64).await;
        let got = reply["code"]
            .as_str()
            .unwrap_or(reply["type"].as_str().unwrap_or_default());
        assert_eq!(got, *expected, "{channel}: {reply}");
        if *expected == "forbidden" {
            assert_eq!(reply["reason"], "forbidden", "says nothing more");
        }
    }

    let mut anonymous = WsClient::connect(&crier.ws("/ws")).await;
    let refusal = anonymous.subscribe("user:42", 1).await;
    assert_eq!(
        (refusal["code"].clone(), refusal["reason"].clone()),
        (json!("unauthorized"), json!("missing"))
    );
    assert_eq!(
        anonymous.subscribe("private:x", 2).await["code"],
        "forbidden"
    );
    assert_eq!(
        anonymous.subscribe("public:lobby", 3).await["type"],
        "subscribed"
    );
    let r = sse::connect(&crier.sse_url(&["user:42"]), &[]).await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "SSE asks for credentials"
    );
}

/// Acceptance 4 (tokens): `expiring`, then close 4001 / `expired`; an
/// `auth` with a fresh token keeps a WebSocket open.
#[tokio::test]
async fn expiring_tokens_warn_then_close_unless_refreshed() {
    let mut config = jwt_config(&["HS256"], None);
    config.auth.expiring_notice = Duration::from_secs(2);
    let crier = Instance::start(config).await;
    let soon = sign(Algorithm::HS256, &claims("42", now() + 3));
    let auth = format!("Bearer {soon}");

    let mut stale = WsClient::try_connect(
        &crier.ws("/ws?channel=user:42"),
        &[("authorization", &auth)],
    )
    .await
    .expect("upgrade");
    let mut refreshed = WsClient::try_connect(
        &crier.ws("/ws?channel=user:42"),
        &[("authorization", &auth)],
    )
    .await
    .expect("upgrade");
    let mut events = sse::connect(&crier.sse_url(&["user:42"]), &[("authorization", &auth)])
        .await
        .into_events();

    let warning = refreshed.recv_type("expiring", WAIT).await;
    assert!(
        warning["in_secs"].as_u64().expect("in_secs") <= 2,
        "{warning}"
    );
    let fresh = sign(Algorithm::HS256, &claims("42", now() + 600));
    refreshed
        .send_json(json!({"type": "auth", "token": fresh, "id": 9}))
        .await;
    let ok = refreshed.recv_type("authenticated", WAIT).await;
    assert_eq!(
        (ok["user"].clone(), ok["id"].clone()),
        (json!("42"), json!(9))
    );

    assert_eq!(stale.recv_type("expiring", WAIT).await["type"], "expiring");
    let (code, reason, _) = stale.expect_close(WAIT).await;
    assert_eq!((code, reason.as_str()), (4001, "expired"));

    let mut names = Vec::new();
    while let Some(e) = events.next_event(WAIT).await {
        names.extend(e.event);
    }
    assert_eq!(names, vec!["expiring", "expired"], "SSE warns, then ends");

    // Past the first token's expiry, the refreshed socket still works.
    refreshed.send_json(json!({"type": "ping", "id": 10})).await;
    assert_eq!(refreshed.recv_type("pong", WAIT).await["id"], 10);
    // A token for somebody else is not a refresh.
    let other = sign(Algorithm::HS256, &claims("43", now() + 600));
    refreshed
        .send_json(json!({"type": "auth", "token": other, "id": 11}))
        .await;
    let refusal = refreshed.recv_type("error", WAIT).await;
    assert_eq!(
        (refusal["code"].clone(), refusal["reason"].clone()),
        (json!("unauthorized"), json!("user_mismatch"))
    );
}

/// Acceptance 4 (sessions): deleting the session (logout) closes its
/// connections within the recheck interval.
#[tokio::test]
async fn logout_closes_session_connections() {
    let redis = RedisServer::start().await;
    let mut config = session_config(&redis);
    if let Some(session) = &mut config.auth.session {
        session.recheck = Duration::from_millis(200);
    }
    let crier = Instance::start(config).await;
    let id = unique("sid").replace(':', "-");
    redis
        .cli(&["SET", &format!("sess:{id}"), &session_json(7, 3600)])
        .await;
    let cookie = express_cookie(&id, "keyboard cat");
    let mut events = sse::connect(&crier.sse_url(&["user:7"]), &[("cookie", &cookie)])
        .await
        .into_events();
    let mut ws = WsClient::try_connect(&crier.ws("/ws?channel=user:7"), &[("cookie", &cookie)])
        .await
        .expect("upgrade");
    ws.recv_type("subscribed", WAIT).await;

    // A busy channel: the recheck must not starve behind deliveries.
    let url = redis.url();
    let busy = tokio::spawn(async move {
        let client = redis::Client::open(url).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        for n in 0u64.. {
            let _: Result<i64, _> = redis::cmd("PUBLISH")
                .arg("user:7")
                .arg(n)
                .query_async(&mut conn)
                .await;
        }
    });
    let reader = tokio::spawn(async move {
        let mut names = Vec::new();
        while let Some(e) = events.next_event(WAIT).await {
            names.extend(e.event);
        }
        names
    });
    redis.cli(&["DEL", &format!("sess:{id}")]).await;
    let (code, _, _) = ws.expect_close(WAIT).await;
    assert_eq!(code, 4001);
    let names = reader.await.expect("reader");
    busy.abort();
    assert_eq!(
        names.last().map(String::as_str),
        Some("expired"),
        "{:?}",
        names.last()
    );
}

/// Acceptance 5: allowed origins connect, others get 403; SSE CORS carries
/// credentials only for allowed origins.
#[tokio::test]
async fn origins_are_checked_and_drive_cors() {
    let mut config = test_config(None);
    config.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.example.net".into(),
    ];
    let crier = Instance::start(config).await;
    let channel = unique("public:cors");

    let ok =
        WsClient::try_connect(&crier.ws("/ws"), &[("origin", "https://app.example.com")]).await;
    assert!(ok.is_ok(), "allowed origin connects");
    match WsClient::try_connect(&crier.ws("/ws"), &[("origin", "https://evil.example.org")]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), StatusCode::FORBIDDEN),
        other => panic!("expected 403, got {:?}", other.map(|_| "a connection")),
    }

    let allowed = sse::connect(
        &crier.sse_url(&[&channel]),
        &[("origin", "https://eu.example.net")],
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(
        allowed.headers["access-control-allow-origin"],
        "https://eu.example.net"
    );
    assert_eq!(allowed.headers["access-control-allow-credentials"], "true");
    let foreign = sse::connect(
        &crier.sse_url(&[&channel]),
        &[("origin", "https://evil.example.org")],
    )
    .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert!(foreign.headers.get("access-control-allow-origin").is_none());
    let plain = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(
        plain.status,
        StatusCode::OK,
        "non-browser clients are not refused"
    );
    assert!(plain
        .headers
        .get("access-control-allow-credentials")
        .is_none());
}

/// Issue 9.13: a page on an allowed origin may publish from the browser:
/// `OPTIONS /api/publish` answers the preflight, and the answer to the
/// POST carries the CORS headers; other origins are refused.
#[tokio::test]
async fn publish_api_answers_cors_preflight_for_allowed_origins() {
    let key = "cors-publish-key-0123456789";
    let mut config = test_config(None);
    config.allowed_origins = vec!["https://app.example.com".into()];
    config.publish.api_keys = vec![key.into()];
    let crier = Instance::start(config).await;
    let url = crier.http("/api/publish");
    let preflight = |origin: &'static str| {
        let url = url.clone();
        async move {
            let headers = [
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ];
            common::send_request(http::Method::OPTIONS, &url, &headers, bytes::Bytes::new())
                .await
                .0
        }
    };

    let ok = preflight("https://app.example.com").await;
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "POST");
    let allowed_headers = h["access-control-allow-headers"].to_str().expect("ascii");
    for name in ["authorization", "content-type"] {
        assert!(allowed_headers.contains(name), "{allowed_headers}");
    }
    let refused = preflight("https://evil.example.org").await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    // The request itself: its answer is readable by the allowed page.
    let channel = unique("public:cors-publish");
    let mut events = sse::connect(&crier.sse_url(&[&channel]), &[])
        .await
        .into_events();
    let body = json!({"channel": channel, "data": {"type": "from.page"}}).to_string();
    let (response, _conn) = common::send_request(
        http::Method::POST,
        &url,
        &[
            ("origin", "https://app.example.com"),
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {key}")),
        ],
        bytes::Bytes::from(body),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let e = events.next_message(WAIT).await.expect("open");
    assert_eq!(e.event.as_deref(), Some("from.page"));
}

/// Acceptance 6: per-user and per-IP limits answer 429 and free up again;
/// a command flood gets `rate_limited`, then close 1008.
#[tokio::test]
async fn per_user_and_per_ip_limits_and_command_rate() {
    let mut config = jwt_config(&["HS256"], None);
    config.limits.max_connections_per_user = 2;
    config.limits.commands_per_second = 1;
    config.limits.command_burst = 3;
    let crier = Instance::start(config).await;
    let auth = format!(
        "Bearer {}",
        sign(Algorithm::HS256, &claims("42", now() + 600))
    );
    let url = crier.sse_url(&["user:42"]);
    let first = sse::connect(&url, &[("authorization", &auth)]).await;
    let second = sse::connect(&url, &[("authorization", &auth)]).await;
    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = sse::connect(&url, &[("authorization", &auth)]).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    let body: Value = serde_json::from_str(&third.body_text().await).expect("json");
    assert_eq!(body["error"], "too_many_connections");
    // Signing in later, over an anonymous WebSocket, counts the same.
    let mut late = WsClient::connect(&crier.ws("/ws")).await;
    late.recv_type("welcome", WAIT).await;
    let token = sign(Algorithm::HS256, &claims("42", now() + 600));
    late.send_json(json!({"type": "auth", "token": token, "id": 1}))
        .await;
    let refusal = late.recv_type("error", WAIT).await;
    assert_eq!(refusal["code"], "too_many_connections", "{refusal}");
    assert_eq!(
        late.subscribe("user:42", 2).await["code"],
        "unauthorized",
        "still anonymous"
    );
    drop(late);
    drop(first);
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 1.0)
        .await;
    let again = sse::connect(&url, &[("authorization", &auth)]).await;
    assert_eq!(again.status, StatusCode::OK, "a freed slot is usable");

    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.recv_type("welcome", WAIT).await;
    for i in 0..3 {
        ws.send_json(json!({"type": "ping", "id": i})).await;
    }
    ws.send_json(json!({"type": "ping", "id": 3})).await;
    for i in 0..3 {
        assert_eq!(ws.recv_json(WAIT).await, json!({"type": "pong", "id": i}));
    }
    assert_eq!(ws.recv_json(WAIT).await["code"], "rate_limited");
    for i in 0..20 {
        ws.send_json(json!({"type": "ping", "id": 100 + i})).await;
    }
    let (code, _, _) = ws.expect_close(WAIT).await;
    assert_eq!(code, 1008);

    let mut per_ip = test_config(None);
    per_ip.limits.max_connections_per_ip = 1;
    let crier = Instance::start(per_ip).await;
    let channel = unique("public:ip");
    let one = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(one.status, StatusCode::OK);
    let two = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(two.status, StatusCode::TOO_MANY_REQUESTS);
    drop(one);
    crier
        .wait_metric("crier_connections{transport=\"sse\"}", 0.0)
        .await;
    let three = sse::connect(&crier.sse_url(&[&channel]), &[]).await;
    assert_eq!(three.status, StatusCode::OK);
}

/// Issue 8, point 2: a correctly signed token whose `exp` is past what a
/// clock can hold is refused as a bad credential (401 / WS `error`), never
/// a panic that drops the connection.
#[tokio::test]
async fn out_of_range_token_times_are_refused_not_panicked_on() {
    let crier = Instance::start(jwt_config(&["HS256"], None)).await;
    for exp in [
        json!(9_223_372_036_854_775_808u64),
        json!(u64::MAX),
        json!(1e300),
    ] {
        let mut c = claims("42", 0);
        c["exp"] = exp.clone();
        let token = sign(Algorithm::HS256, &c);
        let (status, reason) = sse_with_token(&crier, "user:42", &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "exp {exp}");
        assert!(
            // jsonwebtoken itself reads an `exp` it cannot parse as absent.
            matches!(reason.as_deref(), Some("invalid_claim" | "missing_claim")),
            "exp {exp}: {reason:?}"
        );

        let mut ws = WsClient::connect(&crier.ws("/ws")).await;
        ws.send_json(json!({"type": "auth", "token": token, "id": 1}))
            .await;
        let refusal = ws.recv_type("error", WAIT).await;
        assert_eq!(refusal["code"], "unauthorized", "exp {exp}: {refusal}");
        // The socket is still usable: nothing panicked under it.
        ws.send_json(json!({"type": "ping", "id": 2})).await;
        assert_eq!(ws.recv_type("pong", WAIT).await["id"], 2);
    }
    let mut c = claims("42", now() + 600);
    c["nbf"] = json!(u64::MAX);
    let (status, _) = sse_with_token(&crier, "user:42", &sign(Algorithm::HS256, &c)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "nbf out of range");
}

/// Issue 8, point 3: `exp` as a float (RFC 7519 NumericDate) is honoured by
/// the expiry watch: `expiring`, then the end, over SSE and WebSocket.
#[tokio::test]
async fn float_expiry_is_watched_like_an_integer_one() {
    let mut config = jwt_config(&["HS256"], None);
    config.auth.expiring_notice = Duration::from_secs(2);
    let crier = Instance::start(config).await;
    let mut c = claims("42", 0);
    c["exp"] = json!(now() as f64 + 3.5);
    let auth = format!("Bearer {}", sign(Algorithm::HS256, &c));

    let mut ws = WsClient::try_connect(
        &crier.ws("/ws?channel=user:42"),
        &[("authorization", &auth)],
    )
    .await
    .expect("upgrade");
    let mut events = sse::connect(&crier.sse_url(&["user:42"]), &[("authorization", &auth)])
        .await
        .into_events();
    assert_eq!(ws.recv_type("expiring", WAIT).await["type"], "expiring");
    let (code, reason, _) = ws.expect_close(WAIT).await;
    assert_eq!((code, reason.as_str()), (4001, "expired"));
    let names: Vec<String> = events
        .expect_end(WAIT)
        .await
        .into_iter()
        .filter_map(|e| e.event)
        .collect();
    assert_eq!(names, vec!["expiring", "expired"], "SSE warns, then ends");
}

/// Issue 8, point 12: refreshing to a token that grants fewer channels
/// ends the subscriptions it no longer grants, and nothing more is heard
/// on them.
#[tokio::test]
async fn a_refresh_with_fewer_grants_ends_those_subscriptions() {
    const KEY: &str = "a-publish-api-key-for-this-test-0123";
    let mut config = jwt_config(&["HS256"], None);
    config.publish.api_keys = vec![KEY.into()];
    let crier = Instance::start(config).await;
    let (kept, dropped) = (unique("ops:kept"), unique("ops:dropped"));
    let mut wide = claims("42", now() + 600);
    wide["channels"] = json!([kept, dropped]);
    let mut ws = WsClient::connect(&crier.ws("/ws")).await;
    ws.send_json(json!({"type": "auth", "token": sign(Algorithm::HS256, &wide), "id": 1}))
        .await;
    ws.recv_type("authenticated", WAIT).await;
    assert_eq!(ws.subscribe(&kept, 2).await["type"], "subscribed");
    assert_eq!(ws.subscribe(&dropped, 3).await["type"], "subscribed");

    let mut narrow = wide.clone();
    narrow["channels"] = json!([kept]);
    ws.send_json(json!({"type": "auth", "token": sign(Algorithm::HS256, &narrow), "id": 4}))
        .await;
    ws.recv_type("authenticated", WAIT).await;
    let ended = ws.recv_type("unsubscribed", WAIT).await;
    assert_eq!(
        ended,
        json!({"type": "unsubscribed", "channel": dropped, "reason": "forbidden"})
    );
    for (channel, n) in [(&dropped, 1), (&kept, 2)] {
        let status = crier
            .publish_api(channel, &format!(r#"{{"n":{n}}}"#), Some(KEY))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let message = ws.recv_type("message", WAIT).await;
    assert_eq!(
        (message["channel"].clone(), message["data"]["n"].clone()),
        (json!(kept), json!(2)),
        "only the still granted channel is heard"
    );
}

/// Issue 8, point 1, over real SSE: with `home:{user}:*`, a user id that
/// holds the rule's separator cannot claim another user's channels, and
/// each user still hears their own.
#[tokio::test]
async fn placeholder_values_cannot_reach_into_another_users_channels() {
    let mut config = jwt_config(&["HS256"], None);
    config.channels = vec![ChannelRule {
        pattern: "home:{user}:*".into(),
        subscribe: Subscribe::User,
        history: None,
        event_field: None,
        presence: false,
    }];
    let crier = Instance::start(config).await;
    let exp = now() + 600;
    let a = sign(Algorithm::HS256, &claims("a", exp));
    let ab = sign(Algorithm::HS256, &claims("a:b", exp));
    // `home:a:b:inbox` is under `home:a:*`: user `a`'s.
    assert_eq!(
        sse_with_token(&crier, "home:a:b:inbox", &a).await.0,
        StatusCode::OK
    );
    // User `a:b` would have matched it too (and `home:a:*` as a whole).
    for channel in ["home:a:b:inbox", "home:a:inbox"] {
        let (status, reason) = sse_with_token(&crier, channel, &ab).await;
        assert_eq!(
            (status, reason.as_deref()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{channel}"
        );
    }
}

/// Issue 20: an RSA `public_key_file` under 2048 bits (RFC 7518 §3.3) is
/// a configuration error naming the field (exit 64); the 2048-bit fixture
/// passes the same check.
#[tokio::test]
async fn an_rsa_public_key_under_2048_bits_is_a_configuration_error() {
    let dir = tempfile::tempdir().expect("dir");
    let toml = |key: &str| {
        format!(
            "[auth.jwt]\nalgorithms = [\"RS256\"]\npublic_key_file = \"{}\"\n",
            fixture_path(key).display()
        )
    };
    common::crier::check_config_refuses(
        dir.path(),
        &toml("rsa1024_public.pem"),
        "auth.jwt.public_key_file",
    )
    .await;
    let file = dir.path().join("good.toml");
    std::fs::write(&file, toml("rsa_public.pem")).expect("config");
    let out = common::crier::crier_command()
        .args(["check-config", "--config", file.to_str().expect("path")])
        .output()
        .await
        .expect("check-config");
    assert_eq!(
        out.status.code(),
        Some(0),
        "2048 bits: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
