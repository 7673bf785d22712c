//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes`
//! processes on free loopback ports, joined by `redis-cli --cluster create`
//! (three primaries, one replica each by default), killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::{sleep, Instant};

use super::redis::free_port;

/// A node gets this many ports to start on (another process may take one
/// between the probe and Redis binding it).
const PORT_ATTEMPTS: usize = 5;

/// The highest port a cluster node may use: its cluster bus is on the
/// port + 10000, which must exist too.
const MAX_NODE_PORT: u16 = 55_535;

/// How long the cluster gets to agree on its slots.
const FORMATION_DEADLINE: Duration = Duration::from_secs(30);

/// One node of a [`RedisCluster`].
pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

impl Node {
    /// A cluster-enabled `redis-server` answering PING, on a free port
    /// whose cluster bus port (+10000) is free and valid too; a node that
    /// exits (its port taken meanwhile) is started again on another.
    async fn start(dir: &std::path::Path) -> Node {
        for attempt in 1..=PORT_ATTEMPTS {
            let port = node_port();
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir(&node_dir).expect("node dir");
            let log_path = node_dir.join("redis.log");
            let log = std::fs::File::create(&log_path).expect("log");
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("log")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn redis-server");
            let mut node = Node {
                port,
                child: Some(child),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if ping(port).await {
                    return node;
                }
                let exited = node
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited || Instant::now() >= deadline {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    assert!(
                        attempt < PORT_ATTEMPTS,
                        "a cluster node did not start:\n{log}"
                    );
                    break;
                }
                sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the node (SIGKILL, as in a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port for a node, with its cluster bus port free as well.
fn node_port() -> u16 {
    loop {
        let port = free_port();
        if port <= MAX_NODE_PORT
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

/// Whether the node on `port` answers PING.
async fn ping(port: u16) -> bool {
    tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
        .stdin(Stdio::null())
        .output()
        .await
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
}

/// See the module documentation.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// Cluster tests run one at a time: each starts six Redis processes, and
/// several at once on two cores turn failover timings into noise.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl RedisCluster {
    /// `primaries` primaries with `replicas` replicas each, formed and
    /// with every slot served.
    pub async fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("crier-cluster-")
            .tempdir()
            .expect("temp dir");
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            nodes.push(Node::start(dir.path()).await);
        }
        let cluster = RedisCluster { nodes, _dir: dir };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_ok().await;
        // A replica that has not synced yet cannot take over: wait for
        // every replication link, so failover tests test crier.
        for node in &cluster.nodes {
            super::eventually(
                "every replica synced with its primary",
                FORMATION_DEADLINE,
                || async {
                    let info = cluster.cli(node.port, &["INFO", "replication"]).await;
                    info.contains("role:master") || info.contains("master_link_status:up")
                },
            )
            .await;
        }
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on
    /// who serves every slot.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + FORMATION_DEADLINE;
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = self.cli(node.port, &["CLUSTER", "INFO"]).await;
                ok &= info.contains("cluster_state:ok");
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ok in time"
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// What node `port` logged, for failure messages.
    pub fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self._dir.path().join(port.to_string()).join("redis.log"))
            .unwrap_or_default()
    }

    /// Seed URLs for a cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// `redis-cli -p PORT args…` (without -c: no redirection).
    pub async fn cli(&self, port: u16, args: &[&str]) -> String {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `redis-cli -c …` against the first live node: follows redirections,
    /// as an app's cluster client does.
    pub async fn app(&self, args: &[&str]) -> String {
        let port = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(|n| n.port)
            .expect("a live node");
        let output = tokio::process::Command::new("redis-cli")
            .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli -c");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The port of the primary serving `key`'s slot.
    pub async fn primary_of(&self, key: &str) -> u16 {
        self.try_primary_of(key)
            .await
            .unwrap_or_else(|| panic!("no primary serves {key}"))
    }

    /// The port of the primary serving `key`'s slot, if one does (during a
    /// failover, none may).
    pub async fn try_primary_of(&self, key: &str) -> Option<u16> {
        let slot: u16 = self
            .app(&["CLUSTER", "KEYSLOT", key])
            .await
            .trim()
            .parse()
            .expect("slot");
        let shards = self.app(&["CLUSTER", "SLOTS"]).await;
        // Flat redis-cli output: start, end, then the primary's ip, port, id, …
        let lines: Vec<&str> = shards.lines().map(str::trim).collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>()) {
                if lines[i + 2] == "127.0.0.1" && (start..=end).contains(&slot) {
                    return lines[i + 3].parse().ok();
                }
            }
            i += 1;
        }
        None
    }
}
