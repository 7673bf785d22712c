//! `GET /app/{key}`: the Pusher Channels protocol (version 7), as
//! pusher-js and laravel-echo speak it, over the connection core.
//!
//! Framing only, like [`super::ws`]: `pusher:subscribe` becomes a
//! [`Session`] subscription (signed channels checked against the app's
//! secret first, crier's channel rules always), presence channels join
//! [`crate::presence`], `client-*` events are published to the channel's
//! other members through the broker, and session [`Event`]s become Pusher
//! events. Errors the client can act on are `pusher:error` with Pusher's
//! codes, and the close frame carries the same code: 4001 unknown app,
//! 4009 not allowed, 4100 over capacity or too slow (reconnect later),
//! 4200 reconnect now (drain), 4201 silent too long.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::app::{App, ConnInfo};
use crate::config::PusherApp;
use crate::history::StreamId;
use crate::http::{rejected, status_of, Body};
use crate::link::{Gone, Link};
use crate::metrics::Transport;
use crate::protocol::{envelope, Encoding, Kind, Publication};
use crate::pusher::{self, is_cache, sign, ChannelKind};
use crate::refusal::Refusal;
use crate::session::{admit, Admission, Event, Session, Verdict, Wire};
use crate::transport::websocket::{text_frame, upgrade, Close, CloseCode, Message, WebSocket};

/// Pusher's close codes, which `pusher:error` repeats.
mod code {
    use crate::transport::websocket::CloseCode;

    pub(super) const UNKNOWN_APP: CloseCode = CloseCode(4001);
    pub(super) const UNAUTHORIZED: CloseCode = CloseCode(4009);
    pub(super) const OVER_CAPACITY: CloseCode = CloseCode(4100);
    pub(super) const RECONNECT: CloseCode = CloseCode(4200);
    pub(super) const PONG_TIMEOUT: CloseCode = CloseCode(4201);
    pub(super) const TOO_BIG: CloseCode = CloseCode::TOO_BIG;
    /// A `pusher:error` code only: the connection stays.
    pub(super) const CLIENT_EVENT_RATE: u16 = 4301;
}

/// Answers `GET /app/{key}`: 101, then either the protocol or, for an
/// unknown app or a refused connection, `pusher:error` and the close
/// code that tells pusher-js whether to retry.
pub(crate) async fn handle<B>(
    app: Arc<App>,
    req: Request<B>,
    info: ConnInfo,
    key: &str,
) -> Response<Body>
where
    B: Send + 'static,
{
    if !hyper_tungstenite::is_upgrade_request(&req) {
        return rejected(&app.metrics, &Refusal::UpgradeRequired);
    }
    let admitted = match app.pusher.by_key(key).cloned() {
        None => Err((
            code::UNKNOWN_APP,
            format!("App key {key} not in this cluster"),
        )),
        Some(pusher_app) => {
            let admission = admit(
                &app,
                Transport::Pusher,
                req.headers(),
                req.uri(),
                info.peer.ip(),
                &[],
            )
            .await;
            match admission {
                Ok(admission) => Ok((admission, pusher_app)),
                Err(refusal) => {
                    app.metrics
                        .rejected
                        .with_label_values(&[refusal.label()])
                        .inc();
                    let code = match refusal {
                        Refusal::AtCapacity
                        | Refusal::TooManyConnections { .. }
                        | Refusal::Unavailable
                        | Refusal::SessionStoreUnavailable => code::OVER_CAPACITY,
                        _ => code::UNAUTHORIZED,
                    };
                    Err((code, refusal.reason().into_owned()))
                }
            }
        }
    };
    let task_app = Arc::clone(&app);
    upgrade(&app, req, info.slot, move |stream, early| async move {
        match admitted {
            Ok((admission, pusher_app)) => {
                serve(task_app, stream, early, pusher_app, info.peer, admission).await;
            }
            Err((code, message)) => refuse_connection(&task_app, stream, code, &message).await,
        }
    })
}

/// Tells a connection it may not stay, and closes it.
async fn refuse_connection(app: &App, stream: TcpStream, code: CloseCode, message: &str) {
    tracing::info!(code = code.0, message, "pusher connection refused");
    let link = Link::new(
        stream,
        app.config.ws.write_timeout,
        app.metrics.slow_client_disconnects.clone(),
    );
    let mut socket = WebSocket::new(link, app.config.limits.max_message_bytes, Vec::new());
    close_with_error(&mut socket, code, message).await;
}

/// `pusher:error` with `code`, then the close frame with the same code.
async fn close_with_error(socket: &mut WebSocket, code: CloseCode, message: &str) {
    if socket
        .send(&error_frame(Some(code.0), message))
        .await
        .is_ok()
    {
        socket.close(code, message).await;
    }
}

/// A `pusher:error` event.
fn error_frame(code: Option<u16>, message: &str) -> Vec<u8> {
    let error = json!({"event": "pusher:error", "data": {"code": code, "message": message}});
    error.to_string().into_bytes()
}

async fn serve(
    app: Arc<App>,
    stream: TcpStream,
    early: Vec<u8>,
    pusher_app: Arc<PusherApp>,
    peer: SocketAddr,
    admission: Admission,
) {
    let ws_config = &app.config.ws;
    let wire = Wire {
        transport: Transport::Pusher,
        heartbeat: ws_config.ping_interval,
        idle_timeout: Some(ws_config.idle_timeout),
        replay_overhead: 0,
        // Pusher's own form: made now, and sent as made (cached).
        replay_bytes: |p| frame(p).len(),
        peer,
    };
    let link = Link::new(
        stream,
        ws_config.write_timeout,
        app.metrics.slow_client_disconnects.clone(),
    );
    let socket = WebSocket::new(link, app.config.limits.max_message_bytes, early);
    let client_events = crate::session::Commands::new(
        app.config.pusher.client_events_per_second,
        app.config.pusher.client_events_per_second,
    );
    let session = Session::open(Arc::clone(&app), admission, wire);
    session.attach(socket.link.outlet(), frame);
    let span = session.span();
    let mut conn = Conn {
        app,
        pusher_app,
        session,
        socket,
        client_events,
        span,
    };
    tracing::debug!(parent: &conn.span, "pusher connection opened");
    if let Ok((code, reason)) = conn.serve().await {
        tracing::debug!(parent: &conn.span, code = code.0, reason, "closing pusher connection");
        close_with_error(&mut conn.socket, code, reason).await;
    }
    tracing::debug!(parent: &conn.span, "pusher connection closed");
}

struct Conn {
    app: Arc<App>,
    pusher_app: Arc<PusherApp>,
    session: Session,
    socket: WebSocket,
    client_events: crate::session::Commands,
    span: tracing::Span,
}

/// A client message: `{"event": …, "channel"?: …, "data"?: …}`.
#[derive(Deserialize)]
struct Incoming {
    event: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

/// `pusher:subscribe`'s data.
#[derive(Deserialize)]
struct Subscribe {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

/// A presence channel's `channel_data`, as the app signed it.
#[derive(Deserialize)]
struct ChannelData {
    user_id: Value,
    #[serde(default)]
    user_info: Option<Value>,
}

impl Conn {
    async fn serve(&mut self) -> Result<Close, Gone> {
        let established = json!({
            "socket_id": self.session.socket_id().to_string(),
            "activity_timeout": self.app.config.pusher.activity_timeout.as_secs(),
        });
        self.send_event(
            "pusher:connection_established",
            None,
            &established.to_string(),
        )
        .await?;
        loop {
            tokio::select! {
                biased;
                event = self.session.next() => match event {
                    Event::Deliver(first) => self.socket.deliver(&mut self.session, first, frame).await?,
                    // Pusher has no refresh: the connection ends with it.
                    Event::Expiring { .. } => {}
                    Event::Expired => {
                        tracing::info!(parent: &self.span, "credential ended, closing");
                        return Ok((code::UNAUTHORIZED, "credential expired"));
                    }
                    Event::Reconnect { .. } => {
                        return Ok((code::RECONNECT, "server restarting, reconnect"));
                    }
                    Event::Slow => {
                        tracing::info!(parent: &self.span, "client too slow: queue full, closing");
                        return Ok((code::OVER_CAPACITY, "too slow: queue full"));
                    }
                    Event::Flush => self.socket.link.flush().await?,
                    Event::Heartbeat => self.send_event("pusher:ping", None, "{}").await?,
                    Event::Idle => {
                        tracing::info!(parent: &self.span, "client silent for too long, closing");
                        return Ok((code::PONG_TIMEOUT, "pong reply not received"));
                    }
                },
                read = self.socket.read() => {
                    read?;
                    self.session.heard();
                    let span = self.span.clone();
                    if let Some(close) = Box::pin(self.messages().instrument(span)).await? {
                        return Ok(close);
                    }
                }
            }
        }
    }

    /// Handles every complete message the client sent.
    async fn messages(&mut self) -> Result<Option<Close>, Gone> {
        loop {
            let text = match self.socket.next().await? {
                None => return Ok(None),
                Some(Message::Text(text)) => text,
                Some(Message::Binary) => {
                    self.error(None, "binary frames are not supported").await?;
                    continue;
                }
                Some(Message::TooLong { size, max }) => {
                    tracing::info!(size, max, "message too large, closing");
                    return Ok(Some((code::TOO_BIG, "message too large")));
                }
                Some(Message::Broken(code, reason)) => {
                    tracing::info!(code = code.0, reason, "websocket protocol error, closing");
                    return Ok(Some((code, reason)));
                }
            };
            match self.session.take_command() {
                Verdict::Go => {}
                Verdict::SlowDown => {
                    self.error(None, "too many messages, slow down").await?;
                    continue;
                }
                Verdict::Close => return Ok(Some((code::UNAUTHORIZED, "rate limit exceeded"))),
            }
            let message: Incoming = match serde_json::from_str(&text) {
                Ok(m) => m,
                Err(e) => {
                    let reason = format!("not a Pusher message: {e}");
                    self.error(None, &reason).await?;
                    continue;
                }
            };
            self.message(message).await?;
        }
    }

    async fn message(&mut self, message: Incoming) -> Result<(), Gone> {
        let data = match message.data {
            // Some clients send data as a JSON string.
            Some(Value::String(text)) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            Some(data) => data,
            None => Value::Null,
        };
        match message.event.as_str() {
            "pusher:ping" => self.send_event("pusher:pong", None, "{}").await,
            "pusher:pong" => Ok(()),
            "pusher:subscribe" => match serde_json::from_value::<Subscribe>(data) {
                Ok(subscribe) => self.subscribe(subscribe).await,
                Err(e) => {
                    self.error(None, &format!("bad pusher:subscribe: {e}"))
                        .await
                }
            },
            "pusher:unsubscribe" => {
                if let Some(channel) = data.get("channel").and_then(Value::as_str) {
                    let channel = pusher::crier_channel(&self.pusher_app, channel);
                    self.session.unsubscribe(&channel);
                }
                Ok(())
            }
            event if event.starts_with("client-") => {
                self.client_event(event, message.channel, data).await
            }
            "pusher:signin" => {
                self.error(None, "user authentication (signin) is not supported")
                    .await
            }
            other => {
                let reason = format!("unsupported event `{other}`");
                self.error(None, &reason).await
            }
        }
    }

    /// `pusher:subscribe`. `channel` is the app's name; its crier channel
    /// (`named`) is in the app's namespace: what the session, the rules,
    /// history and presence see.
    async fn subscribe(&mut self, request: Subscribe) -> Result<(), Gone> {
        let channel = request.channel;
        if let Err(reason) = pusher::valid_name(&channel) {
            return self
                .subscription_error(&channel, "SubscriptionError", &reason, 400)
                .await;
        }
        let named = pusher::crier_channel(&self.pusher_app, &channel);
        let kind = ChannelKind::of(&channel);
        let socket_id = self.session.socket_id().to_string();
        if kind == ChannelKind::Encrypted {
            let reason = "encrypted channels are not supported by crier";
            return self
                .subscription_error(&channel, "UnsupportedError", reason, 400)
                .await;
        }
        let channel_data = match kind {
            ChannelKind::Presence => request.channel_data.as_deref(),
            _ => None,
        };
        if kind.signed() {
            let verified = sign::verify_channel_auth(
                &self.pusher_app,
                &socket_id,
                &channel,
                channel_data,
                request.auth.as_deref(),
            );
            if let Err(reason) = verified {
                tracing::info!(%channel, reason, "pusher subscription refused");
                self.app.auth.count(crate::auth::Failure::BadSignature);
                return self
                    .subscription_error(&channel, "AuthError", reason, 401)
                    .await;
            }
        }
        let member = match (kind, channel_data) {
            (ChannelKind::Presence, None) => {
                let reason = "a presence channel needs channel_data";
                return self
                    .subscription_error(&channel, "AuthError", reason, 401)
                    .await;
            }
            (ChannelKind::Presence, Some(data)) => {
                let member = serde_json::from_str::<ChannelData>(data)
                    .map_err(|_| "channel_data must be {\"user_id\": …, \"user_info\": …}")
                    .and_then(member_of);
                match member {
                    Ok(member) => Some(member),
                    Err(reason) => {
                        return self
                            .subscription_error(&channel, "AuthError", reason, 400)
                            .await;
                    }
                }
            }
            _ => None,
        };
        let since = match is_cache(&channel) {
            true => last_event_position(&Arc::clone(&self.app), &named).await,
            false => None,
        };
        let subscribed = match kind.signed() {
            true => self.session.subscribe_signed(&named, since).await,
            false => self.session.subscribe(&named, None, since, false).await,
        };
        if let Err(refusal) = subscribed {
            return self.refused(&channel, &refusal).await;
        }
        let mut data = "{}".to_owned();
        if let Some((user_id, info)) = member {
            match self.session.join(&named, &user_id, &info).await {
                Ok(members) => data = presence_data(&members),
                Err(refusal) => {
                    self.session.unsubscribe(&named);
                    return self.refused(&channel, &refusal).await;
                }
            }
        } else if self.app.policy.is_presence(&named) {
            // A presence channel subscribed without joining (crier's own
            // rules can make any channel one): the members, read only.
            if let Ok(members) = self.app.members(&named).await {
                data = presence_data(&members);
            }
        }
        self.send_event(
            "pusher_internal:subscription_succeeded",
            Some(&channel),
            &data,
        )
        .await?;
        if is_cache(&channel) && since.is_none() {
            self.send_event("pusher:cache_miss", Some(&channel), "{}")
                .await?;
        }
        Ok(())
    }

    async fn client_event(
        &mut self,
        event: &str,
        channel: Option<String>,
        data: Value,
    ) -> Result<(), Gone> {
        let Some(channel) = channel else {
            return self.error(None, "a client event needs a channel").await;
        };
        let kind = ChannelKind::of(&channel);
        let channel = pusher::crier_channel(&self.pusher_app, &channel);
        if !self.session.is_subscribed(&channel) {
            return self
                .error(None, "client events go to a subscribed channel")
                .await;
        }
        // On a presence channel, who the sender joined as.
        let user = self.session.member(&channel).map(str::to_owned);
        if !kind.signed() {
            return self
                .error(
                    None,
                    "client events are only allowed on private and presence channels",
                )
                .await;
        }
        if !self.pusher_app.client_events {
            return self
                .error(None, "client events are disabled for this app")
                .await;
        }
        if self.client_events.take() != Verdict::Go {
            let reason = "client event rejected: rate limit exceeded";
            return self.error(Some(code::CLIENT_EVENT_RATE), reason).await;
        }
        let payload = envelope(
            event,
            Some(self.session.socket_id()),
            user.as_deref(),
            &data.to_string(),
        );
        if let Err(e) = self.app.broker.publish_live(&channel, &payload).await {
            tracing::warn!(error = %e, "client event not published");
            return self
                .error(None, "the broker is unavailable, try again later")
                .await;
        }
        Ok(())
    }

    /// A subscription refused by crier's rules or limits.
    async fn refused(&mut self, channel: &str, refusal: &Refusal) -> Result<(), Gone> {
        tracing::info!(%channel, reason = %refusal.reason(), "pusher subscription refused");
        let status = status_of(refusal).as_u16();
        let kind = match status {
            401 | 403 => "AuthError",
            _ => "SubscriptionError",
        };
        self.subscription_error(channel, kind, &refusal.reason(), status)
            .await
    }

    async fn subscription_error(
        &mut self,
        channel: &str,
        kind: &str,
        reason: &str,
        status: u16,
    ) -> Result<(), Gone> {
        let data = json!({"type": kind, "error": reason, "status": status});
        self.send_event(
            "pusher:subscription_error",
            Some(channel),
            &data.to_string(),
        )
        .await
    }

    /// `pusher:error` without closing.
    async fn error(&mut self, code: Option<u16>, message: &str) -> Result<(), Gone> {
        self.socket.send(&error_frame(code, message)).await
    }

    /// Sends a protocol event whose data is `data` (JSON, sent as a
    /// string, as Pusher does).
    async fn send_event(
        &mut self,
        event: &str,
        channel: Option<&str>,
        data: &str,
    ) -> Result<(), Gone> {
        let mut message = json!({"event": event, "data": data});
        if let Some(channel) = channel {
            message["channel"] = json!(channel);
        }
        self.socket.send(message.to_string().as_bytes()).await
    }
}

/// For a cache channel: the position just before its last event, so
/// that subscribing from there replays exactly that event; `None` when
/// it has none (or keeps no history).
async fn last_event_position(app: &App, channel: &str) -> Option<StreamId> {
    app.policy.history_of(channel)?;
    let last = app.broker.position(channel).await.ok()?;
    let before = match last.seq {
        0 => StreamId {
            ms: last.ms.checked_sub(1)?,
            seq: u64::MAX,
        },
        seq => StreamId {
            ms: last.ms,
            seq: seq - 1,
        },
    };
    let found = app.broker.recover(channel, before, 1).await.ok()?;
    (found.entries.first().map(|(id, _)| *id) == Some(last)).then_some(before)
}

/// Longest presence member id, in bytes.
pub(crate) const MAX_USER_ID: usize = 128;
/// Largest presence `user_info`, as JSON (Pusher's limit): every member
/// list carries it, up to `presence.max_listed` times.
pub(crate) const MAX_USER_INFO: usize = 1024;

/// A presence member from its signed `channel_data`: the user id as a
/// string (apps sign numbers too; nothing else is an id), and the info
/// as JSON, each within its bound.
fn member_of(data: ChannelData) -> Result<(String, String), &'static str> {
    let user = match data.user_id {
        Value::String(s) if !s.is_empty() => s,
        Value::Number(n) => n.to_string(),
        _ => return Err("channel_data's user_id must be a non-empty string or a number"),
    };
    if user.len() > MAX_USER_ID {
        return Err("channel_data's user_id is over 128 bytes");
    }
    let info = data.user_info.unwrap_or(Value::Null).to_string();
    if info.len() > MAX_USER_INFO {
        return Err("channel_data's user_info is over 1024 bytes (as JSON)");
    }
    Ok((user, info))
}

/// `subscription_succeeded`'s data for a presence channel.
fn presence_data(members: &crate::broker::Members) -> String {
    let ids: Vec<&str> = members.listed.iter().map(|(id, _)| id.as_str()).collect();
    let hash: serde_json::Map<String, Value> = members
        .listed
        .iter()
        .map(|(id, info)| {
            (
                id.clone(),
                serde_json::from_str(info).unwrap_or(Value::Null),
            )
        })
        .collect();
    json!({"presence": {"ids": ids, "hash": hash, "count": members.count}}).to_string()
}

/// A publication as a Pusher event in one text frame, encoded once and
/// shared: `{"event":…,"channel":…,"data":"<string>"[,"user_id":…]}`.
/// A `gap` has no Pusher form: nothing is written.
fn frame(p: &Publication) -> Bytes {
    p.on_wire(Encoding::Pusher, |p| {
        if p.kind == Kind::Gap {
            return Bytes::new();
        }
        let data = p.data();
        let mut text = Vec::with_capacity(data.len() + p.channel.len() + 64);
        text.extend_from_slice(br#"{"event":"#);
        let _ = serde_json::to_writer(&mut text, p.pusher_event());
        text.extend_from_slice(br#","channel":"#);
        let _ = serde_json::to_writer(&mut text, pusher::local_name(&p.channel));
        text.extend_from_slice(br#","data":"#);
        if data.starts_with('"') {
            text.extend_from_slice(data.as_bytes());
        } else {
            let _ = serde_json::to_writer(&mut text, data);
        }
        if let Some(user) = &p.user_id {
            text.extend_from_slice(br#","user_id":"#);
            let _ = serde_json::to_writer(&mut text, user);
        }
        text.push(b'}');
        text_frame(&text)
    })
}
