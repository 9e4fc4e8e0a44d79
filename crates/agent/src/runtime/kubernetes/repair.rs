//! The session's Service, and keeping it: made (or repaired) with server-side apply at
//! every start and wake, and re-applied whenever the watch shows it missing or changed
//! while its Deployment lives — someone's `kubectl delete service` is undone within a
//! watch event, not at the next start.

use super::*;

/// The longest pause between attempts to repair one session's Service.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(300);
const REPAIR_BACKOFF_FIRST: Duration = Duration::from_secs(2);

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.uid == uid))
}

/// The parts of a Service the runtime decides: its selector and its ports' names and
/// numbers.
type Shape = (Option<BTreeMap<String, String>>, Vec<(Option<String>, i32)>);

/// What `service` is in the parts the runtime decides, for comparing with what should be.
fn shape(service: &Service) -> Shape {
    let spec = service.spec.as_ref();
    let selector = spec.and_then(|s| s.selector.clone());
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .map(|ports| ports.iter().map(|p| (p.name.clone(), p.port)).collect())
        .unwrap_or_default();
    (selector, ports)
}

impl Inner {
    fn cached_service(&self, session: &str) -> Option<Arc<Service>> {
        self.service_cache
            .get(&ObjectRef::new(session).within(&self.namespace))
    }

    /// Whether `service` is the one `owner` should have: not being deleted, owned by
    /// it, selecting and exposing what the runtime wrote.
    fn service_fits(&self, session: &str, owner: &Deployment, service: &Service) -> bool {
        let uid = owner.metadata.uid.as_deref().unwrap_or_default();
        service.metadata.deletion_timestamp.is_none()
            && owned_by(&service.metadata, uid)
            && shape(service) == shape(&self.service_for(session, owner))
    }

    /// Makes the session's Service what `owner` (its Deployment) needs: applies it, after
    /// removing one left by an earlier Deployment of the session (being collected, or
    /// owned by a uid that is gone). Refuses a Service that is not the session's.
    pub(super) async fn ensure_service(
        &self,
        session: &str,
        owner: &Deployment,
    ) -> Result<(), RuntimeError> {
        let owner_uid = owner.metadata.uid.clone().unwrap_or_default();
        for _ in 0..WRITE_ATTEMPTS {
            let existing = match self.services.get_opt(session).await {
                Ok(existing) => existing,
                Err(e) => return Err(self.fail(e, "get", "services", session)),
            };
            if let Some(service) = &existing {
                if !is_ours(&service.metadata, session) {
                    return Err(RuntimeError::permanent(format!(
                        "services {}/{session} already exists and does not belong to session {session} (labels {:?}); refusing to adopt it",
                        self.namespace,
                        service.metadata.labels.clone().unwrap_or_default()
                    )));
                }
                if service.metadata.deletion_timestamp.is_some()
                    || !owned_by(&service.metadata, &owner_uid)
                {
                    // An earlier Deployment's: it goes with that one; make ours afresh.
                    let uid = service.metadata.uid.clone().unwrap_or_default();
                    if service.metadata.deletion_timestamp.is_none() {
                        self.delete_if_ours(
                            &self.services,
                            "services",
                            session,
                            session,
                            PropagationPolicy::Background,
                        )
                        .await?;
                    }
                    self.wait_service_gone(session, &uid).await?;
                    continue;
                }
            }
            let mut wanted = self.service_for(session, owner);
            wanted.metadata.resource_version = existing.and_then(|s| s.metadata.resource_version);
            if self
                .apply(&self.services, "services", &wanted)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(RuntimeError::retryable(format!(
            "service {}/{session} kept changing while being applied",
            self.namespace
        )))
    }

    async fn wait_service_gone(&self, session: &str, uid: &str) -> Result<(), RuntimeError> {
        let gone = self
            .wait_until(self.operation_timeout, || async {
                match self.services.get_opt(session).await {
                    Ok(Some(s)) if s.metadata.uid.as_deref() == Some(uid) => Ok(None),
                    Ok(_) => Ok(Some(())),
                    Err(e) => Err(self.fail(e, "get", "services", session)),
                }
            })
            .await?;
        gone.ok_or_else(|| {
            RuntimeError::retryable(format!(
                "service {}/{session} still exists {:?} after its deletion",
                self.namespace, self.operation_timeout
            ))
        })
    }

    /// Sessions, not being worked on, whose live Deployment lacks the Service it should
    /// have — by the caches, and only while every watch is synced and healthy.
    fn drifted(&self) -> Vec<String> {
        let healthy = !self
            .watch_failing
            .iter()
            .any(|f| f.load(std::sync::atomic::Ordering::Relaxed));
        let services_ready =
            futures_util::FutureExt::now_or_never(self.service_cache.wait_until_ready())
                .is_some_and(|r| r.is_ok());
        if !healthy || !services_ready || !self.caches_ready() {
            return Vec::new();
        }
        let busy = lock(&self.busy);
        self.deployment_cache
            .state()
            .iter()
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .filter_map(|d| {
                let session = session_of(&d.metadata)?;
                if busy.0.contains_key(session) {
                    return None;
                }
                let fits = self
                    .cached_service(session)
                    .is_some_and(|s| self.service_fits(session, d, &s));
                (!fits).then(|| session.to_owned())
            })
            .collect()
    }

    /// Starts a repair for each drifted session that has none running.
    pub(super) fn repair_drift(self: &Arc<Self>) {
        let drifted = self.drifted();
        if drifted.is_empty() {
            return;
        }
        let mut repairing = lock(&self.repairing);
        for session in drifted {
            if repairing.insert(session.clone()) {
                tokio::spawn(repair(self.clone(), session));
            }
        }
    }
}

/// Re-applies one session's Service until it fits or its Deployment is gone, backing
/// off between failed attempts (an RBAC denial must not become a request storm).
async fn repair(inner: Arc<Inner>, session: String) {
    let mut backoff = REPAIR_BACKOFF_FIRST;
    loop {
        let still = inner.drifted().contains(&session);
        let owner = inner.cached_deployment(&session);
        let (true, Some(owner)) = (still, owner) else {
            break;
        };
        tracing::warn!(
            session,
            "the session's Service is missing or changed; applying it again"
        );
        match inner.ensure_service(&session, &owner).await {
            Ok(()) => {
                inner
                    .services_repaired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            Err(e) => {
                tracing::warn!(session, error = %e.message, retry_in = ?backoff, "repairing the session's Service failed");
                // A pause between attempts, not a wait for an event.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REPAIR_BACKOFF_MAX);
            }
        }
    }
    lock(&inner.repairing).remove(&session);
}
