//! `KubernetesRuntime` against the stand-in API server (`streamspace-kube-fake`) through
//! the unmodified kube-rs client, or against a real cluster with
//! `STREAMSPACE_TEST_KUBECONFIG=/path/to/kubeconfig` (see docs/kubernetes.md). Tests
//! that need the stand-in's hooks (imposed pod states, RBAC denials, the audit log) say
//! so and skip on a real cluster.

mod helpers;
mod rbac;
mod realism;

use std::collections::BTreeMap;

use helpers::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::wait::conditions;
use serde_json::json;
use streamspace_agent::runtime::{SessionRuntime, SessionState};
use streamspace_core::command::{HibernateSession, Resources, StopSession, WakeSession};
use streamspace_kube_fake::PodState;

async fn pods_of(env: &Env, session: &str) -> Vec<Pod> {
    env.api::<Pod>()
        .list(&ListParams::default().labels(&format!("session={session}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn start_twice_creates_once_with_labels_owner_and_resources() {
    let env = env().await;
    let rt = &env.runtime;
    let first = rt.start("s-start", &start("web")).await.unwrap();
    assert_eq!(first.state, SessionState::Running, "{first:?}");
    let url = first.url.clone().expect("a URL");
    assert!(
        url.starts_with(&format!(
            "http://s-start.{}.svc.cluster.local:",
            env.namespace
        )),
        "{url}"
    );
    assert!(
        first
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("pod s-start-")),
        "{first:?}"
    );

    let second = rt.start("s-start", &start("web")).await.unwrap();
    assert_eq!(second.state, SessionState::Running);
    assert_eq!(second.url, first.url);

    let deployments = env
        .api::<Deployment>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(deployments.items.len(), 1, "one Deployment for two starts");
    let d = &deployments.items[0];
    let labels = d.metadata.labels.clone().unwrap();
    let expected: BTreeMap<String, String> = [
        ("app", "streamspace-session"),
        ("session", "s-start"),
        ("user", "alice-example.com"),
        ("template", "web"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    assert_eq!(labels, expected);
    let container = &d
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let resources = container.resources.as_ref().unwrap();
    let quantity =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| { m.as_ref().unwrap()[k].0.clone() };
    assert_eq!(quantity(&resources.requests, "memory"), "2Gi");
    assert_eq!(quantity(&resources.requests, "cpu"), "1");
    assert_eq!(quantity(&resources.limits, "memory"), "2Gi");

    let svc = env.api::<Service>().get("s-start").await.unwrap();
    let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(&owner.uid)),
        ("Deployment", d.metadata.uid.as_ref())
    );
    // Would need `update` on deployments/finalizers where owner references are enforced.
    assert_ne!(owner.block_owner_deletion, Some(true));
    assert_eq!(svc.spec.unwrap().type_.as_deref(), Some("ClusterIP"));
    assert_eq!(pods_of(&env, "s-start").await.len(), 1, "one pod");
    env.finish().await;
}

/// Session pods run confined (the template's Pod Security profile), and a template with
/// `password_env` makes each session reachable only with its own random password, which
/// its URL carries.
#[tokio::test]
async fn session_pods_are_confined_and_each_has_its_own_password() {
    let env = env().await;
    let rt = &env.runtime;
    let a = rt.start("s-pw-a", &start("private")).await.unwrap();
    let b = rt.start("s-pw-b", &start("private")).await.unwrap();
    let deployments = env.api::<Deployment>();
    let pod_spec = |d: Deployment| d.spec.unwrap().template.spec.unwrap();
    let password_of = |spec: &k8s_openapi::api::core::v1::PodSpec| {
        spec.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "PASSWORD")
            .and_then(|e| e.value.clone())
            .expect("a PASSWORD variable")
    };
    let spec_a = pod_spec(deployments.get("s-pw-a").await.unwrap());
    let spec_b = pod_spec(deployments.get("s-pw-b").await.unwrap());
    let (pa, pb) = (password_of(&spec_a), password_of(&spec_b));
    assert!(
        pa.len() >= 32 && pa.chars().all(|c| c.is_ascii_alphanumeric()),
        "{pa}"
    );
    assert_ne!(pa, pb, "two sessions share a password");
    let url = a.url.clone().unwrap();
    assert!(
        url.starts_with(&format!("http://abc:{pa}@s-pw-a.{}.svc.", env.namespace)),
        "{url}"
    );
    assert!(b.url.unwrap().contains(&pb));
    // Adopted on a repeated start: the same password, the same URL.
    let again = rt.start("s-pw-a", &start("private")).await.unwrap();
    assert_eq!(again.url.as_deref(), Some(url.as_str()));

    // restricted: never root, nothing to escalate to, no capability, default seccomp.
    let pod = spec_a
        .security_context
        .clone()
        .expect("a pod securityContext");
    assert_eq!(pod.run_as_non_root, Some(true));
    assert!(pod.run_as_user.is_some_and(|u| u > 0));
    assert_eq!(
        pod.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let container = spec_a.containers[0].security_context.clone().unwrap();
    assert_eq!(container.allow_privilege_escalation, Some(false));
    let caps = container.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(caps.add, None);

    // baseline: root at start, only the capabilities an init needs.
    rt.start("s-root-init", &start("root-init")).await.unwrap();
    let spec = pod_spec(deployments.get("s-root-init").await.unwrap());
    assert_eq!(spec.security_context.unwrap().run_as_non_root, None);
    let container = spec.containers[0].security_context.clone().unwrap();
    assert_eq!(container.allow_privilege_escalation, Some(false));
    let caps = container.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        caps.add.unwrap(),
        streamspace_agent::runtime::BASELINE_CAPABILITIES.map(String::from)
    );
    // Without password_env the URL carries no credentials.
    let plain = rt.start("s-plain", &start("web")).await.unwrap();
    assert!(!plain.url.unwrap().contains('@'));
    env.finish().await;
}

#[tokio::test]
async fn a_command_may_override_the_template_resources() {
    let env = env().await;
    let mut spec = start("web");
    spec.resources = Some(Resources {
        memory: Some("1Gi".into()),
        cpu: None,
    });
    env.runtime.start("s-res", &spec).await.unwrap();
    let d = env.api::<Deployment>().get("s-res").await.unwrap();
    let container = &d.spec.unwrap().template.spec.unwrap().containers[0];
    let requests = container.resources.clone().unwrap().requests.unwrap();
    assert_eq!(requests["memory"].0, "1Gi");
    assert_eq!(requests["cpu"].0, "1");
    env.finish().await;
}

#[tokio::test]
async fn stop_twice_removes_the_workload_and_its_home() {
    let env = env().await;
    let rt = &env.runtime;
    // Templates give every session a home volume by default.
    rt.start("s-stop", &start("web")).await.unwrap();
    let claims = env.api::<PersistentVolumeClaim>();
    assert!(claims.get_opt("s-stop-home").await.unwrap().is_some());
    let d = env.api::<Deployment>().get("s-stop").await.unwrap();
    let volumes = d.spec.unwrap().template.spec.unwrap().volumes.unwrap();
    let home = volumes
        .iter()
        .find(|v| v.name == "home")
        .expect("a home volume");
    assert_eq!(
        home.persistent_volume_claim.as_ref().unwrap().claim_name,
        "s-stop-home"
    );

    for _ in 0..2 {
        let obs = rt.stop("s-stop", &StopSession::default()).await.unwrap();
        assert_eq!(obs.state, SessionState::Stopped);
        assert!(
            env.api::<Deployment>()
                .get_opt("s-stop")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            env.api::<Service>()
                .get_opt("s-stop")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            pods_of(&env, "s-stop").await.is_empty(),
            "foreground deletion took the pods first"
        );
        assert!(
            claims.get_opt("s-stop-home").await.unwrap().is_none(),
            "no retention configured: the home goes with the session"
        );
    }
    let never = rt
        .stop("s-never-existed", &StopSession::default())
        .await
        .unwrap();
    assert_eq!(never.state, SessionState::Stopped);
    env.finish().await;
}

#[tokio::test]
async fn hibernate_and_wake_twice_scale_between_zero_and_one() {
    let env = env().await;
    let rt = &env.runtime;
    rt.start("s-nap", &start("web")).await.unwrap();
    for _ in 0..2 {
        let obs = rt
            .hibernate("s-nap", &HibernateSession::default())
            .await
            .unwrap();
        assert_eq!(obs.state, SessionState::Hibernated);
        let d = env.api::<Deployment>().get("s-nap").await.unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(0));
        assert!(
            pods_of(&env, "s-nap")
                .await
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some()),
            "no pod runs while hibernated"
        );
    }
    // A start of a hibernated session returns it as it is.
    let got = rt.start("s-nap", &start("web")).await.unwrap();
    assert_eq!(got.state, SessionState::Hibernated);
    for _ in 0..2 {
        let obs = rt.wake("s-nap", &WakeSession::default()).await.unwrap();
        assert_eq!(obs.state, SessionState::Running, "{obs:?}");
        assert!(obs.url.is_some());
        let d = env.api::<Deployment>().get("s-nap").await.unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(1));
    }
    let err = rt
        .wake("s-unknown", &WakeSession::default())
        .await
        .unwrap_err();
    assert!(
        !err.retryable && err.message.contains("s-unknown"),
        "{err:?}"
    );
    let err = rt
        .hibernate("s-unknown", &HibernateSession::default())
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    env.finish().await;
}

fn foreign_deployment(name: &str, labels: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"owner": "someone-else"}},
            "template": {
                "metadata": {"labels": {"owner": "someone-else"}},
                "spec": {"containers": [{"name": "c", "image": std::env::var(IMAGE_VAR).unwrap_or_else(|_| DEFAULT_IMAGE.into())}]},
            },
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn its_own_leftovers_are_adopted_and_foreign_objects_refused() {
    let env = env().await;
    let deployments = env.api::<Deployment>();

    // Left by an earlier agent: a Service with our labels but no Deployment yet.
    let leftover: Service = serde_json::from_value(json!({
        "metadata": {"name": "s-adopt", "labels": {"app": "streamspace-session", "session": "s-adopt"}},
        "spec": {"selector": {"app": "streamspace-session", "session": "s-adopt"}, "ports": [{"port": 8080}]},
    }))
    .unwrap();
    env.api::<Service>()
        .create(&PostParams::default(), &leftover)
        .await
        .unwrap();
    let obs = env.runtime.start("s-adopt", &start("web")).await.unwrap();
    assert_eq!(obs.state, SessionState::Running);

    // Someone else's Deployment under the session's name is never touched.
    let foreign = deployments
        .create(
            &PostParams::default(),
            &foreign_deployment("s-foreign", json!({"owner": "someone-else"})),
        )
        .await
        .unwrap();
    let err = env
        .runtime
        .start("s-foreign", &start("web"))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(
        err.message.contains("does not belong to session s-foreign"),
        "{err:?}"
    );
    let err = env
        .runtime
        .stop("s-foreign", &StopSession::default())
        .await
        .unwrap_err();
    assert!(err.message.contains("refusing to delete"), "{err:?}");
    let err = env
        .runtime
        .hibernate("s-foreign", &HibernateSession::default())
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    let still = deployments.get("s-foreign").await.unwrap();
    assert_eq!(still.metadata.uid, foreign.metadata.uid);
    assert_eq!(still.spec.unwrap().replicas, Some(1), "not scaled");
    env.finish().await;
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_fails_the_start_retryably_and_releases_it() {
    let env = env().await;
    let err = env
        .runtime
        .start("s-broken", &start("broken"))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("ErrImagePull") || err.message.contains("ImagePullBackOff"),
        "{err:?}"
    );
    assert!(err.message.contains("s-broken"), "{err:?}");
    assert!(
        err.retryable,
        "registries throttle and blip: a failed pull is worth another attempt"
    );
    // It stops pulling: no replica is left, and the Deployment says why.
    let d = env.api::<Deployment>().get("s-broken").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(0));
    let why = &d.metadata.annotations.as_ref().unwrap()["streamspace.io/failed"];
    assert!(
        why.contains("ImagePull") || why.contains("ErrImagePull"),
        "{why}"
    );
    // The inventory tells the same story.
    let listed = env.runtime.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, SessionState::Failed, "{listed:?}");
    assert!(
        listed[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("ImagePull")),
        "{listed:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn an_out_of_band_deployment_deletion_is_reported_upstream() {
    let env = env().await;
    env.runtime.start("s-oob", &start("web")).await.unwrap();
    let mut events = env.runtime.subscribe();
    let d = env.api::<Deployment>().get("s-oob").await.unwrap();
    // Someone runs `kubectl delete deployment s-oob`.
    env.api::<Deployment>()
        .delete("s-oob", &DeleteParams::background())
        .await
        .unwrap();
    let obs = next_event(&mut events, "s-oob", |o| o.state == SessionState::Stopped).await;
    assert!(
        obs.message
            .as_deref()
            .is_some_and(|m| m.contains("deleted outside StreamSpace")),
        "{obs:?}"
    );
    // The owned Service goes with it.
    let uid = d.metadata.uid.unwrap();
    eventually(
        &env.api::<Deployment>(),
        "s-oob",
        conditions::is_deleted(&uid),
    )
    .await;
    env.finish().await;
}

#[tokio::test]
async fn own_operations_are_not_reported_as_news() {
    let env = env().await;
    let mut events = env.runtime.subscribe();
    let rt = &env.runtime;
    rt.start("s-quiet", &start("web")).await.unwrap();
    rt.hibernate("s-quiet", &HibernateSession::default())
        .await
        .unwrap();
    rt.wake("s-quiet", &WakeSession::default()).await.unwrap();
    rt.stop("s-quiet", &StopSession::default()).await.unwrap();
    // A marker that is news: someone deletes another session's Deployment. Everything
    // published before it would have been about s-quiet.
    rt.start("s-marker", &start("web")).await.unwrap();
    env.api::<Deployment>()
        .delete("s-marker", &DeleteParams::background())
        .await
        .unwrap();
    let first = next_event(&mut events, "s-marker", |_| true).await;
    assert_eq!(first.state, SessionState::Stopped);
    let mut events_before = Vec::new();
    while let Ok(obs) = events.try_recv() {
        events_before.push(obs);
    }
    assert!(
        events_before.iter().all(|o| o.session_id != "s-quiet"),
        "{events_before:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn an_evicted_pod_is_reported_and_its_replacement_too() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's pod-state hook");
        return;
    };
    env.runtime.start("s-evict", &start("web")).await.unwrap();
    let mut events = env.runtime.subscribe();
    let pod = pods_of(&env, "s-evict").await.remove(0);
    // Hold the replacement back so the eviction is seen on its own first.
    fake.set_pod_ready_delay(DEADLINE * 2);
    assert!(fake.set_pod_state(
        &env.namespace,
        pod.metadata.name.as_deref().unwrap(),
        PodState::Failed {
            reason: "Evicted".into(),
            message: "The node was low on resource: memory.".into(),
        }
    ));
    // The eviction is news as soon as it is seen, in the pod's own words.
    let obs = next_event(&mut events, "s-evict", |o| o.state != SessionState::Running).await;
    assert_eq!(obs.state, SessionState::Failed, "{obs:?}");
    assert!(
        obs.message
            .as_deref()
            .is_some_and(|m| m.contains("Evicted")),
        "{obs:?}"
    );
    let replacement = pods_of(&env, "s-evict")
        .await
        .into_iter()
        .find(|p| p.metadata.name != pod.metadata.name)
        .expect("the controller made a replacement");
    fake.set_pod_state(
        &env.namespace,
        replacement.metadata.name.as_deref().unwrap(),
        PodState::Ready,
    );
    let obs = next_event(&mut events, "s-evict", |o| o.state == SessionState::Running).await;
    assert!(obs.url.is_some());
    env.finish().await;
}

#[tokio::test]
async fn a_crashing_container_is_reported_as_failed() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's pod-state hook");
        return;
    };
    env.runtime.start("s-crash", &start("web")).await.unwrap();
    let mut events = env.runtime.subscribe();
    let pod = pods_of(&env, "s-crash").await.remove(0);
    fake.set_pod_state(
        &env.namespace,
        pod.metadata.name.as_deref().unwrap(),
        PodState::NotReady {
            reason: "CrashLoopBackOff".into(),
            message: "back-off 10s restarting failed container=session".into(),
        },
    );
    let obs = next_event(&mut events, "s-crash", |o| o.state == SessionState::Failed).await;
    assert!(
        obs.message
            .as_deref()
            .is_some_and(|m| m.contains("CrashLoopBackOff")),
        "{obs:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn inventory_comes_from_the_cluster_so_a_restarted_agent_knows_its_sessions() {
    let env = env().await;
    env.runtime.start("s-inv-a", &start("web")).await.unwrap();
    env.runtime.start("s-inv-b", &start("web")).await.unwrap();
    env.runtime
        .hibernate("s-inv-b", &HibernateSession::default())
        .await
        .unwrap();
    let restarted = env.another_runtime().await;
    let mut listed = restarted.list().await.unwrap();
    listed.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    let states: Vec<_> = listed
        .iter()
        .map(|o| (o.session_id.as_str(), o.state))
        .collect();
    assert_eq!(
        states,
        [
            ("s-inv-a", SessionState::Running),
            ("s-inv-b", SessionState::Hibernated)
        ]
    );
    // And it can carry on where the old one stopped.
    let obs = restarted
        .wake("s-inv-b", &WakeSession::default())
        .await
        .unwrap();
    assert_eq!(obs.state, SessionState::Running);
    env.finish().await;
}

/// Inventory (every heartbeat) comes from the watch caches once they are synced: it asks
/// the API server nothing, and still sees what the cluster holds.
#[tokio::test]
async fn inventory_is_answered_from_the_watch_caches() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's audit log");
        return;
    };
    env.runtime.start("s-cache", &start("web")).await.unwrap();
    fake.clear_audit_log();
    for _ in 0..3 {
        let listed = env.runtime.list().await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].state, SessionState::Running);
    }
    let calls: Vec<_> = fake
        .audit_log()
        .into_iter()
        .filter(|e| e.verb == "list" || e.verb == "get")
        .map(|e| format!("{} {}", e.verb, e.resource))
        .collect();
    assert!(
        calls.is_empty(),
        "inventory asked the API server: {calls:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn invalid_requests_fail_permanently_and_name_the_problem() {
    let env = env().await;
    let err = env
        .runtime
        .start("s-x", &start("no-such-template"))
        .await
        .unwrap_err();
    assert!(
        !err.retryable && err.message.contains("unknown template"),
        "{err:?}"
    );
    let err = env
        .runtime
        .start("Not_A_Name", &start("web"))
        .await
        .unwrap_err();
    assert!(
        !err.retryable && err.message.contains("cannot name Kubernetes objects"),
        "{err:?}"
    );
    let mut spec = start("web");
    spec.resources = Some(Resources {
        memory: Some("512MB".into()),
        cpu: None,
    });
    let err = env
        .runtime
        .start("s-bad-quantity", &spec)
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.contains("quantities must match"), "{err:?}");
    env.finish().await;
}

#[tokio::test]
async fn agent_configuration_selects_the_kubernetes_runtime() {
    use streamspace_agent::{Agent, AgentConfig, RuntimeKind};
    let env = env().await;
    let kubeconfig = env.config.kubeconfig.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Exactly the keys an operator (or an end-to-end scenario) sets.
    let vars = [
        (
            "STREAMSPACE_DISPATCHER_URL",
            "http://127.0.0.1:7001".to_owned(),
        ),
        ("STREAMSPACE_CREDENTIAL", "agent-token".to_owned()),
        ("STREAMSPACE_STATE_DIR", dir.path().display().to_string()),
        ("STREAMSPACE_RUNTIME", "kubernetes".to_owned()),
        (
            "STREAMSPACE_KUBERNETES__KUBECONFIG",
            kubeconfig.display().to_string(),
        ),
        ("STREAMSPACE_KUBERNETES__NAMESPACE", env.namespace.clone()),
    ]
    .map(|(k, v)| (k.to_owned(), v));
    let config: AgentConfig = streamspace_core::config::load_from(None, vars).unwrap();
    assert_eq!(config.runtime, RuntimeKind::Kubernetes);
    let agent = Agent::build(config).await.unwrap();
    let runtime = agent.runtime();
    assert_eq!(runtime.name(), "kubernetes");
    assert!(
        runtime
            .capabilities()
            .contains(&"template:firefox-browser".to_owned())
    );
    // The runtime it built talks to the same cluster: what another runtime starts there
    // reaches its inventory (through its watch caches, so not necessarily at once).
    env.runtime.start("s-cfg", &start("web")).await.unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let listed = runtime.list().await.unwrap();
        if listed.len() == 1 {
            assert_eq!(listed[0].session_id, "s-cfg");
            break;
        }
        assert!(
            listed.is_empty() && std::time::Instant::now() < deadline,
            "{listed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    env.finish().await;
}

#[test]
fn the_shipped_agent_configurations_load_and_validate() {
    use streamspace_agent::{AgentConfig, RuntimeKind};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for file in [
        "deploy/base/config/agent.toml",
        "deploy/overlays/dev/agent.toml",
        "deploy/overlays/production/agent.toml",
    ] {
        let path = root.join(file);
        let credential = [("STREAMSPACE_CREDENTIAL".to_owned(), "t".to_owned())];
        let config: AgentConfig = streamspace_core::config::load_from(Some(&path), credential)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(config.runtime, RuntimeKind::Kubernetes, "{file}");
        assert_eq!(
            config.kubernetes.namespace.as_deref(),
            Some("streamspace-sessions"),
            "{file}"
        );
        let catalog = config.kubernetes.catalog();
        for (name, template) in &config.kubernetes.templates {
            assert!(
                template.password_env.is_some(),
                "{file}: template {name} gives sessions no password"
            );
        }
        assert!(catalog.contains_key("firefox-browser"), "{file}");
    }
}
