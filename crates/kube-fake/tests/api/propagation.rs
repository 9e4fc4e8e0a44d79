//! The built-in controllers: Deployments get pods that become ready (or fail to pull),
//! scaling follows, and deletion propagates through owner references in all three modes.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use serde_json::json;
use streamspace_kube_fake::{PodState, Propagation, ResourceKind};

use crate::helpers::{DEADLINE, NS, deployment, service, start, wait};

fn ready_replicas(d: Option<&Deployment>) -> i32 {
    d.and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

async fn only_pod(t: &crate::helpers::TestCluster, session: &str) -> Pod {
    let pods = t.api::<Pod>();
    let list = pods
        .list(&ListParams::default().labels(&format!("session={session}")))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "{:?}", list.items);
    list.items.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_deployment_gets_an_owned_pod_that_becomes_ready_and_scale_to_zero_removes_it() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let d = api
        .create(&PostParams::default(), &deployment("s1", "img:1", 1))
        .await
        .unwrap();
    let ready = wait(&api, "s1", |d: Option<&Deployment>| ready_replicas(d) == 1)
        .await
        .unwrap();
    let status = ready.status.unwrap();
    assert_eq!(status.available_replicas, Some(1));
    assert_eq!(status.observed_generation, Some(1));

    let pod = only_pod(&t, "s1").await;
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "Deployment");
    assert_eq!(Some(&owner.uid), d.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    let pod_status = pod.status.unwrap();
    assert_eq!(pod_status.phase.as_deref(), Some("Running"));
    assert!(pod_status.pod_ip.is_some());
    assert!(
        pod_status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let pod_name = pod.metadata.name.unwrap();
    assert!(pod_name.starts_with("s1-"), "{pod_name}");

    api.patch_scale(
        "s1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 0}})),
    )
    .await
    .unwrap();
    let pods = t.api::<Pod>();
    wait(
        &pods,
        &pod_name,
        conditions::is_deleted(pod.metadata.uid.as_deref().unwrap()),
    )
    .await;
    let scaled = wait(&api, "s1", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.replicas.is_none())
    })
    .await
    .unwrap();
    assert_eq!(
        scaled.status.unwrap().ready_replicas,
        None,
        "zero counts are omitted"
    );
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_leaves_the_pod_pending_with_the_reason() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(
        &PostParams::default(),
        &deployment("s1", "fail/missing:1", 1),
    )
    .await
    .unwrap();
    let pods = t.api::<Pod>();
    // The pod's name is generated; find it, then wait on it.
    let name = loop {
        let list = pods
            .list(&ListParams::default().labels("session=s1"))
            .await
            .unwrap();
        if let Some(p) = list.items.first() {
            break p.metadata.name.clone().unwrap();
        }
        assert!(
            t.fake
                .wait_for(ResourceKind::Pod, NS, "never", DEADLINE, |_| {
                    !t.fake.list(ResourceKind::Pod, NS).is_empty()
                })
                .await
        );
    };
    let reason = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone())
    };
    let pod = wait(&pods, &name, move |p: Option<&Pod>| {
        reason(p).as_deref() == Some("ImagePullBackOff")
    })
    .await
    .unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
    let d = api.get("s1").await.unwrap();
    assert_eq!(d.status.unwrap().unavailable_replicas, Some(1));
}

#[tokio::test]
async fn background_delete_removes_the_owner_at_once_and_its_dependents_after() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let d = api
        .create(&PostParams::default(), &deployment("s1", "img", 1))
        .await
        .unwrap();
    let services = t.api::<Service>();
    let svc = services
        .create(&PostParams::default(), &service("s1", &d))
        .await
        .unwrap();
    wait(&api, "s1", |d: Option<&Deployment>| ready_replicas(d) == 1).await;
    let pod = only_pod(&t, "s1").await;

    let answer = api.delete("s1", &DeleteParams::background()).await.unwrap();
    let status = answer
        .right()
        .expect("a Success status for a removed deployment");
    assert!(status.is_success());
    assert!(api.get_opt("s1").await.unwrap().is_none());
    wait(
        &services,
        "s1",
        conditions::is_deleted(svc.metadata.uid.as_deref().unwrap()),
    )
    .await;
    let pods = t.api::<Pod>();
    wait(
        &pods,
        pod.metadata.name.as_deref().unwrap(),
        conditions::is_deleted(pod.metadata.uid.as_deref().unwrap()),
    )
    .await;
}

#[tokio::test]
async fn foreground_delete_keeps_the_owner_until_its_dependents_are_gone() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let d = api
        .create(&PostParams::default(), &deployment("s1", "img", 1))
        .await
        .unwrap();
    // A finalizer on the Service holds it (and so the owner) until the test lets go.
    let services = t.api::<Service>();
    let mut held = service("s1", &d);
    held.metadata.finalizers = Some(vec!["test.streamspace.io/hold".into()]);
    services
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    wait(&api, "s1", |d: Option<&Deployment>| ready_replicas(d) == 1).await;

    let answer = api.delete("s1", &DeleteParams::foreground()).await.unwrap();
    let pending = answer
        .left()
        .expect("the object, still present, is returned");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert_eq!(
        pending.metadata.finalizers.as_deref(),
        Some(&["foregroundDeletion".to_owned()][..])
    );

    // The garbage collector deletes the dependents: the pod goes, the held Service is
    // marked and waits for its finalizer.
    let marked = wait(&services, "s1", |s: Option<&Service>| {
        s.is_some_and(|s| s.metadata.deletion_timestamp.is_some())
    })
    .await
    .unwrap();
    assert!(
        api.get("s1")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    // Deleting again while pending is harmless.
    assert!(
        api.delete("s1", &DeleteParams::foreground())
            .await
            .unwrap()
            .is_left()
    );

    services
        .patch(
            "s1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    wait(
        &services,
        "s1",
        conditions::is_deleted(marked.metadata.uid.as_deref().unwrap()),
    )
    .await;
    wait(
        &api,
        "s1",
        conditions::is_deleted(d.metadata.uid.as_deref().unwrap()),
    )
    .await;
    assert!(
        t.api::<Pod>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn orphan_delete_leaves_dependents_without_the_owner_reference() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let d = api
        .create(&PostParams::default(), &deployment("s1", "img", 0))
        .await
        .unwrap();
    let services = t.api::<Service>();
    services
        .create(&PostParams::default(), &service("s1", &d))
        .await
        .unwrap();
    api.delete(
        "s1",
        &DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    let svc = services.get("s1").await.unwrap();
    assert!(svc.metadata.owner_references.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn out_of_band_changes_are_seen_by_watches_and_failed_pods_are_replaced() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("s1", "img", 1))
        .await
        .unwrap();
    wait(&api, "s1", |d: Option<&Deployment>| ready_replicas(d) == 1).await;
    let pod = only_pod(&t, "s1").await;
    let name = pod.metadata.name.clone().unwrap();

    // An eviction fails the pod; the controller starts a replacement.
    assert!(t.fake.set_pod_state(
        NS,
        &name,
        PodState::Failed {
            reason: "Evicted".into(),
            message: "The node was low on resource: memory.".into(),
        }
    ));
    let pods = t.api::<Pod>();
    let failed = pods.get(&name).await.unwrap();
    assert_eq!(failed.status.unwrap().reason.as_deref(), Some("Evicted"));
    wait(&api, "s1", |d: Option<&Deployment>| ready_replicas(d) == 1).await;
    let list = pods
        .list(&ListParams::default().labels("session=s1"))
        .await
        .unwrap();
    assert_eq!(
        list.items.len(),
        2,
        "the evicted pod stays, as on a real cluster"
    );

    // Someone deletes the Deployment behind our back.
    let uid = api.get("s1").await.unwrap().metadata.uid.unwrap();
    assert!(
        t.fake
            .delete_out_of_band(ResourceKind::Deployment, NS, "s1", Propagation::Background)
    );
    wait(&api, "s1", conditions::is_deleted(&uid)).await;
    assert!(!t.fake.delete_out_of_band(
        ResourceKind::Deployment,
        NS,
        "s1",
        Propagation::Background
    ));
}

#[tokio::test]
async fn a_claim_binds_to_the_default_storage_class() {
    let t = start().await;
    let api = t.api::<PersistentVolumeClaim>();
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "s1-home"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &pvc).await.unwrap();
    let bound = wait(&api, "s1-home", |p: Option<&PersistentVolumeClaim>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Bound")
    })
    .await
    .unwrap();
    assert_eq!(
        bound.spec.unwrap().storage_class_name.as_deref(),
        Some("standard")
    );
}
