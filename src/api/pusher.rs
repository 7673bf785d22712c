//! The Pusher HTTP API, as the Pusher server SDKs call it: every request
//! signed with the app's secret ([`super::sign`]), timestamps more than
//! 600 s off refused.
//!
//! - `POST /apps/{id}/events`: one event to up to 100 channels, without
//!   the connection `socket_id` when given;
//! - `POST /apps/{id}/batch_events`: up to 100 such events;
//! - `GET /apps/{id}/channels[?filter_by_prefix=…&info=user_count]`;
//! - `GET /apps/{id}/channels/{name}[?info=user_count]`;
//! - `GET /apps/{id}/channels/{name}/users` (presence channels);
//! - `POST /apps/{id}/users/{user}/terminate_connections`: every
//!   connection signed in as the user, on every instance, closed with
//!   4009 (a termination published on the user's channel).
//!
//! Events may go to a signed-in user's `#server-to-user-{id}` channel
//! (the SDKs' `sendToUser`).
//!
//! Events are published through crier's normal path (Redis or the memory
//! broker, history where a rule keeps it), so every instance delivers
//! them, to Pusher clients and crier's own alike.
//!
//! An app reaches only its own channels: names in requests are Pusher
//! names, in the app's namespace among crier's (`pusher::crier_channel`),
//! and listings show only the app's channels (`pusher::app_channel`),
//! never another app's or crier's own.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::config::PusherApp;
use crate::http::{json, status_of, Body};
use crate::protocol::{envelope, SocketId, TERMINATE};
use crate::pusher::sign::{self, Unsigned};
use crate::pusher::{app_channel, crier_channel, user_of_channel, valid_name, USER_CHANNEL};
use crate::refusal::Refusal;

/// Channels one event may go to (Pusher's limit).
const MAX_CHANNELS: usize = 100;
/// Events in one batch.
const MAX_BATCH: usize = 100;
/// Longest event name (Pusher's limit).
const MAX_NAME: usize = 200;

/// One event to trigger.
#[derive(Deserialize)]
struct Trigger {
    name: String,
    data: Box<RawValue>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct Batch {
    batch: Vec<Trigger>,
}

/// Answers any `/apps/…` request.
pub(crate) async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match answer(&app, req).await {
        Ok(body) => json(StatusCode::OK, &body),
        Err(refusal) => refused(&refusal),
    }
}

/// The Pusher HTTP API's form of a refusal: crier's status for it
/// ([`status_of`]) and `{"error": reason}`, the body the Pusher server
/// SDKs read (nothing else: no `WWW-Authenticate` or `Retry-After`).
fn refused(refusal: &Refusal) -> Response<Body> {
    json(status_of(refusal), &json!({"error": refusal.reason()}))
}

async fn answer(app: &App, req: Request<Incoming>) -> Result<Value, Refusal> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/apps/").unwrap_or_default();
    let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
    let pusher_app = app.pusher.by_id(id).cloned().ok_or(Refusal::NotFound)?;
    let method = req.method().clone();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let body = super::read_body(app, req).await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    sign::verify_request(&pusher_app, method.as_str(), &path, &query, &body, now).map_err(
        |why: Unsigned| {
            app.metrics
                .rejected
                .with_label_values(&["pusher_signature"])
                .inc();
            Refusal::Unauthorized(why.reason())
        },
    )?;
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let wants_users = param("info").is_some_and(|i| i.split(',').any(|x| x == "user_count"));
    let wants_counts = asks_counts(&pusher_app, param("info")).map_err(bad)?;
    match (&method, what.split('/').collect::<Vec<_>>().as_slice()) {
        (&Method::POST, ["events"]) => {
            let trigger: Trigger = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("expected an event: {e}")))?;
            let event = Event::checked(&pusher_app, trigger).map_err(bad)?;
            event.publish(app).await
        }
        (&Method::POST, ["batch_events"]) => {
            let batch: Batch = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("expected {{\"batch\": [events]}}: {e}")))?;
            if batch.batch.len() > MAX_BATCH {
                return Err(bad(format!("at most {MAX_BATCH} events per batch")));
            }
            // Every event checked before any is published: a batch with
            // a bad event publishes nothing, so a client that fixes it
            // and retries sends each event once.
            let events = batch
                .batch
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    Event::checked(&pusher_app, t).map_err(|why| bad(format!("batch[{i}]: {why}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut answers = Vec::with_capacity(events.len());
            for event in events {
                answers.push(event.publish(app).await?);
            }
            Ok(json!({"batch": answers}))
        }
        (&Method::GET, ["channels"]) => {
            let prefix = param("filter_by_prefix").unwrap_or("");
            if wants_users && !prefix.starts_with("presence-") {
                let why = "info=user_count needs filter_by_prefix=presence-";
                return Err(bad(why));
            }
            let listed: Vec<String> = occupied(app)
                .await?
                .into_iter()
                .filter(|c| app_channel(&pusher_app, c).is_some_and(|n| n.starts_with(prefix)))
                .collect();
            let counts = match wants_counts {
                true => app.listeners(&listed).await?,
                false => Vec::new(),
            };
            let mut channels = Map::new();
            for (i, channel) in listed.iter().enumerate() {
                let mut info = json!({});
                if wants_users {
                    info["user_count"] = json!(user_count(app, channel).await?);
                }
                if let Some(count) = counts.get(i) {
                    info["subscription_count"] = json!(count);
                }
                let name = app_channel(&pusher_app, channel).unwrap_or(channel);
                channels.insert(name.to_owned(), info);
            }
            Ok(json!({"channels": channels}))
        }
        (&Method::GET, ["channels", name]) => {
            let channel = named(&pusher_app, name).map_err(bad)?;
            let presence = name.starts_with("presence-");
            let count = match presence {
                true => user_count(app, &channel).await?,
                false => 0,
            };
            let occupied = count > 0 || occupied(app).await?.contains(&channel);
            let mut info = json!({"occupied": occupied});
            if wants_users {
                if !presence {
                    return Err(bad("user_count is only for presence channels"));
                }
                info["user_count"] = json!(count);
            }
            if wants_counts {
                let counts = app.listeners(std::slice::from_ref(&channel)).await?;
                info["subscription_count"] = json!(counts.first().copied().unwrap_or(0));
            }
            Ok(info)
        }
        (&Method::GET, ["channels", name, "users"]) => {
            let channel = named(&pusher_app, name).map_err(bad)?;
            if !name.starts_with("presence-") {
                return Err(bad("users are only listed for presence channels"));
            }
            let members = app
                .members(&channel)
                .await
                .map_err(|_| Refusal::Unavailable)?;
            let users: Vec<Value> = members
                .listed
                .iter()
                .map(|(id, _)| json!({"id": id}))
                .collect();
            Ok(json!({"users": users}))
        }
        (&Method::POST, ["users", user, "terminate_connections"]) => {
            crate::pusher::valid_user_id(user).map_err(bad)?;
            let channel = crier_channel(&pusher_app, &format!("{USER_CHANNEL}{user}"));
            let payload = envelope(TERMINATE, None, None, "{}");
            app.delivery
                .broker
                .publish_live(&channel, &payload)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "pusher termination not published");
                    Refusal::Unavailable
                })?;
            Ok(json!({}))
        }
        _ => Err(Refusal::NotFound),
    }
}

/// Whether `info` asks for `subscription_count`, which only an app with
/// `subscription_count = true` answers (as on Pusher, where it is an app
/// setting).
fn asks_counts(pusher_app: &PusherApp, info: Option<&str>) -> Result<bool, &'static str> {
    let asked = info.is_some_and(|i| i.split(',').any(|x| x == "subscription_count"));
    match asked && !pusher_app.subscription_count {
        true => Err("info=subscription_count needs the app's subscription_count = true"),
        false => Ok(asked),
    }
}

/// A request the API cannot take (400); `why` says what is wrong.
fn bad(why: impl Into<String>) -> Refusal {
    Refusal::BadRequest(why.into())
}

/// An app's channel among crier's, from its Pusher name in a request; the
/// error says what is wrong with the name.
fn named(pusher_app: &PusherApp, name: &str) -> Result<String, String> {
    valid_name(name).map_err(|why| format!("bad channel `{name}`: {why}"))?;
    Ok(crier_channel(pusher_app, name))
}

/// One event, checked whole and ready to publish: its channels (crier's
/// names, in the app's namespace) and its payload.
struct Event {
    channels: Vec<String>,
    payload: Vec<u8>,
    wants_users: bool,
    wants_counts: bool,
}

impl Event {
    /// `t`, checked; the error says what is wrong with it (a 400).
    fn checked(pusher_app: &PusherApp, t: Trigger) -> Result<Self, String> {
        let names = match (t.channels, t.channel) {
            (Some(channels), None) => channels,
            (None, Some(channel)) => vec![channel],
            _ => return Err("give `channels` (a list) or `channel`".into()),
        };
        if names.is_empty() || names.len() > MAX_CHANNELS {
            return Err(format!("between 1 and {MAX_CHANNELS} channels"));
        }
        if t.name.is_empty() || t.name.len() > MAX_NAME {
            return Err(format!("an event name of 1 to {MAX_NAME} bytes"));
        }
        if t.name.starts_with("pusher:") || t.name.starts_with("pusher_internal:") {
            return Err("event names starting with `pusher` are reserved".into());
        }
        // An app's channels, or a signed-in user's (`sendToUser`).
        let channels = names
            .iter()
            .map(|name| match user_of_channel(name) {
                Some(_) => Ok(crier_channel(pusher_app, name)),
                None => named(pusher_app, name),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exclude = match t.socket_id.as_deref() {
            None => None,
            Some(id) => Some(
                id.parse::<SocketId>()
                    .map_err(|_| format!("bad socket_id `{id}`"))?,
            ),
        };
        Ok(Event {
            channels,
            payload: envelope(&t.name, exclude, None, t.data.get()),
            wants_users: t
                .info
                .as_deref()
                .is_some_and(|i| i.split(',').any(|x| x == "user_count")),
            wants_counts: asks_counts(pusher_app, t.info.as_deref())?,
        })
    }

    /// Publishes to each channel; the answer Pusher gives (`user_count`
    /// of the presence channels with `info=user_count`).
    async fn publish(self, app: &App) -> Result<Value, Refusal> {
        for channel in &self.channels {
            app.delivery
                .broker
                .publish(channel, &self.payload)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "pusher event not published");
                    Refusal::Unavailable
                })?;
        }
        app.metrics.api_publications.inc();
        if !self.wants_users && !self.wants_counts {
            return Ok(json!({}));
        }
        let counts = match self.wants_counts {
            true => app.listeners(&self.channels).await?,
            false => Vec::new(),
        };
        let mut info = Map::new();
        for (i, channel) in self.channels.iter().enumerate() {
            let name = crate::pusher::local_name(channel);
            let mut about = Map::new();
            if self.wants_users && name.starts_with("presence-") {
                about.insert("user_count".into(), json!(user_count(app, channel).await?));
            }
            if let Some(count) = counts.get(i) {
                about.insert("subscription_count".into(), json!(count));
            }
            if !about.is_empty() {
                info.insert(name.to_owned(), Value::Object(about));
            }
        }
        Ok(json!({"channels": info}))
    }
}

async fn user_count(app: &App, channel: &str) -> Result<u64, Refusal> {
    let members = app
        .delivery
        .broker
        .presence_members(channel, 0)
        .await
        .map_err(|_| Refusal::Unavailable)?;
    Ok(members.count)
}

/// Channels with a listener somewhere in the fleet.
async fn occupied(app: &App) -> Result<Vec<String>, Refusal> {
    match app
        .delivery
        .broker
        .occupied()
        .await
        .map_err(|_| Refusal::Unavailable)?
    {
        Some(channels) => Ok(channels),
        None => Ok(app.delivery.hub.channels()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// What the Pusher server SDKs read of a refusal: the status, and
    /// `{"error": reason}` with nothing else, whatever crier's other HTTP
    /// answers carry.
    #[tokio::test]
    async fn a_refusal_is_a_status_and_an_error_alone() {
        let reserved = "batch[1]: event names starting with `pusher` are reserved";
        let too_large = "body larger than publish.max_body_bytes";
        let broker = "the broker is unavailable, try again later";
        for (refusal, status, error) in [
            (bad(reserved), 400, reserved),
            (
                Refusal::Unauthorized("invalid auth_signature"),
                401,
                "invalid auth_signature",
            ),
            (Refusal::NotFound, 404, "not found"),
            (Refusal::TooLarge(too_large.into()), 413, too_large),
            (Refusal::Unavailable, 503, broker),
        ] {
            let response = refused(&refusal);
            assert_eq!(response.status().as_u16(), status, "{refusal:?}");
            let headers: Vec<_> = response.headers().keys().collect();
            assert_eq!(headers, [http::header::CONTENT_TYPE], "{refusal:?}");
            let body = response.into_body().collect().await.expect("body");
            let body: Value = serde_json::from_slice(&body.to_bytes()).expect("json");
            assert_eq!(body, json!({ "error": error }), "{refusal:?}");
        }
    }
}
