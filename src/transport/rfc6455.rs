//! WebSocket framing (RFC 6455), server side, with permessage-deflate
//! (RFC 7692, see [`super::deflate`]) as its one extension.
//!
//! What a server needs and no more: frames it sends are unmasked and never
//! fragmented, so writing one is a header in front of the payload, into the
//! connection's write buffer. Frames it reads must be masked; fragmented
//! messages are reassembled up to the message limit, control frames answered
//! by the caller. Anything the RFC calls a protocol error is one, with the
//! close code it names.

/// A text frame.
pub(crate) const TEXT: u8 = 0x1;
/// A close frame.
pub(crate) const CLOSE: u8 = 0x8;
/// A ping.
pub(crate) const PING: u8 = 0x9;
/// A pong.
pub(crate) const PONG: u8 = 0xA;

use super::deflate::InflateError;

const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;

/// The bytes of a frame carrying `len` bytes of payload: what
/// [`encode`] writes, counted without writing it.
pub(crate) fn frame_len(len: usize) -> usize {
    let head = if len < 126 {
        2
    } else if u16::try_from(len).is_ok() {
        4
    } else {
        10
    };
    head + len
}

/// Appends one complete, unmasked frame to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    encode_head(out, 0x80 | opcode, payload);
}

/// Appends one complete, unmasked frame whose payload is compressed
/// (permessage-deflate: RSV1 set, RFC 7692 section 6).
pub(crate) fn encode_rsv1(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    encode_head(out, 0x80 | RSV1 | opcode, payload);
}

/// The reserved bit permessage-deflate gives its meaning.
pub(crate) const RSV1: u8 = 0x40;

fn encode_head(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    out.push(first);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A WebSocket close status code: the one type every WebSocket protocol
/// (`/ws`, the Pusher protocol) closes with. RFC 6455's codes are here;
/// a protocol's own (4000–4999) are constants in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// The server is going away, or the client went silent.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// The client broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// A text message that is not UTF-8.
    pub const INVALID_DATA: CloseCode = CloseCode(1007);
    /// The client broke a policy (a rate, a credential).
    pub const POLICY: CloseCode = CloseCode(1008);
    /// A message over the size limit.
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// The server restarts: reconnect.
    pub const RESTART: CloseCode = CloseCode(1012);
    /// Overloaded, or the client too slow: try again later.
    pub const TRY_AGAIN: CloseCode = CloseCode(1013);
}

/// Appends a close frame with `code` and `reason` (cut to fit a control
/// frame's 125 bytes).
pub(crate) fn encode_close(out: &mut Vec<u8>, code: CloseCode, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.0.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(out, CLOSE, &payload);
}

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A text message.
    Text(String),
    /// A binary message (its bytes are not kept: crier's protocol is text).
    Binary,
    /// A ping: answer with a pong carrying the same bytes.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The client closes, with its status code when it gave one.
    Close(Option<u16>),
}

/// What cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Error {
    /// A message larger than the limit (close 1009).
    TooLong {
        /// Its size, or the size reached so far.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The client broke the protocol (close 1002).
    Protocol(&'static str),
    /// A text message that is not UTF-8 (close 1007).
    NotUtf8,
    /// A compressed message that is not deflate data (close 1007).
    BadDeflate,
}

impl Error {
    /// The close code RFC 6455 gives this error.
    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            Error::TooLong { .. } => CloseCode::TOO_BIG,
            Error::Protocol(_) => CloseCode::PROTOCOL_ERROR,
            Error::NotUtf8 | Error::BadDeflate => CloseCode::INVALID_DATA,
        }
    }
}

/// Reads frames out of the bytes a client sent.
#[derive(Debug)]
pub(crate) struct Reader {
    /// Bytes read and not yet parsed; empty (no allocation) between frames.
    pub(crate) buf: Vec<u8>,
    /// A fragmented message so far: its opcode, whether it is compressed,
    /// and its payload.
    partial: Option<(u8, bool, Vec<u8>)>,
    max: usize,
    /// The connection negotiated permessage-deflate: RSV1 marks a
    /// compressed message.
    pub(crate) deflate: bool,
}

impl Reader {
    /// A reader of messages up to `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            partial: None,
            max,
            deflate: false,
        }
    }

    /// The next complete frame in the buffer, if there is one.
    pub(crate) fn next(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let Some((header, len)) = self.header()? else {
                return Ok(None);
            };
            let b0 = self.buf[0];
            let fin = b0 & 0x80 != 0;
            let compressed = b0 & RSV1 != 0;
            let opcode = b0 & 0x0F;
            if self.buf.len() < header + len {
                return Ok(None);
            }
            let mask = [
                self.buf[header - 4],
                self.buf[header - 3],
                self.buf[header - 2],
                self.buf[header - 1],
            ];
            let mut payload: Vec<u8> = self.buf[header..header + len].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            self.consume(header + len);
            if let Some(frame) = self.frame(fin, opcode, compressed, payload)? {
                return Ok(Some(frame));
            }
        }
    }

    /// The header's length and the payload's, once the header is complete;
    /// errors for what the header alone shows is wrong.
    fn header(&self) -> Result<Option<(usize, usize)>, Error> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return Ok(None);
        }
        let reserved = buf[0] & 0x70;
        if reserved & !RSV1 != 0 || (reserved != 0 && !self.deflate) {
            return Err(Error::Protocol("reserved bits set without an extension"));
        }
        if reserved != 0 && matches!(buf[0] & 0x0F, CONTINUATION | CLOSE | PING | PONG) {
            return Err(Error::Protocol(
                "RSV1 is only for the first frame of a data message",
            ));
        }
        if buf[1] & 0x80 == 0 {
            return Err(Error::Protocol("client frames must be masked"));
        }
        let opcode = buf[0] & 0x0F;
        let (len, header) = match buf[1] & 0x7F {
            126 if buf.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 8),
            127 if buf.len() < 10 => return Ok(None),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(n), 14)
            }
            n => (u64::from(n), 6),
        };
        if opcode & 0x8 != 0 {
            if buf[0] & 0x80 == 0 {
                return Err(Error::Protocol("fragmented control frame"));
            }
            if len > 125 {
                return Err(Error::Protocol("control frame over 125 bytes"));
            }
        }
        let so_far = match (&self.partial, opcode) {
            (Some((_, _, partial)), CONTINUATION) => partial.len() as u64,
            _ => 0,
        };
        let size = so_far.saturating_add(len);
        if size > self.max as u64 {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            return Err(Error::TooLong {
                size,
                max: self.max,
            });
        }
        // Fits in usize: it is at most `max`.
        Ok(Some((header, len as usize)))
    }

    /// Drops `n` parsed bytes; frees the buffer once it is empty.
    fn consume(&mut self, n: usize) {
        if n >= self.buf.len() {
            self.buf = Vec::new();
        } else {
            self.buf.drain(..n);
        }
    }

    /// A frame's meaning: a message or control frame, or `None` for a
    /// fragment that does not complete one. A compressed message is
    /// inflated once whole, never past the message limit.
    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        compressed: bool,
        payload: Vec<u8>,
    ) -> Result<Option<Frame>, Error> {
        let (opcode, compressed, payload) = match opcode {
            PING => return Ok(Some(Frame::Ping(payload))),
            PONG => return Ok(Some(Frame::Pong)),
            CLOSE => return close(&payload).map(Some),
            TEXT | BINARY if self.partial.is_some() => {
                return Err(Error::Protocol("new message inside a fragmented one"))
            }
            TEXT | BINARY if !fin => {
                self.partial = Some((opcode, compressed, payload));
                return Ok(None);
            }
            TEXT | BINARY => (opcode, compressed, payload),
            CONTINUATION => {
                let Some((first, compressed, mut whole)) = self.partial.take() else {
                    return Err(Error::Protocol("continuation without a message"));
                };
                whole.extend_from_slice(&payload);
                if !fin {
                    self.partial = Some((first, compressed, whole));
                    return Ok(None);
                }
                (first, compressed, whole)
            }
            _ => return Err(Error::Protocol("unknown opcode")),
        };
        let payload = match compressed {
            false => payload,
            true => super::deflate::inflate(&payload, self.max).map_err(|e| match e {
                InflateError::TooLong(size) => Error::TooLong {
                    size,
                    max: self.max,
                },
                InflateError::Malformed => Error::BadDeflate,
            })?,
        };
        if opcode == BINARY {
            return Ok(Some(Frame::Binary));
        }
        String::from_utf8(payload)
            .map(|text| Some(Frame::Text(text)))
            .map_err(|_| Error::NotUtf8)
    }
}

/// A close frame's status code, checked as RFC 6455 section 7.4 says.
fn close(payload: &[u8]) -> Result<Frame, Error> {
    match payload {
        [] => Ok(Frame::Close(None)),
        [_] => Err(Error::Protocol("close frame of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(Error::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Error::NotUtf8);
            }
            Ok(Frame::Close(Some(code)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn client(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    fn reader(bytes: &[u8]) -> Reader {
        let mut r = Reader::new(70_000);
        r.buf.extend_from_slice(bytes);
        r
    }

    #[test]
    fn server_frames_have_the_shortest_length_form() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let mut out = Vec::new();
            encode(&mut out, TEXT, &vec![b'a'; len]);
            assert_eq!(out.len(), header + len, "{len}");
            assert_eq!(out[0], 0x81);
        }
        let mut out = Vec::new();
        encode_close(&mut out, CloseCode::TRY_AGAIN, &"é".repeat(100));
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(
            out.len() - 2 <= 125,
            "a control frame's payload fits 125 bytes"
        );
        assert!(
            std::str::from_utf8(&out[4..]).is_ok(),
            "cut at a char boundary"
        );
    }

    #[test]
    fn masked_frames_of_every_length_form_are_read_even_byte_by_byte() {
        for len in [0, 5, 125, 126, 300, 65_535, 65_536] {
            let text = "x".repeat(len);
            let bytes = client(0x81, text.as_bytes());
            let mut r = Reader::new(70_000);
            let mut got = None;
            for b in &bytes {
                assert_eq!(got, None, "complete before the last byte");
                r.buf.push(*b);
                got = r.next().expect("valid");
            }
            assert_eq!(got, Some(Frame::Text(text)), "{len}");
            assert!(r.buf.is_empty() && r.buf.capacity() == 0, "buffer freed");
        }
    }

    #[test]
    fn fragments_are_joined_and_control_frames_may_come_between() {
        let mut bytes = client(0x01, b"{\"type\":");
        bytes.extend(client(0x89, b"hi"));
        bytes.extend(client(0x00, b"\"ping\""));
        bytes.extend(client(0x80, b"}"));
        bytes.extend(client(0x88, &[0x03, 0xE8]));
        let mut r = reader(&bytes);
        assert_eq!(r.next(), Ok(Some(Frame::Ping(b"hi".to_vec()))));
        assert_eq!(
            r.next(),
            Ok(Some(Frame::Text("{\"type\":\"ping\"}".into())))
        );
        assert_eq!(r.next(), Ok(Some(Frame::Close(Some(1000)))));
        assert_eq!(r.next(), Ok(None));
    }

    #[test]
    fn protocol_errors_are_named_with_their_close_code() {
        let unmasked = [0x81, 0x01, b'a'];
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (unmasked.to_vec(), 1002),
            (client(0xC1, b"a"), 1002), // RSV1 without an extension
            (client(0x09, b"a"), 1002), // fragmented ping
            (client(0x89, &[b'a'; 126]), 1002), // ping over 125 bytes
            (client(0x80, b"a"), 1002), // continuation of nothing
            (client(0x83, b"a"), 1002), // unknown opcode
            (client(0x88, &[0x03]), 1002), // close of one byte
            (client(0x88, &[0x03, 0xED]), 1002), // close code 1005
            (client(0x81, &[0xFF, 0xFE]), 1007), // not UTF-8
            (client(0x81, &vec![b'a'; 70_001]), 1009), // over the limit
            ([client(0x01, b"a"), client(0x81, b"b")].concat(), 1002), // message inside a message
        ];
        for (bytes, code) in cases {
            let mut r = reader(&bytes);
            let error = loop {
                match r.next() {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("{bytes:02x?}: no error"),
                    Err(e) => break e,
                }
            };
            assert_eq!(
                error.close_code(),
                CloseCode(code),
                "{bytes:02x?}: {error:?}"
            );
        }
    }

    #[test]
    fn an_oversized_message_is_refused_from_its_header_alone() {
        // Only the header of a 1 MiB frame: refused before its payload.
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 20).to_be_bytes());
        let mut r = reader(&header);
        assert_eq!(
            r.next(),
            Err(Error::TooLong {
                size: 1 << 20,
                max: 70_000
            })
        );
        // Fragments count together.
        let mut r = Reader::new(10);
        r.buf = [client(0x01, b"123456"), client(0x80, b"123456")].concat();
        assert_eq!(r.next(), Err(Error::TooLong { size: 12, max: 10 }));
    }
}
