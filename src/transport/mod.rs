//! The two client transports. Both refuse what they can before a stream
//! opens, and both read from the same per-connection queue fed by the hub.

use crate::app::App;
use crate::http::Refused;
use crate::policy::{Principal, Refusal};

pub mod sse;
pub mod ws;

/// Checks channels named in a request's query before anything is opened:
/// count, names and rules.
fn check_channels(app: &App, channels: &[String]) -> Result<(), Refused> {
    if channels.len() > app.config.limits.max_subscriptions_per_connection {
        return Err(Refused::TooManySubscriptions);
    }
    let anonymous = Principal::default();
    for channel in channels {
        match app.policy.may_subscribe(channel, &anonymous) {
            Ok(()) => {}
            Err(Refusal::BadName(why)) => {
                return Err(Refused::BadRequest(format!("bad channel name: {why}")))
            }
            Err(Refusal::Forbidden) => return Err(Refused::Forbidden("forbidden")),
        }
    }
    Ok(())
}
