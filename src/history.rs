//! History: what makes resume possible. Stream ids, the cursors clients carry,
//! and the Redis Function library that applies the per-channel history rules
//! (their shape, [`HistoryRule`], is configuration): it appends to a
//! channel's stream and publishes in one atomic step.
//!
//! A message published with `FCALL crier_publish 1 <channel> <payload>` is
//! appended to the capped stream `<prefix>crier:h:<channel>` and published on
//! `<prefix><channel>` as `\0<stream id>\0<payload>`, so every instance learns
//! its id with the message itself. Ids are Redis stream ids (`ms-seq`),
//! monotonic per channel: a client that saw id X of a channel has seen every
//! earlier message of it, which is what makes "give me everything after X"
//! exact, on any instance.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine;

use crate::config::HistoryRule;

/// A Redis stream id, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    /// Milliseconds (Redis server clock at XADD).
    pub ms: u64,
    /// Sequence: for ids `crier_publish` writes, one more than the
    /// stream's previous id (it never restarts); for others (the memory
    /// broker, `XADD *`), within that millisecond.
    pub seq: u64,
}

impl StreamId {
    /// The id that sorts before every real one.
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    /// Whether `next`, received live after `self`, may have left messages
    /// out in between: true unless it is the very next id `crier_publish`
    /// writes. A false alarm (a stream written by another tool, a first
    /// message) only costs one history read.
    pub fn skips_to(self, next: StreamId) -> bool {
        next > self && next.seq != self.seq.wrapping_add(1)
    }

    /// The id just before this one: reading history after it starts with
    /// this one. `None` for `0-0`.
    pub fn before(self) -> Option<StreamId> {
        match self.seq {
            0 => Some(StreamId {
                ms: self.ms.checked_sub(1)?,
                seq: u64::MAX,
            }),
            seq => Some(StreamId {
                ms: self.ms,
                seq: seq - 1,
            }),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for StreamId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        Ok(StreamId {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// A client's position in every history channel it listens to: what SSE
/// sends as `id:` and gets back as `Last-Event-ID`. Opaque to clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub BTreeMap<String, StreamId>);

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor crier issued")]
pub struct BadCursor;

const CURSOR_VERSION: &str = "c1.";

impl Cursor {
    /// The text form: `c1.` + base64url of `{"channel":"ms-seq",...}`.
    pub fn encode(&self) -> String {
        let map: BTreeMap<&str, String> = self
            .0
            .iter()
            .map(|(c, id)| (c.as_str(), id.to_string()))
            .collect();
        let json = serde_json::to_vec(&map).unwrap_or_default();
        format!(
            "{CURSOR_VERSION}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Parses what [`Cursor::encode`] made; anything else is refused.
    pub fn decode(text: &str) -> Result<Self, BadCursor> {
        let body = text.trim().strip_prefix(CURSOR_VERSION).ok_or(BadCursor)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| BadCursor)?;
        let map: BTreeMap<String, String> = serde_json::from_slice(&json).map_err(|_| BadCursor)?;
        let mut cursor = Cursor::default();
        for (channel, id) in map {
            cursor.0.insert(channel, id.parse().map_err(|_| BadCursor)?);
        }
        Ok(cursor)
    }
}

/// What a channel's history holds after a position.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    /// Messages after the position, oldest first: (id, payload).
    pub entries: Vec<(StreamId, Vec<u8>)>,
    /// Messages after the position were lost (trimmed, expired, or the
    /// channel keeps no history): the client must resync.
    pub gap: bool,
}

/// Splits `\0<id>\0<payload>` (what `crier_publish` publishes) into id and
/// payload. Anything else is a plain publication.
pub(crate) fn split_marked(raw: &[u8]) -> (Option<StreamId>, &[u8]) {
    let Some(rest) = raw.strip_prefix(b"\0") else {
        return (None, raw);
    };
    let Some(end) = rest.iter().position(|b| *b == 0) else {
        return (None, raw);
    };
    match std::str::from_utf8(&rest[..end])
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(id) => (Some(id), &rest[end + 1..]),
        None => (None, raw),
    }
}

/// Whether `name` holds a Redis Cluster hash tag: the text between its first
/// `{` and the first `}` after it, when not empty (what Redis hashes
/// instead of the whole name).
pub(crate) fn has_hash_tag(name: &str) -> bool {
    name.find('{')
        .and_then(|open| name[open + 1..].find('}'))
        .is_some_and(|len| len > 0)
}

/// Redis Cluster's slot of a key or channel name: CRC16/XMODEM of its hash
/// tag, or of the whole name without one, modulo 16384.
pub(crate) fn slot(key: &str) -> u16 {
    let hashed = key
        .find('{')
        .and_then(|open| {
            let len = key[open + 1..].find('}')?;
            (len > 0).then(|| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for byte in hashed.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The Redis key of a channel's history stream. It is declared in every
/// `FCALL` crier makes (ACLs check declared keys; Cluster routes by them)
/// and hashes to the same Cluster slot as the channel's Redis name
/// `<prefix><channel>`, so `crier_publish` appends and publishes on one
/// shard: `<prefix>crier:s:{<prefix><channel>}`, or, for a name that
/// already carries a hash tag, `<prefix>crier:st:<prefix><channel>`.
pub fn stream_key(prefix: &str, channel: &str) -> String {
    if has_hash_tag(&format!("{prefix}{channel}")) {
        format!("{prefix}crier:st:{prefix}{channel}")
    } else {
        format!("{prefix}crier:s:{{{prefix}{channel}}}")
    }
}

/// The keys of a channel's presence (see `crier.lua`): conns, index,
/// alive, users, info; in the channel's hash slot, as its stream is.
pub(crate) fn presence_keys(prefix: &str, channel: &str) -> [String; 5] {
    let base = if has_hash_tag(&format!("{prefix}{channel}")) {
        format!("{prefix}crier:pt:{prefix}{channel}")
    } else {
        format!("{prefix}crier:p:{{{prefix}{channel}}}")
    };
    [":c", ":x", ":a", ":u", ":i"].map(|part| format!("{base}{part}"))
}

/// The keys of the lifecycle events (see `crier.lua`, `crier_events`):
/// held, index, alive, totals, ending, and the stream itself
/// (`<prefix><stream>`), all in the stream's hash slot.
pub(crate) fn events_keys(prefix: &str, stream: &str) -> [String; 6] {
    let stream = format!("{prefix}{stream}");
    let base = match has_hash_tag(&stream) {
        true => stream.clone(),
        false => format!("{{{stream}}}"),
    };
    let [held, index, alive, totals, ending] =
        [":held", ":index", ":alive", ":totals", ":ending"].map(|part| format!("{base}{part}"));
    [held, index, alive, totals, ending, stream]
}

/// Where crier before 0.2 kept a channel's history. Still read (never
/// written) on a single Redis node, so no message stored there before an
/// upgrade is lost to a client resuming across it.
pub fn legacy_stream_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}crier:h:{channel}")
}

/// The Lua source of a deployment's function library (src/crier.lua) for
/// these rules: which channels keep history (first matching rule, as for
/// subscriptions) with which size and TTL. Placeholders in patterns match
/// any non-empty text. `suffix` ends the library's and every function's
/// name (see `broker::library`); the `@META@` placeholder of its header
/// line is left for the caller, which fingerprints the rest.
///
/// Apps call `FCALL crier_publish<suffix> 1 <channel> <payload>`; crier
/// itself (and apps restricted by ACLs) pass the channel's [`stream_key`]
/// instead of the channel, and then every key the function touches is
/// declared.
///
/// On Redis Cluster (`sharded`) it publishes with `SPUBLISH` on the
/// channel's own shard, where crier `SSUBSCRIBE`s.
pub(crate) fn function_library(
    prefix: &str,
    rules: &[(String, Option<HistoryRule>)],
    sharded: bool,
    suffix: &str,
) -> String {
    let mut table = String::new();
    for (pattern, history) in rules {
        let (size, ttl) = history.map_or((0, 0), |h| (h.size, h.ttl.as_millis() as u64));
        table.push_str(&format!(
            "  {{ {}, {size}, {ttl} }},\n",
            lua_string(&lua_pattern(pattern))
        ));
    }
    include_str!("crier.lua")
        .replace("@VERSION@", crate::VERSION)
        .replace("@PREFIX@", &lua_string(prefix))
        .replace("@RULES@", &table)
        .replace("@PUBLISH@", if sharded { "SPUBLISH" } else { "PUBLISH" })
        .replace("@SUFFIX@", suffix)
}

/// A crier channel pattern as an anchored Lua pattern: literal text escaped,
/// placeholders as `.+`, a trailing `*` as `.+`.
fn lua_pattern(pattern: &str) -> String {
    let (body, star) = match pattern.strip_suffix('*') {
        Some(body) => (body, true),
        None => (pattern, false),
    };
    let mut out = String::from("^");
    let mut rest = body;
    while !rest.is_empty() {
        if let (Some(open), Some(close)) = (rest.find('{'), rest.find('}')) {
            if open < close {
                out.push_str(&lua_escape(&rest[..open]));
                out.push_str(".+");
                rest = &rest[close + 1..];
                continue;
            }
        }
        out.push_str(&lua_escape(rest));
        break;
    }
    if star {
        out.push_str(".+");
    }
    out.push('$');
    out
}

fn lua_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if "^$()%.[]*+-?".contains(c) {
            out.push('%');
        }
        out.push(c);
    }
    out
}

/// A Lua string literal.
fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_and_round_trip() {
        let a: StreamId = "1700000000000-0".parse().expect("id");
        let b: StreamId = "1700000000000-1".parse().expect("id");
        let c: StreamId = "1700000000001-0".parse().expect("id");
        assert!(a < b && b < c);
        assert_eq!(c.to_string(), "1700000000001-0");
        assert!("17-x".parse::<StreamId>().is_err());
        assert!("".parse::<StreamId>().is_err());
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let mut cursor = Cursor::default();
        cursor.0.insert("orders".into(), "5-1".parse().expect("id"));
        cursor
            .0
            .insert("user:42".into(), "7-0".parse().expect("id"));
        let text = cursor.encode();
        assert!(text.starts_with("c1."));
        assert_eq!(Cursor::decode(&text), Ok(cursor));
        for garbage in ["", "c1.", "c1.!!!", "c2.e30", "hello", "c1.eyJhIjoieCJ9"] {
            assert_eq!(Cursor::decode(garbage), Err(BadCursor), "{garbage}");
        }
    }

    #[test]
    fn marked_payloads_split() {
        assert_eq!(
            split_marked(b"\x00123-4\x00{\"a\":1}"),
            (Some(StreamId { ms: 123, seq: 4 }), &b"{\"a\":1}"[..])
        );
        assert_eq!(split_marked(b"plain"), (None, &b"plain"[..]));
        assert_eq!(split_marked(b"\x00no-end"), (None, &b"\x00no-end"[..]));
    }

    #[test]
    fn slots_are_computed_as_redis_does() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
    }

    proptest::proptest! {
        /// A channel's history lives on the shard of the channel itself,
        /// so `crier_publish` appends and publishes in one step.
        #[test]
        fn a_stream_shares_its_channels_slot(
            prefix in "[a-z:]{0,6}",
            channel in "[a-z:{}.]{1,16}",
        ) {
            // Channel names crier accepts: braces only as a hash tag.
            if !channel.contains(['{', '}']) || has_hash_tag(&channel) {
                let key = stream_key(&prefix, &channel);
                proptest::prop_assert_eq!(slot(&key), slot(&format!("{prefix}{channel}")), "{}", key);
            }
        }
    }

    #[test]
    fn only_the_next_sequence_follows_without_a_hole() {
        let id = |s: &str| s.parse::<StreamId>().expect("id");
        assert!(!id("5-7").skips_to(id("5-8")));
        assert!(
            !id("5-7").skips_to(id("9-8")),
            "a later millisecond, the next sequence"
        );
        assert!(id("5-7").skips_to(id("9-9")), "one in between is missing");
        assert!(!id("5-7").skips_to(id("5-7")), "a duplicate is not a hole");
        assert!(!id("5-7").skips_to(id("4-8")), "an older one is not a hole");
        assert!(
            id("5-18446744073709551615").skips_to(id("6-1")),
            "a position, not an id"
        );
    }

    #[test]
    fn stream_keys_by_shape() {
        assert_eq!(stream_key("", "orders"), "crier:s:{orders}");
        assert_eq!(stream_key("app:", "orders"), "app:crier:s:{app:orders}");
        assert_eq!(stream_key("", "orders:{42}"), "crier:st:orders:{42}");
        assert_eq!(legacy_stream_key("app:", "orders"), "app:crier:h:orders");
        assert_eq!(presence_keys("", "presence-a")[0], "crier:p:{presence-a}:c");
        assert_eq!(
            presence_keys("", "presence-a:{7}")[4],
            "crier:pt:presence-a:{7}:i"
        );
        for key in presence_keys("app:", "presence-b") {
            assert_eq!(slot(&key), slot("app:presence-b"));
        }
    }

    #[test]
    fn patterns_become_anchored_lua_patterns() {
        assert_eq!(lua_pattern("public:*"), "^public:.+$");
        assert_eq!(lua_pattern("user:{user}"), "^user:.+$");
        assert_eq!(lua_pattern("org:{claim.org}:*"), "^org:.+:.+$");
        assert_eq!(lua_pattern("a.b-c"), "^a%.b%-c$");
    }
}
