//! A real `redis-server` child process on a free loopback port, for tests.
//!
//! Redis behaviour is tested against Redis: each test starts its own server
//! (no shared state, no fixed port) and the process is killed when the handle
//! is dropped, even if the test panics.

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::time::{sleep, timeout, Instant};

/// How long a freshly spawned server gets to answer PING.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// How many fresh ports `start` tries when another process steals the port
/// between our probe and Redis binding it.
const PORT_ATTEMPTS: usize = 5;
/// How long `restart` keeps retrying while the old port is momentarily taken.
const RESTART_DEADLINE: Duration = Duration::from_secs(10);
/// Bound on any single command sent by the helpers, so a wedged server fails
/// the test instead of hanging it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A test's own Redis connection waits up to [`COMMAND_TIMEOUT`], not
/// redis-rs's default 500 ms answer timeout: a test runtime that is busy
/// with a thousand readers on a loaded 2-core machine (CI) can take longer
/// than that to read an answer Redis sent at once.
fn patient() -> ::redis::AsyncConnectionConfig {
    ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
}

/// A `redis-server` child bound to `127.0.0.1:port`, killed on drop.
pub struct RedisServer {
    /// Fixed for the server's lifetime so `restart` comes back where clients
    /// (and crier's reconnect loop) expect it.
    port: u16,
    /// Working directory and log file; kept across `stop`/`restart` so the log
    /// tells the whole story when a test fails.
    dir: tempfile::TempDir,
    /// `None` while stopped.
    child: Option<Child>,
    /// A TLS port beside the plain one, when started with [`RedisServer::start_tls`].
    tls: Option<(u16, Tls)>,
    /// More `redis-server` arguments (`--replicaof …`).
    extra: Vec<String>,
}

/// What a TLS-enabled server presents and asks for (PEM file paths).
#[derive(Clone)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that client certificates must chain to.
    pub ca_file: PathBuf,
    /// `tls-auth-clients yes`: clients must present a certificate.
    pub auth_clients: bool,
}

/// Why one spawn attempt did not produce a serving Redis.
enum SpawnError {
    /// The port was taken between probing and binding: worth retrying.
    AddrInUse,
    /// Anything else: a test environment problem, reported with the log.
    Fatal(String),
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        Self::start_with(None, Vec::new()).await
    }

    /// A server started with more `redis-server` arguments
    /// (`["--maxmemory", "4mb"]`).
    pub async fn start_with_args(args: &[&str]) -> RedisServer {
        Self::start_with(None, args.iter().map(|a| (*a).to_owned()).collect()).await
    }

    /// A replica of `primary`, once its replication link is up.
    pub async fn start_replica(primary: &RedisServer) -> RedisServer {
        let args = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ];
        let replica = Self::start_with(None, args).await;
        super::eventually(
            "the replica's link to its primary",
            Duration::from_secs(10),
            || async {
                replica
                    .cli(&["INFO", "replication"])
                    .await
                    .contains("master_link_status:up")
            },
        )
        .await;
        replica
    }

    /// A server that also listens with TLS (on [`RedisServer::tls_url`]);
    /// the plain port stays for the tests' own commands.
    pub async fn start_tls(tls: Tls) -> RedisServer {
        Self::start_with(Some(tls), Vec::new()).await
    }

    async fn start_with(tls: Option<Tls>, extra: Vec<String>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("crier-redis-")
            .tempdir()
            .expect("create a temp dir for redis-server");
        let mut server = RedisServer {
            port: 0,
            dir,
            child: None,
            tls: None,
            extra,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            server.tls = tls.clone().map(|t| (free_port(), t));
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(SpawnError::AddrInUse) if attempt < PORT_ATTEMPTS => continue,
                Err(SpawnError::AddrInUse) => server.fail(&format!(
                    "port was taken on each of {PORT_ATTEMPTS} attempts"
                )),
                Err(SpawnError::Fatal(why)) => server.fail(&why),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// The TCP port the server listens on (stable across `restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for the redis crate and for crier's config.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT` of a server started with TLS.
    pub fn tls_url(&self) -> String {
        let (port, _) = self.tls.as_ref().expect("started with start_tls");
        format!("rediss://127.0.0.1:{port}")
    }

    /// Everything the server has logged so far (all runs), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL, as in a crash) and reaps it; the temp dir and
    /// the port number are kept for `restart`. A no-op when already stopped.
    pub async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_and_reap(child);
        }
    }

    /// Starts the server again on the same port and waits until it answers
    /// PING. Stops it first if it is still running. Retries for up to 10 s
    /// while the port is momentarily unavailable.
    pub async fn restart(&mut self) {
        self.stop().await;
        let deadline = Instant::now() + RESTART_DEADLINE;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(SpawnError::AddrInUse) if Instant::now() < deadline => {
                    sleep(Duration::from_millis(100)).await;
                }
                Err(SpawnError::AddrInUse) => self.fail(&format!(
                    "port {} stayed unavailable for {RESTART_DEADLINE:?} on restart",
                    self.port
                )),
                Err(SpawnError::Fatal(why)) => self.fail(&why),
            }
        }
    }

    /// The server's process id (ours: we started it), for SIGSTOP/SIGCONT.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("redis-server running")
    }

    /// `FCALL crier_publish 1 <channel> <payload>`: what an app calls to
    /// publish with history. Returns the message id (None: no history).
    pub async fn fcall_publish(&self, channel: &str, payload: &str) -> Option<String> {
        self.fcall_publish_as("crier_publish", channel, payload)
            .await
            .expect("FCALL crier_publish")
    }

    /// `FCALL <function> 1 <channel> <payload>`: a deployment with a
    /// `channel_prefix` names its functions `crier_publish_<name>`.
    pub async fn fcall_publish_as(
        &self,
        function: &str,
        channel: &str,
        payload: &str,
    ) -> ::redis::RedisResult<Option<String>> {
        let client = ::redis::Client::open(self.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&patient())
            .await
            .expect("connect to redis");
        ::redis::cmd("FCALL")
            .arg(function)
            .arg(1)
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
    }

    /// A publisher calling `crier_publish` every `every` with `{"n":N}` for
    /// N in 0..total, round-robin over `channels`, as an app would.
    pub fn paced_publisher(
        &self,
        channels: Vec<String>,
        total: u64,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.paced_publisher_as("crier_publish", channels, total, every)
    }

    /// [`Self::paced_publisher`] through `function` (a deployment with a
    /// `channel_prefix` calls `crier_publish_<name>`).
    pub fn paced_publisher_as(
        &self,
        function: &str,
        channels: Vec<String>,
        total: u64,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let url = self.url();
        let function = function.to_owned();
        tokio::spawn(async move {
            let client = ::redis::Client::open(url).expect("redis url");
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&patient())
                .await
                .expect("connect to redis");
            let mut tick = tokio::time::interval(every);
            for n in 0..total {
                tick.tick().await;
                let channel = &channels[(n % channels.len() as u64) as usize];
                let _: Option<String> = ::redis::cmd("FCALL")
                    .arg(&function)
                    .arg(1)
                    .arg(channel)
                    .arg(format!(r#"{{"n":{n}}}"#))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_else(|e| panic!("FCALL {function}: {e}"));
            }
        })
    }

    /// PUBLISH over a fresh connection; returns how many subscribers received it.
    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        self.query(&cmd, "PUBLISH").await
    }

    /// Starts `MONITOR`: what Redis executes from now on, as
    /// [`Monitor::until`] reads it.
    pub async fn monitor(&self) -> Monitor {
        let mut child = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "MONITOR"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli MONITOR");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ok = timeout(COMMAND_TIMEOUT, lines.next_line()).await;
        assert_eq!(
            ok.expect("MONITOR answers").expect("read").as_deref(),
            Some("OK")
        );
        Monitor {
            _child: child,
            lines,
            port: self.port,
        }
    }

    /// Runs the real `redis-cli -h 127.0.0.1 -p PORT args...` and returns its
    /// stdout, so a test can prove the literal command-line path works.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = timeout(
            COMMAND_TIMEOUT,
            tokio::process::Command::new("redis-cli")
                .arg("-h")
                .arg("127.0.0.1")
                .arg("-p")
                .arg(self.port.to_string())
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("redis-cli {args:?} did not finish within {COMMAND_TIMEOUT:?}"))
        .expect("run redis-cli (is it on PATH?)");
        assert!(
            output.status.success(),
            "redis-cli {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("redis-cli printed non-UTF-8 output")
    }

    /// PUBSUB NUMSUB: how many connections are subscribed to `channel` right
    /// now (lets a test see crier's dynamic SUBSCRIBE/UNSUBSCRIBE).
    pub async fn pubsub_numsub(&self, channel: &str) -> i64 {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg(channel);
        let (name, count): (String, i64) = self.query(&cmd, "PUBSUB NUMSUB").await;
        assert_eq!(name, channel, "PUBSUB NUMSUB answered for another channel");
        count
    }

    /// Runs one command on a fresh connection, panicking with context on error.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, what: &str) -> T {
        let result = timeout(COMMAND_TIMEOUT, async {
            let client = redis::Client::open(self.url())?;
            let mut con = client
                .get_multiplexed_async_connection_with_config(&patient())
                .await?;
            cmd.query_async::<T>(&mut con).await
        })
        .await;
        match result {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("{what} on {} failed: {e}", self.url()),
            Err(_) => panic!(
                "{what} on {} timed out after {COMMAND_TIMEOUT:?}",
                self.url()
            ),
        }
    }

    /// Spawns `redis-server` on `self.port` and waits until *this* process
    /// answers PING. On failure the child is reaped and `self.child` is `None`.
    async fn spawn_and_wait(&mut self) -> Result<(), SpawnError> {
        // Only this run's part of the (appended) log explains this run's exit.
        let log_start = self.log().len();
        let child = self.spawn()?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            // Check the child first: if it died (e.g. port taken), a PING that
            // succeeds would be answered by someone else's server.
            if let Some(status) = self.child_exit_status() {
                self.child = None;
                let log = self.log();
                let this_run = log.get(log_start..).unwrap_or(&log);
                return Err(if this_run.contains("Address already in use") {
                    SpawnError::AddrInUse
                } else {
                    SpawnError::Fatal(format!("redis-server exited early with {status}"))
                });
            }
            if self.answering_pid().await == Some(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(child) = self.child.take() {
                    kill_and_reap(child);
                }
                return Err(SpawnError::Fatal(format!(
                    "redis-server did not answer PING within {STARTUP_DEADLINE:?}"
                )));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn(&self) -> Result<Child, SpawnError> {
        // Append, so the log of a restarted server still shows the first run.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| SpawnError::Fatal(format!("open redis log file: {e}")))?;
        let log_err = log
            .try_clone()
            .map_err(|e| SpawnError::Fatal(format!("clone redis log file handle: {e}")))?;
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        command.args(&self.extra);
        if let Some((port, tls)) = &self.tls {
            command
                .arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert_file)
                .arg("--tls-key-file")
                .arg(&tls.key_file)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca_file)
                .args([
                    "--tls-auth-clients",
                    if tls.auth_clients { "yes" } else { "no" },
                ]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| SpawnError::Fatal(format!("spawn redis-server (is it on PATH?): {e}")))
    }

    /// `Some(status)` once the child has exited.
    fn child_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("poll redis-server child status")
    }

    /// The `process_id` of whatever Redis answers on our port, if any. Comparing
    /// it with our child's PID guards against a port stolen by another server.
    async fn answering_pid(&self) -> Option<u32> {
        let attempt = async {
            let client = redis::Client::open(self.url()).ok()?;
            let mut con = client.get_multiplexed_async_connection().await.ok()?;
            let pong: String = redis::cmd("PING").query_async(&mut con).await.ok()?;
            if pong != "PONG" {
                return None;
            }
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut con)
                .await
                .ok()?;
            info.lines()
                .find_map(|line| line.strip_prefix("process_id:"))
                .and_then(|pid| pid.trim().parse().ok())
        };
        timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Panics with the server log attached, after killing any child.
    fn fail(&mut self, why: &str) -> ! {
        if let Some(child) = self.child.take() {
            kill_and_reap(child);
        }
        panic!(
            "redis-server on 127.0.0.1:{}: {why}\n--- {} ---\n{}",
            self.port,
            self.log_path().display(),
            self.log()
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_and_reap(child);
        }
    }
}

/// SIGKILL our own child by PID and reap it. Waiting right after SIGKILL
/// returns at once, so this is fine to call from async code and from `Drop`.
fn kill_and_reap(mut child: Child) {
    // Errors mean it already exited; `wait` still reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

/// A port that was free a moment ago. Another process may grab it before
/// Redis binds it; callers handle that by retrying.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of the probe listener")
        .port()
}

/// A `redis-server --sentinel` child on a free loopback port, watching one
/// primary as `mymaster` (quorum 2, down after 1 s), killed on drop.
pub struct Sentinel {
    pub port: u16,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";

impl Sentinel {
    /// Starts a sentinel monitoring `primary` and waits until it answers
    /// (a fresh port per attempt, in case another process takes one).
    pub async fn start(primary: &RedisServer) -> Sentinel {
        for _ in 0..PORT_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("crier-sentinel-")
                .tempdir()
                .expect("temp dir");
            let port = free_port();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir = dir.path().display(),
                    primary = primary.port,
                ),
            )
            .expect("sentinel.conf");
            let log = std::fs::File::create(dir.path().join("sentinel.log")).expect("log");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("log")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn redis-server --sentinel");
            let mut sentinel = Sentinel {
                port,
                _dir: dir,
                child: Some(child),
            };
            let deadline = Instant::now() + STARTUP_DEADLINE;
            while Instant::now() < deadline {
                let exited = sentinel
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some());
                if exited {
                    break;
                }
                if sentinel.ping().await {
                    return sentinel;
                }
                sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("no sentinel could be started in {PORT_ATTEMPTS} attempts");
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ping(&self) -> bool {
        let attempt = async {
            let client = redis::Client::open(self.url()).ok()?;
            let mut con = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut con)
                .await
                .ok()
        };
        timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// A `SENTINEL …` command's answer.
    pub async fn ask<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        let mut con = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd("SENTINEL");
        for a in args {
            cmd.arg(*a);
        }
        timeout(COMMAND_TIMEOUT, cmd.query_async(&mut con))
            .await
            .unwrap_or_else(|_| panic!("SENTINEL {args:?} timed out"))
    }

    /// The primary's port, as this sentinel sees it.
    pub async fn primary_port(&self) -> Option<u16> {
        let addr: Option<(String, u16)> = self
            .ask(&["get-master-addr-by-name", MASTER_NAME])
            .await
            .ok()
            .flatten();
        addr.map(|(_, port)| port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill_and_reap(child);
        }
    }
}

/// A running `MONITOR` of one server (see [`RedisServer::monitor`]).
pub struct Monitor {
    _child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    port: u16,
}

impl Monitor {
    /// Every command Redis executed since the monitor started (or since the
    /// last call) up to now: a marker sent after them (`ECHO`) ends the
    /// read, so nothing executed before this call is missed.
    pub async fn until_now(&mut self) -> Vec<String> {
        let marker = format!("monitor-marker-{}", super::unique("m"));
        let port = self.port.to_string();
        let echo = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "ECHO", &marker])
            .stdin(Stdio::null())
            .output();
        timeout(COMMAND_TIMEOUT, echo)
            .await
            .expect("ECHO in time")
            .expect("ECHO");
        let mut seen = Vec::new();
        loop {
            let line = timeout(COMMAND_TIMEOUT, self.lines.next_line())
                .await
                .expect("MONITOR output")
                .expect("read")
                .expect("MONITOR running");
            if line.contains(&marker) {
                return seen;
            }
            seen.push(line);
        }
    }
}
