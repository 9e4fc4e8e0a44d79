//! The objects a session is made of — its Deployment, Service and home volume claim —
//! as the runtime creates them from a template and a `StartSession`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use serde_json::json;
use streamspace_core::command::StartSession;

use super::{APP_LABEL, BASELINE_CAPABILITIES, Inner, KubeTemplate, SecurityProfile, label_value};

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

    pub(super) fn deployment_for(
        &self,
        session: &str,
        spec: &StartSession,
        template: &KubeTemplate,
    ) -> Deployment {
        let labels = self.labels(session, spec);
        let resources = spec.resources.clone().unwrap_or_default();
        let memory = resources.memory.unwrap_or_else(|| template.memory.clone());
        let cpu = resources.cpu.unwrap_or_else(|| template.cpu.clone());
        let mut env: BTreeMap<String, String> = template.env.clone();
        env.extend(spec.env.clone());
        env.insert("SESSION_ID".into(), session.to_owned());
        if let Some(var) = &template.password_env {
            env.insert(var.clone(), session_password());
        }
        let env: Vec<_> = env
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        let mut container = json!({
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
        });
        let mut volumes = json!([]);
        if spec.home_volume {
            container["volumeMounts"] =
                json!([{"name": "home", "mountPath": template.home_mount_path}]);
            volumes = json!([{"name": "home", "persistentVolumeClaim": {"claimName": format!("{session}-home")}}]);
        }
        let annotations = json!({
            "streamspace.io/user-id": spec.user_id.clone().unwrap_or_default(),
            "streamspace.io/template": spec.template,
        });
        let selector = json!({"app": APP_LABEL, "session": session});
        serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": session, "labels": labels, "annotations": annotations},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": selector},
                // Never two pods of one session: they would share one RWO home volume.
                "strategy": {"type": "Recreate"},
                "template": {
                    "metadata": {"labels": labels, "annotations": annotations},
                    "spec": {
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "securityContext": pod_security(template),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }))
        .expect("a Deployment literal matches its schema")
    }

    pub(super) fn service_for(
        &self,
        session: &str,
        spec: &StartSession,
        template: &KubeTemplate,
        owner: &Deployment,
    ) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": session,
                "labels": self.labels(session, spec),
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
                "ports": [{"name": "http", "port": template.port, "targetPort": "http"}],
            },
        }))
        .expect("a Service literal matches its schema")
    }

    pub(super) fn claim_for(&self, session: &str, spec: &StartSession) -> PersistentVolumeClaim {
        let mut claim = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            // Not owned by the Deployment: a home outlives a stop unless asked otherwise.
            "metadata": {"name": format!("{session}-home"), "labels": self.labels(session, spec)},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": self.home_volume_size}},
            },
        });
        if let Some(class) = &self.home_storage_class {
            claim["spec"]["storageClassName"] = json!(class);
        }
        serde_json::from_value(claim).expect("a PVC literal matches its schema")
    }
}
