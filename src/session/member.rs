//! A connection's membership of a presence channel ([`crate::presence`]):
//! joined once the subscription is made, left when the subscription or
//! the connection ends.

use std::sync::Arc;

use crate::app::App;
use crate::broker::Members;
use crate::protocol::SocketId;
use crate::refusal::Refusal;

/// Dropping it leaves the channel (in a task: a drop cannot wait).
pub(super) struct Member {
    app: Arc<App>,
    channel: String,
    user: String,
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
        };
        Ok((member, members))
    }

    pub(super) fn channel(&self) -> &str {
        &self.channel
    }

    pub(super) fn user(&self) -> &str {
        &self.user
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let app = Arc::clone(&self.app);
        let channel = std::mem::take(&mut self.channel);
        let user = std::mem::take(&mut self.user);
        self.app.process.tasks.spawn(async move {
            app.delivery
                .presence
                .leave(&app.delivery.broker, &channel, &user)
                .await;
        });
    }
}
