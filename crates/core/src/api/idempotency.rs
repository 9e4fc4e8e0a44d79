//! Stored first answers for `Idempotency-Key` retries (table `api_idempotency`).
//!
//! The key is claimed in the same transaction as the change it guards, before the
//! change is made: a concurrent request with the same key waits on the claim and then
//! finds the committed answer; a failed request rolls the claim back with everything
//! else, so its retry runs afresh. Keys are scoped per user.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};

use crate::error::Result;

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use of the key: do the work, then [`idempotency_store`] the answer.
    Fresh,
    /// The key answered this very request before: return this answer, change nothing.
    Replay(serde_json::Value),
    /// The key was used for a different request.
    Mismatch,
}

/// A digest of an operation and its parameters; the same key must come with the same one.
pub fn request_fingerprint(operation: &str, params: &impl serde::Serialize) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(operation.as_bytes());
    hash.update([0]);
    // Plain data structs always serialise; a failure would only make retries mismatch.
    hash.update(serde_json::to_vec(params).unwrap_or_default());
    hash.finalize().into()
}

/// Claims `key` for `user_id` inside the caller's transaction (see the module docs).
pub async fn idempotency_claim(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    fingerprint: &[u8; 32],
) -> Result<IdempotencyClaim> {
    let claimed = sqlx::query!(
        r#"
        INSERT INTO api_idempotency (user_id, idempotency_key, request_sha256, response)
        VALUES ($1, $2, $3, 'null'::jsonb)
        ON CONFLICT (user_id, idempotency_key) DO NOTHING
        "#,
        user_id,
        key,
        fingerprint.as_slice(),
    )
    .execute(&mut *conn)
    .await?;
    if claimed.rows_affected() == 1 {
        return Ok(IdempotencyClaim::Fresh);
    }
    let row = sqlx::query!(
        r#"
        SELECT request_sha256, response FROM api_idempotency
        WHERE user_id = $1 AND idempotency_key = $2
        "#,
        user_id,
        key,
    )
    .fetch_one(&mut *conn)
    .await?;
    if row.request_sha256 != fingerprint.as_slice() {
        return Ok(IdempotencyClaim::Mismatch);
    }
    Ok(IdempotencyClaim::Replay(row.response))
}

/// Records the answer of a [`IdempotencyClaim::Fresh`] key, in the same transaction.
pub async fn idempotency_store(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
    response: &serde_json::Value,
) -> Result<()> {
    sqlx::query!(
        r#"
        UPDATE api_idempotency SET response = $3
        WHERE user_id = $1 AND idempotency_key = $2
        "#,
        user_id,
        key,
        response,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Forgets answers older than `retention`, at most `limit` per call. Returns how many.
pub async fn idempotency_prune(pool: &PgPool, retention: Duration, limit: i64) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        DELETE FROM api_idempotency
        WHERE (user_id, idempotency_key) IN (
            SELECT user_id, idempotency_key FROM api_idempotency
            WHERE created_at < now() - make_interval(secs => $1)
            LIMIT $2)
        "#,
        retention.as_secs_f64(),
        limit,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_separate_operations_and_parameters() {
        let a = request_fingerprint("stop", &"s-1");
        assert_eq!(a, request_fingerprint("stop", &"s-1"));
        assert_ne!(a, request_fingerprint("stop", &"s-2"));
        assert_ne!(a, request_fingerprint("wake", &"s-1"));
    }
}
