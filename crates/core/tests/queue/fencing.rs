//! Leases and fencing tokens: a stale holder can never move a command.

use std::time::Duration;

use streamspace_core::queue::{Completion, Failure, FailureOutcome, Outcome, QueueConfig};
use streamspace_core::{CommandQueue, CommandStatus, Error};

use crate::helpers::{claim, enqueue, eventually, queue, status_of, stop};

#[tokio::test]
async fn completing_under_a_released_lease_changes_nothing_and_says_so() {
    let q = queue().await;
    let cmd = stop("agent-a", Some("s-1"));
    enqueue(&q, &cmd).await;
    let old = claim(&q, "agent-a", "conn-1", 10)
        .await
        .commands
        .remove(0)
        .lease
        .unwrap();
    q.command_ack_one(old.clone()).await.unwrap();

    let released = q.command_release_owner("conn-1").await.unwrap();
    assert_eq!(released.requeued, vec![cmd.command_id.to_string()]);
    let new = claim(&q, "agent-a", "conn-2", 10)
        .await
        .commands
        .remove(0)
        .lease
        .unwrap();
    assert_ne!(old.token, new.token);

    let err = q
        .command_complete_one(Completion {
            lease: old.clone(),
            result: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StaleLease {
                current: CommandStatus::Sent,
                ..
            }
        ),
        "distinct error naming where it stands: {err:?}"
    );
    let err = q.command_ack_one(old.clone()).await.unwrap_err();
    assert!(matches!(err, Error::StaleLease { .. }), "{err:?}");
    let out = q
        .command_fail(&[Failure {
            lease: old.clone(),
            message: "late".into(),
            retryable: false,
        }])
        .await
        .unwrap();
    assert!(matches!(out[0].1, FailureOutcome::Rejected(_)), "{out:?}");
    let record = CommandQueue::command_get(q.pool(), &cmd.command_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            record.status.as_str(),
            record.lease_token,
            record.lease_owner.as_deref()
        ),
        ("sent", Some(new.token), Some("conn-2"))
    );
    assert_eq!(record.error_message, None);

    q.command_complete_one(Completion {
        lease: new.clone(),
        result: Some(serde_json::json!({"ok": true})),
    })
    .await
    .unwrap();
    // Repeating the same report under the same lease is harmless; an old lease still isn't.
    let again = q
        .command_complete(&[Completion {
            lease: new.clone(),
            result: None,
        }])
        .await
        .unwrap();
    assert_eq!(again[0].1, Outcome::Duplicate);
    let late = q
        .command_complete(&[Completion {
            lease: old,
            result: None,
        }])
        .await
        .unwrap();
    assert!(
        matches!(&late[0].1, Outcome::Rejected(r) if r.current == Some(CommandStatus::Completed))
    );
    let record = CommandQueue::command_get(q.pool(), &cmd.command_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, "completed");
    assert_eq!(
        record.result,
        Some(serde_json::json!({"ok": true})),
        "the duplicate did not overwrite"
    );
}

#[tokio::test]
async fn rescue_takes_back_expired_leases_and_leaves_fresh_ones() {
    let pool_queue = queue().await;
    let short = CommandQueue::new(
        pool_queue.pool().clone(),
        QueueConfig {
            lease: Duration::from_millis(300),
            ..QueueConfig::default()
        },
    )
    .unwrap();
    let long = pool_queue; // default lease: 30 s
    let a = stop("agent-a", Some("s-1"));
    let b = stop("agent-b", Some("s-2"));
    enqueue(&long, &a).await;
    enqueue(&long, &b).await;
    let crashed = claim(&short, "agent-a", "dead-dispatcher", 10)
        .await
        .commands
        .remove(0)
        .lease
        .unwrap();
    let alive = claim(&long, "agent-b", "live-dispatcher", 10)
        .await
        .commands
        .remove(0)
        .lease
        .unwrap();

    let rescued = eventually(
        "the short lease to expire",
        Duration::from_secs(10),
        || async {
            let r = long.command_rescue_expired(100).await.unwrap();
            (!r.requeued.is_empty()).then_some(r)
        },
    )
    .await;
    assert_eq!(rescued.requeued, vec![a.command_id.to_string()]);
    assert!(rescued.failed.is_empty());
    assert_eq!(
        status_of(&long, b.command_id.as_str()).await.0,
        "sent",
        "fresh lease untouched"
    );
    assert_eq!(status_of(&long, a.command_id.as_str()).await.0, "pending");

    let err = long
        .command_complete_one(Completion {
            lease: crashed,
            result: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StaleLease {
                current: CommandStatus::Pending,
                ..
            }
        ),
        "{err:?}"
    );
    long.command_complete_one(Completion {
        lease: alive,
        result: None,
    })
    .await
    .unwrap();
    let again = claim(&long, "agent-a", "new-dispatcher", 10).await;
    assert_eq!(again.commands[0].command_id, a.command_id);
    assert_eq!(
        again.commands[0].attempts, 2,
        "a rescue counts the lost attempt"
    );
}

#[tokio::test]
async fn extending_keeps_a_live_connections_leases_from_being_rescued() {
    let base = queue().await;
    let q = CommandQueue::new(
        base.pool().clone(),
        QueueConfig {
            lease: Duration::from_millis(300),
            ..QueueConfig::default()
        },
    )
    .unwrap();
    enqueue(&q, &stop("agent-a", Some("s-1"))).await;
    claim(&q, "agent-a", "conn-1", 10).await;
    // Renew well inside the lease a few times, then check nothing was rescued.
    for _ in 0..5 {
        assert_eq!(q.command_lease_extend("conn-1").await.unwrap(), 1);
        assert!(
            q.command_rescue_expired(100)
                .await
                .unwrap()
                .requeued
                .is_empty()
        );
    }
    assert_eq!(q.command_lease_extend("other-conn").await.unwrap(), 0);
}

#[tokio::test]
async fn release_does_not_count_undelivered_attempts_but_counts_acknowledged_ones() {
    let q = queue().await;
    let mut cmd = stop("agent-a", Some("s-1"));
    cmd.max_attempts = 2;
    enqueue(&q, &cmd).await;

    // Sent but never acknowledged: the agent may never have seen it.
    for _ in 0..3 {
        claim(&q, "agent-a", "conn", 10).await;
        q.command_release_owner("conn").await.unwrap();
    }
    let record = CommandQueue::command_get(q.pool(), &cmd.command_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((record.status.as_str(), record.attempts), ("pending", 0));

    // Acknowledged twice, lost twice: a poison command ends instead of looping forever.
    for round in 1..=2 {
        let lease = claim(&q, "agent-a", "conn", 10)
            .await
            .commands
            .remove(0)
            .lease
            .unwrap();
        q.command_ack_one(lease).await.unwrap();
        let released = q.command_release_owner("conn").await.unwrap();
        if round == 1 {
            assert_eq!(released.requeued.len(), 1);
        } else {
            assert_eq!(released.failed, vec![cmd.command_id.to_string()]);
        }
    }
    let (status, error) = status_of(&q, cmd.command_id.as_str()).await;
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("gave up after 2 attempts"));
}
