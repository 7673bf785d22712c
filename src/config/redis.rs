//! `[redis]`: where the broker's Redis is (one node, Sentinel or Cluster),
//! how crier reaches it (credentials, TLS) and how it reacts to outages.
//! Part of the configuration contract (see `mod.rs`): the shapes, and the
//! checks their values alone allow; whether a URL or a TLS file is usable
//! is found by opening a client from them, the broker's business.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, nonzero, ConfigError};

/// The Redis pub/sub broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS
    /// (see `tls`). Absent: the embedded memory broker (one process only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// ACL user name for Redis, when the URL does not carry one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password (of `username`, or of the `default` user), when the URL
    /// does not carry one. Redacted by `check-config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// TLS settings for every `rediss://` connection crier makes (the
    /// broker, `crier publish`, and the session store).
    pub tls: RedisTlsConfig,
    /// A primary found through Redis Sentinel, instead of `url`: crier asks
    /// the sentinels where the primary is and follows failovers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel: Option<SentinelConfig>,
    /// A Redis Cluster, instead of `url`: channels are relayed with sharded
    /// pub/sub on the shard that owns them, history lives on that shard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Prefix of every Redis channel: Redis channel = prefix + channel.
    pub channel_prefix: String,
    /// How long a channel stays subscribed in Redis after its last local
    /// listener left, so a quick resubscribe costs no round trip.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Time allowed for one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Upper bound of the jittered exponential reconnect backoff.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long a new subscription waits for Redis before the client is told
    /// `unavailable` (matters only while Redis is down).
    #[serde(with = "humantime_serde")]
    pub subscribe_timeout: Duration,
    /// A canary is published through Redis and must come back within this
    /// time, or the instance turns not ready (connected but not receiving).
    #[serde(with = "humantime_serde")]
    pub canary_interval: Duration,
}

/// `[redis.sentinel]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    /// The name the sentinels monitor the primary under (`sentinel monitor
    /// <master> …`).
    pub master: String,
    /// Sentinel addresses, `redis://host:26379` (`rediss://` for TLS: the
    /// data nodes are then reached over TLS too).
    pub nodes: Vec<String>,
    /// The sentinels' own password (`requirepass` in sentinel.conf), when
    /// they have one. Redacted by `check-config`. The data nodes use
    /// `redis.username` / `redis.password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `[redis.cluster]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Seed nodes, `redis://host:6379`; the rest of the cluster is
    /// discovered from them.
    pub nodes: Vec<String>,
}

/// `[redis.tls]`: how crier checks Redis's certificate, and presents its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTlsConfig {
    /// PEM file of the CA(s) that sign the Redis server's certificate.
    /// Absent: the system's trusted roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for Redis servers that require one
    /// (`tls-auth-clients yes`); needs `key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl RedisConfig {
    /// Whether a Redis is configured at all (else: the memory broker).
    pub fn is_configured(&self) -> bool {
        self.url.is_some() || self.sentinel.is_some() || self.cluster.is_some()
    }

    /// One way to reach Redis, with what that way needs; a prefix without
    /// hash-tag braces; every timing above zero.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(cluster) = &self.cluster {
            if self.url.is_some() || self.sentinel.is_some() {
                return bad(
                    "redis.cluster",
                    "set one of redis.url, [redis.sentinel] or [redis.cluster]",
                );
            }
            if cluster.nodes.is_empty() {
                return bad("redis.cluster.nodes", "list at least one node");
            }
        }
        if let Some(sentinel) = &self.sentinel {
            if self.url.is_some() {
                return bad(
                    "redis.sentinel",
                    "set redis.url or [redis.sentinel], not both",
                );
            }
            if sentinel.master.is_empty() {
                return bad("redis.sentinel.master", "must name the monitored primary");
            }
            if sentinel.nodes.is_empty() {
                return bad("redis.sentinel.nodes", "list at least one sentinel");
            }
        }
        if self.channel_prefix.contains(['{', '}']) {
            return bad(
                "redis.channel_prefix",
                "must not contain `{` or `}` (Redis hash tags belong to channel names)",
            );
        }
        nonzero(&[
            ("redis.connect_timeout", self.connect_timeout),
            ("redis.reconnect_max", self.reconnect_max),
            ("redis.subscribe_timeout", self.subscribe_timeout),
            ("redis.canary_interval", self.canary_interval),
        ])
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            tls: RedisTlsConfig::default(),
            sentinel: None,
            cluster: None,
            channel_prefix: String::new(),
            linger: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(5),
            subscribe_timeout: Duration::from_secs(5),
            canary_interval: Duration::from_secs(1),
        }
    }
}
