//! Per-session pipelining: a claimed head brings the unbroken run of commands queued right
//! behind it, each delivered `after` its predecessor; a command the agent did not run goes
//! back without an attempt, behind its predecessor; a lost agent's pipelined commands get
//! their attempt back (they never started).

use streamspace_core::CommandQueue;
use streamspace_core::command::Lease;
use streamspace_core::queue::{ClaimBatch, ClaimParams, Completion, Failure, NewCommand};
use streamspace_core::sessions::Reporter;

use crate::helpers::{connect, enqueue, queue, stop};

async fn claim_pipelined(q: &CommandQueue, owner: &str, limit: i64, depth: i64) -> ClaimBatch {
    q.command_claim(ClaimParams {
        agent_id: "agent-a",
        owner,
        limit,
        epoch: None,
        pipeline_depth: depth,
    })
    .await
    .expect("claim")
}

async fn enqueue_n(q: &CommandQueue, session: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let cmd: NewCommand = stop("agent-a", Some(session));
        enqueue(q, &cmd).await;
        ids.push(cmd.command_id.to_string());
    }
    ids
}

/// `(command, after)` of a batch, in delivery order.
fn chain(batch: &ClaimBatch) -> Vec<(String, Option<String>)> {
    batch
        .commands
        .iter()
        .map(|c| {
            (
                c.command_id.to_string(),
                c.after.as_ref().map(ToString::to_string),
            )
        })
        .collect()
}

fn leases(batch: &ClaimBatch) -> Vec<Lease> {
    batch
        .commands
        .iter()
        .map(|c| c.lease.clone().expect("claimed with a lease"))
        .collect()
}

async fn row(q: &CommandQueue, id: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM agent_commands WHERE command_id = $1")
        .bind(id)
        .fetch_one(q.pool())
        .await
        .expect("command row")
}

#[tokio::test]
async fn a_head_brings_the_commands_queued_behind_it_up_to_the_depth() {
    let q = queue().await;
    let s1 = enqueue_n(&q, "s-1", 5).await;
    let s2 = enqueue_n(&q, "s-2", 1).await;

    let batch = claim_pipelined(&q, "conn-1", 10, 3).await;
    assert_eq!(
        chain(&batch),
        [
            (s1[0].clone(), None),
            (s1[1].clone(), Some(s1[0].clone())),
            (s1[2].clone(), Some(s1[1].clone())),
            (s2[0].clone(), None),
        ]
    );
    assert!(batch.commands.iter().all(|c| c.attempts == 1));

    // The rest of s-1 waits for its run to finish: nothing of it is a head yet.
    assert!(
        claim_pipelined(&q, "conn-1", 10, 3)
            .await
            .commands
            .is_empty()
    );
    let done: Vec<Completion> = leases(&batch)
        .into_iter()
        .map(|lease| Completion {
            lease,
            result: None,
        })
        .collect();
    q.command_complete(&done).await.unwrap();
    assert_eq!(
        chain(&claim_pipelined(&q, "conn-1", 10, 3).await),
        [(s1[3].clone(), None), (s1[4].clone(), Some(s1[3].clone()))]
    );
}

#[tokio::test]
async fn depth_one_claims_heads_only() {
    let q = queue().await;
    let s1 = enqueue_n(&q, "s-1", 3).await;
    let batch = claim_pipelined(&q, "conn-1", 10, 1).await;
    assert_eq!(chain(&batch), [(s1[0].clone(), None)]);
}

#[tokio::test]
async fn the_limit_serves_every_head_first_then_the_shallowest_followers() {
    let q = queue().await;
    let s1 = enqueue_n(&q, "s-1", 4).await;
    let s2 = enqueue_n(&q, "s-2", 4).await;
    let batch = claim_pipelined(&q, "conn-1", 5, 4).await;
    assert_eq!(
        chain(&batch),
        [
            (s1[0].clone(), None),
            (s1[1].clone(), Some(s1[0].clone())),
            (s1[2].clone(), Some(s1[1].clone())),
            (s2[0].clone(), None),
            (s2[1].clone(), Some(s2[0].clone())),
        ]
    );
}

#[tokio::test]
async fn the_run_ends_at_the_first_command_that_cannot_go() {
    let q = queue().await;
    let s1 = enqueue_n(&q, "s-1", 4).await;
    // The third has expired: it will fail at the expiry sweep, and the fourth must not
    // overtake it (nor may anything behind a row another transaction holds).
    sqlx::query(
        "UPDATE agent_commands SET expires_at = now() - interval '1 s' WHERE command_id = $1",
    )
    .bind(&s1[2])
    .execute(q.pool())
    .await
    .unwrap();
    let s2 = enqueue_n(&q, "s-2", 3).await;
    let mut holder = q.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM agent_commands WHERE command_id = $1 FOR UPDATE")
        .bind(&s2[1])
        .execute(&mut *holder)
        .await
        .unwrap();

    let batch = claim_pipelined(&q, "conn-1", 10, 10).await;
    assert_eq!(
        chain(&batch),
        [
            (s1[0].clone(), None),
            (s1[1].clone(), Some(s1[0].clone())),
            (s2[0].clone(), None),
        ]
    );
    holder.rollback().await.unwrap();
    assert_eq!(row(&q, &s1[3]).await, ("pending".into(), 0));
    assert_eq!(row(&q, &s2[2]).await, ("pending".into(), 0));
}

#[tokio::test]
async fn commands_not_run_go_back_without_an_attempt_and_stay_behind_a_retrying_predecessor() {
    let q = queue().await;
    let s1 = enqueue_n(&q, "s-1", 3).await;
    let batch = claim_pipelined(&q, "conn-1", 10, 3).await;
    let l = leases(&batch);
    q.command_fail(&[Failure {
        lease: l[0].clone(),
        message: "timed out".into(),
        retryable: true,
    }])
    .await
    .unwrap();
    q.command_not_run(&l[1..]).await.unwrap();
    assert_eq!(row(&q, &s1[0]).await, ("pending".into(), 1));
    assert_eq!(row(&q, &s1[1]).await, ("pending".into(), 0));
    assert_eq!(row(&q, &s1[2]).await, ("pending".into(), 0));

    // Nothing goes while the head waits out its backoff: the others are not heads.
    assert!(
        claim_pipelined(&q, "conn-1", 10, 3)
            .await
            .commands
            .is_empty()
    );
    sqlx::query("UPDATE agent_commands SET next_attempt_at = now() WHERE command_id = $1")
        .bind(&s1[0])
        .execute(q.pool())
        .await
        .unwrap();
    let again = claim_pipelined(&q, "conn-1", 10, 3).await;
    assert_eq!(
        chain(&again),
        [
            (s1[0].clone(), None),
            (s1[1].clone(), Some(s1[0].clone())),
            (s1[2].clone(), Some(s1[1].clone())),
        ]
    );
    let attempts: Vec<i32> = again.commands.iter().map(|c| c.attempts).collect();
    assert_eq!(attempts, [2, 1, 1]);
}

#[tokio::test]
async fn after_a_permanent_failure_the_commands_not_run_go_next() {
    let q = queue().await;
    let s1 = enqueue_n(&q, "s-1", 3).await;
    let l = leases(&claim_pipelined(&q, "conn-1", 10, 3).await);
    q.command_fail(&[Failure {
        lease: l[0].clone(),
        message: "no such template".into(),
        retryable: false,
    }])
    .await
    .unwrap();
    q.command_not_run(&l[1..]).await.unwrap();
    assert_eq!(
        chain(&claim_pipelined(&q, "conn-1", 10, 3).await),
        [(s1[1].clone(), None), (s1[2].clone(), Some(s1[1].clone()))]
    );
}

#[tokio::test]
async fn a_lost_agents_pipelined_commands_get_their_attempt_back() {
    let q = queue().await;
    let conn1: Reporter<'static> = connect(&q, "agent-a", "conn-1").await;
    let s1 = enqueue_n(&q, "s-1", 3).await;
    let batch = q
        .command_claim(ClaimParams {
            agent_id: conn1.agent_id,
            owner: conn1.owner,
            limit: 10,
            epoch: Some(conn1.epoch),
            pipeline_depth: 3,
        })
        .await
        .unwrap();
    q.command_ack(&leases(&batch)).await.unwrap();

    // The agent process died with all three acknowledged; a new one connects holding
    // nothing. The head pays the lost attempt; the two queued behind it never started.
    let conn2 = connect(&q, "agent-a", "conn-2").await;
    q.command_release_superseded("agent-a", conn2.epoch, conn2.owner, &[])
        .await
        .unwrap();
    assert_eq!(row(&q, &s1[0]).await, ("pending".into(), 1));
    assert_eq!(row(&q, &s1[1]).await, ("pending".into(), 0));
    assert_eq!(row(&q, &s1[2]).await, ("pending".into(), 0));

    // Same when nobody comes back and the leases expire.
    let batch = q
        .command_claim(ClaimParams {
            agent_id: conn2.agent_id,
            owner: conn2.owner,
            limit: 10,
            epoch: Some(conn2.epoch),
            pipeline_depth: 3,
        })
        .await
        .unwrap();
    q.command_ack(&leases(&batch)).await.unwrap();
    sqlx::query(
        "UPDATE agent_commands SET lease_expires_at = now() - interval '1 s' WHERE status = 'ack'",
    )
    .execute(q.pool())
    .await
    .unwrap();
    let rescued = q.command_rescue_expired(100).await.unwrap();
    assert_eq!(rescued.requeued.len(), 3);
    assert_eq!(row(&q, &s1[0]).await, ("pending".into(), 2));
    assert_eq!(row(&q, &s1[1]).await, ("pending".into(), 0));
    assert_eq!(row(&q, &s1[2]).await, ("pending".into(), 0));
}
