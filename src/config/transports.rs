//! `[ws]` and `[sse]`: the timings of WebSocket connections (crier's own
//! and Pusher's) and of SSE streams: pings, heartbeats, how long a
//! handshake or a write may take; and WebSocket compression. Part of the configuration contract (see
//! `mod.rs`): the shapes, and the checks their values alone allow.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{bad, nonzero, ConfigError};

/// WebSocket timings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Interval of protocol pings sent to the client.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A client silent (not even a pong) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time from TCP accept to a completed request head and upgrade.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A write to the client that takes longer than this closes it.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// permessage-deflate (RFC 7692): `auto` compresses for every client
    /// that offers it (browsers do), each publication once for all of
    /// them; `off` never negotiates it.
    pub compression: Compression,
    /// Messages shorter than this go uncompressed, even to a client that
    /// negotiated compression (it would gain little or nothing).
    pub compression_min_bytes: usize,
    /// zlib's level, 1 (fastest) to 9 (smallest). Paid once per
    /// publication, not per client.
    pub compression_level: u32,
    /// Channels that may each keep a compression context its listeners
    /// share (about 300 KiB each), so that each message is compressed
    /// against the channel's earlier ones: several times smaller for a
    /// stream of similar JSON events. 0: every message on its own.
    pub compression_contexts: usize,
}

/// Whether WebSocket connections compress (`ws.compression`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// permessage-deflate with every client that offers it.
    Auto,
    /// Never.
    Off,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            compression: Compression::Auto,
            compression_min_bytes: 256,
            compression_level: 6,
            compression_contexts: 64,
        }
    }
}

impl WsConfig {
    /// Every timing is above zero, and a client that answers pings is
    /// never idle.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[
            ("ws.ping_interval", self.ping_interval),
            ("ws.idle_timeout", self.idle_timeout),
            ("ws.handshake_timeout", self.handshake_timeout),
            ("ws.write_timeout", self.write_timeout),
        ])?;
        if self.idle_timeout <= self.ping_interval {
            return bad(
                "ws.idle_timeout",
                "must be longer than ws.ping_interval, or idle clients that answer pings are closed",
            );
        }
        if !(1..=9).contains(&self.compression_level) {
            return bad(
                "ws.compression_level",
                "must be 1 (fastest) to 9 (smallest)",
            );
        }
        Ok(())
    }
}

/// SSE timings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// Interval of comment heartbeats that keep proxies from timing out.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The `retry:` sent when a stream opens (the browser's reconnect delay).
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// A write to the client that makes no progress for this long closes the
    /// connection: a client that stopped reading is cut even on a quiet
    /// channel, and frees its slot and queue. (Also bounds any plain HTTP
    /// response; WebSocket connections use `ws.write_timeout`.)
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// `Content-Encoding: deflate` for a stream whose request accepts it:
    /// each event compressed once for every such stream (`auto`), or
    /// never (`off`). Compressed at `ws.compression_level`.
    pub compression: Compression,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            write_timeout: Duration::from_secs(10),
            compression: Compression::Off,
        }
    }
}

impl SseConfig {
    /// The heartbeat and the write timeout are above zero.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[
            ("sse.heartbeat", self.heartbeat),
            ("sse.write_timeout", self.write_timeout),
        ])
    }
}
