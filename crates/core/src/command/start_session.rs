//! `start_session`: create the session's workload from a template.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartSession {
    /// Template name from the agent's catalog, e.g. `firefox-browser`.
    pub template: String,
    /// Owner of the session, for labels and audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Overrides of the template's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Ask for a persistent home volume (`{session}-home`) even when the template does
    /// not give its sessions one (Kubernetes templates do by default).
    #[serde(default)]
    pub home_volume: bool,
    /// Extra environment for the session workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Kubernetes-style resource quantities, e.g. `512Mi` and `250m`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}
