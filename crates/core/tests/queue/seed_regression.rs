//! Regression for the seed report (P1-COMMAND-SCAN-001): the original dispatcher scanned
//! NULL `error_message` into a non-nullable string and skipped every pending row.

use std::sync::atomic::Ordering;

use streamspace_core::command::{Action, CommandKind};
use streamspace_core::telemetry::METRICS;

use crate::helpers::{claim, queue, status_of};

#[tokio::test]
async fn rows_written_by_plain_sql_with_every_optional_column_null_are_delivered() {
    let q = queue().await;
    // Exactly what the original API wrote: only the required columns, the rest NULL.
    sqlx::query(
        "INSERT INTO agent_commands (command_id, agent_id, session_id, action, status)
         VALUES ('cmd-26acdfcf', 'agent-a', 'admin-firefox-browser-1edf5ee9', 'stop_session', 'pending')",
    )
    .execute(q.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO agent_commands (agent_id, action) VALUES ('agent-a', 'hibernate_session')",
    )
    .execute(q.pool())
    .await
    .unwrap();

    // The seed report's own query runs unchanged and shows what the report expected.
    let (command_id, session_id, action, status, error_message): (
        String,
        Option<String>,
        String,
        String,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT command_id, session_id, action, status, error_message
         FROM agent_commands
         WHERE session_id = 'admin-firefox-browser-1edf5ee9'
         ORDER BY created_at DESC
         LIMIT 1",
    )
    .fetch_one(q.pool())
    .await
    .unwrap();
    assert_eq!(
        (
            command_id.as_str(),
            session_id.as_deref(),
            action.as_str(),
            status.as_str(),
            error_message
        ),
        (
            "cmd-26acdfcf",
            Some("admin-firefox-browser-1edf5ee9"),
            "stop_session",
            "pending",
            None
        )
    );
    let nulls: (bool,) = sqlx::query_as(
        "SELECT bool_and(error_message IS NULL AND result IS NULL AND sent_at IS NULL
                         AND acknowledged_at IS NULL AND completed_at IS NULL
                         AND lease_owner IS NULL AND lease_token IS NULL
                         AND lease_expires_at IS NULL AND idempotency_key IS NULL
                         AND expires_at IS NULL AND trace_context IS NULL)
         FROM agent_commands",
    )
    .fetch_one(q.pool())
    .await
    .unwrap();
    assert!(nulls.0, "every optional column is NULL");

    let batch = claim(&q, "agent-a", "conn-1", 10).await;
    assert!(batch.quarantined.is_empty());
    let got: Vec<(String, Option<String>, Action)> = batch
        .commands
        .iter()
        .map(|c| {
            (
                c.command_id.to_string(),
                c.session_id.clone(),
                c.kind.action(),
            )
        })
        .collect();
    assert_eq!(got.len(), 2, "both rows delivered: {got:?}");
    assert_eq!(
        got[0],
        (
            "cmd-26acdfcf".into(),
            Some("admin-firefox-browser-1edf5ee9".into()),
            Action::StopSession
        )
    );
    assert_eq!(got[1].1, None, "NULL session_id is ordinary data");
    assert_eq!(got[1].2, Action::HibernateSession);
    assert!(batch.commands.iter().all(|c| c.lease.is_some()));
}

#[tokio::test]
async fn an_undecodable_row_is_quarantined_and_the_rows_behind_it_still_flow() {
    let q = queue().await;
    let before = METRICS.commands_quarantined.load(Ordering::Relaxed);
    for (session, action, payload) in [
        ("s-1", "reboot_cluster", "{}"),                 // unknown action
        ("s-1", "stop_session", "{}"),                   // same session, behind it
        ("s-2", "start_session", r#"{"template": 42}"#), // known action, bad payload
        ("s-3", "wake_session", "{}"),
    ] {
        sqlx::query("INSERT INTO agent_commands (agent_id, session_id, action, payload) VALUES ('agent-a', $1, $2, $3::jsonb)")
            .bind(session)
            .bind(action)
            .bind(payload)
            .execute(q.pool())
            .await
            .unwrap();
    }

    let first = claim(&q, "agent-a", "conn-1", 10).await;
    let reasons: Vec<&str> = first
        .quarantined
        .iter()
        .map(|x| x.reason.as_str())
        .collect();
    assert_eq!(first.quarantined.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown action \"reboot_cluster\"")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("invalid payload for start_session")),
        "{reasons:?}"
    );
    assert!(METRICS.commands_quarantined.load(Ordering::Relaxed) >= before + 2);
    for bad in &first.quarantined {
        let (status, error) = status_of(&q, &bad.command_id).await;
        assert_eq!(status, "failed");
        assert_eq!(error.as_deref(), Some(bad.reason.as_str()));
    }
    assert_eq!(first.commands.len(), 1);
    assert!(matches!(
        first.commands[0].kind,
        CommandKind::WakeSession(_)
    ));

    // The quarantined row is terminal, so its session's next command is deliverable.
    let second = claim(&q, "agent-a", "conn-1", 10).await;
    assert_eq!(second.commands.len(), 1);
    assert_eq!(second.commands[0].session_id.as_deref(), Some("s-1"));
    assert!(matches!(
        second.commands[0].kind,
        CommandKind::StopSession(_)
    ));
}
