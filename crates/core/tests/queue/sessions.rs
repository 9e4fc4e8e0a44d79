//! Sessions follow their commands (trigger) and agent reports (observe, reconcile).

use streamspace_core::CommandQueue;
use streamspace_core::command::{CommandKind, StartSession};
use streamspace_core::queue::{Completion, Failure, NewCommand};
use streamspace_core::sessions::{self, Observation, ObservedState};

use crate::helpers::{claim, enqueue, queue, stop};

async fn session(q: &CommandQueue, id: &str, state: &str) {
    sqlx::query("INSERT INTO sessions (id, user_id, template, agent_id, state) VALUES ($1, 'u', 'firefox-browser', 'agent-a', $2)")
        .bind(id)
        .bind(state)
        .execute(q.pool())
        .await
        .unwrap();
}

async fn state_of(q: &CommandQueue, id: &str) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("SELECT state, url, status_message FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(q.pool())
        .await
        .unwrap()
}

fn start(session: &str) -> NewCommand {
    NewCommand::new(
        "agent-a",
        Some(session.into()),
        CommandKind::StartSession(StartSession {
            template: "firefox-browser".into(),
            user_id: Some("u".into()),
            resources: None,
            home_volume: false,
            env: Default::default(),
        }),
    )
}

#[tokio::test]
async fn a_session_follows_its_commands_in_the_same_transaction() {
    let q = queue().await;
    session(&q, "u-firefox-browser-00000001", "pending").await;
    enqueue(&q, &start("u-firefox-browser-00000001")).await;
    let c = claim(&q, "agent-a", "conn", 1).await.commands.remove(0);
    q.command_ack_one(c.lease.clone().unwrap()).await.unwrap();
    assert_eq!(
        state_of(&q, "u-firefox-browser-00000001").await.0,
        "starting"
    );
    q.command_complete_one(Completion {
        lease: c.lease.unwrap(),
        result: Some(serde_json::json!({"session": {"url": "http://127.0.0.1:4000/"}})),
    })
    .await
    .unwrap();
    assert_eq!(
        state_of(&q, "u-firefox-browser-00000001").await,
        (
            "running".into(),
            Some("http://127.0.0.1:4000/".into()),
            None
        )
    );

    sqlx::query(
        "UPDATE sessions SET state = 'terminating' WHERE id = 'u-firefox-browser-00000001'",
    )
    .execute(q.pool())
    .await
    .unwrap();
    enqueue(&q, &stop("agent-a", Some("u-firefox-browser-00000001"))).await;
    let c = claim(&q, "agent-a", "conn", 1).await.commands.remove(0);
    q.command_complete_one(Completion {
        lease: c.lease.unwrap(),
        result: None,
    })
    .await
    .unwrap();
    let (state, url, _) = state_of(&q, "u-firefox-browser-00000001").await;
    assert_eq!((state.as_str(), url), ("terminated", None));
}

#[tokio::test]
async fn a_late_start_result_does_not_undo_a_stop_request_and_failures_say_why() {
    let q = queue().await;
    session(&q, "s-late", "pending").await;
    enqueue(&q, &start("s-late")).await;
    let c = claim(&q, "agent-a", "conn", 1).await.commands.remove(0);
    // The user asked to stop while the start was in flight.
    sqlx::query("UPDATE sessions SET state = 'terminating' WHERE id = 's-late'")
        .execute(q.pool())
        .await
        .unwrap();
    q.command_complete_one(Completion {
        lease: c.lease.unwrap(),
        result: None,
    })
    .await
    .unwrap();
    assert_eq!(state_of(&q, "s-late").await.0, "terminating");

    session(&q, "s-bad", "pending").await;
    enqueue(&q, &start("s-bad")).await;
    let c = claim(&q, "agent-a", "conn", 10).await.commands.remove(0);
    q.command_fail(&[Failure {
        lease: c.lease.unwrap(),
        message: "unknown template".into(),
        retryable: false,
    }])
    .await
    .unwrap();
    let (state, _, message) = state_of(&q, "s-bad").await;
    assert_eq!(
        (state.as_str(), message.as_deref()),
        ("failed", Some("unknown template"))
    );
}

#[tokio::test]
async fn observations_move_only_settled_sessions() {
    let q = queue().await;
    session(&q, "s-running", "running").await;
    session(&q, "s-busy", "running").await;
    enqueue(&q, &stop("agent-a", Some("s-busy"))).await; // a command in flight explains it
    let crashed = |id: &str| Observation {
        session_id: id.into(),
        state: ObservedState::Failed,
        url: None,
        message: Some("session process exited unexpectedly: signal 9".into()),
    };
    let changed = sessions::session_observe(
        q.pool(),
        "agent-a",
        &[crashed("s-running"), crashed("s-busy")],
    )
    .await
    .unwrap();
    assert_eq!(changed, vec!["s-running".to_string()]);
    let (state, _, message) = state_of(&q, "s-running").await;
    assert_eq!(state, "failed");
    assert!(message.unwrap().contains("signal 9"));
    assert_eq!(state_of(&q, "s-busy").await.0, "running");
    // Another agent cannot move this agent's sessions.
    session(&q, "s-other", "running").await;
    assert!(
        sessions::session_observe(q.pool(), "agent-b", &[crashed("s-other")])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn hello_reconciliation_stops_orphans_and_marks_lost_sessions_without_destroying_wanted_ones()
{
    let q = queue().await;
    session(&q, "s-kept", "running").await;
    session(&q, "s-lost", "running").await;
    session(&q, "s-ended", "terminated").await;
    session(&q, "s-starting", "pending").await;
    enqueue(&q, &start("s-starting")).await;
    let running = |id: &str| Observation {
        session_id: id.into(),
        state: ObservedState::Running,
        url: None,
        message: None,
    };
    let inventory = [running("s-kept"), running("s-ended"), running("s-unknown")];

    let r = sessions::session_reconcile(q.pool(), "agent-a", &inventory)
        .await
        .unwrap();
    let mut orphans = r.orphans_stopped.clone();
    orphans.sort();
    assert_eq!(
        orphans,
        vec!["s-ended".to_string(), "s-unknown".to_string()]
    );
    assert_eq!(r.lost, vec!["s-lost".to_string()]);
    assert_eq!(state_of(&q, "s-kept").await.0, "running");
    assert_eq!(
        state_of(&q, "s-starting").await.0,
        "pending",
        "a session with work queued is not lost"
    );
    assert!(
        state_of(&q, "s-lost")
            .await
            .2
            .unwrap()
            .contains("reconnected without this session")
    );

    // The queued stops are real commands; a second hello does not queue them twice.
    let again = sessions::session_reconcile(q.pool(), "agent-a", &inventory)
        .await
        .unwrap();
    assert!(again.orphans_stopped.is_empty(), "{again:?}");
    let stops: (i64,) =
        sqlx::query_as("SELECT count(*) FROM agent_commands WHERE action = 'stop_session'")
            .fetch_one(q.pool())
            .await
            .unwrap();
    assert_eq!(stops.0, 2);
}
