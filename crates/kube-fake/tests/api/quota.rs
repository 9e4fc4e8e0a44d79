//! ResourceQuota as a served kind, its status, and admission: pods over quota or with a
//! refused image are not created, and the Deployment says why (`ReplicaFailure`) until
//! a pod is created or it is scaled to zero.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use streamspace_kube_fake::ResourceKind;

use crate::helpers::{NS, api_error, deployment, start, wait};

fn quota(name: &str, hard: Value) -> ResourceQuota {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": name},
        "spec": {"hard": hard},
    }))
    .expect("quota literal")
}

fn used(q: Option<&ResourceQuota>, resource: &str) -> Option<String> {
    q?.status
        .as_ref()?
        .used
        .as_ref()?
        .get(resource)
        .map(|v| v.0.clone())
}

/// The Deployment's condition of type `ty`, as `(status, reason, message)`.
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

fn replicas(d: Option<&Deployment>) -> i32 {
    d.and_then(|d| d.status.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_quota_is_served_and_its_status_follows_the_pods() {
    let t = start().await;
    let quotas = t.api::<ResourceQuota>();
    let created = quotas
        .create(
            &PostParams::default(),
            &quota(
                "compute",
                json!({"limits.memory": "4096Mi", "pods": "10", "requests.cpu": "2"}),
            ),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    let q = wait(&quotas, "compute", |q: Option<&ResourceQuota>| {
        used(q, "pods").as_deref() == Some("0")
    })
    .await
    .unwrap();
    let hard = q.status.unwrap().hard.unwrap();
    assert_eq!(hard["limits.memory"].0, "4Gi", "canonical form");
    assert_eq!(hard["requests.cpu"].0, "2");

    t.api::<Deployment>()
        .create(&PostParams::default(), &deployment("s1", "img", 3))
        .await
        .unwrap();
    let q = wait(&quotas, "compute", |q: Option<&ResourceQuota>| {
        used(q, "pods").as_deref() == Some("3")
    })
    .await
    .unwrap();
    let used_now = q.status.unwrap().used.unwrap();
    assert_eq!(used_now["limits.memory"].0, "1536Mi");
    assert_eq!(used_now["requests.cpu"].0, "750m");

    let listed = quotas.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    quotas
        .delete("compute", &DeleteParams::default())
        .await
        .unwrap();
    assert!(quotas.get_opt("compute").await.unwrap().is_none());
}

#[tokio::test]
async fn a_deployment_over_quota_reports_replica_failure_until_there_is_room() {
    let t = start().await;
    t.fake
        .create_out_of_band(
            ResourceKind::ResourceQuota,
            NS,
            json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "mem"},
                   "spec": {"hard": {"limits.memory": "1Gi"}}}),
        )
        .unwrap();
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("q1", "img", 3))
        .await
        .unwrap();
    // Two 512Mi pods fit; the third is refused with the quota admission's words.
    let d = wait(&api, "q1", |d: Option<&Deployment>| {
        condition(d, "ReplicaFailure").is_some() && replicas(d) == 2
    })
    .await
    .unwrap();
    let (status, reason, message) = condition(Some(&d), "ReplicaFailure").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "FailedCreate"));
    assert!(message.starts_with("pods \"q1-"), "{message}");
    assert!(
        message.ends_with(
            "\" is forbidden: exceeded quota: mem, requested: limits.memory=512Mi, used: limits.memory=1Gi, limited: limits.memory=1Gi"
        ),
        "{message}"
    );
    assert_eq!(t.fake.list(ResourceKind::Pod, NS).len(), 2);

    // More room: the next reconcile creates the pod and the condition goes.
    t.api::<ResourceQuota>()
        .patch(
            "mem",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hard": {"limits.memory": "2Gi"}}})),
        )
        .await
        .unwrap();
    let d = wait(&api, "q1", |d: Option<&Deployment>| {
        condition(d, "ReplicaFailure").is_none() && replicas(d) == 3
    })
    .await
    .unwrap();
    assert_eq!(t.fake.list(ResourceKind::Pod, NS).len(), 3, "{d:?}");
}

#[tokio::test]
async fn scaling_a_refused_deployment_to_zero_clears_its_failure() {
    let t = start().await;
    t.api::<ResourceQuota>()
        .create(&PostParams::default(), &quota("pods", json!({"pods": "0"})))
        .await
        .unwrap();
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("q2", "img", 1))
        .await
        .unwrap();
    let d = wait(&api, "q2", |d: Option<&Deployment>| {
        condition(d, "ReplicaFailure").is_some()
    })
    .await
    .unwrap();
    let (_, _, message) = condition(Some(&d), "ReplicaFailure").unwrap();
    assert!(
        message.ends_with("exceeded quota: pods, requested: pods=1, used: pods=0, limited: pods=0"),
        "{message}"
    );
    api.patch_scale(
        "q2",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 0}})),
    )
    .await
    .unwrap();
    wait(&api, "q2", |d: Option<&Deployment>| {
        d.is_some() && condition(d, "ReplicaFailure").is_none()
    })
    .await;
}

#[tokio::test]
async fn admission_refuses_denied_images_and_pods_over_quota() {
    let t = start().await;
    let api = t.api::<Deployment>();
    api.create(&PostParams::default(), &deployment("d1", "denied/img:1", 1))
        .await
        .unwrap();
    let d = wait(&api, "d1", |d: Option<&Deployment>| {
        condition(d, "ReplicaFailure").is_some()
    })
    .await
    .unwrap();
    assert_eq!(
        condition(Some(&d), "ReplicaFailure").unwrap(),
        (
            "True".to_owned(),
            "FailedCreate".to_owned(),
            "admission webhook \"images.policy.streamspace.test\" denied the request: image denied/img:1 is not allowed".to_owned()
        )
    );
    assert!(t.fake.list(ResourceKind::Pod, NS).is_empty());

    // A pod created directly is refused the same way: a webhook that sets no code is a
    // 400 without a reason; quota is 403 Forbidden.
    let pods = t.api::<Pod>();
    let pod = |name: &str, image: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": image,
                     "resources": {"limits": {"memory": "1Gi"}}}]},
        }))
        .unwrap()
    };
    let err = api_error(
        pods.create(&PostParams::default(), &pod("p0", "denied/x"))
            .await,
    );
    assert_eq!(err.code, 400);
    assert_eq!(
        err.reason, "",
        "a webhook that sets no code gives no reason"
    );
    assert_eq!(
        err.message,
        "admission webhook \"images.policy.streamspace.test\" denied the request: image denied/x is not allowed"
    );
    t.api::<ResourceQuota>()
        .create(
            &PostParams::default(),
            &quota("mem", json!({"limits.memory": "1536Mi"})),
        )
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("p1", "img"))
        .await
        .unwrap();
    let err = api_error(pods.create(&PostParams::default(), &pod("p2", "img")).await);
    assert_eq!(err.code, 403);
    assert_eq!(err.reason, "Forbidden");
    assert_eq!(
        err.message,
        "pods \"p2\" is forbidden: exceeded quota: mem, requested: limits.memory=1Gi, used: limits.memory=1Gi, limited: limits.memory=1536Mi"
    );
    // A quota on a resource the pod does not state refuses it for that.
    t.api::<ResourceQuota>()
        .create(
            &PostParams::default(),
            &quota("cpu", json!({"limits.cpu": "4"})),
        )
        .await
        .unwrap();
    pods.delete("p1", &DeleteParams::default()).await.unwrap();
    wait(&pods, "p1", |p: Option<&Pod>| p.is_none()).await;
    let err = api_error(pods.create(&PostParams::default(), &pod("p3", "img")).await);
    assert_eq!(
        err.message,
        "pods \"p3\" is forbidden: failed quota: cpu: must specify limits.cpu"
    );
}
