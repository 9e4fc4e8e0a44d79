//! `deploy/`: every kustomize overlay renders with `kubectl kustomize`, every object
//! parses into its typed k8s-openapi struct without losing a field (so a misspelt key
//! fails), and the rendered objects fit together: probes on the health endpoints, limits
//! everywhere, non-root pods, PDBs and Services that select real pods, the agent's
//! network reach limited to the dispatcher and the API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, PodTemplateSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_json::Value;

/// One rendered object, typed.
// A handful of short-lived values in a test: boxing every variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Object {
    Namespace(Namespace),
    Deployment(Deployment),
    Service(Service),
    Job(Job),
    ConfigMap(ConfigMap),
    Secret(Secret),
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
    PodDisruptionBudget(PodDisruptionBudget),
    NetworkPolicy(NetworkPolicy),
    /// cert-manager `Issuer`/`Certificate`: no typed structs; checked field by field.
    CertManager(Value),
    HorizontalPodAutoscaler(HorizontalPodAutoscaler),
    /// Prometheus Operator `ServiceMonitor`: no typed struct; checked field by field.
    ServiceMonitor(Value),
    /// Prometheus Operator `PrometheusRule`: checked in `deploy_observability.rs`.
    PrometheusRule,
    /// Prometheus Operator `PodMonitor` (the agent's): its port checked against the pod.
    PodMonitor(Value),
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `kubectl`, from `$KUBECTL` or the `PATH`; fails with what to install.
fn kubectl() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECTL") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl not found on PATH: install kubectl 1.27 or newer (it bundles kustomize), \
                 e.g. `apt-get install kubectl` from the Kubernetes apt repository, or set KUBECTL=/path/to/kubectl"
            )
        })
}

/// Renders a kustomization directory and returns every object as JSON.
pub fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl kustomize {}: {e}", dir.display()));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("kustomize prints UTF-8");
    serde_saphyr::from_multiple::<Value>(&yaml)
        .unwrap_or_else(|e| panic!("rendered YAML of {} does not parse: {e}", dir.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses into `K` and back; any field that does not survive was not understood.
fn typed<K>(value: &Value) -> K
where
    K: serde::de::DeserializeOwned + serde::Serialize,
{
    let name = format!("{} {}", value["kind"], value["metadata"]["name"]);
    let parsed: K = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{name} does not parse as its typed struct: {e}"));
    let back = serde_json::to_value(&parsed).unwrap();
    assert_eq!(
        &back, value,
        "{name} lost or changed fields in the typed round trip (a misspelt or misplaced key?)"
    );
    parsed
}

pub fn parse(value: &Value) -> Object {
    let kind = (
        value["apiVersion"].as_str().unwrap_or(""),
        value["kind"].as_str().unwrap_or(""),
    );
    match kind {
        ("v1", "Namespace") => Object::Namespace(typed(value)),
        ("apps/v1", "Deployment") => Object::Deployment(typed(value)),
        ("v1", "Service") => Object::Service(typed(value)),
        ("batch/v1", "Job") => Object::Job(typed(value)),
        ("v1", "ConfigMap") => Object::ConfigMap(typed(value)),
        ("v1", "Secret") => Object::Secret(typed(value)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(typed(value)),
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(typed(value)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(typed(value)),
        ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(typed(value)),
        ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(typed(value)),
        ("cert-manager.io/v1", "Issuer" | "Certificate") => Object::CertManager(value.clone()),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => Object::ServiceMonitor(value.clone()),
        ("monitoring.coreos.com/v1", "PrometheusRule") => Object::PrometheusRule,
        ("monitoring.coreos.com/v1", "PodMonitor") => Object::PodMonitor(value.clone()),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => {
            Object::HorizontalPodAutoscaler(typed(value))
        }
        other => panic!("unexpected object {other:?}: add it to the typed parse"),
    }
}

fn overlays() -> Vec<PathBuf> {
    let dir = repo_root().join("deploy/overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    let names: Vec<_> = found
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["dev", "production"],
        "every overlay is tested; update this list when adding one"
    );
    found
}

/// The rendered objects of one overlay, grouped for the cross-checks.
#[derive(Default)]
struct Rendered {
    deployments: BTreeMap<String, Deployment>,
    services: Vec<Service>,
    jobs: Vec<Job>,
    config_maps: Vec<String>,
    /// Every file of every ConfigMap, by file name (`agent.toml`, …).
    config_files: BTreeMap<String, String>,
    hpas: Vec<HorizontalPodAutoscaler>,
    service_monitors: Vec<Value>,
    pod_monitors: Vec<Value>,
    /// The sessions namespace's enforced Pod Security level.
    session_namespace_enforce: Option<String>,
    /// cert-manager objects by kind and name.
    cert_manager: BTreeMap<(String, String), Value>,
    secrets: Vec<Secret>,
    pdbs: Vec<PodDisruptionBudget>,
    policies: BTreeMap<String, NetworkPolicy>,
    roles: Vec<Role>,
    bindings: Vec<RoleBinding>,
    service_accounts: Vec<String>,
    namespaces: Vec<String>,
}

fn rendered(dir: &Path) -> Rendered {
    let mut r = Rendered::default();
    for value in render(dir) {
        match parse(&value) {
            Object::Deployment(d) => {
                r.deployments.insert(d.metadata.name.clone().unwrap(), d);
            }
            Object::Service(s) => r.services.push(s),
            Object::Job(j) => r.jobs.push(j),
            Object::ConfigMap(c) => {
                r.config_files.extend(c.data.clone().unwrap_or_default());
                r.config_maps.push(c.metadata.name.unwrap());
            }
            Object::HorizontalPodAutoscaler(h) => r.hpas.push(h),
            Object::ServiceMonitor(m) => r.service_monitors.push(m),
            Object::PrometheusRule => {}
            Object::PodMonitor(m) => r.pod_monitors.push(m),
            Object::CertManager(v) => {
                let key = (
                    v["kind"].as_str().unwrap_or("").to_owned(),
                    v["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                );
                r.cert_manager.insert(key, v);
            }
            Object::Secret(s) => r.secrets.push(s),
            Object::PodDisruptionBudget(p) => r.pdbs.push(p),
            Object::NetworkPolicy(p) => {
                r.policies.insert(p.metadata.name.clone().unwrap(), p);
            }
            Object::Role(role) => r.roles.push(role),
            Object::RoleBinding(b) => r.bindings.push(b),
            Object::ServiceAccount(sa) => r.service_accounts.push(sa.metadata.name.unwrap()),
            Object::Namespace(ns) => {
                let name = ns.metadata.name.unwrap();
                if name == "streamspace-sessions" {
                    r.session_namespace_enforce = ns
                        .metadata
                        .labels
                        .unwrap_or_default()
                        .get("pod-security.kubernetes.io/enforce")
                        .cloned();
                }
                r.namespaces.push(name);
            }
        }
    }
    r
}

fn pod_spec(t: &PodTemplateSpec) -> &PodSpec {
    t.spec.as_ref().expect("pod template has a spec")
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn template_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap()
}

/// Every container: an image, requests and limits for CPU and memory, no privilege.
fn check_pod(owner: &str, spec: &PodSpec, r: &Rendered) {
    assert_eq!(
        spec.enable_service_links,
        Some(false),
        "{owner}: Service links inject STREAMSPACE_* variables the config loader refuses"
    );
    let pod_sc = spec
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{owner}: no pod securityContext"));
    assert_eq!(pod_sc.run_as_non_root, Some(true), "{owner}: runAsNonRoot");
    assert!(
        pod_sc.run_as_user.is_some_and(|u| u != 0),
        "{owner}: non-root uid"
    );
    for c in &spec.containers {
        check_container(owner, c);
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            assert!(
                r.config_maps.contains(&cm.name),
                "{owner}: ConfigMap {} is not rendered",
                cm.name
            );
        }
    }
}

fn check_container(owner: &str, c: &Container) {
    assert!(
        c.image.as_deref().is_some_and(|i| i.contains(':')),
        "{owner}: image with a tag"
    );
    let res = c
        .resources
        .as_ref()
        .unwrap_or_else(|| panic!("{owner}: no resources"));
    for (what, map) in [("requests", &res.requests), ("limits", &res.limits)] {
        let map = map.as_ref().unwrap_or_else(|| panic!("{owner}: no {what}"));
        assert!(
            map.contains_key("cpu") && map.contains_key("memory"),
            "{owner}: {what} need cpu and memory"
        );
    }
    let sc = c
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{owner}: no container securityContext"));
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{owner}");
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{owner}");
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()]),
        "{owner}"
    );
}

fn check(dir: &Path) {
    let r = rendered(dir);
    let overlay = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        r.namespaces,
        ["streamspace", "streamspace-sessions"],
        "{overlay}"
    );
    for name in ["api-gateway", "command-dispatcher", "streamspace-agent"] {
        assert!(
            r.deployments.contains_key(name),
            "{overlay}: Deployment {name} missing"
        );
    }
    for (name, d) in &r.deployments {
        check_pod(
            &format!("{overlay}/{name}"),
            pod_spec(&d.spec.as_ref().unwrap().template),
            &r,
        );
    }
    for job in &r.jobs {
        check_pod(
            &format!("{overlay}/job"),
            pod_spec(&job.spec.as_ref().unwrap().template),
            &r,
        );
    }

    // Probes on the health endpoints.
    let gw = &pod_spec(&r.deployments["api-gateway"].spec.as_ref().unwrap().template).containers[0];
    let http_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(http_path(&gw.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(http_path(&gw.readiness_probe).as_deref(), Some("/readyz"));
    let dispatcher = &pod_spec(
        &r.deployments["command-dispatcher"]
            .spec
            .as_ref()
            .unwrap()
            .template,
    )
    .containers[0];
    // The agent port is TLS, which the kubelet's gRPC probe cannot speak: the dispatcher
    // is probed on its plaintext side port.
    assert_eq!(
        http_path(&dispatcher.liveness_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        http_path(&dispatcher.startup_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        http_path(&dispatcher.readiness_probe).as_deref(),
        Some("/readyz")
    );

    // Services and PDBs select the pods they are meant for.
    for svc in &r.services {
        let name = svc.metadata.name.clone().unwrap();
        let selector = svc.spec.as_ref().unwrap().selector.clone().unwrap();
        let d = r
            .deployments
            .values()
            .find(|d| labels_match(&selector, &template_labels(d)));
        let d =
            d.unwrap_or_else(|| panic!("{overlay}: Service {name} selects no Deployment's pods"));
        let ports: Vec<String> = pod_spec(&d.spec.as_ref().unwrap().template).containers[0]
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        for p in svc.spec.as_ref().unwrap().ports.iter().flatten() {
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(target)) =
                &p.target_port
            {
                assert!(
                    ports.contains(target),
                    "{overlay}: Service {name} targets unknown port {target}"
                );
            }
        }
    }
    for name in ["api-gateway", "command-dispatcher"] {
        let labels = template_labels(&r.deployments[name]);
        let covered = r.pdbs.iter().any(|p| {
            let sel = p
                .spec
                .as_ref()
                .unwrap()
                .selector
                .as_ref()
                .unwrap()
                .match_labels
                .clone()
                .unwrap_or_default();
            labels_match(&sel, &labels)
        });
        assert!(covered, "{overlay}: no PodDisruptionBudget covers {name}");
    }
    let dispatcher_svc = r
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("command-dispatcher"))
        .unwrap();
    assert_eq!(
        dispatcher_svc
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0]
            .app_protocol,
        None,
        "the dispatcher Service is TLS end to end, not plaintext h2c"
    );
    check_agent_link_tls(&overlay, &r);

    // The gateway scales on CPU, never below two.
    let hpa = r.hpas.first().expect("an HPA for the gateway");
    let spec = hpa.spec.as_ref().unwrap();
    assert_eq!(spec.scale_target_ref.name, "api-gateway", "{overlay}");
    assert!(spec.min_replicas.is_some_and(|m| m >= 2), "{overlay}");
    assert!(r.deployments.contains_key(&spec.scale_target_ref.name));

    // The migration Job runs the one-shot migrate mode, and is named per release: its
    // template cannot change, so a fixed name fails `apply` on upgrade.
    let job = r.jobs.first().expect("a migration Job");
    let image = pod_spec(&job.spec.as_ref().unwrap().template).containers[0]
        .image
        .clone()
        .unwrap_or_default();
    let tag = image
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .replace('.', "-");
    let job_name = job.metadata.name.clone().unwrap_or_default();
    // Development images are tagged `dev`; a release pins its version.
    assert!(
        overlay != "production" || job_name.ends_with(&tag),
        "{overlay}: Job {job_name} is not named for its release {image}"
    );
    let args = pod_spec(&job.spec.as_ref().unwrap().template).containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.contains(&"--migrate".into()) && args.contains(&"--exit-after-migrate".into()),
        "{args:?}"
    );

    // The agent: its own service account, bound to its Role in the sessions namespace,
    // and network reach limited to the dispatcher and the API server.
    let agent = pod_spec(
        &r.deployments["streamspace-agent"]
            .spec
            .as_ref()
            .unwrap()
            .template,
    );
    assert_eq!(
        agent.service_account_name.as_deref(),
        Some("streamspace-agent")
    );
    assert!(r.service_accounts.contains(&"streamspace-agent".to_owned()));
    let alive = agent.containers[0]
        .liveness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .unwrap_or_default();
    assert!(
        alive.last().is_some_and(|c| c == "alive"),
        "{overlay}: the agent has no liveness probe: {alive:?}"
    );
    let role = r
        .roles
        .iter()
        .find(|x| x.metadata.name.as_deref() == Some("streamspace-agent"))
        .unwrap();
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some("streamspace-sessions")
    );
    let binding = r
        .bindings
        .iter()
        .find(|b| b.role_ref.name == "streamspace-agent")
        .unwrap();
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "streamspace-agent", Some("streamspace"))
    );
    let policy = &r.policies["streamspace-agent"];
    let spec = policy.spec.as_ref().unwrap();
    // Nothing dials the agent but the metrics scraper, on the port it serves /metrics.
    let ingress = spec.ingress.as_deref().unwrap_or_default();
    assert_eq!(ingress.len(), 1, "only the scraper reaches the agent");
    let scraper = &ingress[0].from.as_ref().unwrap()[0];
    assert_eq!(
        scraper
            .namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()
            .get("streamspace.io/scrapes-metrics")
            .map(String::as_str),
        Some("true")
    );
    let agent_port = ingress[0].ports.as_ref().unwrap()[0].port.clone();
    let agent_pod = pod_spec(
        &r.deployments["streamspace-agent"]
            .spec
            .as_ref()
            .unwrap()
            .template,
    );
    let metrics_port = agent_pod.containers[0]
        .ports
        .as_ref()
        .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("http-metrics")))
        .map(|p| p.container_port);
    assert_eq!(
        agent_port.map(|p| serde_json::to_value(p).unwrap()),
        metrics_port.map(|p| serde_json::json!(p)),
        "{overlay}: the agent's ingress opens exactly its metrics port"
    );
    assert!(
        r.config_files["agent.toml"].contains(&format!(
            "metrics_listen = \"0.0.0.0:{}\"",
            metrics_port.unwrap_or_default()
        )),
        "{overlay}: the agent serves /metrics on the port its pod declares"
    );
    let egress = spec.egress.as_ref().unwrap();
    assert_eq!(egress.len(), 2, "dispatcher and API server only");
    let to_dispatcher = egress[0].to.as_ref().unwrap()[0]
        .pod_selector
        .as_ref()
        .unwrap()
        .match_labels
        .clone()
        .unwrap();
    assert!(labels_match(
        &to_dispatcher,
        &template_labels(&r.deployments["command-dispatcher"])
    ));
    assert!(egress[1].to.as_ref().unwrap()[0].ip_block.is_some());
    assert!(r.policies.contains_key("default-deny"));

    // Secrets, where rendered, hold placeholders only.
    for s in &r.secrets {
        for v in s.string_data.iter().flat_map(|d| d.values()) {
            assert!(
                v.contains("REPLACE-ME"),
                "{overlay}: Secret {:?} carries a value that is not a placeholder",
                s.metadata.name
            );
        }
        assert!(
            s.data.is_none(),
            "{overlay}: Secrets carry placeholders in stringData only"
        );
    }
}

/// Every session template names its confinement and gives each session its own password;
/// production's are all `restricted`, and its sessions namespace enforces that.
fn check_session_templates(overlay: &str, r: &Rendered, agent: &toml::Table) {
    let templates = agent["kubernetes"]["templates"]
        .as_table()
        .unwrap_or_else(|| panic!("{overlay}: agent.toml has no templates"));
    assert!(!templates.is_empty(), "{overlay}");
    for (name, t) in templates {
        let security = t.get("security").and_then(|v| v.as_str());
        assert!(
            matches!(security, Some("restricted" | "baseline")),
            "{overlay}: template {name} names no security profile"
        );
        assert!(
            t.get("password_env").and_then(|v| v.as_str()).is_some(),
            "{overlay}: template {name} gives sessions no per-session password"
        );
        if overlay == "production" {
            assert_eq!(
                security,
                Some("restricted"),
                "{overlay}: template {name} is not restricted"
            );
            assert!(
                t.get("run_as_user")
                    .and_then(|v| v.as_integer())
                    .is_some_and(|u| u > 0),
                "{overlay}: template {name} runs as root"
            );
        }
    }
    if overlay == "production" {
        assert_eq!(
            r.session_namespace_enforce.as_deref(),
            Some("restricted"),
            "production: the sessions namespace does not enforce restricted"
        );
    }
}

/// The agent link is mutual TLS in every overlay: the dispatcher serves the
/// `command-dispatcher-tls` Secret and requires client certificates from the same CA; the
/// agent dials `https://` with the `agent-tls` Secret; cert-manager issues both from one
/// CA, for the names each side uses.
fn check_agent_link_tls(overlay: &str, r: &Rendered) {
    let toml_of = |file: &str| -> toml::Table {
        let text = r
            .config_files
            .get(file)
            .unwrap_or_else(|| panic!("{overlay}: {file} is not rendered"));
        text.parse()
            .unwrap_or_else(|e| panic!("{overlay}: {file} does not parse: {e}"))
    };
    let dispatcher = toml_of("command-dispatcher.toml");
    let tls = dispatcher["tls"]
        .as_table()
        .unwrap_or_else(|| panic!("{overlay}: the dispatcher has no [tls]"));
    for key in ["cert_file", "key_file", "client_ca_file"] {
        let path = tls.get(key).and_then(|v| v.as_str()).unwrap_or("");
        assert!(
            path.starts_with("/etc/streamspace-tls/"),
            "{overlay}: dispatcher tls.{key} = {path:?} is not in the mounted Secret"
        );
    }
    let agent = toml_of("agent.toml");
    check_session_templates(overlay, r, &agent);
    let url = agent["dispatcher_url"].as_str().unwrap();
    assert!(
        url.starts_with("https://"),
        "{overlay}: the agent dials {url}"
    );
    assert_ne!(agent.get("insecure").and_then(|v| v.as_bool()), Some(true));
    for key in ["tls_ca_file", "tls_cert_file", "tls_key_file"] {
        let path = agent.get(key).and_then(|v| v.as_str()).unwrap_or("");
        assert!(
            path.starts_with("/etc/streamspace-tls/"),
            "{overlay}: agent {key} = {path:?} is not in the mounted Secret"
        );
    }

    // Each side mounts its Secret where its configuration looks.
    for (deployment, secret) in [
        ("command-dispatcher", "command-dispatcher-tls"),
        ("streamspace-agent", "agent-tls"),
    ] {
        let spec = pod_spec(&r.deployments[deployment].spec.as_ref().unwrap().template);
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
            .unwrap_or_else(|| panic!("{overlay}: {deployment} does not mount {secret}"));
        let mount = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| panic!("{overlay}: {deployment} does not mount {secret}"));
        assert_eq!(mount.mount_path, "/etc/streamspace-tls", "{overlay}");
        assert!(
            mount.sub_path.is_none(),
            "{overlay}: subPath mounts never see renewals"
        );
    }

    // cert-manager issues both from the link's CA, for the names each side uses.
    let certificate = |secret: &str| -> &Value {
        r.cert_manager
            .iter()
            .find(|((kind, _), v)| kind == "Certificate" && v["spec"]["secretName"] == secret)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("{overlay}: no Certificate writes Secret {secret}"))
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let server = certificate("command-dispatcher-tls");
    let host = url
        .trim_start_matches("https://")
        .split([':', '/'])
        .next()
        .unwrap();
    assert!(
        strings(&server["spec"]["dnsNames"]).contains(&host.to_owned()),
        "{overlay}: the dispatcher certificate does not name {host}"
    );
    assert!(strings(&server["spec"]["usages"]).contains(&"server auth".to_owned()));
    let client = certificate("agent-tls");
    assert!(strings(&client["spec"]["usages"]).contains(&"client auth".to_owned()));
    assert!(
        !strings(&client["spec"]["dnsNames"]).is_empty(),
        "{overlay}: the agent certificate names no agent id"
    );
    for cert in [server, client] {
        let issuer = cert["spec"]["issuerRef"]["name"].as_str().unwrap();
        let issuer = &r.cert_manager[&("Issuer".to_owned(), issuer.to_owned())];
        let ca_secret = issuer["spec"]["ca"]["secretName"]
            .as_str()
            .unwrap_or_else(|| {
                panic!("{overlay}: the link certificates are not issued by a CA Issuer")
            });
        assert_eq!(certificate(ca_secret)["spec"]["isCA"], true, "{overlay}");
    }
}

#[test]
fn every_overlay_renders_parses_and_fits_together() {
    for dir in overlays() {
        check(&dir);
    }
}

/// Sessions run users' code: in every overlay their namespace denies all traffic by
/// default, no rule lets a session reach another session (or anything in the cluster's
/// private ranges or the metadata endpoint), and ingress comes only from namespaces
/// labelled as fronting sessions.
#[test]
fn sessions_are_isolated_by_default_deny_network_policies() {
    for dir in overlays() {
        let overlay = dir.file_name().unwrap().to_string_lossy().into_owned();
        let r = rendered(&dir);
        let in_sessions: Vec<&NetworkPolicy> = r
            .policies
            .values()
            .filter(|p| p.metadata.namespace.as_deref() == Some("streamspace-sessions"))
            .collect();
        let deny_all = in_sessions.iter().any(|p| {
            let spec = p.spec.as_ref().unwrap();
            spec.pod_selector.as_ref().is_none_or(|s| {
                s.match_labels.as_ref().is_none_or(|l| l.is_empty())
                    && s.match_expressions.as_ref().is_none_or(|e| e.is_empty())
            }) && spec.policy_types.as_deref()
                == Some(&["Ingress".to_owned(), "Egress".to_owned()][..])
                && spec.ingress.is_none()
                && spec.egress.is_none()
        });
        assert!(deny_all, "{overlay}: no default-deny policy for sessions");
        for p in &in_sessions {
            let name = p.metadata.name.clone().unwrap_or_default();
            let spec = p.spec.as_ref().unwrap();
            for rule in spec.ingress.iter().flatten() {
                let from = rule.from.as_deref().unwrap_or_default();
                assert!(!from.is_empty(), "{overlay}/{name}: ingress from anywhere");
                for peer in from {
                    let fronting = peer
                        .namespace_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        .is_some_and(|l| {
                            l.get("streamspace.io/fronts-sessions").map(String::as_str)
                                == Some("true")
                        });
                    assert!(fronting, "{overlay}/{name}: ingress from {peer:?}");
                }
            }
            for rule in spec.egress.iter().flatten() {
                for peer in rule.to.iter().flatten() {
                    if let Some(block) = &peer.ip_block {
                        let except = block.except.clone().unwrap_or_default();
                        for private in [
                            "10.0.0.0/8",
                            "172.16.0.0/12",
                            "192.168.0.0/16",
                            "169.254.0.0/16",
                        ] {
                            assert!(
                                except.iter().any(|e| e == private),
                                "{overlay}/{name}: egress to {} reaches {private}",
                                block.cidr
                            );
                        }
                    } else {
                        let dns = peer
                            .pod_selector
                            .as_ref()
                            .and_then(|s| s.match_labels.as_ref())
                            .is_some_and(|l| {
                                l.get("k8s-app").map(String::as_str) == Some("kube-dns")
                            });
                        assert!(dns, "{overlay}/{name}: egress to {peer:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn production_runs_three_replicas_and_carries_no_placeholder_secrets() {
    let r = rendered(&repo_root().join("deploy/overlays/production"));
    // Every component that connects to PostgreSQL verifies the server (verify-full)
    // against a mounted CA.
    let mut connecting: Vec<(String, &PodSpec)> = ["api-gateway", "command-dispatcher"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                pod_spec(&r.deployments[*n].spec.as_ref().unwrap().template),
            )
        })
        .collect();
    for job in &r.jobs {
        connecting.push(("job".into(), pod_spec(&job.spec.as_ref().unwrap().template)));
    }
    // The gateway and the dispatcher are scraped: each ServiceMonitor selects a Service
    // that has the port it names.
    let mut scraped = Vec::new();
    for m in &r.service_monitors {
        let selector: BTreeMap<String, String> =
            serde_json::from_value(m["spec"]["selector"]["matchLabels"].clone()).unwrap();
        let svc = r
            .services
            .iter()
            .find(|s| labels_match(&selector, &s.metadata.labels.clone().unwrap_or_default()))
            .unwrap_or_else(|| {
                panic!(
                    "ServiceMonitor {} selects no Service",
                    m["metadata"]["name"]
                )
            });
        let ports: Vec<String> = svc
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.name.clone())
            .collect();
        for e in m["spec"]["endpoints"].as_array().into_iter().flatten() {
            let port = e["port"].as_str().unwrap_or_default().to_owned();
            assert!(
                ports.contains(&port),
                "{}: no port {port} on {ports:?}",
                m["metadata"]["name"]
            );
        }
        scraped.push(svc.metadata.name.clone().unwrap());
    }
    scraped.sort();
    assert_eq!(
        scraped,
        ["api-gateway", "command-dispatcher"],
        "production scrapes both"
    );
    // The agent (no Service) by pod: its PodMonitor selects the agent's pods and names a
    // port they declare.
    assert_eq!(r.pod_monitors.len(), 1, "one PodMonitor, the agent's");
    let m = &r.pod_monitors[0];
    let selector: BTreeMap<String, String> =
        serde_json::from_value(m["spec"]["selector"]["matchLabels"].clone()).unwrap();
    let agent = &r.deployments["streamspace-agent"];
    assert!(labels_match(&selector, &template_labels(agent)));
    let declared: Vec<String> = pod_spec(&agent.spec.as_ref().unwrap().template).containers[0]
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    for e in m["spec"]["podMetricsEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let port = e["port"].as_str().unwrap_or_default();
        assert!(
            declared.iter().any(|p| p == port),
            "no port {port} on the agent's pod"
        );
    }
    // Spread over zones as well as nodes, insisting on both.
    for name in ["api-gateway", "command-dispatcher"] {
        let spec = pod_spec(&r.deployments[name].spec.as_ref().unwrap().template);
        let keys: Vec<(&str, &str)> = spec
            .topology_spread_constraints
            .iter()
            .flatten()
            .map(|c| (c.topology_key.as_str(), c.when_unsatisfiable.as_str()))
            .collect();
        for key in ["kubernetes.io/hostname", "topology.kubernetes.io/zone"] {
            assert!(
                keys.contains(&(key, "DoNotSchedule")),
                "production {name}: not spread over {key}: {keys:?}"
            );
        }
    }
    assert!(
        r.hpas[0].spec.as_ref().unwrap().min_replicas >= Some(3),
        "production: the HPA would shrink the gateway below three"
    );
    // One database role per component: three Secrets, and the Job grants the others.
    let secrets: std::collections::BTreeSet<String> = connecting
        .iter()
        .filter_map(|(_, spec)| {
            spec.containers[0]
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "STREAMSPACE_DATABASE__URL")?
                .value_from
                .as_ref()?
                .secret_key_ref
                .as_ref()
                .map(|k| k.name.clone())
        })
        .collect();
    assert_eq!(
        secrets.len(),
        3,
        "one database Secret per component: {secrets:?}"
    );
    let job_args = pod_spec(&r.jobs[0].spec.as_ref().unwrap().template).containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        job_args.iter().any(|a| a.starts_with("--grant-roles=")),
        "the migration Job grants the service roles: {job_args:?}"
    );
    for (name, spec) in connecting {
        let c = &spec.containers[0];
        let env = |key: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == key)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            env("STREAMSPACE_DATABASE__SSL_MODE").as_deref(),
            Some("verify-full"),
            "{name}"
        );
        let ca = env("STREAMSPACE_DATABASE__SSL_ROOT_CERT").unwrap_or_default();
        let mounted = c.volume_mounts.iter().flatten().any(|m| {
            ca.starts_with(&format!("{}/", m.mount_path))
                && spec.volumes.iter().flatten().any(|v| {
                    v.name == m.name
                        && v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                            == Some("streamspace-database-ca")
                })
        });
        assert!(mounted, "{name}: the database CA {ca:?} is not mounted");
    }
    for name in ["api-gateway", "command-dispatcher"] {
        assert_eq!(
            r.deployments[name].spec.as_ref().unwrap().replicas,
            Some(3),
            "{name}"
        );
    }
    assert!(
        r.secrets.is_empty(),
        "production takes secrets from the cluster, not from the overlay"
    );
    assert_eq!(
        r.deployments["streamspace-agent"]
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(1),
        "one agent per cluster"
    );
}
