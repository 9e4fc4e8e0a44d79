//! Deployment status as the real controller reports it: `observedGeneration`, the
//! `Available` and `Progressing` conditions through a rollout, and a rollout that makes
//! no progress within `progressDeadlineSeconds`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::helpers::{TestCluster, deployment, start, wait};

fn condition(d: Option<&Deployment>, ty: &str) -> Option<(String, String, String)> {
    let c = d?
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == ty)?;
    Some((
        c.status.clone(),
        c.reason.clone().unwrap_or_default(),
        c.message.clone().unwrap_or_default(),
    ))
}

fn reason(d: Option<&Deployment>, ty: &str) -> Option<String> {
    condition(d, ty).map(|(_, r, _)| r)
}

/// The `pod-template-hash` of the session's live pods (all of one template).
async fn template_hash(t: &TestCluster, session: &str) -> String {
    let pods = t
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("session={session}")))
        .await
        .unwrap();
    let hashes: std::collections::BTreeSet<String> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            p.metadata
                .labels
                .as_ref()?
                .get("pod-template-hash")
                .cloned()
        })
        .collect();
    assert_eq!(hashes.len(), 1, "{hashes:?}");
    hashes.into_iter().next().unwrap()
}

#[tokio::test]
async fn conditions_follow_a_rollout_to_completion() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("r1", "img:1", 1))
        .await
        .unwrap();
    let done = wait(&api, "r1", |d: Option<&Deployment>| {
        reason(d, "Progressing").as_deref() == Some("NewReplicaSetAvailable")
    })
    .await
    .unwrap();
    let hash = template_hash(&t, "r1").await;
    assert_eq!(
        condition(Some(&done), "Progressing").unwrap(),
        (
            "True".into(),
            "NewReplicaSetAvailable".into(),
            format!("ReplicaSet \"r1-{hash}\" has successfully progressed.")
        )
    );
    assert_eq!(
        condition(Some(&done), "Available").unwrap(),
        (
            "True".into(),
            "MinimumReplicasAvailable".into(),
            "Deployment has minimum availability.".into()
        )
    );
    assert_eq!(done.status.unwrap().observed_generation, Some(1));

    // A new template is a new rollout: it completes under the new ReplicaSet's name,
    // and the status says it has seen the new generation.
    api.patch(
        "r1",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "session", "image": "img:2"}]}}}})),
    )
    .await
    .unwrap();
    let rolled = wait(&api, "r1", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.observed_generation == Some(2) && s.ready_replicas == Some(1))
            && reason(d, "Progressing").as_deref() == Some("NewReplicaSetAvailable")
    })
    .await
    .unwrap();
    let new_hash = template_hash(&t, "r1").await;
    assert_ne!(new_hash, hash);
    let (_, _, message) = condition(Some(&rolled), "Progressing").unwrap();
    assert_eq!(
        message,
        format!("ReplicaSet \"r1-{new_hash}\" has successfully progressed.")
    );
    assert_eq!(rolled.metadata.generation, Some(2));
}

#[tokio::test]
async fn a_rollout_without_progress_exceeds_its_deadline() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let mut d = deployment("r2", "crash/img:1", 1);
    d.spec.as_mut().unwrap().progress_deadline_seconds = Some(1);
    api.create(&PostParams::default(), &d).await.unwrap();
    // The pod is created (progress), then crash-loops: nothing more happens until the
    // deadline passes.
    let stuck = wait(&api, "r2", |d: Option<&Deployment>| {
        reason(d, "Progressing").as_deref() == Some("ProgressDeadlineExceeded")
    })
    .await
    .unwrap();
    let hash = template_hash(&t, "r2").await;
    assert_eq!(
        condition(Some(&stuck), "Progressing").unwrap(),
        (
            "False".into(),
            "ProgressDeadlineExceeded".into(),
            format!("ReplicaSet \"r2-{hash}\" has timed out progressing.")
        )
    );
    assert_eq!(
        condition(Some(&stuck), "Available").unwrap(),
        (
            "False".into(),
            "MinimumReplicasUnavailable".into(),
            "Deployment does not have minimum availability.".into()
        )
    );

    // A fixed template rolls out and completes.
    api.patch(
        "r2",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "session", "image": "img:1"}]}}}})),
    )
    .await
    .unwrap();
    let fixed = wait(&api, "r2", |d: Option<&Deployment>| {
        reason(d, "Progressing").as_deref() == Some("NewReplicaSetAvailable")
    })
    .await
    .unwrap();
    assert_eq!(
        reason(Some(&fixed), "Available").as_deref(),
        Some("MinimumReplicasAvailable")
    );
}
