//! Many claimers on one queue: exactly one holder per command, per-session order kept.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use streamspace_core::CommandQueue;
use streamspace_core::queue::{ClaimParams, Completion, NewCommand};

use crate::helpers::{queue, stop};

const COMMANDS: usize = 10_000;
const SESSIONS: usize = 200;
const CLAIMERS: usize = 8;

/// `(session_id, seq, status, attempts, sent_at, completed_at)`
type Row = (String, i64, String, i32, DateTime<Utc>, DateTime<Utc>);

#[derive(Default)]
struct Observed {
    /// Session → command currently held by some claimer (between claim and complete).
    in_flight: HashMap<String, String>,
    /// Every command id ever handed out.
    claimed: HashSet<String>,
    /// Session → seqs in the order their completion was reported.
    completion_order: HashMap<String, Vec<i64>>,
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_claimers_over_ten_thousand_commands_in_two_hundred_sessions() {
    let q = queue().await;
    // Round-robin over sessions so every session's commands interleave with the others'.
    let cmds: Vec<NewCommand> = (0..COMMANDS)
        .map(|i| stop("agent-a", Some(&format!("s-{}", i % SESSIONS))))
        .collect();
    let mut conn = q.pool().acquire().await.unwrap();
    for chunk in cmds.chunks(2_000) {
        CommandQueue::command_enqueue_many(&mut conn, chunk)
            .await
            .unwrap();
    }
    drop(conn);

    let observed = Arc::new(Mutex::new(Observed::default()));
    let mut claimers = Vec::new();
    for n in 0..CLAIMERS {
        let q = q.clone();
        let observed = observed.clone();
        claimers.push(tokio::spawn(async move {
            let owner = format!("claimer-{n}");
            let mut idle_rounds = 0;
            loop {
                let batch = q
                    .command_claim(ClaimParams {
                        agent_id: "agent-a",
                        owner: &owner,
                        limit: 25,
                        epoch: None,
                        pipeline_depth: 1,
                    })
                    .await
                    .unwrap();
                if batch.commands.is_empty() {
                    // Others may still hold the heads of the remaining sessions.
                    let left: (i64,) = sqlx::query_as(
                        "SELECT count(*) FROM agent_commands WHERE status <> 'completed'",
                    )
                    .fetch_one(q.pool())
                    .await
                    .unwrap();
                    if left.0 == 0 {
                        return;
                    }
                    idle_rounds += 1;
                    assert!(idle_rounds < 10_000, "claimer {n} starved");
                    tokio::task::yield_now().await;
                    continue;
                }
                {
                    let mut o = observed.lock().unwrap();
                    for c in &batch.commands {
                        let id = c.command_id.to_string();
                        let session = c.session_id.clone().unwrap();
                        if !o.claimed.insert(id.clone()) {
                            o.violations.push(format!("{id} claimed twice"));
                        }
                        if let Some(other) = o.in_flight.insert(session.clone(), id.clone()) {
                            o.violations
                                .push(format!("{session}: {id} claimed while {other} in flight"));
                        }
                    }
                }
                // Hold the commands across a scheduling point so overlaps would show.
                tokio::task::yield_now().await;
                let completions: Vec<Completion> = {
                    let mut o = observed.lock().unwrap();
                    batch
                        .commands
                        .iter()
                        .map(|c| {
                            let session = c.session_id.clone().unwrap();
                            o.in_flight.remove(&session);
                            o.completion_order.entry(session).or_default().push(c.seq);
                            Completion {
                                lease: c.lease.clone().unwrap(),
                                result: None,
                            }
                        })
                        .collect()
                };
                let outcomes = q.command_complete(&completions).await.unwrap();
                for (id, outcome) in outcomes {
                    assert_eq!(outcome, streamspace_core::queue::Outcome::Applied, "{id}");
                }
            }
        }));
    }
    for c in claimers {
        c.await.unwrap();
    }

    let o = std::mem::take(&mut *observed.lock().unwrap());
    assert!(
        o.violations.is_empty(),
        "violations: {:?}",
        &o.violations[..o.violations.len().min(10)]
    );
    assert_eq!(
        o.claimed.len(),
        COMMANDS,
        "every command claimed exactly once"
    );
    for (session, seqs) in &o.completion_order {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{session} completed out of order: {seqs:?}"
        );
    }

    // The database agrees: each completed once, on the first attempt, and within a session
    // every command was sent only after the one before it had completed.
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT session_id, seq, status, attempts, sent_at, completed_at
         FROM agent_commands ORDER BY session_id, seq",
    )
    .fetch_all(q.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), COMMANDS);
    for (_, _, status, attempts, _, _) in &rows {
        assert_eq!((status.as_str(), *attempts), ("completed", 1));
    }
    for pair in rows.windows(2) {
        let (s1, q1, _, _, _, done1) = &pair[0];
        let (s2, q2, _, _, sent2, _) = &pair[1];
        if s1 == s2 {
            assert!(
                done1 <= sent2,
                "{s1}: seq {q2} sent at {sent2} before seq {q1} completed at {done1}"
            );
        }
    }
}
