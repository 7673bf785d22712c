//! Channel names and the rules deciding who may listen to which channel.
//!
//! Deny by default: a channel that no `[[channels]]` rule matches is
//! forbidden, and a refusal never says whether the channel exists.

use serde::{Deserialize, Serialize};

/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;

/// One `[[channels]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    /// Channel name, or a prefix ending in `*` that matches any non-empty
    /// rest (`public:*` matches `public:a` and `public:a:b`).
    pub pattern: String,
    /// Who may subscribe.
    pub subscribe: Subscribe,
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

impl ChannelRule {
    /// Checks the pattern is one this version understands.
    pub fn check(&self) -> Result<(), String> {
        let p = &self.pattern;
        if p.is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(pos) = p.find('*') {
            if pos != p.len() - 1 {
                return Err(format!("`{p}`: `*` is only allowed as the last character"));
            }
        }
        let literal = p.trim_end_matches('*');
        if !literal.is_empty() {
            validate_channel(literal).map_err(|e| format!("`{p}`: {e}"))?;
        }
        Ok(())
    }

    fn matches(&self, channel: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => channel.len() > prefix.len() && channel.starts_with(prefix),
            None => channel == self.pattern,
        }
    }
}

/// Who is asking. Anonymous until authentication exists for the connection.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// The user id, when authenticated.
    pub user: Option<String>,
}

/// The compiled rule list.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<ChannelRule>,
    allow_all: bool,
}

/// Why a channel was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The name itself is not acceptable.
    #[error("bad channel name: {0}")]
    BadName(&'static str),
    /// Not allowed for this principal (or no rule at all).
    #[error("forbidden")]
    Forbidden,
}

impl Policy {
    /// Rules in order; `allow_all` (dev mode) lets anyone hear any channel.
    pub fn new(rules: Vec<ChannelRule>, allow_all: bool) -> Self {
        Self { rules, allow_all }
    }

    /// May `who` subscribe to `channel`?
    pub fn may_subscribe(&self, channel: &str, who: &Principal) -> Result<(), Refusal> {
        validate_channel(channel).map_err(Refusal::BadName)?;
        if self.allow_all {
            return Ok(());
        }
        let Some(rule) = self.rules.iter().find(|r| r.matches(channel)) else {
            return Err(Refusal::Forbidden);
        };
        match rule.subscribe {
            Subscribe::Anyone => Ok(()),
            Subscribe::User if who.user.is_some() => Ok(()),
            Subscribe::User | Subscribe::Claim => Err(Refusal::Forbidden),
        }
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
        }
    }

    #[test]
    fn first_match_wins_and_default_is_deny() {
        let policy = Policy::new(
            vec![
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
            Err(Refusal::Forbidden)
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
        let policy = Policy::new(vec![], true);
        let anon = Principal::default();
        assert!(policy.may_subscribe(&"a".repeat(256), &anon).is_ok());
        for bad in ["", "a b", "a\nb", "a\u{7f}", &"a".repeat(257)] {
            assert!(
                matches!(policy.may_subscribe(bad, &anon), Err(Refusal::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn patterns_are_checked() {
        assert!(rule("a:*", Subscribe::Anyone).check().is_ok());
        assert!(rule("a:*:b", Subscribe::Anyone).check().is_err());
        assert!(rule("", Subscribe::Anyone).check().is_err());
        assert!(rule("a b*", Subscribe::Anyone).check().is_err());
    }
}
