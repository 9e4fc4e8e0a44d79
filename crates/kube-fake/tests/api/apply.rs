//! Server-side apply: a field manager owns what it applied, loses what others change, and
//! removes a field by no longer applying it; `managedFields` shows it all.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::Request;
use serde_json::{Value, json};

use crate::helpers::{NS, api_error, deployment, start, wait};

fn config(labels: Value, env: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "a1", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"session": "a1"}},
            "template": {
                "metadata": {"labels": {"session": "a1"}},
                "spec": {"containers": [{"name": "session", "image": "img:1", "env": env}]},
            },
        },
    })
}

fn managed(d: &Deployment) -> Vec<Value> {
    d.metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| serde_json::to_value(m).unwrap())
        .collect()
}

fn entry<'a>(entries: &'a [Value], manager: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["manager"] == manager)
        .unwrap_or_else(|| panic!("no entry of {manager}: {entries:?}"))
}

fn env_names(d: &Deployment) -> Vec<String> {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.name)
        .collect()
}

#[tokio::test]
async fn a_manager_removes_fields_by_no_longer_applying_them() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let pp = PatchParams::apply("streamspace-agent").force();
    let first = config(
        json!({"session": "a1", "tier": "gold"}),
        json!([{"name": "FEATURE", "value": "on"}, {"name": "KEEP", "value": "1"}]),
    );
    let created = api.patch("a1", &pp, &Patch::Apply(&first)).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let entries = managed(&created);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let mine = entry(&entries, "streamspace-agent");
    assert_eq!(mine["operation"], "Apply");
    assert_eq!(mine["apiVersion"], "apps/v1");
    assert_eq!(mine["fieldsType"], "FieldsV1");
    assert!(mine["time"].is_string());
    assert_eq!(
        mine["fieldsV1"]["f:metadata"]["f:labels"],
        json!({"f:session": {}, "f:tier": {}})
    );
    let container = &mine["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"session\"}"];
    assert_eq!(container["."], json!({}));
    assert_eq!(container["f:image"], json!({}));
    assert!(
        container["f:env"]["k:{\"name\":\"FEATURE\"}"].is_object(),
        "{mine}"
    );
    assert!(mine["fieldsV1"].get("f:status").is_none());

    // Another client adds a label of its own (an Update entry).
    let other = PatchParams {
        field_manager: Some("kubectl-label".into()),
        ..PatchParams::default()
    };
    let labelled = api
        .patch(
            "a1",
            &other,
            &Patch::Merge(json!({"metadata": {"labels": {"owner": "ops"}}})),
        )
        .await
        .unwrap();
    let entries = managed(&labelled);
    let theirs = entry(&entries, "kubectl-label");
    assert_eq!(theirs["operation"], "Update");
    assert_eq!(
        theirs["fieldsV1"],
        json!({"f:metadata": {"f:labels": {"f:owner": {}}}})
    );

    // The manager applies again without the tier label and the FEATURE variable: both
    // go, the other client's label stays, the spec change bumps the generation.
    let second = config(
        json!({"session": "a1"}),
        json!([{"name": "KEEP", "value": "1"}]),
    );
    let applied = api.patch("a1", &pp, &Patch::Apply(&second)).await.unwrap();
    let labels = applied.metadata.labels.clone().unwrap();
    assert_eq!(
        labels.keys().collect::<Vec<_>>(),
        ["owner", "session"],
        "{labels:?}"
    );
    assert_eq!(env_names(&applied), ["KEEP"]);
    assert_eq!(applied.metadata.generation, Some(2));
    let entries = managed(&applied);
    let mine = entry(&entries, "streamspace-agent");
    assert!(
        mine["fieldsV1"]["f:metadata"]["f:labels"]
            .get("f:tier")
            .is_none()
    );
    assert!(entry(&entries, "kubectl-label")["fieldsV1"].is_object());
}

#[tokio::test]
async fn a_field_another_manager_changed_is_no_longer_the_appliers() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let pp = PatchParams::apply("streamspace-agent").force();
    let applied = config(json!({"session": "a1"}), json!([]));
    api.patch("a1", &pp, &Patch::Apply(&applied)).await.unwrap();
    // Hibernate through /scale: the scaler now owns spec.replicas.
    let scaler = PatchParams {
        field_manager: Some("hibernator".into()),
        ..PatchParams::default()
    };
    api.patch_scale(
        "a1",
        &scaler,
        &Patch::Merge(json!({"spec": {"replicas": 0}})),
    )
    .await
    .unwrap();
    let scaled = api.get("a1").await.unwrap();
    let entries = managed(&scaled);
    let hibernator = entry(&entries, "hibernator");
    assert_eq!(hibernator["subresource"], "scale");
    assert_eq!(
        hibernator["fieldsV1"],
        json!({"f:spec": {"f:replicas": {}}})
    );
    assert!(
        entry(&entries, "streamspace-agent")["fieldsV1"]["f:spec"]
            .get("f:replicas")
            .is_none()
    );

    // Applying without replicas leaves the scaled value alone.
    let mut without = applied.clone();
    without["spec"].as_object_mut().unwrap().remove("replicas");
    let again = api.patch("a1", &pp, &Patch::Apply(&without)).await.unwrap();
    assert_eq!(again.spec.unwrap().replicas, Some(0));
}

#[tokio::test]
async fn apply_needs_a_field_manager_and_honours_a_resource_version() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let body = serde_json::to_vec(&config(json!({"session": "a1"}), json!([]))).unwrap();
    let request = http::Request::patch(format!("/apis/apps/v1/namespaces/{NS}/deployments/a1"))
        .header("content-type", "application/apply-patch+yaml")
        .body(body)
        .unwrap();
    let (code, status) = t.raw(request).await;
    assert_eq!(code, 400, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("fieldManager: Required value"),
        "{status}"
    );

    let pp = PatchParams::apply("mgr").force();
    api.patch(
        "a1",
        &pp,
        &Patch::Apply(config(json!({"session": "a1"}), json!([]))),
    )
    .await
    .unwrap();
    let mut stale = config(json!({"session": "a1", "x": "y"}), json!([]));
    stale["metadata"]["resourceVersion"] = json!("1");
    let err = api_error(api.patch("a1", &pp, &Patch::Apply(&stale)).await);
    assert_eq!(err.code, 409, "{err:?}");
    // Once the controllers are done with it, the version read is the version stored.
    let settled = wait(&api, "a1", |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.ready_replicas == Some(1))
            && d.and_then(|d| d.status.as_ref()?.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.reason.as_deref() == Some("NewReplicaSetAvailable"))
                })
    })
    .await
    .unwrap();
    let mut current = stale.clone();
    current["metadata"]["resourceVersion"] = json!(settled.metadata.resource_version);
    api.patch("a1", &pp, &Patch::Apply(&current)).await.unwrap();

    // Created by apply or not, RBAC sees a patch; the create answered 201.
    let log = t.fake.audit_log();
    let patches: Vec<u16> = log
        .iter()
        .filter(|e| e.verb == "patch" && e.resource == "deployments")
        .map(|e| e.code)
        .collect();
    assert_eq!(patches, [400, 201, 409, 200]);
}

#[tokio::test]
async fn an_ordinary_create_and_replace_are_update_entries() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let pp = PostParams {
        field_manager: Some("creator".into()),
        ..PostParams::default()
    };
    let created = api.create(&pp, &deployment("u1", "img", 0)).await.unwrap();
    let entries = managed(&created);
    let creator = entry(&entries, "creator");
    assert_eq!(creator["operation"], "Update");
    assert!(
        creator["fieldsV1"]["f:spec"]["f:replicas"].is_object(),
        "{creator}"
    );

    // A client without a field manager is named after its user agent.
    let request = Request::new(format!("/apis/apps/v1/namespaces/{NS}/deployments"))
        .patch(
            "u1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .unwrap();
    let (code, body) = t.raw(request).await;
    assert_eq!(code, 200, "{body}");
    let entries = body["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .clone();
    let by_agent: Vec<&Value> = entries
        .iter()
        .filter(|e| e["manager"] != "creator")
        .collect();
    assert_eq!(by_agent.len(), 1, "{entries:?}");
    assert_eq!(
        by_agent[0]["fieldsV1"],
        json!({"f:spec": {"f:replicas": {}}})
    );
    assert!(
        entry(&entries, "creator")["fieldsV1"]["f:spec"]
            .get("f:replicas")
            .is_none(),
        "the update took spec.replicas from the creator"
    );
}

/// The real API server authorizes an apply that would create its object as `create`
/// too: `patch` alone may change objects, not make them.
#[tokio::test]
async fn an_apply_that_creates_is_authorized_as_create_too() {
    let t = start().await;
    let api = t.api::<Deployment>();
    let pp = PatchParams::apply("streamspace-agent").force();
    let object = config(json!({"session": "a1"}), json!([]));
    t.fake
        .deny(streamspace_kube_fake::Denial::new("create", "deployments"));
    let status = api_error(api.patch("a1", &pp, &Patch::Apply(&object)).await);
    assert_eq!(status.code, 403);
    assert!(
        status.message.contains("cannot create resource"),
        "{status:?}"
    );
    t.fake.clear_denials();
    api.patch("a1", &pp, &Patch::Apply(&object)).await.unwrap();
    // Once it exists, applying needs only `patch`.
    t.fake
        .deny(streamspace_kube_fake::Denial::new("create", "deployments"));
    api.patch("a1", &pp, &Patch::Apply(&object)).await.unwrap();
    let verbs: Vec<(String, u16)> = t
        .fake
        .audit_log()
        .into_iter()
        .filter(|e| e.resource == "deployments" && e.name.as_deref() == Some("a1"))
        .map(|e| (e.verb, e.code))
        .collect();
    assert_eq!(
        verbs,
        [
            ("create".to_owned(), 403),
            ("patch".to_owned(), 403),
            ("create".to_owned(), 201),
            ("patch".to_owned(), 201),
            ("patch".to_owned(), 200),
        ]
    );
}
