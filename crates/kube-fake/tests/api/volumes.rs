//! Claims as a cluster treats them: protection while in use, binding after a moment, pods
//! waiting for their claims with the scheduler's words; and files in pods' volumes, which
//! outlive the pod only where a claim holds them.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::wait::conditions;
use serde_json::json;
use streamspace_kube_fake::{Error, FakeConfig};

use crate::helpers::{DEADLINE, NS, TestCluster, start, start_with, wait};

fn claim(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .expect("claim literal")
}

/// A session Deployment with its home claim at `/config` and a scratch emptyDir at
/// `/config/cache`.
fn with_home(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"session": name}},
            "template": {
                "metadata": {"labels": {"session": name}},
                "spec": {
                    "containers": [{"name": "session", "image": "img:1", "volumeMounts": [
                        {"name": "home", "mountPath": "/config"},
                        {"name": "cache", "mountPath": "/config/cache"},
                    ]}],
                    "volumes": [
                        {"name": "home", "persistentVolumeClaim": {"claimName": format!("{name}-home")}},
                        {"name": "cache", "emptyDir": {}},
                    ],
                },
            },
        },
    }))
    .expect("deployment literal")
}

fn phase(c: Option<&PersistentVolumeClaim>) -> Option<String> {
    c?.status.as_ref()?.phase.clone()
}

fn ready_replicas(d: Option<&Deployment>) -> i32 {
    d.and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

async fn live_pod(t: &TestCluster, session: &str) -> Pod {
    let list = t
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("session={session}")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "{:?}", list.items);
    list.items.into_iter().next().unwrap()
}

fn scheduled(p: &Pod) -> Option<(String, String, String)> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    Some((
        c.status.clone(),
        c.reason.clone().unwrap_or_default(),
        c.message.clone().unwrap_or_default(),
    ))
}

async fn scale(t: &TestCluster, name: &str, replicas: i32) {
    t.api::<Deployment>()
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_claim_is_protected_and_binds_after_a_moment() {
    let t = start().await;
    let api = t.api::<PersistentVolumeClaim>();
    let created = api
        .create(&PostParams::default(), &claim("c1"))
        .await
        .unwrap();
    assert_eq!(
        created.metadata.finalizers.as_deref(),
        Some(&["kubernetes.io/pvc-protection".to_owned()][..])
    );
    assert_eq!(phase(Some(&created)).as_deref(), Some("Pending"));
    let bound = wait(&api, "c1", |c: Option<&PersistentVolumeClaim>| {
        phase(c).as_deref() == Some("Bound")
    })
    .await
    .unwrap();
    assert!(bound.spec.unwrap().volume_name.is_some());

    // Not in use: a delete goes through the protection controller, at once.
    let answer = api.delete("c1", &DeleteParams::default()).await.unwrap();
    assert!(
        answer.is_left(),
        "202 with the claim while the finalizer is on"
    );
    wait(
        &api,
        "c1",
        conditions::is_deleted(created.metadata.uid.as_deref().unwrap()),
    )
    .await;
}

#[tokio::test]
async fn a_pod_waits_for_its_claim_with_the_schedulers_reason() {
    let t = start_with(FakeConfig {
        pod_ready_delay: Duration::from_millis(20),
        // Long enough that the claim stays unbound until the test lets it bind.
        pvc_bind_delay: Duration::from_secs(3600),
        ..FakeConfig::default()
    })
    .await;
    let deployments = t.api::<Deployment>();
    deployments
        .create(&PostParams::default(), &with_home("v1", 1))
        .await
        .unwrap();
    let pods = t.api::<Pod>();
    let unschedulable = |message: &'static str| {
        move |p: Option<&Pod>| {
            p.and_then(scheduled) == Some(("False".into(), "Unschedulable".into(), message.into()))
        }
    };
    wait(&deployments, "v1", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref()).and_then(|s| s.replicas) == Some(1)
    })
    .await;
    let pod = live_pod(&t, "v1").await;
    let name = pod.metadata.name.clone().unwrap();
    let pending = wait(
        &pods,
        &name,
        unschedulable("0/1 nodes are available: persistentvolumeclaim \"v1-home\" not found."),
    )
    .await
    .unwrap();
    let status = pending.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert!(pending.spec.unwrap().node_name.is_none(), "not scheduled");

    t.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim("v1-home"))
        .await
        .unwrap();
    wait(
        &pods,
        &name,
        unschedulable("0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims."),
    )
    .await;

    t.fake.set_pvc_bind_delay(Duration::ZERO);
    let ready = wait(&deployments, "v1", |d: Option<&Deployment>| {
        ready_replicas(d) == 1
    })
    .await
    .unwrap();
    assert_eq!(ready.status.unwrap().ready_replicas, Some(1));
    let running = pods.get(&name).await.unwrap();
    assert_eq!(scheduled(&running).unwrap().0, "True");
    assert_eq!(
        running.spec.unwrap().node_name.as_deref(),
        Some("fake-node")
    );
}

#[tokio::test]
async fn a_claim_in_use_outlives_its_deletion_until_no_pod_mounts_it() {
    let t = start().await;
    let claims = t.api::<PersistentVolumeClaim>();
    let created = claims
        .create(&PostParams::default(), &claim("v2-home"))
        .await
        .unwrap();
    let deployments = t.api::<Deployment>();
    deployments
        .create(&PostParams::default(), &with_home("v2", 1))
        .await
        .unwrap();
    wait(&deployments, "v2", |d: Option<&Deployment>| {
        ready_replicas(d) == 1
    })
    .await;

    let rv = created.metadata.resource_version.clone().unwrap();
    let mut events = claims
        .watch(&WatchParams::default().fields("metadata.name=v2-home"), &rv)
        .await
        .unwrap()
        .boxed();
    let answer = claims
        .delete("v2-home", &DeleteParams::default())
        .await
        .unwrap();
    let pending = answer.left().expect("the claim, still there");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert!(
        claims
            .get("v2-home")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );

    // The pod goes; so does the claim.
    scale(&t, "v2", 0).await;
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("an event before the deadline")
            .expect("stream open")
            .expect("event decodes");
        match event {
            WatchEvent::Modified(c) => {
                seen.push(("MODIFIED", c.metadata.deletion_timestamp.is_some()))
            }
            WatchEvent::Deleted(_) => {
                seen.push(("DELETED", true));
                break;
            }
            WatchEvent::Bookmark(_) | WatchEvent::Added(_) => {}
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert!(seen.contains(&("MODIFIED", true)), "{seen:?}");
    assert_eq!(seen.last(), Some(&("DELETED", true)));
}

#[tokio::test]
async fn files_in_a_claim_outlive_the_pod_and_the_rest_do_not() {
    let t = start().await;
    t.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim("v3-home"))
        .await
        .unwrap();
    let deployments = t.api::<Deployment>();
    deployments
        .create(&PostParams::default(), &with_home("v3", 1))
        .await
        .unwrap();
    wait(&deployments, "v3", |d: Option<&Deployment>| {
        ready_replicas(d) == 1
    })
    .await;
    let first = live_pod(&t, "v3").await.metadata.name.unwrap();
    let fake = &t.fake;
    fake.write_file(NS, &first, "/config/prefs.js", b"home")
        .unwrap();
    fake.write_file(NS, &first, "/config/cache/blob", b"scratch")
        .unwrap();
    fake.write_file(NS, &first, "/tmp/lock", b"container")
        .unwrap();
    assert_eq!(
        fake.read_file(NS, &first, "/config/prefs.js")
            .unwrap()
            .as_deref(),
        Some(&b"home"[..])
    );
    assert_eq!(fake.read_file(NS, &first, "/config/nothing").unwrap(), None);
    assert!(matches!(
        fake.write_file(NS, &first, "/config/../etc/passwd", b"x"),
        Err(Error::InvalidPath { .. })
    ));

    // Hibernate and wake: a new pod, the same claim.
    scale(&t, "v3", 0).await;
    wait(&t.api::<Pod>(), &first, |p: Option<&Pod>| p.is_none()).await;
    assert!(matches!(
        fake.read_file(NS, &first, "/config/prefs.js"),
        Err(Error::PodNotFound { .. })
    ));
    scale(&t, "v3", 1).await;
    wait(&deployments, "v3", |d: Option<&Deployment>| {
        ready_replicas(d) == 1
    })
    .await;
    let second = live_pod(&t, "v3").await.metadata.name.unwrap();
    assert_ne!(first, second);
    assert_eq!(
        fake.read_file(NS, &second, "/config/prefs.js")
            .unwrap()
            .as_deref(),
        Some(&b"home"[..]),
        "the claim kept it"
    );
    assert_eq!(
        fake.read_file(NS, &second, "/config/cache/blob").unwrap(),
        None,
        "emptyDir"
    );
    assert_eq!(
        fake.read_file(NS, &second, "/tmp/lock").unwrap(),
        None,
        "container fs"
    );

    // A pod that is not running has no files to offer.
    fake.set_pod_state(
        NS,
        &second,
        streamspace_kube_fake::PodState::Waiting {
            reason: "ContainerCreating".into(),
            message: String::new(),
        },
    );
    assert!(matches!(
        fake.read_file(NS, &second, "/config/prefs.js"),
        Err(Error::PodNotRunning { .. })
    ));
}

#[tokio::test]
async fn files_are_reachable_over_http_for_the_binary() {
    let t = start().await;
    t.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim("v4-home"))
        .await
        .unwrap();
    let deployments = t.api::<Deployment>();
    deployments
        .create(&PostParams::default(), &with_home("v4", 1))
        .await
        .unwrap();
    wait(&deployments, "v4", |d: Option<&Deployment>| {
        ready_replicas(d) == 1
    })
    .await;
    let pod = live_pod(&t, "v4").await.metadata.name.unwrap();
    let url = |path: &str| format!("/fake/v1/namespaces/{NS}/pods/{pod}/files/{path}");
    t.fake.clear_audit_log();

    let put = http::Request::put(url("config/notes.txt"))
        .body(b"written over http".to_vec())
        .unwrap();
    let (code, _) = t.raw(put).await;
    assert_eq!(code, 204);
    assert_eq!(
        t.fake
            .read_file(NS, &pod, "/config/notes.txt")
            .unwrap()
            .as_deref(),
        Some(&b"written over http"[..])
    );
    let (code, bytes) = t
        .raw_bytes(
            http::Request::get(url("config/notes.txt"))
                .body(Vec::new())
                .unwrap(),
        )
        .await;
    assert_eq!((code, bytes.as_slice()), (200, &b"written over http"[..]));

    let (code, body) = t
        .raw(
            http::Request::get(url("config/absent"))
                .body(Vec::new())
                .unwrap(),
        )
        .await;
    assert_eq!(code, 404);
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("/config/absent")),
        "{body}"
    );
    let (code, body) = t
        .raw(
            http::Request::get(format!("/fake/v1/namespaces/{NS}/pods/nope/files/x"))
                .body(Vec::new())
                .unwrap(),
        )
        .await;
    assert_eq!(code, 404, "{body}");
    assert!(body["message"].is_string(), "{body}");

    t.fake.set_pod_state(
        NS,
        &pod,
        streamspace_kube_fake::PodState::Failed {
            reason: "Evicted".into(),
            message: "gone".into(),
        },
    );
    let (code, body) = t
        .raw(
            http::Request::get(url("config/notes.txt"))
                .body(Vec::new())
                .unwrap(),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    // The hooks are not Kubernetes requests: the audit log does not list them.
    assert_eq!(t.fake.audit_log(), []);
}
