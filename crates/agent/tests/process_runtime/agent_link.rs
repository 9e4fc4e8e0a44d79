//! The whole agent (connection loop, executor, process runtime) against a scripted
//! dispatcher over real gRPC: handshake, ack-then-result, redelivery after a reconnect
//! without a second effect, pings, pushed session status, rejected credentials, and a
//! clean close at shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use streamspace_agent::runtime::SessionRuntime;
use streamspace_agent::{Agent, AgentConfig, ConnectionState};
use streamspace_proto::agent::v1 as pb;
use streamspace_proto::agent::v1::agent_message::Msg;
use streamspace_proto::agent::v1::command_result::Outcome;
use streamspace_proto::agent::v1::dispatcher_message::Msg as Out;

use crate::fake_dispatcher::{AGENT_ID, FakeDispatcher};
use crate::helpers::*;

fn command(id: &str, session: &str, action: &str, payload: &str, lease: i64) -> Out {
    Out::Command(pb::Command {
        command_id: id.into(),
        session_id: Some(session.into()),
        action: action.into(),
        payload_json: payload.into(),
        lease_token: lease,
        attempt: 1,
        deadline_unix_ms: 0,
        trace_context: String::new(),
        after_command_id: String::new(),
    })
}

const START: &str = r#"{"template":"firefox-browser"}"#;

fn expect_ack(msg: Msg, lease: i64) {
    match msg {
        Msg::Ack(ack) => assert_eq!(ack.lease_token, lease, "{ack:?}"),
        other => panic!("expected Ack, got {other:?}"),
    }
}

fn expect_result(msg: Msg) -> pb::CommandResult {
    match msg {
        Msg::Result(result) => result,
        other => panic!("expected CommandResult, got {other:?}"),
    }
}

fn completed(result: &pb::CommandResult) -> pb::SessionObservation {
    match &result.outcome {
        Some(Outcome::Completed(c)) => c.session.clone().unwrap(),
        other => panic!("expected Completed, got {other:?}"),
    }
}

#[tokio::test]
async fn executes_once_and_replays_across_a_reconnect() {
    let dir = StateDir::new();
    let mut dispatcher = FakeDispatcher::start("tok-1", 60_000).await;
    let runtime = Arc::new(dir.runtime(catalog()).await);
    let config = AgentConfig::new(&dispatcher.url, "tok-1", dir.path());
    let mut agent = Agent::new(config, runtime.clone()).unwrap().spawn();

    let mut conn = dispatcher.accept().await;
    let hello = &conn.hello;
    assert_eq!(hello.protocol_version, pb::PROTOCOL_VERSION);
    assert_eq!(hello.runtime, "process");
    assert!(!hello.agent_version.is_empty());
    assert!(hello.capabilities.iter().any(|c| c == "start_session"));
    assert!(
        hello
            .capabilities
            .iter()
            .any(|c| c == "template:firefox-browser")
    );
    assert!(hello.sessions.is_empty());
    let first = agent.wait_connected(None).await.unwrap();
    assert_eq!(
        (first.agent_id.as_str(), first.epoch),
        (AGENT_ID, conn.epoch)
    );

    conn.send(command("cmd-1", "s-link", "start_session", START, 1))
        .await;
    expect_ack(conn.recv().await, 1);
    let result = expect_result(conn.recv().await);
    assert_eq!(
        (result.command_id.as_str(), result.lease_token),
        ("cmd-1", 1)
    );
    let session = completed(&result);
    assert_eq!(session.state, pb::SessionState::Running as i32);
    assert!(session.url.starts_with("http://127.0.0.1:"), "{session:?}");
    dir.track(runtime.pid("s-link").unwrap());

    // The dispatcher goes away; the agent is back at once and reports its session.
    conn.cut();
    let mut conn = dispatcher.accept().await;
    let listed: Vec<(&str, i32)> = conn
        .hello
        .sessions
        .iter()
        .map(|s| (s.session_id.as_str(), s.state))
        .collect();
    assert_eq!(listed, [("s-link", pb::SessionState::Running as i32)]);
    agent.wait_connected(Some(first.epoch)).await.unwrap();

    // Redelivered under a new lease: acked, the same result re-sent, nothing re-executed.
    conn.send(command("cmd-1", "s-link", "start_session", START, 2))
        .await;
    expect_ack(conn.recv().await, 2);
    let replay = expect_result(conn.recv().await);
    assert_eq!(replay.lease_token, 2);
    assert_eq!(replay.outcome, result.outcome);
    assert_eq!(dir.journal_count("spawn", "s-link"), 1);

    // A ping is answered with the inventory.
    conn.send(Out::Ping(pb::Ping { nonce: 7 })).await;
    let heartbeat = loop {
        if let Msg::Heartbeat(h) = conn.recv_any().await {
            break h;
        }
    };
    assert_eq!(heartbeat.sessions.len(), 1);
    assert_eq!(heartbeat.commands_in_progress, 0);

    conn.send(command("cmd-2", "s-link", "stop_session", "{}", 3))
        .await;
    expect_ack(conn.recv().await, 3);
    let stopped = completed(&expect_result(conn.recv().await));
    assert_eq!(stopped.state, pb::SessionState::Stopped as i32);

    // Shutdown ends the request stream cleanly (not with an error).
    let shutdown = tokio::spawn(agent.shutdown());
    assert!(conn.closed_cleanly().await);
    shutdown.await.unwrap().unwrap();
}

#[tokio::test]
async fn heartbeats_flow_and_a_dead_session_is_reported_at_once() {
    let dir = StateDir::new();
    let mut dispatcher = FakeDispatcher::start("tok-2", 20).await;
    let runtime = Arc::new(dir.runtime(catalog()).await);
    let config = AgentConfig::new(&dispatcher.url, "tok-2", dir.path());
    let agent = Agent::new(config, runtime.clone()).unwrap().spawn();
    let mut conn = dispatcher.accept().await;
    assert!(matches!(conn.recv_any().await, Msg::Heartbeat(_)));

    conn.send(command("cmd-1", "s-dies", "start_session", START, 1))
        .await;
    expect_ack(conn.recv().await, 1);
    expect_result(conn.recv().await);
    let pid = runtime.pid("s-dies").unwrap();
    dir.track(pid);

    killpg(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    match conn.recv().await {
        Msg::SessionStatus(status) => {
            let session = status.session.unwrap();
            assert_eq!(session.session_id, "s-dies");
            assert_eq!(session.state, pb::SessionState::Failed as i32);
            assert!(
                session.message.contains("exited unexpectedly"),
                "{session:?}"
            );
        }
        other => panic!("expected SessionStatus, got {other:?}"),
    }
    let shutdown = tokio::spawn(agent.shutdown());
    assert!(conn.closed_cleanly().await);
    shutdown.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rejected_credential_is_retried_and_reported() {
    let dir = StateDir::new();
    let dispatcher = FakeDispatcher::start("the-right-one", 60_000).await;
    let runtime = Arc::new(dir.runtime(catalog()).await);
    let mut config = AgentConfig::new(&dispatcher.url, "a-wrong-one", dir.path());
    config.reconnect_base_ms = 10;
    config.reconnect_cap_ms = 20;
    let agent = Agent::new(config, runtime).unwrap().spawn();

    eventually("the agent tried twice", || {
        dispatcher.rejected.load(Ordering::SeqCst) >= 2
    })
    .await;
    let state = agent.connection().borrow().clone();
    match state {
        ConnectionState::Disconnected {
            last_error: Some(e),
        } => assert!(e.contains("Unauthenticated"), "{e}"),
        other => panic!("expected a disconnected state naming the rejection, got {other:?}"),
    }
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_a_running_command_report_before_closing() {
    let dir = StateDir::new();
    let gate = dir.path().join("gate");
    let mut gated = catalog().get("with-helper").unwrap().clone();
    // Starts only once the test opens the gate.
    gated.args[1] = format!(
        "while [ ! -e '{}' ]; do sleep 0.01; done; exec \"$AGENT\" serve-session --session \"$0\" --port \"$SESSION_PORT\"",
        gate.display()
    );
    let runtime = Arc::new(dir.runtime(catalog().with("gated", gated)).await);
    let mut dispatcher = FakeDispatcher::start("tok-3", 60_000).await;
    let config = AgentConfig::new(&dispatcher.url, "tok-3", dir.path());
    let agent = Agent::new(config, runtime.clone()).unwrap().spawn();
    let mut conn = dispatcher.accept().await;

    conn.send(command(
        "cmd-1",
        "s-gated",
        "start_session",
        r#"{"template":"gated"}"#,
        1,
    ))
    .await;
    expect_ack(conn.recv().await, 1);
    let mut connection = agent.connection();
    let shutdown = tokio::spawn(agent.shutdown());
    // Still connected while the command runs: shutdown waits for it.
    assert!(connection.borrow_and_update().is_connected());
    std::fs::write(&gate, b"").unwrap();

    let result = expect_result(conn.recv().await);
    assert_eq!(completed(&result).state, pb::SessionState::Running as i32);
    dir.track(runtime.pid("s-gated").unwrap());
    assert!(conn.closed_cleanly().await);
    shutdown.await.unwrap().unwrap();
    // Sessions outlive the agent.
    assert!(runtime.list().await.unwrap().len() == 1);
}

/// The real agent binary, whose own environment holds its credential, starts a session:
/// the session process's environment (read from `/proc`) has no `STREAMSPACE_` variable,
/// only the inherited allow-list and the session's own. A start asking for a reserved
/// variable fails permanently. The state files are the agent user's alone.
#[tokio::test]
async fn sessions_do_not_inherit_the_agents_credential_or_settings() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = StateDir::new();
    let mut dispatcher = FakeDispatcher::start("tok-secret", 60_000).await;
    let mut agent = tokio::process::Command::new(agent_exe())
        .env("STREAMSPACE_DISPATCHER_URL", &dispatcher.url)
        .env("STREAMSPACE_CREDENTIAL", "tok-secret")
        .env("STREAMSPACE_STATE_DIR", dir.path())
        .env("STREAMSPACE_RECONNECT_BASE_MS", "50")
        .env("LD_LIBRARY_PATH", "/agent/only")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut conn = dispatcher.accept().await;

    conn.send(command("cmd-env", "s-env", "start_session", START, 1))
        .await;
    expect_ack(conn.recv().await, 1);
    completed(&expect_result(conn.recv().await));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sessions/s-env.json")).unwrap())
            .unwrap();
    let pid = record["pid"].as_i64().unwrap() as i32;
    dir.track(pid);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let leaked: Vec<&String> = vars
        .iter()
        .filter(|v| v.starts_with("STREAMSPACE_") || v.starts_with("LD_"))
        .collect();
    assert!(leaked.is_empty(), "leaked into the session: {leaked:?}");
    assert!(vars.contains(&"SESSION_ID=s-env".to_owned()), "{vars:?}");
    assert!(
        vars.iter().any(|v| v.starts_with("SESSION_PORT=")),
        "{vars:?}"
    );
    assert!(vars.iter().any(|v| v.starts_with("PATH=")), "{vars:?}");

    // Only the agent's user can read its state.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    assert_eq!(mode(&dir.path().join("sessions")), 0o700);
    for file in ["sessions/s-env.json", "sessions/s-env.log", "journal.log"] {
        assert_eq!(mode(&dir.path().join(file)), 0o600, "{file}");
    }

    // A start asking for the loader's or the agent's variables is refused, for good.
    for (n, key) in ["LD_PRELOAD", "streamspace_credential", "BAD-NAME"]
        .into_iter()
        .enumerate()
    {
        let payload = serde_json::json!({"template": "firefox-browser", "env": {key: "x"}});
        let id = format!("cmd-bad-{n}");
        conn.send(command(
            &id,
            &format!("s-bad-{n}"),
            "start_session",
            &payload.to_string(),
            10 + n as i64,
        ))
        .await;
        expect_ack(conn.recv().await, 10 + n as i64);
        match expect_result(conn.recv().await).outcome {
            Some(Outcome::Failed(f)) => {
                assert!(!f.retryable, "{f:?}");
                assert!(f.message.contains(key), "{f:?}");
            }
            other => panic!("{key}: expected a permanent failure, got {other:?}"),
        }
    }

    conn.send(command("cmd-stop", "s-env", "stop_session", "{}", 20))
        .await;
    expect_ack(conn.recv().await, 20);
    completed(&expect_result(conn.recv().await));
    agent.kill().await.unwrap();
}

/// The liveness probe (`streamspace-agent alive`): passes while the agent process keeps
/// its liveness file fresh, and fails once it has stopped (a wedged or dead agent).
#[tokio::test]
async fn the_liveness_probe_follows_the_agent_process() {
    let dir = StateDir::new();
    let mut dispatcher = FakeDispatcher::start("tok-alive", 60_000).await;
    let alive = |max_age: &str| {
        std::process::Command::new(agent_exe())
            .args(["alive", "--max-age-secs", max_age])
            .env("STREAMSPACE_STATE_DIR", dir.path())
            .output()
            .unwrap()
    };
    let before = alive("60");
    assert!(!before.status.success(), "alive before the agent ran");
    let mut agent = tokio::process::Command::new(agent_exe())
        .env("STREAMSPACE_DISPATCHER_URL", &dispatcher.url)
        .env("STREAMSPACE_CREDENTIAL", "tok-alive")
        .env("STREAMSPACE_STATE_DIR", dir.path())
        .env("STREAMSPACE_LIVENESS_INTERVAL_MS", "50")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _conn = dispatcher.accept().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !alive("5").status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the probe never passed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Rewritten every 50 ms: a five-second bound keeps passing while the agent runs, past
    // the age the file would reach if nothing rewrote it …
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(1_000));
        assert!(
            alive("5").status.success(),
            "a running agent failed its probe"
        );
    }
    // … and fails once the agent is gone.
    agent.kill().await.unwrap();
    let _ = agent.wait().await;
    std::thread::sleep(std::time::Duration::from_millis(5_500));
    let after = alive("5");
    assert!(!after.status.success());
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("not alive"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}
