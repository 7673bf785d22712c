//! Where the Redis primary is: one node (`redis.url`), or whatever the
//! sentinels say (`[redis.sentinel]`). Asked again at every (re)connection,
//! and every answer is checked with `ROLE`: crier only ever talks to a
//! primary, so a replica or a sentinel given as `redis.url` is refused with
//! a clear reason instead of a connection that cannot publish.

use std::time::Duration;

use crate::config::{RedisConfig, SentinelConfig};

use crate::redis_client as client;

/// See the module documentation.
#[derive(Clone)]
pub(super) enum Target {
    /// `redis.url`.
    Node(String),
    /// `[redis.sentinel]`.
    Sentinel(SentinelConfig),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node(url) => f.write_str(&crate::config::redact_url(url)),
            Target::Sentinel(s) => write!(
                f,
                "primary `{}` of sentinels {}",
                s.master,
                s.nodes
                    .iter()
                    .map(|n| crate::config::redact_url(n))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// A primary found and checked: a client for it, and its address for logs.
pub(super) struct Primary {
    pub client: redis::Client,
    pub address: String,
}

impl Target {
    /// The configured target.
    pub(super) fn of(config: &RedisConfig) -> Option<Self> {
        match (&config.url, &config.sentinel) {
            (Some(url), _) => Some(Target::Node(url.clone())),
            (None, Some(sentinel)) => Some(Target::Sentinel(sentinel.clone())),
            (None, None) => None,
        }
    }

    /// Finds the primary and checks that it is one; `config` gives the data
    /// nodes' credentials and TLS.
    pub(super) async fn primary(
        &self,
        config: &RedisConfig,
        timeout: Duration,
    ) -> Result<Primary, String> {
        let (address, client) = match self {
            Target::Node(url) => (
                crate::config::redact_url(url),
                client::open("redis.url", url, config)?,
            ),
            Target::Sentinel(sentinel) => ask_sentinels(sentinel, config, timeout).await?,
        };
        let role = bounded(timeout, role(&client))
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        match (role.as_str(), self) {
            ("master", _) => Ok(Primary { client, address }),
            ("slave", Target::Node(_)) => Err(format!(
                "{address} is a replica, not the primary: point redis.url at the primary, \
                 or use [redis.sentinel] to follow failovers"
            )),
            ("sentinel", Target::Node(_)) => Err(format!(
                "{address} is a Sentinel: configure [redis.sentinel] (master, nodes) instead of redis.url"
            )),
            (other, Target::Sentinel(_)) => Err(format!(
                "the sentinels name {address} as the primary, but it is a {other} \
                 (a failover in progress?)"
            )),
            (other, Target::Node(_)) => Err(format!("{address} answers ROLE with `{other}`")),
        }
    }
}

impl Target {
    /// For Sentinel: where the sentinels say the primary is now (its URL,
    /// password redacted). A `+switch-master` shows here within a canary
    /// interval, even while the old primary still answers as one.
    pub(super) async fn sentinels_say(
        &self,
        config: &RedisConfig,
        timeout: Duration,
    ) -> Option<String> {
        match self {
            Target::Node(_) => None,
            Target::Sentinel(sentinel) => ask_sentinels(sentinel, config, timeout)
                .await
                .ok()
                .map(|(address, _)| address),
        }
    }
}

/// The first sentinel that knows the primary's address wins.
async fn ask_sentinels(
    sentinel: &SentinelConfig,
    data: &RedisConfig,
    timeout: Duration,
) -> Result<(String, redis::Client), String> {
    let own = RedisConfig {
        password: sentinel.password.clone(),
        tls: data.tls.clone(),
        ..RedisConfig::default()
    };
    let mut errors = Vec::new();
    for (i, node) in sentinel.nodes.iter().enumerate() {
        let field = format!("redis.sentinel.nodes[{i}]");
        let asked = async {
            let client = client::open(&field, node, &own)?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| client::describe(&e))?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&sentinel.master)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            addr.ok_or_else(|| format!("does not monitor a primary named `{}`", sentinel.master))
        };
        match bounded(timeout, asked).await {
            Ok((host, port)) => {
                let scheme = if node.starts_with("rediss:") {
                    "rediss"
                } else {
                    "redis"
                };
                let url = format!("{scheme}://{host}:{port}");
                let client = client::open("redis.sentinel", &url, data)?;
                return Ok((url, client));
            }
            Err(e) => errors.push(format!("{}: {e}", crate::config::redact_url(node))),
        }
    }
    Err(format!(
        "no sentinel named the primary: {}",
        errors.join("; ")
    ))
}

/// `ROLE`'s first word: `master`, `slave` or `sentinel`.
async fn role(client: &redis::Client) -> Result<String, String> {
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| client::describe(&e))?;
    let reply: Vec<redis::Value> = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    match reply.first() {
        Some(redis::Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Ok(s.clone()),
        other => Err(format!("unexpected ROLE reply {other:?}")),
    }
}

async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}
