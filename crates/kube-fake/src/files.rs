//! Files in a pod's volumes, so tests can prove what survives what: a path under a
//! `persistentVolumeClaim` mount lives in the claim (by its uid, so it outlives pods and
//! goes with the claim), a path under any other volume's mount lives with the pod, and
//! any other path is the container's own filesystem, gone with the pod. Only the pod's
//! first container is looked at: session pods have one.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::resource::ResourceKind;
use crate::store::{Store, uid_of};
use crate::{Error, Result};

/// Where a file lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Place {
    /// In a claim, by its uid: the path inside the volume.
    Claim { uid: String, path: String },
    /// In something that goes with the pod (by its uid): a non-claim volume
    /// (`volume:NAME`) or the container's filesystem (`container:NAME`).
    Pod {
        uid: String,
        scope: String,
        path: String,
    },
}

#[derive(Debug, Default)]
pub(crate) struct FileStore {
    files: HashMap<Place, Vec<u8>>,
}

impl FileStore {
    /// Forgets the files of pods and claims that no longer exist.
    pub fn retain(&mut self, pods: &HashSet<String>, claims: &HashSet<String>) {
        self.files.retain(|place, _| match place {
            Place::Claim { uid, .. } => claims.contains(uid),
            Place::Pod { uid, .. } => pods.contains(uid),
        });
    }
}

/// `/a/./b/` → `/a/b`; refuses relative paths and `..`.
fn normalize(path: &str) -> Result<String> {
    let invalid = |reason: &str| Error::InvalidPath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !path.starts_with('/') {
        return Err(invalid("must be absolute"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(invalid("must not contain ..")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(invalid("names a directory"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Where `path` of the running pod's first container lives.
fn locate(store: &Store, namespace: &str, pod_name: &str, path: &str) -> Result<Place> {
    let path = normalize(path)?;
    let key = (ResourceKind::Pod, namespace.to_owned(), pod_name.to_owned());
    let pod = store.get(&key).ok_or_else(|| Error::PodNotFound {
        namespace: namespace.to_owned(),
        name: pod_name.to_owned(),
    })?;
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending");
    if phase != "Running" {
        return Err(Error::PodNotRunning {
            namespace: namespace.to_owned(),
            name: pod_name.to_owned(),
            phase: phase.to_owned(),
        });
    }
    let pod_uid = uid_of(pod).to_owned();
    let container = pod.pointer("/spec/containers/0").unwrap_or(&Value::Null);
    // The deepest mount containing the path wins, as in a mount table.
    let mount = container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let at = normalize(m.get("mountPath")?.as_str()?).ok()?;
            let rest = path.strip_prefix(&at)?.strip_prefix('/')?.to_owned();
            Some((at.len(), m, rest))
        })
        .max_by_key(|(len, _, _)| *len);
    let Some((_, mount, rest)) = mount else {
        let name = container["name"].as_str().unwrap_or_default();
        return Ok(Place::Pod {
            uid: pod_uid,
            scope: format!("container:{name}"),
            path,
        });
    };
    let volume_name = mount["name"].as_str().unwrap_or_default();
    let inner = match mount.get("subPath").and_then(Value::as_str) {
        Some(sub) if !sub.is_empty() => format!("{}/{rest}", sub.trim_matches('/')),
        _ => rest,
    };
    let volume = pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume_name);
    let claim = volume
        .and_then(|v| v.pointer("/persistentVolumeClaim/claimName"))
        .and_then(Value::as_str);
    match claim {
        Some(claim) => {
            let key = (
                ResourceKind::PersistentVolumeClaim,
                namespace.to_owned(),
                claim.to_owned(),
            );
            let pvc = store.get(&key).ok_or_else(|| Error::ClaimNotFound {
                namespace: namespace.to_owned(),
                name: claim.to_owned(),
            })?;
            Ok(Place::Claim {
                uid: uid_of(pvc).to_owned(),
                path: inner,
            })
        }
        None => Ok(Place::Pod {
            uid: pod_uid,
            scope: format!("volume:{volume_name}"),
            path: inner,
        }),
    }
}

pub(crate) fn write(
    store: &mut Store,
    namespace: &str,
    pod: &str,
    path: &str,
    contents: &[u8],
) -> Result<()> {
    let place = locate(store, namespace, pod, path)?;
    store.files.files.insert(place, contents.to_vec());
    Ok(())
}

pub(crate) fn read(
    store: &Store,
    namespace: &str,
    pod: &str,
    path: &str,
) -> Result<Option<Vec<u8>>> {
    let place = locate(store, namespace, pod, path)?;
    Ok(store.files.files.get(&place).cloned())
}

/// Every file of a claim, by path inside the volume; for tests of the store itself.
#[cfg(test)]
fn claim_files(store: &Store, uid: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    store
        .files
        .files
        .iter()
        .filter_map(|(place, bytes)| match place {
            Place::Claim { uid: u, path } if u == uid => Some((path.clone(), bytes.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeConfig;
    use serde_json::json;

    fn store_with_pod() -> Store {
        let mut store = Store::new(FakeConfig::default(), 100);
        store.insert(
            ResourceKind::PersistentVolumeClaim,
            json!({"metadata": {"name": "home", "namespace": "ns", "uid": "claim-1"}}),
        );
        store.insert(
            ResourceKind::Pod,
            json!({"metadata": {"name": "p", "namespace": "ns", "uid": "pod-1"},
                   "spec": {"containers": [{"name": "c", "volumeMounts": [
                        {"name": "home", "mountPath": "/config"},
                        {"name": "cache", "mountPath": "/config/cache"},
                        {"name": "sub", "mountPath": "/data", "subPath": "user"}]}],
                            "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": "home"}},
                                        {"name": "cache", "emptyDir": {}},
                                        {"name": "sub", "persistentVolumeClaim": {"claimName": "home"}}]},
                   "status": {"phase": "Running"}}),
        );
        store
    }

    #[test]
    fn paths_resolve_to_the_deepest_mount() {
        let mut store = store_with_pod();
        write(&mut store, "ns", "p", "/config/a/../b", b"x").unwrap_err();
        write(&mut store, "ns", "p", "/config/./prefs", b"1").unwrap();
        write(&mut store, "ns", "p", "/config/cache/tmp", b"2").unwrap();
        write(&mut store, "ns", "p", "/data/notes", b"3").unwrap();
        write(&mut store, "ns", "p", "/etc/hosts", b"4").unwrap();
        let home = claim_files(&store, "claim-1");
        assert_eq!(
            home.keys().collect::<Vec<_>>(),
            ["prefs", "user/notes"],
            "the emptyDir below the claim keeps its own files"
        );
        assert_eq!(
            read(&store, "ns", "p", "/config/cache/tmp")
                .unwrap()
                .as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(
            read(&store, "ns", "p", "/etc/hosts").unwrap().as_deref(),
            Some(&b"4"[..])
        );
        assert_eq!(read(&store, "ns", "p", "/etc/missing").unwrap(), None);
        assert!(matches!(
            read(&store, "ns", "gone", "/x"),
            Err(Error::PodNotFound { .. })
        ));
    }
}
