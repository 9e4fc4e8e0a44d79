//! Authentication: bearer JWTs verified against the configured keys — a static HMAC
//! secret or public key, or an identity provider's JWKS selected by `kid` ([`Jwks`]) —
//! algorithms from an allow-list, `exp`/`iss`/`aud`/`sub` required; a role claim
//! separates users from admins.
//! Agent credentials are refused here by their prefix, with a message saying so.
//!
//! Also the development token minter behind `streamspace-api-gateway mint-token`, which
//! works only when `auth.dev_tokens` is set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use streamspace_core::agents::CREDENTIAL_PREFIX;

use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::jwks::Jwks;

/// Longest accepted user id (`sub`).
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest accepted bearer token; real JWTs are far shorter.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Who is calling, as proven by the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub admin: bool,
}

impl Principal {
    /// `Forbidden` unless the caller has the admin role.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this endpoint needs the admin role; ask an operator for an admin token".into(),
            ))
        }
    }
}

/// Verifies bearer tokens. Built once from configuration.
#[derive(Clone)]
pub struct Verifier {
    /// Allowed algorithms with a statically configured key.
    keys: HashMap<Algorithm, DecodingKey>,
    /// Every allowed algorithm (asymmetric ones may be served by the JWKS alone).
    allowed: HashSet<Algorithm>,
    jwks: Option<Arc<Jwks>>,
    issuer: String,
    audience: String,
    role_claim: String,
    admin_role: String,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.allowed)
            .field("jwks", &self.jwks)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The largest clock-skew allowance accepted for `exp` and `nbf`.
const MAX_LEEWAY_SECS: u64 = 300;
/// Fewer distinct bytes than this is a pattern, not a secret (`aaaa…`, `0101…`).
const MIN_DISTINCT_SECRET_BYTES: usize = 10;
/// Words of placeholder values shipped in examples and manifests.
const PLACEHOLDER_MARKERS: [&str; 5] = [
    "replace-me",
    "change-me",
    "changeme",
    "placeholder",
    "example",
];

/// Refuses HMAC secrets that are short, a placeholder, or a pattern: with any of them,
/// anyone can sign tokens for any user.
fn check_hmac_secret(secret: &str) -> Result<(), String> {
    if secret.len() < 32 {
        return Err("auth.hmac_secret must be at least 32 bytes".into());
    }
    let lower = secret.to_ascii_lowercase();
    if PLACEHOLDER_MARKERS.iter().any(|m| lower.contains(m)) {
        return Err("auth.hmac_secret is a placeholder; generate one, e.g. `head -c 32 /dev/urandom | base64`".into());
    }
    let distinct = secret
        .bytes()
        .collect::<std::collections::HashSet<u8>>()
        .len();
    if distinct < MIN_DISTINCT_SECRET_BYTES {
        return Err(format!(
            "auth.hmac_secret has only {distinct} distinct characters; generate a random one, e.g. `head -c 32 /dev/urandom | base64`"
        ));
    }
    Ok(())
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>().map_err(|_| {
        format!(
            "auth.algorithms: unknown algorithm {name:?} (use HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"
        )
    })
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Result<Self, String> {
        if config.algorithms.is_empty() {
            return Err("auth.algorithms must name at least one algorithm".into());
        }
        if config.issuer.is_empty() || config.audience.is_empty() {
            return Err("auth.issuer and auth.audience must be set".into());
        }
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(format!(
                "auth.leeway_secs is {}; at most {MAX_LEEWAY_SECS} (a larger leeway keeps expired tokens working)",
                config.leeway_secs
            ));
        }
        let jwks = match &config.jwks_url {
            Some(url) => Some(Arc::new(Jwks::new(
                url,
                config.jwks_ca_file.as_deref(),
                Duration::from_millis(config.jwks_min_refresh_interval_ms),
            )?)),
            None => None,
        };
        let mut keys = HashMap::new();
        let mut allowed = HashSet::new();
        for name in &config.algorithms {
            let alg = parse_algorithm(name)?;
            allowed.insert(alg);
            let key = match alg.family() {
                AlgorithmFamily::Hmac => {
                    let secret = config.hmac_secret.as_ref().ok_or_else(|| {
                        format!("auth.algorithms has {name}, which needs auth.hmac_secret")
                    })?;
                    check_hmac_secret(secret.expose())?;
                    DecodingKey::from_secret(secret.expose().as_bytes())
                }
                family => {
                    let Some(pem) = config.public_key_pem.as_ref() else {
                        if jwks.is_some() {
                            continue;
                        }
                        return Err(format!(
                            "auth.algorithms has {name}, which needs auth.public_key_pem or auth.jwks_url"
                        ));
                    };
                    let parsed = match family {
                        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem.as_bytes()),
                        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem.as_bytes()),
                        _ => DecodingKey::from_ed_pem(pem.as_bytes()),
                    };
                    parsed.map_err(|e| format!("auth.public_key_pem for {name}: {e}"))?
                }
            };
            keys.insert(alg, key);
        }
        if jwks.is_some() && allowed.iter().all(|a| a.family() == AlgorithmFamily::Hmac) {
            return Err(
                "auth.jwks_url is set, but auth.algorithms names no asymmetric algorithm (e.g. EdDSA, ES256, RS256)"
                    .into(),
            );
        }
        Ok(Self {
            keys,
            allowed,
            jwks,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            role_claim: config.role_claim.clone(),
            admin_role: config.admin_role.clone(),
            leeway: config.leeway_secs,
        })
    }

    /// The JWKS keys come from, when configured (for its refresh task and metrics).
    pub fn jwks(&self) -> Option<Arc<Jwks>> {
        self.jwks.clone()
    }

    /// Verifies an `Authorization` header value, refreshing the JWKS (bounded) when the
    /// token names a key not seen yet.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Principal, ApiError> {
        self.verify_fresh(bearer(header)?).await
    }

    /// Verifies an `Authorization` header value with the keys at hand, without waiting:
    /// `Err(Refusal::UnknownKey)` when only a JWKS refresh could decide.
    pub fn verify_header_cached(&self, header: Option<&str>) -> Result<Principal, Refusal> {
        self.check(bearer(header).map_err(Refusal::Invalid)?)
    }

    /// Verifies a bearer token with the keys at hand; an unknown `kid` is refused.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        self.check(token).map_err(Refusal::into_error)
    }

    /// Verifies a bearer token; a `kid` not among the keys at hand triggers a JWKS refresh
    /// (at most one per `jwks_min_refresh_interval_ms`) and a second look.
    pub async fn verify_fresh(&self, token: &str) -> Result<Principal, ApiError> {
        match self.check(token) {
            Err(Refusal::UnknownKey) => {
                if let Some(jwks) = &self.jwks {
                    jwks.refresh_bounded().await;
                }
                self.check(token).map_err(Refusal::into_error)
            }
            other => other.map_err(Refusal::into_error),
        }
    }

    fn check(&self, token: &str) -> Result<Principal, Refusal> {
        let unauthenticated = |msg: String| Refusal::Invalid(ApiError::Unauthenticated(msg));
        if token.starts_with(CREDENTIAL_PREFIX) {
            return Err(unauthenticated(
                "agent credentials are not accepted by the API; use a user JWT".into(),
            ));
        }
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(unauthenticated(
                "the bearer token is empty or too long".into(),
            ));
        }
        // The header is untrusted until the signature is checked; it only selects which
        // of the allowed keys to try.
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            unauthenticated(
                "the bearer token is not a valid JWT, or its algorithm is not supported".into(),
            )
        })?;
        if !self.allowed.contains(&header.alg) {
            return Err(unauthenticated(format!(
                "tokens signed with {:?} are not accepted here",
                header.alg
            )));
        }
        let from_jwks;
        let key = match (&header.kid, &self.jwks) {
            (Some(kid), Some(jwks)) if header.alg.family() != AlgorithmFamily::Hmac => {
                let found = jwks.get(kid).ok_or(Refusal::UnknownKey)?;
                if !found.fits(header.alg) {
                    return Err(unauthenticated(format!(
                        "the token's key (kid) is not a {:?} key",
                        header.alg
                    )));
                }
                from_jwks = found.key;
                &from_jwks
            }
            _ => self.keys.get(&header.alg).ok_or_else(|| {
                unauthenticated(if self.jwks.is_some() {
                    format!(
                        "a {:?} token must name its signing key (kid) from the identity provider's key set",
                        header.alg
                    )
                } else {
                    format!("tokens signed with {:?} are not accepted here", header.alg)
                })
            })?,
        };
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = self.leeway;
        // Off by default in jsonwebtoken: a token dated to start in the future is not
        // valid yet.
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            key,
            &validation,
        )
        .map_err(|e| unauthenticated(describe(&e)))?;
        let claims = data.claims;
        let user_id = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .filter(|s| valid_user_id(s))
            .ok_or_else(|| {
                unauthenticated(format!(
                    "the token's sub must be a user id of 1-{MAX_USER_ID_LEN} printable characters"
                ))
            })?
            .to_owned();
        let admin = match claims.get(&self.role_claim) {
            Some(serde_json::Value::String(role)) => role == &self.admin_role,
            Some(serde_json::Value::Array(roles)) => roles
                .iter()
                .any(|r| r.as_str() == Some(self.admin_role.as_str())),
            _ => false,
        };
        Ok(Principal { user_id, admin })
    }
}

/// Why a token was not accepted.
#[derive(Debug)]
pub enum Refusal {
    Invalid(ApiError),
    /// It names a signing key (`kid`) the keys at hand do not have; a JWKS refresh might.
    UnknownKey,
}

impl Refusal {
    pub fn into_error(self) -> ApiError {
        match self {
            Refusal::Invalid(e) => e,
            Refusal::UnknownKey => ApiError::Unauthenticated(
                "the token's signing key (kid) is not one of the identity provider's keys".into(),
            ),
        }
    }
}

/// The token of an `Authorization: Bearer` value.
fn bearer(header: Option<&str>) -> Result<&str, ApiError> {
    let unauthenticated = |msg: &str| ApiError::Unauthenticated(msg.to_owned());
    let header = header.ok_or_else(|| {
        unauthenticated("missing credentials: send `Authorization: Bearer <JWT>`")
    })?;
    Ok(header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| unauthenticated("the Authorization header must be `Bearer <JWT>`"))?
        .trim())
}

fn valid_user_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_USER_ID_LEN
        && s.chars().all(|c| !c.is_control() && !c.is_whitespace())
}

/// Why a token was refused, for its unauthenticated sender: what is wrong, never what
/// would be right (the expected issuer and audience are not told).
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired; get a new one".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidIssuer => "the token's issuer is not accepted here".into(),
        K::InvalidAudience => "the token's audience is not accepted here".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::MissingRequiredClaim(c) => format!("the token lacks the required claim {c:?}"),
        K::InvalidAlgorithm => "the token's algorithm is not accepted here".into(),
        _ => "the bearer token is not a valid JWT".into(),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DevClaims {
    sub: String,
    iss: String,
    aud: String,
    exp: u64,
    iat: u64,
    #[serde(flatten)]
    roles: serde_json::Map<String, serde_json::Value>,
}

/// Mints a development token for `user` signed with the configured HMAC secret. Refused
/// unless `auth.dev_tokens` is set.
pub fn mint_dev_token(config: &AuthConfig, user: &str, admin: bool) -> Result<String, String> {
    if !config.dev_tokens {
        return Err(
            "development tokens are disabled; set auth.dev_tokens = true (STREAMSPACE_AUTH__DEV_TOKENS=true) in a development configuration only"
                .into(),
        );
    }
    if !valid_user_id(user) {
        return Err(format!(
            "--user must be 1-{MAX_USER_ID_LEN} printable characters without spaces"
        ));
    }
    let secret = config
        .hmac_secret
        .as_ref()
        .ok_or("minting needs auth.hmac_secret (STREAMSPACE_AUTH__HMAC_SECRET)")?;
    let alg = config
        .algorithms
        .iter()
        .filter_map(|a| a.parse::<Algorithm>().ok())
        .find(|a| a.family() == AlgorithmFamily::Hmac)
        .ok_or("minting needs an HS* algorithm in auth.algorithms")?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut roles = serde_json::Map::new();
    let role_list: Vec<&str> = if admin {
        vec![config.admin_role.as_str()]
    } else {
        vec![]
    };
    roles.insert(config.role_claim.clone(), serde_json::json!(role_list));
    let claims = DevClaims {
        sub: user.to_owned(),
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
        exp: now + config.dev_token_ttl_secs,
        iat: now,
        roles,
    };
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| format!("signing the token: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamspace_core::config::Secret;

    fn config() -> AuthConfig {
        AuthConfig {
            hmac_secret: Some(Secret::new("unit-test-secret-0123456789abcdef".into())),
            dev_tokens: true,
            ..AuthConfig::default()
        }
    }

    #[test]
    fn minted_tokens_verify_with_roles() {
        let c = config();
        let v = Verifier::new(&c).unwrap();
        let user = v
            .verify(&mint_dev_token(&c, "alice", false).unwrap())
            .unwrap();
        assert_eq!(
            user,
            Principal {
                user_id: "alice".into(),
                admin: false
            }
        );
        let admin = v.verify(&mint_dev_token(&c, "ops", true).unwrap()).unwrap();
        assert!(admin.admin);
    }

    #[test]
    fn minting_is_refused_unless_enabled() {
        let c = AuthConfig {
            dev_tokens: false,
            ..config()
        };
        assert!(mint_dev_token(&c, "alice", false).is_err());
    }

    #[test]
    fn weak_or_missing_keys_are_refused() {
        let c = AuthConfig {
            hmac_secret: Some(Secret::new("short".into())),
            ..AuthConfig::default()
        };
        assert!(Verifier::new(&c).unwrap_err().contains("32 bytes"));
        assert!(Verifier::new(&AuthConfig::default()).is_err());
        let c = AuthConfig {
            algorithms: vec!["none".into()],
            ..config()
        };
        assert!(Verifier::new(&c).unwrap_err().contains("unknown algorithm"));
    }

    #[test]
    fn placeholder_and_patterned_secrets_and_huge_leeways_are_refused() {
        let with = |secret: &str| AuthConfig {
            hmac_secret: Some(Secret::new(secret.into())),
            ..config()
        };
        // The value deploy/base/secrets.yaml ships.
        let e = Verifier::new(&with("REPLACE-ME-with-at-least-32-random-bytes")).unwrap_err();
        assert!(e.contains("placeholder"), "{e}");
        let e = Verifier::new(&with(&"ab".repeat(20))).unwrap_err();
        assert!(e.contains("distinct"), "{e}");
        let c = AuthConfig {
            leeway_secs: 86_400,
            ..config()
        };
        assert!(Verifier::new(&c).unwrap_err().contains("leeway"));
    }
}
