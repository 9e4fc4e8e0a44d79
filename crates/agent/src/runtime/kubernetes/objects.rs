//! The objects a session is made of — its Deployment, Service and home volume claim —
//! as the runtime applies them from a template and a `StartSession`.
//!
//! Each is built whole, as the runtime wants it, and written with server-side apply: a
//! field this runtime set last time and leaves out now is removed, so a changed template
//! reaches the session the next time its Deployment is applied (start, wake).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use serde_json::json;
use streamspace_core::command::StartSession;

use super::{
    ANNOTATION_FAILED, ANNOTATION_START_SPEC, APP_LABEL, BASELINE_CAPABILITIES, Inner,
    KubeTemplate, SecurityProfile, label_value,
};

/// Length of a session's random access password.
const PASSWORD_LEN: usize = 32;

/// A fresh random password: letters and digits, so it needs no escaping in a URL.
fn session_password() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(PASSWORD_LEN)
        .map(char::from)
        .collect()
}

/// The pod's security context for the template's profile.
fn pod_security(template: &KubeTemplate) -> serde_json::Value {
    let seccomp = json!({"type": "RuntimeDefault"});
    match template.security {
        SecurityProfile::Restricted => json!({
            "runAsNonRoot": true,
            "runAsUser": template.run_as_user,
            "runAsGroup": template.run_as_user,
            "fsGroup": template.run_as_user,
            "seccompProfile": seccomp,
        }),
        SecurityProfile::Baseline => json!({"seccompProfile": seccomp}),
    }
}

/// The container's security context for the template's profile.
fn container_security(template: &KubeTemplate) -> serde_json::Value {
    match template.security {
        SecurityProfile::Restricted => json!({
            "allowPrivilegeEscalation": false,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
        }),
        SecurityProfile::Baseline => json!({
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"], "add": BASELINE_CAPABILITIES},
        }),
    }
}

impl Inner {
    pub(super) fn labels(&self, session: &str, spec: &StartSession) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app".to_owned(), APP_LABEL.to_owned()),
            ("session".to_owned(), session.to_owned()),
            (
                "user".to_owned(),
                label_value(spec.user_id.as_deref().unwrap_or_default()),
            ),
            ("template".to_owned(), label_value(&spec.template)),
        ])
    }

    /// The session's Deployment at one replica. `password` keeps the one an existing
    /// Deployment already has (its URL was handed out); `None` draws a fresh one.
    pub(super) fn deployment_for(
        &self,
        session: &str,
        spec: &StartSession,
        template: &KubeTemplate,
        password: Option<String>,
    ) -> Deployment {
        let labels = self.labels(session, spec);
        let resources = spec.resources.clone().unwrap_or_default();
        let memory = resources.memory.unwrap_or_else(|| template.memory.clone());
        let cpu = resources.cpu.unwrap_or_else(|| template.cpu.clone());
        let mut env: BTreeMap<String, String> = template.env.clone();
        env.extend(spec.env.clone());
        env.insert("SESSION_ID".into(), session.to_owned());
        if let Some(var) = &template.password_env {
            env.insert(var.clone(), password.unwrap_or_else(session_password));
        }
        let env: Vec<_> = env
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        if spec.home_volume || template.home_volume {
            mounts.push(json!({"name": "home", "mountPath": template.home_mount_path}));
            volumes.push(json!({"name": "home", "persistentVolumeClaim": {"claimName": format!("{session}-home")}}));
        }
        if !template.shm_size.is_empty() {
            mounts.push(json!({"name": "dshm", "mountPath": "/dev/shm"}));
            volumes.push(
                json!({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": template.shm_size}}),
            );
        }
        let container = json!({
            "name": "session",
            "image": template.image,
            "ports": [{"name": "http", "containerPort": template.port}],
            "env": env,
            // Requests equal limits: a session gets what its template promises, no more.
            "resources": {
                "requests": {"memory": memory, "cpu": cpu},
                "limits": {"memory": memory, "cpu": cpu},
            },
            // Ready means the session's port answers, not merely that the process runs.
            "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 2, "failureThreshold": 3},
            "securityContext": container_security(template),
            "volumeMounts": mounts,
        });
        let annotations = json!({
            "streamspace.io/user-id": spec.user_id.clone().unwrap_or_default(),
            "streamspace.io/template": spec.template,
        });
        let mut object_annotations = annotations.clone();
        // What wake needs to re-apply the Deployment from the (maybe changed) template.
        object_annotations[ANNOTATION_START_SPEC] =
            json!(serde_json::to_string(spec).unwrap_or_default());
        let mut pod_annotations = annotations;
        if !template.safe_to_evict {
            // The cluster autoscaler must not end a live session to empty a node.
            pod_annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] = json!("false");
        }
        let mut pod = json!({
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": pod_security(template),
            "containers": [container],
            "volumes": volumes,
        });
        if !template.image_pull_secrets.is_empty() {
            pod["imagePullSecrets"] = template
                .image_pull_secrets
                .iter()
                .map(|name| json!({"name": name}))
                .collect();
        }
        if !template.node_selector.is_empty() {
            pod["nodeSelector"] = json!(template.node_selector);
        }
        if !template.tolerations.is_empty() {
            pod["tolerations"] = json!(template.tolerations);
        }
        if let Some(class) = &template.priority_class {
            pod["priorityClassName"] = json!(class);
        }
        let selector = json!({"app": APP_LABEL, "session": session});
        serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": session, "labels": labels, "annotations": object_annotations},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": selector},
                // Never two pods of one session: they would share one RWO home volume.
                "strategy": {"type": "Recreate"},
                "template": {
                    "metadata": {"labels": labels, "annotations": pod_annotations},
                    "spec": pod,
                },
            },
        }))
        .expect("a Deployment literal matches its schema")
    }

    /// `deployment` as a failed start leaves it: no replica (it stops pulling, crashing
    /// and holding quota) and the reason, so the session reads as failed, not hibernated.
    pub(super) fn failed_deployment(mut deployment: Deployment, why: &str) -> Deployment {
        if let Some(spec) = deployment.spec.as_mut() {
            spec.replicas = Some(0);
        }
        deployment
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(ANNOTATION_FAILED.to_owned(), why.to_owned());
        deployment
    }

    /// The session's Service, selecting its pod and owned by its Deployment.
    pub(super) fn service_for(&self, session: &str, owner: &Deployment) -> Service {
        let port = self.port_of(owner);
        let labels = owner.metadata.labels.clone().unwrap_or_default();
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": session,
                "labels": labels,
                // Owned by the Deployment: deleting it (even by hand) removes the Service.
                // No blockOwnerDeletion: setting it needs `update` on
                // deployments/finalizers where owner references are enforced, and a
                // foreground delete of the Deployment does not need it.
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": session,
                    "uid": owner.metadata.uid,
                }],
            },
            "spec": {
                "type": "ClusterIP",
                "selector": {"app": APP_LABEL, "session": session},
                "ports": [{"name": "http", "port": port, "targetPort": "http"}],
            },
        }))
        .expect("a Service literal matches its schema")
    }

    pub(super) fn claim_for(
        &self,
        session: &str,
        spec: &StartSession,
        template: &KubeTemplate,
    ) -> PersistentVolumeClaim {
        let size = template
            .home_size
            .as_deref()
            .unwrap_or(&self.home_volume_size);
        let mut claim = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            // Not owned by the Deployment: a home outlives hibernation and, for the
            // configured retention, a stop.
            "metadata": {"name": format!("{session}-home"), "labels": self.labels(session, spec)},
            "spec": {
                "accessModes": [template.home_access_mode],
                "resources": {"requests": {"storage": size}},
            },
        });
        if let Some(class) = template
            .home_storage_class
            .as_ref()
            .or(self.home_storage_class.as_ref())
        {
            claim["spec"]["storageClassName"] = json!(class);
        }
        serde_json::from_value(claim).expect("a PVC literal matches its schema")
    }
}
