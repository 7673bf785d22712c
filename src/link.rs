//! A long-lived stream's socket, once HTTP is done with it.
//!
//! hyper serves every request, but a stream (an SSE response that never
//! ends, a WebSocket after its upgrade) would keep hyper's per-connection
//! machinery alive for hours: its read and write buffers, its dispatcher
//! and a body adapter polled for every event. So a stream leaves hyper as
//! soon as its response head is on the wire, and from then on its task
//! writes to the bare socket itself:
//!
//! - [`Handoff`] takes an SSE connection out of hyper once the head is
//!   flushed (the WebSocket upgrade hands its socket back by itself);
//! - [`Link`] is the socket with one write buffer: a wake-up appends
//!   everything that is ready and writes it with one call, and a write that
//!   makes no progress for the stall limit ends the connection.
//!
//! Publications are not copied into the write buffer: a wake-up queues
//! their shared bytes (the encoding made once per publication, held by
//! reference) and writes them with the buffer's own small bytes in one
//! vectored call. A client that stops reading then holds references to
//! bytes every other client shares, not a private copy of its backlog
//! (issue 20: 400 stalled clients held about 1 MiB each).
//!
//! Nothing here is held while a connection is idle: the write buffer is
//! freed once written, a read buffer exists only while a client's frame
//! is incomplete, and the timer of a full socket only while it is full.

use std::future::poll_fn;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// What a write buffer starts with when a wake-up first writes to it:
/// room for a batch of small events without growing it step by step.
const WRITE_BUFFER: usize = 512;
/// What one read takes from the socket at most.
const READ_CHUNK: usize = 4 * 1024;
/// Shared bytes up to this size are copied into the write buffer: for so
/// few, a slice of their own in the vectored write costs more than a copy.
const COPY_BELOW: usize = 256;
/// Slices per vectored write (well under the kernel's `IOV_MAX`).
const MAX_SLICES: usize = 64;

/// The connection is gone, or must be treated as gone (the client closed
/// it, it failed, or the client stopped reading): stop at once.
#[derive(Debug, PartialEq, Eq)]
pub struct Gone;

/// See the module documentation.
pub(crate) struct Link {
    /// The socket's read side.
    pub(crate) socket: Socket,
    /// Bytes for the next [`Link::flush`].
    pub(crate) out: Out,
    /// How long a write may make no progress.
    /// In milliseconds: a word shared with nothing else in every idle
    /// connection's task is a word too many.
    stall_ms: u32,
    /// `crier_slow_client_disconnects_total`.
    slow: IntCounter,
    /// The timer of a write that makes no progress, while the socket is
    /// full.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Link {
    /// The socket of a stream whose writes may stall for `stall`.
    pub(crate) fn new(stream: TcpStream, stall: Duration, slow: IntCounter) -> Self {
        Self {
            socket: Socket(Arc::new(Outlet::new(stream))),
            out: Out::default(),
            stall_ms: u32::try_from(stall.as_millis()).unwrap_or(u32::MAX),
            slow,
            stalled: None,
        }
    }

    /// The socket's write side, for direct writes by the hub.
    pub(crate) fn outlet(&self) -> Arc<Outlet> {
        Arc::clone(&self.socket.0)
    }

    /// Writes everything in [`Link::out`], in as few calls as the socket
    /// allows (one, unless its buffer is full). A client that takes
    /// nothing for the stall limit is counted as slow and cut off.
    pub(crate) async fn flush(&mut self) -> Result<(), Gone> {
        self.flush_from(0).await
    }

    /// [`Link::flush`], leaving out the first `start` bytes of the buffer
    /// (room a writer kept for a header it turned out not to need whole).
    /// Direct writes stop first, and what one of them left unwritten goes
    /// out before the buffer.
    pub(crate) async fn flush_from(&mut self, start: usize) -> Result<(), Gone> {
        let unwritten = self.socket.0.close().await;
        let written = match unwritten {
            Some(rest) => {
                let mut at = 0;
                let rest = [(0, rest)];
                poll_fn(|cx| self.poll_write(cx, &[], &rest, &mut at)).await
            }
            None => Ok(()),
        };
        let written = match written {
            Ok(()) => {
                let mut at = start;
                match std::mem::take(&mut self.out).0 {
                    Some(out) => {
                        poll_fn(|cx| self.poll_write(cx, &out.own, &out.shared, &mut at)).await
                    }
                    None => Ok(()),
                }
            }
            Err(gone) => Err(gone),
        };
        self.out.clear();
        self.stalled = None;
        written
    }

    /// [`Link::flush_from`] without waiting, when it need not wait: no
    /// direct write is in progress or left bytes behind, and the socket
    /// takes everything now. `Ok(None)`: written; `Ok(Some(at))`: the byte
    /// `flush_from` goes on from (the socket is full, or a direct write is
    /// in the way). Direct writes stop first, as in `flush_from`.
    ///
    /// Why: the future of a flush that waits is the largest thing a
    /// stream's task would otherwise reserve room for, in every idle
    /// connection. With this, the caller awaits (and boxes) a flush only
    /// when the socket is full, which a client that keeps up rarely makes
    /// it.
    pub(crate) fn flush_now(&mut self, start: usize) -> Result<Option<usize>, Gone> {
        if self.socket.0.hold_idle() {
            return Ok(Some(start));
        }
        let mut at = start;
        let done = match self.out.0.as_deref() {
            None => Ok(true),
            Some(out) => self.write_ready(&out.own, &out.shared, &mut at),
        };
        match done {
            Ok(false) => Ok(Some(at)),
            Ok(true) => {
                self.out.clear();
                self.stalled = None;
                Ok(None)
            }
            Err(gone) => {
                self.out.clear();
                Err(gone)
            }
        }
    }

    /// Writes `own` with `shared` in their places (see [`Out`]) from byte
    /// `at` on, moving `at` as it goes.
    ///
    /// A poll, not an `async fn`: the future an idle connection's task
    /// carries is sized by its largest await, and this is every
    /// connection's. The slices are made afresh for each write
    /// ([`Link::write_now`]), and the timer of a full socket is boxed and
    /// exists only while it is full; any progress starts it again.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        own: &[u8],
        shared: &[(usize, Bytes)],
        at: &mut usize,
    ) -> Poll<Result<(), Gone>> {
        let mut progressed = false;
        loop {
            let before = *at;
            if self.write_ready(own, shared, at)? {
                return Poll::Ready(Ok(()));
            }
            progressed |= *at > before;
            match self.socket.0.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Gone)),
                Poll::Pending => {}
            }
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(self.stall_ms.into());
            let timer = self
                .stalled
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if progressed {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                self.slow.inc();
                tracing::info!("client stopped reading: connection closed");
                return Poll::Ready(Err(Gone));
            }
            return Poll::Pending;
        }
    }

    /// Writes from byte `at` on as long as the socket takes it, moving
    /// `at`; `true` once everything is written, `false` when the socket is
    /// full first.
    fn write_ready(
        &self,
        own: &[u8],
        shared: &[(usize, Bytes)],
        at: &mut usize,
    ) -> Result<bool, Gone> {
        let total = bytes_in(own, shared);
        while *at < total {
            if !self.write_now(own, shared, at)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One vectored write from byte `written` on; `false` when the socket
    /// is full.
    fn write_now(
        &self,
        own: &[u8],
        shared: &[(usize, Bytes)],
        written: &mut usize,
    ) -> Result<bool, Gone> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let n = slices_from(own, shared, *written, &mut slices);
        match self.socket.0.stream.try_write_vectored(&slices[..n]) {
            Ok(0) => Err(Gone),
            Ok(n) => {
                *written += n;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(_) => Err(Gone),
        }
    }

    /// Ends our side of the connection after what was written (a FIN, so
    /// the client reads everything before it sees the end).
    pub(crate) fn finish(self) {
        self.socket.0.hold();
        let socket = socket2::SockRef::from(&self.socket.0.stream);
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
}

/// What a connection's next flush writes: its own bytes (frame heads,
/// replies, control frames), and publications' shared bytes in between,
/// held by reference. Both lists live out of line, and only between the
/// first byte a wake-up buffers and the flush: an idle connection carries
/// one empty word for them.
#[derive(Default)]
pub(crate) struct Out(Option<Box<Bufs>>);

#[derive(Default)]
struct Bufs {
    own: Vec<u8>,
    /// Each shared piece with where it goes: after the first `at` bytes
    /// of `own` (and the shared pieces before it).
    shared: Vec<(usize, Bytes)>,
}

impl Out {
    fn bufs(&mut self) -> &mut Bufs {
        self.0.get_or_insert_with(|| {
            Box::new(Bufs {
                own: Vec::with_capacity(WRITE_BUFFER),
                shared: Vec::new(),
            })
        })
    }

    /// Appends a copy of `bytes`.
    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.own().extend_from_slice(bytes);
    }

    /// Appends `bytes` by reference (a small one is copied): a
    /// publication's encoding, shared with every recipient.
    pub(crate) fn push(&mut self, bytes: Bytes) {
        let bufs = self.bufs();
        if bytes.len() < COPY_BELOW {
            bufs.own.extend_from_slice(&bytes);
        } else {
            bufs.shared.push((bufs.own.len(), bytes));
        }
    }

    /// The connection's own bytes, to append to (or to fill room kept in).
    pub(crate) fn own(&mut self) -> &mut Vec<u8> {
        &mut self.bufs().own
    }

    /// How many bytes the next flush writes.
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |b| bytes_in(&b.own, &b.shared))
    }

    /// Empties it and frees its buffers: a connection holds no write
    /// buffer between wake-ups (an allocation per wake-up costs far less
    /// than its write, and most connections are idle most of the time).
    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}

/// How many bytes `own` and `shared` make together (see [`Out`]).
fn bytes_in(own: &[u8], shared: &[(usize, Bytes)]) -> usize {
    own.len() + shared.iter().map(|(_, b)| b.len()).sum::<usize>()
}

/// Fills `slices` with `own` and `shared` in order (see [`Out`])
/// from byte `from` on; returns how many it filled.
fn slices_from<'a>(
    own: &'a [u8],
    shared: &'a [(usize, Bytes)],
    from: usize,
    slices: &mut [IoSlice<'a>],
) -> usize {
    let mut fill = Fill {
        slices,
        n: 0,
        skip: from,
    };
    let mut mine = 0;
    for (at, bytes) in shared {
        if !fill.add(&own[mine..*at]) || !fill.add(bytes) {
            return fill.n;
        }
        mine = *at;
    }
    fill.add(&own[mine..]);
    fill.n
}

/// [`slices_from`]'s cursor.
struct Fill<'s, 'a> {
    slices: &'s mut [IoSlice<'a>],
    n: usize,
    /// Bytes still to leave out (already written).
    skip: usize,
}

impl<'a> Fill<'_, 'a> {
    /// Adds what of `piece` is not left out; false once the slices are full.
    fn add(&mut self, piece: &'a [u8]) -> bool {
        if self.skip >= piece.len() {
            self.skip -= piece.len();
            return true;
        }
        if self.n == self.slices.len() {
            return false;
        }
        self.slices[self.n] = IoSlice::new(&piece[self.skip..]);
        self.skip = 0;
        self.n += 1;
        true
    }
}

/// The socket, shared by the connection's task and the hub's direct
/// writes.
///
/// While the connection's task waits for mail with nothing to write, the
/// outlet is *open*: the hub writes a publication straight to the socket
/// (one `write`, no queue, no wake-up), as long as the socket takes all of
/// it. Anything else closes it: the task closes it before every write of
/// its own ([`Link::flush`]), a subscribe closes it (so nothing of a new
/// channel comes before its `subscribed`), and a direct write the socket
/// took only part of closes it and leaves the rest for the task, which
/// writes it before anything else. So bytes never interleave and order is
/// kept.
///
/// The states, in [`Outlet::state`]: closed (0), [`OPEN`], and
/// `OPEN | WRITING` or `WRITING` while a direct write is on the socket
/// (`WRITING` alone: closed meanwhile, the write still ends). Only the task
/// opens, and only with nothing of its own to write; only one writer at a
/// time gets from `OPEN` to `OPEN | WRITING`; the task's own writes wait
/// until `WRITING` is gone, parked (the writer wakes it), not spinning.
pub(crate) struct Outlet {
    stream: TcpStream,
    /// [`OPEN`] and [`WRITING`]: no lock is held across a direct write, so
    /// a hub thread preempted mid-write stalls no other thread.
    state: AtomicU8,
    /// What a direct write hands the task; touched only around a write,
    /// never across one.
    rest: Mutex<Rest>,
}

/// What a direct write hands over to the connection's task.
#[derive(Default)]
struct Rest {
    /// The rest of a direct write the socket did not take whole (a slice
    /// of the shared bytes, not a copy).
    unwritten: Option<Bytes>,
    /// The task, waiting in [`Outlet::close`] for a direct write to end.
    closer: Option<Waker>,
}

/// Direct writes may start.
const OPEN: u8 = 1;
/// A direct write is in progress.
const WRITING: u8 = 2;

/// What became of a direct write.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Direct {
    /// On the wire.
    Written,
    /// Partly written, the rest kept for the task: wake it.
    Left,
    /// The outlet is closed: queue it.
    Refused,
}

impl Outlet {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            state: AtomicU8::new(0),
            rest: Mutex::new(Rest::default()),
        }
    }

    fn rest(&self) -> std::sync::MutexGuard<'_, Rest> {
        self.rest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `bytes` if the outlet is open; never waits.
    pub(crate) fn try_direct(&self, bytes: &Bytes) -> Direct {
        if self
            .state
            .compare_exchange(OPEN, OPEN | WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Direct::Refused;
        }
        let written = match self.stream.try_write(bytes) {
            Ok(n) if n == bytes.len() => {
                let before = self.state.fetch_and(!WRITING, Ordering::AcqRel);
                if before & OPEN == 0 {
                    // Closed while writing: the task may be waiting.
                    self.wake_closer(&mut self.rest());
                }
                return Direct::Written;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // Broken: the task finds out on its own next write or read.
            Err(_) => {
                let mut rest = self.rest();
                self.state.store(0, Ordering::Release);
                self.wake_closer(&mut rest);
                return Direct::Refused;
            }
        };
        // Closed until the task has written the rest, before all else
        // (with the lock held, so an `open` cannot slip in between).
        let mut rest = self.rest();
        rest.unwritten = Some(bytes.slice(written..));
        self.state.store(0, Ordering::Release);
        self.wake_closer(&mut rest);
        Direct::Left
    }

    /// A direct write ended after the outlet was closed: the task waiting
    /// in [`Outlet::close`], if any, may go on.
    fn wake_closer(&self, rest: &mut Rest) {
        if let Some(closer) = rest.closer.take() {
            closer.wake();
        }
    }

    /// The task waits for mail with nothing to write: direct writes may go.
    pub(crate) fn open(&self) {
        let rest = self.rest();
        if rest.unwritten.is_none() {
            self.state.fetch_or(OPEN, Ordering::AcqRel);
        }
    }

    /// No new direct write starts until the next [`Outlet::open`].
    pub(crate) fn hold(&self) {
        self.state.fetch_and(!OPEN, Ordering::AcqRel);
    }

    /// Stops direct writes, as [`Outlet::hold`]; `true` when one is still
    /// in progress or left bytes for the task (the caller must then go
    /// through [`Outlet::close`]).
    fn hold_idle(&self) -> bool {
        // The state before: a write that began before this saw `OPEN`
        // and set `WRITING`; one that ended before it stored its rest
        // under the lock first.
        let before = self.state.fetch_and(!OPEN, Ordering::AcqRel);
        before & WRITING != 0 || self.rest().unwritten.is_some()
    }

    /// Whether a direct write left bytes for the task.
    pub(crate) fn has_unwritten(&self) -> bool {
        self.rest().unwritten.is_some()
    }

    /// Stops direct writes, waits for one in progress to end (parked: the
    /// writer wakes the task), and takes what they left unwritten.
    async fn close(&self) -> Option<Bytes> {
        self.hold();
        poll_fn(|cx| {
            let mut rest = self.rest();
            // Read under the lock the writer takes to wake us once it is
            // done: either it sees our waker, or we see it done.
            if self.state.load(Ordering::Acquire) & WRITING != 0 {
                if !rest
                    .closer
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    rest.closer = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            rest.closer = None;
            Poll::Ready(rest.unwritten.take())
        })
        .await
    }
}

/// A stream's socket, for reading: shared while the writer fills
/// [`Link::out`].
pub(crate) struct Socket(Arc<Outlet>);

impl Socket {
    /// Appends what the client sent to `buf` (what fits its spare room,
    /// at least `READ_CHUNK` bytes), waiting until there is something.
    /// `Ok(0)`: the client closed its side. Cancel-safe: nothing is read
    /// unless it is appended.
    pub(crate) async fn read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        poll_fn(|cx| self.poll_read(cx, buf)).await
    }

    /// [`Socket::read`] as a poll. Readiness is registered in the socket's
    /// one reader slot, so a task that polls it on every wake-up pays no
    /// registration per poll (a `readable()` future would join and leave a
    /// waiter list each time).
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.stream.poll_read_ready(cx))?;
            buf.reserve(READ_CHUNK);
            match self.0.stream.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A false alarm: keep no room reserved while idle.
                    if buf.is_empty() {
                        *buf = Vec::new();
                    }
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// Ready when the client closes its side (or the socket fails).
    /// Anything it sends meanwhile is read and dropped: for streams whose
    /// clients only listen. What it drops goes through a buffer on the
    /// stack, so a waiting stream holds none.
    pub(crate) fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut dropped = [0u8; 512];
        loop {
            if ready!(self.0.stream.poll_read_ready(cx)).is_err() {
                return Poll::Ready(());
            }
            match self.0.stream.try_read(&mut dropped) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }
}

/// What takes a connection over once hyper has written its response head.
pub(crate) type Takeover = Box<dyn FnOnce(TcpStream) + Send>;

/// One connection's handoff point: a handler that answers with a stream
/// leaves its [`Takeover`] here and returns a response whose body only
/// signals (see [`Handoff::signal`]); the connection's task, woken, waits
/// until hyper has flushed the head, takes the socket back from hyper and
/// passes it on.
#[derive(Default)]
pub(crate) struct Handoff {
    takeover: Mutex<Option<Takeover>>,
    ready: Notify,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoff")
    }
}

impl Handoff {
    /// Leaves the takeover for the connection's task.
    pub(crate) fn offer(&self, takeover: Takeover) {
        if let Ok(mut slot) = self.takeover.lock() {
            *slot = Some(takeover);
        }
    }

    /// Called by the response body when hyper first asks for data, that
    /// is, once the head is encoded: the connection's task takes over.
    pub(crate) fn signal(&self) {
        self.ready.notify_one();
    }

    /// Resolves once [`Handoff::signal`] was called.
    pub(crate) async fn signalled(&self) {
        self.ready.notified().await;
    }

    /// The takeover left by the handler, if any.
    pub(crate) fn take(&self) -> Option<Takeover> {
        self.takeover.lock().ok()?.take()
    }
}

/// The response body of a stream that leaves hyper: never yields a frame,
/// only tells the connection's task that the head is out.
pub(crate) struct HandoffBody(pub(crate) Arc<Handoff>);

impl hyper::body::Body for HandoffBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0.signal();
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected pair on loopback: crier's end as a [`Link`], and the
    /// client's end with a small receive buffer.
    async fn pair() -> (Link, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let client = socket
            .connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let counter = IntCounter::new("slow", "test").expect("counter");
        (Link::new(server, Duration::from_secs(5), counter), client)
    }

    #[tokio::test]
    async fn shared_pieces_go_out_in_place_among_the_own_bytes() {
        let (mut link, mut client) = pair().await;
        let big = |c: u8| Bytes::from(vec![c; 100_000]);
        let mut sent = Vec::new();
        // Room a writer kept and did not need, left out by `flush_from`.
        link.out.extend_from_slice(b"skip");
        for n in 0..100u8 {
            let own = format!("<{n}>");
            link.out.extend_from_slice(own.as_bytes());
            sent.extend_from_slice(own.as_bytes());
            let piece = if n % 10 == 0 {
                big(n)
            } else {
                Bytes::from(vec![n; 300])
            };
            sent.extend_from_slice(&piece);
            link.out.push(piece);
        }
        link.out.push(Bytes::from_static(b"small, copied"));
        link.out.extend_from_slice(b"end");
        sent.extend_from_slice(b"small, copiedend");
        assert_eq!(link.out.len(), sent.len() + 4);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; sent.len()];
            client.read_exact(&mut got).await.expect("read");
            (got, sent)
        });
        // More than 64 slices, and more than the socket takes at once.
        link.flush_from(4).await.expect("flushed");
        let (got, sent) = reader.await.expect("reader");
        assert!(got == sent, "every byte once, in order");
        assert_eq!(link.out.len(), 0);
    }

    #[tokio::test]
    async fn direct_writes_go_only_while_open_and_never_overtake_what_a_partial_one_left() {
        let (mut link, mut client) = pair().await;
        let outlet = link.outlet();
        assert_eq!(
            outlet.try_direct(&Bytes::from_static(b"x")),
            Direct::Refused,
            "closed at first"
        );
        outlet.open();
        assert_eq!(
            outlet.try_direct(&Bytes::from_static(b"[0]")),
            Direct::Written
        );
        outlet.hold();
        assert_eq!(
            outlet.try_direct(&Bytes::from_static(b"[x]")),
            Direct::Refused,
            "held"
        );

        // Numbered blocks until the socket takes only part of one.
        outlet.open();
        let mut sent = b"[0]".to_vec();
        let mut n = 1;
        loop {
            let block = format!("[{n}{}]", "-".repeat(1000));
            match outlet.try_direct(&Bytes::from(block.clone())) {
                Direct::Written => sent.extend_from_slice(block.as_bytes()),
                Direct::Left => {
                    sent.extend_from_slice(block.as_bytes());
                    break;
                }
                Direct::Refused => panic!("refused while open"),
            }
            n += 1;
        }
        assert!(outlet.has_unwritten());
        outlet.open();
        assert_eq!(
            outlet.try_direct(&Bytes::from_static(b"[late]")),
            Direct::Refused,
            "closed until the rest is out"
        );

        // The task's own write goes after the rest of the partial one.
        link.out.extend_from_slice(b"[task]");
        sent.extend_from_slice(b"[task]");
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; sent.len()];
            client.read_exact(&mut got).await.expect("read");
            (got, sent)
        });
        link.flush().await.expect("flushed");
        let (got, sent) = reader.await.expect("reader");
        assert!(got == sent, "bytes in order, none interleaved");
        assert!(!outlet.has_unwritten());
        outlet.open();
        assert_eq!(
            outlet.try_direct(&Bytes::from_static(b"[again]")),
            Direct::Written
        );
    }
}
