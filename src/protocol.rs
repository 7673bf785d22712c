//! What every wire protocol shares: the publication, parsed once, with the
//! envelope every crier client receives and the SSE event, each encoded
//! once and shared (reference-counted) by every recipient; the event
//! filter; socket ids. Each protocol's own vocabulary (crier's WebSocket
//! commands and replies, SSE's notices, Pusher's events) lives in its file
//! under `transport/`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::history::StreamId;

/// One publication, parsed once, with each wire protocol's encoding made
/// once and shared.
#[derive(Debug)]
pub struct Publication {
    /// The channel, without the Redis prefix.
    pub channel: String,
    /// The string at the payload's event field (`/type` unless
    /// configured), when it has one.
    pub event: Option<String>,
    /// Its position in the channel's history, when the channel keeps one.
    pub id: Option<StreamId>,
    /// A message, or the notice that messages were lost.
    pub(crate) kind: Kind,
    /// The envelope JSON: the WebSocket text frame, as is. Its `data` is
    /// its last field: the data is `frame[data_at..len - 1]`.
    pub(crate) frame: Box<str>,
    /// Where the data starts in `frame`.
    data_at: usize,
    /// A connection that must not get it (the Pusher sender's
    /// `socket_id`): see [`Envelope`].
    pub(crate) exclude: Option<SocketId>,
    /// Who sent it, for client events on a presence channel.
    pub(crate) user_id: Option<Box<str>>,
    /// The complete SSE event (`event:` and `data:` lines, blank line).
    /// With an id, the writer sends all but the last byte, then its own
    /// `id: <cursor>` line and the blank line.
    pub(crate) sse: Bytes,
    /// `id: <cursor>` + blank line for a stream whose only history channel
    /// is this one: encoded once, on first use, and shared.
    single_cursor: std::sync::OnceLock<Bytes>,
    /// The whole bytes each wire protocol writes, for direct writes:
    /// encoded once, on first use, and shared (see [`Encoding`]).
    wire: [std::sync::OnceLock<Bytes>; 9],
    /// Its bytes in each of its channel's chains (see [`Chain`]), made by
    /// the hub before anyone receives it; usually none.
    pub(crate) chained: Vec<Chained>,
}

/// A wire protocol's complete encoding of a publication, cached on it.
#[derive(Debug, Clone, Copy)]
pub enum Encoding {
    /// A WebSocket text frame.
    WsFrame = 0,
    /// An SSE event as one HTTP/1.1 chunk.
    SseChunk = 1,
    /// A Pusher protocol event as a WebSocket text frame.
    Pusher = 2,
    /// [`Encoding::WsFrame`], compressed (permessage-deflate).
    WsDeflated = 3,
    /// [`Encoding::Pusher`], compressed (permessage-deflate).
    PusherDeflated = 4,
    /// An SSE event as deflate blocks, for a compressed stream.
    SseDeflated = 5,
    /// [`Encoding::SseDeflated`] as one HTTP/1.1 chunk.
    SseDeflatedChunk = 6,
    /// An SSE event with the `id:` line of a stream whose only history
    /// channel is its own, as deflate blocks.
    SseDeflatedSingle = 7,
    /// An SSE event without its final blank line (a stream's own `id:`
    /// line follows), as deflate blocks.
    SseDeflatedOpen = 8,
}

/// How crier compresses a WebSocket message (`ws.compression_level`,
/// `ws.compression_min_bytes`), for a connection that negotiated
/// permessage-deflate.
#[derive(Clone)]
pub(crate) struct Deflate {
    /// zlib's level, 1 (fastest) to 9 (smallest).
    pub(crate) level: u32,
    /// Messages shorter than this go uncompressed.
    pub(crate) min_bytes: usize,
    /// Where the compression is counted.
    pub(crate) metrics: crate::metrics::Metrics,
}

/// How one connection's publications become bytes: its wire protocol's
/// encoding, made once per publication and shared by every connection
/// that encodes alike (see [`Publication::on_wire`]).
#[derive(Clone)]
pub(crate) enum Encoder {
    /// The protocol's bytes, as every such connection gets them.
    Plain(fn(&Publication) -> Bytes),
    /// Compressed: a WebSocket that negotiated permessage-deflate, or a
    /// compressed SSE stream. Out of line (shared by the connection's
    /// task and its mailbox), so the many connections that compress
    /// nothing carry one word for it.
    Deflated(std::sync::Arc<Compressed>),
}

/// How a compressing connection encodes: see [`Encoder::Deflated`].
pub(crate) struct Compressed {
    encode: fn(&Publication, &Deflate) -> Bytes,
    deflate: Deflate,
    /// When the connection may take its channels' chains (it let crier
    /// keep a compression context).
    follower: Option<Follower>,
}

impl Encoder {
    /// Compressed with `deflate` by `encode`, following chains with
    /// `follower`, if any.
    pub(crate) fn deflated(
        encode: fn(&Publication, &Deflate) -> Bytes,
        deflate: Deflate,
        follower: Option<Follower>,
    ) -> Self {
        Encoder::Deflated(std::sync::Arc::new(Compressed {
            encode,
            deflate,
            follower,
        }))
    }

    /// `p` as this connection writes it. A connection following a chain
    /// takes the chain's bytes when they are the next of the chain it
    /// follows, or the first of a new epoch; any other bytes that break
    /// chains (a message compressed on its own) stop it following.
    ///
    /// The caller writes what this returns, in the order it was made, or
    /// never: a publication encoded again (a direct write refused, then
    /// queued) finds the follower past it and gets bytes of its own.
    pub(crate) fn encode(&self, p: &Publication) -> Bytes {
        let c = match self {
            Encoder::Plain(encode) => return encode(p),
            Encoder::Deflated(c) => c,
        };
        match &c.follower {
            None => (c.encode)(p, &c.deflate),
            Some(follower) => {
                if let Some(link) = p.chained.iter().find(|c| c.key == follower.spec.key) {
                    if link.seq == 0 || follower.at() == (link.epoch, link.seq) {
                        follower.set(link.epoch, link.seq + 1);
                        return link.bytes.clone();
                    }
                }
                let bytes = (c.encode)(p, &c.deflate);
                if (follower.spec.breaks)(&bytes) {
                    follower.set(0, 0);
                }
                bytes
            }
        }
    }

    /// The chain this connection may follow, if any.
    pub(crate) fn chain(&self) -> Option<&ChainSpec> {
        match self {
            Encoder::Deflated(c) => c.follower.as_ref().map(|f| &f.spec),
            Encoder::Plain(_) => None,
        }
    }
}

/// A publication's bytes in one of its channel's chains: made with state
/// carried from the channel's earlier publications (a compression context
/// its listeners share, see `transport/deflate.rs`), so a listener may
/// write them only if it wrote every earlier link of the same epoch.
#[derive(Debug, Clone)]
pub(crate) struct Chained {
    /// Which kind of chain (a protocol's compressed frames).
    pub(crate) key: u8,
    /// The epoch: a chain starts afresh (no state) at each, and its
    /// number is unique in the process.
    pub(crate) epoch: u64,
    /// The link's place in its epoch, from 0.
    pub(crate) seq: u32,
    pub(crate) bytes: Bytes,
}

/// A channel's chain of one kind: the hub calls it for each publication
/// of the channel, in order, while the channel has listeners following it.
pub(crate) trait Chain: Send + Sync {
    /// `p`'s link, or `None` when `p` is not chained (then everyone gets
    /// bytes that leave the chain alone).
    fn next(&self, p: &Publication) -> Option<Chained>;
    /// A listener arrived: it can follow from the next epoch on, which
    /// starts soon.
    fn joined(&self);
}

/// How to make a connection's kind of chain, for the hub to keep one per
/// channel and key.
#[derive(Clone)]
pub(crate) struct ChainSpec {
    pub(crate) key: u8,
    /// A new chain (no state yet).
    pub(crate) make: fn(&ChainSpec) -> Box<dyn Chain>,
    /// The protocol's plain bytes of a publication, which the chain
    /// transforms.
    pub(crate) plain: fn(&Publication) -> Bytes,
    pub(crate) deflate: Deflate,
    /// Whether bytes made outside the chain disturb it for the client
    /// (a message compressed on its own enters the client's window).
    pub(crate) breaks: fn(&Bytes) -> bool,
}

/// Where a connection is in the chain it follows: the epoch (0: none)
/// and the next link it can take, in one word, shared by the
/// connection's direct and queued writes.
#[derive(Clone)]
pub(crate) struct Follower {
    pub(crate) spec: ChainSpec,
    at: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A link's place is below 2^24 (a chain starts a new epoch before).
const SEQ_BITS: u32 = 24;

impl Follower {
    pub(crate) fn new(spec: ChainSpec) -> Self {
        Self {
            spec,
            at: Default::default(),
        }
    }

    fn at(&self) -> (u64, u32) {
        let word = self.at.load(std::sync::atomic::Ordering::Relaxed);
        (word >> SEQ_BITS, (word & ((1 << SEQ_BITS) - 1)) as u32)
    }

    fn set(&self, epoch: u64, seq: u32) {
        let word = (epoch << SEQ_BITS) | u64::from(seq);
        self.at.store(word, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Links of a chain's epoch, at most: then a new epoch starts, so a
/// follower's place always fits its word.
pub(crate) const EPOCH_LINKS: u32 = 1 << 20;

/// What a publication tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A published message.
    Message,
    /// Messages of this channel were lost (history could not cover an
    /// outage or a resume): the app must refetch its state.
    Gap,
    /// A user's first connection to a presence channel, anywhere.
    Join,
    /// A user's last connection to a presence channel left.
    Leave,
    /// End the connections of the user whose channel this is (Pusher's
    /// `terminate_connections`): never written to a client, never
    /// directly (see [`TERMINATE`]).
    Terminate,
}

/// A connection, fleet-wide: Pusher's `socket_id`, `<instance>.<conn>`.
/// The instance is random per running crier (see `App::instance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SocketId {
    /// Random per process.
    pub instance: u32,
    /// The connection within the process.
    pub conn: u64,
}

impl SocketId {
    /// A fresh instance number: random, nine digits at most.
    pub(crate) fn new_instance() -> u32 {
        rand::random::<u32>() % 1_000_000_000
    }
}

impl std::fmt::Display for SocketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.instance, self.conn)
    }
}

impl std::str::FromStr for SocketId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (instance, conn) = s.split_once('.').ok_or(())?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(instance) || !digits(conn) {
            return Err(());
        }
        Ok(Self {
            instance: instance.parse().map_err(drop)?,
            conn: conn.parse().map_err(drop)?,
        })
    }
}

/// A payload crier itself wraps (the Pusher HTTP API, client events,
/// presence): `{"$crier":{"event":…,"exclude":…,"user_id":…},"data":…}`.
/// Its event is named outright, not read from the data, and `exclude`
/// keeps it from one connection. Apps may publish it too.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "$crier")]
    meta: Meta,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct Meta {
    event: String,
    #[serde(default)]
    exclude: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
}

/// The start of every [`Envelope`] crier writes.
pub(crate) const ENVELOPE_HEAD: &str = r#"{"$crier":"#;

/// Wraps `data` (JSON) as an [`Envelope`] naming `event`.
pub(crate) fn envelope(
    event: &str,
    exclude: Option<SocketId>,
    user_id: Option<&str>,
    data: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + event.len() + 64);
    out.extend_from_slice(ENVELOPE_HEAD.as_bytes());
    out.extend_from_slice(br#"{"event":"#);
    push_json_string(&mut out, event);
    if let Some(socket) = exclude {
        out.extend_from_slice(br#","exclude":""#);
        out.extend_from_slice(socket.to_string().as_bytes());
        out.push(b'"');
    }
    if let Some(user) = user_id {
        out.extend_from_slice(br#","user_id":"#);
        push_json_string(&mut out, user);
    }
    out.extend_from_slice(br#"},"data":"#);
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    out
}

/// The fields of an envelope before its data:
/// `{"type":…,"channel":…[,"event":…][,"id":"…"][,"user_id":…],"data":`.
struct Head<'a> {
    kind: &'a str,
    channel: &'a str,
    event: Option<&'a str>,
    id: Option<StreamId>,
    user_id: Option<&'a str>,
}

impl Head<'_> {
    /// The whole envelope, its data written by `data` (about `size`
    /// bytes), and where the data starts in it.
    fn write(&self, size: usize, data: impl FnOnce(&mut Vec<u8>)) -> (Vec<u8>, usize) {
        let mut env = Vec::with_capacity(size + self.channel.len() + 96);
        env.extend_from_slice(br#"{"type":""#);
        env.extend_from_slice(self.kind.as_bytes());
        env.extend_from_slice(br#"","channel":"#);
        push_json_string(&mut env, self.channel);
        if let Some(event) = self.event {
            env.extend_from_slice(br#","event":"#);
            push_json_string(&mut env, event);
        }
        if let Some(id) = self.id {
            env.extend_from_slice(br#","id":""#);
            env.extend_from_slice(id.to_string().as_bytes());
            env.push(b'"');
        }
        if let Some(user) = self.user_id {
            env.extend_from_slice(br#","user_id":"#);
            push_json_string(&mut env, user);
        }
        env.extend_from_slice(br#","data":"#);
        let data_at = env.len();
        data(&mut env);
        env.push(b'}');
        (env, data_at)
    }
}

/// The presence events' names (Pusher's).
pub(crate) const MEMBER_ADDED: &str = "pusher_internal:member_added";
pub(crate) const MEMBER_REMOVED: &str = "pusher_internal:member_removed";
/// The event of an envelope that ends every connection signed in as the
/// user whose channel carries it ([`Kind::Terminate`]). On any other
/// channel, connections ignore it.
pub(crate) const TERMINATE: &str = "crier:terminate";

impl Publication {
    /// Builds the envelope for `payload` published on `channel`.
    ///
    /// The payload is embedded verbatim when it is JSON; anything else is
    /// carried as a JSON string (invalid UTF-8 replaced), so clients always
    /// get valid JSON.
    /// Its event type is the payload's top-level `type`. The unit tests'
    /// shorthand for [`Publication::message`] without a history id.
    #[cfg(test)]
    pub(crate) fn new(channel: &str, payload: &[u8]) -> Self {
        Self::message(channel, None, payload, crate::config::DEFAULT_EVENT_FIELD)
    }

    /// A message with its history id. Its event type is the string at
    /// `event_field`, a JSON pointer into the payload (`/type`,
    /// `/event_type`, `/meta/kind`), when there is one.
    pub(crate) fn message(
        channel: &str,
        id: Option<StreamId>,
        payload: &[u8],
        event_field: &str,
    ) -> Self {
        if payload.starts_with(ENVELOPE_HEAD.as_bytes()) {
            if let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(payload) {
                return Self::enveloped(channel, id, envelope);
            }
        }
        let parsed: Option<Value> = serde_json::from_slice(payload).ok();
        let event = parsed
            .as_ref()
            .and_then(|v| v.pointer(event_field))
            .and_then(Value::as_str)
            .map(str::to_owned);

        let head = Head {
            kind: "message",
            channel,
            event: event.as_deref(),
            id,
            user_id: None,
        };
        let (env, data_at) = head.write(payload.len(), |env| {
            if parsed.is_some() {
                env.extend_from_slice(trim_ascii(payload));
            } else {
                push_json_string(env, &String::from_utf8_lossy(payload));
            }
        });
        Self::encoded(channel, event, id, Kind::Message, env, data_at)
    }

    /// A publication from an [`Envelope`]. Data that is a string holding
    /// JSON (what the Pusher SDKs send) reaches crier's own clients as that
    /// JSON, and Pusher clients as the string.
    fn enveloped(channel: &str, id: Option<StreamId>, envelope: Envelope<'_>) -> Self {
        let Envelope { meta, data } = envelope;
        let kind = match meta.event.as_str() {
            MEMBER_ADDED => Kind::Join,
            MEMBER_REMOVED => Kind::Leave,
            TERMINATE => Kind::Terminate,
            _ => Kind::Message,
        };
        let raw = data.get();
        let inner: Option<String> = raw
            .starts_with('"')
            .then(|| serde_json::from_str::<String>(raw).ok())
            .flatten()
            .filter(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
        let data = inner.as_deref().map_or(raw, str::trim);
        // A join or leave is its own type; a message names its event.
        let (type_name, event) = match kind {
            Kind::Join => ("join", None),
            Kind::Leave => ("leave", None),
            _ => ("message", Some(meta.event.as_str())),
        };
        let head = Head {
            kind: type_name,
            channel,
            event,
            id,
            user_id: meta.user_id.as_deref(),
        };
        let (env, data_at) = head.write(data.len(), |env| env.extend_from_slice(data.as_bytes()));
        let event = event.unwrap_or(type_name).to_owned();
        let mut p = Self::encoded(channel, Some(event), id, kind, env, data_at);
        p.exclude = meta.exclude.and_then(|s| s.parse().ok());
        p.user_id = meta.user_id.map(Into::into);
        p
    }

    /// The data as its JSON text.
    pub fn data(&self) -> &str {
        let frame: &str = &self.frame;
        frame
            .get(self.data_at..frame.len().saturating_sub(1))
            .unwrap_or("null")
    }

    /// The event name a Pusher client gets: the publication's event type,
    /// or `message` when it has none.
    pub(crate) fn pusher_event(&self) -> &str {
        match self.kind {
            Kind::Join => MEMBER_ADDED,
            Kind::Leave => MEMBER_REMOVED,
            Kind::Message | Kind::Gap | Kind::Terminate => {
                self.event.as_deref().unwrap_or("message")
            }
        }
    }

    /// The notice that messages of `channel` were lost.
    pub(crate) fn gap(channel: &str) -> Self {
        let mut env = Vec::with_capacity(channel.len() + 32);
        env.extend_from_slice(br#"{"type":"gap","channel":"#);
        push_json_string(&mut env, channel);
        env.push(b'}');
        let data_at = env.len() - 1;
        Self::encoded(channel, Some("gap".into()), None, Kind::Gap, env, data_at)
    }

    fn encoded(
        channel: &str,
        event: Option<String>,
        id: Option<StreamId>,
        kind: Kind,
        env: Vec<u8>,
        data_at: usize,
    ) -> Self {
        let sse = sse_event(sse_name(kind, event.as_deref()).as_deref(), &env);
        // The envelope is built from valid UTF-8 pieces only.
        let frame = match String::from_utf8(env) {
            Ok(s) => s.into_boxed_str(),
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into(),
        };
        Publication {
            channel: channel.to_owned(),
            event,
            id,
            kind,
            frame,
            data_at,
            exclude: None,
            user_id: None,
            sse,
            single_cursor: std::sync::OnceLock::new(),
            wire: Default::default(),
            chained: Vec::new(),
        }
    }

    /// This publication as `wire` writes it, made by `encode` the first
    /// time and shared afterwards.
    pub(crate) fn on_wire(&self, wire: Encoding, encode: impl FnOnce(&Self) -> Bytes) -> Bytes {
        self.wire[wire as usize]
            .get_or_init(|| encode(self))
            .clone()
    }

    /// The `id:` line (and blank line) of a stream whose cursor holds only
    /// this channel, at this message.
    pub(crate) fn single_cursor_line(&self) -> Bytes {
        self.single_cursor
            .get_or_init(|| {
                let mut cursor = crate::history::Cursor::default();
                if let Some(id) = self.id {
                    cursor.0.insert(self.channel.clone(), id);
                }
                Bytes::from(format!("id: {}\n\n", cursor.encode()))
            })
            .clone()
    }

    /// The SSE event without its final blank line, for writers that append
    /// an `id:` line (a zero-copy slice).
    pub(crate) fn sse_open(&self) -> Bytes {
        self.sse.slice(..self.sse.len().saturating_sub(1))
    }
}

/// SSE event names a published event may not take as they are: the
/// EventSource's own (`error` and `open` would fire its built-in
/// `onerror` and `onopen`, `message` is what an unnamed event is and
/// fires `onmessage`) and crier's own notices on SSE.
pub(crate) const RESERVED_SSE_EVENTS: [&str; 8] = [
    "error", "open", "message", "gap", "expiring", "expired", "join", "leave",
];
/// What a reserved name is sent as: `app.error`, listenable with
/// `addEventListener("app.error", …)`. The envelope keeps the name.
const RESERVED_SSE_PREFIX: &str = "app.";

/// The `event:` name of a publication on SSE: a message's event type
/// (`app.<type>` for a reserved one, none for an empty one), or crier's
/// own name for its notices (`gap`, `join`, `leave`).
fn sse_name(kind: Kind, event: Option<&str>) -> Option<std::borrow::Cow<'_, str>> {
    let event = event?;
    match kind {
        Kind::Message if event.trim_matches(['\r', '\n']).is_empty() => None,
        Kind::Message if RESERVED_SSE_EVENTS.contains(&event) => {
            Some(format!("{RESERVED_SSE_PREFIX}{event}").into())
        }
        _ => Some(event.into()),
    }
}

/// An SSE event block. Multi-line data becomes several `data:` lines, which
/// the browser joins back with `\n`. Lines end where an `EventSource` ends
/// them — at CRLF, LF *or a bare CR* — so no byte of the data can end a
/// field early. (The data is JSON, where a CR or LF can only be whitespace
/// between tokens: rejoining with `\n` keeps its meaning.)
pub(crate) fn sse_event(event: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
    if let Some(event) = event {
        // A line break in the name would end the field early: drop them.
        out.put_slice(b"event: ");
        out.extend(event.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
        out.put_u8(b'\n');
    }
    for line in sse_lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// Splits `data` into lines as the EventSource parser does: CRLF, LF and
/// CR each end one line.
fn sse_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.iter().position(|b| *b == b'\n' || *b == b'\r') {
            None => {
                rest = None;
                Some(text)
            }
            Some(end) => {
                let skip = if text[end..].starts_with(b"\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&text[end + skip..]);
                Some(&text[..end])
            }
        }
    })
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Most event types in one `events` filter.
pub const MAX_EVENT_TYPES: usize = 32;
/// Longest event type in an `events` filter, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// The event types a client asked for (`events=a,b` or a subscribe's
/// `events`), shared by every channel of a request rather than copied into
/// each, and bounded so no request can make crier hold much for it.
pub type Filter = std::sync::Arc<[String]>;

/// Builds a [`Filter`]; the error is the reason a client is told.
pub fn event_filter(names: Vec<String>) -> Result<Filter, String> {
    if names.len() > MAX_EVENT_TYPES {
        return Err(format!(
            "too many event types in `events`: at most {MAX_EVENT_TYPES}"
        ));
    }
    if names.iter().any(|n| n.len() > MAX_EVENT_TYPE_LEN) {
        return Err(format!(
            "an event type in `events` is longer than {MAX_EVENT_TYPE_LEN} bytes"
        ));
    }
    Ok(names.into())
}

/// Whether a listener with `events` (an event-type filter, or none) wants
/// `p`. A `gap` concerns the whole channel: filters do not apply to it.
pub(crate) fn wanted(events: Option<&Filter>, p: &Publication) -> bool {
    p.kind != Kind::Message
        || events.is_none_or(|filter| {
            p.event
                .as_deref()
                .is_some_and(|e| filter.iter().any(|f| f == e))
        })
}

/// A presence channel's members, as crier's `presence` reply and
/// `GET /api/presence` give them: `{"channel", "count", "members":
/// [{"user", "info"}]}` (`listed`: user id and info JSON).
pub(crate) fn members_json(channel: &str, count: u64, listed: &[(String, String)]) -> Value {
    let listed: Vec<Value> = listed
        .iter()
        .map(|(user, info)| {
            let info: Value = serde_json::from_str(info).unwrap_or(Value::Null);
            json!({"user": user, "info": info})
        })
        .collect();
    json!({"channel": channel, "count": count, "members": listed})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_EVENT_FIELD;

    fn envelope(p: &Publication) -> Value {
        serde_json::from_str(&p.frame).expect("envelope is JSON")
    }

    #[test]
    fn json_payload_is_embedded_verbatim_with_its_type() {
        let p = Publication::new("public:a", br#" {"type":"greet","n":1.50} "#);
        assert_eq!(p.event.as_deref(), Some("greet"));
        assert_eq!(
            &*p.frame,
            r#"{"type":"message","channel":"public:a","event":"greet","data":{"type":"greet","n":1.50}}"#
        );
        assert_eq!(
            &p.sse[..],
            &b"event: greet\ndata: {\"type\":\"message\",\"channel\":\"public:a\",\"event\":\"greet\",\"data\":{\"type\":\"greet\",\"n\":1.50}}\n\n"[..]
        );
    }

    #[test]
    fn other_payloads_become_strings_and_have_no_event() {
        let p = Publication::new("c", b"hello \"world\"");
        assert_eq!(p.event, None);
        assert_eq!(envelope(&p)["data"], json!("hello \"world\""));
        assert!(!p.frame.contains("event"));
        assert!(p.sse.starts_with(b"data: "));

        let bad_utf8 = Publication::new("c", &[0xff, b'a']);
        assert_eq!(envelope(&bad_utf8)["data"], json!("\u{fffd}a"));

        let array = Publication::new("c", b"[1,2]");
        assert_eq!(envelope(&array)["data"], json!([1, 2]));
        let non_string_type = Publication::new("c", br#"{"type":3}"#);
        assert_eq!(non_string_type.event, None);
    }

    #[test]
    fn multiline_json_stays_one_sse_event() {
        let p = Publication::new("c", b"{\n  \"type\": \"x\",\r\n  \"v\": 1\n}");
        let text = std::str::from_utf8(&p.sse).expect("utf8");
        assert!(text.ends_with("\n\n"));
        assert_eq!(text.matches("\n\n").count(), 1, "{text}");
        let data: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect::<Vec<_>>()
            .join("\n");
        let v: Value = serde_json::from_str(&data).expect("rejoined data is JSON");
        assert_eq!(v["data"]["v"], 1);
    }

    /// What an `EventSource` makes of one event block: its data lines,
    /// split at CRLF, LF or CR, joined with `\n` (WHATWG HTML, 9.2.6).
    fn browser_data(block: &[u8]) -> String {
        let text = std::str::from_utf8(block).expect("utf8");
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        normalized
            .split('\n')
            .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn bare_carriage_returns_cannot_cut_a_data_line() {
        let payload = b"{\"type\":\"x\",\r\"a\":1,\r\n\"b\":2,\n\r\"c\":3}";
        let p = Publication::new("c", payload);
        let data: Value = serde_json::from_str(&browser_data(&p.sse)).expect("data is JSON");
        assert_eq!(data["data"], json!({"type": "x", "a": 1, "b": 2, "c": 3}));
        assert_eq!(
            sse_lines(b"a\rb\r\nc\n\rd").collect::<Vec<_>>(),
            vec![&b"a"[..], b"b", b"c", b"", b"d"]
        );
    }

    #[test]
    fn history_ids_and_gaps() {
        let id: StreamId = "17-3".parse().expect("id");
        let p = Publication::message("c", Some(id), br#"{"type":"t"}"#, DEFAULT_EVENT_FIELD);
        assert_eq!(
            &*p.frame,
            r#"{"type":"message","channel":"c","event":"t","id":"17-3","data":{"type":"t"}}"#
        );
        assert!(p.sse_open().ends_with(b"}\n") && !p.sse_open().ends_with(b"\n\n"));
        let g = Publication::gap("c");
        assert_eq!(g.kind, Kind::Gap);
        assert_eq!(&*g.frame, r#"{"type":"gap","channel":"c"}"#);
        assert!(g.sse.starts_with(b"event: gap\ndata: "));
    }

    #[test]
    fn the_event_field_is_a_json_pointer() {
        let hub = br#"{"event_type":"progress","operation_id":7,"data":{"pct":40},"type":"x"}"#;
        let p = Publication::message("ops", None, hub, "/event_type");
        assert_eq!(p.event.as_deref(), Some("progress"));
        assert!(p.sse.starts_with(b"event: progress\n"));
        assert_eq!(envelope(&p)["event"], "progress");
        let laravel = br#"{"event":"OrderShipped","data":{"id":1},"socket":null}"#;
        let p = Publication::message("orders", None, laravel, "/event");
        assert_eq!(p.event.as_deref(), Some("OrderShipped"));
        let nested = br#"{"meta":{"kind":"deep"}}"#;
        let p = Publication::message("c", None, nested, "/meta/kind");
        assert_eq!(p.event.as_deref(), Some("deep"));
        // Missing or not a string: no event type.
        let p = Publication::message("c", None, laravel, "/type");
        assert_eq!(p.event, None);
        let p = Publication::message("c", None, br#"{"event":3}"#, "/event");
        assert_eq!(p.event, None);
    }

    #[test]
    fn reserved_sse_event_names_are_sent_under_app_dot() {
        for reserved in RESERVED_SSE_EVENTS {
            let p = Publication::new("c", format!(r#"{{"type":"{reserved}"}}"#).as_bytes());
            let head = format!("event: app.{reserved}\n");
            assert!(
                p.sse.starts_with(head.as_bytes()),
                "{reserved}: {:?}",
                p.sse
            );
            assert!(
                p.frame.contains(&format!(r#""event":"{reserved}""#)),
                "{}",
                p.frame
            );
        }
        let p = Publication::new("c", br#"{"type":"\r\n"}"#);
        assert!(
            p.sse.starts_with(b"data: "),
            "no empty event name: {:?}",
            p.sse
        );
        let g = Publication::gap("c");
        assert!(g.sse.starts_with(b"event: gap\n"));
    }
}
