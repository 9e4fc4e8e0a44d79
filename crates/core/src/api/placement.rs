//! Placement: which agent a new session goes to.
//!
//! The least-loaded *online* agent that matches the caller's optional cluster and region
//! and has room (`max_sessions`). An offline agent is eligible only when the caller names
//! its cluster: the start command then waits in the queue until the agent returns.
//! Placements are serialised by a transaction-scoped advisory lock, so sessions created in
//! parallel see each other's load instead of all landing on the same agent.

use std::time::Duration;

use sqlx::PgConnection;

use crate::error::{Error, Result};

/// Advisory lock key that serialises placements ("STRPLC" in ASCII).
const PLACEMENT_LOCK: i64 = 0x5354_5250_4c43;

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
/// the placement lock until it ends). [`Error::NoEligibleAgent`] when none qualifies.
pub async fn agent_choose(
    conn: &mut PgConnection,
    placement: &Placement,
    offline_after: Duration,
) -> Result<String> {
    sqlx::query!(
        r#"SELECT 1 AS "locked!" FROM pg_advisory_xact_lock($1)"#,
        PLACEMENT_LOCK
    )
    .fetch_one(&mut *conn)
    .await?;
    let chosen = sqlx::query_scalar!(
        r#"
        SELECT a.agent_id
        FROM agents a
        CROSS JOIN LATERAL (
            SELECT count(*) AS active FROM sessions s
            WHERE s.agent_id = a.agent_id AND s.state NOT IN ('terminated', 'failed')
        ) load
        CROSS JOIN LATERAL (
            SELECT (a.connected_owner IS NOT NULL
                    AND a.last_heartbeat_at > now() - make_interval(secs => $3)) AS online
        ) live
        WHERE ($1::text IS NULL OR a.cluster = $1)
          AND ($2::text IS NULL OR a.region = $2)
          AND (a.max_sessions IS NULL OR load.active < a.max_sessions)
          AND (live.online OR $1::text IS NOT NULL)
        ORDER BY live.online DESC, load.active, a.agent_id
        LIMIT 1
        "#,
        placement.cluster,
        placement.region,
        offline_after.as_secs_f64(),
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(agent_id) = chosen {
        return Ok(agent_id);
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
