//! RBAC: a forbidden call fails with a message naming verb and resource, and the agent's
//! Role in `deploy/` grants exactly the calls the runtime makes — no more, no less.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::rbac::v1::Role;
use serde_json::Value;
use streamspace_agent::runtime::SessionRuntime;
use streamspace_core::command::{HibernateSession, StopSession, WakeSession};
use streamspace_kube_fake::{Denial, FakeConfig};

use crate::helpers::*;

#[tokio::test]
async fn a_forbidden_call_names_the_verb_and_resource() {
    let env = env().await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's deny rules");
        return;
    };
    env.runtime.start("s-rbac", &start("web")).await.unwrap();
    fake.deny(Denial::new("patch", "deployments/scale"));
    let err = env
        .runtime
        .hibernate("s-rbac", &HibernateSession::default())
        .await
        .unwrap_err();
    assert!(!err.retryable, "an administrator has to grant it: {err:?}");
    assert!(
        err.message
            .contains("RBAC forbids the agent to patch deployments/scale"),
        "{err:?}"
    );
    assert!(err.message.contains(&env.namespace), "{err:?}");
    fake.clear_denials();
    fake.deny(Denial::new("create", "services"));
    let err = env
        .runtime
        .start("s-rbac-2", &start("web"))
        .await
        .unwrap_err();
    assert!(err.message.contains("create services"), "{err:?}");
    env.finish().await;
}

/// `(group, resource, verb)` triples.
type Grants = BTreeSet<(String, String, String)>;

fn role_from_deploy() -> Grants {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base");
    let kubectl = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(&base)
        .output()
        .unwrap_or_else(|e| {
            panic!("running kubectl ({e}): install kubectl 1.27 or newer, or set KUBECTL=/path/to/kubectl")
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap())
        .expect("rendered YAML");
    let role = docs
        .into_iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "streamspace-agent")
        .expect("the agent's Role in deploy/base");
    let role: Role = serde_json::from_value(role).expect("a typed Role");
    let mut grants = Grants::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    grants.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    grants
}

#[tokio::test]
async fn role_covers_exactly_what_the_runtime_uses() {
    let env = env_with(FakeConfig::default()).await;
    let Some(fake) = &env.fake else {
        eprintln!("skipped on a real cluster: needs the stand-in's audit log");
        return;
    };
    // The runtime's whole repertoire, each operation twice (the second time takes the
    // create-or-get and delete-if-exists paths), plus inventory and events.
    let rt = &env.runtime;
    let mut spec = start("web");
    spec.home_volume = true;
    let _events = rt.subscribe();
    for _ in 0..2 {
        rt.start("s-all", &spec).await.unwrap();
    }
    rt.list().await.unwrap();
    for _ in 0..2 {
        rt.hibernate("s-all", &HibernateSession::default())
            .await
            .unwrap();
    }
    for _ in 0..2 {
        rt.wake("s-all", &WakeSession::default()).await.unwrap();
    }
    for _ in 0..2 {
        rt.stop("s-all", &StopSession { delete_home: true })
            .await
            .unwrap();
    }
    let used: Grants = fake
        .audit_log()
        .into_iter()
        .map(|e| (e.group, e.resource, e.verb))
        .collect();
    let granted = role_from_deploy();
    let unused: Vec<_> = granted.difference(&used).collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        unused.is_empty() && missing.is_empty(),
        "deploy/base/agent/role.yaml and the runtime disagree\n  granted but never used: {unused:?}\n  used but not granted: {missing:?}"
    );
    env.finish().await;
}
