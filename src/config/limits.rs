//! `[limits]`: what one client, or many, may hold of the process. Part of
//! the configuration contract (see `mod.rs`): the shape, and the checks its
//! values alone allow; counting connections is `crate::limits`' business.

use serde::{Deserialize, Serialize};

use super::{bad, positive, ConfigError};

/// Limits that keep one client, or many, from exhausting the process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Per-connection outbound queue, in messages. A client whose queue is
    /// full is disconnected (WebSocket close 1013, SSE end of stream).
    pub queue_size: usize,
    /// Open WebSocket and SSE connections per process; the next one gets 503.
    pub max_connections: usize,
    /// Channels one connection may listen to at once.
    pub max_subscriptions_per_connection: usize,
    /// Largest inbound WebSocket message, in bytes; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Most history messages one connection is sent on resume before it
    /// goes live (an SSE request, or one WebSocket `subscribe`). A channel
    /// whose missed messages do not fit gets a `gap` instead.
    pub max_replay_messages: usize,
    /// The same in bytes, as the client receives them: each message once,
    /// in its wire protocol's encoding (envelope, and for SSE its cursor).
    pub max_replay_bytes: usize,
    /// Bytes of replay this process holds for all its connections at once
    /// (waiting to be written to clients); a resume that does not fit gets a
    /// `gap` instead of its replay.
    pub max_replay_bytes_total: usize,
    /// Open connections per authenticated user; the next gets 429. 0: no limit.
    pub max_connections_per_user: usize,
    /// Open connections per client IP address (the TCP peer: behind a load
    /// balancer that is the balancer, so leave 0 = no limit there).
    pub max_connections_per_ip: usize,
    /// Sustained WebSocket commands per second per connection; beyond it
    /// commands get `rate_limited`.
    pub commands_per_second: u32,
    /// Commands allowed in a burst above the sustained rate. A client that
    /// keeps going after being told is closed with 1008.
    pub command_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            queue_size: 1024,
            max_connections: 100_000,
            max_subscriptions_per_connection: 64,
            max_message_bytes: 65_536,
            max_replay_messages: 10_000,
            max_replay_bytes: 4 << 20,
            max_replay_bytes_total: 256 << 20,
            max_connections_per_user: 100,
            max_connections_per_ip: 0,
            commands_per_second: 20,
            command_burst: 50,
        }
    }
}

impl LimitsConfig {
    /// Every size and count is above zero (the per-user and per-IP limits
    /// take 0 for none), and so is the command rate.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive(&[
            ("limits.queue_size", self.queue_size),
            ("limits.max_connections", self.max_connections),
            (
                "limits.max_subscriptions_per_connection",
                self.max_subscriptions_per_connection,
            ),
            ("limits.max_message_bytes", self.max_message_bytes),
            ("limits.max_replay_messages", self.max_replay_messages),
            ("limits.max_replay_bytes", self.max_replay_bytes),
            ("limits.max_replay_bytes_total", self.max_replay_bytes_total),
        ])?;
        if self.commands_per_second == 0 || self.command_burst == 0 {
            return bad(
                "limits.commands_per_second",
                "commands_per_second and command_burst must be greater than 0",
            );
        }
        Ok(())
    }
}
