//! The real-world proof of "no message lost": a real headless Chromium with
//! a plain `EventSource` on two channels, two crier processes behind HAProxy
//! (round robin, no stickiness), a publisher calling `crier_publish`, and the
//! instance holding the browser's stream killed mid-sequence and restarted.
//! Every number must arrive exactly once, in order per channel.
//!
//! Also: the dev console (`--dev`, `/`) in a real Chromium shows events of
//! any type in SSE mode.
//!
//! Needs `chromium` and `haproxy` (`.ci/run` installs them); without them
//! the tests say so loudly and pass.

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::browser::installed;
use common::crier::{Process, WAIT};
use common::redis::RedisServer;
use common::unique;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::watch;

const MESSAGES: u64 = 120;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The page: a plain EventSource, reporting what it has seen to /results.
fn page(a: &str, b: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
const seen = {{ "{a}": [], "{b}": [] }};
const state = {{ seen, gaps: [], errors: 0, opens: 0 }};
const es = new EventSource("/sse?channel={a}&channel={b}");
es.onopen = () => state.opens++;
es.onerror = () => state.errors++;
es.onmessage = (e) => {{
  const m = JSON.parse(e.data);
  if (m.type === "message") seen[m.channel].push(m.data.n);
}};
es.addEventListener("gap", (e) => state.gaps.push(JSON.parse(e.data).channel));
setInterval(() => fetch("/results", {{ method: "POST", body: JSON.stringify(state) }}), 100);
</script></body></html>"#
    )
}

/// Serves the page and collects the page's reports.
async fn test_server(page: String) -> (u16, watch::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    test_server_on(page, listener).await
}

/// [`test_server`] on a listener the caller bound (to know its origin first).
async fn test_server_on(page: String, listener: TcpListener) -> (u16, watch::Receiver<Value>) {
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = watch::channel(Value::Null);
    let tx = Arc::new(tx);
    let page = Arc::new(page);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (tx, page) = (tx.clone(), page.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (tx, page) = (tx.clone(), page.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let body = if path == "/results" {
                            let bytes = req.into_body().collect().await.map(|b| b.to_bytes());
                            if let Ok(v) =
                                serde_json::from_slice::<Value>(&bytes.unwrap_or_default())
                            {
                                tx.send_replace(v);
                            }
                            String::new()
                        } else {
                            page.to_string()
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        if path != "/results" {
                            r.headers_mut()
                                .insert("content-type", "text/html".parse().expect("ct"));
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, rx)
}

async fn start_crier(config: &str, redis: &str, listen: Option<&str>) -> Process {
    let mut args = vec!["--config", config, "--redis-url", redis];
    if let Some(listen) = listen {
        args.extend(["--listen", listen]);
    }
    Process::start(&args, &[]).await
}

#[tokio::test]
async fn chromium_behind_haproxy_loses_nothing_when_an_instance_dies() {
    for program in ["chromium", "haproxy"] {
        if !installed(program) {
            eprintln!(
                "\n*** SKIPPED chromium_behind_haproxy_loses_nothing_when_an_instance_dies: \
                 `{program}` is not installed (bash .ci/run installs it) ***\n"
            );
            return;
        }
    }
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("crier.toml");
    std::fs::write(
        &config,
        r#"
[[channels]]
pattern = "e2e:*"
subscribe = "anyone"
history = { size = 10000, ttl = "1h" }

[sse]
retry = "300ms"

[shutdown]
grace = "0s"
drain = "1s"
"#,
    )
    .expect("config");
    let config = config.to_string_lossy().into_owned();
    let a = start_crier(&config, &redis.url(), None).await;
    let b = start_crier(&config, &redis.url(), None).await;

    let (x, y) = (unique("e2e:a"), unique("e2e:b"));
    let (page_port, mut results) = test_server(page(&x, &y)).await;

    let lb_port = free_port();
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            r#"
global
  maxconn 1000
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  option redispatch
  retries 3
frontend fe
  bind 127.0.0.1:{lb_port}
  acl page path_beg /page /results
  use_backend page if page
  default_backend crier
backend crier
  balance roundrobin
  option httpchk GET /readyz
  server a {a} check inter 200ms fall 1 rise 1
  server b {b} check inter 200ms fall 1 rise 1
backend page
  server p 127.0.0.1:{page_port}
"#,
            a = a.addr,
            b = b.addr
        ),
    )
    .expect("haproxy config");
    let haproxy = common::browser::Killed(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy"),
    );
    common::eventually("haproxy serving", WAIT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", lb_port))
            .await
            .is_ok()
            && common::http_get(&format!("http://127.0.0.1:{lb_port}/readyz"))
                .await
                .0
                == StatusCode::OK
    })
    .await;

    let profile = tempfile::tempdir().expect("profile");
    let chromium =
        common::browser::chromium(&format!("http://127.0.0.1:{lb_port}/page"), profile.path());
    tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| v["opens"].as_u64() >= Some(1)),
    )
    .await
    .expect("the page opened its EventSource")
    .expect("results");

    // Which instance holds the browser's stream?
    let sse_connections = |p: &Process| {
        let url = p.http("/metrics");
        async move {
            let (_, body) = common::http_get(&url).await;
            common::crier::metric_value(&body, "crier_connections{transport=\"sse\"}")
        }
    };
    let (mut holder, other) = if sse_connections(&a).await >= 1.0 {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(
        sse_connections(&holder).await,
        1.0,
        "the stream is on one instance"
    );

    let publisher = redis.paced_publisher(
        vec![x.clone(), y.clone()],
        MESSAGES,
        Duration::from_millis(25),
    );

    // Mid-sequence: kill the instance the browser is on, restart it.
    tokio::time::timeout(
        WAIT,
        results.wait_for(|v| v["seen"][&x].as_array().is_some_and(|s| s.len() >= 20)),
    )
    .await
    .expect("messages arriving")
    .expect("results");
    let holder_addr = holder.addr.clone();
    holder.child.kill().await.expect("kill crier");
    let restarted = start_crier(&config, &redis.url(), Some(&holder_addr)).await;
    publisher.await.expect("publisher");

    let expect_x: Vec<u64> = (0..MESSAGES).filter(|n| n % 2 == 0).collect();
    let expect_y: Vec<u64> = (0..MESSAGES).filter(|n| n % 2 == 1).collect();
    let complete = |v: &Value| {
        let len = |c: &str| v["seen"][c].as_array().map_or(0, Vec::len);
        len(&x) >= expect_x.len() && len(&y) >= expect_y.len()
    };
    let outcome = tokio::time::timeout(Duration::from_secs(30), results.wait_for(complete))
        .await
        .is_ok();
    let report = results.borrow().clone();
    assert!(outcome, "the page did not receive everything: {report}");
    let seen = |c: &str| -> Vec<u64> {
        report["seen"][c]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(Value::as_u64)
            .collect()
    };
    assert_eq!(
        seen(&x),
        expect_x,
        "channel {x}: every number once, in order"
    );
    assert_eq!(
        seen(&y),
        expect_y,
        "channel {y}: every number once, in order"
    );
    assert_eq!(
        report["gaps"],
        serde_json::json!([]),
        "no gap: history covered the failover"
    );
    assert!(
        report["opens"].as_u64() >= Some(2),
        "the browser did reconnect: {report}"
    );
    drop((chromium, haproxy, restarted, other));
}

/// Issue 8, point 6: a page closes its WebSocket with 1000; crier answers
/// the close handshake, so the browser reports a clean close with that
/// code (`wasClean === true`), not 1006.
#[tokio::test]
async fn chromium_sees_a_clean_close_when_the_page_closes_its_websocket() {
    if !installed("chromium") {
        eprintln!(
            "\n*** SKIPPED chromium_sees_a_clean_close_when_the_page_closes_its_websocket: \
             `chromium` is not installed (bash .ci/run installs it) ***\n"
        );
        return;
    }
    // Bound first and kept, so nothing else can take the page's port.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page_port = listener.local_addr().expect("addr").port();
    let mut config = common::crier::test_config(None);
    config.allowed_origins = vec![format!("http://127.0.0.1:{page_port}")];
    let crier = common::crier::Instance::start(config).await;
    let page = format!(
        r#"<!doctype html><html><body><script>
const state = {{ closed: null, welcomed: false }};
const ws = new WebSocket("ws://{crier}/ws");
ws.onmessage = (e) => {{
  if (JSON.parse(e.data).type === "welcome") {{ state.welcomed = true; ws.close(1000, "bye"); }}
}};
ws.onclose = (e) => {{ state.closed = {{ code: e.code, wasClean: e.wasClean }}; }};
setInterval(() => fetch("/results", {{ method: "POST", body: JSON.stringify(state) }}), 100);
</script></body></html>"#,
        crier = crier.addr
    );
    let (port, mut results) = test_server_on(page, listener).await;
    let profile = tempfile::tempdir().expect("profile");
    let _chromium =
        common::browser::chromium(&format!("http://127.0.0.1:{port}/page"), profile.path());
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| !v["closed"].is_null()),
    )
    .await
    .expect("the page saw its WebSocket close")
    .expect("results")
    .clone();
    assert_eq!(report["welcomed"], true, "{report}");
    assert_eq!(
        report["closed"],
        serde_json::json!({"code": 1000, "wasClean": true}),
        "{report}"
    );
}

/// Issue 9.2: the dev console in SSE mode shows an event of a type it has
/// never heard of, once, and says which mode it is in.
#[tokio::test]
async fn demo_page_in_sse_mode_shows_events_of_any_type() {
    if !installed("chromium") {
        eprintln!(
            "\n*** SKIPPED demo_page_in_sse_mode_shows_events_of_any_type: `chromium` is not \
             installed (bash .ci/run installs it) ***\n"
        );
        return;
    }
    let crier = Process::start(&["--dev"], &[]).await;
    let channel = unique("public:demo");
    let profile = tempfile::tempdir().expect("profile");
    let _chromium = common::browser::chromium(
        &crier.http(&format!("/?transport=sse&channel={channel}")),
        profile.path(),
    );
    let mut page = common::browser::DevTools::attach(profile.path()).await;
    page.wait_for(
        "the page in SSE mode",
        "document.getElementById('mode').textContent.startsWith('Mode: SSE (EventSource)')",
    )
    .await;
    // Both of the page's streams are subscribed: its EventSource and the
    // WebSocket that learns event names.
    let metrics = crier.http("/metrics");
    common::eventually("the page's two subscriptions", WAIT, || {
        let metrics = metrics.clone();
        async move {
            let body = common::http_get(&metrics).await.1;
            let sse = common::crier::metric_value(&body, "crier_connections{transport=\"sse\"}");
            sse == 1.0 && common::crier::metric_value(&body, "crier_subscriptions") == 2.0
        }
    })
    .await;

    let publish = |n: u64| {
        let url = crier.http("/api/publish");
        let body = serde_json::json!({
            "channel": channel,
            "data": {"type": "order.created", "id": n},
        })
        .to_string();
        async move {
            let (status, answer) =
                common::http_post(&url, &[("content-type", "application/json")], &body).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
        }
    };
    let entries = "[...document.querySelectorAll('#log .entry.event')]";
    publish(4242).await;
    page.wait_for(
        "the order.created event on the page",
        &format!("{entries}.some(e => e.textContent.includes('order.created') && e.textContent.includes('4242'))"),
    )
    .await;
    // The next one comes through the EventSource listener it now has: shown
    // once, like the first.
    publish(4343).await;
    page.wait_for(
        "the second event on the page",
        &format!("{entries}.some(e => e.textContent.includes('4343'))"),
    )
    .await;
    let shown = page
        .eval(&format!(
            "{entries}.map(e => e.querySelector('pre').textContent)"
        ))
        .await;
    let shown: Vec<Value> = shown
        .as_array()
        .expect("a list")
        .iter()
        .map(|text| serde_json::from_str(text.as_str().expect("text")).expect("JSON"))
        .collect();
    let mut ids: Vec<u64> = shown.iter().filter_map(|d| d["id"].as_u64()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![4242, 4343], "each event once: {shown:?}");

    // Issue 21.8: the first event of a new name is shown in its place,
    // before the events that followed it, however the scout's copy and
    // the EventSource's next event race; and each once.
    for (event, n) in [("order.shipped", 5000), ("order.created", 5001)] {
        let body = serde_json::json!({"channel": channel, "data": {"type": event, "id": n}});
        let (status, answer) = common::http_post(
            &crier.http("/api/publish"),
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let both = format!("{entries}.filter(e => /\\b500[01]\\b/.test(e.textContent))");
    page.wait_for(
        "both new events on the page",
        &format!("{both}.length === 2"),
    )
    .await;
    let order = page
        .eval(&format!(
            "{both}.map(e => e.textContent.includes('5000') ? 5000 : 5001)"
        ))
        .await;
    let newest_first = page
        .eval("document.getElementById('newest-first').checked")
        .await;
    let expected = match newest_first.as_bool() {
        Some(true) => serde_json::json!([5001, 5000]),
        _ => serde_json::json!([5000, 5001]),
    };
    assert_eq!(order, expected, "in publication order");
}

/// Issue 21.2: events whose type is one of the EventSource's own names
/// (`error`, `open`, `message`) reach a real Chromium's listeners as
/// `app.error`, `app.open` and `app.message`; `onerror` and `onopen` are
/// not called for them, nor `onmessage`.
#[tokio::test]
async fn reserved_event_types_reach_sse_listeners_under_app_names() {
    if !installed("chromium") {
        eprintln!(
            "\n*** SKIPPED reserved_event_types_reach_sse_listeners_under_app_names: `chromium` \
             is not installed (bash scripts/test installs it) ***\n"
        );
        return;
    }
    let crier = Process::start(&["--dev"], &[]).await;
    let channel = unique("public:reserved");
    let profile = tempfile::tempdir().expect("profile");
    let _chromium = common::browser::chromium(&crier.http("/"), profile.path());
    let mut page = common::browser::DevTools::attach(profile.path()).await;
    page.wait_for(
        "the demo page (not the blank tab before it)",
        "location.protocol === 'http:' && document.readyState === 'complete'",
    )
    .await;
    page.eval(&format!(
        r#"window.t = {{ errors: 0, opens: 0, got: [] }};
        const es = new EventSource("/sse?channel={channel}");
        es.onopen = () => t.opens++;
        es.onerror = () => t.errors++;
        es.onmessage = (e) => t.got.push("onmessage:" + JSON.parse(e.data).event);
        for (const name of ["app.error", "app.open", "app.message", "done"]) {{
          es.addEventListener(name, (e) => t.got.push(name + ":" + JSON.parse(e.data).event));
        }}
        window.reserved = es; 1"#
    ))
    .await;
    page.wait_for("the stream open", "t.opens === 1").await;
    for event in ["error", "open", "message", "done"] {
        let body = serde_json::json!({"channel": channel, "data": {"type": event}}).to_string();
        let (status, answer) = common::http_post(
            &crier.http("/api/publish"),
            &[("content-type", "application/json")],
            &body,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    page.wait_for("the last event", "t.got.some(g => g.startsWith('done'))")
        .await;
    let seen = page.eval("JSON.stringify(t)").await;
    let seen: Value = serde_json::from_str(seen.as_str().expect("text")).expect("JSON");
    assert_eq!(
        seen["got"],
        serde_json::json!([
            "app.error:error",
            "app.open:open",
            "app.message:message",
            "done:done"
        ]),
        "{seen}"
    );
    assert_eq!(seen["errors"], 0, "onerror not called: {seen}");
    assert_eq!(seen["opens"], 1, "onopen once, for the stream: {seen}");
}

/// Issue 23, acceptance 1: Chromium negotiates permessage-deflate with
/// crier on `/ws` and on the Pusher endpoint (`WebSocket.extensions` is
/// not empty), sends its own messages compressed, and receives every event
/// intact: three sockets on each endpoint, so each channel's listeners
/// share a compression context (their frames refer to earlier ones, which
/// Chromium's inflater keeps), the third opening mid-stream (it reads
/// frames compressed on their own until the context's next epoch).
#[tokio::test]
async fn chromium_negotiates_compression_on_both_websocket_endpoints() {
    const JOBS: usize = 30;
    const LATE: usize = 5;
    if !installed("chromium") {
        eprintln!(
            "\n*** SKIPPED chromium_negotiates_compression_on_both_websocket_endpoints: \
             `chromium` is not installed (bash .ci/run installs it) ***\n"
        );
        return;
    }
    const KEY: &str = "test-api-key-0123456789";
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page_port = listener.local_addr().expect("addr").port();
    let mut config = common::crier::test_config(None);
    common::pusher::with_pusher(&mut config);
    config.publish.api_keys = vec![KEY.into()];
    config.allowed_origins = vec![format!("http://127.0.0.1:{page_port}")];
    let crier = common::crier::Instance::start(config).await;
    let page = format!(
        r#"<!doctype html><html><body><script>
const state = {{ ws: null, pusher: null, wsReady: 0, pusherReady: 0, wsJobs: [[], [], []], pusherJobs: [[], [], []] }};
function open(i) {{
  const a = new WebSocket("ws://{crier}/ws");
  a.onopen = () => {{
    state.ws = a.extensions;
    a.send(JSON.stringify({{ type: "subscribe", channel: "public:big", id: 1 }}));
  }};
  a.onmessage = (e) => {{
    const m = JSON.parse(e.data);
    if (m.type === "subscribed") state.wsReady += 1;
    if (m.type === "message") state.wsJobs[i].push([m.data.job, m.data.lines.length]);
    if (m.type === "message" && i === 0 && m.data.job === LATE) open(2);
  }};
  const b = new WebSocket("ws://{crier}/app/{app_key}?protocol=7");
  b.onopen = () => {{ state.pusher = b.extensions; }};
  b.onmessage = (e) => {{
    const m = JSON.parse(e.data);
    if (m.event === "pusher:connection_established")
      b.send(JSON.stringify({{ event: "pusher:subscribe", data: {{ channel: "orders" }} }}));
    if (m.event === "pusher_internal:subscription_succeeded") state.pusherReady += 1;
    if (m.event === "log") {{ const d = JSON.parse(m.data); state.pusherJobs[i].push([d.job, d.lines.length]); }}
  }};
}}
const LATE = {late};
open(0);
open(1);
setInterval(() => fetch("/results", {{ method: "POST", body: JSON.stringify(state) }}), 100);
</script></body></html>"#,
        crier = crier.addr,
        app_key = common::pusher::KEY,
        late = LATE,
    );
    let (port, mut results) = test_server_on(page, listener).await;
    let profile = tempfile::tempdir().expect("profile");
    let _chromium =
        common::browser::chromium(&format!("http://127.0.0.1:{port}/page"), profile.path());
    tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| v["wsReady"] == 2 && v["pusherReady"] == 2),
    )
    .await
    .expect("every socket subscribed")
    .expect("results");
    assert_eq!(
        crier.metric("crier_ws_compression_contexts").await,
        2.0,
        "one shared context per channel"
    );
    let publish = |job: usize| {
        let crier = &crier;
        async move {
            let lines: Vec<String> = (0..20)
                .map(|i| format!("step {i}: compiled module_{i}.rs in {}ms", i * job))
                .collect();
            let data = serde_json::json!({"type": "log", "job": job, "lines": lines}).to_string();
            for channel in ["public:big", "orders"] {
                assert_eq!(crier.publish_api(channel, &data, Some(KEY)).await, 200);
            }
        }
    };
    for job in 1..=LATE {
        publish(job).await;
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| v["wsReady"] == 3 && v["pusherReady"] == 3),
    )
    .await
    .expect("the late sockets subscribed")
    .expect("results");
    for job in LATE + 1..=JOBS {
        publish(job).await;
    }
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| {
            ["wsJobs", "pusherJobs"].iter().all(|jobs| {
                (0..3).all(|i| {
                    let expected = if i == 2 { JOBS - LATE } else { JOBS };
                    v[jobs][i].as_array().is_some_and(|j| j.len() == expected)
                })
            })
        }),
    )
    .await
    .expect("every event arrived")
    .expect("results")
    .clone();
    for socket in ["ws", "pusher"] {
        let extensions = report[socket].as_str().unwrap_or_default();
        assert!(
            extensions.starts_with("permessage-deflate"),
            "{socket}: {report}"
        );
    }
    let all: Vec<(usize, usize)> = (1..=JOBS).map(|job| (job, 20)).collect();
    let late: Vec<(usize, usize)> = (LATE + 1..=JOBS).map(|job| (job, 20)).collect();
    let intact = serde_json::json!([all, all, late]);
    assert_eq!(report["wsJobs"], intact, "{report}");
    assert_eq!(report["pusherJobs"], intact, "{report}");
}

/// Issue 23, SSE: Chromium's `EventSource` asks for `deflate` (its
/// `Accept-Encoding`), gets a compressed stream while `sse.compression` is
/// `auto`, and decodes every event, cursor included.
#[tokio::test]
async fn chromium_reads_a_compressed_event_stream() {
    if !installed("chromium") {
        eprintln!(
            "\n*** SKIPPED chromium_reads_a_compressed_event_stream: \
             `chromium` is not installed (bash .ci/run installs it) ***\n"
        );
        return;
    }
    const KEY: &str = "test-api-key-0123456789";
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page_port = listener.local_addr().expect("addr").port();
    let mut config = common::crier::test_config(None);
    config.publish.api_keys = vec![KEY.into()];
    config.sse.compression = crier::config::Compression::Auto;
    config
        .channels
        .push(common::crier::history_rule("hist:*", 100));
    config.allowed_origins = vec![format!("http://127.0.0.1:{page_port}")];
    let crier = common::crier::Instance::start(config).await;
    let page = format!(
        r#"<!doctype html><html><body><script>
const state = {{ open: false, jobs: [], ids: [], errors: 0 }};
const es = new EventSource("http://{crier}/sse?channel=hist:c&channel=public:d");
es.onopen = () => {{ state.open = true; }};
es.onerror = () => {{ state.errors += 1; }};
es.addEventListener("log", (e) => {{
  const m = JSON.parse(e.data);
  state.jobs.push([m.channel, m.data.job, m.data.lines.length]);
  state.ids.push(e.lastEventId);
}});
setInterval(() => fetch("/results", {{ method: "POST", body: JSON.stringify(state) }}), 100);
</script></body></html>"#,
        crier = crier.addr,
    );
    let (port, mut results) = test_server_on(page, listener).await;
    let profile = tempfile::tempdir().expect("profile");
    let _chromium =
        common::browser::chromium(&format!("http://127.0.0.1:{port}/page"), profile.path());
    tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| v["open"] == true),
    )
    .await
    .expect("the stream opened")
    .expect("results");
    assert_eq!(
        crier.metric("crier_sse_compressed_connections").await,
        1.0,
        "Chromium's stream is compressed"
    );
    let lines: Vec<String> = (0..20)
        .map(|i| format!("step {i}: compiled module_{i}.rs in {i}ms"))
        .collect();
    for (job, channel) in [(1, "hist:c"), (2, "public:d"), (3, "hist:c")] {
        let data = serde_json::json!({"type": "log", "job": job, "lines": lines}).to_string();
        assert_eq!(crier.publish_api(channel, &data, Some(KEY)).await, 200);
    }
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        results.wait_for(|v| v["jobs"].as_array().is_some_and(|j| j.len() == 3)),
    )
    .await
    .expect("every event arrived")
    .expect("results")
    .clone();
    assert_eq!(
        report["jobs"],
        serde_json::json!([["hist:c", 1, 20], ["public:d", 2, 20], ["hist:c", 3, 20]]),
        "{report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
    let ids = report["ids"].as_array().expect("ids");
    assert!(
        ids.iter()
            .all(|id| id.as_str().is_some_and(|s| !s.is_empty())),
        "{report}"
    );
}
