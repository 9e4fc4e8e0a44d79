//! Session heads (migration 6): only the oldest open command of a session is claimable,
//! and the flag moves on whichever transaction commits first — an enqueue racing the
//! head's end is never stranded behind a head that is gone.

use std::time::{Duration, Instant};

use streamspace_core::CommandQueue;
use streamspace_core::queue::Completion;
use tokio::task::JoinHandle;

use crate::helpers::{claim, enqueue, queue, stop};

const LIMIT: Duration = Duration::from_secs(30);

/// Waits until `task` either finished or is blocked on an advisory lock (some backend
/// waits for one): both racing orders are then fixed before the test lets the other side
/// commit.
async fn finished_or_waiting_on_lock<T>(q: &CommandQueue, task: &JoinHandle<T>) {
    let deadline = Instant::now() + LIMIT;
    loop {
        if task.is_finished() {
            return;
        }
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
        )
        .fetch_one(q.pool())
        .await
        .expect("pg_locks");
        if waiting {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the racing transaction neither finished nor waited"
        );
        tokio::task::yield_now().await;
    }
}

async fn claimed_ids(q: &CommandQueue) -> Vec<String> {
    claim(q, "agent-a", "conn-2", 10)
        .await
        .commands
        .iter()
        .map(|c| c.command_id.to_string())
        .collect()
}

#[tokio::test]
async fn a_command_enqueued_while_its_head_completes_becomes_the_head() {
    let q = queue().await;
    let head = stop("agent-a", Some("s-1"));
    enqueue(&q, &head).await;
    let batch = claim(&q, "agent-a", "conn-1", 10).await;
    let lease = batch.commands[0]
        .lease
        .clone()
        .expect("claimed with a lease");

    // The next command is accepted in a transaction that is still open when the head's
    // completion runs.
    let next = stop("agent-a", Some("s-1"));
    let mut tx = q.pool().begin().await.unwrap();
    CommandQueue::command_enqueue(&mut tx, &next).await.unwrap();

    let completing = {
        let q = q.clone();
        tokio::spawn(async move {
            q.command_complete_one(Completion {
                lease,
                result: None,
            })
            .await
        })
    };
    finished_or_waiting_on_lock(&q, &completing).await;
    tx.commit().await.unwrap();
    completing.await.unwrap().unwrap();

    assert_eq!(
        claimed_ids(&q).await,
        vec![next.command_id.to_string()],
        "the command accepted beside the finishing head is deliverable"
    );
}

#[tokio::test]
async fn a_command_enqueued_while_its_head_is_cancelled_becomes_the_head() {
    let q = queue().await;
    let head = stop("agent-a", Some("s-1"));
    enqueue(&q, &head).await;

    // The head ends first, in a transaction still open when the next command arrives.
    let mut tx = q.pool().begin().await.unwrap();
    CommandQueue::command_cancel(&mut tx, &head.command_id, "withdrawn")
        .await
        .unwrap();

    let next = stop("agent-a", Some("s-1"));
    let enqueuing = {
        let (q, next) = (q.clone(), next.clone());
        tokio::spawn(async move {
            let mut conn = q.pool().acquire().await.unwrap();
            CommandQueue::command_enqueue(&mut conn, &next).await
        })
    };
    finished_or_waiting_on_lock(&q, &enqueuing).await;
    tx.commit().await.unwrap();
    enqueuing.await.unwrap().unwrap();

    assert_eq!(
        claimed_ids(&q).await,
        vec![next.command_id.to_string()],
        "the command accepted beside the cancelled head is deliverable"
    );
}

#[tokio::test]
async fn each_finished_head_hands_over_to_the_oldest_open_command() {
    let q = queue().await;
    let cmds: Vec<_> = (0..4).map(|_| stop("agent-a", Some("s-1"))).collect();
    let mut conn = q.pool().acquire().await.unwrap();
    CommandQueue::command_enqueue_many(&mut conn, &cmds)
        .await
        .unwrap();
    // The third is withdrawn while it waits: it never becomes head, and the head passes
    // over it.
    CommandQueue::command_cancel(&mut conn, &cmds[2].command_id, "withdrawn")
        .await
        .unwrap();
    drop(conn);

    let mut order = Vec::new();
    for _ in 0..3 {
        let batch = claim(&q, "agent-a", "conn-1", 10).await;
        assert_eq!(batch.commands.len(), 1, "one head at a time");
        let cmd = &batch.commands[0];
        order.push(cmd.command_id.to_string());
        q.command_complete_one(Completion {
            lease: cmd.lease.clone().unwrap(),
            result: None,
        })
        .await
        .unwrap();
    }
    assert_eq!(
        order,
        [0, 1, 3].map(|i| cmds[i].command_id.to_string()),
        "heads advance in acceptance order, skipping the cancelled one"
    );
    let heads: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM agent_commands WHERE session_head AND status IN ('pending', 'sent', 'ack')",
    )
    .fetch_one(q.pool())
    .await
    .unwrap();
    assert_eq!(heads, 0, "nothing open, no head left");
}

#[tokio::test]
async fn an_insert_numbered_before_an_open_command_of_its_session_is_refused() {
    let q = queue().await;
    enqueue(&q, &stop("agent-a", Some("s-1"))).await;
    // A writer that drew its `seq` outside the session's lock and lost the race looks
    // like this: a number below one already queued for the session.
    let err = sqlx::query(
        "INSERT INTO agent_commands (seq, agent_id, session_id, action)
         OVERRIDING SYSTEM VALUE VALUES (0, 'agent-a', 's-1', 'stop_session')",
    )
    .execute(q.pool())
    .await
    .unwrap_err();
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("40001"), "{err}");
}
