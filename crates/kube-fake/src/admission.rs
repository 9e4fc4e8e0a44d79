//! The admission chain a create passes after validation, in the API server's order:
//! the PVC protection plugin's finalizer (mutating), then the image policy webhook the
//! stand-in pretends is installed, then ResourceQuota (validating). Pods the built-in
//! Deployment controller creates pass the same chain, so a refusal reaches the
//! Deployment as a `ReplicaFailure` condition, as on a cluster.

use serde_json::{Value, json};

use crate::quota;
use crate::resource::ResourceKind;
use crate::status::ApiError;
use crate::store::Store;

/// The finalizer the `StorageObjectInUseProtection` plugin puts on every claim, so a
/// claim in use by a pod outlives its deletion until the pod is gone.
pub(crate) const PVC_PROTECTION_FINALIZER: &str = "kubernetes.io/pvc-protection";

/// The validating webhook that refuses images matching
/// [`crate::FakeConfig::admission_deny_image_prefixes`].
pub(crate) const IMAGE_WEBHOOK: &str = "images.policy.streamspace.test";

/// Runs the chain on an object about to be created; may add to it (finalizers).
pub(crate) fn admit_create(
    store: &Store,
    kind: ResourceKind,
    namespace: &str,
    object: &mut Value,
) -> Result<(), ApiError> {
    match kind {
        ResourceKind::PersistentVolumeClaim => {
            let finalizers = object["metadata"]
                .as_object_mut()
                .map(|m| m.entry("finalizers").or_insert_with(|| json!([])));
            if let Some(Value::Array(list)) = finalizers
                && !list.iter().any(|f| f == PVC_PROTECTION_FINALIZER)
            {
                list.push(json!(PVC_PROTECTION_FINALIZER));
            }
            Ok(())
        }
        ResourceKind::Pod => {
            deny_images(store, object)?;
            quota::admit(store, namespace, object)
        }
        _ => Ok(()),
    }
}

fn deny_images(store: &Store, pod: &Value) -> Result<(), ApiError> {
    let prefixes = &store.settings.admission_deny_image_prefixes;
    let denied = ["containers", "initContainers"]
        .iter()
        .filter_map(|field| pod.pointer(&format!("/spec/{field}"))?.as_array())
        .flatten()
        .filter_map(|c| c.get("image").and_then(Value::as_str))
        .find(|image| prefixes.iter().any(|p| image.starts_with(p.as_str())));
    match denied {
        Some(image) => Err(ApiError::webhook_denied(
            IMAGE_WEBHOOK,
            &format!("image {image} is not allowed"),
        )),
        None => Ok(()),
    }
}
