//! The served OpenAPI document, health, readiness and metrics.

use axum::http::{Method, StatusCode};

use crate::helpers::TestGateway;

#[tokio::test]
async fn the_openapi_document_parses_and_lists_every_route() {
    let gw = TestGateway::start().await;
    let a = gw
        .call(Method::GET, "/api/v1/openapi.json", None, None, &[])
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let doc = a.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let routes = [
        ("/api/v1/sessions", "post"),
        ("/api/v1/sessions", "get"),
        ("/api/v1/sessions/{id}", "get"),
        ("/api/v1/sessions/{id}", "delete"),
        ("/api/v1/sessions/{id}/hibernate", "put"),
        ("/api/v1/sessions/{id}/wake", "put"),
        ("/api/v1/sessions/{id}/commands", "get"),
        ("/api/v1/commands/{command_id}", "get"),
        ("/api/v1/admin/agents", "get"),
        ("/api/v1/admin/agents", "post"),
        ("/api/v1/admin/agents/{agent_id}", "get"),
        ("/api/v1/admin/agents/{agent_id}/credentials", "post"),
        (
            "/api/v1/admin/agents/{agent_id}/credentials/{credential_id}",
            "delete",
        ),
        ("/api/v1/openapi.json", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ];
    for (path, method) in routes {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from the document"
        );
    }
    let listed: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(
        listed,
        routes.len(),
        "the document lists exactly the routes"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let create = &doc["paths"]["/api/v1/sessions"]["post"];
    assert!(create["responses"]["202"].is_object());
    assert!(create["responses"]["503"].is_object());
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let gw = TestGateway::start().await;
    let get = |path: &'static str| gw.call(Method::GET, path, None, None, &[]);
    assert_eq!(get("/healthz").await.status, StatusCode::OK);
    let ready = get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.body);
    // Methods nobody defined are counted as one label, not one series each.
    for verb in ["BREW", "WHEN", "XYZZY"] {
        let m = Method::from_bytes(verb.as_bytes()).unwrap();
        gw.call(m, "/api/v1/sessions", None, None, &[]).await;
    }
    // Not on the API port: on the internal listener only.
    get("/metrics").await.problem(StatusCode::NOT_FOUND);
    let (status, text) = gw.metrics().await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str();
    assert!(!text.contains("BREW") && !text.contains("XYZZY"), "{text}");
    assert!(text.contains("method=\"OTHER\""), "{text}");
    assert!(
        text.contains("streamspace_commands_enqueued_total"),
        "{text}"
    );
    assert!(
        text.contains(
            "streamspace_api_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"}"
        ),
        "{text}"
    );
}
