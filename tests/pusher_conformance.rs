//! The Pusher conformance suite (tests/pusher/conformance.mjs), which any
//! Pusher-compatible server can be checked with, run against crier: every
//! check passes. The suite drives the unmodified pusher-js and `pusher`
//! SDK; it is configured by environment variables only (docs/pusher.md,
//! "A conformance suite").
//!
//! Needs node and `npm ci --prefix tests/pusher` (done by `.ci/run`).

// Tests and their helpers fail by panicking; the no-panic lints are for crier.
#![allow(clippy::expect_used, clippy::panic)]

mod common;

use common::crier::{history_rule, rule, Instance};
use common::pusher::{port, pusher_config, APP_ID, KEY, SECRET};
use common::redis::RedisServer;
use common::repo;
use crier::config::Subscribe;
use serde_json::Value;

#[tokio::test]
async fn crier_passes_every_check_of_the_pusher_conformance_suite() {
    assert!(
        repo("tests/pusher/node_modules/pusher-js/package.json").exists(),
        "run `npm ci --prefix tests/pusher` (node and npm needed)"
    );
    let redis = RedisServer::start().await;
    // What the suite asks of a server: client events and subscription
    // counts on, and its channels open to anyone (signed ones still need
    // the app's signature); cache channels keep their last event.
    let mut config = pusher_config(&redis);
    config.events.stream = Some("crier:events".into());
    config.pusher.apps[0].subscription_count = true;
    config.channels.insert(0, history_rule("cache-conf-*", 1));
    config.channels.push(rule("*", Subscribe::Anyone));
    let crier = Instance::start(config).await;
    let crier_port = port(&crier.addr).to_string();

    let out = tokio::process::Command::new("node")
        .arg(repo("tests/pusher/conformance.mjs"))
        .envs([
            ("PUSHER_HOST", "127.0.0.1"),
            ("PUSHER_PORT", crier_port.as_str()),
            ("PUSHER_APP_ID", APP_ID),
            ("PUSHER_APP_KEY", KEY),
            ("PUSHER_APP_SECRET", SECRET),
        ])
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] == false).collect();
    assert!(
        failed.is_empty() && out.status.success(),
        "failed checks: {failed:#?}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = lines.iter().filter(|l| l["ok"] == true).count();
    assert_eq!(passed, 15, "every check ran: {stdout}");
    crier.shutdown().await;
}
