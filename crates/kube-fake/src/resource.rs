//! The resource types the stand-in serves, and how each is named on the wire.

use std::fmt;

/// One of the resource types the stand-in models. Anything else answers 404, as a real
/// API server does for a resource it does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Deployment,
    Service,
    PersistentVolumeClaim,
    Pod,
    ResourceQuota,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Deployment,
        ResourceKind::Service,
        ResourceKind::PersistentVolumeClaim,
        ResourceKind::Pod,
        ResourceKind::ResourceQuota,
    ];

    /// The API group: `apps` or the empty core group.
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "apps",
            _ => "",
        }
    }

    /// `apiVersion` as written in objects: `apps/v1` or `v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "apps/v1",
            _ => "v1",
        }
    }

    /// The resource name in paths and RBAC rules, e.g. `deployments`.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "deployments",
            ResourceKind::Service => "services",
            ResourceKind::PersistentVolumeClaim => "persistentvolumeclaims",
            ResourceKind::Pod => "pods",
            ResourceKind::ResourceQuota => "resourcequotas",
        }
    }

    /// The `kind` field, e.g. `Deployment`.
    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Deployment => "Deployment",
            ResourceKind::Service => "Service",
            ResourceKind::PersistentVolumeClaim => "PersistentVolumeClaim",
            ResourceKind::Pod => "Pod",
            ResourceKind::ResourceQuota => "ResourceQuota",
        }
    }

    /// `deployments.apps` or `services`: how error messages name the resource.
    pub fn qualified_plural(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// `Deployment.apps` or `Service`: how validation errors name the kind.
    pub fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.kind().to_owned(),
            group => format!("{}.{group}", self.kind()),
        }
    }

    /// Looks a resource up by the `(group, version, plural)` of a request path.
    pub fn from_path(group: &str, version: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.group() == group && version == "v1" && k.plural() == plural)
    }

    /// Looks a resource up by `(apiVersion, kind)` as written in owner references.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}
