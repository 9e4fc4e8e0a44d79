//! Per-user rate limits: 429 with Retry-After once the burst is spent.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::TestGateway;

#[tokio::test]
async fn a_user_past_the_burst_gets_429_and_others_do_not() {
    let gw = TestGateway::start_with(|c| {
        c.rate_limit.write_burst = 2;
        c.rate_limit.write_per_second = 0.01;
        c.rate_limit.read_burst = 3;
        c.rate_limit.read_per_second = 0.01;
    })
    .await;
    gw.online_agent("a-1", "default").await;
    let alice = gw.token("alice");
    gw.create_ok(&alice).await;
    gw.create_ok(&alice).await;
    let a = gw.create(&alice, json!({"template": "xterm"})).await;
    a.problem(StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(
        gw.count("sessions").await,
        2,
        "the refused request created nothing"
    );

    for _ in 0..3 {
        assert_eq!(
            gw.get("/api/v1/sessions", &alice).await.status,
            StatusCode::OK
        );
    }
    gw.get("/api/v1/sessions", &alice)
        .await
        .problem(StatusCode::TOO_MANY_REQUESTS);

    let bob = gw.token("bob");
    gw.create_ok(&bob).await;
}
