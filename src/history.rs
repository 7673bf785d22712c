//! History: what makes resume possible. Stream ids, the cursors clients carry,
//! the per-channel history rules, and the Redis Function library that
//! appends to a channel's stream and publishes in one atomic step.
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
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// A Redis stream id, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    /// Milliseconds (Redis server clock at XADD).
    pub ms: u64,
    /// Sequence within that millisecond.
    pub seq: u64,
}

impl StreamId {
    /// The id that sorts before every real one.
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
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

/// `history = { size = 1000, ttl = "1h" }` on a channel rule.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// Messages kept per channel (approximately: `XADD MAXLEN ~`).
    pub size: u64,
    /// How long a channel's history outlives its last message.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
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
pub struct Recovery {
    /// Messages after the position, oldest first: (id, payload).
    pub entries: Vec<(StreamId, Vec<u8>)>,
    /// Messages after the position were lost (trimmed, expired, or the
    /// channel keeps no history): the client must resync.
    pub gap: bool,
}

/// Splits `\0<id>\0<payload>` (what `crier_publish` publishes) into id and
/// payload. Anything else is a plain publication.
pub fn split_marked(raw: &[u8]) -> (Option<StreamId>, &[u8]) {
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

/// The Redis key of a channel's history stream.
pub fn stream_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}crier:h:{channel}")
}

/// The Lua source of the `crier` function library for these rules: which
/// channels keep history (first matching rule, as for subscriptions) with
/// which size and TTL. Placeholders in patterns match any non-empty text.
pub fn function_library(prefix: &str, rules: &[(String, Option<HistoryRule>)]) -> String {
    let mut table = String::new();
    for (pattern, history) in rules {
        let (size, ttl) = history.map_or((0, 0), |h| (h.size, h.ttl.as_millis() as u64));
        table.push_str(&format!(
            "  {{ {}, {size}, {ttl} }},\n",
            lua_string(&lua_pattern(pattern))
        ));
    }
    format!(
        r#"#!lua name=crier
-- Generated by crier {version} from its [[channels]] rules; FUNCTION LOAD REPLACE
-- at every start. Apps call: FCALL crier_publish 1 <channel> <payload>
local PREFIX = {prefix}
local RULES = {{
{table}}}

local function history_of(channel)
  for _, rule in ipairs(RULES) do
    if string.match(channel, rule[1]) then
      return rule[2], rule[3]
    end
  end
  return 0, 0
end

local function crier_publish(keys, args)
  local channel = keys[1]
  local payload = args[1]
  if channel == nil or payload == nil then
    return redis.error_reply('usage: FCALL crier_publish 1 <channel> <payload>')
  end
  local size, ttl = history_of(channel)
  if size == 0 then
    redis.call('PUBLISH', PREFIX .. channel, payload)
    return false
  end
  local key = PREFIX .. 'crier:h:' .. channel
  local id = redis.call('XADD', key, 'MAXLEN', '~', size, '*', 'd', payload)
  if ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
  redis.call('PUBLISH', PREFIX .. channel, '\0' .. id .. '\0' .. payload)
  return id
end

-- The newest id of a channel's history; for a channel with no stream yet,
-- a position just before now (Redis clock), so that nothing published from
-- now on is missed and an empty stream is not mistaken for a lost one.
local function crier_position(keys, args)
  local key = PREFIX .. 'crier:h:' .. keys[1]
  if redis.call('EXISTS', key) == 1 then
    local info = redis.call('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then return info[i + 1] end
    end
  end
  local t = redis.call('TIME')
  return tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - 1) .. '-18446744073709551615'
end

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function after(a, b)
  local ams, aseq = id_parts(a)
  local bms, bseq = id_parts(b)
  return ams > bms or (ams == bms and aseq > bseq)
end

-- Everything after `since` (at most `limit` entries), and whether some of
-- it is gone: {{gap, entries}}.
local function crier_since(keys, args)
  local channel, since, limit = keys[1], args[1], tonumber(args[2])
  local size, ttl = history_of(channel)
  if size == 0 then return {{1, {{}}}} end
  local key = PREFIX .. 'crier:h:' .. channel
  if redis.call('EXISTS', key) == 0 then
    -- A publication after `since` would have kept the stream for `ttl`.
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local ms = id_parts(since)
    if ms ~= nil and ttl > 0 and ms + ttl < now then return {{1, {{}}}} end
    return {{0, {{}}}}
  end
  -- Something after `since` may be gone when an entry newer than it was
  -- deleted (XDEL), or when trimming removed entries and the oldest one
  -- left is newer than `since` (trimming removes the oldest first).
  local info = redis.call('XINFO', 'STREAM', key)
  local deleted, first, last = '0-0', nil, '0-0'
  local length, added = 0, 0
  for i = 1, #info, 2 do
    local field, value = info[i], info[i + 1]
    if field == 'max-deleted-entry-id' then deleted = value
    elseif field == 'first-entry' and type(value) == 'table' then first = value[1]
    elseif field == 'last-generated-id' then last = value
    elseif field == 'length' then length = value
    elseif field == 'entries-added' then added = value
    end
  end
  local gap = 0
  if after(deleted, since) then gap = 1 end
  if added > length then
    if first == nil then first = last end
    if after(first, since) then gap = 1 end
  end
  local entries = redis.call('XRANGE', key, '(' .. since, '+', 'COUNT', limit)
  return {{gap, entries}}
end

redis.register_function('crier_publish', crier_publish)
redis.register_function{{function_name = 'crier_position', callback = crier_position, flags = {{'no-writes'}}}}
redis.register_function{{function_name = 'crier_since', callback = crier_since, flags = {{'no-writes'}}}}
"#,
        version = crate::VERSION,
        prefix = lua_string(prefix),
    )
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
    fn patterns_become_anchored_lua_patterns() {
        assert_eq!(lua_pattern("public:*"), "^public:.+$");
        assert_eq!(lua_pattern("user:{user}"), "^user:.+$");
        assert_eq!(lua_pattern("org:{claim.org}:*"), "^org:.+:.+$");
        assert_eq!(lua_pattern("a.b-c"), "^a%.b%-c$");
    }
}
