//! The two client transports. Both admit a connection the same way before
//! any stream opens — origin, credentials, channel rules, limits — and both
//! read from the same per-connection queue fed by the hub.

use http::{HeaderMap, Uri};

use crate::app::{Admitted, App};
use crate::auth::{Failure, Principal};
use crate::http::Refused;
use crate::metrics::Transport;
use crate::origin::Verdict;
use crate::policy::Refusal;

pub mod resume;
pub mod sse;
pub mod ws;

/// A connection that may open.
struct Admission {
    principal: Principal,
    admitted: Admitted,
    origin: Verdict,
}

/// Everything checked before a stream opens, in order: the page's origin,
/// the credentials, the requested channels, then connection limits.
async fn admit(
    app: &App,
    transport: Transport,
    headers: &HeaderMap,
    uri: &Uri,
    peer: std::net::IpAddr,
    channels: &[String],
) -> Result<Admission, Refused> {
    let origin = app.origins.check(headers);
    if origin == Verdict::Refused {
        return Err(Refused::Forbidden("origin not allowed"));
    }
    let principal = match app.auth.from_request(headers, uri).await {
        Ok(found) => found.unwrap_or_default(),
        Err(Failure::StoreUnavailable) => return Err(Refused::SessionStoreUnavailable),
        Err(failure) => return Err(Refused::Unauthorized(failure.reason())),
    };
    check_channels(app, channels, &principal)?;
    let admitted = app.admit(transport, peer, principal.user.as_deref())?;
    Ok(Admission {
        principal,
        admitted,
        origin,
    })
}

/// Checks channels named in a request's query: count, names and rules.
fn check_channels(app: &App, channels: &[String], who: &Principal) -> Result<(), Refused> {
    if channels.len() > app.config.limits.max_subscriptions_per_connection {
        return Err(Refused::TooManySubscriptions);
    }
    for channel in channels {
        match app.policy.may_subscribe(channel, who) {
            Ok(()) => {}
            Err(Refusal::BadName(why)) => {
                return Err(Refused::BadRequest(format!("bad channel name: {why}")))
            }
            Err(Refusal::NeedsAuth) => {
                app.auth.count(Failure::Missing);
                return Err(Refused::Unauthorized(Failure::Missing.reason()));
            }
            Err(Refusal::Forbidden) => return Err(Refused::Forbidden("forbidden")),
        }
    }
    Ok(())
}
