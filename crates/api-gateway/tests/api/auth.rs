//! The authorization matrix: every endpoint refuses bad tokens with 401 problem+json,
//! admin endpoints refuse users with 403, and nothing changes on a refusal.

use axum::http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::helpers::{SECRET, TestGateway};

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(user: &str) -> Value {
    json!({"sub": user, "iss": "streamspace", "aud": "streamspace-api", "exp": now() + 600, "roles": ["admin"]})
}

fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Tokens that must all be refused, with what is wrong with each.
fn bad_tokens() -> Vec<(&'static str, Option<String>)> {
    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = json!("evil");
    let mut not_yet = claims("alice");
    not_yet["nbf"] = json!(now() + 3600);
    let mut no_exp = claims("alice");
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_sub = claims("alice");
    no_sub.as_object_mut().unwrap().remove("sub");
    let alg_none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims("alice").to_string().as_bytes())
    );
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims("alice"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    vec![
        ("missing", None),
        ("expired", Some(sign(&expired, SECRET))),
        ("wrong audience", Some(sign(&wrong_aud, SECRET))),
        ("wrong issuer", Some(sign(&wrong_iss, SECRET))),
        ("no exp", Some(sign(&no_exp, SECRET))),
        ("no sub", Some(sign(&no_sub, SECRET))),
        // The value deploy/base/secrets.yaml ships: a gateway refuses to start with it,
        // so nothing it signs verifies.
        (
            "signed with the placeholder key",
            Some(sign(
                &claims("alice"),
                "REPLACE-ME-with-at-least-32-random-bytes",
            )),
        ),
        ("nbf in the future", Some(sign(&not_yet, SECRET))),
        ("alg none", Some(alg_none)),
        (
            "bad signature",
            Some(sign(
                &claims("alice"),
                "another-secret-of-thirty-two-bytes!!",
            )),
        ),
        ("algorithm not allowed", Some(hs512)),
        ("garbage", Some("not.a.jwt".into())),
        ("agent credential", Some(format!("ssa_{}", "0".repeat(64)))),
    ]
}

/// Every route that needs a token, with a body that would be valid.
fn protected_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (
            Method::POST,
            "/api/v1/sessions",
            Some(json!({"template": "firefox-browser"})),
        ),
        (Method::GET, "/api/v1/sessions", None),
        (Method::GET, "/api/v1/sessions/s-1", None),
        (Method::DELETE, "/api/v1/sessions/s-1", None),
        (Method::PUT, "/api/v1/sessions/s-1/hibernate", None),
        (Method::PUT, "/api/v1/sessions/s-1/wake", None),
        (Method::GET, "/api/v1/sessions/s-1/commands", None),
        (Method::GET, "/api/v1/commands/cmd-1", None),
        (Method::GET, "/api/v1/admin/agents", None),
        (Method::GET, "/api/v1/admin/agents/a-1", None),
        (
            Method::POST,
            "/api/v1/admin/agents",
            Some(json!({"agent_id": "a-2"})),
        ),
        (Method::POST, "/api/v1/admin/agents/a-1/credentials", None),
        (
            Method::DELETE,
            "/api/v1/admin/agents/a-1/credentials/cred-1",
            None,
        ),
    ]
}

#[tokio::test]
async fn every_endpoint_refuses_every_bad_token_with_401() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    for (method, path, body) in protected_routes() {
        for (what, token) in bad_tokens() {
            let a = gw
                .call(method.clone(), path, token.as_deref(), body.clone(), &[])
                .await;
            let detail = a.problem(StatusCode::UNAUTHORIZED);
            assert_eq!(
                a.headers["www-authenticate"], "Bearer",
                "{method} {path} {what}"
            );
            if what == "agent credential" {
                assert!(detail.contains("agent credentials"), "{detail}");
            }
            if what == "expired" {
                assert!(detail.contains("expired"), "{detail}");
            }
            if what == "nbf in the future" {
                assert!(detail.contains("not valid yet"), "{detail}");
            }
            // An unauthenticated caller learns what is wrong, not what would be right.
            assert!(
                !detail.contains("streamspace-api") && !detail.contains("\"streamspace\""),
                "{what}: {detail}"
            );
        }
    }
    assert_eq!(gw.count("sessions").await, 0, "nothing was created");
    assert_eq!(gw.count("agents").await, 1, "nothing was registered");
}

#[tokio::test]
async fn user_tokens_get_403_on_every_admin_endpoint() {
    let gw = TestGateway::start().await;
    let user = gw.token("alice");
    for (method, path, body) in protected_routes()
        .into_iter()
        .filter(|(_, p, _)| p.starts_with("/api/v1/admin"))
    {
        let a = gw.call(method.clone(), path, Some(&user), body, &[]).await;
        let detail = a.problem(StatusCode::FORBIDDEN);
        assert!(detail.contains("admin role"), "{method} {path}: {detail}");
    }
    assert_eq!(gw.count("agents").await, 0);
}

#[tokio::test]
async fn a_valid_token_with_the_role_claim_as_a_string_is_admin() {
    let gw = TestGateway::start().await;
    let mut c = claims("ops");
    c["roles"] = json!("admin");
    let a = gw.get("/api/v1/admin/agents", &sign(&c, SECRET)).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    c["roles"] = json!(["user"]);
    let a = gw.get("/api/v1/admin/agents", &sign(&c, SECRET)).await;
    a.problem(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn grpc_refuses_every_bad_token_with_unauthenticated() {
    use streamspace_proto::api::v1 as pb;
    let gw = TestGateway::start().await;
    let mut sessions = pb::session_service_client::SessionServiceClient::new(gw.channel().await);
    let mut admin =
        pb::agent_admin_service_client::AgentAdminServiceClient::new(gw.channel().await);
    for (what, token) in bad_tokens() {
        let with_token = |req: &mut tonic::metadata::MetadataMap| {
            if let Some(t) = &token {
                req.insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
        };
        let mut list = tonic::Request::new(pb::ListSessionsRequest::default());
        with_token(list.metadata_mut());
        let err = sessions.list_sessions(list).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}: {err:?}");
        assert!(
            !err.message().contains("streamspace-api"),
            "{what}: {}",
            err.message()
        );
        let mut agents = tonic::Request::new(pb::ListAgentsRequest {});
        with_token(agents.metadata_mut());
        let err = admin.list_agents(agents).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}: {err:?}");
    }
}
