//! Unit tests of the executor against a recording runtime.

use std::collections::HashMap;
use std::sync::Mutex;

use streamspace_core::command::{HibernateSession, StartSession, StopSession, WakeSession};
use tokio::sync::{Semaphore, broadcast};

use super::*;
use crate::runtime::{RuntimeError, SessionState, async_trait};

/// A runtime that records calls and can hold a session's calls until released.
#[derive(Default)]
struct FakeRuntime {
    calls: Mutex<Vec<String>>,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    entered: Mutex<Option<mpsc::UnboundedSender<String>>>,
    /// Calls named here (`"hibernate s1"`) fail retryably, once each.
    fail_once: Mutex<Vec<String>>,
}

impl std::fmt::Debug for FakeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeRuntime")
    }
}

impl FakeRuntime {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Calls for `session` block until [`release`](Self::release) gives permits.
    fn hold(&self, session: &str) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        self.gates
            .lock()
            .unwrap()
            .insert(session.to_owned(), gate.clone());
        gate
    }

    async fn call(&self, what: &str, session: &str) -> Result<Observation, RuntimeError> {
        let name = format!("{what} {session}");
        if let Some(tx) = &*self.entered.lock().unwrap() {
            let _ = tx.send(name.clone());
        }
        let gate = self.gates.lock().unwrap().get(session).cloned();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        self.calls.lock().unwrap().push(name.clone());
        let mut fail = self.fail_once.lock().unwrap();
        if let Some(i) = fail.iter().position(|f| *f == name) {
            fail.remove(i);
            return Err(RuntimeError::retryable(format!("{name}: injected failure")));
        }
        Ok(Observation::new(session, SessionState::Running))
    }
}

#[async_trait]
impl SessionRuntime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn start(&self, s: &str, _: &StartSession) -> Result<Observation, RuntimeError> {
        self.call("start", s).await
    }
    async fn stop(&self, s: &str, _: &StopSession) -> Result<Observation, RuntimeError> {
        self.call("stop", s).await
    }
    async fn hibernate(&self, s: &str, _: &HibernateSession) -> Result<Observation, RuntimeError> {
        self.call("hibernate", s).await
    }
    async fn wake(&self, s: &str, _: &WakeSession) -> Result<Observation, RuntimeError> {
        self.call("wake", s).await
    }
    async fn list(&self) -> Result<Vec<Observation>, RuntimeError> {
        Ok(Vec::new())
    }
    fn subscribe(&self) -> broadcast::Receiver<Observation> {
        broadcast::channel(1).1
    }
}

struct Harness {
    runtime: Arc<FakeRuntime>,
    executor: Executor,
    tx: mpsc::Sender<proto::AgentMessage>,
    rx: mpsc::Receiver<proto::AgentMessage>,
}

fn harness() -> Harness {
    let runtime = Arc::new(FakeRuntime::default());
    let executor = Executor::new(runtime.clone(), 100);
    let (tx, rx) = mpsc::channel(64);
    executor.attach(tx.clone(), "local-0");
    Harness {
        runtime,
        executor,
        tx,
        rx,
    }
}

/// `command`, pipelined behind `after`.
fn pipelined(id: &str, session: &str, action: &str, lease: i64, after: &str) -> proto::Command {
    proto::Command {
        after_command_id: after.into(),
        ..command(id, Some(session), action, lease)
    }
}

fn command(id: &str, session: Option<&str>, action: &str, lease: i64) -> proto::Command {
    let payload = if action == "start_session" {
        r#"{"template":"firefox-browser"}"#
    } else {
        "{}"
    };
    proto::Command {
        command_id: id.into(),
        session_id: session.map(Into::into),
        action: action.into(),
        payload_json: payload.into(),
        lease_token: lease,
        attempt: 1,
        deadline_unix_ms: 0,
        trace_context: String::new(),
        after_command_id: String::new(),
    }
}

impl Harness {
    async fn deliver(&self, cmd: proto::Command) {
        self.executor.deliver(cmd, &self.tx).await;
    }

    /// The next message, with a generous deadline so a hang fails instead of blocking.
    async fn next(&mut self) -> Msg {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("no message within the deadline")
            .expect("channel closed")
            .msg
            .unwrap()
    }

    async fn next_result(&mut self) -> proto::CommandResult {
        loop {
            if let Msg::Result(r) = self.next().await {
                return r;
            }
        }
    }

    /// The next `n` results as `(command, lease token, outcome kind)`.
    async fn outcomes(&mut self, n: usize) -> Vec<(String, i64, &'static str)> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let r = self.next_result().await;
            out.push((r.command_id.clone(), r.lease_token, outcome_kind(&r)));
        }
        out
    }
}

fn failed(r: &proto::CommandResult) -> Option<(&str, bool)> {
    match r.outcome.as_ref()? {
        proto::command_result::Outcome::Failed(f) => Some((&f.message, f.retryable)),
        _ => None,
    }
}

#[tokio::test]
async fn ack_precedes_result_and_redelivery_replays_under_the_new_lease() {
    let mut h = harness();
    h.deliver(command("cmd-1", Some("s1"), "start_session", 10))
        .await;
    assert!(matches!(h.next().await, Msg::Ack(a) if a.lease_token == 10));
    let first = h.next_result().await;
    assert_eq!(first.lease_token, 10);
    assert!(matches!(
        first.outcome,
        Some(proto::command_result::Outcome::Completed(_))
    ));

    h.deliver(command("cmd-1", Some("s1"), "start_session", 11))
        .await;
    assert!(matches!(h.next().await, Msg::Ack(a) if a.lease_token == 11));
    let replay = h.next_result().await;
    assert_eq!(replay.lease_token, 11);
    assert_eq!(replay.outcome, first.outcome);
    assert_eq!(h.runtime.calls(), ["start s1"], "executed once");
}

#[tokio::test]
async fn one_session_is_serial_others_are_not_blocked() {
    let mut h = harness();
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    *h.runtime.entered.lock().unwrap() = Some(entered_tx);
    let gate = h.runtime.hold("slow");
    h.deliver(command("cmd-a1", Some("slow"), "start_session", 1))
        .await;
    h.deliver(command("cmd-a2", Some("slow"), "hibernate_session", 2))
        .await;
    h.deliver(command("cmd-a3", Some("slow"), "stop_session", 3))
        .await;
    h.deliver(command("cmd-b1", Some("fast"), "start_session", 4))
        .await;
    let mut first_calls = vec![entered.recv().await.unwrap(), entered.recv().await.unwrap()];
    first_calls.sort();
    assert_eq!(first_calls, ["start fast", "start slow"]);

    // The other session completes while the slow one is held, and the slow session's
    // later commands have not begun.
    let r = h.next_result().await;
    assert_eq!(r.command_id, "cmd-b1");
    assert_eq!(h.executor.in_progress(), 3);
    while let Ok(call) = entered.try_recv() {
        assert!(
            !call.contains("slow"),
            "a later command of the held session started: {call}"
        );
    }

    gate.add_permits(3);
    let order: Vec<String> = [
        h.next_result().await,
        h.next_result().await,
        h.next_result().await,
    ]
    .into_iter()
    .map(|r| r.command_id)
    .collect();
    assert_eq!(order, ["cmd-a1", "cmd-a2", "cmd-a3"]);
    assert_eq!(
        h.runtime.calls(),
        ["start fast", "start slow", "hibernate slow", "stop slow"]
    );
    assert_eq!(h.executor.in_progress(), 0);
}

#[tokio::test]
async fn redelivery_while_running_reports_under_the_latest_lease() {
    let mut h = harness();
    let gate = h.runtime.hold("s1");
    h.deliver(command("cmd-1", Some("s1"), "start_session", 5))
        .await;
    h.deliver(command("cmd-1", Some("s1"), "start_session", 6))
        .await;
    h.deliver(command("cmd-1", Some("s1"), "start_session", 7))
        .await;
    gate.add_permits(1);
    let r = h.next_result().await;
    assert_eq!(r.lease_token, 7);
    assert_eq!(h.runtime.calls(), ["start s1"]);
    h.tx.send(proto::AgentMessage::default()).await.unwrap();
    // Nothing else is reported: the sentinel is the next message.
    assert!(h.rx.recv().await.unwrap().msg.is_none());
}

#[tokio::test]
async fn results_finished_while_disconnected_are_replayed_on_redelivery() {
    let mut h = harness();
    let gate = h.runtime.hold("s1");
    h.deliver(command("cmd-1", Some("s1"), "start_session", 1))
        .await;
    assert!(matches!(h.next().await, Msg::Ack(_)));
    h.executor.detach();
    gate.add_permits(1);
    // Wait for it to finish while detached.
    tokio::time::timeout(Duration::from_secs(10), async {
        while h.executor.in_progress() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    h.executor.attach(h.tx.clone(), "local-0");
    h.deliver(command("cmd-1", Some("s1"), "start_session", 2))
        .await;
    assert!(matches!(h.next().await, Msg::Ack(a) if a.lease_token == 2));
    assert_eq!(h.next_result().await.lease_token, 2);
    assert_eq!(h.runtime.calls(), ["start s1"]);
}

#[tokio::test]
async fn cancel_drops_a_queued_command_but_not_a_running_one() {
    let mut h = harness();
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    *h.runtime.entered.lock().unwrap() = Some(entered_tx);
    let gate = h.runtime.hold("s1");
    h.deliver(command("cmd-1", Some("s1"), "start_session", 1))
        .await;
    h.deliver(command("cmd-2", Some("s1"), "stop_session", 2))
        .await;
    assert_eq!(entered.recv().await.unwrap(), "start s1");
    let cancel = |id: &str| proto::Cancel {
        command_id: id.into(),
        reason: "user withdrew it".into(),
    };
    assert!(h.executor.on_cancel(&cancel("cmd-1")).is_none(), "running");
    let Some(proto::AgentMessage {
        msg: Some(Msg::Result(r)),
    }) = h.executor.on_cancel(&cancel("cmd-2"))
    else {
        panic!("queued command not cancelled");
    };
    assert_eq!(failed(&r), Some(("cancelled: user withdrew it", false)));
    gate.add_permits(1);
    assert_eq!(h.next_result().await.command_id, "cmd-1");
    assert_eq!(
        h.runtime.calls(),
        ["start s1"],
        "cancelled command never ran"
    );
}

#[tokio::test]
async fn undecodable_sessionless_and_expired_commands_fail_permanently() {
    let mut h = harness();
    h.deliver(command("cmd-1", Some("s1"), "reboot_cluster", 1))
        .await;
    let r = h.next_result().await;
    assert!(failed(&r).unwrap().0.contains("unknown action"), "{r:?}");

    h.deliver(command("cmd-2", None, "stop_session", 2)).await;
    let r = h.next_result().await;
    assert_eq!(failed(&r), Some(("stop_session needs a session_id", false)));

    let mut bad = command("cmd-3", Some("s1"), "start_session", 3);
    bad.payload_json = "{not json".into();
    h.deliver(bad).await;
    let r = h.next_result().await;
    assert!(!failed(&r).unwrap().1);

    let mut late = command("cmd-4", Some("s1"), "stop_session", 4);
    late.deadline_unix_ms = 1;
    h.deliver(late).await;
    let r = h.next_result().await;
    let (message, retryable) = failed(&r).unwrap();
    assert!(
        message.contains("deadline passed") && !retryable,
        "{message}"
    );
    assert!(h.runtime.calls().is_empty());
}

#[tokio::test]
async fn remembered_results_are_bounded() {
    let runtime = Arc::new(FakeRuntime::default());
    let executor = Executor::new(runtime.clone(), 2);
    for i in 0..5 {
        let cmd = command(&format!("cmd-{i}"), None, "stop_session", i);
        let _ = executor.on_command(cmd);
    }
    let state = executor.state();
    assert_eq!(state.commands.len(), 2);
    assert!(state.commands.contains_key("cmd-4") && state.commands.contains_key("cmd-3"));
}

#[tokio::test]
async fn draining_refuses_new_commands_and_waits_for_running_ones() {
    let mut h = harness();
    let gate = h.runtime.hold("s1");
    h.deliver(command("cmd-1", Some("s1"), "start_session", 1))
        .await;
    assert!(matches!(h.next().await, Msg::Ack(_)));
    let drain = tokio::spawn({
        let executor = h.executor.clone();
        async move { executor.drain(Duration::from_secs(30)).await }
    });
    // Draining is observable before the held command is released.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !h.executor.state().draining {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let d = h
        .executor
        .on_command(command("cmd-2", Some("s2"), "start_session", 2));
    assert!(d.messages.is_empty() && d.ticket.is_none());
    gate.add_permits(1);
    drain.await.unwrap();
    assert_eq!(h.next_result().await.command_id, "cmd-1");
}

fn outcome_kind(r: &proto::CommandResult) -> &'static str {
    match r.outcome {
        Some(proto::command_result::Outcome::Completed(_)) => "completed",
        Some(proto::command_result::Outcome::Failed(_)) => "failed",
        Some(proto::command_result::Outcome::NotRun(_)) => "not_run",
        None => "none",
    }
}

#[tokio::test]
async fn pipelined_commands_run_in_order_after_their_predecessor_completed() {
    let mut h = harness();
    let gate = h.runtime.hold("s1");
    h.deliver(command("c1", Some("s1"), "start_session", 1))
        .await;
    h.deliver(pipelined("c2", "s1", "hibernate_session", 2, "c1"))
        .await;
    h.deliver(pipelined("c3", "s1", "wake_session", 3, "c2"))
        .await;
    gate.add_permits(3);
    let results: Vec<(String, &str)> = h
        .outcomes(3)
        .await
        .into_iter()
        .map(|(id, _, kind)| (id, kind))
        .collect();
    assert_eq!(
        results,
        [
            ("c1".into(), "completed"),
            ("c2".into(), "completed"),
            ("c3".into(), "completed")
        ]
    );
    assert_eq!(h.runtime.calls(), ["start s1", "hibernate s1", "wake s1"]);
}

#[tokio::test]
async fn a_failed_command_stops_the_ones_pipelined_behind_it_until_they_are_redelivered() {
    let mut h = harness();
    h.runtime
        .fail_once
        .lock()
        .unwrap()
        .push("hibernate s1".into());
    let gate = h.runtime.hold("s1");
    h.deliver(command("c1", Some("s1"), "start_session", 1))
        .await;
    h.deliver(pipelined("c2", "s1", "hibernate_session", 2, "c1"))
        .await;
    h.deliver(pipelined("c3", "s1", "wake_session", 3, "c2"))
        .await;
    h.deliver(pipelined("c4", "s1", "stop_session", 4, "c3"))
        .await;
    gate.add_permits(2);
    let results = h.outcomes(4).await;
    assert_eq!(
        results,
        [
            ("c1".into(), 1, "completed"),
            ("c2".into(), 2, "failed"),
            ("c3".into(), 3, "not_run"),
            ("c4".into(), 4, "not_run"),
        ]
    );
    assert_eq!(
        h.runtime.calls(),
        ["start s1", "hibernate s1"],
        "nothing behind the failed command took effect"
    );
    assert_eq!(h.executor.in_progress(), 0);

    // The retry of c2, then c3 and c4 again under new leases: all run now, in order.
    gate.add_permits(3);
    h.deliver(command("c2", Some("s1"), "hibernate_session", 5))
        .await;
    h.deliver(pipelined("c3", "s1", "wake_session", 6, "c2"))
        .await;
    h.deliver(pipelined("c4", "s1", "stop_session", 7, "c3"))
        .await;
    let retried = h.outcomes(3).await;
    assert_eq!(
        retried,
        [
            ("c2".into(), 5, "completed"),
            ("c3".into(), 6, "completed"),
            ("c4".into(), 7, "completed"),
        ]
    );
    assert_eq!(
        h.runtime.calls(),
        [
            "start s1",
            "hibernate s1",
            "hibernate s1",
            "wake s1",
            "stop s1"
        ]
    );
}

#[tokio::test]
async fn a_command_pipelined_behind_one_this_process_never_saw_is_not_run() {
    let mut h = harness();
    h.deliver(pipelined("c2", "s1", "stop_session", 9, "c1"))
        .await;
    let r = h.next_result().await;
    assert_eq!((r.command_id.as_str(), outcome_kind(&r)), ("c2", "not_run"));
    assert!(h.runtime.calls().is_empty());
    assert!(
        h.executor.held_commands().is_empty(),
        "a command not run is not held: its redelivery runs it"
    );
}
