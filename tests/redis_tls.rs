//! crier over TLS to Redis (`rediss://`, `[redis.tls]`): a real
//! `redis-server` with a TLS port and certificates from a CA each test
//! makes. The server's plain port is what the tests themselves (the "app")
//! publish through.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::crier::{test_config, Instance, Process, WAIT};
use common::pki::{write, Ca};
use common::redis::{RedisServer, Tls};
use common::sse;
use common::unique;
use common::ws::WsClient;
use crier::config::{ChannelRule, Config, HistoryRule, SessionConfig, Subscribe};
use http::StatusCode;
use serde_json::json;

/// A CA, a Redis certificate for 127.0.0.1 and a client certificate, as
/// files in `dir`; and a Redis server presenting it.
async fn tls_redis(dir: &Path, auth_clients: bool) -> (RedisServer, Ca) {
    let ca = Ca::new("crier test CA");
    let server = ca.leaf(&["127.0.0.1", "localhost"]);
    let tls = Tls {
        cert_file: write(dir, "redis.pem", &server.cert_pem),
        key_file: write(dir, "redis.key", &server.key_pem),
        ca_file: write(dir, "ca.pem", &ca.pem()),
        auth_clients,
    };
    (RedisServer::start_tls(tls).await, ca)
}

/// crier on `redis`'s TLS port, trusting `dir/ca.pem`; `hist:*` keeps
/// history, `public:*` does not.
fn tls_config(redis: &RedisServer, dir: &Path) -> Config {
    let mut config = test_config(Some(redis.tls_url()));
    config.redis.tls.ca_file = Some(dir.join("ca.pem"));
    let rule = |pattern: &str, history: bool| ChannelRule {
        pattern: pattern.into(),
        subscribe: Subscribe::Anyone,
        history: history.then_some(HistoryRule {
            size: 100,
            ttl: Duration::from_secs(3600),
        }),
        event_field: None,
        presence: false,
    };
    config.channels = vec![rule("hist:*", true), rule("public:*", false)];
    config
}

/// Issue 10, acceptance 1: `rediss://` with a `ca_file` relays `PUBLISH`
/// and `crier_publish` to SSE and WebSocket clients, and a browser that
/// comes back with `Last-Event-ID` gets what it missed.
#[tokio::test]
async fn crier_relays_and_resumes_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redis, _ca) = tls_redis(dir.path(), false).await;
    let crier = Instance::start(tls_config(&redis, dir.path())).await;
    let (plain, hist) = (unique("public:tls"), unique("hist:tls"));

    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={plain}&channel={hist}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    ws.recv_type("subscribed", WAIT).await;
    let mut events = sse::connect(&crier.sse_url(&[&hist]), &[])
        .await
        .into_events();
    redis.publish(&plain, r#"{"n":1}"#).await;
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 1);
    redis
        .fcall_publish(&hist, r#"{"n":2}"#)
        .await
        .expect("history id");
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 2);
    let seen = events.next_message(WAIT).await.expect("stream open");
    assert_eq!(seen.json()["data"]["n"], 2);
    let cursor = seen.id.expect("history events carry a cursor");
    drop(events);

    redis
        .fcall_publish(&hist, r#"{"n":3}"#)
        .await
        .expect("history id");
    let mut back = sse::connect(&crier.sse_url(&[&hist]), &[("last-event-id", &cursor)])
        .await
        .into_events();
    let missed = back.next_message(WAIT).await.expect("stream open");
    assert_eq!(missed.json()["data"]["n"], 3, "replayed over TLS");
}

/// Issue 10, acceptance 1: a Redis that requires client certificates
/// (`tls-auth-clients yes`) accepts crier's `cert_file`/`key_file`.
#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redis, ca) = tls_redis(dir.path(), true).await;
    let client = ca.leaf(&["crier"]);
    let mut config = tls_config(&redis, dir.path());
    config.redis.tls.cert_file = Some(write(dir.path(), "crier.pem", &client.cert_pem));
    config.redis.tls.key_file = Some(write(dir.path(), "crier.key", &client.key_pem));
    let crier = Instance::start(config).await;
    let channel = unique("public:mtls");
    let mut ws = WsClient::connect(&crier.ws(&format!("/ws?channel={channel}"))).await;
    ws.recv_type("subscribed", WAIT).await;
    redis.publish(&channel, r#"{"n":1}"#).await;
    assert_eq!(ws.recv_type("message", WAIT).await["data"]["n"], 1);
}

/// Issue 10, acceptance 1: a certificate crier cannot trust (another CA)
/// keeps `/readyz` at 503, and the log says why.
#[tokio::test]
async fn an_untrusted_certificate_keeps_crier_unready_and_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redis, _ca) = tls_redis(dir.path(), false).await;
    let other = Ca::new("somebody else's CA");
    let wrong_ca = write(dir.path(), "other-ca.pem", &other.pem());
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{}\"\n[redis.tls]\nca_file = \"{}\"\n[[channels]]\npattern = \"public:*\"\nsubscribe = \"anyone\"\n",
            redis.tls_url(),
            wrong_ca.display()
        ),
    )
    .expect("config");
    let crier = Process::start(&["--config", &config.to_string_lossy()], &[]).await;
    common::eventually("the certificate error in the log", WAIT, || {
        let log = crier.log_text();
        async move { log.contains("cannot connect to redis") && log.contains("UnknownIssuer") }
    })
    .await;
    let (status, body) = common::http_get(&crier.http("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

/// Issue 20: a certificate for another name, and an expired one, are
/// logged with the words docs/operations.md and docs/configuration.md tell
/// operators to search for (rustls's `NotValidForName`, `Expired`), and
/// keep `/readyz` at 503.
#[tokio::test]
async fn certificate_problems_are_logged_with_rustls_words() {
    let ca = Ca::new("crier test CA");
    let cases = [
        ("NotValidForName", ca.leaf(&["redis.elsewhere.example"])),
        ("Expired", ca.expired_leaf(&["127.0.0.1", "localhost"])),
    ];
    for (word, leaf) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = Tls {
            cert_file: write(dir.path(), "redis.pem", &leaf.cert_pem),
            key_file: write(dir.path(), "redis.key", &leaf.key_pem),
            ca_file: write(dir.path(), "ca.pem", &ca.pem()),
            auth_clients: false,
        };
        let redis = RedisServer::start_tls(tls).await;
        let config = dir.path().join("crier.toml");
        std::fs::write(
            &config,
            format!(
                "[redis]\nurl = \"{}\"\n[redis.tls]\nca_file = \"{}\"\n[[channels]]\npattern = \"public:*\"\nsubscribe = \"anyone\"\n",
                redis.tls_url(),
                dir.path().join("ca.pem").display()
            ),
        )
        .expect("config");
        let crier = Process::start(&["--config", &config.to_string_lossy()], &[]).await;
        common::eventually(&format!("`{word}` in the log"), WAIT, || {
            let log = crier.log_text();
            async move {
                log.lines()
                    .any(|l| l.contains("cannot connect to redis") && l.contains(word))
            }
        })
        .await;
        let (status, body) = common::http_get(&crier.http("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{word}: {body}");
    }
}

/// Issue 10, acceptance 1: express-session cookies are read from a session
/// store reached over TLS.
#[tokio::test]
async fn session_cookies_are_read_from_a_tls_session_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redis, _ca) = tls_redis(dir.path(), false).await;
    let mut config = test_config(None);
    config.redis.tls.ca_file = Some(dir.path().join("ca.pem"));
    config.channels = vec![ChannelRule {
        pattern: "user:{user}".into(),
        subscribe: Subscribe::User,
        history: None,
        event_field: None,
        presence: false,
    }];
    config.auth.session = Some(SessionConfig {
        secrets: vec!["keyboard cat".into()],
        redis_url: Some(redis.tls_url()),
        ..SessionConfig::default()
    });
    let crier = Instance::start(config).await;
    let id = "tls-session-id-0123456789";
    let session = json!({"cookie": {"expires": null}, "passport": {"user": 42}});
    redis
        .cli(&["SET", &format!("sess:{id}"), &session.to_string()])
        .await;
    let cookie = format!(
        "connect.sid={}",
        common::browser::express_cookie_value(id, "keyboard cat")
    );
    let response = sse::connect(&crier.sse_url(&["user:42"]), &[("cookie", &cookie)]).await;
    assert_eq!(response.status, StatusCode::OK);
    let response = sse::connect(&crier.sse_url(&["user:43"]), &[("cookie", &cookie)]).await;
    assert_eq!(
        response.status,
        StatusCode::FORBIDDEN,
        "the user came from the store"
    );
}

/// Bad `[redis.tls]` settings stop the start with the field named.
#[tokio::test]
async fn bad_tls_settings_are_configuration_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[redis]\nurl = \"rediss://127.0.0.1:1\"\n[redis.tls]\ncert_file = \"/x.pem\"\n",
            "redis.tls.key_file",
        ),
        (
            "[redis]\nurl = \"rediss://127.0.0.1:1\"\n[redis.tls]\nca_file = \"/no/such/ca.pem\"\n",
            "redis.tls.ca_file",
        ),
        ("[redis]\nurl = \"http://127.0.0.1:1\"\n", "redis.url"),
        (
            "[redis]\nurl = \"rediss://127.0.0.1:1\"\n[redis.tls]\nca_file = \"@GARBAGE@\"\n",
            "holds no PEM certificate",
        ),
    ];
    let garbage = write(dir.path(), "garbage.pem", "not a certificate\n");
    for (toml, field) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml.replace("@GARBAGE@", &garbage.to_string_lossy()))
            .expect("config");
        let output = common::crier::crier_command()
            .args(["check-config", "--config", &path.to_string_lossy()])
            .output()
            .await
            .expect("run crier");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{toml}: {stderr}");
        assert!(stderr.contains(field), "{toml}: {stderr}");
    }
}
