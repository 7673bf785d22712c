//! Requests crier makes to other servers: `crier publish --api`, the
//! identity provider's key set (JWKS), the app's session webhook. One
//! HTTP/1.1 request per connection, over TLS for `https://` (rustls with
//! the ring provider, trusting the system's roots or `SSL_CERT_FILE`'s,
//! plus an optional CA file), with a deadline on the whole exchange and a
//! cap on the answer's size.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

/// A client for one kind of request.
#[derive(Clone)]
pub(crate) struct Client {
    /// For `https://`; `None` when no CA is trusted at all.
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    max_body: usize,
}

/// An answer, read whole.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Client {
    /// A client trusting the system's CAs and those in `ca_file`; `field`
    /// names the setting in errors. Each exchange must finish within
    /// `timeout`, and answers larger than `max_body` are refused.
    pub(crate) fn new(
        field: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, String> {
        Ok(Self {
            tls: tls_connector(field, ca_file)?,
            timeout,
            max_body,
        })
    }

    /// Sends `request` to `url` (its path and query are the request's
    /// target; `Host` is set here).
    pub(crate) async fn send(
        &self,
        url: &url::Url,
        request: http::request::Builder,
        body: Bytes,
    ) -> Result<Answer, String> {
        tokio::time::timeout(self.timeout, self.exchange(url, request, body))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn exchange(
        &self,
        url: &url::Url,
        request: http::request::Builder,
        body: Bytes,
    ) -> Result<Answer, String> {
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("use an http:// or https:// URL, not {other}://")),
        };
        // The name to connect to and to check the certificate against.
        let host = match url.host().ok_or("the URL has no host")? {
            url::Host::Domain(name) => name.to_owned(),
            url::Host::Ipv4(ip) => ip.to_string(),
            url::Host::Ipv6(ip) => ip.to_string(),
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or(&host)),
            None => url.host_str().unwrap_or(&host).to_owned(),
        };
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let request = request
            .uri(target)
            .header(http::header::HOST, authority)
            .body(Full::new(body))
            .map_err(|e| format!("bad request: {e}"))?;
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let response = if tls {
            let connector = self.tls.as_ref().ok_or(
                "no trusted CA certificates: none found on this system; give a CA file or set SSL_CERT_FILE",
            )?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| format!("`{host}` is not a valid TLS server name"))?;
            let stream =
                connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| match rustls_error(&e) {
                        // rustls's prose leaves out the variant names
                        // (`NotValidForName`, `Expired`) operators search for.
                        Some(tls) => format!("TLS with {host}:{port} failed: {e} ({tls:?})"),
                        None => format!("TLS with {host}:{port} failed: {e}"),
                    })?;
            one_request(stream, request).await?
        } else {
            one_request(stream, request).await?
        };
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("answer larger than {} bytes", self.max_body)
                } else {
                    format!("cannot read the answer: {e}")
                }
            })?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// The rustls error tokio-rustls carries in a failed handshake's I/O error.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// One HTTP/1.1 request on `stream`.
async fn one_request<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(conn);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))
}

/// TLS trusting the system's roots (or `SSL_CERT_FILE`'s) and the
/// certificates in `ca_file`; `None` when there are none at all.
fn tls_connector(
    field: &str,
    ca_file: Option<&Path>,
) -> Result<Option<tokio_rustls::TlsConnector>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped; an empty store is
    // reported when an https request needs it.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                format!(
                    "{field}: cannot read PEM certificates from {}: {e}",
                    path.display()
                )
            })?;
        if certs.is_empty() {
            return Err(format!("{field}: no certificate in {}", path.display()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                format!(
                    "{field}: {} holds no usable CA certificate: {e}",
                    path.display()
                )
            })?;
        }
    }
    if roots.is_empty() {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}
