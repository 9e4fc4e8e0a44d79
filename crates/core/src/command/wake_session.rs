//! `wake_session`: bring a hibernated session back (scale to one, wait until ready).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeSession {}
