//! The agent crate's integration suite (one test binary), all with real processes.
//!
//! Here: `ProcessRuntime` itself — create-or-get, stop reaching the whole group,
//! hibernate/wake as SIGSTOP/SIGCONT, adoption after an agent restart, sessions dying on
//! their own, and starts that never become ready. `agent_link` runs the whole agent
//! against a scripted dispatcher over real gRPC; `faults` runs it against the real
//! dispatcher and PostgreSQL with runtime faults injected.

mod agent_link;
mod fake_dispatcher;
mod faults;
mod helpers;

use helpers::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use streamspace_agent::runtime::{ProcessRuntime, SessionRuntime, SessionState};
use streamspace_core::command::{HibernateSession, StopSession, WakeSession};

#[tokio::test]
async fn start_is_create_or_get_and_the_url_answers() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let (url, pid) = started(&dir, &rt, "s-create", "firefox-browser").await;

    let again = rt
        .start("s-create", &start("firefox-browser"))
        .await
        .unwrap();
    assert_eq!(again.state, SessionState::Running);
    assert_eq!(
        again.url.as_deref(),
        Some(url.as_str()),
        "same session, same URL"
    );
    assert_eq!(rt.pid("s-create"), Some(pid), "same process");
    assert_eq!(dir.journal_count("spawn", "s-create"), 1);
    assert_eq!(rt.effects().spawn, 1);

    let (status, body) = http_get(&url).await;
    assert_eq!(status, 200);
    assert!(body.contains("s-create"), "{body}");

    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, SessionState::Running);
    assert!(dir.record_exists("s-create"));
}

#[tokio::test]
async fn concurrent_starts_of_one_session_spawn_once() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let spec = start("chrome-browser");
    let (a, b) = tokio::join!(rt.start("s-race", &spec), rt.start("s-race", &spec));
    dir.track(rt.pid("s-race").unwrap());
    assert_eq!(a.unwrap().url, b.unwrap().url);
    assert_eq!(dir.journal_count("spawn", "s-race"), 1);
}

#[tokio::test]
async fn stop_kills_the_whole_group_and_a_second_stop_is_ok() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let (_, pgid) = started(&dir, &rt, "s-stop", "with-helper").await;
    eventually("the helper process runs next to the server", || {
        group_members(pgid).len() >= 2
    })
    .await;

    let obs = rt.stop("s-stop", &StopSession::default()).await.unwrap();
    assert_eq!(obs.state, SessionState::Stopped);
    assert!(
        group_members(pgid).is_empty(),
        "left: {:?}",
        group_members(pgid)
    );
    assert!(!dir.record_exists("s-stop"));
    assert!(rt.list().await.unwrap().is_empty());

    let again = rt.stop("s-stop", &StopSession::default()).await.unwrap();
    assert_eq!(again.state, SessionState::Stopped);
    let never = rt
        .stop("never-started", &StopSession::default())
        .await
        .unwrap();
    assert_eq!(never.state, SessionState::Stopped);
    assert_eq!(
        dir.journal_count("kill", "s-stop"),
        1,
        "one kill, for the real stop"
    );
}

#[tokio::test]
async fn stop_escalates_to_sigkill_when_sigterm_is_ignored() {
    let dir = StateDir::new();
    let mut config = dir.config(catalog());
    config.stop_grace = std::time::Duration::from_millis(200);
    let rt = ProcessRuntime::open(config).await.unwrap();
    let (_, pgid) = started(&dir, &rt, "s-stubborn", "stubborn").await;
    eventually("both processes run", || group_members(pgid).len() >= 2).await;

    rt.stop("s-stubborn", &StopSession::default())
        .await
        .unwrap();
    assert!(
        group_members(pgid).is_empty(),
        "left: {:?}",
        group_members(pgid)
    );
}

#[tokio::test]
async fn hibernate_freezes_and_wake_resumes_idempotently() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let (url, pid) = started(&dir, &rt, "s-hib", "desktop-xfce").await;

    let obs = rt
        .hibernate("s-hib", &HibernateSession::default())
        .await
        .unwrap();
    assert_eq!(obs.state, SessionState::Hibernated);
    assert_eq!(proc_stat(pid).map(|s| s.0), Some('T'));
    let again = rt
        .hibernate("s-hib", &HibernateSession::default())
        .await
        .unwrap();
    assert_eq!(again.state, SessionState::Hibernated);
    assert_eq!(dir.journal_count("sigstop", "s-hib"), 1);
    assert_eq!(rt.list().await.unwrap()[0].state, SessionState::Hibernated);

    let obs = rt.wake("s-hib", &WakeSession::default()).await.unwrap();
    assert_eq!(obs.state, SessionState::Running);
    assert_ne!(proc_stat(pid).map(|s| s.0), Some('T'));
    let again = rt.wake("s-hib", &WakeSession::default()).await.unwrap();
    assert_eq!(again.state, SessionState::Running);
    assert_eq!(dir.journal_count("sigcont", "s-hib"), 1);
    assert_eq!(http_get(&url).await.0, 200);

    // A hibernated session can be stopped: SIGTERM reaches a frozen group too.
    rt.hibernate("s-hib", &HibernateSession::default())
        .await
        .unwrap();
    rt.stop("s-hib", &StopSession::default()).await.unwrap();
    assert!(group_members(pid).is_empty());
}

#[tokio::test]
async fn hibernate_and_wake_of_unknown_sessions_fail_permanently() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let err = rt
        .hibernate("ghost", &HibernateSession::default())
        .await
        .unwrap_err();
    assert!(!err.retryable && err.message.contains("ghost"), "{err:?}");
    let err = rt.wake("ghost", &WakeSession::default()).await.unwrap_err();
    assert!(!err.retryable, "{err:?}");
    let err = rt
        .start("s1", &start("no-such-template"))
        .await
        .unwrap_err();
    assert!(
        !err.retryable && err.message.contains("unknown template"),
        "{err:?}"
    );
    let err = rt
        .start("../escape", &start("firefox-browser"))
        .await
        .unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert_eq!(rt.effects().spawn, 0);
}

#[tokio::test]
async fn a_restarted_runtime_adopts_live_sessions_and_forgets_dead_ones() {
    let dir = StateDir::new();
    let first = dir.runtime(catalog()).await;
    let (url, pid) = started(&dir, &first, "s-keep", "firefox-browser").await;
    let (_, frozen_pid) = started(&dir, &first, "s-frozen", "firefox-browser").await;
    first
        .hibernate("s-frozen", &HibernateSession::default())
        .await
        .unwrap();
    let (_, dead_pid) = started(&dir, &first, "s-dead", "firefox-browser").await;
    // The agent goes away (its runtime with it); its sessions keep running.
    drop(first);
    // While no agent watches, one session dies.
    killpg(Pid::from_raw(dead_pid), Signal::SIGKILL).unwrap();
    eventually("the dead session's process is gone", || {
        group_members(dead_pid).is_empty()
    })
    .await;
    assert!(dir.record_exists("s-dead"), "nobody cleaned up yet");

    let second = dir.runtime(catalog()).await;
    let listed = second.list().await.unwrap();
    let states: Vec<(&str, SessionState)> = listed
        .iter()
        .map(|o| (o.session_id.as_str(), o.state))
        .collect();
    assert_eq!(
        states,
        [
            ("s-frozen", SessionState::Hibernated),
            ("s-keep", SessionState::Running)
        ]
    );
    assert!(!dir.record_exists("s-dead"), "stale record deleted");
    assert_eq!(second.pid("s-keep"), Some(pid));

    // Adopted means fully managed: create-or-get finds it, stop ends it.
    let obs = second
        .start("s-keep", &start("firefox-browser"))
        .await
        .unwrap();
    assert_eq!(obs.url.as_deref(), Some(url.as_str()));
    assert_eq!(dir.journal_count("spawn", "s-keep"), 1);
    second
        .wake("s-frozen", &WakeSession::default())
        .await
        .unwrap();
    for session in ["s-keep", "s-frozen"] {
        second.stop(session, &StopSession::default()).await.unwrap();
    }
    assert!(group_members(pid).is_empty() && group_members(frozen_pid).is_empty());
}

#[tokio::test]
async fn a_session_killed_out_of_band_is_reported_failed() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let mut events = rt.subscribe();
    let (_, pid) = started(&dir, &rt, "s-crash", "firefox-browser").await;

    killpg(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let obs = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("no observation")
        .unwrap();
    assert_eq!(obs.session_id, "s-crash");
    assert_eq!(obs.state, SessionState::Failed);
    let message = obs.message.unwrap();
    assert!(message.contains("exited unexpectedly"), "{message}");
    assert!(
        message.contains("SIGKILL") || message.contains("signal: 9"),
        "{message}"
    );
    assert!(rt.list().await.unwrap().is_empty());
    assert!(!dir.record_exists("s-crash"));

    // The session can be started again afresh.
    started(&dir, &rt, "s-crash", "firefox-browser").await;
    assert_eq!(dir.journal_count("spawn", "s-crash"), 2);
}

#[tokio::test]
async fn a_start_that_never_becomes_ready_fails_and_leaves_nothing_behind() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let session = format!("s-never-{}", std::process::id());
    let err = rt.start(&session, &start("never-ready")).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert!(
        err.message.contains("not ready within 300 ms"),
        "{}",
        err.message
    );
    assert!(processes_mentioning(&session).is_empty());
    assert!(!dir.record_exists(&session));
    assert!(rt.list().await.unwrap().is_empty());
    assert_eq!(dir.journal_count("spawn", &session), 1);
    assert_eq!(dir.journal_count("kill", &session), 1);
}

#[tokio::test]
async fn a_start_whose_process_dies_reports_its_exit_and_output() {
    let dir = StateDir::new();
    let rt = dir.runtime(catalog()).await;
    let err = rt.start("s-boom", &start("crashes")).await.unwrap_err();
    assert!(
        err.message.contains("exited before it was ready"),
        "{}",
        err.message
    );
    assert!(err.message.contains("exit status: 3"), "{}", err.message);
    assert!(err.message.contains("boom: no display"), "{}", err.message);
    assert!(!dir.record_exists("s-boom"));
}

/// An agent that dies after spawning a session but before recording it must not leave an
/// unowned process that a redelivered start then doubles (found by `cargo xtask chaos
/// --scenario agent-kill`). The window is held open on purpose: the record's temporary
/// file is a FIFO, so the first runtime blocks writing it with the process already
/// spawned — as if it had been SIGKILLed right there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_spawned_but_unrecorded_session_is_killed_after_restart() {
    let dir = StateDir::new();
    let sessions = dir.path().join("sessions");
    std::fs::create_dir_all(&sessions).unwrap();
    let fifo = sessions.join("s-torn.json.tmp");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();

    let first = dir.runtime(catalog()).await;
    let stuck = tokio::spawn(async move {
        let _ = first.start("s-torn", &start("firefox-browser")).await;
    });
    eventually("the first runtime spawned the session", || {
        !processes_mentioning("s-torn").is_empty()
    })
    .await;
    let orphans = processes_mentioning("s-torn");
    for pid in &orphans {
        dir.track(*pid);
    }
    assert!(
        !dir.record_exists("s-torn"),
        "the crash window: no record yet"
    );

    // The agent restarts over the same state directory.
    let second = dir.runtime(catalog()).await;
    eventually("the half-started process is killed", || {
        orphans.iter().all(|pid| {
            // A zombie of this test process (the first runtime's child) runs nothing.
            proc_stat(*pid).is_none_or(|(state, _)| state == 'Z')
        })
    })
    .await;
    assert!(second.list().await.unwrap().is_empty());
    assert_eq!(dir.journal_count("kill", "s-torn"), 1);

    // Let the first runtime out of its window: it writes its record into the FIFO (read
    // here), fails to find its process alive, and forgets the session.
    let drained = tokio::task::spawn_blocking(move || {
        let mut sink = Vec::new();
        std::fs::File::open(&fifo).and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut sink))
    });
    drained.await.unwrap().unwrap();
    tokio::time::timeout(DEADLINE, stuck)
        .await
        .unwrap()
        .unwrap();

    // The redelivered start runs the session exactly once.
    let (_, pid) = started(&dir, &second, "s-torn", "firefox-browser").await;
    assert_eq!(processes_mentioning("s-torn"), [pid]);
    assert_eq!(dir.journal_count("kill", "s-torn"), 1);
    second
        .stop("s-torn", &StopSession::default())
        .await
        .unwrap();
    assert!(processes_mentioning("s-torn").is_empty());
}
