//! Channel names and the rules deciding who may listen to which channel.
//!
//! Deny by default: a channel that no `[[channels]]` rule matches is
//! forbidden, and a refusal never says whether the channel exists.

use serde::{Deserialize, Serialize};

pub use crate::auth::Principal;
use crate::history::HistoryRule;

/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;

/// One `[[channels]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    /// Channel name, or a prefix ending in `*` that matches any non-empty
    /// rest (`public:*` matches `public:a` and `public:a:b`). May hold
    /// `{user}` and `{claim.NAME}`, filled from the authenticated principal:
    /// `user:{user}` matches only the connected user's own channel.
    pub pattern: String,
    /// Who may subscribe.
    pub subscribe: Subscribe,
    /// Keep history for the matching channels (`crier_publish` appends to
    /// it); absent: no history, no resume, `gap` after a disconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<crate::history::HistoryRule>,
    /// JSON pointer to the payload's event type for the matching channels
    /// (e.g. `/event`); absent: the top-level `event_field`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_field: Option<String>,
}

/// Who may subscribe to the channels a rule matches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Subscribe {
    /// Everyone, authenticated or not.
    Anyone,
    /// Authenticated users only.
    User,
    /// Only clients whose token grants the channel in its channels claim.
    Claim,
}

/// A rule's pattern, parsed once.
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    pieces: Vec<Piece>,
    /// Ends in `*`: matches any non-empty rest.
    prefix: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    User,
    Claim(String),
}

impl Pattern {
    fn parse(p: &str) -> Result<Self, String> {
        if p.is_empty() {
            return Err("must not be empty".into());
        }
        let (body, prefix) = match p.strip_suffix('*') {
            Some(body) => (body, true),
            None => (p, false),
        };
        if body.contains('*') {
            return Err(format!("`{p}`: `*` is only allowed as the last character"));
        }
        let mut pieces = Vec::new();
        let mut rest = body;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("`{p}`: unclosed `{{`"))?;
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            pieces.push(match &rest[open + 1..close] {
                "user" => Piece::User,
                name => match name.strip_prefix("claim.") {
                    Some(claim) if !claim.is_empty() => Piece::Claim(claim.to_owned()),
                    _ => {
                        return Err(format!(
                        "`{p}`: unknown placeholder `{{{name}}}` (use {{user}} or {{claim.NAME}})"
                    ))
                    }
                },
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        for piece in &pieces {
            if let Piece::Literal(text) = piece {
                validate_channel(text).map_err(|e| format!("`{p}`: {e}"))?;
            }
        }
        Ok(Self { pieces, prefix })
    }

    /// Whether `channel` matches for `who`. Placeholder values are inserted
    /// as literal text, never read as wildcards; a placeholder `who` has no
    /// value for makes the rule not apply.
    fn matches(&self, channel: &str, who: &Principal) -> bool {
        let mut rest = channel;
        for piece in &self.pieces {
            let value = match piece {
                Piece::Literal(text) => text.clone(),
                Piece::User => match &who.user {
                    Some(user) => user.clone(),
                    None => return false,
                },
                Piece::Claim(name) => match who.claim(name) {
                    Some(v) => v,
                    None => return false,
                },
            };
            match rest.strip_prefix(value.as_str()) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        if self.prefix {
            !rest.is_empty()
        } else {
            rest.is_empty()
        }
    }
}

impl ChannelRule {
    /// Checks the pattern is one this version understands.
    pub fn check(&self) -> Result<(), String> {
        Pattern::parse(&self.pattern).map(|_| ())
    }
}

/// The compiled rule list.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<(Pattern, Subscribe)>,
    history: Vec<(Pattern, Option<HistoryRule>)>,
    allow_all: bool,
    /// Rules that name their own event field, and the default.
    event_fields: Vec<(Pattern, Option<String>)>,
    event_field: String,
}

/// Why a channel was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The name itself is not acceptable.
    #[error("bad channel name: {0}")]
    BadName(&'static str),
    /// Allowed for authenticated clients only, and this one is anonymous.
    #[error("authentication required")]
    NeedsAuth,
    /// Not allowed for this principal (or no rule at all).
    #[error("forbidden")]
    Forbidden,
}

impl Policy {
    /// Rules in order (already checked by config validation; a rule that
    /// does not parse is skipped); `allow_all` (dev mode) lets anyone hear
    /// any channel.
    pub fn new(rules: &[ChannelRule], allow_all: bool) -> Self {
        let parsed: Vec<_> = rules
            .iter()
            .filter_map(|r| Pattern::parse(&r.pattern).ok().map(|p| (p, r)))
            .collect();
        Self {
            rules: parsed
                .iter()
                .map(|(p, r)| (p.clone(), r.subscribe))
                .collect(),
            history: parsed.iter().map(|(p, r)| (p.clone(), r.history)).collect(),
            allow_all,
            event_fields: parsed
                .iter()
                .map(|(p, r)| (p.clone(), r.event_field.clone()))
                .collect(),
            event_field: crate::protocol::DEFAULT_EVENT_FIELD.into(),
        }
    }

    /// Sets the top-level `event_field` (default `/type`).
    pub fn with_event_field(mut self, pointer: &str) -> Self {
        self.event_field = pointer.to_owned();
        if self.event_fields.iter().all(|(_, f)| f.is_none()) {
            // No rule has its own: skip matching on every publication.
            self.event_fields.clear();
        }
        self
    }

    /// The JSON pointer naming the event type of `channel`'s payloads: the
    /// first rule fitting the channel decides, as for history
    /// (placeholders read as any text); without its own, the default.
    pub fn event_field_of(&self, channel: &str) -> &str {
        self.event_fields
            .iter()
            .find(|(p, _)| p.matches(channel, &Principal::default()) || p.could_match(channel))
            .and_then(|(_, f)| f.as_deref())
            .unwrap_or(&self.event_field)
    }

    /// The history kept for `channel`: the first rule whose pattern fits
    /// it, reading placeholders as any text (as the Redis function does,
    /// which knows nothing of principals).
    pub fn history_of(&self, channel: &str) -> Option<HistoryRule> {
        self.history
            .iter()
            .find(|(p, _)| p.matches(channel, &Principal::default()) || p.could_match(channel))
            .and_then(|(_, h)| *h)
    }

    /// `(pattern, history)` of every rule, for the Redis function library.
    pub fn history_rules(rules: &[ChannelRule]) -> Vec<(String, Option<HistoryRule>)> {
        rules
            .iter()
            .map(|r| (r.pattern.clone(), r.history))
            .collect()
    }

    /// May `who` subscribe to `channel`?
    pub fn may_subscribe(&self, channel: &str, who: &Principal) -> Result<(), Refusal> {
        validate_channel(channel).map_err(Refusal::BadName)?;
        if self.allow_all {
            return Ok(());
        }
        let mut decided = None;
        let mut needs_auth = false;
        for (pattern, subscribe) in &self.rules {
            if pattern.matches(channel, who) {
                decided = Some(*subscribe);
                break;
            }
            // `user:{user}` cannot apply to an anonymous client, but it
            // would to some signed-in one: if no later rule lets this
            // client in, credentials are what is missing.
            needs_auth |= who.user.is_none() && pattern.could_match(channel);
        }
        let Some(subscribe) = decided else {
            return Err(if needs_auth {
                Refusal::NeedsAuth
            } else {
                Refusal::Forbidden
            });
        };
        match subscribe {
            Subscribe::Anyone => Ok(()),
            Subscribe::User if who.user.is_some() => Ok(()),
            Subscribe::Claim if who.grants.iter().any(|g| grant_covers(g, channel)) => Ok(()),
            Subscribe::User | Subscribe::Claim if who.user.is_none() => Err(Refusal::NeedsAuth),
            Subscribe::User | Subscribe::Claim => Err(Refusal::Forbidden),
        }
    }
}

impl Pattern {
    /// Whether some principal could make this placeholder pattern match:
    /// each placeholder stands for any non-empty text. Literal-only
    /// patterns answer false (they already matched or not).
    fn could_match(&self, channel: &str) -> bool {
        fn rest_matches(pieces: &[Piece], rest: &str, prefix: bool) -> bool {
            match pieces.split_first() {
                None => {
                    if prefix {
                        !rest.is_empty()
                    } else {
                        rest.is_empty()
                    }
                }
                Some((Piece::Literal(text), tail)) => rest
                    .strip_prefix(text.as_str())
                    .is_some_and(|r| rest_matches(tail, r, prefix)),
                Some((_, tail)) => (1..=rest.len())
                    .filter(|n| rest.is_char_boundary(*n))
                    .any(|n| rest_matches(tail, &rest[n..], prefix)),
            }
        }
        self.pieces.iter().any(|p| !matches!(p, Piece::Literal(_)))
            && rest_matches(&self.pieces, channel, self.prefix)
    }
}

/// A channels-claim entry: an exact name or a `prefix*`.
fn grant_covers(grant: &str, channel: &str) -> bool {
    match grant.strip_suffix('*') {
        Some(prefix) => channel.len() > prefix.len() && channel.starts_with(prefix),
        None => grant == channel,
    }
}

/// A channel name is 1–256 bytes with no whitespace or control characters.
pub fn validate_channel(channel: &str) -> Result<(), &'static str> {
    if channel.is_empty() {
        return Err("empty");
    }
    if channel.len() > MAX_CHANNEL_LEN {
        return Err("longer than 256 bytes");
    }
    if channel.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, subscribe: Subscribe) -> ChannelRule {
        ChannelRule {
            pattern: pattern.into(),
            subscribe,
            history: None,
            event_field: None,
        }
    }

    #[test]
    fn first_match_wins_and_default_is_deny() {
        let policy = Policy::new(
            &[
                rule("public:secret", Subscribe::User),
                rule("public:*", Subscribe::Anyone),
            ],
            false,
        );
        let anon = Principal::default();
        assert_eq!(policy.may_subscribe("public:a", &anon), Ok(()));
        assert_eq!(policy.may_subscribe("public:a:b", &anon), Ok(()));
        assert_eq!(
            policy.may_subscribe("public:secret", &anon),
            Err(Refusal::NeedsAuth)
        );
        assert_eq!(
            policy.may_subscribe("public:", &anon),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            policy.may_subscribe("private:a", &anon),
            Err(Refusal::Forbidden)
        );
    }

    #[test]
    fn names_are_validated_before_rules() {
        let policy = Policy::new(&[], true);
        let anon = Principal::default();
        assert!(policy.may_subscribe(&"a".repeat(256), &anon).is_ok());
        for bad in ["", "a b", "a\nb", "a\u{7f}", &"a".repeat(257)] {
            assert!(
                matches!(policy.may_subscribe(bad, &anon), Err(Refusal::BadName(_))),
                "{bad:?}"
            );
        }
    }

    fn user(id: &str, claims: serde_json::Value, grants: &[&str]) -> Principal {
        Principal {
            user: Some(id.into()),
            claims: claims.as_object().cloned().unwrap_or_default(),
            grants: grants.iter().map(|g| g.to_string()).collect(),
            ..Principal::default()
        }
    }

    #[test]
    fn placeholders_and_claims() {
        let policy = Policy::new(
            &[
                rule("user:{user}", Subscribe::User),
                rule("org:{claim.org}:*", Subscribe::User),
                rule("ops:*", Subscribe::Claim),
            ],
            false,
        );
        let u42 = user(
            "42",
            serde_json::json!({"org": "acme"}),
            &["ops:deploys", "ops:db:*"],
        );
        assert_eq!(policy.may_subscribe("user:42", &u42), Ok(()));
        assert_eq!(
            policy.may_subscribe("user:43", &u42),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            policy.may_subscribe("user:42x", &u42),
            Err(Refusal::Forbidden)
        );
        assert_eq!(policy.may_subscribe("org:acme:news", &u42), Ok(()));
        assert_eq!(
            policy.may_subscribe("org:evil:news", &u42),
            Err(Refusal::Forbidden)
        );
        assert_eq!(policy.may_subscribe("ops:deploys", &u42), Ok(()));
        assert_eq!(policy.may_subscribe("ops:db:main", &u42), Ok(()));
        assert_eq!(
            policy.may_subscribe("ops:billing", &u42),
            Err(Refusal::Forbidden)
        );
        let anon = Principal::default();
        assert_eq!(
            policy.may_subscribe("user:42", &anon),
            Err(Refusal::NeedsAuth)
        );
        assert_eq!(
            policy.may_subscribe("org:acme:x", &anon),
            Err(Refusal::NeedsAuth)
        );
        assert_eq!(
            policy.may_subscribe("ops:deploys", &anon),
            Err(Refusal::NeedsAuth)
        );
        assert_eq!(
            policy.may_subscribe("private:x", &anon),
            Err(Refusal::Forbidden)
        );
        // A later `anyone` rule still lets anonymous clients in.
        let layered = Policy::new(
            &[
                rule("chat:{user}", Subscribe::User),
                rule("chat:*", Subscribe::Anyone),
            ],
            false,
        );
        assert_eq!(layered.may_subscribe("chat:lobby", &anon), Ok(()));
        assert_eq!(layered.may_subscribe("chat:lobby", &u42), Ok(()));
        // A user id is text, never a wildcard.
        let star = user("*", serde_json::json!({}), &[]);
        assert_eq!(
            policy.may_subscribe("user:42", &star),
            Err(Refusal::Forbidden)
        );
    }

    #[test]
    fn patterns_are_checked() {
        assert!(rule("a:*", Subscribe::Anyone).check().is_ok());
        assert!(rule("a:*:b", Subscribe::Anyone).check().is_err());
        assert!(rule("", Subscribe::Anyone).check().is_err());
        assert!(rule("a b*", Subscribe::Anyone).check().is_err());
        assert!(rule("u:{user}", Subscribe::User).check().is_ok());
        assert!(rule("u:{claim.org}:*", Subscribe::User).check().is_ok());
        assert!(rule("u:{nobody}", Subscribe::User).check().is_err());
        assert!(rule("u:{user", Subscribe::User).check().is_err());
    }
}
