//! Bearer tokens: JWT verification against an explicit algorithm allow-list.
//!
//! The token's `alg` is read and checked against the list *before* any key
//! is chosen, so `alg: none` and algorithm confusion (an HS256 token "signed"
//! with the RSA public key) are refused by construction: each algorithm
//! family has its own key, and a family without a configured key is refused.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, Validation};
use serde_json::{Map, Value};

use super::jwks::{Jwks, Lookup};
use super::{time, Failure, Principal};
use crate::config::JwtConfig;
use crate::metrics::Metrics;

/// The smallest RSA modulus crier verifies with (RFC 7518 §3.3: "a key
/// of size 2048 bits or larger MUST be used"); smaller ones are factorable
/// by whoever means to forge tokens.
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// The size of an RSA public key's modulus, in bits: from a JWK's `n`, or
/// from the PKCS#1 `RSAPublicKey` DER a PEM holds (`SEQUENCE { INTEGER n,
/// INTEGER e }`). `None` when it is neither.
pub(crate) fn rsa_bits(key: &DecodingKey) -> Option<usize> {
    let modulus = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, .. } => n.as_slice(),
        DecodingKeyKind::SecretOrDer(der) => {
            let (tag, body, _) = der_item(der)?;
            if tag != 0x30 {
                return None;
            }
            let (tag, n, _) = der_item(body)?;
            if tag != 0x02 {
                return None;
            }
            n
        }
    };
    let start = modulus.iter().position(|b| *b != 0)?;
    let significant = &modulus[start..];
    Some(significant.len() * 8 - significant[0].leading_zeros() as usize)
}

/// One DER item of `bytes`: its tag, its contents and what follows.
fn der_item(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// A verifier built once from `[auth.jwt]`.
pub struct JwtVerifier {
    algorithms: Vec<Algorithm>,
    hmac: Option<DecodingKey>,
    public: Option<(AlgorithmFamily, DecodingKey)>,
    /// The IdP's key set, when configured.
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    user_claim: String,
    channels_claim: String,
}

impl JwtVerifier {
    /// Loads keys; the error names the offending field.
    pub fn new(config: &JwtConfig, metrics: Metrics) -> Result<Self, String> {
        if config.algorithms.is_empty() {
            return Err("auth.jwt.algorithms: list at least one algorithm".into());
        }
        let mut algorithms = Vec::new();
        for name in &config.algorithms {
            let alg: Algorithm = name.parse().map_err(|_| {
                format!("auth.jwt.algorithms: unknown algorithm `{name}` (HS256, RS256, ES256, EdDSA, ...)")
            })?;
            algorithms.push(alg);
        }
        let needs_hmac = algorithms
            .iter()
            .any(|a| a.family() == AlgorithmFamily::Hmac);
        let public_families: Vec<AlgorithmFamily> = algorithms
            .iter()
            .map(|a| a.family())
            .filter(|f| *f != AlgorithmFamily::Hmac)
            .collect();
        let jwks = Jwks::new(config, &algorithms, metrics)?.map(Arc::new);
        if jwks.is_none() && public_families.windows(2).any(|w| w[0] != w[1]) {
            return Err(
                "auth.jwt.algorithms: one public key serves one family (RS*, ES* or EdDSA), not \
                 several (a jwks_url may serve several)"
                    .into(),
            );
        }

        let secret = match (&config.secret, &config.secret_file) {
            (Some(_), Some(_)) => {
                return Err("auth.jwt: set secret or secret_file, not both".into());
            }
            (Some(s), None) => Some(s.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        format!("auth.jwt.secret_file: cannot read {}: {e}", path.display())
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let hmac = match (needs_hmac, secret) {
            (true, Some(s)) if s.len() >= 32 => Some(DecodingKey::from_secret(s.as_bytes())),
            (true, Some(_)) => {
                return Err("auth.jwt.secret: too short for HMAC: use at least 32 bytes".into())
            }
            (true, None) => {
                return Err(
                    "auth.jwt.secret: required by the HS algorithms (or secret_file)".into(),
                )
            }
            (false, _) => None,
        };
        let public = match (public_families.first(), &config.public_key_file) {
            (Some(_), None) if jwks.is_some() => None,
            (Some(family), Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!(
                        "auth.jwt.public_key_file: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                let key = match family {
                    AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
                    AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
                    _ => DecodingKey::from_ed_pem(&pem),
                }
                .map_err(|e| format!("auth.jwt.public_key_file: not a usable PEM key ({e})"))?;
                if *family == AlgorithmFamily::Rsa {
                    let bits = rsa_bits(&key).unwrap_or(0);
                    if bits < MIN_RSA_BITS {
                        return Err(format!(
                            "auth.jwt.public_key_file: an RSA key of {bits} bits; RS algorithms \
                             need at least {MIN_RSA_BITS} (RFC 7518 §3.3)"
                        ));
                    }
                }
                Some((*family, key))
            }
            (Some(_), None) => {
                return Err(
                    "auth.jwt.public_key_file: required by the RS, ES and EdDSA algorithms \
                     (or jwks_url)"
                        .into(),
                )
            }
            (None, _) => None,
        };
        Ok(Self {
            algorithms,
            hmac,
            public,
            jwks,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway,
            user_claim: config.user_claim.clone(),
            channels_claim: config.channels_claim.clone(),
        })
    }

    /// The IdP's key set, to keep fresh ([`Jwks::run`]).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// The key for a token signed with `alg` naming `kid`: the secret for
    /// HMAC; the key set's key with that `kid` (fetching the set again
    /// once if it has none), else the configured public key.
    async fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Result<KeyRef<'_>, Failure> {
        if alg.family() == AlgorithmFamily::Hmac {
            return self
                .hmac
                .as_ref()
                .map(KeyRef::Own)
                .ok_or(Failure::BadAlgorithm);
        }
        if let Some(jwks) = &self.jwks {
            let mut found = jwks.find(kid, alg);
            if matches!(found, Lookup::Unknown) {
                // Fetched now, or by another lookup a moment ago: look
                // again either way.
                jwks.refresh_for_unknown_kid().await;
                found = jwks.find(kid, alg);
            }
            match found {
                Lookup::Found(key) => return Ok(KeyRef::Shared(key)),
                Lookup::WrongAlgorithm => return Err(Failure::BadAlgorithm),
                Lookup::Unknown if self.public.is_none() => return Err(Failure::UnknownKey),
                Lookup::Unknown => {}
            }
        }
        self.public
            .as_ref()
            .filter(|(family, _)| *family == alg.family())
            .map(|(_, key)| KeyRef::Own(key))
            .ok_or(Failure::BadAlgorithm)
    }

    /// Verifies `token` and turns its claims into a principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, Failure> {
        let (alg, kid) = self.allowed_alg(token)?;
        let key = self.key_for(alg, kid.as_deref()).await?;
        let key: &DecodingKey = match &key {
            KeyRef::Own(key) => key,
            KeyRef::Shared(key) => key,
        };

        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not merely
        // match when present.
        let mut required = vec!["exp"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => Failure::Expired,
                ErrorKind::ImmatureSignature => Failure::NotYetValid,
                ErrorKind::InvalidIssuer => Failure::BadIssuer,
                ErrorKind::InvalidAudience => Failure::BadAudience,
                ErrorKind::InvalidSignature => Failure::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    Failure::BadAlgorithm
                }
                ErrorKind::MissingRequiredClaim(_) => Failure::MissingClaim,
                _ => Failure::Malformed,
            },
        )?;
        let claims = data.claims;
        let user = super::user_id(claims.get(&self.user_claim)).ok_or(Failure::MissingClaim)?;
        // jsonwebtoken has checked `exp` and `nbf` against the clock; crier
        // keeps `exp` for the expiry watch, so every time claim must also be
        // one it can compute with (no overflow, no float read as "never").
        let expires_at = claims.get("exp").and_then(time::from_secs);
        if expires_at.is_none() {
            return Err(Failure::InvalidClaim);
        }
        for name in ["nbf", "iat"] {
            if claims
                .get(name)
                .is_some_and(|v| time::from_secs(v).is_none())
            {
                return Err(Failure::InvalidClaim);
            }
        }
        let grants = match claims.get(&self.channels_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Principal {
            user: Some(user),
            claims,
            grants,
            expires_at,
            session: None,
        })
    }

    /// The token's `alg`, if it is on the allow-list, and its `kid`. Read
    /// by hand so that names jsonwebtoken does not know (`none`) are
    /// refused the same way.
    fn allowed_alg(&self, token: &str) -> Result<(Algorithm, Option<String>), Failure> {
        let header = token.split('.').next().ok_or(Failure::Malformed)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header.trim_end_matches('='))
            .map_err(|_| Failure::Malformed)?;
        let header: Value = serde_json::from_slice(&bytes).map_err(|_| Failure::Malformed)?;
        let name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(Failure::Malformed)?;
        let alg: Algorithm = name.parse().map_err(|_| Failure::BadAlgorithm)?;
        let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
        if self.algorithms.contains(&alg) {
            Ok((alg, kid))
        } else {
            Err(Failure::BadAlgorithm)
        }
    }
}

/// A verification key: the verifier's own, or one of the key set's.
enum KeyRef<'a> {
    Own(&'a DecodingKey),
    Shared(Arc<DecodingKey>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture")
    }

    #[test]
    fn rsa_key_sizes_are_read_from_pem_and_jwk() {
        let pem = |name| DecodingKey::from_rsa_pem(&fixture(name)).expect("PEM");
        assert_eq!(rsa_bits(&pem("rsa_public.pem")), Some(2048));
        assert_eq!(rsa_bits(&pem("rsa1024_public.pem")), Some(1024));
        // A modulus with its leading zero octet (as DER writes it), and
        // one whose top bit is not set.
        let mut n = vec![0u8, 0x80];
        n.extend([0u8; 255]);
        assert_eq!(
            rsa_bits(&DecodingKey::from_rsa_raw_components(&n, &[1, 0, 1])),
            Some(2048)
        );
        let mut short = vec![1u8];
        short.extend([0u8; 255]);
        assert_eq!(
            rsa_bits(&DecodingKey::from_rsa_raw_components(&short, &[1, 0, 1])),
            Some(2041)
        );
        assert_eq!(rsa_bits(&DecodingKey::from_secret(b"not a key")), None);
    }
}
