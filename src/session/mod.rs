//! One client connection, whatever wire protocol it speaks.
//!
//! A wire protocol (crier's WebSocket, SSE, …) only frames: it turns client
//! frames into calls on a [`Session`] and the [`Event`]s that
//! [`Session::poll_next`] yields into bytes. Everything else about a connection
//! lives here, once:
//!
//! - [`admit`]: origin, credentials, the channels a request names, and the
//!   connection limits, before any stream opens;
//! - the subscription set, with the channel rules and the per-connection
//!   limit ([`Session::subscribe`]);
//! - resume ([`resume`]): the position in each history channel, the replay
//!   of what a client missed within its budget, or a `gap`;
//! - the credential watch: `expiring`, `expired`, a logout, a fresh token
//!   ([`Session::authenticate`]);
//! - the connection's queue ([`queue`]), its drain turn, its heartbeat and
//!   idle clock, and its command rate ([`rate`]).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Poll};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::app::App;
use crate::auth::{AuthEvent, Failure, Principal, Watch};
use crate::broker::Members;
use crate::history::StreamId;
use crate::hub::Sink;
use crate::lifecycle::Bell;
use crate::limits::Admitted;
use crate::link::Outlet;
use crate::metrics::Transport;
use crate::policy::Rule;
use crate::protocol::{Encoder, Filter, Kind, Publication, SocketId};
use crate::refusal::Refusal;

mod admit;
mod member;
mod queue;
mod rate;
mod resume;
mod subscriptions;

pub(crate) use admit::{admit, Admission};
pub(crate) use queue::ConnId;
pub(crate) use rate::{Commands, Verdict};
pub(crate) use resume::Tracker;

use member::{Member, Watching};
use queue::{Mail, Mailbox};
use resume::Budget;
use subscriptions::Subscriptions;

/// What the connection must do next; see [`Session::poll_next`].
#[derive(Debug)]
pub(crate) enum Event {
    /// Write this publication (a message, or a `gap` notice). It is new for
    /// this connection: duplicates across resume and live never get here.
    Deliver(Arc<Publication>),
    /// The credential ends in `in_secs`: tell the client to refresh it.
    Expiring {
        /// Seconds left.
        in_secs: u64,
    },
    /// The credential ended (expired, or the session was logged out):
    /// tell the client and close.
    Expired,
    /// This instance is draining and it is this connection's turn: tell
    /// the client to reconnect (elsewhere) after `after_ms`, then close.
    Reconnect {
        /// The delay to suggest, spreading reconnects out.
        after_ms: u64,
    },
    /// The client fell behind and its queue overflowed: close.
    Slow,
    /// Nothing else for a heartbeat period: keep the connection alive.
    Heartbeat,
    /// A direct write left bytes behind: flush (the link writes them
    /// before anything else).
    Flush,
    /// The client sent nothing for the idle timeout: close.
    Idle,
    /// The app ended every connection of the user this one signed in as
    /// (Pusher's `terminate_connections`): close.
    Terminated,
    /// The connection had to sign in by now and did not (Pusher's
    /// `user_authentication_timeout`): close.
    NotSignedIn,
}

/// How a wire protocol runs its sessions.
pub(crate) struct Wire {
    /// For metrics and logs.
    pub(crate) transport: Transport,
    /// How often [`Event::Heartbeat`] comes when nothing else does.
    pub(crate) heartbeat: Duration,
    /// Close a client silent for this long, and rate its commands:
    /// protocols where clients talk.
    pub(crate) idle_timeout: Option<Duration>,
    /// Bytes each replayed message costs on the wire besides its encoding
    /// (SSE: its cursor line).
    pub(crate) replay_overhead: usize,
    /// A publication's bytes as this connection's wire protocol sends it:
    /// the client receives that one encoding, never the others, so the
    /// replay budget counts only it.
    pub(crate) replay_bytes: fn(&Publication) -> usize,
    /// The client's address, for logs.
    pub(crate) peer: SocketAddr,
}

/// A subscription asked for: see [`Session::subscribe`].
#[derive(Debug)]
pub struct Request {
    /// The channel, as crier names it.
    pub channel: String,
    /// Only these event types, when given.
    pub events: Option<Filter>,
    /// Where to start in the channel.
    pub start: Start,
    /// What, besides the connection's credential, lets it hear the channel.
    pub grant: Grant,
    /// Whether and how the connection is one of a presence channel's
    /// members.
    pub presence: Presence,
}

impl Request {
    /// `channel` from now on, granted by the credential, no presence.
    pub fn new(channel: impl Into<String>) -> Self {
        Self {
            channel: channel.into(),
            events: None,
            start: Start::Now,
            grant: Grant::Credential,
            presence: Presence::None,
        }
    }
}

/// Where a subscription starts in its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With what is published from now on.
    Now,
    /// After this message (a client's cursor): what came since is
    /// replayed, or a `gap` says it is gone.
    After(StreamId),
    /// With the oldest message still in the channel's history
    /// (`since=oldest`); a channel without history has nothing to replay.
    Oldest,
    /// With the channel's last message, if its history holds one (Pusher's
    /// `cache-` channels): [`Subscribed::last_event`] says whether it did.
    LastEvent,
    /// The client comes back (SSE `Last-Event-ID`) with no position in
    /// this channel: one without history gets a `gap` (what it missed is
    /// gone); one with history starts now, or at its oldest message.
    Returning {
        /// `since=oldest` was asked too.
        oldest: bool,
    },
}

/// What lets a connection hear a channel, besides the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Its credential, as the rules read it.
    Credential,
    /// The app signed this channel for this connection (a Pusher channel
    /// authorization): it grants the channel as a token's channels claim
    /// would, so `claim` rules admit it.
    Signature,
    /// The connection's sign-in ([`Session::sign_in`]): the channels that
    /// come with being a signed-in user (Pusher's `#server-to-user-{id}`,
    /// the online channels of a watchlist), which the protocol names. No
    /// rule is needed; the channel's settings are those of the first rule
    /// that fits it, and it does not count against
    /// `limits.max_subscriptions_per_connection` (the protocol bounds
    /// them).
    SignIn,
}

/// A subscriber's part in a presence channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Presence {
    /// None.
    None,
    /// Join as this member (Pusher's signed `channel_data`).
    Join {
        /// The member's user id.
        user: String,
        /// What others see of it (JSON).
        info: String,
    },
    /// When the channel tracks presence, join as the connection's user
    /// (crier's protocol); an anonymous connection only listens.
    AsUser,
    /// When the channel tracks presence, read its members for the answer
    /// without joining.
    Watch,
}

/// A subscription made: what the protocol's answer reports.
#[derive(Debug)]
pub struct Subscribed {
    /// For a resume: whether everything missed will be replayed (false: a
    /// `gap` comes instead).
    pub recovered: Option<bool>,
    /// Where the connection starts in a history channel.
    pub position: Option<StreamId>,
    /// For [`Start::LastEvent`]: whether the channel had a last event (it
    /// comes out of [`Session::poll_next`] first).
    pub last_event: Option<bool>,
    /// A presence channel's members, when joined or read.
    pub members: Option<Members>,
}

/// A credential accepted by [`Session::authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authenticated {
    /// Who the connection now is.
    pub(crate) user: Option<String>,
    /// Seconds until the credential expires.
    pub(crate) expires_in: Option<u64>,
    /// Channels the new credential no longer grants: unsubscribed.
    pub(crate) revoked: Vec<String>,
}

/// The channels a request named, with their rules.
type Resolved = Vec<(String, Arc<Rule>)>;

/// What a connection replays before it goes live, while it has any: kept
/// out of line, since most connections never replay.
struct Replay {
    /// Missed messages still to deliver, oldest first: they go before
    /// anything queued live.
    queue: VecDeque<Arc<Publication>>,
    budget: Budget,
}

/// What a connection whose client talks keeps: its idle clock and command
/// rate.
struct Talk {
    idle_timeout: Duration,
    last_heard: Instant,
    commands: Commands,
}

/// A signed-in connection ([`Session::sign_in`]): out of line, since most
/// connections never sign in.
struct SignedIn {
    user: String,
    /// The user's channel: a termination published there ends the
    /// connection.
    channel: String,
    /// The channels subscribed with [`Grant::SignIn`].
    granted: Vec<String>,
    /// The presence channels watched ([`Session::watch_presence`]).
    watching: Vec<Watching>,
}

/// Where a connection is in a drain.
enum Drain {
    /// Waiting for the drain to begin (the clock rings the mailbox).
    Waiting,
    /// The drain began: leave when this timer fires (boxed: it exists
    /// only while draining), telling the client to wait `retry_ms` before
    /// reconnecting.
    Leaving {
        at: Pin<Box<tokio::time::Sleep>>,
        retry_ms: u32,
    },
    /// Told to reconnect.
    Done,
}

/// One client connection. See the module documentation. Dropping it
/// unsubscribes every channel and frees the connection's slot.
pub struct Session {
    app: Arc<App>,
    mailbox: Arc<Mailbox>,
    /// Publications taken from the mailbox, still to deliver.
    batch: VecDeque<Arc<Publication>>,
    subs: Subscriptions,
    watch: Watch,
    tracker: Tracker,
    replay: Option<Box<Replay>>,
    /// What each replayed message costs on the wire (see [`Wire`]).
    replay_overhead: u32,
    replay_bytes: fn(&Publication) -> usize,
    admitted: Admitted,
    drain: Drain,
    /// For protocols where clients talk: out of line, so a stream that
    /// only listens (SSE) does not carry it.
    talk: Option<Box<Talk>>,
    /// The presence channels joined (out of line: most connections join
    /// none).
    #[allow(
        clippy::box_collection,
        reason = "one word in every session instead of three; the box exists only with members"
    )]
    members: Option<Box<Vec<Member>>>,
    /// The channels the connection's request named, resolved when it was
    /// admitted: their subscribes do not walk the rules again.
    /// Out of line, and gone once they are all subscribed.
    #[allow(
        clippy::box_collection,
        reason = "one word in every session instead of three; the box exists only until subscribed"
    )]
    admitted_rules: Option<Box<Resolved>>,
    /// For its log lines (see [`Session::span`]), and its metrics.
    peer: SocketAddr,
    transport: Transport,
    /// The user this connection counts for in lifecycle events
    /// (`user_online` / `user_offline`), once signed in.
    online: Option<Box<str>>,
    /// Who the connection signed in as, through its protocol.
    signed_in: Option<Box<SignedIn>>,
    /// When the connection must have signed in by (boxed: only some
    /// apps ask it).
    sign_in_by: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A termination for its signed-in user arrived.
    terminated: bool,
}

impl Session {
    /// A session for an admitted connection; nothing subscribed yet.
    pub(crate) fn open(app: Arc<App>, admission: Admission, wire: Wire) -> Self {
        let limits = &app.config.limits;
        let counter = app.metrics.slow_client_disconnects.clone();
        let id = queue::next_id();
        let me = SocketId {
            instance: app.process.instance,
            conn: id,
        };
        let mailbox = Arc::new(Mailbox::new(limits.queue_size, counter, Some(me)));
        let bell = Arc::downgrade(&mailbox) as Weak<dyn Bell>;
        app.process.lifecycle.attach(id, bell, wire.heartbeat);
        Self {
            subs: Subscriptions::new(id),
            mailbox,
            batch: VecDeque::new(),
            watch: Watch::new(Arc::clone(&app.gate.auth), admission.principal),
            tracker: Tracker::default(),
            replay: None,
            replay_overhead: u32::try_from(wire.replay_overhead).unwrap_or(u32::MAX),
            replay_bytes: wire.replay_bytes,
            admitted: admission.admitted,
            drain: Drain::Waiting,
            talk: wire.idle_timeout.map(|idle_timeout| {
                Box::new(Talk {
                    idle_timeout,
                    last_heard: Instant::now(),
                    commands: Commands::new(limits.commands_per_second, limits.command_burst),
                })
            }),
            members: None,
            admitted_rules: (!admission.rules.is_empty()).then(|| Box::new(admission.rules)),
            peer: wire.peer,
            transport: wire.transport,
            online: None,
            signed_in: None,
            sign_in_by: None,
            terminated: false,
            app,
        }
        .counting_user()
    }

    /// Counts the connection for its user in lifecycle events, once it
    /// has one (a connection keeps one user: another is refused).
    fn counting_user(mut self) -> Self {
        self.count_user();
        self
    }

    fn count_user(&mut self) {
        if let (None, Some(ledger), Some(user)) = (
            &self.online,
            &self.app.delivery.ledger,
            &self.watch.principal().user,
        ) {
            ledger.user(user, 1);
            self.online = Some(user.as_str().into());
        }
    }

    /// The presence channels joined.
    fn members(&self) -> &[Member] {
        self.members.as_deref().map_or(&[], Vec::as_slice)
    }

    fn members_mut(&mut self) -> &mut Vec<Member> {
        self.members.get_or_insert_with(Box::default)
    }

    /// The connection's id within this process.
    pub(crate) fn id(&self) -> ConnId {
        self.subs.id()
    }

    /// The connection's id across the fleet (Pusher's `socket_id`).
    pub(crate) fn socket_id(&self) -> SocketId {
        SocketId {
            instance: self.app.process.instance,
            conn: self.id(),
        }
    }

    /// The shared state the session runs in.
    pub(crate) fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Whether the connection listens to `channel`.
    pub(crate) fn is_subscribed(&self, channel: &str) -> bool {
        self.subs.contains(channel)
    }

    /// Who the connection is, if anyone.
    pub(crate) fn user(&self) -> Option<&str> {
        self.watch.principal().user.as_deref()
    }

    /// The connection's tracing span, made when asked: for a log line, or
    /// around the handling of a client's messages. A span kept for the
    /// connection's whole life would keep the subscriber's record of it
    /// (at the default `info` level, its formatted fields in
    /// tracing-subscriber's registry) in every idle connection.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "conn",
            conn.id = self.id(),
            client.addr = %self.peer,
            transport = self.transport.as_str(),
            user = self.signed_in().or(self.user()),
        )
    }

    /// The connection's position in each history channel (SSE's cursor).
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Resolves at the next thing the connection must do (the tests'
    /// way to wait for [`Session::poll_next`]).
    #[cfg(test)]
    pub(crate) async fn next(&mut self) -> Event {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Ready at the next thing the connection must do. Cancel-safe: a
    /// protocol polls it next to its own reads. Written by hand, not as a
    /// `select!`:
    /// an idle connection's task waits in this, and its size is every
    /// connection's (the timers it polls are boxed, and exist only while
    /// they run). In order: the queue's overflow, what is ready to
    /// deliver, a termination, the sign-in deadline, the credential, the
    /// connection's moment in a drain, then the mailbox.
    pub(crate) fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Event> {
        loop {
            if self.mailbox.is_slow() {
                return Poll::Ready(Event::Slow);
            }
            if let Some(p) = self.try_next() {
                return Poll::Ready(Event::Deliver(p));
            }
            if self.terminated {
                return Poll::Ready(Event::Terminated);
            }
            if let Some(by) = self.sign_in_by.as_mut() {
                if by.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::NotSignedIn);
                }
            }
            if let Poll::Ready(event) = self.watch.poll_next(cx) {
                return Poll::Ready(match event {
                    AuthEvent::Expiring { in_secs } => Event::Expiring { in_secs },
                    AuthEvent::Expired => Event::Expired,
                });
            }
            if let Drain::Leaving { at, retry_ms } = &mut self.drain {
                if at.as_mut().poll(cx).is_ready() {
                    let after_ms = u64::from(*retry_ms);
                    self.drain = Drain::Done;
                    return Poll::Ready(Event::Reconnect { after_ms });
                }
            }
            let mail = ready!(self.mailbox.poll_next(cx, &mut self.batch));
            match mail {
                Mail::Slow => return Poll::Ready(Event::Slow),
                Mail::Drain => {
                    if matches!(self.drain, Drain::Waiting) {
                        let (wait, retry_ms) = self.app.process.lifecycle.my_turn();
                        let retry_ms = u32::try_from(retry_ms).unwrap_or(u32::MAX);
                        let at = Box::pin(tokio::time::sleep(wait));
                        self.drain = Drain::Leaving { at, retry_ms };
                    }
                }
                Mail::Publications => {}
                Mail::Unwritten => return Poll::Ready(Event::Flush),
                Mail::Heartbeat => {
                    let idle = self
                        .talk
                        .as_ref()
                        .is_some_and(|t| t.last_heard.elapsed() >= t.idle_timeout);
                    return Poll::Ready(if idle { Event::Idle } else { Event::Heartbeat });
                }
            }
        }
    }

    /// The next publication to deliver if one is ready now: for writing a
    /// batch after [`Event::Deliver`] with one write.
    pub(crate) fn try_next(&mut self) -> Option<Arc<Publication>> {
        if self.terminated {
            return None;
        }
        if let Some(p) = self.next_replayed() {
            return Some(p);
        }
        loop {
            let p = match self.batch.pop_front() {
                Some(p) => p,
                None => {
                    self.mailbox.take(&mut self.batch);
                    self.batch.pop_front()?
                }
            };
            if self.accept(&p) {
                return Some(p);
            }
        }
    }

    /// The connection's socket, once the wire protocol has it: while the
    /// task waits with nothing to write, the hub may write publications
    /// to it directly, as `encoder` makes them (see [`crate::link::Outlet`]).
    pub(crate) fn attach(&self, outlet: Arc<Outlet>, encoder: Encoder) {
        let delivered = self.app.metrics.delivered(self.transport).clone();
        self.mailbox.attach(outlet, encoder, delivered);
    }

    /// Resolves once the connection's queue overflowed: a writer blocked
    /// on a client that stopped reading gives up then.
    pub(crate) fn slowed(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        let mailbox: &Mailbox = &self.mailbox;
        poll_fn(move |cx| mailbox.poll_slow(cx))
    }

    /// The next replayed message; once none is left, the replay budget is
    /// given back (everything replayed has been handed to the writer).
    /// Live publications that exclude this connection never reach its
    /// mailbox; replayed ones are judged here.
    fn next_replayed(&mut self) -> Option<Arc<Publication>> {
        loop {
            let Some(p) = self.replay.as_mut()?.queue.pop_front() else {
                self.replay = None;
                return None;
            };
            if p.exclude != Some(self.socket_id()) && self.accept(&p) {
                return Some(p);
            }
        }
    }

    /// Whether `p` is new for this connection; counts it as delivered. A
    /// termination is never delivered: on the signed-in user's channel it
    /// ends the connection, elsewhere it is nothing.
    fn accept(&mut self, p: &Publication) -> bool {
        if p.kind == Kind::Terminate {
            self.terminated |= self
                .signed_in
                .as_ref()
                .is_some_and(|s| s.channel == p.channel);
            return false;
        }
        let new = self.tracker.accept(p);
        if new && p.kind == Kind::Message {
            self.app.metrics.delivered(self.transport).inc();
        }
        new
    }

    /// The client sent something: it is not idle.
    pub(crate) fn heard(&mut self) {
        if let Some(talk) = &mut self.talk {
            talk.last_heard = Instant::now();
        }
    }

    /// Judges a command against the connection's rate.
    pub(crate) fn take_command(&mut self) -> Verdict {
        match &mut self.talk {
            Some(talk) => talk.commands.take(),
            // A protocol without client commands never asks.
            None => Verdict::Close,
        }
    }

    /// Subscribes as `request` says: the channel rules decide (walked once,
    /// here), the channel starts where the request asks, and a presence
    /// channel is joined (or its members read) as the request asks. What
    /// the client missed comes out of [`Session::poll_next`] before anything
    /// live; nothing of the channel reaches the client before the answer
    /// the protocol sends to this.
    pub async fn subscribe(&mut self, request: Request) -> Result<Subscribed, Refusal> {
        let Request {
            channel,
            events,
            start,
            grant,
            presence,
        } = request;
        let channel = channel.as_str();
        // Nothing of the channel may reach the client before its answer.
        self.mailbox.hold();
        let rule = self.resolve(channel, grant)?;
        let limit = self.app.config.limits.max_subscriptions_per_connection;
        let granted = self.signed_in.as_ref().map_or(0, |s| s.granted.len());
        if grant != Grant::SignIn
            && !self.subs.contains(channel)
            && self.subs.channels().len() - granted >= limit
        {
            return Err(Refusal::TooManySubscriptions { limit });
        }
        // The replay state lives out of line only while there is a replay
        // to deliver: a plain subscribe allocates nothing for it.
        let (mut queue, mut budget) = match self.replay.take() {
            Some(replay) => (replay.queue, replay.budget),
            None => (
                VecDeque::new(),
                Budget::new(&self.app, self.replay_bytes, self.replay_overhead as usize),
            ),
        };
        let sink: Arc<dyn Sink> = Arc::clone(&self.mailbox) as _;
        let mut opened = resume::open(
            &self.app,
            &mut self.subs,
            &sink,
            &mut self.tracker,
            &mut budget,
            channel,
            &rule,
            events,
            start,
        )
        .await;
        if let Ok(opened) = &mut opened {
            queue.extend(opened.replay.drain(..));
        }
        if !queue.is_empty() {
            self.replay = Some(Box::new(Replay { queue, budget }));
        }
        let opened = opened?;
        if let (Grant::SignIn, Some(signed_in)) = (grant, &mut self.signed_in) {
            if !signed_in.granted.iter().any(|c| c == channel) {
                signed_in.granted.push(channel.to_owned());
            }
        }
        let members = match self.presence(channel, &rule, presence).await {
            Ok(members) => members,
            Err(refusal) => {
                self.unsubscribe(channel);
                return Err(refusal);
            }
        };
        Ok(Subscribed {
            recovered: opened.recovered,
            position: opened.position,
            last_event: opened.last_event,
            members,
        })
    }

    /// May the connection hear `channel`, and what do the rules say of it:
    /// one walk of the rules (none for a channel its admission resolved).
    fn resolve(&mut self, channel: &str, grant: Grant) -> Result<Arc<Rule>, Refusal> {
        if let Some(rules) = self.admitted_rules.as_mut() {
            if let Some(i) = rules.iter().position(|(c, _)| c == channel) {
                let rule = rules.swap_remove(i).1;
                if rules.is_empty() {
                    // Every named channel is subscribed: free the list.
                    self.admitted_rules = None;
                }
                return Ok(rule);
            }
        }
        match grant {
            Grant::Credential => admit::resolve(&self.app, channel, self.watch.principal()),
            Grant::Signature => {
                // The app's signature grants the channel as a token's
                // channels claim would, so `claim` rules admit it.
                let mut who = self.watch.principal().clone();
                who.grants.push(channel.to_owned());
                admit::resolve(&self.app, channel, &who)
            }
            Grant::SignIn => match &self.signed_in {
                Some(_) => Ok(self.app.delivery.policy.rule_of(channel)),
                None => Err(Refusal::Unauthorized("sign in first")),
            },
        }
    }

    /// Signs the connection in as `user`, as its protocol verified (a
    /// Pusher `pusher:signin` the app signed), and subscribes it to
    /// `channel`, the user's own: the app reaches every connection of the
    /// user there, and a termination published there
    /// ([`crate::protocol::TERMINATE`]) ends each of them. A connection
    /// stays with one user: signing in again as the same user changes
    /// nothing, as another is refused.
    pub(crate) async fn sign_in(&mut self, user: &str, channel: String) -> Result<(), Refusal> {
        if let Some(signed_in) = &self.signed_in {
            if signed_in.user == user {
                return Ok(());
            }
            self.app.gate.auth.count(Failure::UserMismatch);
            return Err(Refusal::Unauthorized(Failure::UserMismatch.reason()));
        }
        self.signed_in = Some(Box::new(SignedIn {
            user: user.to_owned(),
            channel: channel.clone(),
            granted: Vec::new(),
            watching: Vec::new(),
        }));
        let subscribed = self
            .subscribe(Request {
                grant: Grant::SignIn,
                ..Request::new(channel)
            })
            .await;
        if let Err(refusal) = subscribed {
            self.signed_in = None;
            return Err(refusal);
        }
        self.sign_in_by = None;
        Ok(())
    }

    /// Who the connection signed in as ([`Session::sign_in`]).
    pub(crate) fn signed_in(&self) -> Option<&str> {
        self.signed_in.as_ref().map(|s| s.user.as_str())
    }

    /// Closes the connection ([`Event::NotSignedIn`]) if it has not signed
    /// in within `within`.
    pub(crate) fn must_sign_in(&mut self, within: Duration) {
        if self.signed_in.is_none() {
            self.sign_in_by = Some(Box::pin(tokio::time::sleep(within)));
        }
    }

    /// Listens to the presence channel `channel` without being a member,
    /// for its members' comings and goings (a watchlist: the channel's
    /// publications are its joins and leaves), and reads its members now.
    /// This instance sweeps the channel on each beat while any connection
    /// watches it, so that a member whose instance died is seen leaving.
    pub(crate) async fn watch_presence(&mut self, channel: &str) -> Result<Members, Refusal> {
        self.subscribe(Request {
            grant: Grant::SignIn,
            ..Request::new(channel)
        })
        .await?;
        if let Some(signed_in) = &mut self.signed_in {
            if !signed_in.watching.iter().any(|w| w.channel() == channel) {
                signed_in.watching.push(Watching::new(&self.app, channel));
            }
        }
        self.app.members(channel).await
    }

    /// Makes the signed-in user present in the presence channel
    /// `channel` without listening to it (Pusher's watchlists: whoever
    /// watches the user listens there). When the connection ends, the
    /// user leaves `linger` later, so a quick reconnect, here or on
    /// another instance, is never seen as leaving.
    pub(crate) async fn present(&mut self, channel: &str, linger: Duration) -> Result<(), Refusal> {
        let Some(user) = self.signed_in().map(str::to_owned) else {
            return Err(Refusal::Unauthorized("sign in first"));
        };
        if self.members().iter().any(|m| m.channel() == channel) {
            return Ok(());
        }
        let socket = self.socket_id();
        let (member, _) = Member::join(&self.app, channel, &user, "null", socket).await?;
        self.members_mut().push(member.lingering(linger));
        Ok(())
    }

    /// Joins the presence channel `channel`, or reads its members, as
    /// `presence` asks.
    async fn presence(
        &mut self,
        channel: &str,
        rule: &Rule,
        presence: Presence,
    ) -> Result<Option<Members>, Refusal> {
        let tracked = rule.tracks_presence(channel);
        match presence {
            Presence::Join { user, info } => self.join(channel, &user, &info).await.map(Some),
            Presence::AsUser if tracked => match self.user().map(str::to_owned) {
                Some(user) => self.join(channel, &user, "null").await.map(Some),
                None => Ok(None),
            },
            // Read only, and only for the answer: a failure to read them
            // does not refuse the subscription.
            Presence::Watch if tracked => Ok(self.app.members(channel).await.ok()),
            Presence::AsUser | Presence::Watch | Presence::None => Ok(None),
        }
    }

    /// The user this connection joined the presence channel `channel` as.
    pub(crate) fn member(&self, channel: &str) -> Option<&str> {
        self.members()
            .iter()
            .find(|m| m.channel() == channel)
            .map(Member::user)
    }

    /// Joins the presence channel `channel`, subscribed already, as `user`
    /// with `info` (JSON), and reads its members. Joining again answers
    /// the members and counts nothing twice.
    async fn join(&mut self, channel: &str, user: &str, info: &str) -> Result<Members, Refusal> {
        if self.members().iter().any(|m| m.channel() == channel) {
            return self.app.members(channel).await;
        }
        let socket = self.socket_id();
        let (member, members) = Member::join(&self.app, channel, user, info, socket).await?;
        self.members_mut().push(member);
        Ok(members)
    }

    /// Ends the subscription to `channel`, if there is one (and its
    /// membership).
    pub fn unsubscribe(&mut self, channel: &str) {
        if let Some(signed_in) = &mut self.signed_in {
            signed_in.granted.retain(|c| c != channel);
        }
        if let Some(members) = self.members.as_mut() {
            members.retain(|m| m.channel() != channel);
            if members.is_empty() {
                self.members = None;
            }
        }
        self.subs.remove(&self.app.delivery.hub, channel);
        self.tracker.forget(channel);
    }

    /// A bearer token sent on the open connection: a first credential, or
    /// a fresh one before the old expires. A connection stays with one
    /// user (a token for another is refused), counts against that user's
    /// connection limit, and loses every channel the new credential no
    /// longer grants.
    pub(crate) async fn authenticate(&mut self, token: &str) -> Result<Authenticated, Refusal> {
        let principal = self
            .app
            .gate
            .auth
            .verify_token(token)
            .await
            .map_err(|failure| Refusal::Unauthorized(failure.reason()))?;
        if let (Some(current), Some(new)) = (&self.watch.principal().user, &principal.user) {
            if current != new {
                self.app.gate.auth.count(Failure::UserMismatch);
                return Err(Refusal::Unauthorized(Failure::UserMismatch.reason()));
            }
        }
        if let Some(user) = &principal.user {
            self.app.gate.limits.admit_user(&mut self.admitted, user)?;
        }
        let expires_in = principal.expires_at.map(|t| {
            t.duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs())
        });
        let user = principal.user.clone();
        self.watch.replace(principal);
        self.count_user();
        let revoked = self.revoke_ungranted();
        Ok(Authenticated {
            user,
            expires_in,
            revoked,
        })
    }

    /// Ends every subscription the current credential no longer grants (a
    /// refresh with fewer channels in its claim must not keep the old).
    fn revoke_ungranted(&mut self) -> Vec<String> {
        let who: &Principal = self.watch.principal();
        let revoked: Vec<String> = self
            .subs
            .channels()
            .iter()
            .filter(|c| self.app.delivery.policy.resolve(c, who).is_err())
            .cloned()
            .collect();
        for channel in &revoked {
            tracing::debug!(%channel, "subscription no longer granted, ended");
            self.unsubscribe(channel);
        }
        revoked
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(user), Some(ledger)) = (&self.online, &self.app.delivery.ledger) {
            ledger.user(user, -1);
        }
        self.app.process.lifecycle.detach(self.subs.id());
        // Nothing of the connection is left in the hub.
        self.subs.clear(&self.app.delivery.hub);
    }
}
