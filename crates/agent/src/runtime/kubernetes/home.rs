//! A session's home volume (`{id}-home`): made before its Deployment, kept through
//! hibernation, and at stop deleted — or kept for `home_retention_secs`, marked with
//! the time it may go, and deleted by a sweep after that.

use chrono::{DateTime, Utc};

use super::*;

impl Inner {
    /// Makes the session's home volume claim unless it exists; adopts one that is the
    /// session's, waits out one that is being deleted, refuses anyone else's.
    pub(super) async fn ensure_home(
        &self,
        session: &str,
        spec: &StartSession,
        template: &KubeTemplate,
    ) -> Result<(), RuntimeError> {
        let wanted = self.claim_for(session, spec, template);
        let name = format!("{session}-home");
        for _ in 0..WRITE_ATTEMPTS {
            match self.claims.get_opt(&name).await {
                Ok(None) => {
                    // A claim's spec is (mostly) immutable: it is applied only to create it.
                    if self
                        .apply(&self.claims, "persistentvolumeclaims", &wanted)
                        .await?
                        .is_some()
                    {
                        return Ok(());
                    }
                }
                Ok(Some(claim)) if !is_ours(&claim.metadata, session) => {
                    return Err(RuntimeError::permanent(format!(
                        "persistentvolumeclaims {}/{name} already exists and does not belong to session {session}; refusing to adopt it",
                        self.namespace
                    )));
                }
                Ok(Some(claim)) if claim.metadata.deletion_timestamp.is_some() => {
                    let uid = claim.metadata.uid.clone().unwrap_or_default();
                    self.wait_claim_gone(&name, &uid).await?;
                }
                Ok(Some(_)) => return Ok(()),
                Err(e) => return Err(self.fail(e, "get", "persistentvolumeclaims", &name)),
            }
        }
        Err(RuntimeError::retryable(format!(
            "persistentvolumeclaim {}/{name} kept changing while being created",
            self.namespace
        )))
    }

    /// Deletes the session's home volume claim, if any, and waits until it is gone.
    pub(super) async fn delete_home(&self, session: &str) -> Result<(), RuntimeError> {
        let name = format!("{session}-home");
        let uid = self
            .delete_if_ours(
                &self.claims,
                "persistentvolumeclaims",
                session,
                &name,
                PropagationPolicy::Background,
            )
            .await?;
        match uid {
            Some(uid) => self.wait_claim_gone(&name, &uid).await,
            None => Ok(()),
        }
    }

    /// Marks the session's home volume claim, if any, with the time it may be deleted.
    pub(super) async fn retain_home(&self, session: &str) -> Result<(), RuntimeError> {
        let name = format!("{session}-home");
        let retention =
            chrono::Duration::from_std(self.home_retention).unwrap_or(chrono::Duration::MAX);
        let until = Utc::now()
            .checked_add_signed(retention)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let patch = json!({"metadata": {"annotations": {
            ANNOTATION_DELETE_AFTER: until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }}});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        match self.claims.get_opt(&name).await {
            Ok(Some(claim)) if is_ours(&claim.metadata, session) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(self.fail(e, "get", "persistentvolumeclaims", &name)),
        }
        match self
            .claims
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.fail(e, "patch", "persistentvolumeclaims", &name)),
        }
    }

    /// Waits until the claim `uid` is gone: a claim in use is held by its protection
    /// finalizer until its pod is gone.
    async fn wait_claim_gone(&self, name: &str, uid: &str) -> Result<(), RuntimeError> {
        let gone = self
            .wait_until(self.operation_timeout, || async {
                match self.claims.get_opt(name).await {
                    Ok(Some(c)) if c.metadata.uid.as_deref() == Some(uid) => Ok(None),
                    Ok(_) => Ok(Some(())),
                    Err(e) => Err(self.fail(e, "get", "persistentvolumeclaims", name)),
                }
            })
            .await?;
        gone.ok_or_else(|| {
            RuntimeError::retryable(format!(
                "persistentvolumeclaim {}/{name} still exists {:?} after its deletion",
                self.namespace, self.operation_timeout
            ))
        })
    }

    /// Deletes every retained home volume whose time has come and whose session has no
    /// Deployment. Returns how many it deleted.
    pub(super) async fn sweep_homes(&self) -> usize {
        if !self.caches_ready() {
            return 0;
        }
        let now = Utc::now();
        let expired: Vec<(String, String)> = self
            .claim_cache
            .state()
            .iter()
            .filter_map(|claim| {
                let session = session_of(&claim.metadata)?;
                let after = claim
                    .metadata
                    .annotations
                    .as_ref()?
                    .get(ANNOTATION_DELETE_AFTER)?;
                let after = DateTime::parse_from_rfc3339(after).ok()?;
                let due = after <= now
                    && claim.metadata.deletion_timestamp.is_none()
                    && self.cached_deployment(session).is_none();
                due.then(|| (session.to_owned(), claim.name_any()))
            })
            .collect();
        let mut deleted = 0;
        for (session, name) in expired {
            if lock(&self.busy).0.contains_key(&session) {
                continue;
            }
            match self
                .delete_if_ours(
                    &self.claims,
                    "persistentvolumeclaims",
                    &session,
                    &name,
                    PropagationPolicy::Background,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(session, claim = %name, "deleted a home volume whose retention ended");
                    deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(session, claim = %name, error = %e.message, "could not delete a home volume whose retention ended");
                }
            }
        }
        deleted
    }
}

/// How often the sweep looks: a quarter of the retention, between 1 s and a minute.
pub(super) fn sweep_interval(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs [`Inner::sweep_homes`] every [`sweep_interval`] while the runtime lives.
pub(super) async fn sweep_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(sweep_interval(inner.home_retention));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        inner.sweep_homes().await;
    }
}
