//! Issue 13, point 6: a Laravel page's Echo in a real headless Chromium.
//! The page (tests/pusher/echo.html) loads the unmodified pusher-js browser
//! build and laravel-echo's ESM build, makes an `Echo` with
//! `broadcaster: 'pusher'` and `wsHost` = crier, joins a presence channel
//! (authorized by this test's `/broadcasting/auth`, which signs like
//! Laravel) and listens for an event the `pusher` server SDK triggers.
//! What the page saw is checked: the member list, a member joining, the
//! event.
//!
//! Needs `chromium` and node with `npm ci --prefix tests/pusher` (`.ci/run`
//! does both); without them the test fails and says what to install.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::browser::installed;
use common::crier::Instance;
use common::pusher::{hmac_hex, Driver, KEY, SECRET};
use common::redis::RedisServer;
use common::repo;
use crier::config::Config;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the page's `<meta name="csrf-token">` says; Echo sends it as
/// `X-CSRF-TOKEN` and the auth endpoint, like Laravel's, wants it.
const CSRF: &str = "csrf-of-the-page";
/// The page's user, as the app's auth endpoint signs it.
const PAGE_USER: &str = r#"{"user_id":"7","user_info":{"name":"Ada"}}"#;
/// How long the page may take to start Chromium, load and connect.
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// tests/pusher.rs's configuration, with the page's origin allowed.
fn pusher_config(redis: &RedisServer, page_origin: String) -> Config {
    let mut config = common::pusher::pusher_config(redis);
    config.allowed_origins = vec![page_origin];
    config
}

/// `application/x-www-form-urlencoded` fields, as pusher-js posts them.
fn form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

/// What Laravel's `/broadcasting/auth` answers for a presence channel:
/// `key:hex(HMAC-SHA256(secret, socket_id:channel:channel_data))` and the
/// channel data it signed.
fn presence_auth(socket_id: &str, channel: &str, channel_data: &str) -> Value {
    let hex = hmac_hex(SECRET, &format!("{socket_id}:{channel}:{channel_data}"));
    json!({"auth": format!("{KEY}:{hex}"), "channel_data": channel_data})
}

/// The app as the page sees it: the page, the two libraries as they are on
/// disk, the channel authorization endpoint, and `/results`, where the page
/// posts its state (numbered: the newest wins, whatever order the posts
/// arrive in). Every authorization request is kept in `auths`.
struct App {
    results: watch::Receiver<Value>,
    auths: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

async fn serve_app(listener: TcpListener) -> App {
    let file = |path: &str| {
        Bytes::from(std::fs::read(repo(path)).unwrap_or_else(|e| {
            panic!("{path}: {e} (run `npm ci --prefix tests/pusher`)");
        }))
    };
    let files: Arc<HashMap<&'static str, (&'static str, Bytes)>> = Arc::new(HashMap::from([
        ("/echo.html", ("text/html", file("tests/pusher/echo.html"))),
        (
            "/pusher.js",
            (
                "text/javascript",
                file("tests/pusher/node_modules/pusher-js/dist/web/pusher.js"),
            ),
        ),
        // package.json's `exports["."].import` (and `module`).
        (
            "/echo.js",
            (
                "text/javascript",
                file("tests/pusher/node_modules/laravel-echo/dist/echo.js"),
            ),
        ),
    ]));
    let (tx, results) = watch::channel(Value::Null);
    let tx = Arc::new(tx);
    let auths = Arc::new(Mutex::new(Vec::new()));
    let kept = auths.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (tx, files, kept) = (tx.clone(), files.clone(), kept.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (tx, files, kept) = (tx.clone(), files.clone(), kept.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let csrf = req
                            .headers()
                            .get("x-csrf-token")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let (status, content_type, body) = match path.as_str() {
                            "/results" => {
                                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                                    tx.send_if_modified(|old| {
                                        let newer = v["seq"].as_u64() > old["seq"].as_u64();
                                        if newer {
                                            *old = v;
                                        }
                                        newer
                                    });
                                }
                                (StatusCode::NO_CONTENT, "text/plain", Bytes::new())
                            }
                            "/broadcasting/auth" => {
                                let fields = form(&body);
                                kept.lock().expect("lock").push(fields.clone());
                                let socket_id = fields.get("socket_id");
                                let channel = fields.get("channel_name");
                                match (socket_id, channel) {
                                    (Some(socket_id), Some(channel))
                                        if csrf.as_deref() == Some(CSRF)
                                            && channel == "presence-room.1" =>
                                    {
                                        let answer = presence_auth(socket_id, channel, PAGE_USER);
                                        (
                                            StatusCode::OK,
                                            "application/json",
                                            Bytes::from(answer.to_string()),
                                        )
                                    }
                                    _ => (StatusCode::FORBIDDEN, "text/plain", Bytes::new()),
                                }
                            }
                            // The app's user authentication (pusher.signin()):
                            // what the SDKs' authenticateUser answers.
                            "/pusher/user-auth" if csrf.as_deref() == Some(CSRF) => {
                                let fields = form(&body);
                                let socket_id =
                                    fields.get("socket_id").cloned().unwrap_or_default();
                                let user_data = r#"{"id":"7"}"#;
                                let hex =
                                    hmac_hex(SECRET, &format!("{socket_id}::user::{user_data}"));
                                let answer =
                                    json!({"auth": format!("{KEY}:{hex}"), "user_data": user_data});
                                (
                                    StatusCode::OK,
                                    "application/json",
                                    Bytes::from(answer.to_string()),
                                )
                            }
                            other => match files.get(other) {
                                Some((content_type, bytes)) => {
                                    (StatusCode::OK, *content_type, bytes.clone())
                                }
                                None => (StatusCode::NOT_FOUND, "text/plain", Bytes::new()),
                            },
                        };
                        let mut r = Response::new(Full::new(body));
                        *r.status_mut() = status;
                        r.headers_mut()
                            .insert("content-type", content_type.parse().expect("ct"));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    App { results, auths }
}

/// Waits until the page's state satisfies `f`; on a timeout, panics with
/// `what` and the page's last report.
async fn page_state(
    results: &mut watch::Receiver<Value>,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let met = tokio::time::timeout(PAGE_WAIT, results.wait_for(|v| f(v)))
        .await
        .is_ok_and(|r| r.is_ok());
    let state = results.borrow().clone();
    assert!(
        met,
        "timed out waiting for the page: {what}; its last report: {state:#}"
    );
    state
}

#[tokio::test]
async fn laravel_echo_in_chromium_joins_presence_and_hears_a_listen_event() {
    assert!(
        installed("chromium"),
        "`chromium` is needed (apt-get install chromium; bash .ci/run installs it)"
    );
    let redis = RedisServer::start().await;
    // Bound first and kept, so its origin can be allowed and nothing else
    // takes the port.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page_port = listener.local_addr().expect("addr").port();
    let crier = Instance::start(pusher_config(
        &redis,
        format!("http://127.0.0.1:{page_port}"),
    ))
    .await;
    let crier_port = crier
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("crier port");
    let App { mut results, auths } = serve_app(listener).await;
    let mut d = Driver::start().await;

    let profile = tempfile::tempdir().expect("profile");
    let chromium = common::browser::chromium(
        &format!("http://127.0.0.1:{page_port}/echo.html?ws_port={crier_port}"),
        profile.path(),
    );

    // Echo joined `presence-room.1`: crier accepted the app's signature and
    // sent the member list, the page's own user in it.
    let here = page_state(&mut results, "Echo's .here() callback", |v| {
        !v["here"].is_null() || v["errors"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    assert_eq!(here["errors"], json!([]), "the page: {here:#}");
    assert_eq!(
        here["here"],
        json!({"users": [{"name": "Ada"}], "ids": ["7"], "me": "7", "count": 1}),
        "the page: {here:#}"
    );
    let asked = auths.lock().expect("lock").clone();
    assert_eq!(asked.len(), 1, "one authorization request: {asked:?}");
    assert_eq!(asked[0]["channel_name"], "presence-room.1", "{asked:?}");

    // A second member, user 8 (a pusher-js client in Node, signed by the
    // driver's own auth endpoint), joins: the page's .joining() hears it.
    d.send(json!({"op": "connect", "client": "c8", "port": crier_port, "user": "8"}))
        .await;
    d.wait(|v| v["client"] == "c8" && v["state"] == "connected")
        .await;
    d.send(json!({"op": "subscribe", "client": "c8", "channel": "presence-room.1"}))
        .await;
    let second = d
        .wait(|v| {
            v["client"] == "c8"
                && v["channel"] == "presence-room.1"
                && (v["type"] == "subscribed" || v["type"] == "subscription_error")
        })
        .await;
    assert_eq!(second["type"], "subscribed", "{second}");
    assert_eq!(second["members"], json!(["7", "8"]), "{second}");
    let joined = page_state(&mut results, "Echo's .joining() callback", |v| {
        v["joining"].as_array().is_some_and(|j| !j.is_empty())
    })
    .await;
    assert_eq!(
        joined["joining"],
        json!([{"user": {"name": "User 8"}, "ids": ["7", "8"], "me": "7", "count": 2}]),
        "the page: {joined:#}"
    );

    // The app broadcasts `order.shipped` (Laravel's broadcastAs) through the
    // pusher server SDK: Echo's .listen('.order.shipped') gets its payload.
    d.send(json!({
        "op": "trigger", "tag": "shipped", "port": crier_port,
        "channels": ["presence-room.1"], "event": "order.shipped", "data": {"id": 42},
    }))
    .await;
    let triggered = d
        .wait(|v| v["type"] == "triggered" && v["tag"] == "shipped")
        .await;
    assert_eq!(triggered["status"], 200, "{triggered}");
    let heard = page_state(&mut results, "Echo's .listen('.order.shipped')", |v| {
        v["shipped"].as_array().is_some_and(|s| !s.is_empty())
    })
    .await;
    assert_eq!(heard["shipped"], json!([{"id": 42}]), "the page: {heard:#}");
    // The driver's member heard it too, once.
    let c8 = d
        .wait(|v| v["client"] == "c8" && v["type"] == "event" && v["event"] == "order.shipped")
        .await;
    assert_eq!(c8["data"], json!({"id": 42}), "{c8}");

    // Issue 25: the page signed its user (7) in; so does a Node client as
    // 7. The app's sendToUser reaches both, and not user 8's client.
    let signed = page_state(&mut results, "pusher:signin_success", |v| {
        !v["signed_in"].is_null()
    })
    .await;
    assert_eq!(
        signed["signed_in"],
        json!({"id": "7"}),
        "the page: {signed:#}"
    );
    d.sign_in("n7", crier_port, "7", &[]).await;
    d.sign_in("n8", crier_port, "8", &[]).await;
    let sent = d
        .user_api(
            "note",
            json!({"op": "send_to_user", "port": crier_port, "user": "7", "event": "note", "data": {"hi": 7}}),
        )
        .await;
    assert_eq!(sent["status"], 200, "{sent}");
    let heard = page_state(&mut results, "pusher.user.bind('note')", |v| {
        v["notes"].as_array().is_some_and(|n| !n.is_empty())
    })
    .await;
    assert_eq!(heard["notes"], json!([{"hi": 7}]), "the page: {heard:#}");
    let node = d
        .wait(|v| v["client"] == "n7" && v["type"] == "user_event" && v["event"] == "note")
        .await;
    assert_eq!(node["data"], json!({"hi": 7}), "{node}");
    d.user_api(
        "marker",
        json!({"op": "send_to_user", "port": crier_port, "user": "8", "event": "marker", "data": {}}),
    )
    .await;
    d.wait(|v| v["client"] == "n8" && v["type"] == "user_event" && v["event"] == "marker")
        .await;
    assert_eq!(
        d.count(|v| v["client"] == "n8" && v["event"] == "note"),
        0,
        "user 8 heard user 7's note"
    );

    // Nothing else on the page: no error, nobody left, connected throughout.
    assert_eq!(heard["errors"], json!([]), "the page: {heard:#}");
    assert_eq!(heard["leaving"], json!([]), "the page: {heard:#}");
    let states = heard["states"].as_array().expect("states");
    assert!(
        states.last() == Some(&json!("connected"))
            && states.iter().all(|s| s == "connecting" || s == "connected"),
        "the page's connection states: {heard:#}"
    );
    drop((chromium, d));
    crier.shutdown().await;
}
