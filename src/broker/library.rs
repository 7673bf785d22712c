//! The deployment's Redis Function library: its name, its functions'
//! names, and which configuration holds it.
//!
//! Redis keeps functions per server, not per database or per prefix, and a
//! function name may exist in one library only. So each crier deployment
//! (one `redis.channel_prefix`) has a library of its own, `crier` plus a
//! suffix taken from the prefix ([`suffix_of`]): a deployment with the
//! prefix `billing:` loads `crier_billing` with `crier_publish_billing`,
//! `crier_since_billing`, …, and any number of deployments share one Redis
//! without touching each other's rules, prefix or history. Without a
//! prefix the names are the plain `crier` and `crier_publish`.
//!
//! The library's second line is a header naming what it was made from
//! ([`Meta`]: the prefix, a fingerprint of its code and rules, when its
//! instance started). Every instance reads it with each canary
//! ([`reconcile`]) and decides:
//!
//! - another prefix holds the name (two prefixes with one suffix, `a:`
//!   and `a`): a conflict crier cannot resolve. It never replaces the
//!   other's library; it refuses its own `FCALL`s, logs both sides and is
//!   not ready.
//! - the same configuration: nothing to do.
//! - another configuration of this deployment (a rolling change of its
//!   history rules): the newest-started configuration that still has a
//!   live instance wins. Each instance notes its configuration and start
//!   in the hash `<prefix>crier:lib` with every canary, so an old pod that
//!   reconnects mid-rollout never puts its old rules back while a newer
//!   one runs, and the last configuration standing takes the library
//!   within a canary once the others are gone.
//!
//! This module never decides readiness itself: it says what it found.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::command::Redis;
use super::failure::classify;
use super::BrokerError;
use crate::config::Config;
use crate::history;
use crate::policy::Policy;

/// What a library says of itself, on its header line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// The deployment's `redis.channel_prefix`.
    pub(crate) prefix: String,
    /// A fingerprint of the code and rules (not of `started`).
    pub(crate) rules: String,
    /// When the instance that loaded it started (ms since the epoch).
    pub(crate) started: u64,
    /// The crier version that made it.
    pub(crate) version: String,
}

/// This instance's library.
#[derive(Debug, Clone)]
pub(crate) struct Library {
    /// `crier`, or `crier_<suffix>`.
    pub(crate) name: String,
    suffix: String,
    source: String,
    meta: Meta,
    /// The hash of live configurations: `<prefix>crier:lib`.
    registry: String,
}

/// Who holds the library name in Redis, as [`reconcile`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holder {
    /// This configuration (possibly loaded just now).
    Own,
    /// A newer configuration of this deployment, still running: its rules
    /// apply until it is gone (a rollout in progress, or two deployments
    /// sharing one prefix).
    Newer(Meta),
    /// Another deployment (another prefix) under the same name: crier
    /// cannot resolve it.
    Conflict(Meta),
    /// Redis has no functions (< 7), or the ACL user may not read them:
    /// the library was only checked by calling it (and loaded if missing).
    Unchecked,
}

impl Holder {
    /// The metric label of this state.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Holder::Own => "own",
            Holder::Newer(_) => "newer",
            Holder::Conflict(_) => "conflict",
            Holder::Unchecked => "unchecked",
        }
    }
}

/// The function-name suffix of a deployment: empty without a prefix,
/// else `_` and the prefix with every character other than an ASCII
/// letter or digit as `_` and trailing ones dropped (`billing:` →
/// `_billing`, `app-1:` → `_app_1`). Names are readable; two prefixes
/// that meet in one suffix are detected ([`Holder::Conflict`]).
pub(crate) fn suffix_of(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let cleaned = cleaned.trim_end_matches('_');
    match cleaned.is_empty() {
        true if prefix.is_empty() => String::new(),
        // A prefix of punctuation only (`:`): still not the default's.
        true => format!("_{:x}", Sha256::digest(prefix.as_bytes())[0]),
        false => format!("_{cleaned}"),
    }
}

impl Library {
    /// This configuration's library, stamped with `started`.
    pub(crate) fn new(config: &Config, started: SystemTime) -> Self {
        let prefix = config.redis.channel_prefix.clone();
        let suffix = suffix_of(&prefix);
        let template = history::function_library(
            &prefix,
            &Policy::history_rules(&config.channels),
            config.redis.cluster.is_some(),
            &suffix,
        );
        let mut hash = Sha256::new();
        hash.update(prefix.as_bytes());
        hash.update([0]);
        hash.update(template.as_bytes());
        let rules: String = hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let meta = Meta {
            prefix: prefix.clone(),
            rules,
            started: millis(started),
            version: crate::VERSION.to_owned(),
        };
        let header = serde_json::to_string(&meta).unwrap_or_default();
        Library {
            name: format!("crier{suffix}"),
            source: template.replacen("@META@", &header, 1),
            registry: format!("{prefix}crier:lib"),
            suffix,
            meta,
        }
    }

    /// The Redis name of one of crier's functions (`crier_publish` →
    /// `crier_publish_billing`).
    pub(crate) fn function(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }

    /// The Lua source, header included.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// What this library says of itself.
    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The library named `name` in Redis: `None` when absent, `Some(None)`
/// when it has no crier header (crier before 0.3).
async fn held(redis: &Redis, name: &str) -> Result<Option<Option<Meta>>, BrokerError> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LIST").arg("LIBRARYNAME").arg(name).arg("WITHCODE");
    let reply: redis::Value = redis.query(cmd).await?;
    for library in items(&reply) {
        let fields = pairs(library);
        if fields.get("library_name").map(String::as_str) != Some(name) {
            continue;
        }
        let code = fields.get("library_code").cloned().unwrap_or_default();
        return Ok(Some(parse_header(&code)));
    }
    Ok(None)
}

/// The [`Meta`] on a library's header line, if it has one.
pub(crate) fn parse_header(code: &str) -> Option<Meta> {
    code.lines()
        .take(4)
        .find_map(|line| line.strip_prefix("-- crier-library: "))
        .and_then(|json| serde_json::from_str(json).ok())
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn items(v: &redis::Value) -> Vec<&redis::Value> {
    match v {
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().collect(),
        _ => Vec::new(),
    }
}

/// A RESP2 flat array or a RESP3 map, as field → text.
fn pairs(v: &redis::Value) -> HashMap<String, String> {
    let mut out = HashMap::new();
    match v {
        redis::Value::Map(map) => {
            for (k, v) in map {
                if let (Some(k), Some(v)) = (text(k), text(v)) {
                    out.insert(k, v);
                }
            }
        }
        redis::Value::Array(flat) => {
            for kv in flat.chunks(2) {
                if let [k, v] = kv {
                    if let (Some(k), Some(v)) = (text(k), text(v)) {
                        out.insert(k, v);
                    }
                }
            }
        }
        _ => {}
    }
    out
}

/// Notes this configuration as live and finds the newest live one:
/// whether it is this one. `stale`: how long a configuration no instance
/// noted is still counted.
async fn newest_is_ours(
    redis: &Redis,
    library: &Library,
    stale: Duration,
) -> Result<bool, BrokerError> {
    let now = millis(SystemTime::now());
    let ours = &library.meta;
    let mut note = redis::cmd("HSET");
    note.arg(&library.registry)
        .arg(&ours.rules)
        .arg(format!("{}:{now}", ours.started));
    redis.query::<i64>(note).await?;
    let mut all = redis::cmd("HGETALL");
    all.arg(&library.registry);
    let noted: HashMap<String, String> = redis.query(all).await?;
    let stale = u64::try_from(stale.as_millis()).unwrap_or(u64::MAX);
    let mut newest = (ours.started, ours.rules.clone());
    let mut gone = Vec::new();
    for (rules, value) in noted {
        let (started, seen) = value
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .unwrap_or((0, 0));
        if now.saturating_sub(seen) > stale {
            gone.push(rules);
        } else if (started, &rules) > (newest.0, &newest.1) {
            newest = (started, rules);
        }
    }
    if !gone.is_empty() {
        let mut forget = redis::cmd("HDEL");
        forget.arg(&library.registry).arg(gone);
        let _ = redis.query::<i64>(forget).await;
    }
    Ok(newest.1 == ours.rules)
}

/// Reads who holds this deployment's library name and, when this
/// configuration should, loads it (see the module's doc for the rules).
/// `stale`: how long an instance's note of its configuration counts.
pub(super) async fn reconcile(
    redis: &Redis,
    library: &Library,
    stale: Duration,
) -> Result<Holder, BrokerError> {
    let found = match held(redis, &library.name).await {
        Ok(found) => found,
        // Redis < 7, or an ACL user without FUNCTION LIST: check by
        // calling, as crier before 0.3 did.
        Err(BrokerError::Redis(e)) if classify(&e).refused() => {
            return redis.ensure_library().await.map(|()| Holder::Unchecked);
        }
        Err(e) => return Err(e),
    };
    let ours = &library.meta;
    match &found {
        Some(Some(theirs)) if theirs.prefix != ours.prefix => {
            return Ok(Holder::Conflict(theirs.clone()))
        }
        Some(Some(theirs)) if theirs.rules == ours.rules => return Ok(Holder::Own),
        _ => {}
    }
    let newest = match newest_is_ours(redis, library, stale).await {
        Ok(newest) => newest,
        Err(BrokerError::Redis(e)) if classify(&e).refused() => true,
        Err(e) => return Err(e),
    };
    match found {
        Some(Some(theirs)) if !newest => Ok(Holder::Newer(theirs)),
        // Missing, from crier < 0.3, or an older configuration's. Missing
        // while a newer one runs: ours until it puts its own back.
        _ => redis.load_library().await.map(|()| Holder::Own),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_readable_and_the_default_keeps_plain_names() {
        assert_eq!(suffix_of(""), "");
        assert_eq!(suffix_of("billing:"), "_billing");
        assert_eq!(suffix_of("app-1:"), "_app_1");
        assert_eq!(suffix_of("a:b:"), "_a_b");
        assert_eq!(suffix_of("a"), "_a");
        assert!(suffix_of(":").starts_with('_'));
        assert_ne!(suffix_of(":"), "");
    }

    #[test]
    fn the_header_names_the_deployment_and_survives_a_round_trip() {
        let mut config = Config::default();
        config.redis.channel_prefix = "billing:".into();
        let library = Library::new(&config, UNIX_EPOCH + Duration::from_millis(1234));
        assert_eq!(library.name, "crier_billing");
        assert_eq!(library.function("crier_publish"), "crier_publish_billing");
        assert!(library.source().starts_with("#!lua name=crier_billing\n"));
        assert!(library
            .source()
            .contains("register_function('crier_publish_billing'"));
        let meta = parse_header(library.source()).expect("header");
        assert_eq!(meta.prefix, "billing:");
        assert_eq!(meta.started, 1234);
        assert_eq!(&meta, library.meta());
        // The fingerprint is of the rules, not of the start.
        let later = Library::new(&config, UNIX_EPOCH + Duration::from_millis(9999));
        assert_eq!(later.meta().rules, meta.rules);
        config.channels.push(crate::config::ChannelRule {
            pattern: "h:*".into(),
            subscribe: crate::config::Subscribe::Anyone,
            history: Some(crate::config::HistoryRule {
                size: 10,
                ttl: Duration::from_secs(60),
            }),
            event_field: None,
            presence: false,
        });
        let changed = Library::new(&config, UNIX_EPOCH);
        assert_ne!(changed.meta().rules, meta.rules);
        assert_eq!(
            parse_header("#!lua name=crier\n-- Generated by crier\n"),
            None
        );
    }
}
