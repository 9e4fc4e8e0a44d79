//! The agent registry: agents, their credentials, and the one source of truth for
//! liveness (the live connection's epoch plus the last heartbeat).
//!
//! "Online" is never stored. It is derived: an agent is online when a dispatcher holds its
//! stream (`connected_owner`) and its last heartbeat is younger than the offline bound.
//! Every connection gets a new `connection_epoch`; heartbeats and the disconnect clean-up
//! are fenced by it, so a stale connection's clean-up can never mark the new connection
//! offline (the original system's bug).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};

use crate::config::Secret;
use crate::error::{Error, Result};

/// Prefix of agent credentials, so a leaked token is recognisable (and scannable).
pub const CREDENTIAL_PREFIX: &str = "ssa_";

/// An agent with its derived status.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AgentRecord {
    pub agent_id: String,
    pub cluster: String,
    pub region: String,
    pub created_at: DateTime<Utc>,
    pub connection_epoch: i64,
    pub connected_owner: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub disconnected_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub agent_version: Option<String>,
    pub max_sessions: Option<i32>,
    /// Derived: connected and heartbeating within the offline bound.
    pub online: bool,
    /// Sessions assigned to the agent that are not terminated or failed.
    pub active_sessions: i64,
}

/// A new agent to register.
#[derive(Clone, Debug)]
pub struct NewAgent {
    pub agent_id: String,
    pub cluster: String,
    pub region: String,
    pub max_sessions: Option<i32>,
}

/// A freshly issued credential. The token is shown once and stored only as a hash.
#[derive(Clone, Debug)]
pub struct IssuedCredential {
    pub credential_id: String,
    pub agent_id: String,
    pub token: Secret<String>,
}

/// The identity proven by a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub credential_id: String,
}

/// What the agent said about itself when connecting.
#[derive(Clone, Debug, Default)]
pub struct ConnectInfo {
    pub agent_version: String,
    pub capabilities: serde_json::Value,
}

/// Whether `agent_id` is a valid agent name: lower-case letters, digits and dashes,
/// starting with a letter or digit, at most 63 characters (a DNS label, as the schema
/// enforces).
pub fn valid_agent_id(agent_id: &str) -> bool {
    let b = agent_id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Registers an agent.
pub async fn agent_create(exec: impl PgExecutor<'_>, new: &NewAgent) -> Result<()> {
    if !valid_agent_id(&new.agent_id) {
        return Err(Error::InvalidInput(format!(
            "agent id {:?} must be 1-63 lower-case letters, digits or dashes, starting with a letter or digit",
            new.agent_id
        )));
    }
    let inserted = sqlx::query!(
        r#"
        INSERT INTO agents (agent_id, cluster, region, max_sessions)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (agent_id) DO NOTHING
        "#,
        new.agent_id,
        new.cluster,
        new.region,
        new.max_sessions,
    )
    .execute(exec)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::Conflict(format!(
            "agent {} already exists",
            new.agent_id
        )));
    }
    Ok(())
}

/// Issues a new credential for `agent_id`. The plain token is in the result only.
pub async fn credential_issue(
    exec: impl PgExecutor<'_>,
    agent_id: &str,
) -> Result<IssuedCredential> {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    let credential_id = format!("cred-{}", hex::encode(id));
    let token = format!("{CREDENTIAL_PREFIX}{}", hex::encode(secret));
    let inserted = sqlx::query!(
        r#"
        INSERT INTO agent_credentials (credential_id, agent_id, token_sha256)
        SELECT $1, agent_id, $3 FROM agents WHERE agent_id = $2
        "#,
        credential_id,
        agent_id,
        hash_token(&token),
    )
    .execute(exec)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Error::NotFound(format!("agent {agent_id}")));
    }
    Ok(IssuedCredential {
        credential_id,
        agent_id: agent_id.to_owned(),
        token: Secret::new(token),
    })
}

/// Revokes a credential; connections using it are refused from now on.
pub async fn credential_revoke(
    exec: impl PgExecutor<'_>,
    agent_id: &str,
    credential_id: &str,
) -> Result<()> {
    let done = sqlx::query!(
        r#"
        UPDATE agent_credentials SET revoked_at = coalesce(revoked_at, now())
        WHERE agent_id = $1 AND credential_id = $2
        "#,
        agent_id,
        credential_id,
    )
    .execute(exec)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound(format!(
            "credential {credential_id} of agent {agent_id}"
        )));
    }
    Ok(())
}

/// Whether credential `credential_id` is still valid (exists and is not revoked): a live
/// connection made with it checks on each heartbeat, so a revocation ends it.
pub async fn credential_active(exec: impl PgExecutor<'_>, credential_id: &str) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM agent_credentials WHERE credential_id = $1 AND revoked_at IS NULL) AS "active!""#,
        credential_id,
    )
    .fetch_one(exec)
    .await?)
}

/// The agent a bearer token belongs to, if the token is known and not revoked.
pub async fn agent_authenticate(pool: &PgPool, token: &str) -> Result<Option<AgentIdentity>> {
    if !token.starts_with(CREDENTIAL_PREFIX) {
        return Ok(None);
    }
    let row = sqlx::query!(
        r#"
        UPDATE agent_credentials SET last_used_at = now()
        WHERE token_sha256 = $1 AND revoked_at IS NULL
        RETURNING agent_id, credential_id
        "#,
        hash_token(token),
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| AgentIdentity {
        agent_id: r.agent_id,
        credential_id: r.credential_id,
    }))
}

/// Records a new connection of `agent_id` held by `owner` and returns its epoch. Any older
/// connection is fenced from here on: its heartbeats and clean-up no longer match.
pub async fn agent_connect(
    pool: &PgPool,
    agent_id: &str,
    owner: &str,
    info: &ConnectInfo,
) -> Result<i64> {
    let epoch = sqlx::query_scalar!(
        r#"
        UPDATE agents
        SET connection_epoch = connection_epoch + 1, connected_owner = $2,
            connected_at = now(), last_heartbeat_at = now(), agent_version = $3,
            capabilities = $4, updated_at = now()
        WHERE agent_id = $1
        RETURNING connection_epoch
        "#,
        agent_id,
        owner,
        info.agent_version,
        info.capabilities,
    )
    .fetch_optional(pool)
    .await?;
    epoch.ok_or_else(|| Error::NotFound(format!("agent {agent_id}")))
}

/// Records a heartbeat of the connection `epoch`. `false`: that connection has been
/// superseded (or closed) and must stop.
pub async fn agent_heartbeat(pool: &PgPool, agent_id: &str, epoch: i64) -> Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE agents SET last_heartbeat_at = now()
        WHERE agent_id = $1 AND connection_epoch = $2 AND connected_owner IS NOT NULL
        "#,
        agent_id,
        epoch,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// What recording a connection's heartbeat found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beat {
    Recorded,
    /// A newer connection of the agent exists (nothing was written).
    Superseded,
    /// The credential the connection was made with is revoked.
    Revoked,
}

/// [`agent_heartbeat`] and [`credential_active`] in one statement while all is well, so an
/// idle connection costs one transaction per heartbeat; a second statement tells
/// superseded from revoked only when the first wrote nothing.
pub async fn agent_heartbeat_checked(
    pool: &PgPool,
    agent_id: &str,
    epoch: i64,
    credential_id: &str,
) -> Result<Beat> {
    let done = sqlx::query!(
        r#"
        UPDATE agents SET last_heartbeat_at = now()
        WHERE agent_id = $1 AND connection_epoch = $2 AND connected_owner IS NOT NULL
          AND EXISTS (SELECT 1 FROM agent_credentials
                      WHERE credential_id = $3 AND revoked_at IS NULL)
        "#,
        agent_id,
        epoch,
        credential_id,
    )
    .execute(pool)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(Beat::Recorded);
    }
    Ok(if agent_heartbeat(pool, agent_id, epoch).await? {
        Beat::Revoked
    } else {
        Beat::Superseded
    })
}

/// Marks the connection `epoch` closed. A no-op (returns `false`) when a newer connection
/// exists, so an old stream's clean-up never takes down the new one.
pub async fn agent_disconnect(pool: &PgPool, agent_id: &str, epoch: i64) -> Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE agents SET connected_owner = NULL, disconnected_at = now(), updated_at = now()
        WHERE agent_id = $1 AND connection_epoch = $2 AND connected_owner IS NOT NULL
        "#,
        agent_id,
        epoch,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks the connection held by `owner` closed, whatever its epoch: the undo of a
/// handshake that failed after (or while) recording its connect — including a connect
/// that committed but whose reply was lost, whose epoch the caller never learned. Owners
/// are unique per connection, so this never touches another connection.
pub async fn agent_disconnect_owner(pool: &PgPool, agent_id: &str, owner: &str) -> Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE agents SET connected_owner = NULL, disconnected_at = now(), updated_at = now()
        WHERE agent_id = $1 AND connected_owner = $2
        "#,
        agent_id,
        owner,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Every agent with its derived status, by id.
pub async fn agent_list(
    exec: impl PgExecutor<'_>,
    offline_after: Duration,
) -> Result<Vec<AgentRecord>> {
    Ok(sqlx::query_as!(
        AgentRecord,
        r#"
        SELECT a.agent_id, a.cluster, a.region, a.created_at, a.connection_epoch,
               a.connected_owner, a.connected_at, a.disconnected_at, a.last_heartbeat_at,
               a.agent_version, a.max_sessions,
               (a.connected_owner IS NOT NULL
                AND a.last_heartbeat_at > now() - make_interval(secs => $1)) AS "online!",
               (SELECT count(*) FROM sessions s
                WHERE s.agent_id = a.agent_id
                  AND s.state NOT IN ('terminated', 'failed')) AS "active_sessions!"
        FROM agents a
        ORDER BY a.agent_id
        "#,
        secs(offline_after),
    )
    .fetch_all(exec)
    .await?)
}

/// One agent with its derived status.
pub async fn agent_get(
    exec: impl PgExecutor<'_>,
    agent_id: &str,
    offline_after: Duration,
) -> Result<Option<AgentRecord>> {
    Ok(sqlx::query_as!(
        AgentRecord,
        r#"
        SELECT a.agent_id, a.cluster, a.region, a.created_at, a.connection_epoch,
               a.connected_owner, a.connected_at, a.disconnected_at, a.last_heartbeat_at,
               a.agent_version, a.max_sessions,
               (a.connected_owner IS NOT NULL
                AND a.last_heartbeat_at > now() - make_interval(secs => $2)) AS "online!",
               (SELECT count(*) FROM sessions s
                WHERE s.agent_id = a.agent_id
                  AND s.state NOT IN ('terminated', 'failed')) AS "active_sessions!"
        FROM agents a
        WHERE a.agent_id = $1
        "#,
        agent_id,
        secs(offline_after),
    )
    .fetch_optional(exec)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_follow_the_schema_rule() {
        for ok in ["a", "agent-1", "0cluster", &"a".repeat(63)] {
            assert!(valid_agent_id(ok), "{ok}");
        }
        for bad in ["", "-a", "Agent", "a_b", "a b", &"a".repeat(64)] {
            assert!(!valid_agent_id(bad), "{bad}");
        }
    }
}
