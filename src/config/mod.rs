//! Typed configuration: defaults < TOML file < `CRIER_*` environment < flags.
//!
//! Everything an operator can set lives here, with a `///` on every field: these
//! comments are the reference that `docs/configuration.md` mirrors. The shape
//! is a contract: later versions add keys, never rename them. Loading is done
//! once, before serving; a bad value stops the start with [`EX_CONFIG`] and a
//! message naming the field.
//!
//! The shapes are split by concern, each section with the checks of its own
//! values beside it: `auth.rs` (`[auth]`), `channels.rs` (`[[channels]]`
//! rules and their history), `limits.rs` (`[limits]`), `pusher.rs`
//! (`[pusher]`, `[presence]`), `redis.rs` (`[redis]`), `transports.rs`
//! (`[ws]`, `[sse]`); this file holds the rest, and loading, the list of
//! checks ([`Config::validate`]) and redaction. Every module
//! may import config, so config imports no other crier module:
//! [`Config::validate`] checks what the values alone tell, and what only a
//! runtime part can judge (a Redis URL or TLS file, a channel pattern, a key
//! file, an allowed origin) is checked by building that part when the server
//! is built (`server::check` for `crier check-config`), with the same
//! messages and exit code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod auth;
mod channels;
mod events;
mod limits;
mod pusher;
mod redis;
mod transports;

pub use self::auth::{AuthConfig, JwtConfig, SessionConfig, Signing, WebhookConfig, WebhookMethod};
pub use self::channels::{ChannelRule, HistoryRule, Subscribe};
pub use self::events::{EventWebhook, EventsConfig, EVENT_NAMES};
pub use self::limits::LimitsConfig;
pub use self::pusher::{
    PresenceConfig, PusherApp, PusherConfig, PusherWebhook, WebhookFilter, PUSHER_WEBHOOK_EVENTS,
};
pub use self::redis::{ClusterConfig, RedisConfig, RedisTlsConfig, SentinelConfig};
pub use self::transports::{Compression, SseConfig, WsConfig};

/// Exit code for a configuration error (`EX_USAGE` in sysexits.h).
pub const EX_CONFIG: i32 = 64;

/// Where a payload names its event type unless configured otherwise
/// (`event_field`): its top-level `type`.
pub const DEFAULT_EVENT_FIELD: &str = "/type";

/// `CRIER_*` variables that are not configuration keys.
const NOT_KEYS: [&str; 2] = ["CONFIG", "API_KEY"];

/// The placeholder printed instead of a secret.
const REDACTED: &str = "<redacted>";

/// The whole configuration of one crier process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on for HTTP, WebSocket and SSE. Default
    /// `0.0.0.0:8080`, or `127.0.0.1:8080` in dev mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Development mode: memory broker unless a Redis URL is given, every
    /// channel open to anyone, the publish API open to loopback clients
    /// without a key, and a demo page at `/`. Never use in production.
    pub dev: bool,
    /// Logging.
    pub log: LogConfig,
    /// The Redis broker. Without `url`, the embedded memory broker is used.
    pub redis: RedisConfig,
    /// Channel rules, first match wins; a channel no rule matches is forbidden.
    pub channels: Vec<ChannelRule>,
    /// Resource limits.
    pub limits: LimitsConfig,
    /// The HTTP publish API.
    pub publish: PublishConfig,
    /// WebSocket transport.
    pub ws: WsConfig,
    /// Server-Sent Events transport.
    pub sse: SseConfig,
    /// Graceful shutdown on SIGTERM.
    pub shutdown: ShutdownConfig,
    /// Browser origins allowed to connect (WebSocket `Origin`, SSE CORS),
    /// e.g. `https://app.example.com` or `https://*.example.com`. Empty:
    /// same-origin pages and non-browser clients only.
    pub allowed_origins: Vec<String>,
    /// Authentication: bearer tokens and session cookies.
    pub auth: AuthConfig,
    /// JSON pointer to the string in a payload that names its event type
    /// (the SSE `event:` name, what `events=` filters on): `/type` by
    /// default, `/event_type`, `/event` (Laravel), `/meta/kind`. A
    /// `[[channels]]` rule may set its own.
    pub event_field: String,
    /// The Pusher Channels protocol (pusher-js, laravel-echo, the Pusher
    /// server SDKs).
    pub pusher: PusherConfig,
    /// Fleet-wide presence.
    pub presence: PresenceConfig,
    /// Lifecycle events: channels occupied and vacated, members added and
    /// removed, users online and offline, in a Redis stream.
    pub events: EventsConfig,
    /// crier's own webhooks for lifecycle events (Pusher apps have theirs
    /// in `[[pusher.apps]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<EventWebhook>,
}

/// How logs are written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `crier=debug,info`. `RUST_LOG` wins
    /// when set.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `POST /api/publish`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    /// Keys accepted as `Authorization: Bearer <key>`. Empty: the API is
    /// closed (in dev mode: open to loopback clients).
    pub api_keys: Vec<String>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
}

/// What happens on SIGTERM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Still serving, `/readyz` already 503: time for load balancers to stop
    /// sending new clients.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Window over which clients are told to reconnect, each at a random
    /// moment, so the next instances see no reconnect storm.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: None,
            dev: false,
            log: LogConfig::default(),
            redis: RedisConfig::default(),
            channels: Vec::new(),
            limits: LimitsConfig::default(),
            publish: PublishConfig::default(),
            ws: WsConfig::default(),
            sse: SseConfig::default(),
            shutdown: ShutdownConfig::default(),
            allowed_origins: Vec::new(),
            auth: AuthConfig::default(),
            event_field: DEFAULT_EVENT_FIELD.into(),
            pusher: PusherConfig::default(),
            presence: PresenceConfig::default(),
            events: EventsConfig::default(),
            webhooks: Vec::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_body_bytes: 1 << 20,
        }
    }
}

impl PublishConfig {
    /// A body limit above zero, and keys too long to guess.
    fn validate(&self) -> Result<(), ConfigError> {
        positive(&[("publish.max_body_bytes", self.max_body_bytes)])?;
        for (i, key) in self.api_keys.iter().enumerate() {
            if key.len() < 16 {
                return bad(
                    &format!("publish.api_keys[{i}]"),
                    "too short: use at least 16 characters",
                );
            }
        }
        Ok(())
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            drain: Duration::from_secs(10),
        }
    }
}

/// A configuration that cannot be used; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// From a message that starts with the field, `field: why`: what the
    /// parts built from the configuration (the policy, the authenticator,
    /// the origins, the Redis clients) say of a value they refuse.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Command-line settings that override every other layer. `None` = not given.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    /// `--listen`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--dev` (only `Some(true)` when given)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<bool>,
    /// `--redis-url`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisOverride>,
    /// `--log-format`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogOverride>,
}

/// `--redis-url`, nested like the file.
#[derive(Debug, Clone, Serialize)]
pub struct RedisOverride {
    /// The URL.
    pub url: String,
}

/// `--log-format`, nested like the file.
#[derive(Debug, Clone, Serialize)]
pub struct LogOverride {
    /// The format.
    pub format: LogFormat,
}

impl Config {
    /// Loads the layers: defaults, then the TOML `file`, then `CRIER_*`
    /// variables from `env` (`__` separates nesting levels), then `overrides`.
    ///
    /// `env` is passed in rather than read from the process so tests never
    /// mutate the process environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(env_provider(env));
        figment = figment.merge(Serialized::defaults(overrides));
        let config: Config = figment.extract().map_err(|e| {
            // One line per problem, each naming its key.
            ConfigError(
                e.into_iter()
                    .map(describe_figment_error)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: values that parse but make no sense, as
    /// far as the values alone tell. What only a runtime part can judge (a
    /// Redis URL or TLS file, a channel pattern, a key file, an allowed
    /// origin) is checked by building that part, once, when the server is
    /// built (`server::check` for `crier check-config`); config imports no
    /// other crier module.
    ///
    /// Each section checks its own values; one check spans two (an events
    /// stream needs Redis). The first problem found is the one reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        if let Err(e) = check_pointer(&self.event_field) {
            return bad("event_field", e);
        }
        for (i, rule) in self.channels.iter().enumerate() {
            rule.validate(i)?;
        }
        self.limits.validate()?;
        self.publish.validate()?;
        self.ws.validate()?;
        self.sse.validate()?;
        self.auth.validate()?;
        self.presence.validate()?;
        self.events.validate()?;
        let redis = self.redis.url.is_some()
            || self.redis.sentinel.is_some()
            || self.redis.cluster.is_some();
        if self.events.stream.is_some() && !redis {
            return bad(
                "events.stream",
                "needs Redis (redis.url, redis.sentinel or redis.cluster): the memory broker keeps no stream",
            );
        }
        events::check_webhooks(&self.webhooks)?;
        self.pusher.validate()?;
        let counted = self.pusher.apps.iter().position(|a| a.subscription_count);
        if let (Some(i), None) = (counted, &self.events.stream) {
            return bad(
                &format!("pusher.apps[{i}].subscription_count"),
                "needs events.stream: the fleet's listener counts are kept with the lifecycle events, e.g. [events] stream = \"crier:events\"",
            );
        }
        if self.has_webhooks() && self.events.stream.is_none() {
            return bad(
                "events.stream",
                "must be set for webhooks ([[webhooks]], pusher.apps[].webhooks): they are sent from it, e.g. stream = \"crier:events\"",
            );
        }
        Ok(())
    }

    /// Whether any lifecycle webhook is configured (crier's own, or a
    /// Pusher app's).
    pub fn has_webhooks(&self) -> bool {
        !self.webhooks.is_empty() || self.pusher.apps.iter().any(|a| !a.webhooks.is_empty())
    }

    /// Settings that load but are almost certainly not what the operator
    /// meant. Logged at start and printed by `crier check-config`; they do
    /// not stop the start (a deliberately closed instance is legitimate).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // Grants and claims come from bearer tokens, the app's webhook, and
        // (grants only) Pusher signatures.
        let claims = self.auth.jwt.is_some() || self.auth.webhook.is_some();
        let grants = claims || !self.pusher.apps.is_empty();
        for (i, rule) in self.channels.iter().enumerate() {
            if rule.subscribe == Subscribe::Claim && !grants {
                warnings.push(format!(
                    "channels[{i}]: subscribe = \"claim\" needs [auth.jwt], [auth.webhook] or \
                     [[pusher.apps]] (the grant is a token's channels claim, the webhook's \
                     channels, or a Pusher app's signature): this rule can never match"
                ));
            } else if rule.pattern.contains("{claim.") && !claims {
                warnings.push(format!(
                    "channels[{i}]: `{{claim.…}}` in the pattern needs [auth.jwt] or [auth.webhook] \
                     (claims come from bearer tokens or the webhook's info): this rule can never match"
                ));
            }
        }
        // A resume replays at most max_replay_messages; a client that missed
        // more gets a gap. History kept beyond that is never replayed.
        let replay = self.limits.max_replay_messages;
        for (i, rule) in self.channels.iter().enumerate() {
            if let Some(size) = rule
                .history
                .map(|h| h.size)
                .filter(|&size| size > replay as u64)
            {
                warnings.push(format!(
                    "channels[{i}].history.size = {size} keeps more than can be replayed: a \
                     resume replays at most limits.max_replay_messages ({replay}) messages and \
                     a client that missed more gets a gap; keep history.size at most {replay}"
                ));
            }
        }
        if self.channels.is_empty() && !self.dev {
            warnings.push(
                "no [[channels]] rules: every subscription will be refused (deny by default); \
                 add a rule such as pattern = \"public:*\", subscribe = \"anyone\""
                    .to_owned(),
            );
        }
        warnings
    }

    /// The address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.unwrap_or_else(|| {
            if self.dev {
                SocketAddr::from(([127, 0, 0, 1], 8080))
            } else {
                SocketAddr::from(([0, 0, 0, 0], 8080))
            }
        })
    }

    /// The configuration as TOML with every secret replaced by a placeholder,
    /// for `crier check-config`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.listen = Some(self.listen_addr());
        shown.publish.api_keys = vec![REDACTED.into(); self.publish.api_keys.len()];
        shown.redis.url = self.redis.url.as_deref().map(redact_url);
        shown.redis.password = self.redis.password.as_ref().map(|_| REDACTED.into());
        if let Some(cluster) = &mut shown.redis.cluster {
            for node in &mut cluster.nodes {
                *node = redact_url(node);
            }
        }
        if let Some(sentinel) = &mut shown.redis.sentinel {
            sentinel.password = sentinel.password.as_ref().map(|_| REDACTED.into());
            for node in &mut sentinel.nodes {
                *node = redact_url(node);
            }
        }
        for app in &mut shown.pusher.apps {
            app.secret = REDACTED.into();
            for hook in &mut app.webhooks {
                hook.url = redact_url(&hook.url);
            }
        }
        for hook in &mut shown.webhooks {
            hook.secret = REDACTED.into();
            hook.url = redact_url(&hook.url);
        }
        if let Some(hook) = &mut shown.auth.webhook {
            hook.url = redact_url(&hook.url);
        }
        if let Some(jwt) = &mut shown.auth.jwt {
            jwt.secret = jwt.secret.as_ref().map(|_| REDACTED.into());
            jwt.jwks_url = jwt.jwks_url.as_deref().map(redact_url);
        }
        if let Some(session) = &mut shown.auth.session {
            session.secrets = vec![REDACTED.into(); session.secrets.len()];
            session.redis_url = session.redis_url.as_deref().map(redact_url);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// An `event_field` is a JSON pointer into the payload (RFC 6901).
fn check_pointer(pointer: &str) -> Result<(), String> {
    if pointer.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "`{pointer}` is not a JSON pointer: start it with `/`, e.g. `/{}`",
            pointer.trim_start_matches('/')
        ))
    }
}

/// The error of a value that makes no sense: `field: why`.
fn bad(field: &str, why: impl std::fmt::Display) -> Result<(), ConfigError> {
    Err(ConfigError(format!("{field}: {why}")))
}

/// Sizes and counts that must be above zero, checked in order.
fn positive(fields: &[(&str, usize)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((field, _)) => bad(field, "must be greater than 0"),
        None => Ok(()),
    }
}

/// Durations that must be above zero, checked in order.
fn nonzero(fields: &[(&str, Duration)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, value)| value.is_zero()) {
        Some((field, _)) => bad(field, "must be longer than 0s"),
        None => Ok(()),
    }
}

/// `CRIER_REDIS__URL=x` → `redis.url = x`. `CRIER_CONFIG` (the file) and
/// `CRIER_API_KEY` (for `crier publish --api`) are not configuration keys.
fn env_provider(env: impl IntoIterator<Item = (String, String)>) -> impl figment::Provider {
    let vars: Vec<(String, String)> = env
        .into_iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("CRIER_")?;
            (!NOT_KEYS.contains(&key) && !key.is_empty()).then(|| (key.to_ascii_lowercase(), v))
        })
        .collect();
    // figment's Env reads the process; feed it our own list instead.
    let mut dict = figment::value::Dict::new();
    for (key, value) in vars {
        let parsed: figment::value::Value = value.parse().unwrap_or_else(|_| value.clone().into());
        insert_nested(&mut dict, &key.split("__").collect::<Vec<_>>(), parsed);
    }
    EnvVars(dict)
}

/// The name of the `CRIER_*` layer in errors.
const ENV_SOURCE: &str = "CRIER_* environment variables";

/// The variable that sets the key at `path`: `["redis", "url"]` →
/// `CRIER_REDIS__URL`.
fn env_var(path: &[String]) -> String {
    format!("CRIER_{}", path.join("__").to_ascii_uppercase())
}

/// An error in the `CRIER_*` layer, said in terms of the variable: the
/// person reading it set a variable, not a key, and a `CRIER_*` variable
/// meant for something else (a script's `CRIER_URL`) must be named to be
/// found. `None`: the general wording does (it names the key).
fn describe_env_error(path: &[String], kind: &figment::error::Kind) -> Option<String> {
    use figment::error::Kind;
    let var = env_var(path);
    match kind {
        Kind::UnknownField(found, expected) => {
            // `CRIER_REDIS_URL`: one `_` where nesting needs `__`.
            let split = found.match_indices('_').find_map(|(i, _)| {
                let (outer, inner) = (&found[..i], &found[i + 1..]);
                (expected.contains(&outer) && !inner.is_empty())
                    .then(|| format!("{outer}__{inner}"))
            });
            let near = split.or_else(|| closest(found, expected).map(str::to_owned));
            Some(match near {
                Some(key) => {
                    let mut meant = path[..path.len().saturating_sub(1)].to_vec();
                    meant.push(key);
                    format!(
                        "{var} is not a configuration key; did you mean {}? (crier reads \
                         every CRIER_* variable as configuration; nested keys are joined \
                         with `__`: redis.url is CRIER_REDIS__URL)",
                        env_var(&meant)
                    )
                }
                None => format!(
                    "{var} is not a configuration key: crier reads every CRIER_* variable as \
                     configuration (except CRIER_CONFIG and CRIER_API_KEY); if it is meant \
                     for something else, such as a script, unset it where crier runs or \
                     rename it"
                ),
            })
        }
        // Never the value itself: it may be a secret.
        Kind::InvalidType(_, expected) if expected == "a sequence" => Some(format!(
            "{}: {var} must be a list, e.g. {var}='[\"…\"]' (TOML array syntax, quoted for \
             the shell; several: '[\"a\", \"b\"]')",
            key_path(path)
        )),
        _ => None,
    }
}

/// The `CRIER_*` layer, named so errors say where a bad value came from.
struct EnvVars(figment::value::Dict);

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(ENV_SOURCE)
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

fn insert_nested(dict: &mut figment::value::Dict, path: &[&str], value: figment::value::Value) {
    use figment::value::{Dict, Value};
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    let from_env = e.metadata.as_ref().is_some_and(|m| m.name == ENV_SOURCE);
    if let Some(said) = from_env
        .then(|| describe_env_error(&e.path, &e.kind))
        .flatten()
    {
        return said;
    }
    let key = key_path(&e.path);
    let source = match &e.metadata {
        Some(m) => match &m.source {
            Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
            _ => format!(" (from {})", m.name),
        },
        None => String::new(),
    };
    let what = describe_kind(&key, &e.kind);
    if key.is_empty() {
        format!("{what}{source}")
    } else {
        format!("{key}: {what}{source}")
    }
}

/// A key path written as in `validate()` and the docs: `channels[0].pattern`,
/// not figment's `channels.0.pattern`.
fn key_path(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// figment's message for one problem, reworded where it nests quotes or
/// leaves the fix unsaid.
fn describe_kind(key: &str, kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    let one_of = |expected: &[&str]| {
        expected
            .iter()
            .map(|e| format!("`{e}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let guess = |found: &str, expected: &[&str]| match closest(found, expected) {
        Some(near) => format!("; did you mean `{near}`?"),
        None => String::new(),
    };
    match kind {
        Kind::UnknownField(found, expected) => format!(
            "unknown field `{found}`{} (expected one of {})",
            guess(found, expected),
            one_of(expected)
        ),
        Kind::UnknownVariant(found, expected) => format!(
            "unknown value `{found}`{} (expected one of {})",
            guess(found, expected),
            one_of(expected)
        ),
        Kind::InvalidType(actual @ (Actual::Unsigned(_) | Actual::Signed(_)), expected)
            if expected == "a duration" =>
        {
            let n = match actual {
                Actual::Unsigned(n) => n.to_string(),
                Actual::Signed(n) => n.to_string(),
                _ => String::new(),
            };
            format!(
                "found the number {n}, expected a duration: a string with a unit, \
                 e.g. `\"{n}s\"` or `\"{n}ms\"`"
            )
        }
        _ if key == "listen" => format!(
            "{kind}: write an IP address and a port, e.g. `127.0.0.1:8080` (this machine only) \
             or `0.0.0.0:8080` (every interface); host names such as `localhost` are not resolved"
        ),
        _ => kind.to_string(),
    }
}

/// The expected name nearest to a misspelt `found`, when near enough to be
/// a typo.
fn closest<'a>(found: &str, expected: &[&'a str]) -> Option<&'a str> {
    let limit = (found.chars().count() / 3).max(2);
    expected
        .iter()
        .map(|e| (edit_distance(found, e), *e))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// `redis://user:secret@host` → `redis://user:<redacted>@host`, for logs
/// and `check-config`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            // Set as is, the placeholder would come out percent-encoded.
            const MARK: &str = "crier-redacted-password";
            let _ = u.set_password(Some(MARK));
            u.to_string().replacen(MARK, REDACTED, 1)
        }
        Ok(u) => u.to_string(),
        Err(_) => REDACTED.into(),
    }
}

/// The process's `CRIER_*` variables, for [`Config::load`].
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("CRIER_"))
        .collect()
}

/// The config file named by `--config` or `CRIER_CONFIG`.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("CRIER_CONFIG").map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, toml).expect("write config");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), env, &Overrides::default())
    }

    #[test]
    fn layers_apply_in_order() {
        let cfg = load_str(
            "listen = \"127.0.0.1:9000\"\n[redis]\nurl = \"redis://a:6379\"\nchannel_prefix = \"app:\"\n",
            &[("CRIER_REDIS__URL", "redis://b:6379"), ("CRIER_CONFIG", "ignored")],
        )
        .expect("valid");
        assert_eq!(cfg.redis.url.as_deref(), Some("redis://b:6379"));
        assert_eq!(cfg.redis.channel_prefix, "app:");
        assert_eq!(cfg.listen_addr().port(), 9000);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\n").expect("write");
        let flags = Overrides {
            listen: Some("127.0.0.1:9001".parse().expect("addr")),
            ..Overrides::default()
        };
        let cfg = Config::load(
            Some(&path),
            [("CRIER_LISTEN".to_string(), "127.0.0.1:9002".to_string())],
            &flags,
        )
        .expect("valid");
        assert_eq!(
            cfg.listen_addr().port(),
            9001,
            "flags win over env and file"
        );
    }

    #[test]
    fn env_values_are_typed() {
        let cfg = load_str(
            "",
            &[
                ("CRIER_LIMITS__QUEUE_SIZE", "16"),
                ("CRIER_SHUTDOWN__GRACE", "1s"),
                ("CRIER_DEV", "true"),
            ],
        )
        .expect("valid");
        assert_eq!(cfg.limits.queue_size, 16);
        assert_eq!(cfg.shutdown.grace, Duration::from_secs(1));
        assert!(cfg.dev);
        assert_eq!(cfg.listen_addr(), SocketAddr::from(([127, 0, 0, 1], 8080)));
    }

    #[test]
    fn redis_modes_are_exclusive_and_sentinel_secrets_redacted() {
        let both = load_str(
            "[redis]\nurl = \"redis://a:6379\"\n[redis.sentinel]\nmaster = \"m\"\nnodes = [\"redis://s:26379\"]\n",
            &[],
        )
        .unwrap_err();
        assert!(both.to_string().contains("redis.sentinel"), "{both}");
        let nameless =
            load_str("[redis.sentinel]\nnodes = [\"redis://s:26379\"]\n", &[]).unwrap_err();
        assert!(
            nameless.to_string().contains("redis.sentinel.master"),
            "{nameless}"
        );
        let empty = load_str("[redis.sentinel]\nmaster = \"m\"\n", &[]).unwrap_err();
        assert!(
            empty.to_string().contains("redis.sentinel.nodes"),
            "{empty}"
        );
        let cfg = load_str(
            "[redis.sentinel]\nmaster = \"m\"\nnodes = [\"redis://:node-secret@s:26379\"]\npassword = \"sentinel-secret\"\n",
            &[("CRIER_REDIS__SENTINEL__NODES", "[\"redis://:node-secret@s:26379\"]")],
        )
        .expect("valid");
        assert!(cfg.redis.is_configured());
        let shown = cfg.to_redacted_toml();
        assert!(
            !shown.contains("sentinel-secret") && !shown.contains("node-secret"),
            "{shown}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let unknown = load_str("[limits]\nqueue_sise = 3\n", &[]).unwrap_err();
        assert!(unknown.to_string().contains("queue_sise"), "{unknown}");

        let duration = load_str("[shutdown]\ngrace = \"5 parsecs\"\n", &[]).unwrap_err();
        assert!(
            duration.to_string().contains("shutdown.grace"),
            "{duration}"
        );

        let env = load_str("", &[("CRIER_LIMITS__QUEUE_SIZE", "lots")]).unwrap_err();
        assert!(env.to_string().contains("limits.queue_size"), "{env}");

        let zero = load_str("[limits]\nqueue_size = 0\n", &[]).unwrap_err();
        assert!(zero.to_string().contains("limits.queue_size"), "{zero}");
    }

    #[test]
    fn pusher_apps_and_presence_are_checked_field_by_field() {
        let app = |id: &str, key: &str, secret: &str| {
            format!("[[pusher.apps]]\nid = \"{id}\"\nkey = \"{key}\"\nsecret = \"{secret}\"\n")
        };
        let ok = app("1", "k", "a-secret-of-16-bytes");
        assert!(load_str(&ok, &[]).is_ok());
        let two = format!(
            "{ok}{}namespace = \"app2:\"\n",
            app("2", "k2", "another-secret-16-bytes")
        );
        assert!(
            load_str(&two, &[]).is_ok(),
            "one app without a namespace, one with"
        );
        for (toml, field) in [
            (app("1", "k", "short"), "pusher.apps[0].secret"),
            (app("", "k", "a-secret-of-16-bytes"), "pusher.apps[0].id"),
            (
                app("1", "k/x", "a-secret-of-16-bytes"),
                "pusher.apps[0].key",
            ),
            (
                format!("{ok}{}", app("2", "k", "another-secret-16-bytes")),
                "pusher.apps[1].id",
            ),
            (
                format!("{ok}{}", app("2", "k2", "another-secret-16-bytes")),
                "pusher.apps[1].namespace",
            ),
            (
                format!(
                    "{ok}namespace = \"a:\"\n{}namespace = \"a:\"\n",
                    app("2", "k2", "another-secret-16-bytes")
                ),
                "pusher.apps[1].namespace",
            ),
            (
                format!("{ok}namespace = \"app1\"\n"),
                "pusher.apps[0].namespace",
            ),
            (
                format!("{ok}namespace = \"a b:\"\n"),
                "pusher.apps[0].namespace",
            ),
            (
                "[presence]\nheartbeat = \"10s\"\nttl = \"5s\"\n".into(),
                "presence.ttl",
            ),
            ("[presence]\nmax_listed = 0\n".into(), "presence.max_listed"),
            (
                "[pusher]\nclient_events_per_second = 0\n".into(),
                "pusher.client_events_per_second",
            ),
        ] {
            let e = load_str(&toml, &[]).unwrap_err().to_string();
            assert!(e.contains(field), "{toml} → {e}");
        }
    }

    #[test]
    fn unknown_fields_suggest_the_nearest_without_nested_quotes() {
        let e = load_str("[limits]\nqueue_sise = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.queue_sise: unknown field `queue_sise`; did you mean `queue_size`?"),
            "{e}"
        );
        assert!(!e.contains("`one of"), "no nested backticks: {e}");
        assert!(e.contains("(expected one of `queue_size`, "), "{e}");
        // Too far from anything: no guess.
        let e = load_str("[limits]\nzzzzzz = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("did you mean"), "{e}");
        let e = load_str(
            "[[channels]]\npattern = \"a\"\nsubscribe = \"anyone\"\n[[channels]]\npattern = \"b\"\nsubscrbe = \"anyone\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("channels[1].subscrbe: unknown field `subscrbe`; did you mean `subscribe`?"),
            "{e}"
        );
        let e = load_str(
            "[[channels]]\npattern = \"a\"\nsubscribe = \"anyon\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("channels[0].subscribe: unknown value `anyon`; did you mean `anyone`?"),
            "{e}"
        );
    }

    #[test]
    fn unknown_variables_are_named_with_the_spelling_meant() {
        let e = load_str("", &[("CRIER_URL", "http://localhost:8080")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CRIER_URL is not a configuration key: crier reads every CRIER_*")
                && e.contains("unset it where crier runs"),
            "{e}"
        );
        assert!(!e.contains("did you mean"), "{e}");
        let e = load_str("", &[("CRIER_REDIS_URL", "redis://r:6379")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "CRIER_REDIS_URL is not a configuration key; did you mean CRIER_REDIS__URL?"
            ),
            "{e}"
        );
        let e = load_str("", &[("CRIER_LIMITS__QUEUE_SISE", "3")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean CRIER_LIMITS__QUEUE_SIZE?"), "{e}");
        let e = load_str("", &[("CRIER_AUTH__SESSION__SECRETS", "hunter2-secret")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "auth.session.secrets: CRIER_AUTH__SESSION__SECRETS must be a list, \
                 e.g. CRIER_AUTH__SESSION__SECRETS='[\"…\"]'"
            ),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "the value is never shown: {e}");
        // The variables that are not keys still pass, and lists load.
        let cfg = load_str(
            "",
            &[
                ("CRIER_CONFIG", "x"),
                ("CRIER_API_KEY", "k"),
                ("CRIER_AUTH__SESSION__SECRETS", "[\"s1\", \"s2\"]"),
                ("CRIER_AUTH__SESSION__REDIS_URL", "redis://r:6379"),
            ],
        )
        .expect("valid");
        let session = cfg.auth.session.expect("session");
        assert_eq!(session.secrets, ["s1", "s2"]);
    }

    #[test]
    fn paths_are_written_one_way() {
        let path = |p: &[&str]| key_path(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            path(&["channels", "0", "subscribe"]),
            "channels[0].subscribe"
        );
        assert_eq!(path(&["allowed_origins", "2"]), "allowed_origins[2]");
        assert_eq!(path(&["limits", "queue_size"]), "limits.queue_size");
        assert_eq!(edit_distance("subscrbe", "subscribe"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn a_host_name_in_listen_gets_a_hint() {
        let e = load_str("listen = \"localhost:8080\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen: "), "{e}");
        assert!(
            e.contains("`127.0.0.1:8080`") && e.contains("`0.0.0.0:8080`"),
            "{e}"
        );
    }

    #[test]
    fn a_bare_number_for_a_duration_gets_a_hint() {
        let e = load_str("[sse]\nheartbeat = 15\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sse.heartbeat: "), "{e}");
        assert!(e.contains("`\"15s\"`"), "{e}");
        let e = load_str("", &[("CRIER_SHUTDOWN__GRACE", "5")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shutdown.grace: ") && e.contains("`\"5s\"`"),
            "{e}"
        );
    }

    #[test]
    fn claim_rules_without_jwt_are_a_warning() {
        let rules = "[[channels]]\npattern = \"ops:*\"\nsubscribe = \"claim\"\n\
                     [[channels]]\npattern = \"org:{claim.org}:*\"\nsubscribe = \"user\"\n";
        let cfg = load_str(rules, &[]).expect("valid");
        let warnings = cfg.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("channels[0]: subscribe = \"claim\" needs [auth.jwt]")
                && warnings[0].contains("can never match"),
            "{warnings:?}"
        );
        assert!(warnings[1].starts_with("channels[1]: "), "{warnings:?}");
        let with_jwt = format!(
            "{rules}[auth.jwt]\nalgorithms = [\"HS256\"]\nsecret = \"a-jwt-secret-of-at-least-32-bytes!!\"\n"
        );
        let cfg = load_str(&with_jwt, &[]).expect("valid");
        assert_eq!(cfg.warnings(), Vec::<String>::new());
        // The webhook's `channels` and `info` grant them too.
        let with_webhook = format!(
            "{rules}[auth.webhook]\nurl = \"https://app/session\"\nforward_cookies = [\"s\"]\n"
        );
        let cfg = load_str(&with_webhook, &[]).expect("valid");
        assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    }

    /// Which of them applies to a channel is tested with the policy.
    #[test]
    fn event_fields_are_pointers() {
        load_str(
            "event_field = \"/event_type\"\n\
             [[channels]]\npattern = \"laravel:*\"\nsubscribe = \"anyone\"\nevent_field = \"/event\"\n\
             [[channels]]\npattern = \"user:{user}\"\nsubscribe = \"user\"\nevent_field = \"/meta/kind\"\n\
             [[channels]]\npattern = \"*\"\nsubscribe = \"anyone\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(Config::default().event_field, "/type");

        let e = load_str("event_field = \"event_type\"\n", &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("event_field: `event_type` is not a JSON pointer"),
            "{e}"
        );
        let e = load_str(
            "[[channels]]\npattern = \"a\"\nsubscribe = \"anyone\"\nevent_field = \"event\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("channels[0].event_field"), "{e}");
    }

    #[test]
    fn history_beyond_what_is_replayed_is_a_warning() {
        let rule = |size: usize| {
            format!(
                "[[channels]]\npattern = \"a:*\"\nsubscribe = \"anyone\"\n\
                 history = {{ size = {size}, ttl = \"1h\" }}\n"
            )
        };
        let cfg = load_str(&rule(20_000), &[]).expect("valid");
        assert_eq!(
            cfg.warnings(),
            vec![
                "channels[0].history.size = 20000 keeps more than can be replayed: a resume \
                 replays at most limits.max_replay_messages (10000) messages and a client that \
                 missed more gets a gap; keep history.size at most 10000"
                    .to_owned()
            ]
        );
        assert!(load_str(&rule(10_000), &[])
            .expect("valid")
            .warnings()
            .is_empty());
        let raised = format!("{}[limits]\nmax_replay_messages = 20000\n", rule(20_000));
        assert!(load_str(&raised, &[]).expect("valid").warnings().is_empty());
    }

    #[test]
    fn no_channel_rules_is_a_warning_outside_dev() {
        let none = load_str("", &[]).expect("valid");
        let warnings = none.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("every subscription will be refused"),
            "{warnings:?}"
        );
        let dev = load_str("dev = true\n", &[]).expect("valid");
        assert_eq!(dev.warnings(), Vec::<String>::new());
        let ruled = load_str(
            "[[channels]]\npattern = \"public:*\"\nsubscribe = \"anyone\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(ruled.warnings(), Vec::<String>::new());
    }

    #[test]
    fn redaction_hides_secrets() {
        let cfg = load_str(
            "[redis]\nurl = \"redis://app:hunter2hunter2@r:6379\"\npassword = \"second-hunter2\"\n[publish]\napi_keys = [\"0123456789abcdef-secret\"]\n[[pusher.apps]]\nid = \"1\"\nkey = \"k\"\nsecret = \"pusher-secret-hunter2\"\n",
            &[],
        )
        .expect("valid");
        let shown = cfg.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("second-hunter2"), "{shown}");
        assert!(!shown.contains("0123456789abcdef-secret"), "{shown}");
        assert!(!shown.contains("pusher-secret"), "{shown}");
        assert!(shown.contains("redis://app:<redacted>@r:6379"), "{shown}");
        // What is printed loads back.
        let back: Config = toml::from_str(&shown).expect("printed config parses");
        assert_eq!(back.limits, cfg.limits);
    }
}
