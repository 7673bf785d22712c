//! `GET /ws`: crier's WebSocket protocol, JSON text frames both ways.
//!
//! A [`Protocol`] on the WebSocket driver: what crier's frames look like.
//! Client commands become [`Session`](crate::session::Session) calls and
//! replies; the driver closes the connection when the client falls behind
//! (1013), goes silent (1001), sends a frame over the limit (1009), floods
//! commands (1008), when its credential ends (4001) or when its turn in
//! the drain comes (1012). Malformed commands get an `error` reply and the
//! connection stays usable.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use serde_json::Value;

use crate::app::{App, ConnInfo};
use crate::history::StreamId;
use crate::http::{rejected, Body, StreamQuery};
use crate::metrics::Transport;
use crate::protocol::{event_filter, reply, Command, Encoding, Publication};
use crate::refusal::Refusal;
use crate::session::{admit, Presence, Request, Start};
use crate::transport::rfc6455;
use crate::transport::websocket::{
    self, text_frame, CloseCode, Conn, End, Farewell, Gone, Protocol,
};

type HttpRequest<B> = http::Request<B>;

/// Close codes crier sends (RFC 6455 section 7.4, and its own 4001).
mod code {
    use crate::transport::websocket::CloseCode;

    /// The credential ended (crier's own code).
    pub(super) const EXPIRED: CloseCode = CloseCode(4001);
}

/// Answers a `/ws` request: an error status, or 101 and a connection task.
pub(crate) async fn handle<B>(app: Arc<App>, req: HttpRequest<B>, info: ConnInfo) -> Response<Body>
where
    B: Send + 'static,
{
    if !hyper_tungstenite::is_upgrade_request(&req) {
        return rejected(&app.metrics, &Refusal::UpgradeRequired);
    }
    let query = match StreamQuery::parse(req.uri()) {
        Ok(query) => query,
        Err(reason) => return rejected(&app.metrics, &Refusal::BadRequest(reason)),
    };
    let peer = info.peer.ip();
    let admitted = admit(
        &app,
        Transport::Ws,
        req.headers(),
        req.uri(),
        peer,
        &query.channels,
    );
    let admission = match admitted.await {
        Ok(a) => a,
        Err(refusal) => return rejected(&app.metrics, &refusal),
    };
    websocket::handle(&app, req, info, Ok((admission, Ws { query: Some(query) })))
}

/// crier's protocol on one connection: the channels its request named,
/// until they are subscribed.
pub(crate) struct Ws {
    query: Option<StreamQuery>,
}

impl Protocol for Ws {
    const TRANSPORT: Transport = Transport::Ws;

    /// A publication as one text frame.
    fn frame(p: &Publication) -> Bytes {
        p.on_wire(Encoding::WsFrame, |p| text_frame(p.frame.as_bytes()))
    }

    fn replay_bytes(p: &Publication) -> usize {
        rfc6455::frame_len(p.frame.len())
    }

    async fn open(&mut self, conn: &mut Conn) -> Result<(), Gone> {
        conn.send(reply::welcome(conn.session.id()).as_bytes())
            .await?;
        let Some(query) = self.query.take() else {
            return Ok(());
        };
        let start = match query.from_oldest {
            true => Start::Oldest,
            false => Start::Now,
        };
        for channel in query.channels {
            let request = Request {
                events: query.events.clone(),
                start,
                presence: Presence::AsUser,
                ..Request::new(channel)
            };
            subscribe(conn, request, None).await?;
        }
        Ok(())
    }

    async fn message(&mut self, conn: &mut Conn, text: String) -> Result<(), Gone> {
        command(conn, &text).await
    }

    fn refusal(&self, refusal: &Refusal) -> Vec<u8> {
        reply::refused(refusal, &None).into_bytes()
    }

    fn expiring(&self, in_secs: u64) -> Option<Vec<u8>> {
        Some(reply::expiring(in_secs).into_bytes())
    }

    fn heartbeat(&self) -> Option<Vec<u8>> {
        None
    }

    fn ending(&self, end: &End) -> Farewell {
        match end {
            End::Expired => (None, (code::EXPIRED, "expired".into())),
            End::Reconnect { after_ms } => (
                Some(reply::reconnect(*after_ms).into_bytes()),
                (CloseCode::RESTART, "server restarting, reconnect".into()),
            ),
            End::Slow => (None, (CloseCode::TRY_AGAIN, "too slow: queue full".into())),
            End::Idle => (None, (CloseCode::GOING_AWAY, "idle timeout".into())),
            End::TooLong { size, max } => {
                let reason = format!("message of {size} bytes exceeds the limit of {max}");
                let refused = self.refusal(&Refusal::TooLarge(reason));
                (
                    Some(refused),
                    (CloseCode::TOO_BIG, "message too large".into()),
                )
            }
            End::Broken(code, reason) => (None, (*code, (*reason).into())),
            End::Flooding => (None, (CloseCode::POLICY, "rate limit exceeded".into())),
        }
    }
}

/// One client command.
async fn command(conn: &mut Conn, text: &str) -> Result<(), Gone> {
    let cmd: Command = match serde_json::from_str(text) {
        Ok(cmd) => cmd,
        Err(e) => {
            let refusal = Refusal::BadRequest(format!("not a JSON command: {e}"));
            return refuse(conn, &refusal, &None).await;
        }
    };
    let missing = |what: &str| Refusal::BadRequest(format!("missing {what}"));
    match (cmd.kind.as_deref(), cmd.channel) {
        (Some("subscribe"), Some(channel)) => {
            let events = match cmd.events.map(event_filter).transpose() {
                Ok(events) => events,
                Err(reason) => return refuse(conn, &Refusal::BadRequest(reason), &cmd.id).await,
            };
            let start = match cmd.since.as_deref() {
                None => Start::Now,
                // From the oldest message still in the channel's history.
                Some(crate::http::OLDEST) => Start::Oldest,
                Some(text) => match text.parse::<StreamId>() {
                    Ok(since) => Start::After(since),
                    Err(()) => {
                        let reason =
                            "bad `since`: expected a message id like 1700000000000-0, or \"oldest\"";
                        let refusal = Refusal::BadRequest(reason.into());
                        return refuse(conn, &refusal, &cmd.id).await;
                    }
                },
            };
            let request = Request {
                events,
                start,
                presence: Presence::AsUser,
                ..Request::new(channel)
            };
            subscribe(conn, request, cmd.id).await
        }
        (Some("unsubscribe"), Some(channel)) => {
            conn.session.unsubscribe(&channel);
            send(conn, reply::unsubscribed(&channel, &cmd.id)).await
        }
        (Some("subscribe" | "unsubscribe"), None) => {
            refuse(conn, &missing("channel"), &cmd.id).await
        }
        (Some("presence"), Some(channel)) => presence(conn, &channel, &cmd.id).await,
        (Some("presence"), None) => refuse(conn, &missing("channel"), &cmd.id).await,
        (Some("ping"), _) => send(conn, reply::pong(&cmd.id)).await,
        (Some("auth"), _) => match cmd.token {
            Some(token) => authenticate(conn, &token, &cmd.id).await,
            None => refuse(conn, &missing("token"), &cmd.id).await,
        },
        (Some(other), _) => {
            let refusal = Refusal::BadRequest(format!("unknown message type `{other}`"));
            refuse(conn, &refusal, &cmd.id).await
        }
        (None, _) => refuse(conn, &missing("`type`"), &cmd.id).await,
    }
}

async fn authenticate(conn: &mut Conn, token: &str, id: &Option<Value>) -> Result<(), Gone> {
    match conn.session.authenticate(token).await {
        Ok(done) => {
            let text = reply::authenticated(done.user.as_deref(), done.expires_in, id);
            send(conn, text).await?;
            for channel in &done.revoked {
                send(conn, reply::revoked(channel, "forbidden")).await?;
            }
            Ok(())
        }
        Err(refusal) => refuse(conn, &refusal, id).await,
    }
}

/// Subscribes as `request` says; a signed-in client of a presence channel
/// is one of its members. The replay, if any, comes out of the session
/// before anything else, and before the next command is read: that bounds
/// what a connection holds.
async fn subscribe(conn: &mut Conn, request: Request, id: Option<Value>) -> Result<(), Gone> {
    let channel = request.channel.clone();
    match conn.session.subscribe(request).await {
        Ok(s) => {
            let text = reply::subscribed(&channel, s.recovered, s.position, &id);
            send(conn, text).await
        }
        Err(refusal) => refuse(conn, &refusal, &id).await,
    }
}

/// Answers a `presence` request: the members of a presence channel the
/// client is subscribed to.
async fn presence(conn: &mut Conn, channel: &str, id: &Option<Value>) -> Result<(), Gone> {
    if !conn.session.is_subscribed(channel) {
        let refusal = Refusal::BadRequest(format!("subscribe to `{channel}` first"));
        return refuse(conn, &refusal, id).await;
    }
    let app = Arc::clone(conn.app());
    if !app.policy.rule_of(channel).tracks_presence(channel) {
        let reason = format!("`{channel}` is not a presence channel");
        return refuse(conn, &Refusal::BadRequest(reason), id).await;
    }
    match app.members(channel).await {
        Ok(members) => {
            send(
                conn,
                reply::presence(channel, members.count, &members.listed, id),
            )
            .await
        }
        Err(refusal) => refuse(conn, &refusal, id).await,
    }
}

/// The one way this protocol tells a client of a refusal: an `error` reply
/// echoing the command's id.
async fn refuse(conn: &mut Conn, refusal: &Refusal, id: &Option<Value>) -> Result<(), Gone> {
    send(conn, reply::refused(refusal, id)).await
}

async fn send(conn: &mut Conn, text: String) -> Result<(), Gone> {
    conn.send(text.as_bytes()).await
}
