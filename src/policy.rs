//! Channel names and the rules deciding who may listen to which channel.
//!
//! Deny by default: a channel that no `[[channels]]` rule matches is
//! forbidden, and a refusal never says whether the channel exists.

#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::auth::Failure;
pub(crate) use crate::auth::Principal;
use crate::config::{ChannelRule, HistoryRule, Subscribe};
use crate::refusal::Refusal;

/// Longest accepted channel name, in bytes.
pub(crate) const MAX_CHANNEL_LEN: usize = 256;

/// A rule's pattern, parsed once.
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    pieces: Vec<Piece>,
    /// Ends in `*`: matches any non-empty rest.
    prefix: bool,
    /// The pattern as written, for log lines.
    source: String,
}

/// The characters that end a placeholder in some rule (`:` in
/// `home:{user}:*`). A placeholder value holding one of them could be read
/// as several segments, so that user `a` would hear `home:a:b:inbox`, the
/// channel of user `a:b`. Such a value never fills a placeholder: the rule
/// does not apply to that client.
#[derive(Debug, Clone, Default, PartialEq)]
struct Separators(Vec<char>);

impl Separators {
    fn of<'a>(patterns: impl Iterator<Item = &'a Pattern>) -> Self {
        let mut chars: Vec<char> = patterns
            .flat_map(|p| p.pieces.windows(2))
            .filter_map(|w| match w {
                [Piece::User | Piece::Claim(_), Piece::Literal(next)] => next.chars().next(),
                _ => None,
            })
            .collect();
        chars.sort_unstable();
        chars.dedup();
        Self(chars)
    }

    /// A value that may fill a placeholder: non-empty, no separator.
    fn admits(&self, value: &str) -> bool {
        !value.is_empty() && !value.contains(self.0.as_slice())
    }
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
        for (i, piece) in pieces.iter().enumerate() {
            match (piece, pieces.get(i + 1)) {
                (Piece::Literal(text), _) => {
                    validate_channel(text).map_err(|e| format!("`{p}`: {e}"))?;
                }
                // A placeholder is one segment: it ends at a separator, or
                // at the exact end of the name. `{user}*` or `{user}{claim.x}`
                // would let one user's value run into another's channels.
                (_, Some(Piece::Literal(next)))
                    if next.starts_with(|c: char| !c.is_alphanumeric()) => {}
                (_, None) if !prefix => {}
                _ => {
                    return Err(format!(
                        "`{p}`: a placeholder must be followed by a separator such as `:` \
                         (not a letter, a digit, another placeholder or `*`), or end the pattern"
                    ))
                }
            }
        }
        Ok(Self {
            pieces,
            prefix,
            source: p.to_owned(),
        })
    }

    /// Whether `channel` matches for `who`. Placeholder values are inserted
    /// as literal text, never read as wildcards, and only a value that is
    /// one whole segment (see [`Separators`]) fills a placeholder; a
    /// placeholder `who` has no such value for makes the rule not apply.
    fn matches(&self, channel: &str, who: &Principal, separators: &Separators) -> bool {
        let mut rest = channel;
        for piece in &self.pieces {
            let claim;
            let (value, name) = match piece {
                Piece::Literal(text) => (text.as_str(), ""),
                Piece::User => match &who.user {
                    Some(user) => (user.as_str(), "user"),
                    None => return false,
                },
                Piece::Claim(name) => match who.claim(name) {
                    Some(v) => {
                        claim = v;
                        (claim.as_str(), name.as_str())
                    }
                    None => return false,
                },
            };
            if !name.is_empty() && !separators.admits(value) {
                tracing::warn!(
                    rule = %self.source,
                    placeholder = name,
                    separators = %separators.0.iter().collect::<String>(),
                    "the client's value for this placeholder is empty or holds a separator \
                     of the channel rules: the rule does not apply to it"
                );
                return false;
            }
            match rest.strip_prefix(value) {
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

/// What the channel rules say about one channel: the first rule whose
/// pattern fits it, resolved once when a connection subscribes and kept on
/// the hub's entry for the channel, so a publication reads it there and
/// never walks the rules.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rule {
    /// The history the channel keeps, if any.
    pub(crate) history: Option<HistoryRule>,
    /// The rule says `presence = true`.
    presence: bool,
    /// The JSON pointer naming the event type of the channel's payloads.
    pub(crate) event_field: Box<str>,
}

impl Rule {
    /// Whether `channel`, which this rule fits, tracks presence: a Pusher
    /// `presence-` channel, or the rule says so.
    pub(crate) fn tracks_presence(&self, channel: &str) -> bool {
        self.presence || channel.starts_with("presence-")
    }
}

/// One `[[channels]]` entry, compiled: its pattern, who may subscribe,
/// and what it says about the channels it fits.
#[derive(Debug, Clone)]
struct Compiled {
    pattern: Pattern,
    subscribe: Subscribe,
    /// The rule's own `event_field`, if it names one.
    own_event_field: Option<String>,
    rule: Arc<Rule>,
}

/// The compiled rule list: one list of rules, walked once per subscribe.
#[derive(Debug)]
pub(crate) struct Policy {
    rules: Vec<Compiled>,
    /// What applies to a channel no rule fits (dev mode lets anyone hear
    /// it): no history, no presence, the default event field.
    unmatched: Arc<Rule>,
    separators: Separators,
    allow_all: bool,
    /// How many times the rules were walked for a channel: a subscribe
    /// walks them once, a publication never (see [`Rule`]). Counted for
    /// the tests only.
    #[cfg(test)]
    walks: AtomicUsize,
}

/// A channel this client may not hear: the same answer whether or not the
/// channel exists.
const FORBIDDEN: Refusal = Refusal::Forbidden("forbidden");
/// A channel only signed-in clients may hear, asked for by an anonymous one.
const NEEDS_AUTH: Refusal = Refusal::Unauthorized(Failure::Missing.reason());

impl Policy {
    /// Rules in order, each pattern parsed once here: this is where a
    /// pattern this version does not understand is found, and the error
    /// names it as `channels[i].pattern` (the server turns it into a
    /// configuration error). `allow_all` (dev mode) lets anyone hear any
    /// channel.
    pub(crate) fn new(rules: &[ChannelRule], allow_all: bool) -> Result<Self, String> {
        let default = crate::config::DEFAULT_EVENT_FIELD;
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let pattern = Pattern::parse(&r.pattern)
                    .map_err(|e| format!("channels[{i}].pattern: {e}"))?;
                Ok(Compiled {
                    pattern,
                    subscribe: r.subscribe,
                    own_event_field: r.event_field.clone(),
                    rule: Arc::new(Rule {
                        history: r.history,
                        presence: r.presence,
                        event_field: r.event_field.as_deref().unwrap_or(default).into(),
                    }),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            separators: Separators::of(rules.iter().map(|c| &c.pattern)),
            rules,
            unmatched: Arc::new(Rule {
                history: None,
                presence: false,
                event_field: default.into(),
            }),
            allow_all,
            #[cfg(test)]
            walks: AtomicUsize::new(0),
        })
    }

    /// Sets the top-level `event_field` (default `/type`): the event field
    /// of every rule that does not name its own.
    pub(crate) fn with_event_field(mut self, pointer: &str) -> Self {
        for compiled in &mut self.rules {
            if compiled.own_event_field.is_none() {
                Arc::make_mut(&mut compiled.rule).event_field = pointer.into();
            }
        }
        Arc::make_mut(&mut self.unmatched).event_field = pointer.into();
        self
    }

    /// What the rules say about `channel`: the first rule whose pattern
    /// fits it, reading placeholders as any text (as the Redis function
    /// does, which knows nothing of principals). For what is not a
    /// subscribe (the HTTP API, the memory broker's history); a subscribe
    /// asks [`Policy::resolve`], which decides and finds this in one walk.
    pub(crate) fn rule_of(&self, channel: &str) -> Arc<Rule> {
        self.walked();
        let fitting = self
            .rules
            .iter()
            .find(|c| self.fits(&c.pattern, channel))
            .map(|c| &c.rule);
        Arc::clone(fitting.unwrap_or(&self.unmatched))
    }

    /// Whether `pattern` fits `channel` for some principal.
    fn fits(&self, pattern: &Pattern, channel: &str) -> bool {
        pattern.matches(channel, &Principal::default(), &self.separators)
            || pattern.could_match(channel)
    }

    /// `(pattern, history)` of every rule, for the Redis function library.
    pub(crate) fn history_rules(rules: &[ChannelRule]) -> Vec<(String, Option<HistoryRule>)> {
        rules
            .iter()
            .map(|r| (r.pattern.clone(), r.history))
            .collect()
    }

    /// May `who` subscribe to `channel`?
    #[cfg(test)]
    fn may_subscribe(&self, channel: &str, who: &Principal) -> Result<(), Refusal> {
        self.resolve(channel, who).map(drop)
    }

    /// Decides whether `who` may subscribe to `channel` and, if so, what
    /// the rules say about it ([`Policy::rule_of`]), in one walk of the
    /// rules: the first rule fitting the channel comes at or before the
    /// first one matching for `who`.
    pub(crate) fn resolve(&self, channel: &str, who: &Principal) -> Result<Arc<Rule>, Refusal> {
        validate_channel(channel)
            .map_err(|why| Refusal::BadRequest(format!("bad channel name: {why}")))?;
        if self.allow_all {
            return Ok(self.rule_of(channel));
        }
        self.walked();
        let mut fitting = None;
        let mut decided = None;
        let mut needs_auth = false;
        for compiled in &self.rules {
            let pattern = &compiled.pattern;
            if pattern.matches(channel, who, &self.separators) {
                decided = Some(compiled.subscribe);
                fitting.get_or_insert(&compiled.rule);
                break;
            }
            let could = pattern.could_match(channel);
            if fitting.is_none()
                && (could || pattern.matches(channel, &Principal::default(), &self.separators))
            {
                fitting = Some(&compiled.rule);
            }
            // `user:{user}` cannot apply to an anonymous client, but it
            // would to some signed-in one: if no later rule lets this
            // client in, credentials are what is missing.
            needs_auth |= who.user.is_none() && could;
        }
        let Some(subscribe) = decided else {
            return Err(if needs_auth { NEEDS_AUTH } else { FORBIDDEN });
        };
        let allowed = match subscribe {
            Subscribe::Anyone => Ok(()),
            Subscribe::User if who.user.is_some() => Ok(()),
            Subscribe::Claim if who.grants.iter().any(|g| grant_covers(g, channel)) => Ok(()),
            Subscribe::User | Subscribe::Claim if who.user.is_none() => Err(NEEDS_AUTH),
            Subscribe::User | Subscribe::Claim => Err(FORBIDDEN),
        };
        allowed.map(|()| Arc::clone(fitting.unwrap_or(&self.unmatched)))
    }

    /// How many times the rules were walked so far.
    #[cfg(test)]
    pub(crate) fn walks(&self) -> usize {
        self.walks.load(Ordering::Relaxed)
    }

    /// Counts one walk of the rules (for the tests).
    fn walked(&self) {
        #[cfg(test)]
        self.walks.fetch_add(1, Ordering::Relaxed);
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
pub(crate) fn validate_channel(channel: &str) -> Result<(), &'static str> {
    if channel.is_empty() {
        return Err("empty");
    }
    if channel.len() > MAX_CHANNEL_LEN {
        return Err("longer than 256 bytes");
    }
    if channel.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or a control character");
    }
    if channel.starts_with("crier:") {
        return Err("`crier:` is reserved for crier's own keys and channels");
    }
    // A brace is allowed as part of a Redis Cluster hash tag (`{tag}`),
    // which decides the channel's shard; any other brace would put its
    // history on another shard than the channel.
    if channel.contains(['{', '}']) && !crate::history::has_hash_tag(channel) {
        return Err("`{` and `}` may only form a Redis hash tag such as `orders:{42}`");
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
            presence: false,
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
        )
        .expect("valid rules");
        let anon = Principal::default();
        assert_eq!(policy.may_subscribe("public:a", &anon), Ok(()));
        assert_eq!(policy.may_subscribe("public:a:b", &anon), Ok(()));
        assert_eq!(
            policy.may_subscribe("public:secret", &anon),
            Err(NEEDS_AUTH)
        );
        assert_eq!(policy.may_subscribe("public:", &anon), Err(FORBIDDEN));
        assert_eq!(policy.may_subscribe("private:a", &anon), Err(FORBIDDEN));
    }

    #[test]
    fn names_are_validated_before_rules() {
        let policy = Policy::new(&[], true).expect("valid rules");
        let anon = Principal::default();
        assert!(policy.may_subscribe(&"a".repeat(256), &anon).is_ok());
        assert!(policy.may_subscribe("orders:{42}:x", &anon).is_ok());
        for bad in [
            "",
            "a b",
            "a\nb",
            "a\u{7f}",
            &"a".repeat(257),
            "crier:x",
            "a}b",
            "a{}b",
            "a{b",
        ] {
            assert!(
                matches!(
                    policy.may_subscribe(bad, &anon),
                    Err(Refusal::BadRequest(_))
                ),
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
        )
        .expect("valid rules");
        let u42 = user(
            "42",
            serde_json::json!({"org": "acme"}),
            &["ops:deploys", "ops:db:*"],
        );
        assert_eq!(policy.may_subscribe("user:42", &u42), Ok(()));
        assert_eq!(policy.may_subscribe("user:43", &u42), Err(FORBIDDEN));
        assert_eq!(policy.may_subscribe("user:42x", &u42), Err(FORBIDDEN));
        assert_eq!(policy.may_subscribe("org:acme:news", &u42), Ok(()));
        assert_eq!(policy.may_subscribe("org:evil:news", &u42), Err(FORBIDDEN));
        assert_eq!(policy.may_subscribe("ops:deploys", &u42), Ok(()));
        assert_eq!(policy.may_subscribe("ops:db:main", &u42), Ok(()));
        assert_eq!(policy.may_subscribe("ops:billing", &u42), Err(FORBIDDEN));
        let anon = Principal::default();
        assert_eq!(policy.may_subscribe("user:42", &anon), Err(NEEDS_AUTH));
        assert_eq!(policy.may_subscribe("org:acme:x", &anon), Err(NEEDS_AUTH));
        assert_eq!(policy.may_subscribe("ops:deploys", &anon), Err(NEEDS_AUTH));
        assert_eq!(policy.may_subscribe("private:x", &anon), Err(FORBIDDEN));
        // A later `anyone` rule still lets anonymous clients in.
        let layered = Policy::new(
            &[
                rule("chat:{user}", Subscribe::User),
                rule("chat:*", Subscribe::Anyone),
            ],
            false,
        )
        .expect("valid rules");
        assert_eq!(layered.may_subscribe("chat:lobby", &anon), Ok(()));
        assert_eq!(layered.may_subscribe("chat:lobby", &u42), Ok(()));
        // A user id is text, never a wildcard.
        let star = user("*", serde_json::json!({}), &[]);
        assert_eq!(policy.may_subscribe("user:42", &star), Err(FORBIDDEN));
    }

    /// What building a policy says of one rule's pattern: where patterns
    /// are checked.
    fn check(rule: ChannelRule) -> Result<(), String> {
        Policy::new(&[rule], false).map(|_| ())
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check(rule("a:*", Subscribe::Anyone)).is_ok());
        assert!(check(rule("a:*:b", Subscribe::Anyone)).is_err());
        assert!(check(rule("", Subscribe::Anyone)).is_err());
        assert!(check(rule("a b*", Subscribe::Anyone)).is_err());
        assert!(check(rule("u:{user}", Subscribe::User)).is_ok());
        assert!(check(rule("u:{claim.org}:*", Subscribe::User)).is_ok());
        assert!(check(rule("u:{nobody}", Subscribe::User)).is_err());
        assert!(check(rule("u:{user", Subscribe::User)).is_err());
        // A placeholder is one whole segment.
        assert!(check(rule("u:{user}*", Subscribe::User)).is_err());
        assert!(check(rule("u:{user}{claim.org}", Subscribe::User)).is_err());
        assert!(check(rule("u:{user}x:*", Subscribe::User)).is_err());
        assert!(check(rule("u:{user}-x", Subscribe::User)).is_ok());
        assert!(check(rule("{user}/feed", Subscribe::User)).is_ok());
        // The error names the rule, as the configuration does.
        let e = Policy::new(
            &[
                rule("a:*", Subscribe::Anyone),
                rule("u:{nobody}", Subscribe::User),
            ],
            false,
        )
        .expect_err("bad pattern");
        assert!(e.starts_with("channels[1].pattern: `u:{nobody}`: "), "{e}");
    }

    #[test]
    fn a_rules_event_field_wins() {
        let cfg: crate::config::Config = toml::from_str(
            "event_field = \"/event_type\"\n\
             [[channels]]\npattern = \"laravel:*\"\nsubscribe = \"anyone\"\nevent_field = \"/event\"\n\
             [[channels]]\npattern = \"user:{user}\"\nsubscribe = \"user\"\nevent_field = \"/meta/kind\"\n\
             [[channels]]\npattern = \"*\"\nsubscribe = \"anyone\"\n",
        )
        .expect("valid");
        let policy = Policy::new(&cfg.channels, false)
            .expect("valid rules")
            .with_event_field(&cfg.event_field);
        let field = |channel: &str| policy.rule_of(channel).event_field.to_string();
        assert_eq!(field("laravel:orders"), "/event");
        assert_eq!(field("user:42"), "/meta/kind", "placeholders as any text");
        assert_eq!(field("ops:1"), "/event_type", "the default");
        // A subscriber's one walk finds the same rule it is let in by.
        let who = user("42", serde_json::json!({}), &[]);
        let resolved = policy.resolve("user:42", &who).expect("allowed");
        assert_eq!(&*resolved.event_field, "/meta/kind");
    }

    #[test]
    fn a_value_holding_a_separator_never_widens_a_rule() {
        let policy = Policy::new(
            &[
                rule("home:{user}:*", Subscribe::User),
                rule("user:{user}", Subscribe::User),
                rule("org:{claim.org}:*", Subscribe::User),
            ],
            false,
        )
        .expect("valid rules");
        let a = user("a", serde_json::json!({"org": "acme"}), &[]);
        let ab = user("a:b", serde_json::json!({"org": "acme:evil"}), &[]);
        // The report: user `a` heard `home:a:b:inbox`, which the same rule
        // also gave to user `a:b` (and org `acme` heard org `acme:evil`).
        // Each channel now has exactly one owner: `home:a:b:inbox` is under
        // `home:a:*`, so it is `a`'s...
        assert_eq!(policy.may_subscribe("home:a:b:inbox", &a), Ok(()));
        assert_eq!(policy.may_subscribe("org:acme:evil:news", &a), Ok(()));
        // ...and a value holding a separator fills no placeholder (`:` ends
        // a placeholder in `home:{user}:*`, so it counts for `user:{user}`
        // too): `a:b` and `acme:evil` can no longer claim anyone's channel.
        assert_eq!(policy.may_subscribe("home:a:b:inbox", &ab), Err(FORBIDDEN));
        assert_eq!(policy.may_subscribe("user:a:b", &ab), Err(FORBIDDEN));
        assert_eq!(policy.may_subscribe("org:acme:evil:x", &ab), Err(FORBIDDEN));
        let empty = user("", serde_json::json!({"org": ""}), &[]);
        assert_eq!(policy.may_subscribe("org::x", &empty), Err(FORBIDDEN));
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// Rules with placeholders in every position a separator allows.
        const PATTERNS: [&str; 7] = [
            "home:{user}:*",
            "home:{user}",
            "org:{claim.org}:*",
            "u.{user}.x.*",
            "{user}/feed",
            "t:{claim.org}:{user}:*",
            "d-{user}-{claim.org}",
        ];

        /// Text from an alphabet rich in the rules' separators, so that
        /// values and channel names collide often.
        fn text() -> impl Strategy<Value = String> {
            proptest::string::string_regex("[ab:./\\-*]{0,5}").expect("regex")
        }

        fn principal(id: String, org: String) -> Principal {
            Principal {
                user: Some(id),
                claims: serde_json::json!({ "org": org })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ..Principal::default()
            }
        }

        /// A channel shaped like `pattern`, its placeholders filled with
        /// `fill` (so that it matches some principal often).
        fn channel(pattern: &str, fill: &[String], tail: &str) -> String {
            let mut out = pattern.replace('*', tail);
            for (i, name) in ["{user}", "{claim.org}"].iter().enumerate() {
                out = out.replace(name, &fill[i % fill.len()]);
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Issue 8, point 1: a channel admitted for A under a
            /// placeholder rule is never admitted for a B whose values for
            /// that rule's placeholders differ.
            #[test]
            fn no_two_principals_share_a_channel_through_one_rule(
                rule_index in 0..PATTERNS.len(),
                (a_user, a_org, b_user, b_org) in (text(), text(), text(), text()),
                fill in proptest::collection::vec(text(), 1..3),
                tail in text(),
            ) {
                let pattern = PATTERNS[rule_index];
                let policy = Policy::new(
                    &PATTERNS.map(|p| rule(p, Subscribe::User)),
                    false,
                )
                .expect("valid rules");
                let single = Policy::new(&[rule(pattern, Subscribe::User)], false).expect("valid rules");
                let a = principal(a_user.clone(), a_org.clone());
                let b = principal(b_user.clone(), b_org.clone());
                let uses_user = pattern.contains("{user}");
                let uses_org = pattern.contains("{claim.org}");
                let same = (!uses_user || a_user == b_user) && (!uses_org || a_org == b_org);
                let candidates = [
                    channel(pattern, &fill, &tail),
                    channel(pattern, &[a_user.clone(), a_org.clone()], &tail),
                    channel(pattern, &[b_user.clone(), b_org.clone()], &tail),
                ];
                for c in &candidates {
                    let both = single.may_subscribe(c, &a).is_ok()
                        && single.may_subscribe(c, &b).is_ok();
                    prop_assert!(same || !both, "{pattern}: {c:?} admitted for {a:?} and {b:?}");
                }
                // Across the whole rule list (user-only rules), a channel
                // belongs to one user id.
                let user_rules: Vec<_> = PATTERNS
                    .iter()
                    .filter(|p| !p.contains("claim"))
                    .map(|p| rule(p, Subscribe::User))
                    .collect();
                let users = Policy::new(&user_rules, false).expect("valid rules");
                for c in &candidates {
                    let both = users.may_subscribe(c, &a).is_ok()
                        && users.may_subscribe(c, &b).is_ok();
                    prop_assert!(a_user == b_user || !both, "{c:?} admitted for {a_user:?} and {b_user:?}");
                }
                // A principal always hears its own channel when its values
                // are whole segments (the rule is not simply switched off).
                let own = channel(pattern, &[a_user.clone(), a_org.clone()], "x");
                let clean = |v: &str| !v.is_empty() && !v.contains(['.', ':', '/', '-']);
                if clean(&a_user) && clean(&a_org) && validate_channel(&own).is_ok() {
                    prop_assert_eq!(policy.may_subscribe(&own, &a), Ok(()), "{}", own);
                }
            }
        }
    }
}
