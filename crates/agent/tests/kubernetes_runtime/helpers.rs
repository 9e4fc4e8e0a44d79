//! One environment per test: the stand-in API server (or, with
//! `STREAMSPACE_TEST_KUBECONFIG`, a real cluster and a fresh namespace), a
//! `KubernetesRuntime` connected through a kubeconfig file, and event-driven waits.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;
use streamspace_agent::runtime::{
    KubeTemplate, KubernetesConfig, KubernetesRuntime, Observation, SecurityProfile,
};
use streamspace_core::command::StartSession;
use streamspace_kube_fake::{FakeCluster, FakeConfig};
use tokio::sync::broadcast;

/// Point the suite at a real cluster: the kubeconfig of a kind/k3d (or any) cluster
/// whose user may create namespaces. Unset: the in-process stand-in.
pub const REAL_CLUSTER_VAR: &str = "STREAMSPACE_TEST_KUBECONFIG";
/// Image that serves TCP on `STREAMSPACE_TEST_SESSION_PORT`, for real clusters.
pub const IMAGE_VAR: &str = "STREAMSPACE_TEST_SESSION_IMAGE";
pub const PORT_VAR: &str = "STREAMSPACE_TEST_SESSION_PORT";
pub const DEFAULT_IMAGE: &str = "nginxinc/nginx-unprivileged:1.27-alpine";
pub const DEFAULT_IMAGE_PORT: u16 = 8080;
/// An image no registry has, so its pull fails on the stand-in and on a real cluster.
pub const MISSING_IMAGE: &str = "fail/streamspace-image-that-does-not-exist:0";

/// A guard against hangs, not an expectation about speed.
pub const DEADLINE: Duration = Duration::from_secs(180);
const STAND_IN_NAMESPACE: &str = "sessions";

pub struct Env {
    /// The stand-in, when not on a real cluster; tests that need its hooks skip otherwise.
    pub fake: Option<FakeCluster>,
    pub client: Client,
    pub namespace: String,
    pub config: KubernetesConfig,
    pub runtime: KubernetesRuntime,
    _dir: tempfile::TempDir,
}

pub fn on_real_cluster() -> bool {
    std::env::var_os(REAL_CLUSTER_VAR).is_some()
}

fn test_templates() -> std::collections::BTreeMap<String, KubeTemplate> {
    let image = std::env::var(IMAGE_VAR).unwrap_or_else(|_| DEFAULT_IMAGE.into());
    let port = std::env::var(PORT_VAR)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_IMAGE_PORT);
    let web = KubeTemplate {
        port,
        ready_timeout_ms: DEADLINE.as_millis() as u64,
        ..KubeTemplate::new(image)
    };
    // How long the broken template may try: the timeout is the behaviour under test.
    // A real cluster needs a moment to attempt the pull and report it.
    let broken_timeout = if on_real_cluster() { 60_000 } else { 1_000 };
    let broken = KubeTemplate {
        ready_timeout_ms: broken_timeout,
        ..KubeTemplate::new(MISSING_IMAGE)
    };
    // Reachable only with a per-session password; and one that starts as root.
    let private = KubeTemplate {
        password_env: Some("PASSWORD".into()),
        url_user: "abc".into(),
        ..web.clone()
    };
    let root_init = KubeTemplate {
        security: SecurityProfile::Baseline,
        ..web.clone()
    };
    // The stand-in's failure modes, chosen by image prefix (see `FakeConfig`).
    let failing = |image: &str| KubeTemplate {
        ready_timeout_ms: DEADLINE.as_millis() as u64,
        ..KubeTemplate::new(image)
    };
    let shaped = KubeTemplate {
        shm_size: "2Gi".into(),
        image_pull_secrets: vec!["registry-credentials".into()],
        node_selector: [("streamspace.io/pool".to_owned(), "sessions".to_owned())].into(),
        tolerations: vec![
            serde_json::from_value(json!({
                "key": "streamspace.io/pool", "operator": "Equal",
                "value": "sessions", "effect": "NoSchedule",
            }))
            .unwrap(),
        ],
        priority_class: Some("streamspace-sessions".into()),
        home_size: Some("3Gi".into()),
        home_access_mode: "ReadWriteOncePod".into(),
        ..web.clone()
    };
    let no_home = KubeTemplate {
        home_volume: false,
        shm_size: String::new(),
        safe_to_evict: true,
        ..web.clone()
    };
    [
        ("web".to_owned(), web),
        ("broken".to_owned(), broken),
        ("private".to_owned(), private),
        ("root-init".to_owned(), root_init),
        (
            "crashing".to_owned(),
            failing("crash/streamspace-session:0"),
        ),
        ("oom".to_owned(), failing("oom/streamspace-session:0")),
        ("denied".to_owned(), failing("denied/streamspace-session:0")),
        // Upper case is not a valid repository name: no runtime can even try to pull it.
        ("misnamed".to_owned(), failing("Streamspace/Session:0")),
        ("shaped".to_owned(), shaped),
        ("no-home".to_owned(), no_home),
    ]
    .into()
}

pub async fn client_from(path: &std::path::Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

pub async fn env() -> Env {
    env_with(FakeConfig::default()).await
}

pub async fn env_with(fake_config: FakeConfig) -> Env {
    env_configured(fake_config, |_| {}).await
}

/// An environment whose runtime configuration `tweak` adjusts first.
pub async fn env_configured(
    fake_config: FakeConfig,
    tweak: impl FnOnce(&mut KubernetesConfig),
) -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let (fake, kubeconfig, namespace) = match std::env::var_os(REAL_CLUSTER_VAR) {
        Some(path) => {
            let path = PathBuf::from(path);
            let namespace = format!("streamspace-test-{}", &uuid_like()[..10]);
            let namespaces: Api<Namespace> = Api::all(client_from(&path).await);
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": namespace, "labels": {"streamspace-test": "true"}}
            }))
            .unwrap();
            namespaces
                .create(&PostParams::default(), &ns)
                .await
                .expect("create the test namespace");
            (None, path, namespace)
        }
        None => {
            let fake = FakeCluster::start(FakeConfig {
                pod_ready_delay: Duration::from_millis(20),
                ..fake_config
            })
            .await
            .expect("start the stand-in");
            let path = dir.path().join("kubeconfig");
            fake.write_kubeconfig(&path, STAND_IN_NAMESPACE)
                .expect("kubeconfig");
            (Some(fake), path, STAND_IN_NAMESPACE.to_owned())
        }
    };
    let mut config = KubernetesConfig {
        kubeconfig: Some(kubeconfig.clone()),
        namespace: Some(namespace.clone()),
        templates: test_templates(),
        operation_timeout_ms: DEADLINE.as_millis() as u64,
        ..KubernetesConfig::default()
    };
    tweak(&mut config);
    let runtime = KubernetesRuntime::connect(&config)
        .await
        .expect("connect the runtime");
    Env {
        fake,
        client: client_from(&kubeconfig).await,
        namespace,
        config,
        runtime,
        _dir: dir,
    }
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

impl Env {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A second runtime over the same cluster and namespace, like a restarted agent.
    pub async fn another_runtime(&self) -> KubernetesRuntime {
        KubernetesRuntime::connect(&self.config).await.unwrap()
    }

    /// A runtime like a restarted agent whose configuration `tweak` changed.
    pub async fn reconfigured_runtime(
        &self,
        tweak: impl FnOnce(&mut KubernetesConfig),
    ) -> KubernetesRuntime {
        let mut config = self.config.clone();
        tweak(&mut config);
        KubernetesRuntime::connect(&config).await.unwrap()
    }

    /// Removes the test namespace on a real cluster (a failed test leaves it behind:
    /// `kubectl delete namespace -l streamspace-test=true`).
    pub async fn finish(self) {
        if self.fake.is_none() {
            let namespaces: Api<Namespace> = Api::all(self.client.clone());
            let _ = namespaces
                .delete(&self.namespace, &DeleteParams::background())
                .await;
        }
    }
}

pub fn start(template: &str) -> StartSession {
    StartSession {
        template: template.into(),
        user_id: Some("alice@example.com".into()),
        resources: None,
        home_volume: false,
        env: Default::default(),
    }
}

/// The next published observation for `session` that satisfies `pred`.
pub async fn next_event(
    rx: &mut broadcast::Receiver<Observation>,
    session: &str,
    pred: impl Fn(&Observation) -> bool,
) -> Observation {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(obs) if obs.session_id == session && pred(&obs) => return obs,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no matching event for {session} within {DEADLINE:?}"))
}

/// Waits (on watch events, via the stand-in or the API) until `cond` holds.
pub async fn eventually<K>(
    api: &Api<K>,
    name: &str,
    cond: impl kube::runtime::wait::Condition<K>,
) -> Option<K>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::time::timeout(
        DEADLINE,
        kube::runtime::wait::await_condition(api.clone(), name, cond),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} did not reach the condition within {DEADLINE:?}"))
    .expect("watch")
}
