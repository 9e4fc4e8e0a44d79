//! `hibernate_session`: keep the session but stop it consuming compute (scale to zero).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HibernateSession {}
