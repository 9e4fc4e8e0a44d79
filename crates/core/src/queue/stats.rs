//! What is queued right now, for `/metrics`: open commands by agent and status, and how
//! long the oldest pending one of each agent has waited — the two numbers that show a
//! stalled agent before its users do.

use sqlx::PgPool;

use crate::Result;

/// Open commands of one agent in one status.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueDepth {
    pub agent_id: String,
    /// `pending`, `sent` or `ack`.
    pub status: String,
    pub commands: i64,
    /// Seconds since the oldest of them was accepted (`pending` only; 0 otherwise).
    pub oldest_pending_age_seconds: f64,
}

/// Open commands by agent and status. Reads only open rows (the partial index on
/// them), so its cost follows the backlog, not the history.
pub async fn queue_depth(pool: &PgPool) -> Result<Vec<QueueDepth>> {
    Ok(sqlx::query_as!(
        QueueDepth,
        r#"
        SELECT agent_id AS "agent_id!", status AS "status!", count(*)::int8 AS "commands!",
               CASE WHEN status = 'pending'
                    THEN extract(epoch FROM now() - min(created_at))::float8
                    ELSE 0 END AS "oldest_pending_age_seconds!"
        FROM agent_commands
        WHERE status IN ('pending', 'sent', 'ack')
        GROUP BY agent_id, status
        ORDER BY agent_id, status
        "#
    )
    .fetch_all(pool)
    .await?)
}
