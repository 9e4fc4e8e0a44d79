//! What the cluster says about a session: its Deployment's replicas, conditions and
//! annotations and its pods' readiness and container states, read into an
//! [`Observation`] (and, while starting, into a verdict on whether to keep waiting).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;

use super::*;

/// What the pods of one session say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PodView {
    Ready {
        pod: String,
        ip: Option<String>,
    },
    /// A pod is failing with a reason the kubelet (or an eviction) gave.
    Failing {
        pod: String,
        reason: String,
        message: String,
    },
    /// A pod exists but is not ready; `detail` says why when the cluster says.
    Pending {
        pod: String,
        detail: Option<String>,
    },
    None,
}

pub(super) fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub(super) fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// The first reason a container gives for not running (waiting, or crashed last time),
/// with how it last ended when it did (`OOMKilled`, exit code 137): the reason a user
/// can act on is often the termination, not the back-off that follows it.
pub(super) fn container_trouble(pod: &Pod) -> Option<(String, String)> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let state = c.state.as_ref()?;
        let last = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .or(state.terminated.as_ref())
            .map(|t| {
                format!(
                    "last ended {} (exit code {})",
                    t.reason.as_deref().unwrap_or("Terminated"),
                    t.exit_code
                )
            });
        let waiting = state.waiting.as_ref()?;
        let reason = waiting.reason.clone()?;
        let message = waiting.message.clone().unwrap_or_default();
        let message = match last {
            Some(last) if message.is_empty() => last,
            Some(last) => format!("{message}; {last}"),
            None => message,
        };
        Some((reason, message))
    })
}

/// Whether the cluster has given up on a Deployment's rollout, in its own words, and
/// whether that is for good: a pod it may not create (`ReplicaFailure`: quota,
/// admission) is — retrying the same pod cannot help; no progress within the deadline
/// (`ProgressDeadlineExceeded`) is not — what stalled it (a slow pull) may pass.
/// Conditions older than the Deployment's latest generation are not read.
pub(super) fn rollout_refusal(deployment: &Deployment) -> Option<(String, bool)> {
    let generation = deployment.metadata.generation.unwrap_or(0);
    let status = deployment.status.as_ref()?;
    if status.observed_generation.unwrap_or(0) < generation {
        return None;
    }
    let conditions = status.conditions.as_ref()?;
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
    {
        let message = c.message.clone().unwrap_or_default();
        let what = match refusal_of(&message) {
            Refusal::Quota => "a ResourceQuota refused the session's pod",
            Refusal::Admission => "admission denied the session's pod",
            Refusal::Rbac => "the cluster may not create the session's pod",
        };
        let why = format!(
            "{what} ({}): {message}",
            c.reason.as_deref().unwrap_or("FailedCreate")
        );
        return Some((why, true));
    }
    conditions
        .iter()
        .find(|c| {
            c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
        .map(|c| {
            let why = format!(
                "the rollout made no progress within its deadline (ProgressDeadlineExceeded): {}",
                c.message.as_deref().unwrap_or_default()
            );
            (why, false)
        })
}

/// Why the scheduler has not placed a pod, if it said.
pub(super) fn unschedulable(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_deref().unwrap_or_default()
            )
        })
}

pub(super) fn pod_view<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> PodView {
    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    // Newest first, so a replacement pod speaks before the one it replaced.
    pods.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
    });
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    let active: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && !matches!(pod_phase(p), "Failed" | "Succeeded")
        })
        .collect();
    if let Some(p) = active.iter().find(|p| pod_is_ready(p)) {
        return PodView::Ready {
            pod: name(p),
            ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        };
    }
    if let Some((p, (reason, message))) = active
        .iter()
        .find_map(|p| container_trouble(p).map(|t| (p, t)))
        .filter(|(_, (reason, _))| TROUBLE_REASONS.contains(&reason.as_str()))
    {
        return PodView::Failing {
            pod: name(p),
            reason,
            message,
        };
    }
    if let Some(p) = active.first() {
        let detail = container_trouble(p)
            .map(|(r, m)| format!("{r}: {m}"))
            .or_else(|| unschedulable(p));
        return PodView::Pending {
            pod: name(p),
            detail,
        };
    }
    if let Some(p) = pods.iter().find(|p| pod_phase(p) == "Failed") {
        let status = p.status.as_ref();
        return PodView::Failing {
            pod: name(p),
            reason: status
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "Failed".into()),
            message: status.and_then(|s| s.message.clone()).unwrap_or_default(),
        };
    }
    PodView::None
}

/// Why a start failed, on a Deployment it scaled to zero.
pub(super) fn failure_of(deployment: &Deployment) -> Option<String> {
    deployment
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_FAILED)
        .cloned()
}

/// The value of `var` in the session container's environment.
pub(super) fn env_of(deployment: &Deployment, var: &str) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == var)?
        .value
        .clone()
}

/// The `StartSession` a Deployment was made from (absent on ones made by older agents).
pub(super) fn start_spec_of(deployment: &Deployment) -> Option<StartSession> {
    let json = deployment
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_START_SPEC)?;
    serde_json::from_str(json).ok()
}

pub(super) fn replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

impl Inner {
    /// The session's address: its Service's DNS name, with the scheme of its template and,
    /// when the template uses one, the user and per-session password the container checks.
    pub(super) fn url(&self, session: &str, deployment: &Deployment) -> String {
        let port = self.port_of(deployment);
        let host = format!(
            "{session}.{}.svc.{}:{port}",
            self.namespace, self.cluster_domain
        );
        let Some(template) = self.template_of(deployment) else {
            return format!("http://{host}");
        };
        let password = template
            .password_env
            .as_ref()
            .and_then(|var| env_of(deployment, var));
        match password {
            Some(password) => format!(
                "{}://{}:{password}@{host}",
                template.url_scheme, template.url_user
            ),
            None => format!("{}://{host}", template.url_scheme),
        }
    }

    pub(super) fn port_of(&self, deployment: &Deployment) -> u16 {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(DEFAULT_PORT)
    }

    /// A session's state from a Deployment and its pods.
    pub(super) fn observe(
        &self,
        session: &str,
        deployment: Option<&Deployment>,
        pods: &[&Pod],
    ) -> Observation {
        let Some(deployment) = deployment else {
            return Observation::new(session, SessionState::Stopped);
        };
        if deployment.metadata.deletion_timestamp.is_some() {
            return Observation::new(session, SessionState::Stopped).with_message("being deleted");
        }
        if replicas(deployment) == 0 {
            return match failure_of(deployment) {
                Some(why) => Observation::new(session, SessionState::Failed).with_message(why),
                None => Observation::new(session, SessionState::Hibernated),
            };
        }
        let url = self.url(session, deployment);
        match pod_view(pods.iter().copied()) {
            PodView::Ready { pod, ip } => Observation::new(session, SessionState::Running)
                .with_url(url)
                .with_message(match ip {
                    Some(ip) => format!("pod {pod} ({ip})"),
                    None => format!("pod {pod}"),
                }),
            PodView::Failing {
                pod,
                reason,
                message,
            } => Observation::new(session, SessionState::Failed)
                .with_url(url)
                .with_message(format!("pod {pod}: {reason}: {message}")),
            PodView::Pending { pod, detail } => Observation::new(session, SessionState::Starting)
                .with_url(url)
                .with_message(match detail {
                    Some(d) => format!("pod {pod}: {d}"),
                    None => format!("pod {pod} is not ready yet"),
                }),
            PodView::None => Observation::new(session, SessionState::Starting)
                .with_url(url)
                .with_message("no pod yet"),
        }
    }

    pub(super) fn observe_cached(&self, session: &str) -> Observation {
        let deployment = self.cached_deployment(session);
        let pods = self.cached_pods(session);
        let pods: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
        self.observe(session, deployment.as_deref(), &pods)
    }
}
