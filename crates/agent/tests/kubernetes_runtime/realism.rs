//! The runtime as an operator would run it: homes that survive hibernation, starts the
//! cluster refuses failing at once with the cluster's words, failed starts giving their
//! quota back, drift repaired, templates reaching sessions, pods shaped for browsers.
//! Most need the stand-in's hooks (files in volumes, quotas, imposed failures) and skip
//! on a real cluster.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use streamspace_agent::runtime::{SessionRuntime, SessionState};
use streamspace_core::command::{HibernateSession, StopSession, WakeSession};
use streamspace_kube_fake::{FakeConfig, PodState, ResourceKind};

use crate::helpers::*;

/// The name of the session's one live pod.
async fn live_pod(env: &Env, session: &str) -> String {
    let pods = env
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("session={session}")))
        .await
        .unwrap();
    let live: Vec<_> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(live.len(), 1, "one live pod: {live:?}");
    live[0].metadata.name.clone().unwrap()
}

fn quota(name: &str, hard: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": name},
        "spec": {"hard": hard},
    })
}

fn failed_annotation(d: &Deployment) -> Option<String> {
    d.metadata
        .annotations
        .as_ref()?
        .get("streamspace.io/failed")
        .cloned()
}

#[tokio::test]
async fn hibernate_keeps_the_home_and_wake_mounts_it_again() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's volume contents");
        return;
    };
    let rt = &env.runtime;
    rt.start("s-home", &start("web")).await.unwrap();
    let pod = live_pod(&env, "s-home").await;
    fake.write_file(
        &env.namespace,
        &pod,
        "/config/profile/prefs.js",
        b"homepage",
    )
    .unwrap();
    fake.write_file(&env.namespace, &pod, "/tmp/scratch", b"lost")
        .unwrap();

    rt.hibernate("s-home", &HibernateSession::default())
        .await
        .unwrap();
    let claim = env
        .api::<PersistentVolumeClaim>()
        .get("s-home-home")
        .await
        .unwrap();
    assert!(claim.metadata.deletion_timestamp.is_none(), "home kept");
    let woken = rt.wake("s-home", &WakeSession::default()).await.unwrap();
    assert_eq!(woken.state, SessionState::Running);

    let pod_after = live_pod(&env, "s-home").await;
    assert_ne!(pod, pod_after, "a new pod after wake");
    assert_eq!(
        fake.read_file(&env.namespace, &pod_after, "/config/profile/prefs.js")
            .unwrap()
            .as_deref(),
        Some(&b"homepage"[..]),
        "the home's contents survived hibernation"
    );
    assert_eq!(
        fake.read_file(&env.namespace, &pod_after, "/tmp/scratch")
            .unwrap(),
        None,
        "the container's own filesystem did not (the stand-in models that)"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_template_without_a_home_makes_no_claim() {
    let env = env().await;
    env.runtime
        .start("s-bare", &start("no-home"))
        .await
        .unwrap();
    assert!(
        env.api::<PersistentVolumeClaim>()
            .get_opt("s-bare-home")
            .await
            .unwrap()
            .is_none()
    );
    let d = env.api::<Deployment>().get("s-bare").await.unwrap();
    let pod = d.spec.unwrap().template;
    assert!(
        pod.spec.unwrap().volumes.unwrap_or_default().is_empty(),
        "no home, no /dev/shm"
    );
    let annotations = pod.metadata.unwrap().annotations.unwrap_or_default();
    assert!(!annotations.contains_key("cluster-autoscaler.kubernetes.io/safe-to-evict"));
    env.finish().await;
}

#[tokio::test]
async fn a_retained_home_outlives_the_stop_until_its_time() {
    let env = env_configured(FakeConfig::default(), |c| {
        c.home_retention_secs = 86_400;
    })
    .await;
    let rt = &env.runtime;
    rt.start("s-keep", &start("web")).await.unwrap();
    rt.stop("s-keep", &StopSession::default()).await.unwrap();
    let claims = env.api::<PersistentVolumeClaim>();
    let kept = claims.get("s-keep-home").await.unwrap();
    let after = kept.metadata.annotations.unwrap()["streamspace.io/delete-after"].clone();
    let after = chrono::DateTime::parse_from_rfc3339(&after).expect("an RFC 3339 time");
    assert!(
        after > chrono::Utc::now() + chrono::Duration::hours(23),
        "{after}"
    );
    assert_eq!(rt.sweep_homes().await, 0, "not due yet");
    assert!(claims.get_opt("s-keep-home").await.unwrap().is_some());

    // Its time comes (an operator may also shorten it by editing the annotation).
    let past = json!({"metadata": {"annotations": {"streamspace.io/delete-after": "2000-01-01T00:00:00Z"}}});
    claims
        .patch("s-keep-home", &PatchParams::default(), &Patch::Merge(&past))
        .await
        .unwrap();
    eventually(
        &claims,
        "s-keep-home",
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.metadata.annotations.as_ref())
                .is_some_and(|a| a["streamspace.io/delete-after"].starts_with("2000"))
        },
    )
    .await;
    // The runtime's caches see the edit through their watch; sweep until they do.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while rt.sweep_homes().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never swept");
        tokio::task::yield_now().await;
    }
    eventually(
        &claims,
        "s-keep-home",
        |c: Option<&PersistentVolumeClaim>| c.is_none(),
    )
    .await;
    // Asked explicitly, a stop deletes the home at once, retention or not.
    rt.start("s-keep-2", &start("web")).await.unwrap();
    rt.stop("s-keep-2", &StopSession { delete_home: true })
        .await
        .unwrap();
    assert!(claims.get_opt("s-keep-2-home").await.unwrap().is_none());
    env.finish().await;
}

#[tokio::test]
async fn a_start_over_quota_fails_at_once_with_the_quotas_message() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's quota");
        return;
    };
    fake.create_out_of_band(
        ResourceKind::ResourceQuota,
        &env.namespace,
        quota("session-memory", json!({"limits.memory": "1Gi"})),
    )
    .unwrap();
    let err = env
        .runtime
        .start("s-quota", &start("web"))
        .await
        .unwrap_err();
    assert!(!err.retryable, "retrying cannot make room: {err:?}");
    assert!(
        err.message.contains("exceeded quota: session-memory"),
        "{err:?}"
    );
    assert!(err.message.contains("ResourceQuota"), "{err:?}");
    assert!(
        !err.message.contains("not ready within"),
        "failed on the cluster's verdict, not the ready timeout: {err:?}"
    );
    let d = env.api::<Deployment>().get("s-quota").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(0), "released");
    assert!(failed_annotation(&d).unwrap().contains("exceeded quota"));
    let listed = env.runtime.list().await.unwrap();
    assert_eq!(listed[0].state, SessionState::Failed, "{listed:?}");

    // Once there is room, starting again applies it again and it runs.
    fake.delete_out_of_band(
        ResourceKind::ResourceQuota,
        &env.namespace,
        "session-memory",
        streamspace_kube_fake::Propagation::Background,
    );
    let obs = env.runtime.start("s-quota", &start("web")).await.unwrap();
    assert_eq!(obs.state, SessionState::Running, "{obs:?}");
    let d = env.api::<Deployment>().get("s-quota").await.unwrap();
    assert_eq!(failed_annotation(&d), None, "the failure mark is gone");
    env.finish().await;
}

#[tokio::test]
async fn a_start_admission_denies_fails_at_once_and_says_so() {
    let env = env().await;
    if env.fake.is_none() {
        eprintln!("skipped on a real cluster: needs the stand-in's admission rule");
        return;
    }
    let err = env
        .runtime
        .start("s-denied", &start("denied"))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.contains("admission denied"), "{err:?}");
    assert!(err.message.contains("denied the request"), "{err:?}");
    env.finish().await;
}

/// A pull failure may pass (and is retried); a name no runtime can parse will not.
#[tokio::test]
async fn an_invalid_image_name_fails_the_start_at_once() {
    let env = env().await;
    let err = env
        .runtime
        .start("s-misnamed", &start("misnamed"))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.contains("InvalidImageName"), "{err:?}");
    assert!(
        !err.message.contains("not ready within"),
        "failed on the kubelet's verdict, not the ready timeout: {err:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_failed_start_gives_its_quota_back() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's quota");
        return;
    };
    // Room for one 2Gi session, not two.
    fake.create_out_of_band(
        ResourceKind::ResourceQuota,
        &env.namespace,
        quota("one-session", json!({"limits.memory": "3Gi"})),
    )
    .unwrap();
    let err = env
        .runtime
        .start("s-crash", &start("crashing"))
        .await
        .unwrap_err();
    assert!(!err.retryable, "a crash loop is the template's: {err:?}");
    assert!(err.message.contains("CrashLoopBackOff"), "{err:?}");
    // Its pod is gone, so the next session fits.
    let obs = env.runtime.start("s-next", &start("web")).await.unwrap();
    assert_eq!(obs.state, SessionState::Running, "{obs:?}");
    env.finish().await;
}

#[tokio::test]
async fn an_oom_killed_container_says_so_in_the_status() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs imposed pod states");
        return;
    };
    // At start: the start fails with the kernel's verdict, not just "back-off".
    let err = env.runtime.start("s-oom", &start("oom")).await.unwrap_err();
    assert!(err.message.contains("OOMKilled"), "{err:?}");
    assert!(err.message.contains("exit code 137"), "{err:?}");

    // While running: the published observation carries it.
    env.runtime.start("s-oom-2", &start("web")).await.unwrap();
    let mut events = env.runtime.subscribe();
    let pod = live_pod(&env, "s-oom-2").await;
    assert!(fake.set_pod_state(&env.namespace, &pod, PodState::OomKilled));
    let obs = next_event(&mut events, "s-oom-2", |o| o.state == SessionState::Failed).await;
    let message = obs.message.unwrap_or_default();
    assert!(
        message.contains("OOMKilled") && message.contains("137"),
        "{message}"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_service_deleted_by_hand_comes_back() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: deletes out of band through the stand-in");
        return;
    };
    let rt = &env.runtime;
    rt.start("s-drift", &start("web")).await.unwrap();
    let before = env.api::<Service>().get("s-drift").await.unwrap();
    assert!(fake.delete_out_of_band(
        ResourceKind::Service,
        &env.namespace,
        "s-drift",
        streamspace_kube_fake::Propagation::Background,
    ));
    let services = env.api::<Service>();
    let uid = before.metadata.uid.clone();
    let back = eventually(&services, "s-drift", move |s: Option<&Service>| {
        s.is_some_and(|s| s.metadata.uid != uid)
    })
    .await
    .expect("the Service is back");
    let d = env.api::<Deployment>().get("s-drift").await.unwrap();
    let owner = &back.metadata.owner_references.unwrap()[0];
    assert_eq!(Some(&owner.uid), d.metadata.uid.as_ref());
    assert!(rt.services_repaired() >= 1);
    env.finish().await;
}

#[tokio::test]
async fn a_service_left_by_an_earlier_deployment_is_replaced() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: creates out of band through the stand-in");
        return;
    };
    // The session's labels, but owned by a Deployment that no longer exists.
    fake.create_out_of_band(
        ResourceKind::Service,
        &env.namespace,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "s-stale",
                "labels": {"app": "streamspace-session", "session": "s-stale"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "s-stale", "uid": "gone-0000"}],
            },
            "spec": {"selector": {"app": "streamspace-session", "session": "s-stale"}, "ports": [{"name": "http", "port": 1}]},
        }),
    )
    .unwrap();
    env.runtime.start("s-stale", &start("web")).await.unwrap();
    let d = env.api::<Deployment>().get("s-stale").await.unwrap();
    let svc = env.api::<Service>().get("s-stale").await.unwrap();
    assert_eq!(
        Some(&svc.metadata.owner_references.unwrap()[0].uid),
        d.metadata.uid.as_ref()
    );
    assert_ne!(svc.spec.unwrap().ports.unwrap()[0].port, 1);
    env.finish().await;
}

#[tokio::test]
async fn a_changed_template_reaches_the_session_when_it_wakes() {
    let env = env().await;
    let rt = &env.runtime;
    let first = rt.start("s-tmpl", &start("private")).await.unwrap();
    rt.hibernate("s-tmpl", &HibernateSession::default())
        .await
        .unwrap();
    // The agent restarts with the template changed: an extra variable, a bigger shm.
    let changed = env
        .reconfigured_runtime(|c| {
            let t = c.templates.get_mut("private").unwrap();
            t.env.insert("FEATURE".into(), "on".into());
            t.shm_size = "3Gi".into();
        })
        .await;
    let woken = changed
        .wake("s-tmpl", &WakeSession::default())
        .await
        .unwrap();
    assert_eq!(woken.state, SessionState::Running);
    assert_eq!(woken.url, first.url, "same password, same URL");
    let d = env.api::<Deployment>().get("s-tmpl").await.unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let env_vars = pod.containers[0].env.clone().unwrap();
    assert!(
        env_vars
            .iter()
            .any(|e| e.name == "FEATURE" && e.value.as_deref() == Some("on"))
    );
    let shm = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "dshm")
        .unwrap();
    assert_eq!(shm.empty_dir.unwrap().size_limit.unwrap().0, "3Gi");

    // And a variable the template drops is gone after the next wake (server-side apply
    // removes what the runtime no longer sets).
    changed
        .hibernate("s-tmpl", &HibernateSession::default())
        .await
        .unwrap();
    let reverted = env.another_runtime().await;
    reverted
        .wake("s-tmpl", &WakeSession::default())
        .await
        .unwrap();
    let d = env.api::<Deployment>().get("s-tmpl").await.unwrap();
    let env_vars = d.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        !env_vars.iter().any(|e| e.name == "FEATURE"),
        "{env_vars:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn templates_shape_the_pod_for_browsers_and_the_cluster() {
    let env = env().await;
    if env.fake.is_none() {
        eprintln!("skipped on a real cluster: its nodes lack the selected label and PriorityClass");
        return;
    }
    env.runtime
        .start("s-shape", &start("shaped"))
        .await
        .unwrap();
    let d = env.api::<Deployment>().get("s-shape").await.unwrap();
    let template = d.spec.unwrap().template;
    let annotations = template.metadata.unwrap().annotations.unwrap();
    assert_eq!(
        annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "false"
    );
    let pod = template.spec.unwrap();
    let shm = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "dshm")
        .expect("a /dev/shm volume");
    let empty_dir = shm.empty_dir.as_ref().unwrap();
    assert_eq!(empty_dir.medium.as_deref(), Some("Memory"));
    assert_eq!(empty_dir.size_limit.as_ref().unwrap().0, "2Gi");
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "dshm" && m.mount_path == "/dev/shm")
    );
    assert_eq!(
        pod.image_pull_secrets.unwrap()[0].name,
        "registry-credentials"
    );
    assert_eq!(
        pod.node_selector.unwrap()["streamspace.io/pool"],
        "sessions"
    );
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("streamspace.io/pool")
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("streamspace-sessions")
    );
    let claim = env
        .api::<PersistentVolumeClaim>()
        .get("s-shape-home")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(claim.access_modes.unwrap(), ["ReadWriteOncePod"]);
    assert_eq!(
        claim.resources.unwrap().requests.unwrap()["storage"].0,
        "3Gi"
    );
    env.finish().await;
}

/// Throttling (429 with `Retry-After`) slows an operation down; the client waits as told
/// and the operation completes.
#[tokio::test]
async fn a_throttling_api_server_slows_an_operation_but_does_not_fail_it() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's throttling");
        return;
    };
    env.runtime.start("s-429", &start("web")).await.unwrap();
    fake.clear_audit_log();
    fake.throttle(2);
    let obs = env
        .runtime
        .hibernate("s-429", &HibernateSession::default())
        .await
        .unwrap();
    assert_eq!(obs.state, SessionState::Hibernated);
    let throttled = fake.audit_log().iter().filter(|e| e.code == 429).count();
    assert_eq!(
        throttled, 2,
        "both throttled requests were answered 429 and retried"
    );
    env.finish().await;
}
