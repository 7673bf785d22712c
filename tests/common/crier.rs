//! Real crier instances for tests: in-process on `127.0.0.1:0` (the same
//! `crier::serve` entry point `main` uses), or the real binary as a child
//! process when a test needs signals or exit codes.

use std::process::Stdio;
use std::time::Duration;

use crier::config::{ChannelRule, Config, LogFormat, Subscribe};
use crier::Running;
use http::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use super::{eventually, http_get};

/// How long tests wait for something that should take milliseconds.
pub const WAIT: Duration = Duration::from_secs(10);

/// A config for tests: `public:*` open to anyone, short linger and shutdown.
pub fn test_config(redis_url: Option<String>) -> Config {
    let mut config = Config::default();
    config.redis.url = redis_url;
    config.redis.linger = Duration::from_millis(200);
    config.redis.reconnect_max = Duration::from_millis(500);
    config.channels = vec![ChannelRule {
        pattern: "public:*".into(),
        subscribe: Subscribe::Anyone,
        history: None,
        event_field: None,
        presence: false,
    }];
    config.shutdown.grace = Duration::from_millis(300);
    config.shutdown.drain = Duration::from_millis(700);
    config.log.format = LogFormat::Text;
    config
}

/// A rule: `pattern`, who may `subscribe`, no history, no presence.
pub fn rule(pattern: &str, subscribe: Subscribe) -> ChannelRule {
    ChannelRule {
        pattern: pattern.into(),
        subscribe,
        history: None,
        event_field: None,
        presence: false,
    }
}

/// A rule: `pattern`, open to anyone, keeping `size` messages for ten
/// minutes.
pub fn history_rule(pattern: &str, size: u64) -> ChannelRule {
    ChannelRule {
        history: Some(crier::config::HistoryRule {
            size,
            ttl: Duration::from_secs(600),
        }),
        ..rule(pattern, Subscribe::Anyone)
    }
}

/// `crier check-config` on `toml` (written in `dir`) must exit 64 and
/// name `field`.
pub async fn check_config_refuses(dir: &std::path::Path, toml: &str, field: &str) {
    let file = dir.join("crier.toml");
    std::fs::write(&file, toml).expect("config");
    let out = crier_command()
        .args(["check-config", "--config", file.to_str().expect("path")])
        .output()
        .await
        .expect("check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
    assert!(stderr.contains(field), "{toml}: names {field}: {stderr}");
}

/// How an in-process crier starts serving on a bound listener.
pub type Serve = fn(Config, TcpListener) -> anyhow::Result<Running>;

/// One in-process crier.
pub struct Instance {
    running: Option<Running>,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// Panics recorded before this instance started (see `panics`).
    panics_before: usize,
}

impl Instance {
    /// Starts crier with `config` on a free loopback port and waits until
    /// `/readyz` says ready.
    pub async fn start(config: Config) -> Instance {
        let instance = Self::start_unready(config).await;
        instance.wait_ready().await;
        instance
    }

    /// Starts without waiting for readiness.
    pub async fn start_unready(config: Config) -> Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_unready_on(config, listener)
    }

    /// Starts on `listener`, bound beforehand (when something started
    /// earlier must know crier's address), and waits until ready.
    pub async fn start_on(config: Config, listener: TcpListener) -> Instance {
        let instance = Self::start_unready_on(config, listener);
        instance.wait_ready().await;
        instance
    }

    /// Starts with `serve` in place of `crier::serve` (to serve a test's
    /// own protocol too), and waits until ready.
    pub async fn start_with(config: Config, serve: Serve) -> Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let instance = Self::serving(config, listener, serve);
        instance.wait_ready().await;
        instance
    }

    fn start_unready_on(config: Config, listener: TcpListener) -> Instance {
        Self::serving(config, listener, crier::serve)
    }

    fn serving(mut config: Config, listener: TcpListener, serve: Serve) -> Instance {
        if super::inflating::enabled() {
            // The compressing run: every message compressed, however small.
            config.ws.compression_min_bytes = 0;
        }
        super::panics::watch();
        let panics_before = super::panics::count();
        let running = serve(config, listener).expect("crier starts");
        let addr = running.addr().to_string();
        Instance {
            running: Some(running),
            addr,
            panics_before,
        }
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://127.0.0.1:PORT{path}`
    pub fn ws(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// `/sse?channel=..` for `channels`.
    pub fn sse_url(&self, channels: &[&str]) -> String {
        let q: Vec<String> = channels
            .iter()
            .map(|c| format!("channel={}", urlencode(c)))
            .collect();
        self.http(&format!("/sse?{}", q.join("&")))
    }

    /// Current `/readyz` status.
    pub async fn readyz(&self) -> StatusCode {
        http_get(&self.http("/readyz")).await.0
    }

    /// Waits for `/readyz` to answer `status`.
    pub async fn wait_readyz(&self, status: StatusCode) {
        let url = self.http("/readyz");
        eventually(&format!("/readyz {status}"), WAIT, || {
            let url = url.clone();
            async move { http_get(&url).await.0 == status }
        })
        .await;
    }

    /// Waits for `/readyz` 200.
    pub async fn wait_ready(&self) {
        self.wait_readyz(StatusCode::OK).await;
    }

    /// The value of one series from `/metrics`, e.g.
    /// `crier_connections{transport="ws"}`; 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (status, body) = http_get(&self.http("/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        metric_value(&body, series)
    }

    /// Waits until `series` reaches `value`.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let url = self.http("/metrics");
        eventually(&format!("{series} == {value}"), WAIT, || {
            let url = url.clone();
            async move { metric_value(&http_get(&url).await.1, series) == value }
        })
        .await;
    }

    /// Publishes through `POST /api/publish` (memory broker in these tests:
    /// dev mode or an API key).
    pub async fn publish_api(&self, channel: &str, data: &str, key: Option<&str>) -> StatusCode {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth.as_str()));
        }
        let body = format!(
            r#"{{"channel":{},"data":{data}}}"#,
            serde_json::json!(channel)
        );
        super::http_post(&self.http("/api/publish"), &headers, &body)
            .await
            .0
    }

    /// SIGTERM equivalent; resolves once every connection has left.
    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.stopped().await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
        super::panics::assert_none_since(self.panics_before);
    }
}

/// Reads one series out of a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The real `crier` binary, with none of the caller's `CRIER_*` variables:
/// they are configuration to crier, and tests must not depend on the shell
/// they run in.
pub fn crier_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
    for key in inherited_crier_vars() {
        cmd.env_remove(key);
    }
    cmd
}

/// The real `crier` binary run with an open-file limit of `soft`/`hard`
/// (util-linux `prlimit`, which sets the limit and then execs crier: the
/// child's PID is crier's), hermetic like [`crier_command`].
pub fn limited_crier_command(soft: u64, hard: u64) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_crier"));
    for key in inherited_crier_vars() {
        cmd.env_remove(key);
    }
    cmd
}

/// The caller's `CRIER_*` variables, for commands that end up running crier
/// (a shell line in the docs): remove them so the test is hermetic.
pub fn inherited_crier_vars() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(key, _)| key)
        .filter(|key| key.to_string_lossy().starts_with("CRIER_"))
        .collect()
}

/// The real `crier` binary as a child process.
pub struct Process {
    /// The child; killed on drop if still running.
    pub child: Child,
    /// `127.0.0.1:PORT`, read from its "listening" log line.
    pub addr: String,
    /// Everything it wrote to stderr so far is collected here by a task.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Process {
    /// Runs `crier ARGS` (on `--listen 127.0.0.1:0` unless ARGS name an
    /// address) with `envs` and waits for its "listening" line.
    pub async fn start(args: &[&str], envs: &[(&str, &str)]) -> Process {
        Self::start_command(crier_command(), args, envs).await
    }

    /// [`Process::start`] with `cmd` (see [`limited_crier_command`]).
    pub async fn start_command(mut cmd: Command, args: &[&str], envs: &[(&str, &str)]) -> Process {
        cmd.args(args);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if super::inflating::enabled() {
            cmd.env("CRIER_WS__COMPRESSION_MIN_BYTES", "0");
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn crier");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(addr) = v["fields"]["addr"].as_str() {
                        if let Some(tx) = addr_tx.take() {
                            let _ = tx.send(addr.to_string());
                        }
                    }
                }
                let mut log = sink.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = tokio::time::timeout(WAIT, addr_rx)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "crier did not log its address: {}",
                    log.lock().expect("lock")
                )
            })
            .expect("crier exited before listening");
        Process { child, addr, log }
    }

    /// `http://127.0.0.1:PORT{path}`
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends SIGTERM with the real `kill` command, to this child only.
    pub async fn sigterm(&self) {
        self.signal("-TERM").await;
    }

    /// Sends SIGKILL with the real `kill` command, to this child only, and
    /// waits until it is gone.
    pub async fn sigkill(&mut self) {
        self.signal("-KILL").await;
        let _ = self.child.wait().await;
    }

    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        super::panics::assert_log_clean(&self.log_text());
    }
}
