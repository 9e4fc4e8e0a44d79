//! Keys from an identity provider's JWKS: tokens are verified by `kid`; a key rotated in
//! at the provider is accepted on first use (a refresh on the unknown `kid`); a key
//! rotated out is refused once a refresh has seen it gone; made-up `kid`s cost at most one
//! fetch per interval. REST and gRPC alike. The provider is a real HTTP server on loopback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use streamspace_proto::api::v1 as pb;

use crate::auth::b64url;
use crate::helpers::TestGateway;

/// An Ed25519 signing key with its public JWK.
struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl Key {
    fn new(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let encoding = EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap();
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
            "kid": kid, "x": b64url(pair.public_key_raw()),
        });
        Self {
            kid: kid.to_owned(),
            encoding,
            jwk,
        }
    }

    /// A valid token for `user`, naming `kid` (default: this key's) in its header.
    fn token(&self, user: &str, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.unwrap_or(&self.kid).to_owned());
        let claims = json!({
            "sub": user, "iss": "streamspace", "aud": "streamspace-api",
            "exp": jsonwebtoken::get_current_timestamp() + 600,
        });
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }
}

/// The identity provider's key endpoint: serves whatever set the test puts there and
/// counts the fetches.
#[derive(Clone, Default)]
struct Provider {
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicU64>,
}

impl Provider {
    async fn start(keys: &[&Key]) -> (Self, String) {
        let provider = Self::default();
        provider.publish(keys);
        let app = axum::Router::new()
            .route(
                "/.well-known/jwks.json",
                axum::routing::get(|State(p): State<Provider>| async move {
                    p.fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(json!({ "keys": *p.keys.lock().unwrap() }))
                }),
            )
            .with_state(provider.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (provider, url)
    }

    fn publish(&self, keys: &[&Key]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn gateway(url: &str, min_refresh_interval_ms: u64) -> TestGateway {
    let url = url.to_owned();
    TestGateway::start_with(move |c| {
        c.auth.algorithms = vec!["EdDSA".into(), "HS256".into()];
        c.auth.jwks_url = Some(url);
        c.auth.jwks_min_refresh_interval_ms = min_refresh_interval_ms;
    })
    .await
}

async fn grpc_list(gw: &TestGateway, token: &str) -> Result<(), tonic::Status> {
    let mut client = pb::session_service_client::SessionServiceClient::new(gw.channel().await);
    let mut req = tonic::Request::new(pb::ListSessionsRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.list_sessions(req).await.map(|_| ())
}

#[tokio::test]
async fn keys_are_chosen_by_kid_and_a_rotation_is_accepted_on_first_use() {
    let (k1, k2, k3) = (Key::new("k1"), Key::new("k2"), Key::new("k3"));
    let (provider, url) = Provider::start(&[&k1]).await;
    let gw = gateway(&url, 0).await;
    assert_eq!(provider.fetches(), 1, "fetched once at start-up");

    let a = gw.get("/api/v1/sessions", &k1.token("alice", None)).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    grpc_list(&gw, &k1.token("alice", None)).await.unwrap();

    // Not published yet: refused after a refresh that did not find it.
    let before = provider.fetches();
    let a = gw.get("/api/v1/sessions", &k2.token("alice", None)).await;
    assert!(a.problem(StatusCode::UNAUTHORIZED).contains("kid"));
    assert_eq!(provider.fetches(), before + 1, "an unknown kid refreshes");

    // Rotation at the provider: k2 in, k1 out. k2 works at once, k1 no longer.
    provider.publish(&[&k2]);
    let a = gw.get("/api/v1/sessions", &k2.token("alice", None)).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    gw.get("/api/v1/sessions", &k1.token("alice", None))
        .await
        .problem(StatusCode::UNAUTHORIZED);

    // gRPC waits for the refresh too (the interceptor hands the token on).
    provider.publish(&[&k2, &k3]);
    grpc_list(&gw, &k3.token("bob", None)).await.unwrap();
    let err = grpc_list(&gw, &k1.token("bob", None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // The kid selects the key; the signature must still be that key's.
    let forged = k1.token("alice", Some("k2"));
    let detail = gw
        .get("/api/v1/sessions", &forged)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("signature"), "{detail}");
    let err = grpc_list(&gw, &forged).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // An asymmetric token must name its key.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = None;
    let claims = json!({"sub": "alice", "iss": "streamspace", "aud": "streamspace-api",
        "exp": jsonwebtoken::get_current_timestamp() + 600});
    let no_kid = jsonwebtoken::encode(&header, &claims, &k2.encoding).unwrap();
    let detail = gw
        .get("/api/v1/sessions", &no_kid)
        .await
        .problem(StatusCode::UNAUTHORIZED);
    assert!(detail.contains("kid"), "{detail}");
}

#[tokio::test]
async fn made_up_kids_cost_at_most_one_fetch_per_interval() {
    let k1 = Key::new("k1");
    let (provider, url) = Provider::start(&[&k1]).await;
    // The start-up fetch starts the interval: no unknown kid may fetch for an hour.
    let gw = gateway(&url, 3_600_000).await;
    assert_eq!(provider.fetches(), 1);
    for i in 0..20 {
        let token = k1.token("mallory", Some(&format!("made-up-{i}")));
        let detail = gw
            .get("/api/v1/sessions", &token)
            .await
            .problem(StatusCode::UNAUTHORIZED);
        assert!(detail.contains("kid"), "{detail}");
        let err = grpc_list(&gw, &token).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    assert_eq!(provider.fetches(), 1, "made-up kids caused fetches");
    // The real key still works.
    let a = gw.get("/api/v1/sessions", &k1.token("alice", None)).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
}
