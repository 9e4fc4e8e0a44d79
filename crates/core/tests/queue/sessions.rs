//! Sessions follow their commands (trigger) and agent reports (observe, reconcile).

use streamspace_core::CommandQueue;
use streamspace_core::command::{CommandKind, StartSession};
use streamspace_core::queue::{Completion, Failure, NewCommand};
use streamspace_core::sessions::{self, Observation, ObservedState};

use crate::helpers::{claim, connect, enqueue, queue, stop};

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
    let a = connect(&q, "agent-a", "d/agent-a/1").await;
    let changed =
        sessions::session_observe(q.pool(), a, &[crashed("s-running"), crashed("s-busy")])
            .await
            .unwrap();
    assert_eq!(changed, vec!["s-running".to_string()]);
    let (state, _, message) = state_of(&q, "s-running").await;
    assert_eq!(state, "failed");
    assert!(message.unwrap().contains("signal 9"));
    assert_eq!(state_of(&q, "s-busy").await.0, "running");
    // Another agent cannot move this agent's sessions.
    session(&q, "s-other", "running").await;
    let b = connect(&q, "agent-b", "d/agent-b/1").await;
    assert!(
        sessions::session_observe(q.pool(), b, &[crashed("s-other")])
            .await
            .unwrap()
            .is_empty()
    );
    // Nor can a superseded connection of the agent itself.
    session(&q, "s-later", "running").await;
    connect(&q, "agent-a", "d/agent-a/2").await;
    assert!(
        sessions::session_observe(q.pool(), a, &[crashed("s-later")])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(state_of(&q, "s-later").await.0, "running");
}

#[tokio::test]
async fn the_last_observation_of_a_session_in_a_batch_wins() {
    let q = queue().await;
    session(&q, "s-1", "running").await;
    let a = connect(&q, "agent-a", "d/agent-a/1").await;
    let seen = |state| Observation {
        session_id: "s-1".into(),
        state,
        url: None,
        message: None,
    };
    let stale_then_fresh = [
        seen(ObservedState::Hibernated),
        seen(ObservedState::Running),
    ];
    let changed = sessions::session_observe(q.pool(), a, &stale_then_fresh)
        .await
        .unwrap();
    assert!(changed.is_empty(), "{changed:?}");
    assert_eq!(state_of(&q, "s-1").await.0, "running");
    sessions::session_observe(
        q.pool(),
        a,
        &[
            seen(ObservedState::Running),
            seen(ObservedState::Hibernated),
        ],
    )
    .await
    .unwrap();
    assert_eq!(state_of(&q, "s-1").await.0, "hibernated");
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

    let a = connect(&q, "agent-a", "d/agent-a/1").await;
    let r = sessions::session_reconcile(q.pool(), a, &inventory)
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
    let again = sessions::session_reconcile(q.pool(), a, &inventory)
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

#[tokio::test]
async fn reconciliation_never_stops_another_agents_session_and_a_stale_connection_changes_nothing()
{
    let q = queue().await;
    // s-theirs runs on agent-b; agent-a (wrongly) reports it too.
    sqlx::query("INSERT INTO sessions (id, user_id, template, agent_id, state) VALUES ('s-theirs', 'u', 'firefox-browser', 'agent-b', 'running')")
        .execute(q.pool())
        .await
        .unwrap();
    session(&q, "s-mine", "running").await;
    let running = |id: &str| Observation {
        session_id: id.into(),
        state: ObservedState::Running,
        url: None,
        message: None,
    };
    let a = connect(&q, "agent-a", "d/agent-a/1").await;
    let r = sessions::session_reconcile(q.pool(), a, &[running("s-mine"), running("s-theirs")])
        .await
        .unwrap();
    assert!(r.orphans_stopped.is_empty(), "{r:?}");
    let stops: (i64,) = sqlx::query_as("SELECT count(*) FROM agent_commands")
        .fetch_one(q.pool())
        .await
        .unwrap();
    assert_eq!(stops.0, 0, "no stop queued for another agent's session");
    assert_eq!(state_of(&q, "s-theirs").await.0, "running");

    // A newer connection exists: the old one's (empty) inventory changes nothing.
    connect(&q, "agent-a", "d/agent-a/2").await;
    let err = sessions::session_reconcile(q.pool(), a, &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, streamspace_core::Error::Superseded { .. }),
        "{err:?}"
    );
    assert_eq!(state_of(&q, "s-mine").await.0, "running");
}

#[tokio::test]
async fn a_lost_session_is_not_overwritten_when_a_command_is_accepted_concurrently() {
    let q = queue().await;
    session(&q, "s-1", "running").await;
    let a = connect(&q, "agent-a", "d/agent-a/1").await;

    // A user's hibernate is being accepted: the session moved and the command written,
    // not yet committed.
    let mut accepting = q.pool().begin().await.unwrap();
    sqlx::query("UPDATE sessions SET state = 'hibernating' WHERE id = 's-1'")
        .execute(&mut *accepting)
        .await
        .unwrap();
    let mut hibernate = stop("agent-a", Some("s-1"));
    hibernate.kind = CommandKind::HibernateSession(Default::default());
    CommandQueue::command_enqueue(&mut accepting, &hibernate)
        .await
        .unwrap();

    // The agent reconnects without the session; reconciliation runs meanwhile.
    let pool = q.pool().clone();
    let reconcile = tokio::spawn(async move { sessions::session_reconcile(&pool, a, &[]).await });
    // Wait until it is blocked on the session row, then let the acceptance commit.
    crate::helpers::eventually("reconciliation waiting on the session row", std::time::Duration::from_secs(20), || async {
        let waiting: (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(q.pool())
        .await
        .unwrap();
        (waiting.0 > 0).then_some(())
    })
    .await;
    accepting.commit().await.unwrap();
    let r = reconcile.await.unwrap().unwrap();
    assert!(r.lost.is_empty(), "{r:?}");
    assert_eq!(state_of(&q, "s-1").await.0, "hibernating");
}

/// Ended sessions are pruned after the retention, but not one a command is still open
/// for, and not a live one.
#[tokio::test]
async fn prune_removes_ended_sessions_without_open_commands_only() {
    let q = queue().await;
    session(&q, "s-ended", "terminated").await;
    session(&q, "s-failed", "failed").await;
    session(&q, "s-live", "running").await;
    session(&q, "s-ending", "terminated").await;
    enqueue(&q, &stop("agent-a", Some("s-ending"))).await;
    let sessions_left = || async {
        let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM sessions ORDER BY id")
            .fetch_all(q.pool())
            .await
            .unwrap();
        ids.into_iter().map(|(id,)| id).collect::<Vec<_>>()
    };
    assert_eq!(
        q.session_prune(std::time::Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0,
        "too recent"
    );
    let pruned = crate::helpers::eventually(
        "the ended sessions to age past a 1ms retention",
        std::time::Duration::from_secs(5),
        || async {
            let n = q
                .session_prune(std::time::Duration::from_millis(1), 100)
                .await
                .unwrap();
            (n > 0).then_some(n)
        },
    )
    .await;
    assert_eq!(pruned, 2);
    assert_eq!(sessions_left().await, ["s-ending", "s-live"]);
}
