//! Admission: everything checked before a stream opens, the same for every
//! wire protocol, in order — the page's origin, the credentials, the
//! channels named in the request, then connection limits.

use std::sync::Arc;

use http::{HeaderMap, Uri};

use crate::app::App;
use crate::auth::{Failure, Principal};
use crate::limits::Admitted;
use crate::metrics::Transport;
use crate::origin::Verdict;
use crate::policy::Rule;
use crate::refusal::Refusal;

/// A connection that may open: who it is, its slot, and what its origin
/// check found (the CORS headers of an SSE response depend on it).
pub(crate) struct Admission {
    pub(super) principal: Principal,
    pub(super) admitted: Admitted,
    /// The origin check's verdict.
    pub(crate) origin: Verdict,
    /// The channels the request named, and their rules.
    pub(super) rules: Vec<(String, Arc<Rule>)>,
}

/// Admits a `transport` request from `peer` for `channels`, or says why not.
pub(crate) async fn admit(
    app: &App,
    transport: Transport,
    headers: &HeaderMap,
    uri: &Uri,
    peer: std::net::IpAddr,
    channels: &[String],
) -> Result<Admission, Refusal> {
    let origin = app.gate.origins.check(headers);
    if origin == Verdict::Refused {
        return Err(Refusal::Forbidden("origin not allowed"));
    }
    let principal = match app.gate.auth.from_request(headers, uri, peer).await {
        Ok(found) => found.unwrap_or_default(),
        // The session store or webhook is down: try again, not "logged out".
        Err(failure) if failure.is_outage() => return Err(Refusal::SessionStoreUnavailable),
        Err(failure) => return Err(Refusal::Unauthorized(failure.reason())),
    };
    let limit = app.config.limits.max_subscriptions_per_connection;
    if channels.len() > limit {
        return Err(Refusal::TooManySubscriptions { limit });
    }
    let rules = channels
        .iter()
        .map(|channel| {
            let rule = resolve(app, channel, &principal);
            rule.map(|rule| (channel.clone(), rule))
                .map_err(|r| query_token_hint(app, uri, r))
        })
        .collect::<Result<_, _>>()?;
    let gauge = app.metrics.connections(transport).clone();
    let admitted = app
        .gate
        .limits
        .admit(peer, principal.user.as_deref(), gauge)?;
    Ok(Admission {
        principal,
        admitted,
        origin,
        rules,
    })
}

/// What an anonymous client refused for want of credentials is told when
/// it sent `?token=` while query tokens are off: otherwise a bare `missing`
/// leaves it wondering why its token was not read. Starts with `missing`,
/// the reason clients already know.
pub(crate) const QUERY_TOKEN_OFF: &str = "missing: ?token= is ignored while auth.query_token is \
     off; send the token as Authorization: Bearer, or set auth.query_token = true";

/// [`QUERY_TOKEN_OFF`] in place of a plain `missing`, when it applies.
fn query_token_hint(app: &App, uri: &Uri, refusal: Refusal) -> Refusal {
    match refusal {
        Refusal::Unauthorized(_)
            if !app.config.auth.query_token && crate::http::query_param(uri, "token").is_some() =>
        {
            Refusal::Unauthorized(QUERY_TOKEN_OFF)
        }
        other => other,
    }
}

/// May `who` hear `channel`, and what do the rules say of it? The channel
/// rules decide; an anonymous client refused for want of credentials
/// counts as a `missing` auth failure.
pub(super) fn resolve(app: &App, channel: &str, who: &Principal) -> Result<Arc<Rule>, Refusal> {
    let decided = app.delivery.policy.resolve(channel, who);
    if let Err(Refusal::Unauthorized(_)) = decided {
        app.gate.auth.count(Failure::Missing);
    }
    decided
}
