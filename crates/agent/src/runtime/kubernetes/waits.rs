//! Waiting for the cluster to show an operation's result: event-driven on the watch
//! caches, with the operation's deadline as the only timer.

use super::*;

impl Inner {
    /// Re-checks `check` after every cache change until it yields, or `timeout` passes
    /// (`Ok(None)`). Never polls on a timer: the deadline is the only timer.
    pub(super) async fn wait_until<T, F, Fut>(
        &self,
        timeout: Duration,
        mut check: F,
    ) -> Result<Option<T>, RuntimeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, RuntimeError>>,
    {
        let deadline = Instant::now() + timeout;
        let mut changes = self.changed.subscribe();
        let ready = async {
            self.deployment_cache.wait_until_ready().await.is_ok()
                && self.pod_cache.wait_until_ready().await.is_ok()
        };
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(true) => {}
            Ok(false) => return Err(RuntimeError::retryable("the kubernetes watch stopped")),
            Err(_) => {
                return Err(RuntimeError::retryable(format!(
                    "the kubernetes watches of namespace {} did not sync within {timeout:?}",
                    self.namespace
                )));
            }
        }
        loop {
            // Mark before checking, so a change during the check wakes the next wait.
            changes.borrow_and_update();
            if let Some(found) = check().await? {
                return Ok(Some(found));
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(RuntimeError::retryable("the kubernetes watch stopped"));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    /// Waits until the caches show the Deployment `uid`, at `generation` or later,
    /// scaled up with a ready pod. Fails at once — permanently — when the cluster has
    /// given up on the rollout (quota, admission, progress deadline) or a container
    /// fails in a way that will not cure itself; at the deadline, with the pod's own
    /// words, retryably unless the pod's trouble is permanent.
    pub(super) async fn wait_ready(
        &self,
        session: &str,
        uid: &str,
        generation: i64,
        timeout: Duration,
    ) -> Result<Observation, RuntimeError> {
        let found = self
            .wait_until(timeout, || async {
                let Some(deployment) = self
                    .cached_deployment(session)
                    .filter(|d| d.metadata.uid.as_deref() == Some(uid))
                else {
                    return Ok(None);
                };
                let current = deployment.metadata.generation.unwrap_or(0) >= generation
                    && replicas(&deployment) > 0;
                if !current {
                    return Ok(None);
                }
                if let Some((why, permanent)) = rollout_refusal(&deployment) {
                    let message = format!("session {session} cannot start: {why}");
                    return Err(if permanent {
                        RuntimeError::permanent(message)
                    } else {
                        RuntimeError::retryable(message)
                    });
                }
                let pods = self.cached_pods(session);
                if let PodView::Failing {
                    pod,
                    reason,
                    message,
                } = pod_view(pods.iter().map(|p| p.as_ref()))
                    && PERMANENT_REASONS.contains(&reason.as_str())
                {
                    return Err(RuntimeError::permanent(format!(
                        "session {session} cannot start: pod {pod}: {reason}: {message}"
                    )));
                }
                let obs = self.observe_cached(session);
                Ok((obs.state == SessionState::Running).then_some(obs))
            })
            .await?;
        if let Some(obs) = found {
            return Ok(obs);
        }
        // Fail with the pod's own words, as `kubectl describe` would show them.
        let pods = self.cached_pods(session);
        let (why, permanent) = match pod_view(pods.iter().map(|p| p.as_ref())) {
            PodView::Failing {
                pod,
                reason,
                message,
            } => {
                let permanent = PERMANENT_REASONS.contains(&reason.as_str());
                (format!("pod {pod}: {reason}: {message}"), permanent)
            }
            PodView::Pending { pod, detail } => (
                format!(
                    "pod {pod}: {}",
                    detail.unwrap_or_else(|| "not ready".into())
                ),
                false,
            ),
            PodView::Ready { pod, .. } => (format!("pod {pod} became ready too late"), false),
            PodView::None => ("no pod was created".to_owned(), false),
        };
        let message = format!("session {session} not ready within {timeout:?}: {why}");
        Err(if permanent {
            RuntimeError::permanent(message)
        } else {
            RuntimeError::retryable(message)
        })
    }

    /// Waits until the Deployment `uid` is gone from the API and from the cache.
    pub(super) async fn wait_deployment_gone(
        &self,
        session: &str,
        uid: &str,
    ) -> Result<(), RuntimeError> {
        let gone = self
            .wait_until(self.operation_timeout, || async {
                let cached = self
                    .cached_deployment(session)
                    .is_some_and(|d| d.metadata.uid.as_deref() == Some(uid));
                if cached {
                    return Ok(None);
                }
                match self.deployments.get_opt(session).await {
                    Ok(Some(d)) if d.metadata.uid.as_deref() == Some(uid) => Ok(None),
                    Ok(_) => Ok(Some(())),
                    Err(e) => Err(self.fail(e, "get", "deployments", session)),
                }
            })
            .await?;
        gone.ok_or_else(|| {
            RuntimeError::retryable(format!(
                "deployment {}/{session} still exists {:?} after its deletion",
                self.namespace, self.operation_timeout
            ))
        })
    }
}
