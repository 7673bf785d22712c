//! permessage-deflate (RFC 7692), as crier speaks it: compressed once per
//! publication, shared by every client that negotiated it.
//!
//! Two ways, both made once per publication and shared:
//! - **on its own**: the message compressed with no context, which any
//!   client that negotiated compression can read whatever it received
//!   before. A 1 KB JSON event shrinks to about 40 %: it pays for its own
//!   vocabulary.
//! - **chained**: compressed against the channel's earlier messages (a
//!   [`ChannelContext`], one per busy channel, shared by its listeners),
//!   as a connection that kept its compression context would be; the same
//!   event shrinks to 10–15 %. A listener may take a chained frame only if
//!   its client's inflater holds exactly what the context held: every
//!   earlier frame of the context's epoch and no other compressed message
//!   since (see [`crate::protocol::Encoder::encode`]). A listener joins at
//!   the start of an epoch, which a context begins afresh soon after a
//!   listener arrives, and takes frames compressed on its own meanwhile.
//!
//! A client that asks for `server_no_context_takeover` gets only the
//! first; one that does not ask is answered without it, so its inflater
//! keeps its window and chained frames can reach it. crier asks every
//! client for `client_no_context_takeover`: a connection holds no
//! compressor and no inflater between messages; an inflater exists only
//! while a compressed client message is read, and what it inflates is
//! capped by `limits.max_message_bytes`.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use http::HeaderValue;

use crate::protocol::{Chain, ChainSpec, Chained, Deflate, Publication, EPOCH_LINKS};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// What crier answers an offer that asks for `server_no_context_takeover`.
const ON_ITS_OWN: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// What crier answers any other offer it accepts: its messages may refer
/// to earlier ones (chained), the client's may not.
const CHAINED: &str = "permessage-deflate; client_no_context_takeover";

/// What was agreed with a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Agreed {
    /// Every message compressed on its own.
    OnItsOwn,
    /// The client keeps its window: chained frames may reach it.
    Chained,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` answer.
    pub(crate) fn answer(self) -> &'static str {
        match self {
            Agreed::OnItsOwn => ON_ITS_OWN,
            Agreed::Chained => CHAINED,
        }
    }
}
/// The tail a sync flush ends a message with, which RFC 7692 leaves off
/// the wire (section 7.2.1) and the reader puts back (section 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether some offer in the request's `Sec-WebSocket-Extensions` headers
/// is one crier accepts: `permessage-deflate` with parameters it can
/// honour. crier's compressor always uses the largest window, so an offer
/// that limits the server's window below 15 bits is declined (the client
/// may list another offer after it); a parameter RFC 7692 does not define,
/// or one given twice, declines its offer too (section 7.1).
pub(crate) fn accepts<'a>(headers: impl Iterator<Item = &'a HeaderValue>) -> Option<Agreed> {
    let offer = headers
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find(|offer| acceptable(offer))?;
    let own = offer
        .split(';')
        .any(|param| param.trim() == "server_no_context_takeover");
    Some(match own {
        true => Agreed::OnItsOwn,
        false => Agreed::Chained,
    })
}

/// One offer: `permessage-deflate; param[=value]; …`.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case(NAME))
    {
        return false;
    }
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return false;
        }
        seen.push(name);
        let fine = match (name, value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            // Ours is 15 bits, always: a smaller one cannot be honoured.
            ("server_max_window_bits", Some(bits)) => bits == "15",
            // The client's window: ours inflates any (an absent value
            // only says the client supports the parameter).
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(bits)) => {
                bits.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b))
            }
            _ => false,
        };
        if !fine {
            return false;
        }
    }
    true
}

thread_local! {
    /// One compressor per thread, reset for each message: a compressor
    /// holds hundreds of KiB, so making one per publication would cost more
    /// than the compression.
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// `plain`, a whole text frame as crier writes it (unmasked, FIN), as the
/// frame a client that negotiated permessage-deflate gets: the payload
/// compressed on its own, RSV1 set; or `plain` itself when the payload is
/// under `deflate.min_bytes` or does not shrink.
pub(crate) fn frame(plain: &Bytes, deflate: &Deflate) -> Bytes {
    let Some((opcode, payload)) = payload_of(plain) else {
        return plain.clone();
    };
    if payload.len() < deflate.min_bytes.max(1) {
        return plain.clone();
    }
    let compressed = compress(payload, deflate.level);
    if compressed.len() >= payload.len() {
        return plain.clone();
    }
    compressed_frame(plain.len(), opcode, &compressed, deflate)
}

/// A frame of `opcode` carrying `compressed` (RSV1), counted.
fn compressed_frame(plain: usize, opcode: u8, compressed: &[u8], deflate: &Deflate) -> Bytes {
    let mut out = Vec::with_capacity(compressed.len() + 10);
    super::rfc6455::encode_rsv1(&mut out, opcode, compressed);
    let metrics = &deflate.metrics;
    metrics.ws_compressed_frames.inc();
    let bytes = &metrics.ws_compression_bytes;
    bytes.with_label_values(&["before"]).inc_by(plain as u64);
    bytes.with_label_values(&["after"]).inc_by(out.len() as u64);
    Bytes::from(out)
}

/// Whether crier's `frame` is compressed (RSV1): such a frame enters the
/// client's inflater window, so a connection that writes one stops
/// following its chain.
pub(crate) fn is_compressed(frame: &Bytes) -> bool {
    frame.first().is_some_and(|b0| b0 & 0x40 != 0)
}

/// A channel's compression context, shared by its listeners: see the
/// module documentation.
pub(crate) struct ChannelContext {
    spec: ChainSpec,
    state: std::sync::Mutex<Context>,
}

struct Context {
    compressor: Compress,
    /// 0 until the first message.
    epoch: u64,
    /// The next link's place in the epoch.
    seq: u32,
    /// A listener arrived during this epoch.
    joined: bool,
}

/// Epoch numbers, unique in the process (0: none).
static EPOCHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// An epoch lasts at least this many messages, however many listeners
/// arrive: its first message is compressed on its own terms (no context
/// yet), so restarting too often would undo the gain.
const EPOCH_MIN: u32 = 16;

impl ChannelContext {
    /// The hub's way to make one (see [`crate::protocol::ChainSpec`]).
    pub(crate) fn make(spec: &ChainSpec) -> Box<dyn Chain> {
        Box::new(ChannelContext {
            spec: spec.clone(),
            state: std::sync::Mutex::new(Context {
                compressor: Compress::new(Compression::new(spec.deflate.level), false),
                epoch: 0,
                seq: 0,
                joined: false,
            }),
        })
    }
}

impl Chain for ChannelContext {
    fn next(&self, p: &Publication) -> Option<Chained> {
        let plain = (self.spec.plain)(p);
        let (opcode, payload) = payload_of(&plain)?;
        let deflate = &self.spec.deflate;
        if payload.len() < deflate.min_bytes.max(1) {
            // Plain for everyone: it never enters a client's window.
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let restart = state.epoch == 0
            || state.seq >= EPOCH_LINKS
            || (state.joined && state.seq >= EPOCH_MIN);
        if restart {
            state.compressor.reset();
            state.epoch = EPOCHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            state.seq = 0;
            state.joined = false;
        }
        // Sent compressed even if it did not shrink: what the context
        // took in must reach the followers' inflaters too.
        let Some(mut compressed) = sync_flush(&mut state.compressor, payload) else {
            state.epoch = 0;
            return None;
        };
        compressed.truncate(compressed.len() - TAIL.len());
        let link = Chained {
            key: self.spec.key,
            epoch: state.epoch,
            seq: state.seq,
            bytes: compressed_frame(plain.len(), opcode, &compressed, deflate),
        };
        state.seq += 1;
        Some(link)
    }

    fn joined(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).joined = true;
    }
}

/// `payload` through `compressor` (on its own after a reset, or after
/// what it took before), ending with a sync flush: byte-aligned, not
/// final, with the flush's tail. `None` if the compressor fails, which it
/// does not on valid arguments.
fn sync_flush(compressor: &mut Compress, payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    let mut input = payload;
    loop {
        let before = compressor.total_in();
        compressor
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .ok()?;
        input = &input[(compressor.total_in() - before) as usize..];
        if input.is_empty() && out.ends_with(&TAIL) {
            return Some(out);
        }
        out.reserve(out.capacity().max(64));
    }
}

/// The opcode and payload of a frame crier wrote (unmasked, one frame).
fn payload_of(frame: &[u8]) -> Option<(u8, &[u8])> {
    let (&b0, rest) = frame.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let (len, rest) = match b1 & 0x7f {
        126 => {
            let n = rest.get(..2)?;
            (
                usize::from(u16::from_be_bytes([n[0], n[1]])),
                rest.get(2..)?,
            )
        }
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(rest.get(..8)?);
            (usize::try_from(u64::from_be_bytes(n)).ok()?, rest.get(8..)?)
        }
        n => (usize::from(n), rest),
    };
    (rest.len() == len && b0 & 0x70 == 0).then_some((b0 & 0x0f, rest))
}

/// `payload` as one message's deflate data, without the sync flush's tail.
fn compress(payload: &[u8], level: u32) -> Vec<u8> {
    let mut out = compress_sync(payload, level);
    out.truncate(out.len().saturating_sub(TAIL.len()));
    out
}

/// A final, empty stored block: the end of a deflate stream.
pub(crate) const END: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];

/// `data` as deflate blocks that continue any deflate stream at a byte
/// boundary, whatever came before: compressed on their own (no reference
/// to earlier bytes, a sync flush at the end), or stored when that is not
/// smaller. What an SSE stream compressed as a whole sends for an event,
/// made once per publication and shared.
pub(crate) fn blocks(data: &[u8], level: u32) -> Vec<u8> {
    let compressed = compress_sync(data, level);
    if compressed.len() < data.len() + 5 {
        return compressed;
    }
    let mut out = Vec::with_capacity(data.len() + 5);
    stored(&mut out, data);
    out
}

/// Appends `data` as stored (uncompressed) deflate blocks: a connection's
/// own bytes in a compressed stream, at no compression cost.
pub(crate) fn stored(out: &mut Vec<u8>, data: &[u8]) {
    for piece in data.chunks(usize::from(u16::MAX)) {
        let len = piece.len() as u16;
        out.push(0x00);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(piece);
    }
}

/// `payload` compressed with the sync flush's tail (byte-aligned, not
/// final).
fn compress_sync(payload: &[u8], level: u32) -> Vec<u8> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match &mut *cell {
            Some((at, compressor)) if *at == level => {
                compressor.reset();
                compressor
            }
            slot => {
                &mut slot
                    .insert((level, Compress::new(Compression::new(level), false)))
                    .1
            }
        };
        // A compressor fed valid arguments does not fail; if it did, the
        // message goes as stored blocks (never smaller), and `frame` sends
        // it plain.
        sync_flush(compressor, payload).unwrap_or_else(|| {
            let mut stored_form = Vec::new();
            stored(&mut stored_form, payload);
            stored_form
        })
    })
}

/// Why a compressed message cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates past the limit: the size reached (over `max`).
    TooLong(usize),
    /// Not a deflate stream.
    Malformed,
}

/// One compressed message, inflated with a fresh inflater (no context
/// takeover), never past `max` bytes: a small frame that would inflate to
/// gigabytes stops at `max + 1`.
pub(crate) fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let mut inflater = Decompress::new(false);
    let cap = max.saturating_add(1);
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).max(64).min(cap));
    // The message, then the tail its sender left off.
    for chunk in [compressed, &TAIL[..]] {
        let mut input = chunk;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    return Err(InflateError::TooLong(out.len()));
                }
                out.reserve((out.capacity() * 2).min(cap) - out.len());
            }
            let (before, made) = (inflater.total_in(), out.len());
            let status = inflater
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Malformed)?;
            let taken = (inflater.total_in() - before) as usize;
            input = &input[taken..];
            if out.len() > max {
                return Err(InflateError::TooLong(out.len()));
            }
            let room = out.len() < out.capacity();
            match status {
                // The final block (a client may end a message with one).
                Status::StreamEnd => break,
                _ if input.is_empty() && room => break,
                // Room to write and input left, yet nothing moved: the
                // stream is stuck, not deflate.
                _ if room && taken == 0 && out.len() == made => {
                    return Err(InflateError::Malformed)
                }
                Status::Ok | Status::BufError => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Encoder, Follower};

    fn agreed(value: &str) -> Option<Agreed> {
        accepts([HeaderValue::from_str(value).expect("header")].iter())
    }

    fn offer(value: &str) -> bool {
        agreed(value).is_some()
    }

    #[test]
    fn a_client_that_keeps_its_window_may_be_sent_chained_frames() {
        let chrome = agreed("permessage-deflate; client_max_window_bits");
        assert_eq!(chrome, Some(Agreed::Chained));
        assert_eq!(
            chrome.map(Agreed::answer),
            Some("permessage-deflate; client_no_context_takeover")
        );
        let own = agreed("permessage-deflate; server_no_context_takeover");
        assert_eq!(own, Some(Agreed::OnItsOwn));
        assert_eq!(
            own.map(Agreed::answer),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
    }

    #[test]
    fn offers_crier_can_honour_are_accepted() {
        assert!(offer("permessage-deflate"));
        assert!(
            offer("permessage-deflate; client_max_window_bits"),
            "Chrome's"
        );
        assert!(offer(
            "permessage-deflate; client_max_window_bits=10; server_no_context_takeover"
        ));
        assert!(offer("x-webkit-deflate-frame, permessage-deflate"));
        assert!(
            offer("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            "the second offer"
        );
        assert!(!offer("permessage-deflate; server_max_window_bits=10"));
        assert!(!offer("permessage-deflate; client_max_window_bits=16"));
        assert!(!offer("permessage-deflate; mystery"));
        assert!(!offer(
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
        ));
        assert!(!offer("x-webkit-deflate-frame"));
        assert!(accepts(std::iter::empty()).is_none());
    }

    fn text_frame(payload: &[u8]) -> Bytes {
        let mut out = Vec::new();
        crate::transport::rfc6455::encode(&mut out, crate::transport::rfc6455::TEXT, payload);
        Bytes::from(out)
    }

    #[test]
    fn a_frame_is_compressed_on_its_own_and_inflates_back() {
        let json = (0..60)
            .map(|i| format!(r#"{{"type":"progress","job":"build-{i}","step":{i},"of":60}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let plain = text_frame(json.as_bytes());
        let settings = Deflate {
            level: 6,
            min_bytes: 64,
            metrics: crate::metrics::Metrics::new(),
        };
        let deflated = frame(&plain, &settings);
        assert_eq!(deflated[0], 0xC1, "FIN, RSV1, text");
        assert!(
            deflated.len() * 3 < plain.len(),
            "{} of {}",
            deflated.len(),
            plain.len()
        );
        let (_, payload) = payload_of_any(&deflated);
        assert_eq!(inflate(payload, 1 << 20).as_deref(), Ok(json.as_bytes()));
        // The same publication compresses to the same bytes each time: no
        // context is carried from one message to the next.
        assert_eq!(frame(&plain, &settings), deflated);
        assert_eq!(settings.metrics.ws_compressed_frames.get(), 2);

        let short = text_frame(br#"{"type":"tick"}"#);
        assert_eq!(frame(&short, &settings), short, "under min_bytes: plain");
        assert_eq!(
            settings.metrics.ws_compressed_frames.get(),
            2,
            "not counted"
        );
    }

    fn spec(min_bytes: usize) -> ChainSpec {
        ChainSpec {
            key: 3,
            make: ChannelContext::make,
            plain: |p| text_frame(p.frame.as_bytes()),
            deflate: Deflate {
                level: 6,
                min_bytes,
                metrics: crate::metrics::Metrics::new(),
            },
            breaks: is_compressed,
        }
    }

    fn order(n: usize) -> Publication {
        let json = format!(
            r#"{{"type":"order.updated","id":"ord_{n:06}","status":"{}","items":[{{"sku":"CB-1000-ESP","name":"Espresso beans 1kg","qty":{}}},{{"sku":"FL-0100-PPR","name":"Paper filters (100)","qty":{}}}],"total":{}.{:02}}}"#,
            ["paid", "packed", "shipped"][n % 3],
            1 + n % 4,
            1 + n % 3,
            20 + n * 7 % 90,
            n * 13 % 100
        );
        Publication::new("orders", json.as_bytes())
    }

    #[test]
    fn chained_frames_inflate_in_order_with_one_window_and_are_smaller() {
        let spec = spec(64);
        let chain = (spec.make)(&spec);
        let mut inflater = Decompress::new(false);
        let (mut chained, mut alone) = (0, 0);
        let mut epochs = Vec::new();
        for n in 0..40 {
            let p = order(n);
            if n == 20 {
                chain.joined();
            }
            let link = chain.next(&p).expect("chained");
            epochs.push((link.epoch, link.seq));
            // The client's one inflater, never reset: its window holds
            // every frame before.
            let (b0, payload) = payload_of_any(&link.bytes);
            assert_eq!(b0, 0xC1, "FIN, RSV1, text");
            let mut data = payload.to_vec();
            data.extend_from_slice(&TAIL);
            let mut out = Vec::with_capacity(4096);
            inflater
                .decompress_vec(&data, &mut out, FlushDecompress::Sync)
                .expect("inflates");
            assert_eq!(out, p.frame.as_bytes(), "message {n} intact");
            chained += link.bytes.len();
            alone += frame(&text_frame(p.frame.as_bytes()), &spec.deflate).len();
        }
        assert!(chained * 2 < alone, "chained {chained} B, alone {alone} B");
        // One epoch, then, a listener having arrived after its first 16
        // messages, a new one at once: from seq 0, referring to nothing
        // before (yet the same inflater reads on).
        assert_eq!(epochs[19], (epochs[0].0, 19));
        assert_eq!(epochs[20].1, 0);
        assert_ne!(epochs[20].0, epochs[19].0);
        assert_eq!(
            epochs[39],
            (epochs[20].0, 19),
            "no new epoch without a listener"
        );
        let short = Publication::new("orders", b"{}");
        assert!(chain.next(&short).is_none(), "under min_bytes: not chained");
    }

    #[test]
    fn a_follower_takes_links_in_order_and_leaves_on_anything_else() {
        let spec = spec(64);
        let chain = (spec.make)(&spec);
        let encoder = Encoder::deflated(
            |p, d| frame(&text_frame(p.frame.as_bytes()), d),
            spec.deflate.clone(),
            Some(Follower::new(spec.clone())),
        );
        let next = |n: usize| {
            let mut p = order(n);
            p.chained.extend(chain.next(&p));
            p
        };
        let first = next(0);
        assert_eq!(
            encoder.encode(&first),
            first.chained[0].bytes,
            "joins at seq 0"
        );
        let second = next(1);
        assert_eq!(encoder.encode(&second), second.chained[0].bytes);
        let skipped = next(2);
        let _ = skipped;
        let fourth = next(3);
        let alone = encoder.encode(&fourth);
        assert_ne!(alone, fourth.chained[0].bytes, "a link was skipped");
        assert!(is_compressed(&alone), "on its own instead");
        let fifth = next(4);
        assert_ne!(
            encoder.encode(&fifth),
            fifth.chained[0].bytes,
            "not back before a new epoch"
        );
    }

    /// A compressed frame's payload (RSV1 set, which `payload_of` refuses).
    fn payload_of_any(frame: &[u8]) -> (u8, &[u8]) {
        let len = usize::from(frame[1] & 0x7f);
        match len {
            126 => (frame[0], &frame[4..]),
            127 => (frame[0], &frame[10..]),
            _ => (frame[0], &frame[2..]),
        }
    }

    #[test]
    fn inflating_stops_at_the_limit_and_refuses_what_is_not_deflate() {
        let bomb = compress(&vec![b'a'; 10 << 20], 9);
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        match inflate(&bomb, 4096) {
            Err(InflateError::TooLong(size)) => assert!(size <= 4097 * 2, "{size}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0x00, 0x12], 4096),
            Err(InflateError::Malformed)
        );
        assert_eq!(
            inflate(&compress(b"hello", 1), 5).as_deref(),
            Ok(&b"hello"[..])
        );
        assert!(matches!(
            inflate(&compress(b"hello!", 1), 5),
            Err(InflateError::TooLong(_))
        ));
    }
}
