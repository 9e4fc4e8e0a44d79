//! Leases and fencing tokens: a stale holder can never move a command.

use std::time::Duration;

use streamspace_core::queue::{Completion, Failure, FailureOutcome, Outcome, QueueConfig};
use streamspace_core::{CommandQueue, CommandStatus, Error};

use crate::helpers::{claim, claim_as, connect, enqueue, eventually, queue, status_of, stop};

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
    assert!(
        released.requeued.is_empty(),
        "an acknowledged command stays leased: the agent may still run it"
    );
    // The agent's next connection takes it back.
    let conn2 = connect(&q, "agent-a", "conn-2").await;
    let released = q
        .command_release_superseded("agent-a", conn2.epoch, conn2.owner, &[])
        .await
        .unwrap();
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
    let lease = claim(&q, "agent-a", "conn-1", 10).await.commands[0]
        .lease
        .clone()
        .unwrap();
    let held = [(lease.command_id.to_string(), lease.token)];
    // Renew well inside the lease a few times, then check nothing was rescued.
    for _ in 0..5 {
        assert_eq!(q.command_lease_extend("conn-1", &held).await.unwrap(), 1);
        assert!(
            q.command_rescue_expired(100)
                .await
                .unwrap()
                .requeued
                .is_empty()
        );
    }
    assert_eq!(
        q.command_lease_extend("other-conn", &held).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn only_the_leases_a_connection_names_are_renewed_so_an_orphan_expires() {
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
    enqueue(&q, &stop("agent-a", Some("s-2"))).await;
    let batch = claim(&q, "agent-a", "conn-1", 10).await;
    // The connection learned of the first lease only (the reply of a second claim was
    // lost, say): renewing names it alone.
    let known = batch.commands[0].lease.clone().unwrap();
    let orphan = batch.commands[1].command_id.to_string();
    let held = [(known.command_id.to_string(), known.token)];
    let rescued = eventually("the orphan's rescue", Duration::from_secs(20), || async {
        q.command_lease_extend("conn-1", &held).await.unwrap();
        let r = q.command_rescue_expired(100).await.unwrap();
        (!r.requeued.is_empty()).then_some(r.requeued)
    })
    .await;
    assert_eq!(rescued, vec![orphan]);
    assert_eq!(status_of(&q, known.command_id.as_str()).await.0, "sent");
}

#[tokio::test]
async fn release_does_not_count_undelivered_attempts_nor_flaps_but_counts_lost_ones() {
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

    // Acknowledged, then the connection flaps five times while the agent keeps running
    // it (it says so in each Hello): no attempt is burned.
    let mut conn = connect(&q, "agent-a", "flap-0").await;
    let lease = claim_as(&q, conn, 10)
        .await
        .commands
        .remove(0)
        .lease
        .unwrap();
    q.command_ack_one(lease).await.unwrap();
    let running = [cmd.command_id.to_string()];
    for (i, owner) in ["flap-1", "flap-2", "flap-3", "flap-4", "flap-5"]
        .iter()
        .enumerate()
    {
        q.command_release_owner(conn.owner).await.unwrap();
        conn = connect(&q, "agent-a", owner).await;
        let r = q
            .command_release_superseded("agent-a", conn.epoch, conn.owner, &running)
            .await
            .unwrap();
        assert_eq!(r.requeued.len(), 1, "flap {i}: {r:?}");
        let again = claim_as(&q, conn, 10).await.commands.remove(0);
        assert_eq!(again.attempts, 1, "flap {i} burned an attempt");
        q.command_ack_one(again.lease.unwrap()).await.unwrap();
    }

    // The agent comes back without it (it crashed running it): that attempt counts, and
    // a poison command ends instead of looping forever.
    for round in 1..=2 {
        q.command_release_owner(conn.owner).await.unwrap();
        conn = connect(
            &q,
            "agent-a",
            if round == 1 { "crash-1" } else { "crash-2" },
        )
        .await;
        let released = q
            .command_release_superseded("agent-a", conn.epoch, conn.owner, &[])
            .await
            .unwrap();
        if round == 1 {
            assert_eq!(released.requeued.len(), 1);
            let again = claim_as(&q, conn, 10).await.commands.remove(0);
            assert_eq!(again.attempts, 2);
            q.command_ack_one(again.lease.unwrap()).await.unwrap();
        } else {
            assert_eq!(released.failed, vec![cmd.command_id.to_string()]);
        }
    }
    let (status, error) = status_of(&q, cmd.command_id.as_str()).await;
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("gave up after 2 attempts"));
}

#[tokio::test]
async fn a_superseded_connection_can_neither_claim_nor_take_back_leases() {
    let q = queue().await;
    enqueue(&q, &stop("agent-a", Some("s-1"))).await;
    let old = connect(&q, "agent-a", "d1/old").await;
    let new = connect(&q, "agent-a", "d2/new").await;
    assert!(
        claim_as(&q, old, 10).await.commands.is_empty(),
        "old epoch claims nothing"
    );
    let held = claim_as(&q, new, 10).await.commands.remove(0);
    q.command_ack_one(held.lease.clone().unwrap())
        .await
        .unwrap();
    let err = q
        .command_release_superseded("agent-a", old.epoch, old.owner, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Superseded { .. }), "{err:?}");
    assert_eq!(status_of(&q, held.command_id.as_str()).await.0, "ack");

    // After its disconnect, not even the newest epoch's owner can claim (a claim that
    // was in flight when the connection ended cannot leave a lease behind).
    enqueue(&q, &stop("agent-a", Some("s-2"))).await;
    streamspace_core::agents::agent_disconnect(q.pool(), "agent-a", new.epoch)
        .await
        .unwrap();
    assert!(claim_as(&q, new, 10).await.commands.is_empty());
}

#[tokio::test]
async fn transitions_require_the_commands_agent_and_the_leases_owner() {
    let q = queue().await;
    enqueue(&q, &stop("agent-a", Some("s-1"))).await;
    let lease = claim(&q, "agent-a", "conn-a", 10).await.commands[0]
        .lease
        .clone()
        .unwrap();
    // Another agent that learned (or guessed) the token, and another connection of the
    // same agent: both refused, nothing changes.
    for forged in [
        streamspace_core::command::Lease {
            agent_id: "agent-b".into(),
            ..lease.clone()
        },
        streamspace_core::command::Lease {
            owner: "conn-other".into(),
            ..lease.clone()
        },
    ] {
        let err = q.command_ack_one(forged.clone()).await.unwrap_err();
        assert!(matches!(err, Error::StaleLease { .. }), "{err:?}");
        let err = q
            .command_complete_one(Completion {
                lease: forged.clone(),
                result: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::StaleLease { .. }), "{err:?}");
        let out = q
            .command_fail(&[Failure {
                lease: forged,
                message: "forged".into(),
                retryable: false,
            }])
            .await
            .unwrap();
        assert!(matches!(out[0].1, FailureOutcome::Rejected(_)), "{out:?}");
    }
    assert_eq!(status_of(&q, lease.command_id.as_str()).await.0, "sent");
    q.command_ack_one(lease).await.unwrap();
}

#[tokio::test]
async fn rescue_expiry_and_cancel_wake_whichever_replica_holds_the_agent() {
    use streamspace_core::queue::{CommandListener, Wakeup};

    let base = queue().await;
    let q = CommandQueue::new(
        base.pool().clone(),
        QueueConfig {
            lease: Duration::from_millis(100),
            ..QueueConfig::default()
        },
    )
    .unwrap();
    let mut listener = CommandListener::new(q.pool().clone());
    assert_eq!(listener.recv().await, Wakeup::Resync, "listening");
    // Rescue: the lease of a vanished holder expires.
    enqueue(&q, &stop("agent-a", Some("s-1"))).await;
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-a".into()));
    claim(&q, "agent-a", "gone", 10).await;
    eventually("the rescue", Duration::from_secs(20), || async {
        let r = q.command_rescue_expired(10).await.unwrap();
        (!r.requeued.is_empty()).then_some(())
    })
    .await;
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-a".into()));

    // Expiry: a command whose deadline passed before delivery.
    let mut late = stop("agent-b", Some("s-2"));
    late.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
    enqueue(&q, &late).await;
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-b".into()));
    assert_eq!(q.command_expire().await.unwrap().len(), 1);
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-b".into()));

    // Cancel: notified when the caller's transaction commits.
    let cancelled = stop("agent-a", Some("s-3"));
    enqueue(&q, &cancelled).await;
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-a".into()));
    let mut tx = q.pool().begin().await.unwrap();
    CommandQueue::command_cancel(&mut tx, &cancelled.command_id, "withdrawn")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-a".into()));
}

/// The next wake-up, failing the test after a generous bound.
async fn next(
    listener: &mut streamspace_core::queue::CommandListener,
) -> streamspace_core::queue::Wakeup {
    tokio::time::timeout(Duration::from_secs(20), listener.recv())
        .await
        .expect("a wake-up")
}

/// An enqueue wakes the dispatchers in its own statement: once per agent with a new
/// command (a bulk enqueue for two agents wakes both), and not at all for a replayed
/// idempotency key, whose command already exists.
#[tokio::test]
async fn enqueues_wake_each_agent_with_a_new_command_and_a_replay_wakes_nobody() {
    use streamspace_core::queue::{CommandListener, Wakeup};

    let q = queue().await;
    let mut listener = CommandListener::new(q.pool().clone());
    assert_eq!(listener.recv().await, Wakeup::Resync, "listening");
    let mut keyed = stop("agent-a", Some("s-1"));
    keyed.idempotency_key = Some("once".into());
    let batch = [
        keyed.clone(),
        stop("agent-a", Some("s-2")),
        stop("agent-b", Some("s-3")),
    ];
    let mut conn = q.pool().acquire().await.unwrap();
    CommandQueue::command_enqueue_many(&mut conn, &batch)
        .await
        .unwrap();
    let mut woken = vec![next(&mut listener).await, next(&mut listener).await];
    woken.sort_by_key(|w| format!("{w:?}"));
    assert_eq!(
        woken,
        [
            Wakeup::Agent("agent-a".into()),
            Wakeup::Agent("agent-b".into())
        ]
    );

    // The replay (agent-a's) creates nothing and announces nothing: the next wake-up is
    // the following enqueue's, agent-b's.
    let replay = CommandQueue::command_enqueue(&mut conn, &keyed)
        .await
        .unwrap();
    assert!(!replay.created);
    enqueue(&q, &stop("agent-b", None)).await;
    assert_eq!(next(&mut listener).await, Wakeup::Agent("agent-b".into()));
}
