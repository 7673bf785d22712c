//! The command line: `crier` (serve), `crier check-config`, `crier publish`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};

use crate::config::{
    config_path, process_env, Config, ConfigError, LogFormat, LogOverride, Overrides, RedisOverride,
};

/// crier: Redis pub/sub to browsers over WebSocket and SSE.
#[derive(Debug, Parser)]
#[command(name = "crier", version, about, long_about = None)]
pub struct Cli {
    /// What to do; without a command, serve.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file (also `CRIER_CONFIG`).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Redis URL (overrides `redis.url`).
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Serving flags: given before any command, they apply to serving.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Flags that only mean something to a serving crier (and to
/// `check-config`, which shows what it would serve with). Not global, so
/// `crier publish --help` does not offer them.
#[derive(Debug, Default, Clone, PartialEq, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Development mode: memory broker, every channel open, demo page at `/`.
    #[arg(long)]
    pub dev: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print it, secrets redacted.
    CheckConfig {
        /// The serving flags to apply, as `crier` would.
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Print a shell completion script, e.g. `crier completions bash >
    /// /etc/bash_completion.d/crier`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// Stands in for the global `--config`, hidden: the script needs no
        /// configuration, so `crier completions --help` does not offer it.
        /// (clap gives a subcommand no global flag whose id it defines.)
        #[arg(long, hide = true, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The same for `--redis-url`.
        #[arg(long, hide = true, value_name = "URL")]
        redis_url: Option<String>,
    },
    /// Publish one event, to Redis or to a running crier's HTTP API.
    Publish {
        /// Channel name.
        channel: String,
        /// Payload: JSON is sent as is, anything else as a string.
        payload: String,
        /// Base URL of a running crier (e.g. http://127.0.0.1:8080 or
        /// https://events.example.com); without it, publish straight to
        /// Redis.
        #[arg(long, value_name = "URL")]
        api: Option<String>,
        /// API key for `--api` (also `CRIER_API_KEY`).
        #[arg(long, env = "CRIER_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// PEM file of CA certificates to trust for an https `--api`, besides
        /// the system's (`SSL_CERT_FILE` replaces the system's).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
}

impl Cli {
    /// The command-line layer of the configuration.
    pub fn overrides(&self) -> Overrides {
        let serve = match &self.command {
            Some(Command::CheckConfig { serve }) => serve,
            _ => &self.serve,
        };
        Overrides {
            listen: serve.listen,
            dev: serve.dev.then_some(true),
            redis: self.redis_url.clone().map(|url| RedisOverride { url }),
            log: serve.log_format.map(|format| LogOverride { format }),
        }
    }

    /// Parses the command line; exits with a usage error (as clap does)
    /// when serving flags come before a command they mean nothing to.
    pub fn parse_args() -> Self {
        let cli = Self::parse();
        if cli.command.is_some() && cli.serve != ServeArgs::default() {
            use clap::CommandFactory;
            Self::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--listen, --log-format and --dev are for serving: give them without a \
                     command (or after `check-config`)",
                )
                .exit();
        }
        cli
    }

    /// Writes the completion script for `shell` to `out`.
    pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
        use clap::CommandFactory;
        clap_complete::generate(shell, &mut Self::command(), "crier", out);
    }

    /// Loads the configuration from every layer. For a command (not
    /// serving) it also makes the checks serving makes when it builds its
    /// parts ([`crate::server::check`]), so `check-config` refuses what
    /// serving would; serving makes them by building, once.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let path = config_path(self.config.clone());
        let config = Config::load(path.as_deref(), process_env(), &self.overrides())?;
        if self.command.is_some() {
            crate::server::check(&config)?;
        }
        Ok(config)
    }
}

/// How `crier publish` reaches a running crier (`--api`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Api<'a> {
    /// Base URL, `http://` or `https://`.
    pub base: Option<&'a str>,
    /// Bearer key.
    pub key: Option<&'a str>,
    /// Extra CA certificates (PEM) for https.
    pub ca_file: Option<&'a std::path::Path>,
}

/// `crier publish`.
pub async fn publish(
    config: &Config,
    channel: &str,
    payload: &str,
    api: Api<'_>,
) -> anyhow::Result<String> {
    crate::policy::validate_channel(channel)
        .map_err(|why| anyhow::anyhow!("bad channel name: {why}"))?;
    if let Some(base) = api.base {
        return publish_http(base, api, channel, payload).await;
    }
    if !config.redis.is_configured() {
        bail!("no Redis configured: pass --redis-url (or redis.url, or [redis.sentinel]), or --api URL to publish through a running crier");
    }
    let id = crate::broker::publish_once(config, channel, payload.as_bytes())
        .await
        .context("publishing to Redis")?;
    Ok(match id {
        Some(id) => format!("published with history, id {id}"),
        None => "published (the channel keeps no history)".to_string(),
    })
}

async fn publish_http(
    base: &str,
    api: Api<'_>,
    channel: &str,
    payload: &str,
) -> anyhow::Result<String> {
    let api_key = api.key;
    let url = url::Url::parse(base)
        .and_then(|u| u.join("api/publish"))
        .with_context(|| format!("--api {base}: not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!(
            "--api {base}: use an http:// or https:// URL, not {}://",
            url.scheme()
        );
    }
    let data: serde_json::Value = serde_json::from_str(payload)
        .unwrap_or_else(|_| serde_json::Value::String(payload.to_owned()));
    let body = serde_json::json!({"channel": channel, "data": data}).to_string();
    let mut request =
        http::Request::post("/").header(http::header::CONTENT_TYPE, "application/json");
    if let Some(key) = api_key {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let client = crate::outbound::Client::new("--ca-file", api.ca_file, PUBLISH_TIMEOUT, 64 * 1024)
        .map_err(anyhow::Error::msg)?;
    let answer = client
        .send(&url, request, Bytes::from(body))
        .await
        .map_err(|e| anyhow::anyhow!("{base}: {e}"))?;
    let status = answer.status;
    let text = String::from_utf8_lossy(&answer.body);
    if status.is_success() {
        let id = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_owned));
        Ok(match id {
            Some(id) => format!("published with history, id {id}"),
            None => format!("published ({status})"),
        })
    } else if status == http::StatusCode::UNAUTHORIZED {
        let how = if api_key.is_some() {
            "the key given with --api-key or CRIER_API_KEY is not one of the server's \
             publish.api_keys"
        } else {
            "give one of the server's publish.api_keys with --api-key KEY or the \
             CRIER_API_KEY variable"
        };
        bail!("{status}: {}: {how}", text.trim())
    } else {
        bail!("{status}: {}", text.trim())
    }
}

/// How long `crier publish --api` waits for the whole exchange.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
