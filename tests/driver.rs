//! Issue 22: a wire protocol is one file on the WebSocket driver. `Tiny`
//! below is a whole protocol, written as a new one would be: it says what
//! its frames look like, and the driver does the rest (the session, its
//! subscriptions and queue, rates, limits, heartbeats, closing).

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::crier::{test_config, Instance, WAIT};
use common::ws::WsClient;
use crier::testing::websocket::{
    serve, text_frame, CloseCode, Conn, End, Farewell, Gone, Protocol, Publication, Refusal,
    Request, Transport,
};
use serde_json::{json, Value};

/// A test-only protocol: `{"sub": channel}` and `{"unsub": channel}` in,
/// `{"ok": channel}`, `{"no": reason}` and `{"on": channel, "data": …}`
/// out, and `{"bye": why}` before it closes with 4000.
#[derive(Default)]
struct Tiny;

fn json_text(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

impl Protocol for Tiny {
    const TRANSPORT: Transport = Transport::Ws;

    fn frame(p: &Publication) -> Bytes {
        text_frame(&json_text(json!({"on": p.channel, "data": p.data()})))
    }

    async fn open(&mut self, conn: &mut Conn) -> Result<(), Gone> {
        conn.send(&json_text(json!({"hello": true}))).await
    }

    async fn message(&mut self, conn: &mut Conn, text: String) -> Result<(), Gone> {
        let message: Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(channel) = message["sub"].as_str() {
            let reply = match conn.session.subscribe(Request::new(channel)).await {
                Ok(_) => json!({"ok": channel}),
                Err(refusal) => json!({"no": refusal.reason()}),
            };
            return conn.send(&json_text(reply)).await;
        }
        if let Some(channel) = message["unsub"].as_str() {
            conn.session.unsubscribe(channel);
            return conn.send(&json_text(json!({"ok": channel}))).await;
        }
        let refusal = Refusal::BadRequest(format!("not a tiny message: {text}"));
        conn.send(&self.refusal(&refusal)).await
    }

    fn refusal(&self, refusal: &Refusal) -> Vec<u8> {
        json_text(json!({"no": refusal.reason()}))
    }

    fn expiring(&self, _in_secs: u64) -> Option<Vec<u8>> {
        None
    }

    fn heartbeat(&self) -> Option<Vec<u8>> {
        None
    }

    fn ending(&self, end: &End) -> Farewell {
        let why = format!("{end:?}");
        (
            Some(json_text(json!({"bye": why}))),
            (CloseCode(4000), "bye".into()),
        )
    }
}

const API_KEY: &str = "test-api-key-0123456789";

async fn tiny_crier() -> Instance {
    let mut config = test_config(None);
    config.publish.api_keys = vec![API_KEY.into()];
    config.limits.max_message_bytes = 1024;
    Instance::start_with(config, |config, listener| {
        serve::<Tiny>(config, listener, "/tiny")
    })
    .await
}

#[tokio::test]
async fn a_protocol_of_a_few_dozen_lines_runs_on_the_driver() {
    let crier = tiny_crier().await;
    let mut client = WsClient::connect(&crier.ws("/tiny")).await;
    assert_eq!(client.recv_json(WAIT).await, json!({"hello": true}));

    // The session's rules apply: deny by default.
    client.send_json(json!({"sub": "private:x"})).await;
    assert_eq!(client.recv_json(WAIT).await, json!({"no": "forbidden"}));
    client.send_json(json!({"sub": "public:news"})).await;
    assert_eq!(client.recv_json(WAIT).await, json!({"ok": "public:news"}));

    // Publications arrive in the protocol's own frames, in order.
    for n in 0..3 {
        let data = json!({"type": "n", "n": n}).to_string();
        assert_eq!(
            crier.publish_api("public:news", &data, Some(API_KEY)).await,
            200
        );
    }
    for n in 0..3 {
        let on = client.recv_json(WAIT).await;
        assert_eq!(on["on"], "public:news", "{on}");
        let data: Value = serde_json::from_str(on["data"].as_str().expect("data")).expect("json");
        assert_eq!(data["n"], n, "{on}");
    }

    // A refusal the connection survives: the protocol's own words.
    client.send_json(json!({"what": 1})).await;
    let no = client.recv_json(WAIT).await;
    assert!(
        no["no"]
            .as_str()
            .expect("no")
            .starts_with("not a tiny message"),
        "{no}"
    );

    // The driver's limits: a message over the limit ends the connection,
    // with the protocol's farewell and close code.
    client.send_text(&"x".repeat(2048)).await;
    let (code, reason, frames) = client.expect_close(WAIT).await;
    assert_eq!((code, reason.as_str()), (4000, "bye"));
    assert_eq!(
        frames,
        [json!({"bye": "TooLong { size: 2048, max: 1024 }"})]
    );
}

#[tokio::test]
async fn the_driver_refuses_what_admission_refuses_before_the_protocol_runs() {
    let mut config = test_config(None);
    config.allowed_origins = vec!["https://app.example".into()];
    let crier = Instance::start_with(config, |config, listener| {
        serve::<Tiny>(config, listener, "/tiny")
    })
    .await;
    let refused = WsClient::try_connect(&crier.ws("/tiny"), &[("origin", "https://evil.example")])
        .await
        .map(|_| ())
        .expect_err("refused");
    assert!(refused.to_string().contains("403"), "{refused}");
}
