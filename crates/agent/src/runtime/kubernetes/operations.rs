//! The four operations — start, stop, hibernate, wake — and inventory.
//!
//! Start and wake write the Deployment whole with server-side apply, from the session's
//! `StartSession` (kept on the Deployment) and the template as it is now, so a changed
//! template reaches a session the next time it wakes; a running session is never
//! re-applied (that would restart its pod). A start or wake that fails leaves the
//! Deployment at zero replicas, marked failed: it stops pulling or crash-looping and
//! gives its quota back, and a retry applies it again.

use super::*;

pub(super) fn unknown_session(session: &str) -> RuntimeError {
    RuntimeError::permanent(format!("no session {session} runs on this agent"))
}

impl Inner {
    pub(super) fn template(&self, name: &str) -> Result<&KubeTemplate, RuntimeError> {
        self.catalog.get(name).ok_or_else(|| {
            RuntimeError::permanent(format!(
                "unknown template {name:?} (this agent has: {})",
                self.catalog.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub(super) fn template_of(&self, deployment: &Deployment) -> Option<&KubeTemplate> {
        let name = deployment
            .metadata
            .annotations
            .as_ref()?
            .get("streamspace.io/template")?;
        self.catalog.get(name)
    }

    pub(super) fn ready_timeout_of(&self, deployment: &Deployment) -> Duration {
        Duration::from_millis(
            self.template_of(deployment)
                .map_or(DEFAULT_READY_TIMEOUT_MS, |t| t.ready_timeout_ms),
        )
    }

    pub(super) async fn start(
        &self,
        session: &str,
        spec: &StartSession,
    ) -> Result<Observation, RuntimeError> {
        let template = self.template(&spec.template)?;
        if spec.home_volume || template.home_volume {
            self.ensure_home(session, spec, template).await?;
        }
        for _ in 0..WRITE_ATTEMPTS {
            let existing = match self.deployments.get_opt(session).await {
                Ok(existing) => existing,
                Err(e) => return Err(self.fail(e, "get", "deployments", session)),
            };
            let password = match &existing {
                None => None,
                Some(d) if !is_ours(&d.metadata, session) => {
                    return Err(RuntimeError::permanent(format!(
                        "deployments {}/{session} already exists and does not belong to session {session} (labels {:?}); refusing to adopt it",
                        self.namespace,
                        d.metadata.labels.clone().unwrap_or_default()
                    )));
                }
                Some(d) if d.metadata.deletion_timestamp.is_some() => {
                    // A stop of this session is still finishing: let it, then start afresh.
                    let uid = d.metadata.uid.clone().unwrap_or_default();
                    self.wait_deployment_gone(session, &uid).await?;
                    continue;
                }
                // Create-or-get: a session that runs (or starts, or hibernates) is
                // returned as it is; only a failed start is applied again.
                Some(d) if failure_of(d).is_none() => {
                    return self.settle_existing(session, d).await;
                }
                Some(d) => template
                    .password_env
                    .as_ref()
                    .and_then(|var| env_of(d, var)),
            };
            let wanted = self.deployment_for(session, spec, template, password);
            let expected = existing.and_then(|d| d.metadata.resource_version);
            if let Some(observation) = self
                .apply_and_run_up(session, wanted, expected, template.ready_timeout_ms)
                .await?
            {
                return Ok(observation);
            }
        }
        Err(RuntimeError::retryable(format!(
            "deployment {}/{session} kept changing while being started",
            self.namespace
        )))
    }

    /// A start that found the session's Deployment in place: its Service, then its state.
    async fn settle_existing(
        &self,
        session: &str,
        deployment: &Deployment,
    ) -> Result<Observation, RuntimeError> {
        self.ensure_service(session, deployment).await?;
        let uid = deployment.metadata.uid.clone().unwrap_or_default();
        if replicas(deployment) == 0 {
            // Wait until the cache has it, so the next operation reads what we saw.
            self.wait_until(self.operation_timeout, || async {
                Ok(self
                    .cached_deployment(session)
                    .filter(|d| d.metadata.uid.as_deref() == Some(uid.as_str()))
                    .map(|_| ()))
            })
            .await?;
            return Ok(Observation::new(session, SessionState::Hibernated));
        }
        let generation = deployment.metadata.generation.unwrap_or(0);
        self.wait_ready(session, &uid, generation, self.ready_timeout_of(deployment))
            .await
    }

    /// Applies `wanted` (at one replica; conditional on `expected`, the version it was
    /// decided on, when given), ensures its Service, and waits until it is ready. `None`
    /// when the Deployment changed since it was read: decide again. A failure applies
    /// `wanted` once more at zero replicas, marked failed.
    async fn apply_and_run_up(
        &self,
        session: &str,
        mut wanted: Deployment,
        expected: Option<String>,
        ready_timeout_ms: u64,
    ) -> Result<Option<Observation>, RuntimeError> {
        wanted.metadata.resource_version = expected;
        let written = self
            .apply(&self.deployments, "deployments", &wanted)
            .await?;
        wanted.metadata.resource_version = None;
        let Some(written) = written else {
            return Ok(None);
        };
        let uid = written.metadata.uid.clone().unwrap_or_default();
        let generation = written.metadata.generation.unwrap_or(0);
        let result = match self.ensure_service(session, &written).await {
            Ok(()) => {
                self.wait_ready(
                    session,
                    &uid,
                    generation,
                    Duration::from_millis(ready_timeout_ms),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            let failed = Inner::failed_deployment(wanted, &e.message);
            // Best effort: when even this fails, the retry (or the stop) cleans up.
            if let Err(release) = self.apply(&self.deployments, "deployments", &failed).await {
                tracing::warn!(session, error = %release.message, "could not scale a failed session to zero");
            }
        }
        result.map(Some)
    }

    /// Deletes the Service, the Deployment and — unless a retention keeps it — the home
    /// volume, and waits until they are gone.
    pub(super) async fn stop(
        &self,
        session: &str,
        spec: &StopSession,
    ) -> Result<Observation, RuntimeError> {
        // The Service first: it is the Deployment's dependent, so deleting the Deployment
        // first would leave its removal to the garbage collector's timing, and whether
        // this agent ever deletes a Service would depend on a race.
        self.delete_if_ours(
            &self.services,
            "services",
            session,
            session,
            PropagationPolicy::Foreground,
        )
        .await?;
        let deployment_uid = self
            .delete_if_ours(
                &self.deployments,
                "deployments",
                session,
                session,
                PropagationPolicy::Foreground,
            )
            .await?;
        if let Some(uid) = deployment_uid {
            self.wait_deployment_gone(session, &uid).await?;
        }
        if spec.delete_home || self.home_retention.is_zero() {
            self.delete_home(session).await?;
        } else {
            self.retain_home(session).await?;
        }
        Ok(Observation::new(session, SessionState::Stopped))
    }

    pub(super) async fn hibernate(&self, session: &str) -> Result<Observation, RuntimeError> {
        let deployment = self.scale(session, 0).await?;
        let uid = deployment.metadata.uid.clone().unwrap_or_default();
        // Hibernated means consuming nothing: wait until no pod of the session runs.
        let done = self
            .wait_until(self.operation_timeout, || async {
                let scaled = self.cached_deployment(session).is_some_and(|d| {
                    d.metadata.uid.as_deref() == Some(uid.as_str()) && replicas(&d) == 0
                });
                let running = self
                    .cached_pods(session)
                    .iter()
                    .any(|p| !matches!(pod_phase(p), "Failed" | "Succeeded"));
                Ok((scaled && !running).then_some(()))
            })
            .await?;
        match done {
            Some(()) => Ok(Observation::new(session, SessionState::Hibernated)),
            None => Err(RuntimeError::retryable(format!(
                "session {session}'s pods still run {:?} after scaling to zero",
                self.operation_timeout
            ))),
        }
    }

    /// Scales the session up again. A Deployment that carries its `StartSession` is
    /// applied whole from the current template (so template changes land now); one made
    /// by an older agent is scaled through `/scale`.
    pub(super) async fn wake(&self, session: &str) -> Result<Observation, RuntimeError> {
        for _ in 0..WRITE_ATTEMPTS {
            let deployment = self.live_deployment(session).await?;
            if replicas(&deployment) > 0 && failure_of(&deployment).is_none() {
                // Already up (a repeated wake): never re-applied, that would restart it.
                return self.settle_existing(session, &deployment).await;
            }
            let spec = start_spec_of(&deployment);
            let Some((spec, template)) =
                spec.and_then(|s| self.catalog.get(&s.template).map(|t| (s, t)))
            else {
                let scaled = self.scale(session, 1).await?;
                let uid = scaled.metadata.uid.clone().unwrap_or_default();
                let generation = scaled.metadata.generation.unwrap_or(0);
                return self
                    .wait_ready(session, &uid, generation, self.ready_timeout_of(&scaled))
                    .await;
            };
            let password = template
                .password_env
                .as_ref()
                .and_then(|var| env_of(&deployment, var));
            let wanted = self.deployment_for(session, &spec, template, password);
            let expected = deployment.metadata.resource_version.clone();
            if let Some(observation) = self
                .apply_and_run_up(session, wanted, expected, template.ready_timeout_ms)
                .await?
            {
                return Ok(observation);
            }
        }
        Err(RuntimeError::retryable(format!(
            "deployment {}/{session} kept changing while being woken",
            self.namespace
        )))
    }

    /// The sessions in the cluster: from the watch caches while both are synced and
    /// healthy (heartbeats cost the API server nothing), else from the API server.
    pub(super) async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        let watches_ok = !self
            .watch_failing
            .iter()
            .any(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        if watches_ok && self.caches_ready() {
            let pods = self.pod_cache.state();
            return Ok(self
                .deployment_cache
                .state()
                .iter()
                .filter_map(|d| {
                    let session = session_of(&d.metadata)?;
                    let own: Vec<&Pod> = pods
                        .iter()
                        .map(|p| p.as_ref())
                        .filter(|p| is_ours(&p.metadata, session))
                        .collect();
                    Some(self.observe(session, Some(d), &own))
                })
                .collect());
        }
        let params = ListParams::default().labels(SESSION_SELECTOR);
        let deployments = self
            .deployments
            .list(&params)
            .await
            .map_err(|e| self.fail(e, "list", "deployments", SESSION_SELECTOR))?;
        let pods = self
            .pods
            .list(&params)
            .await
            .map_err(|e| self.fail(e, "list", "pods", SESSION_SELECTOR))?;
        Ok(deployments
            .items
            .iter()
            .filter_map(|d| {
                let session = session_of(&d.metadata)?;
                let own: Vec<&Pod> = pods
                    .items
                    .iter()
                    .filter(|p| is_ours(&p.metadata, session))
                    .collect();
                Some(self.observe(session, Some(d), &own))
            })
            .collect())
    }
}
