//! The app's side: one connection publishing to the fleet's Redis, as an
//! app would, through a cluster client (it routes each command to the
//! shard that owns its channel or key) when Redis is a Cluster.

use std::time::Duration;

use super::procs::Redis;

#[derive(Clone)]
pub enum Publisher {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// A slow answer (Redis starved of CPU by the fleet on the same cores)
/// shows as latency; only a lost connection stops the run.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Publisher {
    pub async fn connect(redis: &Redis) -> Publisher {
        let urls = redis.urls();
        if redis.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(urls)
                .response_timeout(RESPONSE_TIMEOUT)
                .build()
                .expect("cluster client");
            Publisher::Cluster(client.get_async_connection().await.expect("cluster"))
        } else {
            let client = redis::Client::open(urls[0].as_str()).expect("url");
            let config =
                redis::AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .expect("redis");
            Publisher::Single(conn)
        }
    }

    /// The command an app publishes without history with: `PUBLISH` on one
    /// Redis; on a Cluster `SPUBLISH`, which reaches only the shard that
    /// owns the channel (a plain `PUBLISH` is copied to every node).
    pub fn plain(&self) -> &'static str {
        match self {
            Publisher::Single(_) => "PUBLISH",
            Publisher::Cluster(_) => "SPUBLISH",
        }
    }

    /// A publication without history.
    pub async fn publish(&self, channel: &str, payload: &str) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd(self.plain());
        cmd.arg(channel).arg(payload);
        self.query(cmd).await.map(drop)
    }

    /// A publication with history: `FCALL crier_publish 1 <channel>
    /// <payload>`, what apps call.
    pub async fn publish_with_history(
        &self,
        channel: &str,
        payload: &str,
    ) -> redis::RedisResult<()> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("crier_publish").arg(1).arg(channel).arg(payload);
        self.query(cmd).await.map(drop)
    }

    async fn query(&self, cmd: redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self.clone() {
            Publisher::Single(mut c) => cmd.query_async(&mut c).await,
            Publisher::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }
}
