//! Which web pages may connect: the `Origin` header against
//! `allowed_origins`.
//!
//! Browsers send `Origin` on WebSocket upgrades and cross-origin requests;
//! a page on an origin the operator did not allow is refused with 403, so a
//! hostile site cannot use a visitor's cookies to listen in (cross-site
//! WebSocket hijacking). Requests without `Origin` (non-browser clients) and
//! same-origin pages are always allowed.

use http::{header, HeaderMap, HeaderValue};

use crate::refusal::Refusal;

/// One `allowed_origins` entry: `https://app.example.com`, or a wildcard
/// for subdomains `https://*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginPattern {
    scheme: String,
    /// Host (and `:port`), without the `*.` of a wildcard.
    host: String,
    wildcard: bool,
}

impl OriginPattern {
    /// Parses an entry; the error says what is wrong with it.
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        if raw.trim() == "*" {
            // CORS answers to SSE carry credentials (cookies, bearer
            // tokens), and browsers refuse `*` with credentials; echoing
            // any origin instead would let every site read a signed-in
            // user's events.
            return Err(
                "`*` would let any web site read a signed-in user's events (and browsers \
                 refuse `*` on requests with credentials): list the origins of your pages, \
                 e.g. [\"https://app.example.com\", \"https://*.example.com\"], or run \
                 with --dev (dev = true) on your machine, which allows any origin"
                    .into(),
            );
        }
        let (scheme, host) = raw
            .split_once("://")
            .ok_or_else(|| format!("`{raw}`: expected scheme://host[:port]"))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("`{raw}`: scheme must be http or https"));
        }
        if host.is_empty() || host.contains('/') {
            return Err(format!("`{raw}`: an origin has no path (not even `/`)"));
        }
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (host, false),
        };
        if host.contains('*') || host.is_empty() {
            return Err(format!(
                "`{raw}`: `*.` is only allowed at the start of the host"
            ));
        }
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            wildcard,
        })
    }

    fn allows(&self, origin: &str) -> bool {
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(&self.scheme) {
            return false;
        }
        let host = host.to_ascii_lowercase();
        if self.wildcard {
            host.strip_suffix(self.host.as_str())
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
        } else {
            host == self.host
        }
    }
}

/// The compiled `allowed_origins`.
#[derive(Debug, Clone)]
pub(crate) struct Origins {
    patterns: Vec<OriginPattern>,
    allow_any: bool,
}

/// The outcome of checking a request's `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No `Origin` (not a browser) or same origin: no CORS headers needed.
    NotCrossOrigin,
    /// An allowed foreign origin: echo it in CORS headers.
    Allowed(HeaderValue),
    /// A foreign origin that is not allowed.
    Refused,
}

impl Origins {
    /// From `allowed_origins`, each entry parsed once here: this is where a
    /// bad entry is found, and the error names it as `allowed_origins[i]`
    /// (the server turns it into a configuration error). `allow_any` is dev
    /// mode.
    pub(crate) fn new(entries: &[String], allow_any: bool) -> Result<Self, String> {
        let patterns = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                OriginPattern::parse(e).map_err(|why| format!("allowed_origins[{i}]: {why}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patterns,
            allow_any,
        })
    }

    /// Checks a request's `Origin` against `Host` and the allowed list.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Verdict {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Verdict::NotCrossOrigin;
        };
        let Ok(text) = origin.to_str() else {
            return Verdict::Refused;
        };
        let same_host = text
            .split_once("://")
            .map(|(_, host)| host)
            .zip(headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .is_some_and(|(o, h)| o.eq_ignore_ascii_case(h));
        if same_host {
            Verdict::NotCrossOrigin
        } else if self.allow_any || self.patterns.iter().any(|p| p.allows(text)) {
            Verdict::Allowed(origin.clone())
        } else {
            Verdict::Refused
        }
    }
}

/// Adds the CORS headers for an allowed foreign origin: exactly that
/// origin (never `*`, which browsers refuse with credentials) and
/// `Allow-Credentials`, so `EventSource` with `withCredentials` sends the
/// session cookie.
pub(crate) fn add_cors(headers: &mut HeaderMap, verdict: &Verdict) {
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Verdict::Allowed(origin) = verdict {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// The answer to a CORS preflight: 403 for an origin that is refused, else
/// 204 with the `methods` and request `headers` the route takes, cached by
/// the browser for ten minutes. (A preflight is not a connection: it is not
/// counted as a rejected one.)
pub(crate) fn preflight(
    origins: &Origins,
    request: &HeaderMap,
    methods: &'static str,
    headers: &'static str,
) -> http::Response<crate::http::Body> {
    let verdict = origins.check(request);
    if verdict == Verdict::Refused {
        return crate::http::refused(&Refusal::Forbidden("origin not allowed"));
    }
    let mut response = http::Response::new(crate::http::full(""));
    *response.status_mut() = http::StatusCode::NO_CONTENT;
    let out = response.headers_mut();
    add_cors(out, &verdict);
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    out.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(headers),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: &str, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().expect("origin"));
        h.insert(header::HOST, host.parse().expect("host"));
        h
    }

    #[test]
    fn exact_wildcard_same_origin_and_refusal() {
        let origins = Origins::new(
            &[
                "https://app.example.com".into(),
                "https://*.example.org".into(),
            ],
            false,
        )
        .expect("valid origins");
        let host = "events.example.com";
        assert!(matches!(
            origins.check(&headers("https://app.example.com", host)),
            Verdict::Allowed(_)
        ));
        assert!(matches!(
            origins.check(&headers("https://a.b.example.org", host)),
            Verdict::Allowed(_)
        ));
        for refused in [
            "http://app.example.com",
            "https://app.example.com.evil.net",
            "https://example.org",
            "https://evilexample.org",
            "null",
        ] {
            assert_eq!(
                origins.check(&headers(refused, host)),
                Verdict::Refused,
                "{refused}"
            );
        }
        assert_eq!(
            origins.check(&headers("https://events.example.com", host)),
            Verdict::NotCrossOrigin
        );
        assert_eq!(origins.check(&HeaderMap::new()), Verdict::NotCrossOrigin);
    }

    #[test]
    fn patterns_are_validated() {
        assert!(OriginPattern::parse("https://app.example.com:8443").is_ok());
        for bad in [
            "app.example.com",
            "https://a.com/",
            "ftp://a.com",
            "https://a.*.com",
            "https://*.",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
        let e =
            Origins::new(&["https://a.com".into(), "a.com".into()], false).expect_err("bad origin");
        assert!(e.starts_with("allowed_origins[1]: `a.com`: "), "{e}");
    }
}
