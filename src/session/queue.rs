//! A connection's mailbox: its bounded queue of publications, filled by
//! the hub without waiting, and the flags the clock raises (heartbeat,
//! drain). The connection's task takes everything queued with one lock per
//! wake-up. A queue that overflows marks its connection slow, and the
//! connection closes: one client that stopped reading never holds up the
//! others, nor grows without bound.
//!
//! Lighter than a channel plus a cancellation token plus a timer: one
//! allocation per connection, no semaphore, and nothing registered per
//! delivery besides the task's waker.
//!
//! Lighter still when the connection's task is parked with nothing to
//! write: a publication without a history id then goes straight to the
//! socket through the connection's [`Outlet`] (when the hub allows it, see
//! [`crate::hub`]), with no queue and no wake-up. Taking anything from the
//! queue closes the outlet again, under the same lock, so a direct write
//! never overtakes a queued one. A publication that excludes this
//! connection (a Pusher sender's own event) is not taken at all.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use prometheus::IntCounter;

use crate::hub::Sink;
use crate::lifecycle::{Bell, Signal};
use crate::link::{Direct, Outlet};
use crate::protocol::{Encoder, Kind, Publication, SocketId};

/// Unique id of a client connection within this process.
pub(crate) type ConnId = u64;

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh id for a new connection.
pub(super) fn next_id() -> ConnId {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

/// What the connection's task learns from its mailbox, most urgent first.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Mail {
    /// The queue overflowed: close.
    Slow,
    /// The drain began.
    Drain,
    /// Publications were moved into the caller's batch.
    Publications,
    /// The heartbeat period went by.
    Heartbeat,
    /// A direct write left bytes: the task must write them.
    Unwritten,
}

/// Where direct writes go, once the connection has its socket.
struct Straight {
    outlet: Arc<Outlet>,
    /// The publication as this connection's wire protocol writes it.
    encoder: Encoder,
    /// `crier_messages_delivered_total` for this transport.
    delivered: IntCounter,
}

/// See the module documentation.
pub(super) struct Mailbox {
    state: Mutex<State>,
    /// Set once the wire protocol has the socket; read without the lock.
    straight: OnceLock<Straight>,
    /// Set once, with the state's lock held; read without it.
    slow: AtomicBool,
    capacity: usize,
    /// `crier_slow_client_disconnects_total`, counted once per connection.
    counter: IntCounter,
    /// The connection, fleet-wide: publications excluding it (a Pusher
    /// sender's own event) are not taken.
    me: Option<SocketId>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Arc<Publication>>,
    /// The connection's task, when it waits for mail.
    waker: Option<Waker>,
    drain: bool,
    heartbeat: bool,
}

impl Mailbox {
    /// A mailbox holding up to `capacity` publications.
    pub(super) fn new(capacity: usize, counter: IntCounter, me: Option<SocketId>) -> Self {
        Self {
            me,
            state: Mutex::new(State::default()),
            straight: OnceLock::new(),
            slow: AtomicBool::new(false),
            capacity,
            counter,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, publications may be written straight to `outlet`,
    /// as `encoder` makes them.
    pub(super) fn attach(&self, outlet: Arc<Outlet>, encoder: Encoder, delivered: IntCounter) {
        let _ = self.straight.set(Straight {
            outlet,
            encoder,
            delivered,
        });
    }

    /// Stops direct writes until the task parks again.
    pub(super) fn hold(&self) {
        if let Some(straight) = self.straight.get() {
            straight.outlet.hold();
        }
    }

    /// Whether the queue overflowed.
    pub(super) fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Acquire)
    }

    /// The next mail; publications are appended to `batch` (all queued,
    /// with one lock). Pending registers the task's waker and opens the
    /// outlet: the task asks only once it has delivered everything it held.
    pub(super) fn poll_next(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<Arc<Publication>>,
    ) -> Poll<Mail> {
        if self.is_slow() {
            return Poll::Ready(Mail::Slow);
        }
        let mut state = self.state();
        if std::mem::take(&mut state.drain) {
            return Poll::Ready(Mail::Drain);
        }
        if !state.queue.is_empty() {
            self.take_all(&mut state, batch);
            return Poll::Ready(Mail::Publications);
        }
        let straight = self.straight.get();
        if straight.is_some_and(|s| s.outlet.has_unwritten()) {
            return Poll::Ready(Mail::Unwritten);
        }
        if std::mem::take(&mut state.heartbeat) {
            return Poll::Ready(Mail::Heartbeat);
        }
        state.park(cx);
        if let Some(straight) = straight {
            straight.outlet.open();
        }
        Poll::Pending
    }

    /// Moves the queue to `batch`, and stops direct writes: they would
    /// overtake what the task now holds.
    fn take_all(&self, state: &mut State, batch: &mut VecDeque<Arc<Publication>>) {
        if state.queue.is_empty() {
            return;
        }
        take_all(&mut state.queue, batch);
        self.hold();
    }

    /// Appends whatever is queued to `batch`, without waiting.
    pub(super) fn take(&self, batch: &mut VecDeque<Arc<Publication>>) {
        if self.is_slow() {
            return;
        }
        let mut state = self.state();
        self.take_all(&mut state, batch);
    }

    /// Ready once the queue overflowed: for a writer blocked on a client
    /// that stopped reading.
    pub(super) fn poll_slow(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_slow() {
            return Poll::Ready(());
        }
        let mut state = self.state();
        if self.is_slow() {
            return Poll::Ready(());
        }
        state.park(cx);
        Poll::Pending
    }

    /// Sets what `set` sets and wakes the task.
    fn notify(&self, set: impl FnOnce(&mut State)) {
        let waker = {
            let mut state = self.state();
            set(&mut state);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl State {
    /// Registers the task to wake (cloning its waker only when it changed).
    fn park(&mut self, cx: &Context<'_>) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
    }
}

/// Moves every queued publication to the end of `batch`: by swapping the
/// two when the batch is empty (no copy), else one by one.
fn take_all(queue: &mut VecDeque<Arc<Publication>>, batch: &mut VecDeque<Arc<Publication>>) {
    if batch.is_empty() {
        std::mem::swap(queue, batch);
    } else {
        batch.extend(queue.drain(..));
    }
}

impl Sink for Mailbox {
    fn chain(&self) -> Option<crate::protocol::ChainSpec> {
        self.straight.get()?.encoder.chain().cloned()
    }

    fn offer(&self, publication: &Arc<Publication>, direct: bool) -> bool {
        let excluded = self.me.is_some_and(|me| publication.exclude == Some(me));
        if self.is_slow() || excluded {
            return false;
        }
        // A termination is the task's to act on: it always queues.
        let direct = direct && publication.kind != Kind::Terminate;
        if let (true, None, Some(s)) = (direct, publication.id, self.straight.get()) {
            // Straight to the socket only behind nothing queued. The write
            // holds no lock of the mailbox: a hub thread preempted mid-write
            // must not stall the connection's task, nor other writers.
            if self.state().queue.is_empty() {
                let written = s.outlet.try_direct(&s.encoder.encode(publication));
                if written != Direct::Refused && publication.kind == Kind::Message {
                    s.delivered.inc();
                }
                match written {
                    Direct::Written => return true,
                    Direct::Left => {
                        self.notify(|_| {});
                        return true;
                    }
                    Direct::Refused => {}
                }
            }
        }
        let mut taken = false;
        self.notify(|state| {
            if state.queue.len() < self.capacity {
                state.queue.push_back(Arc::clone(publication));
                taken = true;
            } else {
                // Once: the flag is only set under the lock.
                if !self.slow.swap(true, Ordering::AcqRel) {
                    self.counter.inc();
                }
                state.queue = VecDeque::new();
            }
        });
        taken
    }
}

impl Bell for Mailbox {
    fn ring(&self, signal: Signal) {
        self.notify(|state| match signal {
            Signal::Drain => state.drain = true,
            Signal::Heartbeat => state.heartbeat = true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::future::poll_fn;

    fn publication(i: usize) -> Arc<Publication> {
        Arc::new(Publication::new("c", format!("{i}").as_bytes()))
    }

    async fn next(mailbox: &Mailbox, batch: &mut VecDeque<Arc<Publication>>) -> Mail {
        poll_fn(|cx| mailbox.poll_next(cx, batch)).await
    }

    #[tokio::test]
    async fn an_overflow_marks_the_connection_slow_once() {
        let counter = IntCounter::new("slow", "test").expect("counter");
        let mailbox = Mailbox::new(2, counter.clone(), None);
        assert_ne!(next_id(), next_id(), "ids are unique");
        let taken: Vec<_> = (0..4)
            .map(|i| mailbox.offer(&publication(i), true))
            .collect();
        assert_eq!(taken, [true, true, false, false]);
        assert!(mailbox.is_slow());
        assert_eq!(counter.get(), 1, "counted once per connection");
        let mut batch = VecDeque::new();
        assert_eq!(next(&mailbox, &mut batch).await, Mail::Slow);
        assert!(batch.is_empty(), "a slow connection delivers nothing more");
    }

    #[test]
    fn a_publication_excluding_the_connection_is_not_taken() {
        let counter = IntCounter::new("slow", "test").expect("counter");
        let me = SocketId {
            instance: 7,
            conn: 1,
        };
        let mailbox = Mailbox::new(8, counter, Some(me));
        let from = |socket: SocketId| {
            let payload = crate::protocol::envelope("client-x", Some(socket), None, r#"{"n":1}"#);
            Arc::new(Publication::new("private-c", &payload))
        };
        assert!(!mailbox.offer(&from(me), true), "its own event");
        assert!(
            mailbox.offer(&from(SocketId { conn: 2, ..me }), true),
            "another's"
        );
        assert!(mailbox.offer(&publication(0), true), "everyone's");
        let mut batch = VecDeque::new();
        mailbox.take(&mut batch);
        assert_eq!(batch.len(), 2);
    }

    #[tokio::test]
    async fn one_wake_up_takes_everything_queued_and_signals_come_in_order() {
        let counter = IntCounter::new("slow", "test").expect("counter");
        let mailbox = Arc::new(Mailbox::new(8, counter, None));
        let mut batch = VecDeque::new();
        let waiter = {
            let mailbox = Arc::clone(&mailbox);
            tokio::spawn(async move {
                let mut batch = VecDeque::new();
                let mail = next(&mailbox, &mut batch).await;
                (mail, batch.len())
            })
        };
        tokio::task::yield_now().await;
        assert!(
            mailbox.offer(&publication(0), true),
            "wakes the waiting task"
        );
        assert_eq!(waiter.await.expect("woken"), (Mail::Publications, 1));
        for i in 0..3 {
            assert!(mailbox.offer(&publication(i), true));
        }
        mailbox.ring(Signal::Heartbeat);
        mailbox.ring(Signal::Drain);
        assert_eq!(
            next(&mailbox, &mut batch).await,
            Mail::Drain,
            "the drain first"
        );
        assert_eq!(next(&mailbox, &mut batch).await, Mail::Publications);
        assert_eq!(batch.len(), 3, "all of them at once");
        assert!(batch[0].frame.ends_with("\"data\":0}"), "in order");
        assert_eq!(next(&mailbox, &mut batch).await, Mail::Heartbeat);
    }

    #[tokio::test]
    async fn a_parked_connection_is_written_straight_and_a_queued_one_keeps_its_order() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let counter = IntCounter::new("slow", "test").expect("counter");
        let link =
            crate::link::Link::new(server, std::time::Duration::from_secs(5), counter.clone());
        let mailbox = Mailbox::new(8, counter, None);
        let delivered = IntCounter::new("delivered", "test").expect("counter");
        mailbox.attach(
            link.outlet(),
            Encoder::Plain(|p| p.sse.clone()),
            delivered.clone(),
        );
        let mut batch = VecDeque::new();

        // Not parked yet: queued.
        assert!(mailbox.offer(&publication(0), true));
        assert_eq!(next(&mailbox, &mut batch).await, Mail::Publications);
        batch.clear();
        // Parked (pending, idle): the next one goes straight to the socket.
        let parked = poll_fn(|cx| Poll::Ready(mailbox.poll_next(cx, &mut batch))).await;
        assert!(parked.is_pending());
        let one = publication(1);
        assert!(mailbox.offer(&one, true));
        let mut got = vec![0u8; one.sse.len()];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(got, one.sse, "written straight");
        assert_eq!(delivered.get(), 1, "and counted");
        // One the hub may not write directly queues; a direct one behind
        // it queues too, in order.
        assert!(mailbox.offer(&publication(2), false));
        assert!(mailbox.offer(&publication(3), true));
        assert_eq!(next(&mailbox, &mut batch).await, Mail::Publications);
        let order: Vec<_> = batch.iter().map(|p| p.frame.to_string()).collect();
        assert!(
            order[0].ends_with("\"data\":2}") && order[1].ends_with("\"data\":3}"),
            "{order:?}"
        );
        assert_eq!(
            delivered.get(),
            1,
            "the queued ones count when the session takes them"
        );
    }

    /// Runs [`stress::run`] with 1,000 seeds: every run a fresh connection,
    /// two hub threads and the connection's task racing over the outlet.
    /// A failure names its seed; `CRIER_OUTLET_SEED=<seed>` starts the
    /// runs from it again (the same sizes, choices and pauses; the threads'
    /// schedule is the machine's).
    #[test]
    fn the_outlet_loses_doubles_and_reorders_nothing_under_random_interleavings() {
        const RUNS: u64 = 1_000;
        let base = std::env::var("CRIER_OUTLET_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut seen = stress::Seen::default();
        for run in 0..RUNS {
            let seed = base.wrapping_add(run);
            match runtime.block_on(stress::run(seed)) {
                Ok(one) => seen.add(&one),
                Err(e) => panic!("run {run} of {RUNS}, seed {seed}: {e}"),
            }
        }
        eprintln!("{seen:?}");
        // Every path of the outlet was taken, so the runs above tested it.
        assert!(
            seen.direct > 0 && seen.queued > 0 && seen.partial > 0 && seen.own > 0,
            "base seed {base}: {seen:?}"
        );
    }

    /// One randomized run of the outlet's state machine against a real
    /// socket: see [`run`].
    mod stress {
        use super::*;
        use crate::link::Link;
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        use std::time::Duration;
        use tokio::io::AsyncReadExt;
        use tokio::net::{TcpSocket, TcpStream};
        use tokio::sync::mpsc;

        /// Publications written per flush at most (as the WebSocket's).
        const WRITE_BATCH: usize = 64;
        /// A run that has not ended by then has hung (a lost wake-up).
        const HUNG: Duration = Duration::from_secs(60);

        /// What a client asks of the connection's task, sent by the hub
        /// threads at random moments so that it lands mid-write.
        #[derive(Debug, Clone, Copy)]
        enum Command {
            /// A subscribe: direct writes stop, the task works a while
            /// (offers queue meanwhile), then answers.
            Subscribe,
            /// A ping: the task answers at once.
            Ping,
            /// Direct writes stop until the task next parks, nothing said.
            Hold,
        }

        /// Which paths a run took.
        #[derive(Debug, Default)]
        pub(super) struct Seen {
            /// Publications written straight to the socket (whole or not).
            pub(super) direct: u64,
            /// Publications the task wrote from the queue.
            pub(super) queued: u64,
            /// Wake-ups to write what a partial direct write left.
            pub(super) partial: u64,
            /// The task's own writes (answers).
            pub(super) own: u64,
        }

        impl Seen {
            pub(super) fn add(&mut self, other: &Seen) {
                self.direct += other.direct;
                self.queued += other.queued;
                self.partial += other.partial;
                self.own += other.own;
            }
        }

        /// A publication as the test's wire protocol writes it: one line.
        fn encode(p: &Publication) -> Bytes {
            Bytes::from(format!("{}\n", &*p.frame))
        }

        /// The task's own answer number `n`: one line.
        fn answer(n: u64) -> String {
            format!("{{\"own\":{n}}}\n")
        }

        /// One connection: two hub threads offer publications of their own
        /// channel (directly or not, at random, with random pauses, now
        /// and then sending the task a [`Command`]); the connection's task
        /// writes what it takes from its queue, answers commands and writes
        /// what partial direct writes left, as a session does; the client
        /// reads in random bites with small socket buffers, so that direct
        /// writes are refused, partial and whole. The client must read
        /// every publication exactly once, each channel's in order, and
        /// every answer in order, with no byte out of place.
        pub(super) async fn run(seed: u64) -> Result<Seen, String> {
            let mut rng = StdRng::seed_from_u64(seed);
            let (server, client) = pair().await.map_err(|e| format!("socket pair: {e}"))?;
            let slow = IntCounter::new("slow", "test").map_err(|e| e.to_string())?;
            let direct = IntCounter::new("direct", "test").map_err(|e| e.to_string())?;
            let link = Link::new(server, HUNG, slow.clone());
            let mailbox = Arc::new(Mailbox::new(1 << 20, slow, None));
            mailbox.attach(link.outlet(), Encoder::Plain(encode), direct.clone());

            let channels: Vec<Vec<Arc<Publication>>> = ["a", "b"]
                .iter()
                .map(|channel| {
                    (0..rng.random_range(5..40))
                        .map(|n| {
                            let pad = if rng.random_bool(0.03) {
                                16 * 1024
                            } else {
                                rng.random_range(0..300)
                            };
                            let payload = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(pad));
                            Arc::new(Publication::new(channel, payload.as_bytes()))
                        })
                        .collect()
                })
                .collect();
            let total: usize = channels.iter().map(Vec::len).sum();
            let expected: Vec<Vec<Bytes>> = channels
                .iter()
                .map(|c| c.iter().map(|p| encode(p)).collect())
                .collect();

            let (commands, received) = mpsc::unbounded_channel();
            let hub: Vec<_> = channels
                .into_iter()
                .map(|publications| {
                    let mailbox = Arc::clone(&mailbox);
                    let commands = commands.clone();
                    let rng = StdRng::seed_from_u64(rng.random());
                    std::thread::spawn(move || offer(&mailbox, &publications, &commands, rng))
                })
                .collect();
            drop(commands);
            let reader = tokio::spawn(read_all(client, StdRng::seed_from_u64(rng.random())));
            let task = serve(link, Arc::clone(&mailbox), received, rng);
            let (own, partial) = match tokio::time::timeout(HUNG, task).await {
                Ok(served) => served?,
                Err(_) => return Err("the connection's task hung".into()),
            };
            for thread in hub {
                thread
                    .join()
                    .map_err(|_| "a hub thread panicked".to_string())??;
            }
            let got = match tokio::time::timeout(HUNG, reader).await {
                Ok(Ok(Ok(got))) => got,
                Ok(Ok(Err(e))) => return Err(format!("reading: {e}")),
                Ok(Err(e)) => return Err(format!("reader: {e}")),
                Err(_) => return Err("the client's read hung".into()),
            };
            check(&got, &expected, own)?;
            Ok(Seen {
                direct: direct.get(),
                queued: total as u64 - direct.get(),
                partial,
                own,
            })
        }

        /// A hub thread: offers `publications` in order.
        fn offer(
            mailbox: &Mailbox,
            publications: &[Arc<Publication>],
            commands: &mpsc::UnboundedSender<Command>,
            mut rng: StdRng,
        ) -> Result<(), String> {
            for p in publications {
                if !mailbox.offer(p, rng.random_bool(0.85)) {
                    return Err("an offer was refused".into());
                }
                match rng.random_range(0..100) {
                    0..3 => {
                        let _ = commands.send(Command::Subscribe);
                    }
                    3..6 => {
                        let _ = commands.send(Command::Ping);
                    }
                    6..8 => {
                        let _ = commands.send(Command::Hold);
                    }
                    8..25 => std::thread::yield_now(),
                    25..45 => {
                        for _ in 0..rng.random_range(0..5_000) {
                            std::hint::spin_loop();
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        }

        /// The connection's task, as a session and its wire protocol run
        /// it; returns how many answers it wrote and how many times it
        /// woke for a partial direct write's rest.
        async fn serve(
            mut link: Link,
            mailbox: Arc<Mailbox>,
            mut commands: mpsc::UnboundedReceiver<Command>,
            mut rng: StdRng,
        ) -> Result<(u64, u64), String> {
            let mut batch = VecDeque::new();
            let mut own = 0;
            let mut partial = 0;
            let mut hub_running = true;
            loop {
                // `Session::try_next`, and a batch per write.
                if let Some(first) = next_ready(&mailbox, &mut batch) {
                    link.out.push(encode(&first));
                    for _ in 1..rng.random_range(1..=WRITE_BATCH) {
                        let Some(p) = next_ready(&mailbox, &mut batch) else {
                            break;
                        };
                        link.out.push(encode(&p));
                    }
                    link.flush().await.map_err(|_| "write failed")?;
                    continue;
                }
                if !hub_running {
                    break;
                }
                tokio::select! {
                    mail = poll_fn(|cx| mailbox.poll_next(cx, &mut batch)) => match mail {
                        Mail::Publications => {}
                        Mail::Unwritten => {
                            partial += 1;
                            link.flush().await.map_err(|_| "write failed")?;
                        }
                        other => return Err(format!("unexpected mail {other:?}")),
                    },
                    command = commands.recv() => match command {
                        // Every offer has returned.
                        None => hub_running = false,
                        Some(Command::Hold) => mailbox.hold(),
                        Some(command) => {
                            if let Command::Subscribe = command {
                                mailbox.hold();
                                for _ in 0..rng.random_range(0..4) {
                                    tokio::task::yield_now().await;
                                }
                            }
                            link.out.extend_from_slice(answer(own).as_bytes());
                            own += 1;
                            link.flush().await.map_err(|_| "write failed")?;
                        }
                    },
                }
            }
            // Whatever a partial direct write left, then the end.
            link.flush().await.map_err(|_| "write failed")?;
            link.finish();
            Ok((own, partial))
        }

        /// The next publication ready for the task, without waiting.
        fn next_ready(
            mailbox: &Mailbox,
            batch: &mut VecDeque<Arc<Publication>>,
        ) -> Option<Arc<Publication>> {
            if batch.is_empty() {
                mailbox.take(batch);
            }
            batch.pop_front()
        }

        /// The client: reads until the end, in random bites, yielding at
        /// random between them.
        async fn read_all(mut client: TcpStream, mut rng: StdRng) -> std::io::Result<Vec<u8>> {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let bite = rng.random_range(1..=buf.len());
                let n = client.read(&mut buf[..bite]).await?;
                if n == 0 {
                    return Ok(got);
                }
                got.extend_from_slice(&buf[..n]);
                for _ in 0..rng.random_range(0..3) {
                    tokio::task::yield_now().await;
                }
            }
        }

        /// Every line read must be the next publication of its channel or
        /// the next answer, and nothing may be missing at the end.
        fn check(got: &[u8], expected: &[Vec<Bytes>], answers: u64) -> Result<(), String> {
            let mut next = vec![0; expected.len()];
            let mut own = 0;
            let mut at = 0;
            while at < got.len() {
                let end = got[at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(got.len(), |i| at + i + 1);
                let line = &got[at..end];
                if line == answer(own).as_bytes() {
                    own += 1;
                } else if let Some(c) = (0..expected.len())
                    .find(|&c| expected[c].get(next[c]).is_some_and(|e| e == line))
                {
                    next[c] += 1;
                } else {
                    let shown = String::from_utf8_lossy(&line[..line.len().min(80)]);
                    return Err(format!(
                        "byte {at}: {shown:?} is none of the next expected \
                         (publication {next:?} of each channel, answer {own}): \
                         lost, doubled, out of order or interleaved"
                    ));
                }
                at = end;
            }
            let sent: Vec<usize> = expected.iter().map(Vec::len).collect();
            if next != sent || own != answers {
                return Err(format!(
                    "the client read {next:?} publications of {sent:?} and {own} answers of {answers}"
                ));
            }
            Ok(())
        }

        /// A connected pair on loopback with small socket buffers: crier's
        /// end, and the client's.
        async fn pair() -> std::io::Result<(TcpStream, TcpStream)> {
            let listening = TcpSocket::new_v4()?;
            listening.set_send_buffer_size(4096)?;
            listening.bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
            let listener = listening.listen(1)?;
            let connecting = TcpSocket::new_v4()?;
            connecting.set_recv_buffer_size(4096)?;
            let (client, accepted) = tokio::join!(
                connecting.connect(listener.local_addr()?),
                listener.accept()
            );
            Ok((accepted?.0, client?))
        }
    }
}
