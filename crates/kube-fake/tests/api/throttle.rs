//! Load shedding on demand: the next requests are answered 429 with `Retry-After`, as an
//! overloaded API server's flow control answers them, and kube-rs' default client
//! retries after the advertised second.

use futures_util::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{ListParams, PostParams, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::helpers::{NS, TestCluster, deployment, start};

/// A client like the default one but without its retry layer, to see the raw answers.
async fn client_without_retries(t: &TestCluster) -> Client {
    client_with_token(t, t.fake.token()).await
}

async fn client_with_token(t: &TestCluster, token: &str) -> Client {
    let yaml = t.fake.kubeconfig_yaml(NS).replace(
        &format!("token: {}", t.fake.token()),
        &format!("token: {token}"),
    );
    let kubeconfig = Kubeconfig::from_yaml(&yaml).expect("kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

#[tokio::test]
async fn throttled_requests_are_429_with_retry_after_and_audited() {
    let t = start().await;
    let client = client_without_retries(&t).await;
    t.fake.throttle(2);
    // A watch is not counted: it is long-running, exempt from the shedding modelled here.
    let api: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let _watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    for _ in 0..2 {
        let request = http::Request::get(format!("/apis/apps/v1/namespaces/{NS}/deployments"))
            .body(kube::client::Body::from(Vec::new()))
            .unwrap();
        let response = client.send(request).await.unwrap();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let body: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["code"], 429);
        assert_eq!(body["reason"], "TooManyRequests");
        assert_eq!(
            body["message"],
            "the server has received too many requests and has asked us to try again later"
        );
    }
    assert!(
        api.list(&ListParams::default()).await.is_ok(),
        "the third is served"
    );
    let codes: Vec<(String, u16)> = t
        .fake
        .audit_log()
        .into_iter()
        .map(|e| (e.verb, e.code))
        .collect();
    assert_eq!(
        codes,
        [
            ("watch".to_owned(), 200),
            ("list".to_owned(), 429),
            ("list".to_owned(), 429),
            ("list".to_owned(), 200)
        ]
    );
}

#[tokio::test]
async fn kube_rs_retries_a_throttled_request_after_the_advertised_delay() {
    let t = start().await;
    t.fake.throttle(1);
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("t1", "img", 0))
        .await
        .unwrap();
    let creates: Vec<u16> = t
        .fake
        .audit_log()
        .into_iter()
        .filter(|e| e.verb == "create")
        .map(|e| e.code)
        .collect();
    assert_eq!(creates, [429, 201]);
}

#[tokio::test]
async fn the_throttle_hook_is_reachable_over_http() {
    let t = start().await;
    let stranger = client_with_token(&t, "wrong").await;
    let hook = http::Request::post("/fake/v1/throttle?count=5")
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    assert_eq!(
        stranger.send(hook).await.unwrap().status().as_u16(),
        401,
        "the hooks need the token too"
    );
    let client = client_without_retries(&t).await;
    let hook = http::Request::post("/fake/v1/throttle?count=1")
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    assert_eq!(client.send(hook).await.unwrap().status().as_u16(), 204);
    let api: Api<Deployment> = Api::namespaced(client, NS);
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 429),
        "{err:?}"
    );
    assert!(api.list(&ListParams::default()).await.is_ok());
}
