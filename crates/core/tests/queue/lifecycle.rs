//! Per-session order, retries, cancel, expiry, idempotency and pruning.

use std::time::Duration;

use chrono::Utc;
use streamspace_core::command::{CommandKind, HibernateSession, WakeSession};
use streamspace_core::queue::{Completion, Failure, FailureOutcome, NewCommand, QueueConfig};
use streamspace_core::{CommandQueue, Error};

use crate::helpers::{claim, enqueue, eventually, queue, queue_with, status_of, stop};

fn ids(batch: &streamspace_core::queue::ClaimBatch) -> Vec<String> {
    batch
        .commands
        .iter()
        .map(|c| c.command_id.to_string())
        .collect()
}

#[tokio::test]
async fn a_session_delivers_one_command_at_a_time_in_acceptance_order() {
    let q = queue().await;
    let c1 = stop("agent-a", Some("s-1"));
    let c2 = NewCommand::new(
        "agent-a",
        Some("s-1".into()),
        CommandKind::HibernateSession(HibernateSession {}),
    );
    let c3 = NewCommand::new(
        "agent-a",
        Some("s-1".into()),
        CommandKind::WakeSession(WakeSession {}),
    );
    let d1 = stop("agent-a", Some("s-2"));
    let n1 = stop("agent-a", None);
    let n2 = stop("agent-a", None);
    for c in [&c1, &c2, &c3, &d1, &n1, &n2] {
        enqueue(&q, c).await;
    }
    let other_agent = stop("agent-b", Some("s-9"));
    enqueue(&q, &other_agent).await;

    let first = claim(&q, "agent-a", "conn", 100).await;
    let expected: Vec<String> = [&c1, &d1, &n1, &n2]
        .iter()
        .map(|c| c.command_id.to_string())
        .collect();
    assert_eq!(
        ids(&first),
        expected,
        "session heads and session-less commands, oldest first"
    );
    assert!(
        claim(&q, "agent-a", "conn", 100).await.commands.is_empty(),
        "s-1 waits for c1"
    );

    let lease = first.commands[0].lease.clone().unwrap();
    q.command_complete_one(Completion {
        lease,
        result: None,
    })
    .await
    .unwrap();
    let next = claim(&q, "agent-a", "conn", 100).await;
    assert_eq!(ids(&next), vec![c2.command_id.to_string()]);
    assert!(matches!(
        next.commands[0].kind,
        CommandKind::HibernateSession(_)
    ));
}

#[tokio::test]
async fn retryable_failures_back_off_then_give_up_after_max_attempts() {
    let q = queue_with(QueueConfig {
        retry_base: Duration::from_millis(300),
        retry_cap: Duration::from_millis(600),
        ..QueueConfig::default()
    })
    .await;
    let mut cmd = stop("agent-a", Some("s-1"));
    cmd.max_attempts = 3;
    enqueue(&q, &cmd).await;

    for attempt in 1..=3 {
        let batch = eventually(
            "the command to be due again",
            Duration::from_secs(10),
            || async {
                let b = claim(&q, "agent-a", "conn", 10).await;
                (!b.commands.is_empty()).then_some(b)
            },
        )
        .await;
        let c = &batch.commands[0];
        assert_eq!(c.attempts, attempt);
        let failed_at = Utc::now();
        let out = q
            .command_fail(&[Failure {
                lease: c.lease.clone().unwrap(),
                message: "image pull backoff".into(),
                retryable: true,
            }])
            .await
            .unwrap();
        match (&out[0].1, attempt) {
            (FailureOutcome::Retrying { next_attempt_at }, 1 | 2) => {
                // Backoff with jitter: at least half of base * 2^(attempt-1), capped.
                let min = Duration::from_millis((300u64 << (attempt - 1)).min(600) / 2);
                let waited = (*next_attempt_at - failed_at).to_std().unwrap_or_default();
                assert!(
                    waited >= min - Duration::from_millis(50),
                    "attempt {attempt}: {waited:?} < {min:?}"
                );
                assert!(
                    claim(&q, "agent-a", "conn", 10).await.commands.is_empty(),
                    "not due yet"
                );
                let (status, error) = status_of(&q, cmd.command_id.as_str()).await;
                assert_eq!(status, "pending");
                assert!(error.unwrap().contains("will retry: image pull backoff"));
            }
            (FailureOutcome::Failed, 3) => {}
            (other, n) => panic!("attempt {n}: unexpected {other:?}"),
        }
    }
    let (status, error) = status_of(&q, cmd.command_id.as_str()).await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some("gave up after 3 attempts: image pull backoff")
    );
}

#[tokio::test]
async fn a_permanent_failure_is_final_at_once() {
    let q = queue().await;
    let cmd = stop("agent-a", Some("s-1"));
    enqueue(&q, &cmd).await;
    let c = claim(&q, "agent-a", "conn", 10).await.commands.remove(0);
    let out = q
        .command_fail(&[Failure {
            lease: c.lease.unwrap(),
            message: "template not found".into(),
            retryable: false,
        }])
        .await
        .unwrap();
    assert_eq!(out[0].1, FailureOutcome::Failed);
    assert_eq!(
        status_of(&q, cmd.command_id.as_str()).await,
        ("failed".into(), Some("template not found".into()))
    );
}

#[tokio::test]
async fn cancel_withdraws_a_pending_command_and_unblocks_its_session() {
    let q = queue().await;
    let start = stop("agent-a", Some("s-1"));
    let after = stop("agent-a", Some("s-1"));
    enqueue(&q, &start).await;
    enqueue(&q, &after).await;

    let mut conn = q.pool().acquire().await.unwrap();
    CommandQueue::command_cancel(
        &mut conn,
        &start.command_id,
        "session stopped before start was sent",
    )
    .await
    .unwrap();
    assert_eq!(
        status_of(&q, start.command_id.as_str()).await.0,
        "cancelled"
    );
    let again = CommandQueue::command_cancel(&mut conn, &start.command_id, "again")
        .await
        .unwrap_err();
    assert!(
        matches!(again, Error::InvalidTransition { .. }),
        "{again:?}"
    );

    let batch = claim(&q, "agent-a", "conn", 10).await;
    assert_eq!(
        ids(&batch),
        vec![after.command_id.to_string()],
        "the cancelled command is never delivered"
    );
    let in_flight = CommandQueue::command_cancel(&mut conn, &after.command_id, "too late")
        .await
        .unwrap_err();
    assert!(
        in_flight
            .to_string()
            .contains("only pending commands can be cancelled"),
        "{in_flight}"
    );
    let missing =
        CommandQueue::command_cancel(&mut conn, &"cmd-doesnotexist".parse().unwrap(), "x")
            .await
            .unwrap_err();
    assert!(matches!(missing, Error::CommandNotFound(_)), "{missing:?}");
}

#[tokio::test]
async fn an_expired_command_fails_with_a_reason_instead_of_running_late() {
    let q = queue().await;
    let mut late = stop("agent-a", Some("s-1"));
    late.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
    let mut fresh = stop("agent-a", Some("s-2"));
    fresh.expires_at = Some(Utc::now() + chrono::Duration::hours(1));
    enqueue(&q, &late).await;
    enqueue(&q, &fresh).await;

    let batch = claim(&q, "agent-a", "conn", 10).await;
    assert_eq!(
        ids(&batch),
        vec![fresh.command_id.to_string()],
        "expired command not delivered"
    );
    let expired = q.command_expire().await.unwrap();
    assert_eq!(expired, vec![late.command_id.to_string()]);
    let (status, error) = status_of(&q, late.command_id.as_str()).await;
    assert_eq!(status, "failed");
    assert!(error.unwrap().starts_with("expired at "), "reason given");
}

#[tokio::test]
async fn enqueue_with_a_known_idempotency_key_returns_the_first_command() {
    let q = queue().await;
    let mut first = stop("agent-a", Some("s-1"));
    first.idempotency_key = Some("user-1:req-42".into());
    let mut retry = first.clone();
    retry.command_id = streamspace_core::CommandId::generate();

    let mut conn = q.pool().acquire().await.unwrap();
    let a = CommandQueue::command_enqueue(&mut conn, &first)
        .await
        .unwrap();
    let b = CommandQueue::command_enqueue(&mut conn, &retry)
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.command_id, b.command_id);
    let rows: (i64,) = sqlx::query_as("SELECT count(*) FROM agent_commands")
        .fetch_one(q.pool())
        .await
        .unwrap();
    assert_eq!(rows.0, 1, "no second row");

    let mut different = stop("agent-a", Some("s-other"));
    different.idempotency_key = first.idempotency_key.clone();
    let err = CommandQueue::command_enqueue(&mut conn, &different)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::IdempotencyConflict { .. }), "{err:?}");

    let mut bulk_repeat = first.clone();
    bulk_repeat.command_id = streamspace_core::CommandId::generate();
    let bulk_new = stop("agent-a", Some("s-2"));
    let out = CommandQueue::command_enqueue_many(&mut conn, &[bulk_repeat, bulk_new.clone()])
        .await
        .unwrap();
    assert_eq!((out[0].created, &out[0].command_id), (false, &a.command_id));
    assert_eq!(
        (out[1].created, &out[1].command_id),
        (true, &bulk_new.command_id)
    );
}

#[tokio::test]
async fn enqueue_and_session_change_commit_together_or_not_at_all() {
    let q = queue().await;
    let cmd = stop("agent-a", Some("s-1"));
    let mut tx = q.pool().begin().await.unwrap();
    CommandQueue::command_enqueue(&mut tx, &cmd).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(
        CommandQueue::command_get(q.pool(), &cmd.command_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(claim(&q, "agent-a", "conn", 10).await.commands.is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    let q = queue().await;
    let mut conn = q.pool().acquire().await.unwrap();
    let mut zero = stop("agent-a", None);
    zero.max_attempts = 0;
    let err = CommandQueue::command_enqueue(&mut conn, &zero)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
    let mut huge = NewCommand::new(
        "agent-a",
        None,
        CommandKind::StartSession(streamspace_core::command::StartSession {
            template: "x".repeat(70 * 1024),
            user_id: None,
            resources: None,
            home_volume: false,
            env: Default::default(),
        }),
    );
    huge.max_attempts = 1;
    let err = CommandQueue::command_enqueue(&mut conn, &huge)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("the limit is"), "{err}");
    let err = q
        .command_claim(streamspace_core::queue::ClaimParams {
            agent_id: "agent-a",
            owner: "c",
            limit: 0,
            epoch: None,
            pipeline_depth: 1,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)));
    let rows: (i64,) = sqlx::query_as("SELECT count(*) FROM agent_commands")
        .fetch_one(q.pool())
        .await
        .unwrap();
    assert_eq!(rows.0, 0);
}

#[tokio::test]
async fn prune_removes_old_terminal_rows_only() {
    let q = queue().await;
    let done = stop("agent-a", Some("s-1"));
    let waiting = stop("agent-a", Some("s-2"));
    enqueue(&q, &done).await;
    let c = claim(&q, "agent-a", "conn", 1).await.commands.remove(0);
    q.command_complete_one(Completion {
        lease: c.lease.unwrap(),
        result: None,
    })
    .await
    .unwrap();
    enqueue(&q, &waiting).await;

    assert_eq!(
        q.command_prune(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0,
        "too recent"
    );
    let pruned = eventually(
        "the completed row to age past a 1ms retention",
        Duration::from_secs(5),
        || async {
            let n = q
                .command_prune(Duration::from_millis(1), 100)
                .await
                .unwrap();
            (n > 0).then_some(n)
        },
    )
    .await;
    assert_eq!(pruned, 1);
    assert!(
        CommandQueue::command_get(q.pool(), &done.command_id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        CommandQueue::command_get(q.pool(), &waiting.command_id)
            .await
            .unwrap()
            .is_some()
    );
}
