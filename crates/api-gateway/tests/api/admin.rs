//! Agent administration: register, list with derived liveness, issue (shown once, stored
//! hashed) and revoke credentials.

use axum::http::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use streamspace_core::agents;

use crate::helpers::TestGateway;

#[tokio::test]
async fn register_issue_and_revoke() {
    let gw = TestGateway::start().await;
    let ops = gw.admin_token("ops");
    let post = |path: &'static str, body: Option<serde_json::Value>| {
        let ops = ops.clone();
        let gw = &gw;
        async move { gw.call(Method::POST, path, Some(&ops), body, &[]).await }
    };
    let a = post(
        "/api/v1/admin/agents",
        Some(json!({"agent_id": "eu-1", "cluster": "eu", "region": "eu-west", "max_sessions": 10})),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    assert_eq!(a.body["online"], false);
    assert_eq!(a.body["max_sessions"], 10);
    post("/api/v1/admin/agents", Some(json!({"agent_id": "eu-1"})))
        .await
        .problem(StatusCode::CONFLICT);
    post("/api/v1/admin/agents", Some(json!({"agent_id": "Bad_Id"})))
        .await
        .problem(StatusCode::BAD_REQUEST);

    let issued = post("/api/v1/admin/agents/eu-1/credentials", None).await;
    assert_eq!(issued.status, StatusCode::CREATED, "{:?}", issued.body);
    let token = issued.str("token");
    let credential_id = issued.str("credential_id");
    assert!(token.starts_with("ssa_"));
    // Stored only as a hash: the token itself is nowhere in the table.
    let (hash, dump): (Vec<u8>, String) = sqlx::query_as(
        "SELECT token_sha256, row_to_json(c)::text FROM agent_credentials c WHERE credential_id = $1",
    )
    .bind(&credential_id)
    .fetch_one(&gw.pool)
    .await
    .unwrap();
    assert_eq!(hash, Sha256::digest(token.as_bytes()).to_vec());
    assert!(!dump.contains(&token[4..]), "plain token stored: {dump}");
    let who = agents::agent_authenticate(&gw.pool, &token).await.unwrap();
    assert_eq!(who.unwrap().agent_id, "eu-1");
    post("/api/v1/admin/agents/nope/credentials", None)
        .await
        .problem(StatusCode::NOT_FOUND);

    // Listing and one agent, with derived liveness.
    agents::agent_connect(&gw.pool, "eu-1", "d-1", &Default::default())
        .await
        .unwrap();
    let list = gw.get("/api/v1/admin/agents", &ops).await;
    assert_eq!(list.body["agents"][0]["agent_id"], "eu-1");
    assert_eq!(list.body["agents"][0]["online"], true);
    let one = gw.get("/api/v1/admin/agents/eu-1", &ops).await;
    assert_eq!(one.body["cluster"], "eu");
    gw.get("/api/v1/admin/agents/nope", &ops)
        .await
        .problem(StatusCode::NOT_FOUND);

    let path = format!("/api/v1/admin/agents/eu-1/credentials/{credential_id}");
    let r = gw.call(Method::DELETE, &path, Some(&ops), None, &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert!(
        agents::agent_authenticate(&gw.pool, &token)
            .await
            .unwrap()
            .is_none()
    );
    gw.call(
        Method::DELETE,
        "/api/v1/admin/agents/eu-1/credentials/cred-nope",
        Some(&ops),
        None,
        &[],
    )
    .await
    .problem(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_credential_retried_with_its_key_is_not_shown_twice() {
    let gw = TestGateway::start().await;
    gw.agent("a-1", "default").await;
    let ops = gw.admin_token("ops");
    let key = [("idempotency-key", "issue-1")];
    let path = "/api/v1/admin/agents/a-1/credentials";
    let first = gw.call(Method::POST, path, Some(&ops), None, &key).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = gw.call(Method::POST, path, Some(&ops), None, &key).await;
    let detail = again.problem(StatusCode::CONFLICT);
    assert!(detail.contains(&first.str("credential_id")), "{detail}");
    assert_eq!(gw.count("agent_credentials").await, 1);
}
