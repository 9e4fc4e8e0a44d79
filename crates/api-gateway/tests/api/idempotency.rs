//! `Idempotency-Key`: a retry returns the first answer and creates nothing; the same key
//! with a different request is refused.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestGateway;

#[tokio::test]
async fn the_same_delete_twice_with_one_key_makes_one_command() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let (id, _) = gw.create_ok(&alice).await;
    gw.deliver("a-1", None).await;
    let path = format!("/api/v1/sessions/{id}");
    let key = [("idempotency-key", "delete-1")];
    let first = gw
        .call(Method::DELETE, &path, Some(&alice), None, &key)
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{:?}", first.body);
    let second = gw
        .call(Method::DELETE, &path, Some(&alice), None, &key)
        .await;
    assert_eq!(second.status, StatusCode::ACCEPTED, "{:?}", second.body);
    assert_eq!(second.body, first.body);
    let stops: Vec<_> = gw
        .commands_of(&id)
        .await
        .into_iter()
        .filter(|c| c.0 == "stop_session")
        .collect();
    assert_eq!(stops.len(), 1, "{stops:?}");
    // Without the key, the retry is judged on its own: already terminating.
    gw.call(Method::DELETE, &path, Some(&alice), None, &[])
        .await
        .problem(StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_create_retried_with_its_key_creates_one_session() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let body = json!({"template": "firefox-browser"});
    let key = [("idempotency-key", "create-1")];
    let first = gw
        .call(
            Method::POST,
            "/api/v1/sessions",
            Some(&alice),
            Some(body.clone()),
            &key,
        )
        .await;
    let second = gw
        .call(
            Method::POST,
            "/api/v1/sessions",
            Some(&alice),
            Some(body.clone()),
            &key,
        )
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(first.body, second.body);
    assert_eq!(gw.count("sessions").await, 1);
    assert_eq!(gw.count("agent_commands").await, 1);

    // Keys are per user: bob's identical key is his own.
    let bob = gw.token("bob");
    let b = gw
        .call(
            Method::POST,
            "/api/v1/sessions",
            Some(&bob),
            Some(body),
            &key,
        )
        .await;
    assert_eq!(b.status, StatusCode::ACCEPTED);
    assert_ne!(b.body["id"], first.body["id"]);

    // The same key with another request is refused and changes nothing.
    let other = gw
        .call(
            Method::POST,
            "/api/v1/sessions",
            Some(&alice),
            Some(json!({"template": "xterm"})),
            &key,
        )
        .await;
    let detail = other.problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail.contains("different request"), "{detail}");
    assert_eq!(gw.count("sessions").await, 2);
}

#[tokio::test]
async fn a_failed_request_does_not_consume_its_key() {
    let gw = TestGateway::start().await;
    let alice = gw.token("alice");
    let key = [("idempotency-key", "k")];
    let body = json!({"template": "firefox-browser"});
    gw.call(
        Method::POST,
        "/api/v1/sessions",
        Some(&alice),
        Some(body.clone()),
        &key,
    )
    .await
    .problem(StatusCode::SERVICE_UNAVAILABLE);
    gw.online_agent("a-1", "default").await;
    let a = gw
        .call(
            Method::POST,
            "/api/v1/sessions",
            Some(&alice),
            Some(body),
            &key,
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
}

#[tokio::test]
async fn malformed_keys_are_400() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let long = "k".repeat(256);
    for key in [long.as_str(), "has space"] {
        gw.call(
            Method::POST,
            "/api/v1/sessions",
            Some(&alice),
            Some(json!({"template": "xterm"})),
            &[("idempotency-key", key)],
        )
        .await
        .problem(StatusCode::BAD_REQUEST);
    }
    assert_eq!(gw.count("sessions").await, 0);
}

#[tokio::test]
async fn concurrent_retries_with_one_key_create_one_session() {
    let gw = TestGateway::start().await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    let body = json!({"template": "firefox-browser"});
    let key = [("idempotency-key", "race-1")];
    let call = || {
        gw.call(
            Method::POST,
            "/api/v1/sessions",
            Some(&alice),
            Some(body.clone()),
            &key,
        )
    };
    let (a, b) = tokio::join!(call(), call());
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.body);
    assert_eq!(b.status, StatusCode::ACCEPTED, "{:?}", b.body);
    assert_eq!(a.body, b.body);
    assert_eq!(gw.count("sessions").await, 1);
    assert_eq!(gw.count("agent_commands").await, 1);
}
