//! The HTTP APIs for apps. `POST /api/publish`: publishing over HTTP, for
//! apps without a Redis client and for the embedded memory broker;
//! `GET /api/presence`: a presence channel's members. The Pusher HTTP API
//! is [`pusher`].
//!
//! Body: `{"channel": "x", "data": <any JSON>}`; `data` is published verbatim,
//! exactly as `PUBLISH x '<data>'` would. Keys are compared in constant time.

pub(crate) mod pusher;

use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::{App, ConnInfo};
use crate::http::{json, refused, Body};
use crate::origin::add_cors;
use crate::policy::validate_channel;
use crate::refusal::Refusal;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    channel: String,
    data: Box<RawValue>,
}

/// Handles one publish request. A page on an allowed origin may read the
/// answer (CORS), whatever it is.
pub(crate) async fn publish(
    app: Arc<App>,
    req: Request<Incoming>,
    info: ConnInfo,
) -> Response<Body> {
    let origin = app.gate.origins.check(req.headers());
    let mut response = match try_publish(&app, req, &info).await {
        Ok(id) => {
            app.metrics.api_publications.inc();
            let mut body = serde_json::json!({"ok": true});
            if let Some(id) = id {
                body["id"] = serde_json::json!(id.to_string());
            }
            json(StatusCode::OK, &body)
        }
        Err(refusal) => refused(&refusal),
    };
    add_cors(response.headers_mut(), &origin);
    response
}

async fn try_publish(
    app: &App,
    req: Request<Incoming>,
    info: &ConnInfo,
) -> Result<Option<crate::history::StreamId>, Refusal> {
    authorize(app, &req, info)?;
    let body = read_body(app, req).await?;
    let request: PublishRequest = serde_json::from_slice(&body).map_err(|e| {
        Refusal::BadRequest(format!(
            "expected {{\"channel\": \"name\", \"data\": <json>}}: {e}"
        ))
    })?;
    validate_channel(&request.channel)
        .map_err(|why| Refusal::BadRequest(format!("bad channel name: {why}")))?;
    app.delivery
        .broker
        .publish(&request.channel, request.data.get().as_bytes())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "publish failed");
            Refusal::Unavailable
        })
}

/// A request's body, at most `publish.max_body_bytes`.
pub(crate) async fn read_body(app: &App, req: Request<Incoming>) -> Result<bytes::Bytes, Refusal> {
    let limit = app.config.publish.max_body_bytes;
    Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::TooLarge("body larger than publish.max_body_bytes".into())
            } else {
                Refusal::BadRequest(format!("cannot read body: {e}"))
            }
        })
}

/// With keys configured, one must match. Without, only dev mode publishes,
/// and only for clients on this machine.
pub(crate) fn authorize<B>(app: &App, req: &Request<B>, info: &ConnInfo) -> Result<(), Refusal> {
    let keys = &app.config.publish.api_keys;
    if keys.is_empty() {
        return if app.config.dev && info.peer.ip().is_loopback() {
            Ok(())
        } else if app.config.dev {
            Err(Refusal::Forbidden(
                "dev mode accepts keyless publishing from loopback only",
            ))
        } else {
            Err(Refusal::Forbidden(
                "publish API disabled: configure publish.api_keys",
            ))
        };
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(crate::auth::bearer)
        .ok_or(Refusal::Unauthorized("missing bearer API key"))?;
    if crate::auth::matches_a_secret(presented.as_bytes(), keys) {
        Ok(())
    } else {
        Err(Refusal::Unauthorized("bad API key"))
    }
}

/// `GET /api/presence?channel=…` (API key): a presence channel's members,
/// `{"channel", "count", "members": [{"user", "info"}]}` (at most
/// `presence.max_listed` listed; `count` is exact).
pub(crate) async fn presence(
    app: Arc<App>,
    req: Request<Incoming>,
    info: ConnInfo,
) -> Response<Body> {
    if let Err(refusal) = authorize(&app, &req, &info) {
        return refused(&refusal);
    }
    let Some(channel) = crate::http::query_param(req.uri(), "channel") else {
        return refused(&Refusal::BadRequest("missing `channel`".into()));
    };
    if !app
        .delivery
        .policy
        .rule_of(&channel)
        .tracks_presence(&channel)
    {
        let reason =
            format!("`{channel}` is not a presence channel (no rule with presence = true)");
        return refused(&Refusal::BadRequest(reason));
    }
    match app.members(&channel).await {
        Ok(members) => {
            let body = crate::protocol::members_json(&channel, members.count, &members.listed);
            json(StatusCode::OK, &body)
        }
        Err(refusal) => refused(&refusal),
    }
}
