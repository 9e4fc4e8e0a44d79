//! Placement: which agent a new session goes to.
//!
//! The least-loaded *online* agent that matches the caller's optional cluster and region
//! and has room (`max_sessions`). An offline agent is eligible only when the caller names
//! its cluster: the start command then waits in the queue until the agent returns.
//!
//! Placements do not wait for each other: a create reads the agents' loads as committed
//! and picks, so creates in parallel may land on the same least-loaded agent (a spread of
//! a few sessions, corrected by the next sequential creates). Only a *capacity* needs
//! serialising: when the chosen agent has `max_sessions`, the create takes that agent's
//! transaction lock and counts again, so no two creates can both take its last place.
//! (Before, every create in the system queued behind one global lock held through its
//! commit's fsync.)
//!
//! The choice itself is the SQL function `streamspace_placement` (migration 8), so the
//! session create can choose and insert in one statement while the rules stay written
//! once; this module adds the capacity lock and the errors.

use std::time::Duration;

use sqlx::PgConnection;

use crate::error::{Error, Result};

/// Advisory lock class of an agent's capacity (with `hashtext(agent_id)` as the key).
const CAPACITY_LOCK_CLASS: i32 = 21326;

/// How many full agents a create passes over before it gives up.
const MAX_PLACEMENT_TRIES: usize = 8;

/// Where the caller wants the session; `None` means any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub cluster: Option<String>,
    pub region: Option<String>,
}

impl Placement {
    fn describe(&self) -> String {
        format!(
            "cluster {} and region {}",
            self.cluster.as_deref().unwrap_or("(any)"),
            self.region.as_deref().unwrap_or("(any)")
        )
    }
}

/// Chooses the agent for a new session, inside the caller's transaction (which then holds
/// the chosen agent's capacity lock, if it has a capacity, until it ends).
/// [`Error::NoEligibleAgent`] when none qualifies.
pub async fn agent_choose(
    conn: &mut PgConnection,
    placement: &Placement,
    offline_after: Duration,
) -> Result<String> {
    let mut full: Vec<String> = Vec::new();
    while full.len() < MAX_PLACEMENT_TRIES {
        let Some(chosen) = sqlx::query!(
            r#"
            SELECT agent_id AS "agent_id!", max_sessions
            FROM streamspace_placement($1, $2, $3, $4)
            "#,
            placement.cluster,
            placement.region,
            offline_after.as_secs_f64(),
            &full,
        )
        .fetch_optional(&mut *conn)
        .await?
        else {
            break;
        };
        let Some(max) = chosen.max_sessions else {
            return Ok(chosen.agent_id);
        };
        // The last places of a capped agent: count again under its lock, so concurrent
        // creates take them one at a time. Two statements: the count's snapshot must be
        // taken after the lock is granted, to see what the previous holder committed.
        sqlx::query!(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            CAPACITY_LOCK_CLASS,
            chosen.agent_id,
        )
        .execute(&mut *conn)
        .await?;
        let room = sqlx::query_scalar!(
            r#"
            SELECT count(*) < $2::int4 AS "room!" FROM sessions
            WHERE agent_id = $1 AND state NOT IN ('terminated', 'failed')
            "#,
            chosen.agent_id,
            max,
        )
        .fetch_one(&mut *conn)
        .await?;
        if room {
            return Ok(chosen.agent_id);
        }
        full.push(chosen.agent_id);
    }
    if placement.cluster.is_some() || placement.region.is_some() {
        // A named place where no agent exists at all is the caller's mistake, not a
        // transient shortage: waiting will not help.
        let known = sqlx::query_scalar!(
            r#"
            SELECT EXISTS (
                SELECT 1 FROM agents
                WHERE ($1::text IS NULL OR cluster = $1) AND ($2::text IS NULL OR region = $2)
            ) AS "known!"
            "#,
            placement.cluster,
            placement.region,
        )
        .fetch_one(&mut *conn)
        .await?;
        if !known {
            return Err(Error::InvalidInput(format!(
                "no agent is registered for {}; check the names (an operator lists agents at /api/v1/admin/agents)",
                placement.describe()
            )));
        }
    }
    if placement.cluster.is_some() {
        return Err(Error::NoEligibleAgent(format!(
            "every agent registered for {} is at its max_sessions; retry later",
            placement.describe()
        )));
    }
    Err(Error::NoEligibleAgent(format!(
        "no online agent with room matches {}; retry later, or name a cluster to queue the session for its agent while it is offline",
        placement.describe()
    )))
}
