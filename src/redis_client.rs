//! Opening a Redis client from crier's configuration: the one place that
//! knows about `rediss://` (TLS, with `[redis.tls]`) and the `[redis]`
//! credentials, so the broker, `crier publish` and the session store all
//! connect the same way.

use std::error::Error;
use std::sync::Arc;

use redis::{ConnectionAddr, IntoConnectionInfo, TlsCertificates};

use crate::config::{RedisConfig, RedisTlsConfig};

/// A client for `url` (named `field` in errors), with `config`'s
/// credentials where the URL has none and its TLS files for `rediss://`.
/// Reads the TLS files now, so a missing one is a configuration error.
pub(crate) fn open(field: &str, url: &str, config: &RedisConfig) -> Result<redis::Client, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{field}: not a URL ({e})"))?;
    let tls = match parsed.scheme() {
        "redis" | "redis+unix" | "unix" => false,
        "rediss" => true,
        other => {
            return Err(format!(
                "{field}: scheme `{other}` not supported (use redis:// or rediss:// for TLS)"
            ))
        }
    };
    let mut info = url
        .into_connection_info()
        .map_err(|e| format!("{field}: not a usable Redis URL ({e})"))?;
    let mut settings = info.redis_settings().clone();
    if settings.username().is_none() {
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
    }
    if settings.password().is_none() {
        if let Some(password) = &config.password {
            settings = settings.set_password(password);
        }
    }
    // No `CLIENT SETINFO` on connect: one command less for an ACL user to
    // be granted (and Redis 7.0 does not know it).
    info = info.set_redis_settings(settings.set_skip_set_lib_name());
    if !tls {
        return redis::Client::open(info).map_err(|e| format!("{field}: {e}"));
    }
    debug_assert!(matches!(info.addr(), ConnectionAddr::TcpTls { .. }));
    redis::Client::build_with_tls(info, certificates(&config.tls)?)
        .map_err(|e| format!("{field}: cannot set up TLS ({e})"))
}

/// `[redis.tls]`'s files, read and checked: a CA file must hold at least
/// one PEM certificate, or every server would be refused for a reason the
/// log could not name.
pub(crate) fn certificates(files: &RedisTlsConfig) -> Result<TlsCertificates, String> {
    let read = |name: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| format!("redis.tls.{name}: cannot read {}: {e}", path.display()))
    };
    let root_cert = files
        .ca_file
        .as_deref()
        .map(|p| read("ca_file", p))
        .transpose()?;
    if let (Some(pem), Some(path)) = (&root_cert, &files.ca_file) {
        if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "redis.tls.ca_file: {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    let client_tls = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("cert_file", cert)?,
            client_key: read("key_file", key)?,
        }),
        (Some(_), None) => return Err("redis.tls.key_file: needed with cert_file".into()),
        (None, Some(_)) => return Err("redis.tls.cert_file: needed with key_file".into()),
        (None, None) => None,
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// `e` for a log line, followed by the rustls error underneath it in
/// rustls's own words (`InvalidCertificate(NotValidForNameContext { … })`,
/// `ExpiredContext`, `UnknownIssuer`): redis-rs shows rustls's prose,
/// which leaves out the variant names docs/operations.md tells operators to
/// search the log for.
pub(crate) fn describe(e: &redis::RedisError) -> String {
    match rustls_cause(e) {
        Some(tls) => format!("{e} ({tls:?})"),
        None => e.to_string(),
    }
}

/// The rustls error in `e`'s chain: redis-rs keeps the I/O error (in an
/// `Arc`) whose payload tokio-rustls made the rustls error.
fn rustls_cause<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if let Some(inner) = io.get_ref() {
            return rustls_cause(inner);
        }
    }
    if let Some(shared) = e.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
        return rustls_cause(shared.as_ref());
    }
    if let Some(shared) = e.downcast_ref::<Arc<std::io::Error>>() {
        return rustls_cause(shared.as_ref());
    }
    e.source().and_then(rustls_cause)
}
