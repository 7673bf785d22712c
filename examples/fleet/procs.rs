//! The processes a fleet run starts: Redis (one server, or a 3-shard
//! Cluster) and crier instances, each on a free loopback port, each killed
//! when its handle is dropped (on a panic too), each stopped only by its
//! own PID.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// User + system CPU seconds of process `pid`, from /proc; NaN when gone.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else {
        return f64::NAN;
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // utime and stime: the 14th and 15th fields, in ticks of 1/100 s.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields
        .get(11..13)
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

/// One `redis-server` child.
pub struct RedisNode {
    child: Child,
    pub port: u16,
}

impl RedisNode {
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }
}

/// Redis for the fleet: what crier's `[redis]` section and the publisher
/// connect to.
pub struct Redis {
    pub nodes: Vec<RedisNode>,
    pub cluster: bool,
    _dir: tempfile::TempDir,
}

/// A free loopback port (released at once: another process may take it
/// before Redis binds it, so starting retries on another).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The highest port a cluster node may use: its cluster bus is on the
/// port + 10000, which must exist (and be free) too.
const MAX_NODE_PORT: u16 = 55_535;

async fn start_node(dir: &std::path::Path, cluster: bool) -> RedisNode {
    for _attempt in 0..5 {
        let port = loop {
            let port = free_port();
            if !cluster {
                break port;
            }
            if port <= MAX_NODE_PORT
                && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                break port;
            }
        };
        let node_dir = dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir);
        if cluster {
            command.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return RedisNode { child, port };
            }
            if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                break; // port taken meanwhile: another one
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.start_kill();
    }
    panic!("redis-server did not start on any of 5 free ports");
}

/// `redis-cli -p PORT args…`, its standard output.
async fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Redis {
    /// One `redis-server`.
    pub async fn single() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = start_node(dir.path(), false).await;
        Redis {
            nodes: vec![node],
            cluster: false,
            _dir: dir,
        }
    }

    /// A Redis Cluster of three primaries and no replicas (three shards),
    /// formed with `redis-cli --cluster create`, every slot served.
    pub async fn cluster() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(start_node(dir.path(), true).await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        'formed: loop {
            for node in &nodes {
                if !cli(node.port, &["CLUSTER", "INFO"])
                    .await
                    .contains("cluster_state:ok")
                {
                    assert!(Instant::now() < deadline, "the cluster did not form");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'formed;
                }
            }
            break;
        }
        Redis {
            nodes,
            cluster: true,
            _dir: dir,
        }
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// crier's `[redis]` configuration for this Redis.
    pub fn crier_config(&self) -> String {
        let urls = self.urls();
        if self.cluster {
            let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
            format!("[redis.cluster]\nnodes = [{}]\n", quoted.join(", "))
        } else {
            format!("[redis]\nurl = \"{}\"\n", urls[0])
        }
    }

    /// Forgets the command statistics of every node (`CONFIG RESETSTAT`).
    pub async fn reset_stats(&self) {
        for node in &self.nodes {
            cli(node.port, &["CONFIG", "RESETSTAT"]).await;
        }
    }

    /// Commands run since [`Redis::reset_stats`], all nodes together:
    /// (command, calls, microseconds), most time first.
    pub async fn command_stats(&self) -> Vec<(String, u64, u64)> {
        let mut all: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for node in &self.nodes {
            // `cmdstat_xrange:calls=12,usec=345,usec_per_call=…`
            for line in cli(node.port, &["INFO", "commandstats"]).await.lines() {
                let Some((name, fields)) = line
                    .trim()
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let field = |key: &str| {
                    fields
                        .split(',')
                        .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                let entry = all.entry(name.to_owned()).or_default();
                entry.0 += field("calls");
                entry.1 += field("usec");
            }
        }
        let mut list: Vec<(String, u64, u64)> = all
            .into_iter()
            .map(|(name, (calls, usec))| (name, calls, usec))
            .collect();
        list.sort_by_key(|c| std::cmp::Reverse(c.2));
        list
    }

    /// Stops every node (by its own PID) and waits for it.
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.start_kill();
            let _ = node.child.wait().await;
        }
    }
}

/// One crier process of the fleet.
pub struct Crier {
    /// Its number in the run: 0…N-1 for the first ones, then one more for
    /// each replacement started by the rolling restart.
    pub id: usize,
    /// The place in the fleet it holds (a replacement takes its
    /// predecessor's).
    pub slot: usize,
    child: Child,
    pub addr: SocketAddr,
    /// WARN and ERROR lines it logged.
    pub warnings: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

/// What every instance of the fleet is configured with besides Redis.
pub struct CrierSettings {
    /// `[limits] max_connections`.
    pub max_connections: usize,
    /// `[shutdown] grace` and `drain`, in seconds.
    pub grace: u64,
    pub drain: u64,
}

impl Crier {
    /// Starts the release binary (`target/release/crier`, or
    /// `$BENCH_CRIER_BIN`) on `127.0.0.1:0` and waits until `/readyz`
    /// answers 200.
    pub async fn start(id: usize, slot: usize, redis: &Redis, s: &CrierSettings) -> Crier {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("crier.toml");
        let text = format!(
            "# History channels first: the first matching rule decides.\n\
             [[channels]]\npattern = \"fleet.h.*\"\nsubscribe = \"anyone\"\n\
             history = {{ size = 1000, ttl = \"1h\" }}\n\
             [[channels]]\npattern = \"fleet.*\"\nsubscribe = \"anyone\"\n\
             [limits]\nmax_connections = {}\nqueue_size = 1024\n\
             [shutdown]\ngrace = \"{}s\"\ndrain = \"{}s\"\n{}",
            s.max_connections,
            s.grace,
            s.drain,
            redis.crier_config()
        );
        std::fs::write(&config, text).expect("write config");
        let bin =
            std::env::var("BENCH_CRIER_BIN").unwrap_or_else(|_| "target/release/crier".into());
        let mut command = Command::new(&bin);
        // CRIER_* variables are configuration to crier: keep ours out.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CRIER_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("RUST_LOG", "warn,crier::server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin} ({e}); build it with cargo build --release")
            });
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr: SocketAddr = loop {
            let line = lines
                .next_line()
                .await
                .expect("read crier's log")
                .unwrap_or_else(|| panic!("crier #{id} exited before listening"));
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(addr) = v["fields"]["addr"].as_str() {
                break addr.parse().expect("crier's listen address");
            }
        };
        // The rest of its log: warnings and errors are counted, and the
        // first few shown, so a run that goes wrong says where.
        let warnings = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&warnings);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
                    let n = counted.fetch_add(1, Ordering::Relaxed);
                    if n < 5 {
                        eprintln!("fleet: crier #{id}: {line}");
                    }
                }
            }
        });
        let crier = Crier {
            id,
            slot,
            child,
            addr,
            warnings,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while crier.get("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "crier #{id} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        crier
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// User + system CPU seconds of the process, from /proc (the
    /// Prometheus process collector reports whole seconds only).
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// A minimal HTTP/1.0 GET: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        crate::http::get(self.addr, path).await
    }

    /// Metrics by their full name (labels included, as exposed), from
    /// one scrape of `/metrics`; NaN for a name not found.
    pub async fn metrics<const N: usize>(&self, names: [&str; N]) -> [f64; N] {
        let (_, body) = self.get("/metrics").await;
        names.map(|name| {
            body.lines()
                .find_map(|l| {
                    l.strip_prefix(name)
                        .filter(|v| v.starts_with(' '))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(f64::NAN)
        })
    }

    /// Open SSE connections and resident memory in bytes.
    pub async fn connections_and_rss(&self) -> (f64, f64) {
        let [conns, rss] = self
            .metrics([
                "crier_connections{transport=\"sse\"}",
                "process_resident_memory_bytes",
            ])
            .await;
        (conns, rss)
    }

    /// SIGTERM, with the real `kill` command, to this process only.
    pub async fn sigterm(&self) {
        let Some(pid) = self.pid() else { return };
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits at most `limit` for the process to exit: its exit code
    /// (`None` if it had to be killed) and its CPU seconds as last seen
    /// (sampled while waiting: once reaped, /proc forgets them).
    pub async fn wait_exit(&mut self, limit: Duration) -> (Option<i32>, f64) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut cpu = self.cpu_seconds();
        loop {
            tokio::select! {
                status = self.child.wait() => return (status.ok().and_then(|s| s.code()), cpu),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let now = self.cpu_seconds();
                    if !now.is_nan() {
                        cpu = now;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        self.kill().await;
                        return (None, cpu);
                    }
                }
            }
        }
    }

    /// Kills the process (by its PID) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
