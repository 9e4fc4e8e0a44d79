//! Protocol-level behaviour, driven by a raw client.

use std::collections::HashMap;
use std::time::Duration;

use streamspace_core::queue::NewCommand;
use streamspace_proto::agent::v1::{self as pb, agent_message::Msg};

use crate::helpers::{
    RawAgent, TestDispatcher, connected_owner, eventually, hello, keep_beating, open, stop,
};

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn missing_wrong_and_revoked_credentials_are_rejected() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;

    let err = open(&d.url(), None, hello(vec![]))
        .await
        .expect_err("no credential refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = open(&d.url(), Some("ssa_0000"), hello(vec![]))
        .await
        .expect_err("wrong refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("unknown or revoked"),
        "{}",
        err.message()
    );

    let cred: (String,) = sqlx::query_as("SELECT credential_id FROM agent_credentials")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    streamspace_core::agents::credential_revoke(&d.pool, "agent-a", &cred.0)
        .await
        .unwrap();
    let err = open(&d.url(), Some(&token), hello(vec![]))
        .await
        .expect_err("revoked refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

/// Revoking a credential also ends the stream already open with it, at its next
/// heartbeat, and the agent shows offline; until then it was served as usual.
#[tokio::test]
async fn revoking_a_credential_ends_its_live_stream() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    agent.heartbeat().await;
    eventually("the agent online", LIMIT, || async {
        d.agent_online("agent-a").await.then_some(())
    })
    .await;

    let cred: (String,) = sqlx::query_as("SELECT credential_id FROM agent_credentials")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    streamspace_core::agents::credential_revoke(&d.pool, "agent-a", &cred.0)
        .await
        .unwrap();
    let beating = crate::helpers::keep_beating(&agent.tx, Duration::from_millis(50));
    assert_eq!(agent.end_status(LIMIT).await, tonic::Code::Unauthenticated);
    beating.abort();
    eventually("the agent offline", LIMIT, || async {
        (!d.agent_online("agent-a").await).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_inventory_over_the_limit_is_refused() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let too_many = (0..=streamspace_command_dispatcher::MAX_INVENTORY)
        .map(|i| pb::SessionObservation {
            session_id: format!("s-{i}"),
            state: pb::SessionState::Running as i32,
            ..Default::default()
        })
        .collect();
    let err = open(&d.url(), Some(&token), hello(too_many))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("at most 10000"), "{}", err.message());
    assert!(!d.agent_online("agent-a").await, "never connected");
}

#[tokio::test]
async fn the_first_message_must_be_hello_with_a_known_protocol_version() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let heartbeat = pb::AgentMessage {
        msg: Some(Msg::Heartbeat(pb::Heartbeat::default())),
    };
    let err = open(&d.url(), Some(&token), heartbeat)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let mut future = hello(vec![]);
    if let Some(Msg::Hello(h)) = future.msg.as_mut() {
        h.protocol_version = 99;
    }
    let err = open(&d.url(), Some(&token), future)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("99"), "{}", err.message());
}

#[tokio::test]
async fn a_backlog_queued_while_offline_is_delivered_on_connect_in_per_session_order() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    // 60 commands over 6 sessions, accepted while no agent is connected.
    let cmds: Vec<NewCommand> = (0..60)
        .map(|i| stop("agent-a", &format!("s-{}", i % 6)))
        .collect();
    d.enqueue(&cmds).await;
    let expected: HashMap<String, Vec<String>> = cmds.iter().fold(HashMap::new(), |mut m, c| {
        m.entry(c.session_id.clone().unwrap())
            .or_default()
            .push(c.command_id.to_string());
        m
    });

    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let mut received: HashMap<String, Vec<String>> = HashMap::new();
    let mut outstanding: HashMap<String, String> = HashMap::new();
    for _ in 0..60 {
        let c = agent.next_command(LIMIT).await;
        let session = c.session_id.clone().unwrap();
        assert!(
            outstanding
                .insert(session.clone(), c.command_id.clone())
                .is_none(),
            "two commands of {session} outstanding at once"
        );
        received
            .entry(session.clone())
            .or_default()
            .push(c.command_id.clone());
        agent.ack(&c).await;
        agent.complete(&c).await;
        outstanding.remove(&session);
    }
    assert_eq!(
        received, expected,
        "every command, each session in acceptance order"
    );
    let ids: Vec<String> = cmds.iter().map(|c| c.command_id.to_string()).collect();
    let statuses = eventually("all completed", LIMIT, || async {
        let s = d.statuses(&ids).await;
        s.iter().all(|x| x == "completed").then_some(s)
    })
    .await;
    assert_eq!(statuses.len(), 60);
}

#[tokio::test]
async fn an_agent_only_ever_receives_its_own_commands() {
    let d = TestDispatcher::start().await;
    let token_a = d.agent("agent-a").await;
    let _token_b = d.agent("agent-b").await;
    let for_b: Vec<NewCommand> = (0..5).map(|i| stop("agent-b", &format!("b-{i}"))).collect();
    let for_a = stop("agent-a", "a-1");
    d.enqueue(&for_b).await;
    d.enqueue(std::slice::from_ref(&for_a)).await;

    let mut a = RawAgent::connect(&d.url(), &token_a).await;
    assert_eq!(
        a.welcome.agent_id, "agent-a",
        "identity comes from the credential"
    );
    let c = a.next_command(LIMIT).await;
    assert_eq!(c.command_id, for_a.command_id.to_string());
    a.ack(&c).await;
    a.complete(&c).await;
    assert!(
        a.maybe_command(Duration::from_millis(800)).await.is_none(),
        "nothing of agent-b's"
    );
    let statuses = d
        .statuses(
            &for_b
                .iter()
                .map(|c| c.command_id.to_string())
                .collect::<Vec<_>>(),
        )
        .await;
    assert!(statuses.iter().all(|s| s == "pending"), "{statuses:?}");
}

#[tokio::test]
async fn a_new_connection_fences_the_old_one_and_the_agent_stays_online() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let cmd = stop("agent-a", "s-1");
    d.enqueue(std::slice::from_ref(&cmd)).await;

    let mut old = RawAgent::connect(&d.url(), &token).await;
    let old_owner = connected_owner(&d.pool, "agent-a")
        .await
        .expect("the first connection recorded");
    let held = old.next_command(LIMIT).await;
    old.ack(&held).await;

    let mut new = RawAgent::connect(&d.url(), &token).await;
    assert!(new.welcome.connection_epoch > old.welcome.connection_epoch);
    assert_eq!(
        old.end_status(LIMIT).await,
        tonic::Code::Aborted,
        "the older stream is closed, saying it was superseded"
    );
    // The command the old connection held is redelivered to the new one, with a new token.
    let again = new.next_command(LIMIT).await;
    assert_eq!(again.command_id, held.command_id);
    assert_ne!(again.lease_token, held.lease_token);

    // The old connection's clean-up has run (its stream closed), and it did not take the
    // agent offline: the original system's bug.
    new.heartbeat().await;
    assert!(d.agent_online("agent-a").await, "online throughout");
    let owner: (Option<String>, i64) = sqlx::query_as(
        "SELECT connected_owner, connection_epoch FROM agents WHERE agent_id = 'agent-a'",
    )
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert!(owner.0.is_some());
    assert_eq!(owner.1, new.welcome.connection_epoch);

    // A late report under the old lease changes nothing; the current one completes it.
    let late = d
        .queue
        .command_complete_one(streamspace_core::queue::Completion {
            lease: streamspace_core::command::Lease {
                command_id: held.command_id.parse().unwrap(),
                token: held.lease_token,
                agent_id: "agent-a".into(),
                owner: old_owner.clone(),
            },
            result: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(late, streamspace_core::Error::StaleLease { .. }),
        "{late:?}"
    );
    new.ack(&again).await;
    new.complete(&again).await;
    eventually("completion", LIMIT, || async {
        (d.statuses(&[cmd.command_id.to_string()]).await[0] == "completed").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_silent_agent_goes_offline_its_work_returns_and_it_comes_back() {
    let url = streamspace_devpg::testdb::fresh_database_url(&streamspace_core::db::MIGRATOR).await;
    let mut config = crate::helpers::fast_config(&url);
    // Long enough that no lease expires during the test: what returns, returns by design.
    config.queue.lease = Duration::from_secs(60);
    let d = TestDispatcher::start_with(config).await;
    let token = d.agent("agent-a").await;
    let first = stop("agent-a", "s-1");
    let second = stop("agent-a", "s-2");
    d.enqueue(&[first.clone(), second.clone()]).await;

    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let mut pushed = [
        agent.next_command(LIMIT).await,
        agent.next_command(LIMIT).await,
    ];
    pushed.sort_by_key(|c| c.command_id != first.command_id.to_string());
    let (held, unacked) = (pushed[0].clone(), pushed[1].clone());
    agent.ack(&held).await;
    eventually("ack applied", LIMIT, || async {
        (d.statuses(std::slice::from_ref(&held.command_id)).await[0] == "ack").then_some(())
    })
    .await;
    assert!(d.agent_online("agent-a").await);
    // Say nothing from here on: a black-holed agent.
    assert!(
        agent.closed_within(LIMIT).await,
        "the dispatcher drops a silent agent"
    );
    eventually("agent offline", LIMIT, || async {
        (!d.agent_online("agent-a").await).then_some(())
    })
    .await;
    assert_eq!(
        d.statuses(&[held.command_id.clone(), unacked.command_id.clone()])
            .await,
        vec!["ack", "pending"],
        "the unacknowledged lease returned at once; the acknowledged one waits for the agent, which may still be running it"
    );

    let queued_meanwhile = stop("agent-a", "s-3");
    d.enqueue(std::slice::from_ref(&queued_meanwhile)).await;
    let mut back = RawAgent::connect(&d.url(), &token).await;
    back.heartbeat().await;
    eventually("agent online", LIMIT, || async {
        d.agent_online("agent-a").await.then_some(())
    })
    .await;
    let mut got = vec![
        back.next_command(LIMIT).await.command_id,
        back.next_command(LIMIT).await.command_id,
        back.next_command(LIMIT).await.command_id,
    ];
    got.sort();
    let mut want = vec![
        held.command_id.clone(),
        unacked.command_id.clone(),
        queued_meanwhile.command_id.to_string(),
    ];
    want.sort();
    assert_eq!(got, want, "backlog delivered after healing");
}

#[tokio::test]
async fn heartbeats_on_time_keep_the_agent_online_without_flapping() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let interval = Duration::from_millis(u64::from(agent.welcome.heartbeat_interval_ms));
    // Ten intervals (over three offline bounds) of punctual heartbeats.
    for _ in 0..10 {
        agent.heartbeat().await;
        assert!(d.agent_online("agent-a").await, "flapped offline");
        assert!(agent.maybe_command(interval).await.is_none());
    }
    assert!(d.agent_online("agent-a").await);
}

#[tokio::test]
async fn graceful_shutdown_releases_leases_and_closes_streams() {
    let mut d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let cmd = stop("agent-a", "s-1");
    d.enqueue(std::slice::from_ref(&cmd)).await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let held = agent.next_command(LIMIT).await;
    agent.ack(&held).await;
    eventually("ack applied", LIMIT, || async {
        (d.statuses(std::slice::from_ref(&held.command_id)).await[0] == "ack").then_some(())
    })
    .await;

    let unacked = stop("agent-a", "s-2");
    d.enqueue(std::slice::from_ref(&unacked)).await;
    assert_eq!(
        agent.next_command(LIMIT).await.command_id,
        unacked.command_id.to_string()
    );

    d.shutdown().await;
    assert!(
        agent.closed_within(LIMIT).await,
        "stream closed so the agent reconnects elsewhere"
    );
    assert_eq!(
        d.statuses(&[held.command_id.clone(), unacked.command_id.to_string()])
            .await,
        vec!["ack", "pending"],
        "the unacknowledged lease released at once; the acknowledged one kept for the agent"
    );
    assert!(!d.agent_online("agent-a").await);

    // The agent reconnects to another replica, which takes both back at once.
    let other = TestDispatcher::start_with(d.config.clone()).await;
    let mut back = RawAgent::connect(&other.url(), &token).await;
    let mut got = vec![
        back.next_command(LIMIT).await.command_id,
        back.next_command(LIMIT).await.command_id,
    ];
    got.sort();
    let mut want = vec![held.command_id.clone(), unacked.command_id.to_string()];
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn an_undecodable_row_is_quarantined_counted_on_metrics_and_the_queue_keeps_flowing() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    // Written by something that knows an action this build does not.
    sqlx::query(
        "INSERT INTO agent_commands (command_id, agent_id, session_id, action)
         VALUES ('cmd-from-the-future', 'agent-a', 's-1', 'teleport_session')",
    )
    .execute(&d.pool)
    .await
    .unwrap();
    let behind = stop("agent-a", "s-1");
    d.enqueue(std::slice::from_ref(&behind)).await;

    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let c = agent.next_command(LIMIT).await;
    assert_eq!(
        c.command_id,
        behind.command_id.to_string(),
        "the row behind it is delivered"
    );
    let (status, error): (String, Option<String>) = sqlx::query_as(
        "SELECT status, error_message FROM agent_commands WHERE command_id = 'cmd-from-the-future'",
    )
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(status, "failed");
    assert!(
        error
            .unwrap()
            .contains("unknown action \"teleport_session\"")
    );

    let text = reqwest::get(format!("http://{}/metrics", d.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let quarantined: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("streamspace_commands_quarantined_total "))
        .expect("the counter is exported")
        .parse()
        .unwrap();
    assert!(quarantined >= 1, "{text}");
    assert!(
        text.contains("streamspace_dispatcher_agent_connections 1"),
        "{text}"
    );
}

/// A dispatcher whose poll would not find anything within the test's limit: whatever is
/// delivered was woken for.
async fn dispatcher_without_poll(backoff: Duration) -> TestDispatcher {
    let url = streamspace_devpg::testdb::fresh_database_url(&streamspace_core::db::MIGRATOR).await;
    let mut config = crate::helpers::fast_config(&url);
    config.poll_interval_ms = 600_000;
    config.queue.retry_base = backoff;
    config.queue.retry_cap = backoff;
    TestDispatcher::start_with(config).await
}

/// Queues one command for `agent-a`, connects, and fails its first delivery retryably.
/// Returns the agent's token, its connection and the command's id.
async fn fail_first_delivery(d: &TestDispatcher) -> (String, RawAgent, String) {
    let token = d.agent("agent-a").await;
    let cmd = stop("agent-a", "s-1");
    d.enqueue(std::slice::from_ref(&cmd)).await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let first = agent.next_command(LIMIT).await;
    agent.ack(&first).await;
    agent.fail(&first, true).await;
    (token, agent, cmd.command_id.to_string())
}

#[tokio::test]
async fn a_retry_is_delivered_when_its_backoff_ends_not_at_the_next_poll() {
    let d = dispatcher_without_poll(Duration::from_millis(300)).await;
    let (_token, mut agent, id) = fail_first_delivery(&d).await;
    let again = agent.next_command(LIMIT).await;
    assert_eq!(again.command_id, id);
    assert_eq!(again.attempt, 2);
}

#[tokio::test]
async fn a_retry_scheduled_before_the_agent_reconnected_is_delivered_when_due() {
    // Backoff 2-4 s (jittered): long enough that the first connection is gone before the
    // retry is due.
    let d = dispatcher_without_poll(Duration::from_secs(4)).await;
    let (token, agent, id) = fail_first_delivery(&d).await;
    eventually("the failure written", LIMIT, || async {
        (d.statuses(std::slice::from_ref(&id)).await[0] == "pending").then_some(())
    })
    .await;
    drop(agent);

    // A new connection knows nothing of the backoff; it reads when the retry is due.
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let beating = keep_beating(&agent.tx, Duration::from_millis(100));
    let again = agent.next_command(LIMIT).await;
    assert_eq!(again.command_id, id);
    assert_eq!(again.attempt, 2);
    beating.abort();
}

/// Calls start with small codec buffers (`streamspace_proto::codec`), which must grow for
/// larger messages: a Hello many times that size is read whole, and a command with a
/// payload near its limit arrives intact.
#[tokio::test]
async fn messages_far_larger_than_the_starting_buffers_cross_whole() {
    use streamspace_core::command::StartSession;

    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    // Capabilities this dispatcher does not know are ignored, so they make a large Hello
    // that changes nothing else.
    let mut first = hello(vec![]);
    if let Some(Msg::Hello(h)) = first.msg.as_mut() {
        h.capabilities = (0..2_000)
            .map(|i| format!("x-unknown-capability-{i:05}"))
            .collect();
    }
    assert!(
        prost::Message::encoded_len(&first) > 32 * streamspace_proto::codec::BUFFER_BYTES,
        "the Hello is larger than the buffers"
    );
    let mut agent = RawAgent::connect_with(&d.url(), &token, first).await;
    eventually("the agent online", LIMIT, || async {
        d.agent_online("agent-a").await.then_some(())
    })
    .await;

    let env = (0..600)
        .map(|i| (format!("VARIABLE_{i:04}"), "x".repeat(80)))
        .collect();
    let start = NewCommand::new(
        "agent-a",
        Some("s-big".into()),
        streamspace_core::command::CommandKind::StartSession(StartSession {
            template: "firefox-browser".into(),
            user_id: None,
            resources: None,
            home_volume: false,
            env,
        }),
    );
    d.enqueue(std::slice::from_ref(&start)).await;
    let got = agent.next_command(LIMIT).await;
    assert_eq!(got.command_id, start.command_id.to_string());
    let payload: serde_json::Value = serde_json::from_str(&got.payload_json).unwrap();
    assert_eq!(payload, start.kind.payload());
    assert!(got.payload_json.len() > 32 * streamspace_proto::codec::BUFFER_BYTES);
}
