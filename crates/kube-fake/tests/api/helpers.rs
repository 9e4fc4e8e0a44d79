//! A fresh stand-in per test, a kube-rs client built from its kubeconfig file, object
//! builders and event-driven waits.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use streamspace_kube_fake::{FakeCluster, FakeConfig};

/// How long any wait may take before the test fails: a guard against hangs, never an
/// expectation about speed.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const NS: &str = "sessions";

pub struct TestCluster {
    pub fake: FakeCluster,
    pub client: Client,
    _dir: tempfile::TempDir,
}

pub async fn start() -> TestCluster {
    start_with(FakeConfig {
        pod_ready_delay: Duration::from_millis(20),
        ..FakeConfig::default()
    })
    .await
}

pub async fn start_with(config: FakeConfig) -> TestCluster {
    let fake = FakeCluster::start(config).await.expect("start the fake");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&path, NS).expect("write kubeconfig");
    let client = client_from(&path).await;
    TestCluster {
        fake,
        client,
        _dir: dir,
    }
}

/// The same path a user's client takes: read the file, build a config, build a client.
pub async fn client_from(path: &std::path::Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to config");
    assert_eq!(config.default_namespace, NS);
    Client::try_from(config).expect("client")
}

impl TestCluster {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::default_namespaced(self.client.clone())
    }

    /// Sends a request built by kube-rs and returns the raw status code and body, for
    /// the checks the typed API hides (201 vs 200, the `Status` body).
    pub async fn raw(&self, request: http::Request<Vec<u8>>) -> (u16, Value) {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, kube::client::Body::from(body));
        let response = self.client.send(request).await.expect("send");
        let code = response.status().as_u16();
        let bytes = response.into_body().collect_bytes().await.expect("body");
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (code, value)
    }

    /// Like [`TestCluster::raw`], with the body as bytes.
    pub async fn raw_bytes(&self, request: http::Request<Vec<u8>>) -> (u16, Vec<u8>) {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, kube::client::Body::from(body));
        let response = self.client.send(request).await.expect("send");
        let code = response.status().as_u16();
        let bytes = response.into_body().collect_bytes().await.expect("body");
        (code, bytes.to_vec())
    }
}

/// A session-shaped Deployment.
pub fn deployment(name: &str, image: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "labels": { "app": "streamspace-session", "session": name } },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "streamspace-session", "session": name } },
            "template": {
                "metadata": { "labels": { "app": "streamspace-session", "session": name } },
                "spec": { "containers": [{
                    "name": "session",
                    "image": image,
                    "ports": [{ "containerPort": 3000 }],
                    "resources": { "requests": { "memory": "512Mi", "cpu": "250m" },
                                   "limits": { "memory": "512Mi", "cpu": "250m" } },
                }] },
            },
        },
    }))
    .expect("deployment literal")
}

/// A ClusterIP Service owned by `owner`.
pub fn service(name: &str, owner: &Deployment) -> Service {
    let meta = &owner.metadata;
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": { "app": "streamspace-session", "session": name },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment",
                "name": meta.name, "uid": meta.uid, "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": { "selector": { "session": name }, "ports": [{ "port": 3000 }] },
    }))
    .expect("service literal")
}

/// Waits on the watch stream (not a timer) until `cond` holds for the named object.
pub async fn wait<K>(api: &Api<K>, name: &str, cond: impl Condition<K>) -> Option<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::time::timeout(DEADLINE, await_condition(api.clone(), name, cond))
        .await
        .unwrap_or_else(|_| panic!("{name} did not reach the condition within {DEADLINE:?}"))
        .expect("watch")
}

/// The API error inside a kube-rs result.
pub fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> Box<kube::core::Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}
