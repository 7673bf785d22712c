//! A local identity provider for tests: serves a JWK set (and an OpenID
//! configuration naming it) over HTTP or HTTPS with a CA the test makes,
//! counts its fetches, and can be turned down or made to answer garbage.
//! Signing keys made here (EC keys generated per test, the RSA fixture)
//! sign tokens and publish their public half as JWKs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// How the IdP answers `/certs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The current key set.
    Serve,
    /// 503.
    Down,
    /// 200 with a body that is not a key set.
    Garbage,
    /// The request is read (and counted), never answered: an IdP that
    /// hangs.
    Hang,
}

struct State {
    keys: Mutex<Vec<Jwk>>,
    mode: Mutex<Mode>,
    fetches: AtomicUsize,
    base: Mutex<String>,
    /// The `issuer` the OpenID configuration names, when not `base`.
    discovery_issuer: Mutex<Option<String>>,
}

/// See the module documentation.
pub struct Idp {
    /// `http(s)://host:port`, the issuer.
    pub base: String,
    /// The CA to trust, for HTTPS.
    pub ca_pem: Option<String>,
    state: Arc<State>,
}

impl Idp {
    /// An IdP on a free port; with `tls`, HTTPS for `localhost` signed by
    /// a CA made here.
    pub async fn start(tls: bool) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (acceptor, ca_pem, base) = if tls {
            let ca = super::pki::Ca::new("crier test IdP CA");
            let acceptor = ca.leaf(&["localhost"]).acceptor();
            (
                Some(acceptor),
                Some(ca.pem()),
                format!("https://localhost:{port}"),
            )
        } else {
            (None, None, format!("http://127.0.0.1:{port}"))
        };
        let state = Arc::new(State {
            keys: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::Serve),
            fetches: AtomicUsize::new(0),
            base: Mutex::new(base.clone()),
            discovery_issuer: Mutex::new(None),
        });
        let served = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (state, acceptor) = (Arc::clone(&served), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move {
                            match answer(&state, req) {
                                Some(response) => Ok::<_, Infallible>(response),
                                None => std::future::pending().await,
                            }
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        Idp {
            base,
            ca_pem,
            state,
        }
    }

    /// Where the key set is.
    pub fn jwks_url(&self) -> String {
        format!("{}/certs", self.base)
    }

    /// Publishes exactly these keys.
    pub fn set_keys(&self, keys: &[&SigningKey]) {
        *self.state.keys.lock().expect("lock") = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    /// Publishes raw JWKs.
    pub fn set_jwks(&self, jwks: Vec<Jwk>) {
        *self.state.keys.lock().expect("lock") = jwks;
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("lock") = mode;
    }

    /// The OpenID configuration names `issuer` instead of this IdP's base
    /// URL (an impostor, or a misconfigured proxy in front of the IdP).
    pub fn set_discovery_issuer(&self, issuer: &str) {
        *self.state.discovery_issuer.lock().expect("lock") = Some(issuer.to_owned());
    }

    /// How many times `/certs` was asked for.
    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }
}

/// The answer to `req`; `None`: never answered ([`Mode::Hang`]).
fn answer(state: &State, req: Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    match req.uri().path() {
        "/certs" => {
            state.fetches.fetch_add(1, Ordering::SeqCst);
            match *state.mode.lock().expect("lock") {
                Mode::Down => Some(reply(StatusCode::SERVICE_UNAVAILABLE, "down".into())),
                Mode::Garbage => Some(reply(StatusCode::OK, "<html>not a key set</html>".into())),
                Mode::Hang => None,
                Mode::Serve => {
                    let keys = state.keys.lock().expect("lock").clone();
                    Some(reply(StatusCode::OK, json!({"keys": keys}).to_string()))
                }
            }
        }
        "/.well-known/openid-configuration" => {
            let base = state.base.lock().expect("lock").clone();
            let issuer = state
                .discovery_issuer
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_else(|| base.clone());
            let config = json!({"issuer": issuer, "jwks_uri": format!("{base}/certs")});
            Some(reply(StatusCode::OK, config.to_string()))
        }
        _ => Some(reply(StatusCode::NOT_FOUND, "{}".into())),
    }
}

/// A private key that signs tokens, and its public JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub jwk: Jwk,
}

impl SigningKey {
    /// A fresh P-256 key (ES256).
    pub fn ec(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate().expect("EC key");
        let encoding = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("EC PEM");
        Self::with(kid, Algorithm::ES256, encoding)
    }

    /// The RSA fixture key (2048 bits, RS256).
    pub fn rsa(kid: &str) -> SigningKey {
        Self::rsa_fixture("rsa_private.pem", kid)
    }

    /// The RSA key in `tests/fixtures/{file}` (RS256).
    pub fn rsa_fixture(file: &str, kid: &str) -> SigningKey {
        let pem =
            std::fs::read(super::repo(&format!("tests/fixtures/{file}"))).expect("RSA fixture");
        let encoding = EncodingKey::from_rsa_pem(&pem).expect("RSA PEM");
        Self::with(kid, Algorithm::RS256, encoding)
    }

    fn with(kid: &str, alg: Algorithm, encoding: EncodingKey) -> SigningKey {
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("JWK");
        jwk.common.key_id = Some(kid.to_owned());
        SigningKey {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
        }
    }

    /// The same key published as for another algorithm.
    pub fn jwk_claiming(&self, alg: KeyAlgorithm) -> Jwk {
        let mut jwk = self.jwk.clone();
        jwk.common.key_algorithm = Some(alg);
        jwk
    }

    /// A token for `claims`, its header naming `kid`.
    pub fn sign_as(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }

    /// A token for `claims` naming this key.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(Some(&self.kid), claims)
    }
}
