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
//! Nothing here allocates while a connection is idle: the write buffer
//! shrinks back after a burst, and a read buffer exists only while a
//! client's frame is incomplete.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// A write buffer grown past this by a burst is freed once written.
const KEEP_WRITE_BUFFER: usize = 4 * 1024;
/// What one read takes from the socket at most.
const READ_CHUNK: usize = 4 * 1024;

/// Why a connection's socket can no longer be used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Broken {
    /// The client closed it, or it failed.
    Gone,
    /// The client stopped reading: no write progress for the stall limit.
    Stalled,
}

/// See the module documentation.
pub(crate) struct Link {
    /// The socket's read side.
    pub(crate) socket: Socket,
    /// Bytes for the next [`Link::flush`].
    pub(crate) out: Vec<u8>,
    /// How long a write may make no progress.
    stall: Duration,
    /// `crier_slow_client_disconnects_total`.
    slow: IntCounter,
}

impl Link {
    /// The socket of a stream whose writes may stall for `stall`.
    pub(crate) fn new(stream: TcpStream, stall: Duration, slow: IntCounter) -> Self {
        Self {
            socket: Socket(stream),
            out: Vec::new(),
            stall,
            slow,
        }
    }

    /// Writes everything in [`Link::out`], in as few calls as the socket
    /// allows (one, unless its buffer is full). A client that takes
    /// nothing for the stall limit is counted as slow and cut off.
    pub(crate) async fn flush(&mut self) -> Result<(), Broken> {
        self.flush_from(0).await
    }

    /// [`Link::flush`], leaving out the first `start` bytes of the buffer
    /// (room a writer kept for a header it turned out not to need whole).
    pub(crate) async fn flush_from(&mut self, start: usize) -> Result<(), Broken> {
        let mut written = start;
        while written < self.out.len() {
            match self.socket.0.try_write(&self.out[written..]) {
                Ok(0) => return Err(Broken::Gone),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A timer only while the socket is full.
                    match tokio::time::timeout(self.stall, self.socket.0.writable()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Err(Broken::Gone),
                        Err(_) => {
                            self.slow.inc();
                            tracing::info!("client stopped reading: connection closed");
                            return Err(Broken::Stalled);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Broken::Gone),
            }
        }
        if self.out.capacity() > KEEP_WRITE_BUFFER {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Ok(())
    }

    /// Ends our side of the connection after what was written (a FIN, so
    /// the client reads everything before it sees the end).
    pub(crate) fn finish(self) {
        let std = self.socket.0.into_std();
        if let Ok(std) = std {
            let _ = std.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// A stream's socket, for reading: shared while the writer fills
/// [`Link::out`].
pub(crate) struct Socket(TcpStream);

impl Socket {
    /// Appends what the client sent to `buf` (what fits its spare room,
    /// at least `READ_CHUNK` bytes), waiting until there is something. `Ok(0)`: the client closed its
    /// side. Cancel-safe: nothing is read unless it is appended.
    pub(crate) async fn read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            self.0.readable().await?;
            buf.reserve(READ_CHUNK);
            match self.0.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A false alarm: keep no room reserved while idle.
                    if buf.is_empty() {
                        *buf = Vec::new();
                    }
                }
                other => return other,
            }
        }
    }

    /// Resolves when the client closes its side (or the socket fails).
    /// Anything it sends meanwhile is read and dropped: for streams whose
    /// clients only listen. Cancel-safe.
    pub(crate) async fn closed(&self) {
        let mut sink = [0u8; 256];
        loop {
            if self.0.readable().await.is_err() {
                return;
            }
            match self.0.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
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
