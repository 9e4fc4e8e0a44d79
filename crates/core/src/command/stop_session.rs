//! `stop_session`: remove the session's workload (delete-if-exists).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopSession {
    /// Also delete the session's home volume; kept by default.
    #[serde(default)]
    pub delete_home: bool,
}
