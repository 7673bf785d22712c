//! A connection's queue: bounded, filled by the hub without waiting, read
//! by the connection's task. A queue that overflows marks its connection
//! slow, and the connection closes: one client that stopped reading never
//! holds up the others, nor grows without bound.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Sink;
use crate::protocol::Publication;

/// Unique id of a client connection within this process.
pub(crate) type ConnId = u64;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// What the connection reads: its queue, and the signal that it fell behind.
pub(super) struct Inbox {
    /// Publications for this connection, in order.
    pub(super) rx: mpsc::Receiver<Arc<Publication>>,
    /// Cancelled when the queue overflowed: the connection must close.
    pub(super) slow: CancellationToken,
}

/// The hub's end of one connection's queue.
struct Outbox {
    tx: mpsc::Sender<Arc<Publication>>,
    fired: AtomicBool,
    slow: CancellationToken,
    /// `crier_slow_client_disconnects_total`, counted once per connection
    /// when its queue overflows (the connection may never be polled again:
    /// SSE cuts the TCP connection at once).
    counter: IntCounter,
}

impl Sink for Outbox {
    fn offer(&self, publication: &Arc<Publication>) -> bool {
        match self.tx.try_send(Arc::clone(publication)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.fired.swap(true, Ordering::AcqRel) {
                    self.counter.inc();
                    self.slow.cancel();
                }
                false
            }
            // The connection is closing; its subscriptions go with it.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A fresh queue of `capacity` for a new connection, and its id. `on_slow`
/// is cancelled when the queue overflows; SSE passes its TCP connection's
/// kill token here, so a client that stopped reading is cut off even while
/// hyper is stuck writing to it.
pub(super) fn queue(
    capacity: usize,
    on_slow: CancellationToken,
    counter: IntCounter,
) -> (ConnId, Arc<dyn Sink>, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    let outbox = Outbox {
        tx,
        fired: AtomicBool::new(false),
        slow: on_slow.clone(),
        counter,
    };
    let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    (id, Arc::new(outbox), Inbox { rx, slow: on_slow })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overflow_marks_the_connection_slow_once() {
        let counter = IntCounter::new("slow", "test").expect("counter");
        let (a, sink, mut inbox) = queue(2, CancellationToken::new(), counter.clone());
        let (b, _, _) = queue(2, CancellationToken::new(), counter.clone());
        assert_ne!(a, b, "ids are unique");
        let taken: Vec<_> = (0..4)
            .map(|i| sink.offer(&Arc::new(Publication::new("c", format!("{i}").as_bytes()))))
            .collect();
        assert_eq!(taken, [true, true, false, false]);
        assert!(inbox.slow.is_cancelled());
        assert_eq!(counter.get(), 1, "counted once per connection");
        let first = inbox.rx.recv().await.expect("queued");
        assert!(first.frame.as_str().ends_with("\"data\":0}"));
    }
}
