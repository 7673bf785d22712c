//! A minimal Server-Sent Events client over a real socket, parsing the stream
//! as the WHATWG spec (and so a browser's `EventSource`) does, so tests see
//! exactly what a browser would, including `retry:` and heartbeat comments.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{timeout_at, Instant};

use super::ConnTask;

/// Opens `GET url` (e.g. `http://127.0.0.1:PORT/sse?channel=a`) with
/// `Accept: text/event-stream` (unless `headers` sets its own) plus `headers`,
/// and returns as soon as the response headers arrive.
pub async fn connect(url: &str, headers: &[(&str, &str)]) -> SseResponse {
    let mut all: Vec<(&str, &str)> = Vec::with_capacity(headers.len() + 1);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("accept"))
    {
        all.push(("accept", "text/event-stream"));
    }
    all.extend_from_slice(headers);
    let (response, conn) = super::send_request(Method::GET, url, &all, Bytes::new()).await;
    let (parts, body) = response.into_parts();
    SseResponse {
        status: parts.status,
        headers: parts.headers,
        url: url.to_owned(),
        body,
        conn,
    }
}

/// Response headers of an SSE request; the body is still unread.
pub struct SseResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// For failure messages.
    url: String,
    body: Incoming,
    /// Keeps the connection alive until the response is consumed or dropped.
    conn: ConnTask,
}

impl SseResponse {
    /// The whole body as text, for refusals (401, 403, 429...) that end at
    /// once. Panics if it does not end within `HTTP_TIMEOUT`.
    pub async fn body_text(self) -> String {
        let response = http::Response::new(self.body);
        super::read_whole(&self.url, response, self.conn).await.1
    }

    /// The body as a stream of events (for a 200 answer), inflated as a
    /// browser inflates it when the response says `Content-Encoding:
    /// deflate`.
    pub fn into_events(self) -> SseStream {
        let deflated = self
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"deflate"));
        SseStream {
            inflater: deflated.then(|| flate2::Decompress::new(false)),
            url: self.url,
            body: self.body,
            _conn: self.conn,
            parser: Parser::default(),
            queue: VecDeque::new(),
            ended: false,
            error: None,
        }
    }
}

/// An open event stream. Dropping it closes the connection, which is how a
/// test makes a browser go away.
pub struct SseStream {
    url: String,
    body: Incoming,
    _conn: ConnTask,
    parser: Parser,
    /// Events parsed but not yet handed out (one chunk may hold several).
    queue: VecDeque<SseEvent>,
    /// The body has ended (cleanly or not); only `queue` is left.
    ended: bool,
    /// Why the body ended abnormally (e.g. the server was killed), if it did.
    error: Option<String>,
    /// The body is a raw deflate stream (`Content-Encoding: deflate`).
    inflater: Option<flate2::Decompress>,
}

impl SseStream {
    /// The next event, or `None` once the stream has ended. Panics if nothing
    /// arrives within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        match self.next_until(deadline).await {
            Ok(event) => event,
            Err(()) => panic!(
                "no SSE event from {} within {timeout:?} (partial block so far: {:?})",
                self.url, self.parser.pending
            ),
        }
    }

    /// The next event that carries data, skipping `retry:`-only and
    /// comment-only blocks (heartbeats); `None` once the stream has ended.
    /// Panics if no such event arrives within `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            match self.next_until(deadline).await {
                Ok(Some(event)) if event.has_data => return Some(event),
                Ok(Some(event)) => skipped.push(event),
                Ok(None) => return None,
                Err(()) => panic!(
                    "no SSE message from {} within {timeout:?}; skipped data-less events: {skipped:?}",
                    self.url
                ),
            }
        }
    }

    /// Asserts the server ends the stream within `timeout`; returns the events
    /// received before the end.
    pub async fn expect_end(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        loop {
            match self.next_until(deadline).await {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return events,
                Err(()) => panic!(
                    "SSE stream from {} did not end within {timeout:?}; events meanwhile: {events:?}",
                    self.url
                ),
            }
        }
    }

    /// Why the stream ended abnormally (connection reset, truncated chunk),
    /// or `None` if it is still open or ended cleanly.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Next event or end of stream; `Err(())` when `deadline` passes first.
    async fn next_until(&mut self, deadline: Instant) -> Result<Option<SseEvent>, ()> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            match timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Err(()),
                // Per spec, an incomplete block at end of stream is discarded.
                Ok(None) => self.ended = true,
                Ok(Some(Err(e))) => {
                    self.ended = true;
                    self.error = Some(e.to_string());
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        match &mut self.inflater {
                            Some(inflater) => {
                                let text = inflate(inflater, &data);
                                self.parser.feed(&text, &mut self.queue);
                            }
                            None => self.parser.feed(&data, &mut self.queue),
                        }
                    }
                }
            }
        }
    }
}

/// One dispatched block of the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if the block had one (a browser defaults to "message").
    pub event: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field of this block (not carried over from earlier blocks,
    /// unlike a browser's `lastEventId`), so tests see what the server sent.
    pub id: Option<String>,
    /// A valid `retry:` field (digits only; anything else is ignored per spec).
    pub retry: Option<u64>,
    /// Comment lines, without the `:` and one optional leading space.
    pub comments: Vec<String>,
    /// Whether the block had a `data:` line: a browser fires `message` only
    /// then, and it tells `data:` with an empty payload from a heartbeat.
    pub has_data: bool,
}

impl SseEvent {
    /// The data parsed as JSON (crier's payload format); panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {:?}", self.data))
    }
}

/// Incremental parser. Works on bytes so chunks may split lines, CRLF pairs
/// and UTF-8 sequences anywhere.
#[derive(Debug, Default)]
struct Parser {
    /// Bytes of the line being read.
    line: Vec<u8>,
    /// The previous byte was `\r`: a `\n` right after it ends no new line.
    after_cr: bool,
    /// Past the first line, where a UTF-8 BOM may sit.
    past_first_line: bool,
    /// The block being built.
    pending: SseEvent,
    /// The block has something to dispatch (data, event, id, retry or comment).
    pending_any: bool,
}

impl Parser {
    fn feed(&mut self, chunk: &[u8], out: &mut VecDeque<SseEvent>) {
        for &byte in chunk {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.end_line(out);
                    self.after_cr = true;
                }
                _ => self.line.push(byte),
            }
        }
    }

    fn end_line(&mut self, out: &mut VecDeque<SseEvent>) {
        let mut raw = std::mem::take(&mut self.line);
        if !std::mem::replace(&mut self.past_first_line, true) && raw.starts_with(b"\xEF\xBB\xBF") {
            raw.drain(..3);
        }
        // `\r` and `\n` never occur inside a UTF-8 sequence, so decoding per
        // line equals decoding the whole stream.
        let line = String::from_utf8_lossy(&raw);
        if line.is_empty() {
            if std::mem::take(&mut self.pending_any) {
                out.push_back(std::mem::take(&mut self.pending));
            }
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.pending
                .comments
                .push(strip_one_space(comment).to_owned());
            self.pending_any = true;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, strip_one_space(value)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.pending.event = Some(value.to_owned()),
            "data" => {
                if self.pending.has_data {
                    self.pending.data.push('\n');
                }
                self.pending.data.push_str(value);
                self.pending.has_data = true;
            }
            "id" if !value.contains('\0') => self.pending.id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                match value.parse() {
                    Ok(ms) => self.pending.retry = Some(ms),
                    Err(_) => return,
                }
            }
            // Unknown fields and invalid id/retry values are ignored.
            _ => return,
        }
        self.pending_any = true;
    }
}

fn strip_one_space(s: &str) -> &str {
    s.strip_prefix(' ').unwrap_or(s)
}

/// What `data`, the next piece of a raw deflate stream, inflates to.
pub fn inflate(inflater: &mut flate2::Decompress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 8 + 64);
    let mut input = data;
    loop {
        let before = inflater.total_in();
        inflater
            .decompress_vec(input, &mut out, flate2::FlushDecompress::Sync)
            .expect("the stream is deflate data");
        input = &input[(inflater.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity().max(64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = Parser::default();
        let mut out = VecDeque::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        out.into()
    }

    fn parse(stream: &str) -> Vec<SseEvent> {
        parse_chunks(&[stream.as_bytes()])
    }

    fn message(data: &str) -> SseEvent {
        SseEvent {
            data: data.into(),
            has_data: true,
            ..SseEvent::default()
        }
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let stream = "retry: 2500\n\n: hb\n\nevent: order.created\nid: c-1\ndata: {\"s\":\"caf\u{e9} \u{1F600}\"}\r\n\r\ndata: a\rdata: b\r\r";
        let bytes = stream.as_bytes();
        let whole = parse(stream);
        assert_eq!(whole.len(), 4, "{whole:?}");
        for cut in 0..=bytes.len() {
            assert_eq!(
                parse_chunks(&[&bytes[..cut], &bytes[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_chunks(&bytewise), whole);
        assert_eq!(whole[2].json()["s"], "caf\u{e9} \u{1F600}");
    }

    #[test]
    fn crlf_cr_and_lf_all_end_lines() {
        let expected = vec![message("x"); 3];
        assert_eq!(parse("data: x\r\n\r\ndata: x\r\rdata: x\n\n"), expected);
        // A CR ending one chunk and the LF starting the next are one line break,
        // not an extra empty line that would dispatch early.
        let events = parse_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(events, vec![message("a\nb")]);
    }

    #[test]
    fn data_lines_join_with_newline_and_one_space_is_stripped() {
        assert_eq!(
            parse("data: one\ndata:two\ndata:  three\ndata\n\n"),
            vec![message("one\ntwo\n three\n")]
        );
        assert_eq!(parse("data:\n\n"), vec![message("")]);
    }

    #[test]
    fn fields_event_and_id() {
        let events = parse("event: e1\nid: 7\ndata: d\n\nid: bad\0id\ndata: d\n\n");
        assert_eq!(events[0].event.as_deref(), Some("e1"));
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[1].id, None, "an id containing NUL is ignored");
        assert_eq!(events[1].event, None);
    }

    #[test]
    fn comments_dispatch_as_dataless_events() {
        let events = parse(": ping\n:raw\n\n");
        assert_eq!(
            events,
            vec![SseEvent {
                comments: vec!["ping".into(), "raw".into()],
                ..SseEvent::default()
            }]
        );
        assert!(!events[0].has_data);
    }

    #[test]
    fn retry_only_digits() {
        let events = parse("retry: 3000\n\nretry: 3s\n\nretry:\n\n: after\n\n");
        assert_eq!(
            events.len(),
            2,
            "invalid retry blocks are not dispatched: {events:?}"
        );
        assert_eq!(events[0].retry, Some(3000));
        assert!(!events[0].has_data);
        assert_eq!(events[1].comments, vec!["after".to_owned()]);
    }

    #[test]
    fn unknown_fields_and_empty_blocks_dispatch_nothing() {
        assert_eq!(parse("foo: bar\n\n\n\n"), vec![]);
    }

    #[test]
    fn incomplete_block_is_not_dispatched() {
        assert_eq!(parse("data: x\n"), vec![]);
        assert_eq!(parse("data: x"), vec![]);
    }

    #[test]
    fn leading_bom_is_skipped_even_when_split() {
        let events = parse_chunks(&[b"\xEF\xBB", b"\xBFdata: x\n\n"]);
        assert_eq!(events, vec![message("x")]);
    }
}
