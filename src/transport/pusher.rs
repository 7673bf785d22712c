//! `GET /app/{key}`: the Pusher Channels protocol (version 7), as
//! pusher-js and laravel-echo speak it: a [`Protocol`] on the WebSocket
//! driver.
//!
//! `pusher:subscribe` becomes a [`Session`](crate::session::Session)
//! subscription (signed channels checked against the app's secret first,
//! crier's channel rules always; a presence channel joined with the
//! signed member), `client-*` events are published to the channel's other
//! members through the broker, and publications become Pusher events.
//! Errors the client can act on are `pusher:error` with Pusher's codes,
//! and the close frame carries the same code: 4001 unknown app, 4009 not
//! allowed, 4100 over capacity or too slow (reconnect later), 4200
//! reconnect now (drain), 4201 silent too long.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::{App, ConnInfo};
use crate::config::PusherApp;
use crate::http::{rejected, status_of, Body};
use crate::metrics::Transport;
use crate::protocol::{envelope, Encoding, Kind, Publication};
use crate::pusher::{self, is_cache, sign, ChannelKind};
use crate::refusal::Refusal;
use crate::session::{admit, Commands, Grant, Presence, Start, Verdict};
use crate::transport::websocket::{
    self, text_frame, CloseCode, Conn, End, Farewell, Gone, Protocol,
};

/// Pusher's close codes, which `pusher:error` repeats.
mod code {
    use crate::transport::websocket::CloseCode;

    pub(super) const UNKNOWN_APP: CloseCode = CloseCode(4001);
    pub(super) const UNAUTHORIZED: CloseCode = CloseCode(4009);
    pub(super) const OVER_CAPACITY: CloseCode = CloseCode(4100);
    pub(super) const RECONNECT: CloseCode = CloseCode(4200);
    pub(super) const PONG_TIMEOUT: CloseCode = CloseCode(4201);
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
        None => {
            let message = format!("App key {key} not in this cluster");
            Err(closing(code::UNKNOWN_APP, message.into()))
        }
        Some(pusher_app) => {
            let peer = info.peer.ip();
            let admission = admit(&app, Transport::Pusher, req.headers(), req.uri(), peer, &[]);
            match admission.await {
                Ok(admission) => Ok((admission, Pusher::new(&app, pusher_app))),
                Err(refusal) => {
                    app.metrics
                        .rejected
                        .with_label_values(&[refusal.label()])
                        .inc();
                    Err(closing(terms(&refusal).close, refusal.reason()))
                }
            }
        }
    };
    websocket::handle(&app, req, info, admitted)
}

/// How Pusher tells a client of a refusal: the one mapping from crier's
/// refusals to Pusher's terms.
struct Terms {
    /// The close code, for a refused connection.
    close: CloseCode,
    /// `pusher:subscription_error`'s `type`.
    kind: &'static str,
    /// `pusher:subscription_error`'s `status`.
    status: u16,
}

fn terms(refusal: &Refusal) -> Terms {
    let status = status_of(refusal).as_u16();
    let close = match refusal {
        Refusal::AtCapacity
        | Refusal::TooManyConnections { .. }
        | Refusal::Unavailable
        | Refusal::SessionStoreUnavailable => code::OVER_CAPACITY,
        _ => code::UNAUTHORIZED,
    };
    let kind = match status {
        401 | 403 => "AuthError",
        _ => "SubscriptionError",
    };
    Terms {
        close,
        kind,
        status,
    }
}

/// `pusher:error` with `code`, then the close frame with the same code.
fn closing(code: CloseCode, message: std::borrow::Cow<'static, str>) -> Farewell {
    (Some(error_frame(Some(code.0), &message)), (code, message))
}

/// A `pusher:error` event.
fn error_frame(code: Option<u16>, message: &str) -> Vec<u8> {
    let error = json!({"event": "pusher:error", "data": {"code": code, "message": message}});
    error.to_string().into_bytes()
}

/// The Pusher protocol on one connection of `app`.
pub(crate) struct Pusher {
    app: Arc<PusherApp>,
    client_events: Commands,
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

impl Protocol for Pusher {
    const TRANSPORT: Transport = Transport::Pusher;

    const DEFLATED: Option<Encoding> = Some(Encoding::PusherDeflated);

    fn frame(p: &Publication) -> Bytes {
        frame(p)
    }

    async fn open(&mut self, conn: &mut Conn) -> Result<(), Gone> {
        if let Some(within) = self.app.user_authentication_timeout {
            conn.session.must_sign_in(within);
        }
        let established = json!({
            "socket_id": conn.session.socket_id().to_string(),
            "activity_timeout": conn.app().config.pusher.activity_timeout.as_secs(),
        });
        let established = established.to_string();
        send_event(conn, "pusher:connection_established", None, &established).await
    }

    async fn message(&mut self, conn: &mut Conn, text: String) -> Result<(), Gone> {
        match serde_json::from_str::<Incoming>(&text) {
            Ok(message) => self.handle(conn, message).await,
            Err(e) => error(conn, None, &format!("not a Pusher message: {e}")).await,
        }
    }

    fn refusal(&self, refusal: &Refusal) -> Vec<u8> {
        match refusal {
            Refusal::RateLimited => error_frame(None, "too many messages, slow down"),
            other => error_frame(None, &other.reason()),
        }
    }

    /// Pusher has no refresh: the connection ends with the credential.
    fn expiring(&self, _in_secs: u64) -> Option<Vec<u8>> {
        None
    }

    fn heartbeat(&self) -> Option<Vec<u8>> {
        Some(event_text("pusher:ping", None, "{}").into_bytes())
    }

    fn ending(&self, end: &End) -> Farewell {
        let (code, reason) = match end {
            End::Expired => (code::UNAUTHORIZED, "credential expired"),
            End::Reconnect { .. } => (code::RECONNECT, "server restarting, reconnect"),
            End::Slow => (code::OVER_CAPACITY, "too slow: queue full"),
            End::Idle => (code::PONG_TIMEOUT, "pong reply not received"),
            End::TooLong { .. } => (CloseCode::TOO_BIG, "message too large"),
            End::Broken(code, reason) => (*code, *reason),
            End::Flooding => (code::UNAUTHORIZED, "rate limit exceeded"),
            End::Terminated => (code::UNAUTHORIZED, "the app ended this user's connections"),
            End::NotSignedIn => (
                code::UNAUTHORIZED,
                "not signed in within the app's user_authentication_timeout",
            ),
            End::Refused(refusal) => return closing(terms(refusal).close, refusal.reason()),
        };
        closing(code, reason.into())
    }
}

impl Pusher {
    fn new(app: &App, pusher_app: Arc<PusherApp>) -> Self {
        let rate = app.config.pusher.client_events_per_second;
        Self {
            app: pusher_app,
            client_events: Commands::new(rate, rate),
        }
    }

    async fn handle(&mut self, conn: &mut Conn, message: Incoming) -> Result<(), Gone> {
        let data = match message.data {
            // Some clients send data as a JSON string.
            Some(Value::String(text)) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            Some(data) => data,
            None => Value::Null,
        };
        match message.event.as_str() {
            "pusher:ping" => send_event(conn, "pusher:pong", None, "{}").await,
            "pusher:pong" => Ok(()),
            "pusher:subscribe" => match serde_json::from_value::<Subscribe>(data) {
                Ok(subscribe) => self.subscribe(conn, subscribe).await,
                Err(e) => error(conn, None, &format!("bad pusher:subscribe: {e}")).await,
            },
            "pusher:unsubscribe" => {
                // The signed-in user's channel stays with the sign-in.
                let channel = data.get("channel").and_then(Value::as_str);
                if let Some(channel) = channel.filter(|c| !c.starts_with('#')) {
                    let channel = pusher::crier_channel(&self.app, channel);
                    conn.session.unsubscribe(&channel);
                }
                Ok(())
            }
            event if event.starts_with("client-") => {
                self.client_event(conn, event, message.channel, data).await
            }
            "pusher:signin" => self.sign_in(conn, data).await,
            other => error(conn, None, &format!("unsupported event `{other}`")).await,
        }
    }

    /// `pusher:subscribe`. `channel` is the app's name; its crier channel
    /// (`named`) is in the app's namespace: what the session, the rules,
    /// history and presence see.
    async fn subscribe(&mut self, conn: &mut Conn, request: Subscribe) -> Result<(), Gone> {
        let channel = request.channel;
        let refuse = |kind: &'static str, reason: &str, status: u16| {
            subscription_error(&channel, kind, reason, status)
        };
        if channel.starts_with('#') {
            // `#server-to-user-{id}`: subscribed at sign-in, and only
            // the user's own.
            let signed_in = conn.session.signed_in();
            if signed_in.is_some() && pusher::user_of_channel(&channel) == signed_in {
                let succeeded = "pusher_internal:subscription_succeeded";
                return send_event(conn, succeeded, Some(&channel), "{}").await;
            }
            let reason = "only the user signed in on this connection may subscribe to its channel";
            return send(conn, refuse("AuthError", reason, 403)).await;
        }
        if let Err(reason) = pusher::valid_name(&channel) {
            return send(conn, refuse("SubscriptionError", &reason, 400)).await;
        }
        let kind = ChannelKind::of(&channel);
        let channel_data = match kind {
            ChannelKind::Presence => request.channel_data.as_deref(),
            _ => None,
        };
        if kind.signed() {
            let verified = sign::verify_channel_auth(
                &self.app,
                &conn.session.socket_id().to_string(),
                &channel,
                channel_data,
                request.auth.as_deref(),
            );
            if let Err(reason) = verified {
                tracing::info!(%channel, reason, "pusher subscription refused");
                conn.app()
                    .gate
                    .auth
                    .count(crate::auth::Failure::BadSignature);
                return send(conn, refuse("AuthError", reason, 401)).await;
            }
        }
        let presence = match (kind, channel_data) {
            (ChannelKind::Presence, None) => {
                let reason = "a presence channel needs channel_data";
                return send(conn, refuse("AuthError", reason, 401)).await;
            }
            (ChannelKind::Presence, Some(data)) => {
                let member = serde_json::from_str::<ChannelData>(data)
                    .map_err(|_| "channel_data must be {\"user_id\": …, \"user_info\": …}")
                    .and_then(member_of);
                match member {
                    Ok((user, info)) => Presence::Join { user, info },
                    Err(reason) => return send(conn, refuse("AuthError", reason, 400)).await,
                }
            }
            // A channel crier's own rules make a presence channel: its
            // members, read only.
            _ => Presence::Watch,
        };
        let cache = is_cache(&channel);
        let subscription = crate::session::Request {
            start: if cache { Start::LastEvent } else { Start::Now },
            grant: if kind.signed() {
                Grant::Signature
            } else {
                Grant::Credential
            },
            presence,
            ..crate::session::Request::new(pusher::crier_channel(&self.app, &channel))
        };
        let subscribed = match conn.session.subscribe(subscription).await {
            Ok(subscribed) => subscribed,
            Err(refusal) => {
                tracing::info!(%channel, reason = %refusal.reason(), "pusher subscription refused");
                let terms = terms(&refusal);
                let error = refuse(terms.kind, &refusal.reason(), terms.status);
                return send(conn, error).await;
            }
        };
        let data = match &subscribed.members {
            Some(members) => presence_data(members),
            None => "{}".to_owned(),
        };
        let succeeded = "pusher_internal:subscription_succeeded";
        send_event(conn, succeeded, Some(&channel), &data).await?;
        if cache && subscribed.last_event != Some(true) {
            send_event(conn, "pusher:cache_miss", Some(&channel), "{}").await?;
            if self.app.webhooks_list("cache_miss") {
                let channel = pusher::crier_channel(&self.app, &channel);
                let fields = vec![("name", "cache_miss".into()), ("channel", channel)];
                record(conn.app(), fields);
            }
        }
        Ok(())
    }

    /// `pusher:signin`: the app's signature of the user data for this
    /// connection, checked; the user's channel subscribed (and its
    /// terminations heard), the user made present for its watchers, and
    /// the users it watches followed. A bad sign-in closes the connection
    /// with 4009, as Pusher does.
    async fn sign_in(&mut self, conn: &mut Conn, data: Value) -> Result<(), Gone> {
        let socket = conn.session.socket_id().to_string();
        let checked = serde_json::from_value::<SignIn>(data)
            .map_err(|e| format!("bad pusher:signin: {e}"))
            .and_then(|request| {
                sign::verify_user_auth(&self.app, &socket, &request.user_data, &request.auth)
                    .map_err(|why| {
                        conn.app()
                            .gate
                            .auth
                            .count(crate::auth::Failure::BadSignature);
                        format!("sign-in refused: {why}")
                    })?;
                let max = conn.app().config.pusher.max_watchlist;
                UserData::checked(&request.user_data, max)
            });
        let user = match checked {
            Ok(user) => user,
            Err(reason) => {
                tracing::info!(%reason, "pusher sign-in refused");
                conn.end(End::Refused(Refusal::BadRequest(reason)));
                return Ok(());
            }
        };
        let own = pusher::crier_channel(&self.app, &format!("{}{}", pusher::USER_CHANNEL, user.id));
        let online =
            |id: &str| pusher::crier_channel(&self.app, &format!("{}{id}", pusher::ONLINE_CHANNEL));
        let signed = async {
            conn.session.sign_in(&user.id, own).await?;
            conn.session
                .present(&online(&user.id), WATCHLIST_LINGER)
                .await?;
            let mut online_now = Vec::new();
            for watched in &user.watchlist {
                let members = conn.session.watch_presence(&online(watched)).await?;
                if members.count > 0 {
                    online_now.push(watched.as_str());
                }
            }
            Ok::<_, Refusal>(online_now)
        };
        let online_now = match signed.await {
            Ok(online_now) => online_now,
            Err(refusal) => {
                tracing::info!(reason = %refusal.reason(), "pusher sign-in refused");
                conn.end(End::Refused(refusal));
                return Ok(());
            }
        };
        let success = json!({"user_data": user.data}).to_string();
        send_event(conn, "pusher:signin_success", None, &success).await?;
        if !online_now.is_empty() {
            let text = watchlist_event(&[("online", &online_now)]);
            send(conn, text).await?;
        }
        Ok(())
    }

    async fn client_event(
        &mut self,
        conn: &mut Conn,
        event: &str,
        channel: Option<String>,
        data: Value,
    ) -> Result<(), Gone> {
        let Some(channel) = channel else {
            return error(conn, None, "a client event needs a channel").await;
        };
        let kind = ChannelKind::of(&channel);
        let channel = pusher::crier_channel(&self.app, &channel);
        if !conn.session.is_subscribed(&channel) {
            return error(conn, None, "client events go to a subscribed channel").await;
        }
        if !kind.signed() {
            let reason = "client events are only allowed on private and presence channels";
            return error(conn, None, reason).await;
        }
        if kind == ChannelKind::Encrypted {
            let reason = "client events are not allowed on encrypted channels";
            return error(conn, None, reason).await;
        }
        if !self.app.client_events {
            return error(conn, None, "client events are disabled for this app").await;
        }
        if self.client_events.take() != Verdict::Go {
            let reason = "client event rejected: rate limit exceeded";
            return error(conn, Some(code::CLIENT_EVENT_RATE), reason).await;
        }
        // On a presence channel, who the sender joined as.
        let user = conn.session.member(&channel);
        let payload = envelope(
            event,
            Some(conn.session.socket_id()),
            user,
            &data.to_string(),
        );
        let app = Arc::clone(conn.app());
        if let Err(e) = app.delivery.broker.publish_live(&channel, &payload).await {
            tracing::warn!(error = %e, "client event not published");
            return error(conn, None, "the broker is unavailable, try again later").await;
        }
        if self.app.webhooks_list("client_event") {
            let mut fields = vec![
                ("name", "client_event".to_owned()),
                ("channel", channel.clone()),
                ("event", event.to_owned()),
                ("data", data.to_string()),
                ("socket_id", conn.session.socket_id().to_string()),
            ];
            if let Some(user) = conn.session.member(&channel) {
                fields.push(("user_id", user.to_owned()));
            }
            record(&app, fields);
        }
        Ok(())
    }
}

/// How long a signed-in user stays online for their watchers after their
/// last connection closed: a reconnect within it (a page reload, a
/// drain's move to another instance) is never seen as going offline.
pub(crate) const WATCHLIST_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// `pusher:signin`'s data, as pusher-js sends what the app's user
/// authentication endpoint returned.
#[derive(Deserialize)]
struct SignIn {
    auth: String,
    user_data: String,
}

/// The signed `user_data`, checked.
struct UserData {
    /// As signed: `pusher:signin_success` hands it back.
    data: String,
    id: String,
    watchlist: Vec<String>,
}

impl UserData {
    /// `data` read: an `id` that can name the user's channel, and a
    /// `watchlist` of at most `max` such ids.
    fn checked(data: &str, max: usize) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Fields {
            id: Value,
            #[serde(default)]
            watchlist: Vec<Value>,
        }
        let fields: Fields = serde_json::from_str(data)
            .map_err(|e| format!("user_data must be a JSON object with an id: {e}"))?;
        let id_of = |v: Value| match v {
            Value::String(id) => pusher::valid_user_id(&id).map(|()| id),
            _ => Err("a user id must be a string".to_owned()),
        };
        let id = id_of(fields.id).map_err(|why| format!("user_data's id: {why}"))?;
        if fields.watchlist.len() > max {
            return Err(format!("a watchlist of at most {max} users"));
        }
        let mut watchlist = Vec::with_capacity(fields.watchlist.len());
        for watched in fields.watchlist {
            let watched = id_of(watched).map_err(|why| format!("user_data's watchlist: {why}"))?;
            if !watchlist.contains(&watched) {
                watchlist.push(watched);
            }
        }
        Ok(Self {
            data: data.to_owned(),
            id,
            watchlist,
        })
    }
}

/// `pusher_internal:watchlist_events`, as pusher-js reads it: each
/// `(name, user ids)` one event.
fn watchlist_event(events: &[(&str, &[&str])]) -> String {
    let events: Vec<Value> = events
        .iter()
        .map(|(name, ids)| json!({"name": name, "user_ids": ids}))
        .collect();
    event_text(
        "pusher_internal:watchlist_events",
        None,
        &json!({ "events": events }).to_string(),
    )
}

/// `pusher:subscription_error` for `channel`.
fn subscription_error(channel: &str, kind: &str, reason: &str, status: u16) -> String {
    let data = json!({"type": kind, "error": reason, "status": status});
    event_text(
        "pusher:subscription_error",
        Some(channel),
        &data.to_string(),
    )
}

/// `pusher:error` without closing.
async fn error(conn: &mut Conn, code: Option<u16>, message: &str) -> Result<(), Gone> {
    conn.send(&error_frame(code, message)).await
}

/// A protocol event whose data is `data` (JSON, sent as a string, as
/// Pusher does).
fn event_text(event: &str, channel: Option<&str>, data: &str) -> String {
    let mut message = json!({"event": event, "data": data});
    if let Some(channel) = channel {
        message["channel"] = json!(channel);
    }
    message.to_string()
}

async fn send_event(
    conn: &mut Conn,
    event: &str,
    channel: Option<&str>,
    data: &str,
) -> Result<(), Gone> {
    send(conn, event_text(event, channel, data)).await
}

async fn send(conn: &mut Conn, text: String) -> Result<(), Gone> {
    conn.send(text.as_bytes()).await
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
        if let Some(user) = pusher::user_online(&p.channel) {
            // A watched user's first connection, or last, anywhere.
            let name = match p.kind {
                Kind::Join => "online",
                Kind::Leave => "offline",
                _ => return Bytes::new(),
            };
            return text_frame(watchlist_event(&[(name, &[user])]).as_bytes());
        }
        if matches!(p.kind, Kind::Gap | Kind::Terminate) {
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

/// How often an instance tells its subscribers their channels' fleet-wide
/// subscription counts, when they changed.
const SUBSCRIPTION_COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The event carrying a channel's subscription count.
const SUBSCRIPTION_COUNT: &str = "pusher_internal:subscription_count";

/// Until `stop`, every second: the fleet-wide subscription count of each
/// channel with listeners here, of an app with `subscription_count`, read
/// from the lifecycle counts in one call, and sent to this instance's
/// listeners of each channel whose count changed since it last did
/// (`pusher_internal:subscription_count`, which pusher-js hands to
/// `pusher:subscription_count`). Each instance tells its own listeners:
/// nothing goes through Redis but the read.
pub(crate) async fn subscription_counts(app: Arc<App>, stop: tokio_util::sync::CancellationToken) {
    let apps: Vec<&PusherApp> = app
        .config
        .pusher
        .apps
        .iter()
        .filter(|a| a.subscription_count)
        .collect();
    if apps.is_empty() {
        return;
    }
    let mut told: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut every = tokio::time::interval(SUBSCRIPTION_COUNT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let channels: Vec<String> = app
            .delivery
            .hub
            .channels()
            .into_iter()
            .filter(|c| apps.iter().any(|a| pusher::app_channel(a, c).is_some()))
            .collect();
        let here: std::collections::HashSet<&String> = channels.iter().collect();
        told.retain(|c, _| here.contains(c));
        let counts = match app.listeners(&channels).await {
            Ok(counts) => {
                failing = false;
                counts
            }
            Err(_) if failing => continue,
            Err(_) => {
                tracing::warn!("subscription counts: not read, trying again each second");
                failing = true;
                continue;
            }
        };
        for (channel, count) in channels.iter().zip(counts) {
            // 0: this instance's listeners are not reported yet.
            if count == 0 || told.get(channel) == Some(&count) {
                continue;
            }
            told.insert(channel.clone(), count);
            let data = json!({ "subscription_count": count }).to_string();
            let payload = envelope(SUBSCRIPTION_COUNT, None, None, &data);
            app.delivery.hub.publish(channel, None, &payload);
        }
    }
}

/// Appends an event that happened once, here (a Pusher client event or
/// cache miss), to the stream, without making the connection wait. Does
/// nothing without a stream.
fn record(app: &Arc<crate::app::App>, mut fields: Vec<(&'static str, String)>) {
    let Some(stream) = crate::broker::events::Stream::of(&app.config) else {
        return;
    };
    // As every entry: when it happened.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    fields.push(("time_ms", now.to_string()));
    let app = Arc::clone(app);
    tokio::spawn(async move {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(e) = app.delivery.broker.events_append(&stream, &fields).await {
            tracing::warn!(error = %e, "lifecycle events: an event could not be recorded");
        }
    });
}
