//! The delivery path under injected faults: the dispatcher's database connections go
//! through a fault proxy (cut, held, black-holed, down), handshakes race, and reports
//! arrive together with stale observations. Each `regression_*` test pins one defect of
//! the delivery-path review and fails on the code before its fix.

use std::time::Duration;

use streamspace_core::command::{CommandKind, WakeSession};
use streamspace_core::queue::NewCommand;
use streamspace_proto::agent::v1::{self as pb, agent_message::Msg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::helpers::{
    RawAgent, TestDispatcher, channel, connected_owner, database_behind_proxy, dispatcher_behind,
    eventually, hello, keep_beating, last_heartbeat, open, stop,
};

/// Generous bound for anything a test waits on; reaching it is a failure, not a timing.
const LIMIT: Duration = Duration::from_secs(20);

async fn status(d: &TestDispatcher, id: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM agent_commands WHERE command_id = $1")
        .bind(id)
        .fetch_one(&d.pool)
        .await
        .unwrap()
}

async fn wait_status(d: &TestDispatcher, id: &str, want: &str) {
    eventually(&format!("command {id} {want}"), LIMIT, || async {
        (status(d, id).await.0 == want).then_some(())
    })
    .await;
}

/// Defect 2: a claim whose commit reply is lost leaves a lease the connection never
/// learns of. Heartbeats used to renew every lease of the owner, so that command (and its
/// session's later ones) stayed stuck for as long as the stream lived. Now only the leases
/// the connection holds are renewed: the orphan expires, is rescued and delivered.
#[tokio::test]
async fn regression_orphan_lease_expires() {
    let (url, proxy) = database_behind_proxy().await;
    let d = dispatcher_behind(&url, &proxy, |c| {
        c.queue.lease = Duration::from_secs(1);
        // The hold below must not make this replica give up its agents.
        c.db_failures_before_unready = 1_000;
    })
    .await;
    let token = d.agent("agent-a").await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let beating = keep_beating(&agent.tx, Duration::from_millis(100));

    // The claim that leases the command commits in PostgreSQL, but its reply never
    // reaches the dispatcher (statements without rows, like heartbeats, still complete).
    proxy.hold_pg_row_completions();
    let cmd = stop("agent-a", "s-1");
    d.enqueue(std::slice::from_ref(&cmd)).await;
    let id = cmd.command_id.to_string();
    wait_status(&d, &id, "sent").await;
    proxy.sever_into(streamspace_faultnet::Mode::Pass);
    // The orphaned lease expires and the command is delivered after all.
    let delivered = agent.next_command(LIMIT).await;
    assert_eq!(delivered.command_id, id);
    agent.ack(&delivered).await;
    agent.complete(&delivered).await;
    wait_status(&d, &id, "completed").await;
    assert_eq!(
        status(&d, &id).await.1,
        2,
        "the lost claim counted as an attempt"
    );
    beating.abort();
}

/// Defect 2, second half: a result whose write fails (the database is down for a moment)
/// used to be logged and forgotten while its lease was renewed forever. It is now kept and
/// written again once the database is back.
#[tokio::test]
async fn a_result_whose_write_fails_is_written_again() {
    let (url, proxy) = database_behind_proxy().await;
    let d = dispatcher_behind(&url, &proxy, |c| c.db_failures_before_unready = 1_000).await;
    let token = d.agent("agent-a").await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let cmd = stop("agent-a", "s-1");
    d.enqueue(std::slice::from_ref(&cmd)).await;
    let id = cmd.command_id.to_string();
    let delivered = agent.next_command(LIMIT).await;
    agent.ack(&delivered).await;
    wait_status(&d, &id, "ack").await;

    proxy.down();
    agent.complete(&delivered).await;
    eventually("a failed report write", LIMIT, || async {
        (d.metric("streamspace_dispatcher_report_write_errors_total")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    proxy.pass();
    let beating = keep_beating(&agent.tx, Duration::from_millis(100));
    wait_status(&d, &id, "completed").await;
    assert_eq!(status(&d, &id).await.1, 1, "completed on its first attempt");
    beating.abort();
}

/// Defect 6: a dispatcher that lost PostgreSQL used to keep its agents' streams open
/// while the database already showed them offline — so no healthy replica could take
/// them over. Now it reports not-ready and ends the streams; the agent fails over.
#[tokio::test]
async fn regression_db_loss_ends_streams() {
    let (url, proxy) = database_behind_proxy().await;
    let sick = dispatcher_behind(&url, &proxy, |_| {}).await;
    let healthy = TestDispatcher::start_with(crate::helpers::fast_config(&url)).await;
    let token = sick.agent("agent-a").await;
    let mut agent = RawAgent::connect(&sick.url(), &token).await;
    let beating = keep_beating(&agent.tx, Duration::from_millis(100));
    assert_eq!(sick.readiness().await, 200);

    // Silence, not errors: the hardest loss to notice.
    proxy.blackhole();
    assert_eq!(
        agent.end_status(LIMIT).await,
        tonic::Code::Unavailable,
        "the stream ends, telling the agent to go elsewhere"
    );
    beating.abort();
    assert_eq!(
        sick.readiness().await,
        503,
        "not ready while the database is gone"
    );
    assert_eq!(
        overall_health(&sick).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32,
        "gRPC health of the whole server follows the database too"
    );

    // The agent fails over to the healthy replica and its work flows there.
    let mut moved = RawAgent::connect(&healthy.url(), &token).await;
    let cmd = stop("agent-a", "s-1");
    healthy.enqueue(std::slice::from_ref(&cmd)).await;
    assert_eq!(
        moved.next_command(LIMIT).await.command_id,
        cmd.command_id.to_string()
    );

    // The sick replica recovers by itself once the database answers again.
    proxy.pass();
    eventually("the replica ready again", LIMIT, || async {
        (sick.readiness().await == 200).then_some(())
    })
    .await;
    assert_eq!(
        overall_health(&sick).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// The gRPC health status of the server as a whole (the empty service name).
async fn overall_health(d: &TestDispatcher) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&d.url()).await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Opens a Connect stream with `token` whose `Hello` is sent later, through the returned
/// sender; the call (which completes only after the handshake) runs on a task.
async fn open_without_hello(
    url: &str,
    token: &str,
) -> (
    mpsc::Sender<pb::AgentMessage>,
    tokio::task::JoinHandle<Result<tonic::Streaming<pb::DispatcherMessage>, tonic::Status>>,
) {
    let (tx, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel(url).await);
    let call = tokio::spawn(async move { client.connect(request).await.map(|r| r.into_inner()) });
    (tx, call)
}

/// Defect 4: a slow handshake (epoch N) finishing after a redial's (N+1) used to release
/// the live connection's leases (an acknowledged command lost its lease and burned an
/// attempt) and get welcomed. Every step of a handshake is now fenced by its epoch: the
/// stale one ends with ABORTED and touches nothing.
#[tokio::test]
async fn regression_stale_handshake_fenced() {
    let (url, proxy) = database_behind_proxy().await;
    // Replica 1 reaches the database through the proxy (its replies will be held);
    // replica 2 directly.
    let slow = dispatcher_behind(&url, &proxy, |c| c.db_failures_before_unready = 1_000).await;
    let fast = TestDispatcher::start_with(crate::helpers::fast_config(&url)).await;
    let token = slow.agent("agent-a").await;

    // A authenticates on replica 1 and is waiting for its own Hello.
    let (a_tx, a_call) = open_without_hello(&slow.url(), &token).await;
    eventually("A authenticated", LIMIT, || async {
        (slow
            .metric("streamspace_dispatcher_handshakes_in_progress")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    let (epoch_before,): (i64,) =
        sqlx::query_as("SELECT connection_epoch FROM agents WHERE agent_id = 'agent-a'")
            .fetch_one(&fast.pool)
            .await
            .unwrap();

    // A's connect commits (epoch N) but the reply is held: its handshake stalls there.
    proxy.hold_pg_completions();
    a_tx.send(hello(vec![])).await.unwrap();
    eventually("A's epoch committed", LIMIT, || async {
        let (epoch,): (i64,) =
            sqlx::query_as("SELECT connection_epoch FROM agents WHERE agent_id = 'agent-a'")
                .fetch_one(&fast.pool)
                .await
                .unwrap();
        (epoch == epoch_before + 1).then_some(())
    })
    .await;

    // Meanwhile the agent redials replica 2 (epoch N+1) and acknowledges a command.
    let mut b = RawAgent::connect(&fast.url(), &token).await;
    assert_eq!(b.welcome.connection_epoch, epoch_before + 2);
    let cmd = stop("agent-a", "s-1");
    fast.enqueue(std::slice::from_ref(&cmd)).await;
    let id = cmd.command_id.to_string();
    let held = b.next_command(LIMIT).await;
    b.ack(&held).await;
    wait_status(&fast, &id, "ack").await;

    // A's handshake resumes: it must end itself without touching B's lease.
    proxy.pass();
    let a = tokio::time::timeout(LIMIT, a_call)
        .await
        .expect("A's handshake ends")
        .unwrap();
    match a {
        Err(status) => assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}"),
        Ok(mut stream) => {
            let first = stream.message().await;
            panic!("the superseded handshake was served: first message {first:?}");
        }
    }
    assert_eq!(status(&fast, &id).await, ("ack".to_owned(), 1));
    b.complete(&held).await;
    wait_status(&fast, &id, "completed").await;
    assert_eq!(status(&fast, &id).await.1, 1, "no attempt burned");
    b.heartbeat().await;
    assert!(fast.agent_online("agent-a").await);
}

/// A handshake whose connect committed but whose reply was lost used to leave the agent
/// shown online (`connected_owner` set) with nobody holding its stream. It is undone.
#[tokio::test]
async fn a_failed_handshake_leaves_no_phantom_online_agent() {
    let (url, proxy) = database_behind_proxy().await;
    let d = dispatcher_behind(&url, &proxy, |c| c.db_failures_before_unready = 1_000).await;
    let token = d.agent("agent-a").await;
    let (tx, call) = open_without_hello(&d.url(), &token).await;
    eventually("authenticated", LIMIT, || async {
        (d.metric("streamspace_dispatcher_handshakes_in_progress")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    proxy.hold_pg_completions();
    tx.send(hello(vec![])).await.unwrap();
    eventually("the connect committed", LIMIT, || async {
        connected_owner(&d.pool, "agent-a")
            .await
            .is_some()
            .then_some(())
    })
    .await;
    // The connect's reply is lost with its connection.
    proxy.sever_into(streamspace_faultnet::Mode::Pass);
    let ended = tokio::time::timeout(LIMIT, call)
        .await
        .expect("the handshake ends")
        .unwrap();
    assert_eq!(
        ended
            .expect_err("a handshake without its connect's answer fails")
            .code(),
        tonic::Code::Unavailable
    );
    eventually("the connect undone", LIMIT, || async {
        connected_owner(&d.pool, "agent-a")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!d.agent_online("agent-a").await);
    // And the agent's next attempt is served normally.
    RawAgent::connect(&d.url(), &token).await;
}

/// Defect 5: reports that arrive together used to be applied by kind — completions
/// first, observations after — so a heartbeat's `hibernated` sent *before* a wake's
/// result overwrote the `running` the result set. They are now applied in stream order.
#[tokio::test]
async fn regression_reports_in_stream_order() {
    let (url, proxy) = database_behind_proxy().await;
    let d = dispatcher_behind(&url, &proxy, |c| c.db_failures_before_unready = 1_000).await;
    let token = d.agent("agent-a").await;
    sqlx::query(
        "INSERT INTO sessions (id, user_id, template, agent_id, state) \
         VALUES ('s-1', 'u', 'firefox-browser', 'agent-a', 'waking')",
    )
    .execute(&d.pool)
    .await
    .unwrap();
    let wake = NewCommand::new(
        "agent-a",
        Some("s-1".into()),
        CommandKind::WakeSession(WakeSession::default()),
    );
    d.enqueue(std::slice::from_ref(&wake)).await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let delivered = agent.next_command(LIMIT).await;
    agent.ack(&delivered).await;
    wait_status(&d, &delivered.command_id, "ack").await;

    // Park the reader inside a write (its reply held), so the next two messages are read
    // together, in one batch.
    proxy.hold_pg_completions();
    let before = last_heartbeat(&d.pool, "agent-a").await;
    agent.heartbeat().await;
    eventually("the parked heartbeat", LIMIT, || async {
        (last_heartbeat(&d.pool, "agent-a").await > before).then_some(())
    })
    .await;
    // The heartbeat listed the session before the wake took effect; the result follows.
    agent
        .send(Msg::Heartbeat(pb::Heartbeat {
            sessions: vec![pb::SessionObservation {
                session_id: "s-1".into(),
                state: pb::SessionState::Hibernated as i32,
                ..Default::default()
            }],
            ..Default::default()
        }))
        .await;
    agent.complete(&delivered).await;
    proxy.pass();

    wait_status(&d, &delivered.command_id, "completed").await;
    // One more heartbeat, recorded only after the batch above was applied in full.
    let before = last_heartbeat(&d.pool, "agent-a").await;
    agent.heartbeat().await;
    eventually("a later heartbeat", LIMIT, || async {
        (last_heartbeat(&d.pool, "agent-a").await > before).then_some(())
    })
    .await;
    let (state,): (String,) = sqlx::query_as("SELECT state FROM sessions WHERE id = 's-1'")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(state, "running", "the older observation overwrote the wake");
}

/// A result under a token the connection does not hold used to free a slot of the
/// in-flight window, so the dispatcher pushed more than `max_in_flight` at once.
#[tokio::test]
async fn a_stale_result_does_not_widen_the_in_flight_window() {
    let url = streamspace_devpg::testdb::fresh_database_url(&streamspace_core::db::MIGRATOR).await;
    let mut config = crate::helpers::fast_config(&url);
    config.max_in_flight = 1;
    let d = TestDispatcher::start_with(config).await;
    let token = d.agent("agent-a").await;
    let first = stop("agent-a", "s-1");
    let second = stop("agent-a", "s-2");
    d.enqueue(&[first.clone(), second.clone()]).await;
    let mut agent = RawAgent::connect(&d.url(), &token).await;
    let one = agent.next_command(LIMIT).await;
    assert_eq!(one.command_id, first.command_id.to_string());
    agent.ack(&one).await;

    // A result for the same command under a token it was never delivered with.
    let mut forged = one.clone();
    forged.lease_token += 1_000;
    agent.complete(&forged).await;
    let before = last_heartbeat(&d.pool, "agent-a").await;
    agent.heartbeat().await;
    eventually("the stale result read", LIMIT, || async {
        (last_heartbeat(&d.pool, "agent-a").await > before).then_some(())
    })
    .await;
    assert_eq!(status(&d, &one.command_id).await.0, "ack");

    // Only the real result frees the slot: the second command is sent after it.
    agent.complete(&one).await;
    let two = agent.next_command(LIMIT).await;
    assert_eq!(two.command_id, second.command_id.to_string());
    let (sent_after_completion,): (bool,) = sqlx::query_as(
        "SELECT s.sent_at >= f.completed_at FROM agent_commands s, agent_commands f \
         WHERE s.command_id = $1 AND f.command_id = $2",
    )
    .bind(&two.command_id)
    .bind(&one.command_id)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert!(
        sent_after_completion,
        "the second command was pushed while the first was still outstanding"
    );
}

/// The handshake gauge used by the handshake race above reads 0 once agents are served.
#[tokio::test]
async fn handshakes_in_progress_returns_to_zero() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    let agent = RawAgent::connect(&d.url(), &token).await;
    assert!(agent.welcome.connection_epoch >= 1);
    assert_eq!(
        d.metric("streamspace_dispatcher_handshakes_in_progress")
            .await,
        0.0
    );
}

/// An agent that goes away in the middle of its handshake — after the dispatcher recorded
/// the connection, before the `Welcome` — does not stay recorded as connected. Before, the
/// server dropped the call's future at the agent's reset, and with it the handshake's undo:
/// `connected_owner` named a connection nobody served until the agent came back (seen in
/// the benchmarks as a killed agent still connected 30 s later).
#[tokio::test]
async fn an_agent_that_leaves_mid_handshake_is_not_left_connected() {
    let d = TestDispatcher::start().await;
    let token = d.agent("agent-a").await;
    // A running session the agent will not report: reconciling marks it lost, and this
    // transaction's row lock holds the handshake there, after the connect is recorded.
    sqlx::query(
        "INSERT INTO sessions (id, user_id, template, agent_id, state)
         VALUES ('s-held', 'u', 'firefox-browser', 'agent-a', 'running')",
    )
    .execute(&d.pool)
    .await
    .unwrap();
    let mut held = d.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sessions WHERE id = 's-held' FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();

    let url = d.url();
    let call = tokio::spawn(async move { open(&url, Some(&token), hello(vec![])).await });
    eventually("the handshake recorded and waiting", LIMIT, || async {
        let (recorded, waiting): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM agents
                            WHERE agent_id = 'agent-a' AND connected_owner IS NOT NULL),
                    EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted)",
        )
        .fetch_one(&d.pool)
        .await
        .unwrap();
        (recorded && waiting).then_some(())
    })
    .await;

    // The agent goes away; the server gives up the call.
    call.abort();
    eventually("the call abandoned", LIMIT, || async {
        (d.metric("streamspace_dispatcher_handshakes_abandoned_total")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    held.rollback().await.unwrap();

    eventually("the connection no longer recorded", LIMIT, || async {
        connected_owner(&d.pool, "agent-a")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!d.agent_online("agent-a").await);
}
