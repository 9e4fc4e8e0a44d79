//! Signing keys from an identity provider's JWKS URL (`auth.jwks_url`), selected by the
//! token's `kid`.
//!
//! Invariants:
//! - Only asymmetric signature keys are taken (RSA, EC, OKP); `oct` keys and keys marked
//!   `use: enc` are ignored, so a JWKS can never make an HMAC secret public.
//! - The set is refreshed every `jwks_refresh_secs`, and on a token whose `kid` is
//!   unknown — at most once per `jwks_min_refresh_interval_ms`, however many such tokens
//!   arrive (concurrent ones wait for the same fetch). A key rotated in at the provider is
//!   therefore accepted on first use; a flood of made-up `kid`s costs one fetch per
//!   interval.
//! - A failed fetch keeps the previous keys. A key removed at the provider is refused once
//!   a fetch has seen it gone.
//! - Keys are fetched over `https://` (WebPKI roots, or `jwks_ca_file`); `http://` only from
//!   the loopback interface, since whoever can alter the answer can sign any token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most keys kept from one document.
const MAX_KEYS: usize = 100;
/// Bound on one fetch: connect, request and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One verification key of the set.
#[derive(Clone)]
pub struct JwkKey {
    /// The key's declared algorithm, if it declares one.
    pub alg: Option<Algorithm>,
    pub family: AlgorithmFamily,
    pub key: DecodingKey,
}

impl std::fmt::Debug for JwkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwkKey")
            .field("alg", &self.alg)
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

impl JwkKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.family == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

/// Where the keys come from, and the keys last fetched.
pub struct Jwks {
    url: String,
    host: String,
    port: u16,
    path: String,
    tls: Option<TlsConnector>,
    keys: RwLock<Arc<HashMap<String, JwkKey>>>,
    /// When a fetch last started; held across the fetch, so concurrent refreshes wait.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_interval: Duration,
    /// Fetches attempted, successful or not.
    pub fetches: AtomicU64,
    /// Fetches that failed (the previous keys stayed).
    pub fetch_failures: AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url)
            .field("keys", &self.keys.read().map(|k| k.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Checks the URL and reads the CA file; fetches nothing yet.
    pub fn new(url: &str, ca_file: Option<&Path>, min_interval: Duration) -> Result<Self, String> {
        let bad = |why: &str| format!("auth.jwks_url {url:?}: {why}");
        let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("must start with https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.strip_prefix('[') {
            // [v6]:port
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
                match after.strip_prefix(':') {
                    Some(p) => (host, p.parse::<u16>().map_err(|_| bad("invalid port"))?),
                    None => (host, default_port),
                }
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("invalid port"))?),
                None => (authority, default_port),
            },
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad("needs a host (and no user info)"));
        }
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err(bad(
                "plaintext http:// is accepted only from the loopback interface: whoever can \
                 alter the answer can sign any token; use https://",
            ));
        }
        let tls = if tls {
            Some(tls_connector(ca_file)?)
        } else {
            None
        };
        Ok(Self {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            tls,
            keys: RwLock::new(Arc::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            min_interval,
            fetches: AtomicU64::new(0),
            fetch_failures: AtomicU64::new(0),
        })
    }

    /// The key named `kid`, from the keys last fetched.
    pub fn get(&self, kid: &str) -> Option<JwkKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// How many keys are held.
    pub fn key_count(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Fetches now, unless a fetch started less than `min_interval` ago (then waits for
    /// it, if it is still running, and returns).
    pub async fn refresh_bounded(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_replace().await;
    }

    /// Fetches every `every`, forever (the periodic refresh).
    pub async fn refresh_every(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.refresh().await;
        }
    }

    /// Fetches now, whatever the interval (start-up and the periodic refresh).
    pub async fn refresh(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_replace().await
    }

    async fn fetch_and_replace(&self) -> bool {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        match fetched.and_then(|body| parse(&body)) {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "JWKS fetched");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                true
            }
            Err(e) => {
                self.fetch_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url = %self.url, error = e, "fetching the JWKS failed; keeping the previous keys");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<Bytes, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(connector) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("server name: {e}"))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.http_get(TokioIo::new(stream)).await
            }
            None => self.http_get(TokioIo::new(tcp)).await,
        }
    }

    async fn http_get<S>(&self, io: S) -> Result<Bytes, String>
    where
        S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(conn);
        let request = http::Request::get(self.path.as_str())
            .header(http::header::HOST, &self.host)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("HTTP status {}", response.status()));
        }
        Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("reading the body (at most {MAX_JWKS_BYTES} bytes): {e}"))
    }
}

fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("auth.jwks_ca_file {}: {e}", path.display()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("auth.jwks_ca_file {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The usable signature keys of a JWKS document, by `kid`. Keys of kinds this gateway
/// does not know are skipped, not fatal: providers add new kinds.
fn parse(body: &[u8]) -> Result<HashMap<String, JwkKey>, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for value in doc.keys.into_iter() {
        if keys.len() >= MAX_KEYS {
            break;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if let Some((kid, key)) = usable(&jwk) {
            keys.insert(kid, key);
        }
    }
    Ok(keys)
}

fn usable(jwk: &Jwk) -> Option<(String, JwkKey)> {
    let kid = jwk.common.key_id.clone()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        // A symmetric key published in a JWKS would let anyone sign; unknown kinds are
        // not ours to guess at.
        _ => return None,
    };
    let alg = match &jwk.common.key_algorithm {
        Some(ka) => Some(ka.to_string().parse::<Algorithm>().ok()?),
        None => None,
    };
    if alg.is_some_and(|a| a.family() != family) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, JwkKey { alg, family, key }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_refused_off_the_loopback() {
        let new = |url: &str| Jwks::new(url, None, Duration::ZERO).map(|_| ());
        let err = new("http://idp.example/jwks.json").unwrap_err();
        assert!(err.contains("https://"), "{err}");
        for ok in [
            "https://idp.example/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9000/jwks",
        ] {
            new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(new("ftp://idp.example/jwks").is_err());
        assert!(new("https://user@idp.example/jwks").is_err());
        assert!(new("https://idp.example:notaport/jwks").is_err());
    }

    #[test]
    fn only_asymmetric_signature_keys_with_a_kid_are_taken() {
        let ed =
            r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        let with = |extra: &str| -> String { format!("{}{extra}}}", &ed[..ed.len() - 1]) };
        let doc = format!(
            r#"{{"keys":[{},{},{},{},{},{{"kty":"unknown-kind","kid":"new"}}]}}"#,
            with(r#","kid":"good","alg":"EdDSA""#),
            with(r#","kid":"enc","use":"enc""#),
            with(r#","kid":"wrong-alg","alg":"RS256""#),
            ed,
            r#"{"kty":"oct","kid":"secret","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}"#,
        );
        let keys = parse(doc.as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["good"]);
        let good = &keys["good"];
        assert!(good.fits(Algorithm::EdDSA) && !good.fits(Algorithm::ES256));
        assert!(parse(b"not json").is_err());
    }
}
