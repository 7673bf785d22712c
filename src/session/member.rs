//! A connection's membership of a presence channel ([`crate::presence`]):
//! joined once the subscription is made, left when the subscription or
//! the connection ends.

use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::broker::Members;
use crate::protocol::SocketId;
use crate::refusal::Refusal;

/// Dropping it leaves the channel (in a task: a drop cannot wait).
pub(super) struct Member {
    app: Arc<App>,
    channel: String,
    user: String,
    /// How long after the drop the member leaves.
    linger: Duration,
}

impl Member {
    /// Joins `channel` as `user` with `info` (JSON) for the connection
    /// `socket`; the channel's members, this one included.
    pub(super) async fn join(
        app: &Arc<App>,
        channel: &str,
        user: &str,
        info: &str,
        socket: SocketId,
    ) -> Result<(Member, Members), Refusal> {
        let config = &app.config.presence;
        let members = app
            .delivery
            .presence
            .join(&app.delivery.broker, config, channel, user, info, socket)
            .await?;
        let member = Member {
            app: Arc::clone(app),
            channel: channel.to_owned(),
            user: user.to_owned(),
            linger: Duration::ZERO,
        };
        Ok((member, members))
    }

    /// The member leaves `linger` after it is dropped: a quick return
    /// (here or on another instance) is never seen leaving.
    pub(super) fn lingering(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    pub(super) fn channel(&self) -> &str {
        &self.channel
    }

    pub(super) fn user(&self) -> &str {
        &self.user
    }
}

/// A connection listening to a presence channel it is no member of (a
/// watchlist): while any does, this instance's beat reads the channel
/// (see [`crate::presence::Presence::watch`]). Dropping it stops.
pub(super) struct Watching {
    app: Arc<App>,
    channel: String,
}

impl Watching {
    pub(super) fn new(app: &Arc<App>, channel: &str) -> Self {
        app.delivery.presence.watch(channel);
        Self {
            app: Arc::clone(app),
            channel: channel.to_owned(),
        }
    }
}

impl Watching {
    pub(super) fn channel(&self) -> &str {
        &self.channel
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.app.delivery.presence.unwatch(&self.channel);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let app = Arc::clone(&self.app);
        let channel = std::mem::take(&mut self.channel);
        let user = std::mem::take(&mut self.user);
        let linger = self.linger;
        self.app.process.tasks.spawn(async move {
            if !linger.is_zero() {
                tokio::time::sleep(linger).await;
            }
            app.delivery
                .presence
                .leave(&app.delivery.broker, &channel, &user)
                .await;
        });
    }
}
