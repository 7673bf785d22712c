//! HTTP plumbing shared by every route: the body type, the one place that
//! turns a refusal into a response, and query parsing.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use serde_json::json;

use crate::metrics::Metrics;
use crate::protocol::{event_filter, Filter, MAX_EVENT_TYPES};
use crate::refusal::Refusal;

/// Every response body crier sends.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A complete body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The HTTP status that says `refusal`.
pub(crate) fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::BadRequest(_) | Refusal::TooManySubscriptions { .. } => StatusCode::BAD_REQUEST,
        Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
        Refusal::TooManyConnections { .. } | Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Refusal::AtCapacity | Refusal::Unavailable | Refusal::SessionStoreUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// The HTTP answer to a refusal: its status and
/// `{"error": code, "reason": text}`, with the headers the status calls for.
pub(crate) fn refused(refusal: &Refusal) -> Response<Body> {
    let status = status_of(refusal);
    let reason = refusal.reason();
    let mut r = json(status, &json!({"error": refusal.code(), "reason": &reason}));
    match status {
        StatusCode::UNAUTHORIZED => {
            // RFC 6750: the reason travels as error_description too.
            let challenge = format!(
                "Bearer realm=\"crier\", error=\"invalid_token\", error_description=\"{reason}\""
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        StatusCode::UPGRADE_REQUIRED => {
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        _ => {}
    }
    r
}

/// [`refused`], counted in `crier_connections_rejected_total`: for a
/// stream (`/sse`, `/ws`) refused before it opened.
pub(crate) fn rejected(metrics: &Metrics, refusal: &Refusal) -> Response<Body> {
    metrics.rejected.with_label_values(&[refusal.label()]).inc();
    refused(refusal)
}

/// Longest query string accepted on `/sse` and `/ws`, in bytes: room for
/// 64 channels of 256 bytes. (The whole request head is capped at
/// [`MAX_HEAD_BYTES`].) A WebSocket client with more to say subscribes
/// with messages.
pub const MAX_QUERY_BYTES: usize = 16 * 1024;

/// Largest request head (request line and headers) crier reads: cookies and
/// a bearer token fit; anything larger is answered 431 by hyper.
pub(crate) const MAX_HEAD_BYTES: usize = 32 * 1024;

/// The first `name=` parameter of `uri`'s query string, decoded: for the
/// single values a request may carry there (`token`, `last_event_id`).
pub(crate) fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The `since` that starts a subscription at the oldest message still in
/// the channel's history (SSE `?since=oldest`, WebSocket `"since":"oldest"`).
pub(crate) const OLDEST: &str = "oldest";

/// The channels and event filter a `/sse` or `/ws` request asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StreamQuery {
    /// Every `channel=` parameter, in order, without duplicates.
    pub channels: Vec<String>,
    /// `events=a,b`: only these event types.
    pub events: Option<Filter>,
    /// `since=oldest`: channels without a position in the client's
    /// cursor start at the oldest message still in their history.
    pub from_oldest: bool,
}

impl StreamQuery {
    /// Parses the query string of `uri`, in one pass; the error is the
    /// reason a client is told (400).
    pub fn parse(uri: &http::Uri) -> Result<Self, String> {
        let raw = uri.query().unwrap_or_default();
        if raw.len() > MAX_QUERY_BYTES {
            return Err(format!("query string longer than {MAX_QUERY_BYTES} bytes"));
        }
        let mut channels = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut events: Option<Vec<String>> = None;
        let mut from_oldest = false;
        for (key, value) in url::form_urlencoded::parse(raw.as_bytes()) {
            match &*key {
                "since" if value == OLDEST => from_oldest = true,
                "since" => {
                    return Err(format!(
                        "since: `{OLDEST}` is the one value (a position comes as Last-Event-ID)"
                    ))
                }
                "channel" if seen.insert(value.clone()) => channels.push(value.into_owned()),
                "events" => {
                    let list = events.get_or_insert_with(Vec::new);
                    list.extend(
                        value
                            .split(',')
                            .map(str::trim)
                            .filter(|e| !e.is_empty())
                            .map(str::to_owned),
                    );
                    if list.len() > MAX_EVENT_TYPES {
                        break;
                    }
                }
                _ => {}
            }
        }
        Ok(StreamQuery {
            channels,
            from_oldest,
            events: events.map(event_filter).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_collects_channels_and_events() {
        let uri: http::Uri = "/sse?channel=a&channel=b%3Ac&channel=a&events=x,%20y,&x=1"
            .parse()
            .expect("uri");
        let q = StreamQuery::parse(&uri).expect("valid");
        assert_eq!(q.channels, vec!["a", "b:c"]);
        assert_eq!(
            q.events.as_deref(),
            Some(&["x".to_string(), "y".to_string()][..])
        );
    }

    fn parse(query: &str) -> Result<StreamQuery, String> {
        StreamQuery::parse(&format!("/sse?{query}").parse().expect("uri"))
    }

    #[test]
    fn limits_are_enforced_at_cap_plus_one() {
        let names = |n: usize, len: usize| {
            (0..n)
                .map(|i| format!("{i:0len$}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(parse(&format!("channel=a&events={}", names(32, 128))).is_ok());
        let too_many = parse(&format!("channel=a&events={}", names(33, 3))).unwrap_err();
        assert!(too_many.contains("at most 32"), "{too_many}");
        let too_long = parse(&format!("channel=a&events={}", names(1, 129))).unwrap_err();
        assert!(too_long.contains("128 bytes"), "{too_long}");
        let fits = format!("channel={}", "a".repeat(MAX_QUERY_BYTES - 8));
        assert!(parse(&fits).is_ok());
        let over = format!("channel={}", "a".repeat(MAX_QUERY_BYTES - 7));
        assert!(parse(&over).unwrap_err().contains("16384 bytes"));
    }

    #[test]
    fn many_duplicate_channels_are_kept_once() {
        let q = parse(&"channel=a&channel=b&".repeat(700)).expect("valid");
        assert_eq!(q.channels, vec!["a", "b"]);
    }
}
