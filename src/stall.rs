//! A write-stall timeout on a client's TCP connection.
//!
//! A client that stops reading fills its socket buffers, and the writer —
//! hyper, for a response — then waits forever. (A stream, once out of
//! hyper, bounds its own writes: `crate::link`.) On a busy channel the queue overflows and the slow
//! client is cut; on a quiet one it would keep its connection slot, its
//! queue and its kernel buffers indefinitely. Wrapped in a [`StallGuard`],
//! a write that makes no progress for the connection's timeout fails with
//! `TimedOut`, which ends the connection.
//!
//! The guard costs nothing while writes go through: its timer exists only
//! while a write is blocked.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The timeout of one connection, shared by its guard and its handlers;
/// it also tells whether everything written has been flushed.
#[derive(Clone, Debug)]
pub(crate) struct StallTimeout(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    limit_ms: AtomicU64,
    /// True when a flush of the guarded socket succeeded after the last
    /// write, and after the last [`StallTimeout::expect_flush`]: whoever
    /// writes through the guard (hyper) holds nothing back. False at first:
    /// a writer may already hold bytes it has not passed down (hyper encodes
    /// a response head into its own buffer before it writes it), and
    /// "nothing written yet" must never pass for "everything written".
    flushed: AtomicBool,
}

impl StallTimeout {
    /// A timeout of `limit`.
    pub(crate) fn new(limit: Duration) -> Self {
        Self(Arc::new(Shared {
            limit_ms: AtomicU64::new(millis(limit)),
            flushed: AtomicBool::new(false),
        }))
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.limit_ms.load(Ordering::Relaxed))
    }

    /// Whether the writer above the guard has flushed everything it wrote:
    /// a writer calls its socket's flush only once its own buffer is empty.
    pub(crate) fn flushed(&self) -> bool {
        self.0.flushed.load(Ordering::Acquire)
    }

    /// The writer above has buffered bytes the guard has not seen yet (a
    /// response head hyper just encoded): [`StallTimeout::flushed`] is false
    /// until its next successful flush, which hyper makes only once its own
    /// buffer is written out. Without this, a flush from before the head
    /// (or from a previous response on the connection) would still count,
    /// and a socket taken from hyper then would lose the head.
    pub(crate) fn expect_flush(&self) {
        self.wrote(false);
    }

    fn wrote(&self, flushed: bool) {
        self.0.flushed.store(flushed, Ordering::Release);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// See the module documentation.
pub(crate) struct StallGuard<S> {
    inner: S,
    timeout: StallTimeout,
    /// Armed when a write returned `Pending`, disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    /// Guards `inner` with `timeout`.
    pub(crate) fn new(inner: S, timeout: StallTimeout) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// The guarded socket.
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }

    /// After the inner write answered `written`: disarm on progress; on
    /// `Pending`, arm the timer (its waker is this task's, so the task is
    /// woken to fail the write when it fires).
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let limit = self.timeout.get();
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client stopped reading: no write progress for {limit:?}"),
        )))
    }
}

/// Whether a connection error is this guard's doing.
pub(crate) fn is_stall(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = e.source();
    }
    false
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if written.is_ready() {
            self.timeout.wrote(false);
        }
        self.watch(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if written.is_ready() {
            self.timeout.wrote(false);
        }
        self.watch(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.timeout.wrote(true);
        }
        self.watch(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails() {
        // A pipe whose reader never reads: 64 bytes of buffer.
        let (client, _reader) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(client, StallTimeout::new(Duration::from_millis(100)));
        guarded.write_all(&[1; 64]).await.expect("fits the buffer");
        let error = guarded.write_all(&[2; 64]).await.expect_err("stalls");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(is_stall(&error));
    }

    #[tokio::test]
    async fn flushed_only_after_a_write_and_a_flush_since_the_last_expect_flush() {
        let (client, _reader) = tokio::io::duplex(64);
        let timeout = StallTimeout::new(Duration::from_secs(5));
        let mut guarded = StallGuard::new(client, timeout.clone());
        assert!(
            !timeout.flushed(),
            "nothing written is not everything flushed"
        );
        guarded.write_all(b"head").await.expect("write");
        assert!(!timeout.flushed(), "written, not yet flushed");
        guarded.flush().await.expect("flush");
        assert!(timeout.flushed());
        // The writer above buffered more (a new head): a flush from before
        // no longer counts.
        timeout.expect_flush();
        assert!(!timeout.flushed());
        guarded.flush().await.expect("flush");
        assert!(timeout.flushed());
    }

    #[tokio::test]
    async fn progress_disarms_the_timer() {
        use tokio::io::AsyncReadExt;
        let (client, mut reader) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(client, StallTimeout::new(Duration::from_millis(500)));
        let drain = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0; 64];
            while total < 640 {
                // A slow reader: one read every 50 ms.
                tokio::time::sleep(Duration::from_millis(50)).await;
                total += reader.read(&mut buf).await.expect("read");
            }
        });
        // Each 64-byte step waits for the reader, never for 500 ms.
        guarded
            .write_all(&[0; 640])
            .await
            .expect("a slow reader is fine");
        drain.await.expect("reader");
    }
}
