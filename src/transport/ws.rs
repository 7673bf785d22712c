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
use crate::protocol::{event_filter, Encoding, Publication};
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

    const DEFLATED: Option<Encoding> = Some(Encoding::WsDeflated);

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
            // crier's own protocol has no sign-in of its own: its user
            // ends like a credential.
            End::Terminated | End::NotSignedIn => (None, (code::EXPIRED, "signed out".into())),
            End::Refused(refusal) => (
                Some(self.refusal(refusal)),
                (CloseCode::POLICY, refusal.reason()),
            ),
        }
    }
}

/// One client command.
async fn command(conn: &mut Conn, text: &str) -> Result<(), Gone> {
    let mut cmd: Command = match serde_json::from_str(text) {
        Ok(cmd) => cmd,
        Err(e) => {
            let refusal = Refusal::BadRequest(format!("not a JSON command: {e}"));
            return refuse(conn, &refusal, &None).await;
        }
    };
    let id = cmd.id.take();
    let op = match cmd.op() {
        Ok(op) => op,
        Err(refusal) => return refuse(conn, &refusal, &id).await,
    };
    match op {
        Op::Subscribe {
            channel,
            events,
            since,
        } => {
            let events = match events.map(event_filter).transpose() {
                Ok(events) => events,
                Err(reason) => return refuse(conn, &Refusal::BadRequest(reason), &id).await,
            };
            let start = match since.as_deref() {
                None => Start::Now,
                // From the oldest message still in the channel's history.
                Some(crate::http::OLDEST) => Start::Oldest,
                Some(text) => match text.parse::<StreamId>() {
                    Ok(since) => Start::After(since),
                    Err(()) => {
                        let reason =
                            "bad `since`: expected a message id like 1700000000000-0, or \"oldest\"";
                        let refusal = Refusal::BadRequest(reason.into());
                        return refuse(conn, &refusal, &id).await;
                    }
                },
            };
            let request = Request {
                events,
                start,
                presence: Presence::AsUser,
                ..Request::new(channel)
            };
            subscribe(conn, request, id).await
        }
        Op::Unsubscribe { channel } => {
            conn.session.unsubscribe(&channel);
            send(conn, reply::unsubscribed(&channel, &id)).await
        }
        Op::Presence { channel } => presence(conn, &channel, &id).await,
        Op::Ping => send(conn, reply::pong(&id)).await,
        Op::Auth { token } => authenticate(conn, &token, &id).await,
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
    if !app
        .delivery
        .policy
        .rule_of(channel)
        .tracks_presence(channel)
    {
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

/// A WebSocket command from a client, before its type is checked.
///
/// Kept loose on purpose so an `error` reply can echo the `id` of a command
/// that is otherwise wrong.
#[derive(Debug, serde::Deserialize)]
pub struct Command {
    /// `subscribe`, `unsubscribe`, `ping`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Any JSON value, echoed in the reply.
    #[serde(default)]
    pub id: Option<Value>,
    /// For `subscribe` and `unsubscribe`.
    #[serde(default)]
    pub channel: Option<String>,
    /// For `subscribe`: only these event types.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// For `auth`: a bearer token.
    #[serde(default)]
    pub token: Option<String>,
    /// For `subscribe`: resume after this message id of the channel.
    #[serde(default)]
    pub since: Option<String>,
}

/// A command, its type checked.
#[derive(Debug)]
enum Op {
    Subscribe {
        channel: String,
        events: Option<Vec<String>>,
        since: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    Presence {
        channel: String,
    },
    Ping,
    Auth {
        token: String,
    },
}

impl Command {
    /// What the command asks, or why it is refused (its `id` taken out
    /// first, for the reply).
    fn op(self) -> Result<Op, Refusal> {
        let Command {
            kind,
            channel,
            events,
            token,
            since,
            ..
        } = self;
        let missing = |what: &str| Refusal::BadRequest(format!("missing {what}"));
        let channel = || channel.ok_or_else(|| missing("channel"));
        match kind.as_deref() {
            Some("subscribe") => Ok(Op::Subscribe {
                channel: channel()?,
                events,
                since,
            }),
            Some("unsubscribe") => Ok(Op::Unsubscribe {
                channel: channel()?,
            }),
            Some("presence") => Ok(Op::Presence {
                channel: channel()?,
            }),
            Some("ping") => Ok(Op::Ping),
            Some("auth") => token
                .map(|token| Op::Auth { token })
                .ok_or_else(|| missing("token")),
            Some(other) => Err(Refusal::BadRequest(format!(
                "unknown message type `{other}`"
            ))),
            None => Err(missing("`type`")),
        }
    }
}

/// crier's replies, each one text frame. They are per-connection and
/// rare, so building them with `json!` is fine.
mod reply {
    use serde_json::{json, Value};

    use crate::history::StreamId;
    use crate::protocol::members_json;
    use crate::refusal::Refusal;

    fn with_id(mut v: Value, id: &Option<Value>) -> String {
        if let (Some(id), Some(obj)) = (id, v.as_object_mut()) {
            obj.insert("id".into(), id.clone());
        }
        v.to_string()
    }

    /// First frame on every connection.
    pub(super) fn welcome(conn: u64) -> String {
        json!({"type": "welcome", "conn": conn.to_string(), "version": crate::VERSION}).to_string()
    }

    /// A subscription is live. `recovered` answers a `since`: whether
    /// everything after it was delivered (false: a `gap` follows).
    /// `position` is where a later `since` may resume from.
    pub(super) fn subscribed(
        channel: &str,
        recovered: Option<bool>,
        position: Option<StreamId>,
        id: &Option<Value>,
    ) -> String {
        let mut v = json!({"type": "subscribed", "channel": channel});
        if let Some(recovered) = recovered {
            v["recovered"] = json!(recovered);
        }
        if let Some(position) = position {
            v["position"] = json!(position.to_string());
        }
        with_id(v, id)
    }

    /// A subscription ended at the client's request.
    pub(super) fn unsubscribed(channel: &str, id: &Option<Value>) -> String {
        with_id(json!({"type": "unsubscribed", "channel": channel}), id)
    }

    /// A subscription ended by crier: the connection's credential no
    /// longer grants the channel.
    pub(super) fn revoked(channel: &str, reason: &str) -> String {
        json!({"type": "unsubscribed", "channel": channel, "reason": reason}).to_string()
    }

    /// The answer to a `presence` request.
    pub(super) fn presence(
        channel: &str,
        count: u64,
        listed: &[(String, String)],
        id: &Option<Value>,
    ) -> String {
        let mut v = members_json(channel, count, listed);
        v["type"] = json!("presence");
        with_id(v, id)
    }

    /// Answer to `ping`.
    pub(super) fn pong(id: &Option<Value>) -> String {
        with_id(json!({"type": "pong"}), id)
    }

    /// A refused or malformed command: crier's WebSocket form of every
    /// [`Refusal`].
    pub(super) fn refused(refusal: &Refusal, id: &Option<Value>) -> String {
        with_id(
            json!({"type": "error", "code": refusal.code(), "reason": refusal.reason()}),
            id,
        )
    }

    /// The credential ends in `in_secs`: send a fresh one with `auth`.
    pub(super) fn expiring(in_secs: u64) -> String {
        json!({"type": "expiring", "in_secs": in_secs}).to_string()
    }

    /// An `auth` command was accepted.
    pub(super) fn authenticated(
        user: Option<&str>,
        expires_in: Option<u64>,
        id: &Option<Value>,
    ) -> String {
        with_id(
            json!({"type": "authenticated", "user": user, "expires_in": expires_in}),
            id,
        )
    }

    /// This instance is draining: reconnect after `after_ms`.
    pub(super) fn reconnect(after_ms: u64) -> String {
        json!({"type": "reconnect", "after_ms": after_ms}).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_echo_ids() {
        let refusal = Refusal::TooLarge("too big".into());
        let e: Value =
            serde_json::from_str(&reply::refused(&refusal, &Some(json!(7)))).expect("json");
        assert_eq!(
            e,
            json!({"type":"error","code":"too_large","reason":"too big","id":7})
        );
        let p: Value = serde_json::from_str(&reply::pong(&None)).expect("json");
        assert_eq!(p, json!({"type":"pong"}));
    }

    #[test]
    fn commands_are_typed_before_they_run() {
        let op = |text: &str| {
            let mut cmd: Command = serde_json::from_str(text).expect("json");
            cmd.id.take();
            cmd.op().map_err(|r| r.reason().into_owned())
        };
        let subscribe = op(r#"{"type":"subscribe","channel":"a","since":"oldest"}"#);
        assert!(
            matches!(subscribe, Ok(Op::Subscribe { ref channel, ref since, .. }) if channel == "a" && since.as_deref() == Some("oldest")),
            "{subscribe:?}"
        );
        assert_eq!(
            op(r#"{"type":"unsubscribe"}"#).err().as_deref(),
            Some("missing channel")
        );
        assert_eq!(
            op(r#"{"type":"auth"}"#).err().as_deref(),
            Some("missing token")
        );
        assert_eq!(op(r#"{"id":1}"#).err().as_deref(), Some("missing `type`"));
        assert_eq!(
            op(r#"{"type":"shout"}"#).err().as_deref(),
            Some("unknown message type `shout`")
        );
        assert!(matches!(op(r#"{"type":"ping"}"#), Ok(Op::Ping)));
    }
}
