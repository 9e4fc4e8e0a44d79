//! Enqueue: inside the caller's transaction, so a session change and its command commit
//! together or not at all.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{CommandQueue, DEFAULT_MAX_ATTEMPTS, NOTIFY_CHANNEL};
use crate::command::{CommandId, CommandKind, MAX_PAYLOAD_BYTES};
use crate::error::{Error, Result};
use crate::telemetry::{METRICS, add};

/// A command to accept into the queue.
#[derive(Clone, Debug)]
pub struct NewCommand {
    pub command_id: CommandId,
    pub agent_id: String,
    pub session_id: Option<String>,
    pub kind: CommandKind,
    pub max_attempts: i32,
    /// Retrying an enqueue with the same key returns the first command and creates none.
    pub idempotency_key: Option<String>,
    /// A command still undelivered at this time fails with a reason instead of running late.
    pub expires_at: Option<DateTime<Utc>>,
    /// W3C `traceparent` of the request that created the command.
    pub trace_context: Option<String>,
}

impl NewCommand {
    /// A command with a fresh id and default limits.
    pub fn new(agent_id: impl Into<String>, session_id: Option<String>, kind: CommandKind) -> Self {
        Self {
            command_id: CommandId::generate(),
            agent_id: agent_id.into(),
            session_id,
            kind,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            idempotency_key: None,
            expires_at: None,
            trace_context: None,
        }
    }

    fn validate(&self, payload: &serde_json::Value) -> Result<()> {
        if self.max_attempts < 1 {
            return Err(Error::InvalidInput(format!(
                "max_attempts must be at least 1, got {}",
                self.max_attempts
            )));
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 255)
        {
            return Err(Error::InvalidInput(
                "idempotency key must be 1-255 bytes".into(),
            ));
        }
        let size = payload.to_string().len();
        if size > MAX_PAYLOAD_BYTES {
            return Err(Error::InvalidInput(format!(
                "payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}"
            )));
        }
        Ok(())
    }
}

/// The outcome of an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub command_id: CommandId,
    pub seq: i64,
    pub created_at: DateTime<Utc>,
    /// False when an earlier enqueue with the same idempotency key is returned instead.
    pub created: bool,
}

impl CommandQueue {
    /// Accepts `cmd` within the caller's transaction and announces it to the dispatchers
    /// (the notification is delivered only if the transaction commits).
    /// A span of its own (`enqueue command`), a child of the request that accepts it.
    #[tracing::instrument(name = "enqueue command", skip_all, fields(agent_id = %cmd.agent_id, session_id = cmd.session_id.as_deref().unwrap_or("")))]
    pub async fn command_enqueue(conn: &mut PgConnection, cmd: &NewCommand) -> Result<Enqueued> {
        let payload = cmd.kind.payload();
        cmd.validate(&payload)?;
        let inserted = sqlx::query!(
            r#"
            -- The session's order lock is taken before the row, and so its `seq`, is
            -- formed: a session's commands are numbered in the order they commit
            -- (migration 6 explains the lock).
            WITH session_lock AS MATERIALIZED (
                SELECT pg_advisory_xact_lock(21325, hashtext(s))
                FROM (VALUES ($3::text)) AS v(s) WHERE s IS NOT NULL
            ),
            inserted AS (
            INSERT INTO agent_commands (command_id, agent_id, session_id, action, payload,
                                        max_attempts, idempotency_key, expires_at, trace_context)
            SELECT $1::text, $2::text, $3::text, $4::text, $5::jsonb, $6::int4, $7::text,
                   $8::timestamptz, $9::text
            WHERE (SELECT count(*) FROM session_lock) >= 0
            ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING seq, created_at
            ),
            -- The dispatchers' wake-up, in the same round trip (only for a new row).
            -- Postgres folds identical notifications of one transaction into one.
            notified AS MATERIALIZED (SELECT pg_notify($10, $2) FROM inserted)
            SELECT seq AS "seq!", created_at AS "created_at!" FROM inserted
            WHERE (SELECT count(*) FROM notified) >= 0
            "#,
            cmd.command_id.as_str(),
            cmd.agent_id,
            cmd.session_id,
            cmd.kind.action().as_str(),
            payload,
            cmd.max_attempts,
            cmd.idempotency_key,
            cmd.expires_at,
            cmd.trace_context,
            NOTIFY_CHANNEL,
        )
        .fetch_optional(&mut *conn)
        .await?;

        let Some(row) = inserted else {
            // The key was used before; `idempotency_key` is set, or there is no conflict.
            let key = cmd.idempotency_key.clone().unwrap_or_default();
            return Self::existing_for_key(conn, cmd, &payload, key).await;
        };
        add(&METRICS.commands_enqueued, 1);
        Ok(Enqueued {
            command_id: cmd.command_id.clone(),
            seq: row.seq,
            created_at: row.created_at,
            created: true,
        })
    }

    async fn existing_for_key(
        conn: &mut PgConnection,
        cmd: &NewCommand,
        payload: &serde_json::Value,
        key: String,
    ) -> Result<Enqueued> {
        let row = sqlx::query!(
            r#"
            SELECT command_id, agent_id, session_id, action, payload, seq, created_at
            FROM agent_commands WHERE idempotency_key = $1
            "#,
            key,
        )
        .fetch_one(&mut *conn)
        .await?;
        let existing: CommandId = row
            .command_id
            .parse()
            .map_err(|e| Error::InvalidInput(format!("stored command id: {e}")))?;
        let same = row.agent_id == cmd.agent_id
            && row.session_id == cmd.session_id
            && row.action == cmd.kind.action().as_str()
            && &row.payload == payload;
        if !same {
            return Err(Error::IdempotencyConflict { key, existing });
        }
        Ok(Enqueued {
            command_id: existing,
            seq: row.seq,
            created_at: row.created_at,
            created: false,
        })
    }

    /// Accepts many commands in one statement (bulk paths: imports, benchmarks, the
    /// follow-ups of the seed report). Commands keep the order of `cmds`. Idempotency keys
    /// seen before are skipped and reported with `created: false`.
    pub async fn command_enqueue_many(
        conn: &mut PgConnection,
        cmds: &[NewCommand],
    ) -> Result<Vec<Enqueued>> {
        let mut ids = Vec::with_capacity(cmds.len());
        let mut agents = Vec::with_capacity(cmds.len());
        let mut sessions: Vec<Option<String>> = Vec::with_capacity(cmds.len());
        let mut actions = Vec::with_capacity(cmds.len());
        let mut payloads = Vec::with_capacity(cmds.len());
        let mut max_attempts = Vec::with_capacity(cmds.len());
        let mut keys: Vec<Option<String>> = Vec::with_capacity(cmds.len());
        let mut expires: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(cmds.len());
        let mut traces: Vec<Option<String>> = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let payload = cmd.kind.payload();
            cmd.validate(&payload)?;
            ids.push(cmd.command_id.to_string());
            agents.push(cmd.agent_id.clone());
            sessions.push(cmd.session_id.clone());
            actions.push(cmd.kind.action().as_str().to_owned());
            payloads.push(payload);
            max_attempts.push(cmd.max_attempts);
            keys.push(cmd.idempotency_key.clone());
            expires.push(cmd.expires_at);
            traces.push(cmd.trace_context.clone());
        }
        let rows = sqlx::query!(
            r#"
            -- Every session's order lock first, in one global order (no two bulk
            -- enqueues can deadlock), before any row and its `seq` is formed.
            WITH session_locks AS MATERIALIZED (
                SELECT pg_advisory_xact_lock(21325, k.h)
                FROM (SELECT DISTINCT hashtext(s) AS h FROM UNNEST($3::text[]) AS s
                      WHERE s IS NOT NULL ORDER BY 1) AS k
            ),
            inserted AS (
            INSERT INTO agent_commands (command_id, agent_id, session_id, action, payload,
                                        max_attempts, idempotency_key, expires_at, trace_context)
            SELECT command_id, agent_id, session_id, action, payload,
                   max_attempts, idempotency_key, expires_at, trace_context
            FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                        $6::int4[], $7::text[], $8::timestamptz[], $9::text[])
                 WITH ORDINALITY AS n(command_id, agent_id, session_id, action, payload,
                                      max_attempts, idempotency_key, expires_at, trace_context, ord)
            WHERE (SELECT count(*) FROM session_locks) >= 0
            ORDER BY ord
            ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING command_id, agent_id, seq, created_at
            ),
            -- One wake-up per agent with a new row, in the same round trip.
            notified AS MATERIALIZED (
                SELECT pg_notify($10, a) FROM (SELECT DISTINCT agent_id FROM inserted) AS i(a)
            )
            SELECT command_id AS "command_id!", seq AS "seq!", created_at AS "created_at!"
            FROM inserted WHERE (SELECT count(*) FROM notified) >= 0
            "#,
            &ids,
            &agents,
            &sessions as &[Option<String>],
            &actions,
            &payloads,
            &max_attempts,
            &keys as &[Option<String>],
            &expires as &[Option<DateTime<Utc>>],
            &traces as &[Option<String>],
            NOTIFY_CHANNEL,
        )
        .fetch_all(&mut *conn)
        .await?;

        let mut created: std::collections::HashMap<String, (i64, DateTime<Utc>)> = rows
            .into_iter()
            .map(|r| (r.command_id, (r.seq, r.created_at)))
            .collect();
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            match created.remove(cmd.command_id.as_str()) {
                Some((seq, created_at)) => {
                    out.push(Enqueued {
                        command_id: cmd.command_id.clone(),
                        seq,
                        created_at,
                        created: true,
                    });
                }
                None => {
                    let key = cmd.idempotency_key.clone().unwrap_or_default();
                    out.push(Self::existing_for_key(conn, cmd, &cmd.kind.payload(), key).await?);
                }
            }
        }
        add(
            &METRICS.commands_enqueued,
            out.iter().filter(|e| e.created).count() as u64,
        );
        Ok(out)
    }
}
