//! Writes to the API server: create-or-get, server-side apply, delete-if-ours and
//! `/scale`, each refusing objects that are not the session's, and the classification
//! of the API server's refusals into retryable and permanent errors.

use super::*;
/// Why the API server refused a write with 403: the three causes need different people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The agent's Role lacks the verb: an administrator must grant it.
    Rbac,
    /// A ResourceQuota is used up: someone must raise it or end other sessions.
    Quota,
    /// An admission controller (Pod Security, a policy webhook) denied the object: the
    /// template must change.
    Admission,
}

/// Reads the cause out of a refusal's message, as the API server words it:
/// `exceeded quota: …`, `admission webhook "…" denied the request: …`,
/// `violates PodSecurity "…"`, and for RBAC `User "…" cannot VERB resource …`.
pub(super) fn refusal_of(message: &str) -> Refusal {
    if message.contains("exceeded quota") {
        Refusal::Quota
    } else if message.contains("admission webhook")
        || message.contains("violates PodSecurity")
        || message.contains("denied the request")
    {
        Refusal::Admission
    } else {
        Refusal::Rbac
    }
}

/// The verb in an RBAC refusal: `User "…" cannot VERB resource "…"`.
fn denied_verb(message: &str) -> Option<&str> {
    let rest = &message[message.find("cannot ")? + "cannot ".len()..];
    let verb = rest.split_whitespace().next()?;
    rest[verb.len()..]
        .trim_start()
        .starts_with("resource")
        .then_some(verb)
}

/// The API failure of one call, as a [`RuntimeError`] naming the verb and resource.
pub(super) fn api_failure(
    e: kube::Error,
    verb: &str,
    resource: &str,
    name: &str,
    ns: &str,
) -> RuntimeError {
    match &e {
        kube::Error::Api(s) if s.code == 403 => match refusal_of(&s.message) {
            Refusal::Rbac => {
                // The verb the API server checked (an apply that creates is checked as
                // `create`), else the one we used.
                let verb = denied_verb(&s.message).unwrap_or(verb);
                RuntimeError::permanent(format!(
                    "kubernetes RBAC forbids the agent to {verb} {resource} in namespace {ns} ({name}): {}; grant `{verb}` on `{resource}` in the agent's Role",
                    s.message
                ))
            }
            Refusal::Quota => RuntimeError::permanent(format!(
                "kubernetes quota refused {resource} {ns}/{name}: {}",
                s.message
            )),
            Refusal::Admission => RuntimeError::permanent(format!(
                "kubernetes admission denied {resource} {ns}/{name}: {}",
                s.message
            )),
        },
        // Conflicts, throttling and server trouble pass; so may an expired token.
        kube::Error::Api(s) if matches!(s.code, 401 | 409 | 429) || s.code >= 500 => {
            RuntimeError::retryable(format!(
                "kubernetes {verb} {resource} {ns}/{name}: {}",
                s.message
            ))
        }
        kube::Error::Api(s) => RuntimeError::permanent(format!(
            "kubernetes {verb} {resource} {ns}/{name}: {} ({})",
            s.message, s.code
        )),
        other => {
            RuntimeError::retryable(format!("kubernetes {verb} {resource} {ns}/{name}: {other}"))
        }
    }
}

pub(super) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl Inner {
    /// Writes `object` whole with server-side apply under the runtime's field manager
    /// (forcing: the runtime owns the fields it sets), creating it when absent. A
    /// `resourceVersion` in `object` makes it conditional on that version (409 → `None`,
    /// to re-read and decide again).
    #[tracing::instrument(name = "kubernetes apply", skip_all, fields(otel.kind = "client", resource = %resource, name = object.meta().name.as_deref().unwrap_or_default()))]
    pub(super) async fn apply<K>(
        &self,
        api: &Api<K>,
        resource: &str,
        object: &K,
    ) -> Result<Option<K>, RuntimeError>
    where
        K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch(&name, &params, &Patch::Apply(object)).await {
            Ok(written) => Ok(Some(written)),
            Err(e) if status_code(&e) == Some(409) => Ok(None),
            Err(e) => Err(self.fail(e, "patch", resource, &name)),
        }
    }

    pub(super) fn fail(
        &self,
        e: kube::Error,
        verb: &str,
        resource: &str,
        name: &str,
    ) -> RuntimeError {
        api_failure(e, verb, resource, name, &self.namespace)
    }

    /// Deletes the named object if it exists and is this session's; returns its uid.
    #[tracing::instrument(name = "kubernetes delete", skip_all, fields(otel.kind = "client", resource = %resource, name = %name))]
    pub(super) async fn delete_if_ours<K>(
        &self,
        api: &Api<K>,
        resource: &str,
        session: &str,
        name: &str,
        propagation: PropagationPolicy,
    ) -> Result<Option<String>, RuntimeError>
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        for _ in 0..WRITE_ATTEMPTS {
            let existing = match api.get_opt(name).await {
                Ok(Some(existing)) => existing,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e, "get", resource, name)),
            };
            if !is_ours(existing.meta(), session) {
                return Err(RuntimeError::permanent(format!(
                    "{resource} {}/{name} does not belong to session {session}; refusing to delete it",
                    self.namespace
                )));
            }
            let uid = existing.meta().uid.clone();
            let params = DeleteParams {
                propagation_policy: Some(propagation.clone()),
                // Only the object we inspected: never a same-named successor.
                preconditions: Some(Preconditions {
                    uid: uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => return Ok(uid),
                Err(e) if status_code(&e) == Some(404) => return Ok(None),
                // The uid precondition failed: it was replaced; look again.
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => return Err(self.fail(e, "delete", resource, name)),
            }
        }
        Err(RuntimeError::retryable(format!(
            "{resource} {}/{name} kept changing while being deleted",
            self.namespace
        )))
    }

    /// The session's Deployment as the API server has it now: refused when absent, not
    /// the session's, or being deleted (a stop is under way).
    pub(super) async fn live_deployment(&self, session: &str) -> Result<Deployment, RuntimeError> {
        let deployment = match self.deployments.get_opt(session).await {
            Ok(Some(d)) => d,
            Ok(None) => return Err(unknown_session(session)),
            Err(e) => return Err(self.fail(e, "get", "deployments", session)),
        };
        if !is_ours(&deployment.metadata, session) {
            return Err(RuntimeError::permanent(format!(
                "deployment {}/{session} does not belong to session {session}",
                self.namespace
            )));
        }
        if deployment.metadata.deletion_timestamp.is_some() {
            return Err(RuntimeError::permanent(format!(
                "session {session} is being stopped"
            )));
        }
        Ok(deployment)
    }

    /// Sets the Deployment's replicas through `/scale`, on the version just read, so a
    /// concurrent change is noticed (409) and the decision re-made on fresh data.
    #[tracing::instrument(name = "kubernetes scale", skip(self), fields(otel.kind = "client"))]
    pub(super) async fn scale(&self, session: &str, to: i32) -> Result<Deployment, RuntimeError> {
        for _ in 0..WRITE_ATTEMPTS {
            let deployment = self.live_deployment(session).await?;
            if replicas(&deployment) == to {
                return Ok(deployment);
            }
            let patch = json!({
                "metadata": {"resourceVersion": deployment.metadata.resource_version},
                "spec": {"replicas": to},
            });
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match self
                .deployments
                .patch_scale(session, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let mut scaled = deployment;
                    if let Some(spec) = scaled.spec.as_mut() {
                        spec.replicas = Some(to);
                    }
                    return Ok(scaled);
                }
                Err(e) if status_code(&e) == Some(409) => continue,
                Err(e) if status_code(&e) == Some(404) => return Err(unknown_session(session)),
                Err(e) => return Err(self.fail(e, "patch", "deployments/scale", session)),
            }
        }
        Err(RuntimeError::retryable(format!(
            "deployment {}/{session} kept changing while being scaled",
            self.namespace
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart_by_the_api_servers_words() {
        let quota = r#"pods "s-1-abc" is forbidden: exceeded quota: compute, requested: limits.memory=2Gi, used: limits.memory=3Gi, limited: limits.memory=4Gi"#;
        let webhook = r#"admission webhook "images.policy.example" denied the request: image x is not allowed"#;
        let pss = r#"pods "s-1-abc" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true"#;
        let rbac = r#"services "s-1" is forbidden: User "system:serviceaccount:streamspace:streamspace-agent" cannot create resource "services" in API group "" in the namespace "sessions""#;
        assert_eq!(refusal_of(quota), Refusal::Quota);
        assert_eq!(refusal_of(webhook), Refusal::Admission);
        assert_eq!(refusal_of(pss), Refusal::Admission);
        assert_eq!(refusal_of(rbac), Refusal::Rbac);
        assert_eq!(denied_verb(rbac), Some("create"));
        assert_eq!(denied_verb(quota), None);
    }
}
