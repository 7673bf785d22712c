//! Bearer tokens signed by keys an identity provider publishes (JWKS), with
//! a real local IdP (tests/common/idp.rs) over HTTPS with a CA the test
//! makes: rotation without a restart, a bounded cost for forged `kid`s,
//! algorithm confusion refused, and the last good key set kept while the
//! IdP is down or answers garbage.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::crier::{rule, test_config, Instance, Process, WAIT};
use common::idp::{Idp, Mode, SigningKey};
use common::sse;
use crier::config::{Config, JwtConfig, Subscribe};
use http::StatusCode;
use jsonwebtoken::jwk::KeyAlgorithm;
use serde_json::{json, Value};

const CHANNEL: &str = "user:42";

fn claims() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    json!({"sub": "42", "exp": now + 600, "iss": "test-idp"})
}

fn jwks_config(idp: &Idp, dir: &std::path::Path, algorithms: &[&str]) -> Config {
    let mut config = test_config(None);
    config.channels = vec![rule("user:{user}", Subscribe::User)];
    let ca_file = idp
        .ca_pem
        .as_ref()
        .map(|pem| common::pki::write(dir, "idp-ca.pem", pem));
    config.auth.jwt = Some(JwtConfig {
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        jwks_url: Some(idp.jwks_url()),
        jwks_ca_file: ca_file,
        jwks_refresh: Duration::from_secs(3600),
        jwks_unknown_kid_interval: Duration::from_millis(300),
        issuer: Some("test-idp".into()),
        ..JwtConfig::default()
    });
    config
}

/// The status of an SSE request with `token`, and the refusal reason.
async fn try_token(crier_sse: &str, token: &str) -> (StatusCode, Option<String>) {
    let auth = format!("Bearer {token}");
    let response = sse::connect(crier_sse, &[("authorization", &auth)]).await;
    let status = response.status;
    if status == StatusCode::OK {
        return (status, None);
    }
    let body: Value = serde_json::from_str(&response.body_text().await).unwrap_or(Value::Null);
    (status, body["reason"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn keys_rotate_at_the_idp_without_a_restart() {
    let idp = Idp::start(true).await;
    let (old, new) = (SigningKey::ec("k-old"), SigningKey::ec("k-new"));
    idp.set_keys(&[&old]);
    let dir = tempfile::tempdir().expect("dir");
    let crier = Instance::start(jwks_config(&idp, dir.path(), &["ES256"])).await;
    let url = crier.sse_url(&[CHANNEL]);

    assert_eq!(
        try_token(&url, &old.sign(&claims())).await,
        (StatusCode::OK, None)
    );
    // The IdP rotates: a token with the new kid makes crier fetch the set
    // again, and is accepted.
    idp.set_keys(&[&new]);
    common::eventually("a token with the new kid is accepted", WAIT, || async {
        try_token(&url, &new.sign(&claims())).await.0 == StatusCode::OK
    })
    .await;
    // The old kid is gone from the refreshed set: refused.
    let refused = try_token(&url, &old.sign(&claims())).await;
    assert_eq!(
        refused,
        (StatusCode::UNAUTHORIZED, Some("unknown_key".into()))
    );
    // A token signed by the new key but naming the old kid, and one naming
    // the new kid but signed by the old key.
    let (status, _) = try_token(&url, &old.sign_as(Some("k-new"), &claims())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    crier.shutdown().await;
}

#[tokio::test]
async fn forged_kids_cost_a_bounded_number_of_fetches_and_confusion_is_refused() {
    let idp = Idp::start(false).await;
    let rsa = SigningKey::rsa("rsa-1");
    let ec = SigningKey::ec("ec-1");
    let mislabelled = SigningKey::ec("ec-claims-es384");
    idp.set_jwks(vec![
        rsa.jwk.clone(),
        ec.jwk.clone(),
        mislabelled.jwk_claiming(KeyAlgorithm::ES384),
    ]);
    let dir = tempfile::tempdir().expect("dir");
    let mut config = jwks_config(&idp, dir.path(), &["RS256", "ES256"]);
    if let Some(jwt) = &mut config.auth.jwt {
        // One fetch for unknown kids per hour: the burst below gets one.
        jwt.jwks_unknown_kid_interval = Duration::from_secs(3600);
    }
    let crier = Instance::start(config).await;
    let url = crier.sse_url(&[CHANNEL]);
    // Both families from one key set.
    assert_eq!(
        try_token(&url, &rsa.sign(&claims())).await.0,
        StatusCode::OK
    );
    assert_eq!(try_token(&url, &ec.sign(&claims())).await.0, StatusCode::OK);
    let before = idp.fetches();

    // 1,000 tokens with random unknown kids, all at once.
    let burst: Vec<_> = (0..1000)
        .map(|i| {
            let (url, token) = (
                url.clone(),
                ec.sign_as(Some(&format!("forged-{i}-{}", rand_suffix())), &claims()),
            );
            tokio::spawn(async move { try_token(&url, &token).await })
        })
        .collect();
    for task in burst {
        let (status, reason) = task.await.expect("request");
        assert_eq!(
            (status, reason.as_deref()),
            (StatusCode::UNAUTHORIZED, Some("unknown_key"))
        );
    }
    let fetched = idp.fetches() - before;
    assert!(
        fetched <= 1,
        "1,000 forged kids caused {fetched} fetches (the bound is 1 per interval)"
    );

    // `alg: none`, HS256 "signed" with the RSA public key, and a key whose
    // own `alg` disagrees with the token's.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "rsa-1"})),
        b64(&claims())
    );
    let public_pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rsa_public.pem"
    ))
    .expect("public key");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .expect("sign");
    let disagreeing = mislabelled.sign(&claims());
    for token in [none, confused, disagreeing] {
        let refused = try_token(&url, &token).await;
        assert_eq!(
            refused,
            (StatusCode::UNAUTHORIZED, Some("bad_algorithm".into())),
            "{token}"
        );
    }
    crier.shutdown().await;
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn rand_suffix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos()
        .into()
}

#[tokio::test]
async fn the_last_good_key_set_is_kept_while_the_idp_fails() {
    let idp = Idp::start(false).await;
    let key = SigningKey::ec("k1");
    idp.set_keys(&[&key]);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("crier.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[[channels]]
pattern = "user:{{user}}"
subscribe = "user"
[auth.jwt]
algorithms = ["ES256"]
jwks_url = "{}"
jwks_refresh = "200ms"
issuer = "test-idp"
"#,
            idp.jwks_url()
        ),
    )
    .expect("config");
    let crier = Process::start(&["--config", file.to_str().expect("path")], &[]).await;
    let url = crier.http(&format!("/sse?channel={CHANNEL}"));
    let metric = |result: &'static str| {
        let metrics_url = crier.http("/metrics");
        async move {
            let (_, text) = common::http_get(&metrics_url).await;
            common::crier::metric_value(
                &text,
                &format!("crier_jwks_fetches_total{{result=\"{result}\"}}"),
            )
        }
    };
    common::eventually("the key set is fetched", WAIT, || async {
        metric("ok").await >= 1.0
    })
    .await;
    assert_eq!(
        try_token(&url, &key.sign(&claims())).await.0,
        StatusCode::OK
    );

    for mode in [Mode::Down, Mode::Garbage] {
        idp.set_mode(mode);
        let failed = metric("error").await;
        common::eventually("a failed refresh is counted", WAIT, || async {
            metric("error").await > failed
        })
        .await;
        let (status, reason) = try_token(&url, &key.sign(&claims())).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{mode:?}: the known kid still works ({reason:?})"
        );
    }
    let log = crier.log_text();
    assert!(
        log.contains("JWKS fetch failed: keeping the last good key set"),
        "the log says so: {log}"
    );
    assert!(log.contains("503"), "the log says why (down): {log}");
    assert!(
        log.contains("not a JWK set"),
        "the log says why (garbage): {log}"
    );
}

#[tokio::test]
async fn issuer_discovery_finds_the_key_set() {
    let idp = Idp::start(false).await;
    let key = SigningKey::ec("k1");
    idp.set_keys(&[&key]);
    let dir = tempfile::tempdir().expect("dir");
    let mut config = jwks_config(&idp, dir.path(), &["ES256"]);
    if let Some(jwt) = &mut config.auth.jwt {
        jwt.jwks_url = None;
        jwt.issuer_discovery = true;
        jwt.issuer = Some(idp.base.clone());
    }
    let crier = Instance::start(config).await;
    let mut claims = claims();
    claims["iss"] = json!(idp.base);
    let url = crier.sse_url(&[CHANNEL]);
    assert_eq!(try_token(&url, &key.sign(&claims)).await.0, StatusCode::OK);
    crier.shutdown().await;
}

/// The real binary with `[auth.jwt]` = `jwt_toml` (its log is read), a
/// `user:{user}` rule; returns it and its `/sse?channel=user:42` URL.
async fn jwks_process(dir: &std::path::Path, jwt_toml: &str) -> (Process, String) {
    let file = dir.join("crier.toml");
    std::fs::write(
        &file,
        format!(
            "[[channels]]\npattern = \"user:{{user}}\"\nsubscribe = \"user\"\n[auth.jwt]\n{jwt_toml}\n"
        ),
    )
    .expect("config");
    let crier = Process::start(&["--config", file.to_str().expect("path")], &[]).await;
    let url = crier.http(&format!("/sse?channel={CHANNEL}"));
    (crier, url)
}

/// `crier_jwks_fetches_total{result}` of the process.
async fn fetches_metric(crier: &Process, result: &str) -> f64 {
    let (_, text) = common::http_get(&crier.http("/metrics")).await;
    common::crier::metric_value(
        &text,
        &format!("crier_jwks_fetches_total{{result=\"{result}\"}}"),
    )
}

/// Issue 20: three tokens naming three new kids, presented at once while
/// the IdP accepts requests and never answers, used to queue one fetch
/// each (answered after 1, 2 and 3 fetch timeouts). They share the fetch
/// in flight: the IdP sees one request, and all three are answered when
/// it times out.
#[tokio::test]
async fn unknown_kids_presented_together_share_one_fetch_while_the_idp_hangs() {
    let idp = Idp::start(false).await;
    let key = SigningKey::ec("k1");
    idp.set_keys(&[&key]);
    let dir = tempfile::tempdir().expect("dir");
    let mut config = jwks_config(&idp, dir.path(), &["ES256"]);
    if let Some(jwt) = &mut config.auth.jwt {
        // No interval: every lookup may ask for a fetch (as with the
        // defaults, where a fetch may take its 10 s timeout and the
        // interval is 10 s too); only sharing the one in flight bounds them.
        jwt.jwks_timeout = Duration::from_secs(1);
        jwt.jwks_unknown_kid_interval = Duration::ZERO;
    }
    let crier = Instance::start(config).await;
    let url = crier.sse_url(&[CHANNEL]);
    assert_eq!(
        try_token(&url, &key.sign(&claims())).await.0,
        StatusCode::OK,
        "the key set was fetched"
    );

    idp.set_mode(Mode::Hang);
    let before = idp.fetches();
    let burst: Vec<_> = (0..3)
        .map(|i| {
            let (url, token) = (
                url.clone(),
                key.sign_as(Some(&format!("new-{i}-{}", rand_suffix())), &claims()),
            );
            tokio::spawn(async move { try_token(&url, &token).await })
        })
        .collect();
    for task in burst {
        let (status, reason) = task.await.expect("request");
        assert_eq!(
            (status, reason.as_deref()),
            (StatusCode::UNAUTHORIZED, Some("unknown_key"))
        );
    }
    let fetched = idp.fetches() - before;
    assert_eq!(
        fetched, 1,
        "all three answered after one fetch of the hanging IdP ({fetched} fetches: each waited for its own)"
    );
    crier.shutdown().await;
}

/// Issue 20: RSA keys under 2048 bits (RFC 7518 §3.3) are skipped from a
/// key set, with a log line naming the kid and the size; the rest of the
/// set works, a 2048-bit key included.
#[tokio::test]
async fn rsa_keys_under_2048_bits_are_skipped_from_a_key_set() {
    let idp = Idp::start(false).await;
    let small = SigningKey::rsa_fixture("rsa1024_private.pem", "rsa-1024");
    let good = SigningKey::rsa("rsa-2048");
    idp.set_keys(&[&small, &good]);
    let dir = tempfile::tempdir().expect("dir");
    let (crier, url) = jwks_process(
        dir.path(),
        &format!(
            "algorithms = [\"RS256\"]\njwks_url = \"{}\"\nissuer = \"test-idp\"",
            idp.jwks_url()
        ),
    )
    .await;
    common::eventually("the key set is fetched", WAIT, || async {
        fetches_metric(&crier, "ok").await >= 1.0
    })
    .await;
    assert_eq!(
        try_token(&url, &good.sign(&claims())).await,
        (StatusCode::OK, None),
        "the 2048-bit key works"
    );
    assert_eq!(
        try_token(&url, &small.sign(&claims())).await,
        (StatusCode::UNAUTHORIZED, Some("unknown_key".into())),
        "the 1024-bit key is not used"
    );
    let log = crier.log_text();
    let skipped = log
        .lines()
        .find(|l| l.contains("rsa-1024"))
        .unwrap_or_else(|| panic!("a log line names the skipped kid: {log}"));
    assert!(skipped.contains("1024"), "and its size: {skipped}");
}

/// Issue 20: an OpenID configuration whose `issuer` is not the configured
/// one (OpenID Connect Discovery §4.3) is refused like a failed fetch: no
/// key set is loaded from it, and the log names both issuers.
#[tokio::test]
async fn discovery_naming_another_issuer_is_refused() {
    let idp = Idp::start(false).await;
    let key = SigningKey::ec("k1");
    idp.set_keys(&[&key]);
    let impostor = "https://impostor.example";
    idp.set_discovery_issuer(impostor);
    let dir = tempfile::tempdir().expect("dir");
    let (crier, url) = jwks_process(
        dir.path(),
        &format!(
            "algorithms = [\"ES256\"]\nissuer_discovery = true\nissuer = \"{}\"",
            idp.base
        ),
    )
    .await;
    common::eventually("the refused discovery is logged", WAIT, || async {
        crier.log_text().contains(impostor)
    })
    .await;
    assert!(
        fetches_metric(&crier, "error").await >= 1.0,
        "counted as failed"
    );
    let mut claims = claims();
    claims["iss"] = json!(idp.base);
    assert_eq!(
        try_token(&url, &key.sign(&claims)).await,
        (StatusCode::UNAUTHORIZED, Some("unknown_key".into()))
    );
    assert_eq!(fetches_metric(&crier, "ok").await, 0.0, "no key set loaded");
    assert_eq!(idp.fetches(), 0, "the key set it names was never fetched");
    let log = crier.log_text();
    let refused = log
        .lines()
        .find(|l| l.contains(impostor))
        .unwrap_or_else(|| panic!("a log line names the document's issuer: {log}"));
    assert!(
        refused.contains(&idp.base),
        "and the configured one: {refused}"
    );
}

/// A certificate for another name, on the IdP, is logged with rustls's own
/// word for it (docs/operations.md tells operators to search for it).
#[tokio::test]
async fn a_certificate_for_another_name_is_logged_as_not_valid_for_name() {
    let idp = Idp::start(true).await;
    let key = SigningKey::ec("k1");
    idp.set_keys(&[&key]);
    let dir = tempfile::tempdir().expect("dir");
    let ca = common::pki::write(dir.path(), "idp-ca.pem", idp.ca_pem.as_deref().expect("CA"));
    // The certificate names localhost; crier is sent to 127.0.0.1.
    let (crier, _) = jwks_process(
        dir.path(),
        &format!(
            "algorithms = [\"ES256\"]\njwks_url = \"{}\"\njwks_ca_file = \"{}\"",
            idp.jwks_url().replace("localhost", "127.0.0.1"),
            ca.display()
        ),
    )
    .await;
    common::eventually("the failed fetch is logged", WAIT, || async {
        crier.log_text().contains("JWKS fetch failed")
    })
    .await;
    let log = crier.log_text();
    let failed = log
        .lines()
        .find(|l| l.contains("JWKS fetch failed"))
        .unwrap_or_else(|| panic!("the fetch failure is logged: {log}"));
    assert!(failed.contains("NotValidForName"), "{failed}");
}

#[tokio::test]
async fn check_config_names_a_bad_jwks_setting() {
    let dir = tempfile::tempdir().expect("dir");
    for (extra, field) in [
        ("jwks_url = \"ftp://idp/certs\"", "auth.jwt.jwks_url"),
        ("jwks_url = \"not a url\"", "auth.jwt.jwks_url"),
        (
            "jwks_url = \"https://idp/certs\"\njwks_ca_file = \"/nonexistent/ca.pem\"",
            "auth.jwt.jwks_ca_file",
        ),
        ("issuer_discovery = true", "auth.jwt.issuer_discovery"),
    ] {
        common::crier::check_config_refuses(
            dir.path(),
            &format!("[auth.jwt]\nalgorithms = [\"RS256\"]\n{extra}\n"),
            field,
        )
        .await;
    }
}
