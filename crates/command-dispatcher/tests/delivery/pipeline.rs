//! Per-session pipelining over real gRPC: an agent that lists the `pipeline` capability
//! gets a session's backlog in one go, each command naming its predecessor; what it did
//! not run comes back (without an attempt) only after the failed predecessor's retry.

use std::time::Duration;

use streamspace_core::queue::NewCommand;
use streamspace_proto::agent::v1 as pb;

use crate::helpers::{RawAgent, TestDispatcher, eventually, stop};

const LIMIT: Duration = Duration::from_secs(10);

async fn fast_retry_dispatcher() -> TestDispatcher {
    let url = streamspace_devpg::testdb::fresh_database_url(&streamspace_core::db::MIGRATOR).await;
    let mut config = crate::helpers::fast_config(&url);
    config.queue.retry_base = Duration::from_millis(100);
    config.queue.retry_cap = Duration::from_millis(100);
    TestDispatcher::start_with(config).await
}

async fn next_n(agent: &mut RawAgent, n: usize) -> Vec<pb::Command> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(agent.next_command(LIMIT).await);
    }
    out
}

/// `(command, after)` as pushed.
fn chain(cmds: &[pb::Command]) -> Vec<(String, String)> {
    cmds.iter()
        .map(|c| (c.command_id.clone(), c.after_command_id.clone()))
        .collect()
}

fn expected_chain(cmds: &[NewCommand]) -> Vec<(String, String)> {
    let mut prev = String::new();
    cmds.iter()
        .map(|c| {
            let id = c.command_id.to_string();
            (id.clone(), std::mem::replace(&mut prev, id))
        })
        .collect()
}

async fn attempts(d: &TestDispatcher, ids: &[String]) -> Vec<i32> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "SELECT command_id, attempts FROM agent_commands WHERE command_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    ids.iter()
        .map(|id| rows.iter().find(|r| &r.0 == id).map_or(-1, |r| r.1))
        .collect()
}

#[tokio::test]
async fn a_pipelining_agent_gets_a_sessions_backlog_at_once_and_unrun_commands_follow_the_retry() {
    let d = fast_retry_dispatcher().await;
    let token = d.agent("agent-a").await;
    let cmds: Vec<NewCommand> = (0..4).map(|_| stop("agent-a", "s-1")).collect();
    d.enqueue(&cmds).await;
    let ids: Vec<String> = cmds.iter().map(|c| c.command_id.to_string()).collect();

    // All four arrive before the agent reports anything, each after its predecessor.
    let mut agent = RawAgent::connect_pipelining(&d.url(), &token).await;
    let first = next_n(&mut agent, 4).await;
    assert_eq!(chain(&first), expected_chain(&cmds));
    for c in &first {
        agent.ack(c).await;
    }

    // The head fails retryably; the agent does not run the three behind it.
    agent.fail(&first[0], true).await;
    for c in &first[1..] {
        agent.not_run(c).await;
    }

    // After the head's backoff, all four come again, in order: the head on its second
    // attempt, the others still on their first.
    let second = next_n(&mut agent, 4).await;
    assert_eq!(chain(&second), expected_chain(&cmds));
    let pushed_attempts: Vec<u32> = second.iter().map(|c| c.attempt).collect();
    assert_eq!(pushed_attempts, [2, 1, 1, 1]);
    for c in &second {
        agent.ack(c).await;
        agent.complete(c).await;
    }
    eventually("all completed", LIMIT, || async {
        d.statuses(&ids)
            .await
            .iter()
            .all(|s| s == "completed")
            .then_some(())
    })
    .await;
    assert_eq!(attempts(&d, &ids).await, [2, 1, 1, 1]);
}

#[tokio::test]
async fn an_agent_without_the_capability_gets_one_command_per_session_at_a_time() {
    let d = fast_retry_dispatcher().await;
    let token = d.agent("agent-a").await;
    let cmds: Vec<NewCommand> = (0..3).map(|_| stop("agent-a", "s-1")).collect();
    d.enqueue(&cmds).await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    for c in &cmds {
        let pushed = agent.next_command(LIMIT).await;
        assert_eq!(pushed.command_id, c.command_id.to_string());
        assert_eq!(pushed.after_command_id, "", "never pipelined");
        agent.ack(&pushed).await;
        // Nothing else of the session while this one is open.
        assert!(
            agent
                .maybe_command(Duration::from_millis(300))
                .await
                .is_none()
        );
        agent.complete(&pushed).await;
    }
}
