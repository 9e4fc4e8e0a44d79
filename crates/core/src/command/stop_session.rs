//! `stop_session`: remove the session's workload (delete-if-exists).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopSession {
    /// Delete the session's home volume at once, whatever the agent's retention
    /// (`kubernetes.home_retention_secs`; with none, a stop deletes it anyway).
    #[serde(default)]
    pub delete_home: bool,
}
