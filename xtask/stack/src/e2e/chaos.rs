//! Delivery under faults, against real processes: a stream cut while a command runs, a
//! dispatcher SIGKILLed mid-delivery, and two dispatchers sharing the work. Each proves
//! "effect once" from the agents' effect journals (one line per real spawn/kill/stop/cont).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use streamspace_core::CommandQueue;
use streamspace_core::command::{CommandKind, HibernateSession, WakeSession};
use streamspace_core::queue::NewCommand;

use super::{Ctx, Profile, until, user_api};
use crate::proxy::Proxy;
use crate::report::{ScenarioReport, Target};
use crate::stack::Stack;

const LIMIT: Duration = Duration::from_secs(120);

/// Journal lines of an agent: `(effect, session_id)`.
fn journal(state_dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(state_dir.join("journal.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _ms = f.next()?;
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

/// Creates `sessions` sessions per agent through the API (so the database knows them),
/// waits until they run, and returns them with a workload of `per_session` alternating
/// hibernate/wake commands each — every command a real, distinct effect.
async fn workload(
    stack: &Stack,
    sessions: usize,
    per_session: usize,
) -> anyhow::Result<(HashSet<String>, Vec<NewCommand>)> {
    let api = user_api(stack, "chaos").await?;
    let mut placed = Vec::new();
    for _ in 0..sessions * stack.agents.len() {
        let (id, _) = api.create_session("firefox-browser").await?;
        placed.push(id);
    }
    let mut ids = HashSet::new();
    let mut owner = HashMap::new();
    for id in &placed {
        api.wait_state(id, "running", LIMIT).await?;
        let agent = api.session(id).await?["agent_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        owner.insert(id.clone(), agent);
        ids.insert(id.clone());
    }
    let mut cmds = Vec::new();
    for round in 0..per_session {
        for id in &placed {
            let kind = if round % 2 == 0 {
                CommandKind::HibernateSession(HibernateSession {})
            } else {
                CommandKind::WakeSession(WakeSession {})
            };
            cmds.push(NewCommand::new(owner[id].clone(), Some(id.clone()), kind));
        }
    }
    Ok((ids, cmds))
}

async fn enqueue(stack: &Stack, cmds: &[NewCommand]) -> anyhow::Result<()> {
    let mut conn = stack.pool.acquire().await?;
    for chunk in cmds.chunks(5_000) {
        CommandQueue::command_enqueue_many(&mut conn, chunk).await?;
    }
    Ok(())
}

async fn count(stack: &Stack, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_as::<_, (i64,)>(sql)
        .fetch_one(&stack.pool)
        .await?
        .0)
}

async fn wait_all_completed(stack: &Stack, total: usize) -> anyhow::Result<Duration> {
    let pool = stack.pool.clone();
    let (_, t) = until(&format!("all {total} commands completed"), LIMIT, || {
        let pool = pool.clone();
        async move {
            // The workload's commands only (the sessions' starts came before it).
            let (done,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM agent_commands
                 WHERE status = 'completed' AND action IN ('hibernate_session', 'wake_session')",
            )
            .fetch_one(&pool)
            .await?;
            let (failed,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM agent_commands WHERE status IN ('failed', 'cancelled')",
            )
            .fetch_one(&pool)
            .await?;
            anyhow::ensure!(failed == 0, "{failed} commands ended failed/cancelled");
            Ok((done as usize == total).then_some(()))
        }
    })
    .await?;
    Ok(t)
}

/// Every command had exactly one effect: one journal line per command (plus the one
/// spawn per session), one spawn per session.
fn check_effects(
    stack: &Stack,
    r: &mut ScenarioReport,
    sessions: &HashSet<String>,
    expected: usize,
) {
    let mut lines = 0;
    let mut spawns: HashMap<String, usize> = HashMap::new();
    for a in &stack.agents {
        for (effect, session) in journal(&a.state_dir) {
            if sessions.contains(&session) {
                if effect == "spawn" {
                    *spawns.entry(session).or_default() += 1;
                } else {
                    lines += 1;
                }
            }
        }
    }
    r.metric(
        "effects recorded by the runtimes",
        lines as f64,
        "effects",
        Target::Equals {
            value: expected as f64,
        },
    );
    let doubled = spawns.values().filter(|n| **n > 1).count();
    r.metric(
        "sessions spawned more than once",
        doubled as f64,
        "sessions",
        Target::Equals { value: 0.0 },
    );
}

/// A stream cut while a start is executing: the command is redelivered after the agent
/// reconnects (under a new lease), takes effect once, and the flap costs no attempt (the
/// agent's `Hello` says it still runs the command).
pub async fn stream_cut(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    // A template that takes a second to come up, so the command is surely in flight.
    let slow = vec![
        ("STREAMSPACE_TEMPLATES__SLOW-BROWSER__PROGRAM".to_string(), "sh".to_string()),
        (
            "STREAMSPACE_TEMPLATES__SLOW-BROWSER__ARGS".to_string(),
            r#"["-c", "sleep 1 && exec \"$0\" serve-session --session \"$1\" --port \"$2\"", "{agent}", "{session}", "{port}"]"#
                .to_string(),
        ),
    ];
    let mut stack = ctx.stack_with_agent_env(1, 1, slow).await?;
    let result = async {
        let proxy = Proxy::start(stack.dispatchers[0].port).await?;
        stack.kill_agent(0).await;
        stack.agents[0].url_override = Some(format!("http://127.0.0.1:{}", proxy.port));
        stack.spawn_agent(0).await?;
        stack.wait_agent_online(0).await?;

        let api = user_api(&stack, "chaos").await?;
        let (session, command) = api.create_session("slow-browser").await?;
        let pool = stack.pool.clone();
        let id = command.clone();
        let (first_lease, _) = until("the start command to be acknowledged", LIMIT, || {
            let pool = pool.clone();
            let id = id.clone();
            async move {
                let (s, token): (String, Option<i64>) = sqlx::query_as(
                    "SELECT status, lease_token FROM agent_commands WHERE command_id = $1",
                )
                .bind(&id)
                .fetch_one(&pool)
                .await?;
                Ok((s == "ack").then_some(token))
            }
        })
        .await?;
        proxy.sever();
        let cut = Instant::now();
        api.wait_state(&session, "running", LIMIT).await?;
        r.metric(
            "cut to running",
            cut.elapsed().as_secs_f64(),
            "s",
            Target::Info,
        );
        let (attempts, last_lease): (i32, Option<i64>) = sqlx::query_as(
            "SELECT attempts, lease_token FROM agent_commands WHERE command_id = $1",
        )
        .bind(&command)
        .fetch_one(&stack.pool)
        .await?;
        r.check(
            "redelivered under a new lease",
            last_lease != first_lease,
            "a new lease token after the reconnect",
            format!("the token stayed {first_lease:?}"),
        );
        r.metric(
            "attempts counted for the flap",
            f64::from(attempts - 1),
            "attempts",
            Target::Equals { value: 0.0 },
        );
        let spawns = journal(&stack.agents[0].state_dir)
            .iter()
            .filter(|(e, s)| e == "spawn" && *s == session)
            .count();
        r.metric(
            "session processes spawned",
            spawns as f64,
            "spawns",
            Target::Equals { value: 1.0 },
        );
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}

/// The dispatcher is SIGKILLed mid-delivery and restarted: every command completes, each
/// with exactly one effect.
pub async fn dispatcher_kill(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(1, 2).await?;
    let result = async {
        let (sessions, per) = match ctx.profile {
            Profile::Quick => (10, 10),
            Profile::Full => (20, 25),
        };
        let (ids, cmds) = workload(&stack, sessions, per).await?;
        let total = cmds.len();
        enqueue(&stack, &cmds).await?;
        let pool = stack.pool.clone();
        until("a tenth of the work to complete", LIMIT, || {
            let pool = pool.clone();
            async move {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM agent_commands
                     WHERE status = 'completed' AND action IN ('hibernate_session', 'wake_session')",
                )
                .fetch_one(&pool)
                .await?;
                Ok((n as usize >= total / 10).then_some(()))
            }
        })
        .await?;
        stack.kill_dispatcher(0).await;
        let in_flight = count(
            &stack,
            "SELECT count(*) FROM agent_commands WHERE status IN ('sent', 'ack')",
        )
        .await?;
        r.metric(
            "commands in flight when the dispatcher died",
            in_flight as f64,
            "commands",
            Target::Info,
        );
        let restarted = Instant::now();
        stack.start_dispatcher(0).await?;
        wait_all_completed(&stack, total).await?;
        r.metric("commands", total as f64, "commands", Target::Info);
        r.metric(
            "restart to all completed",
            restarted.elapsed().as_secs_f64(),
            "s",
            Target::Info,
        );
        check_effects(&stack, r, &ids, total);
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}

/// Two dispatchers, agents spread over them, 1,000 commands: all completed, none twice.
pub async fn two_dispatchers(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let mut stack = ctx.stack(2, 4).await?;
    let result = async {
        let (ids, cmds) = workload(&stack, 10, 25).await?;
        let total = cmds.len();
        enqueue(&stack, &cmds).await?;
        let t = wait_all_completed(&stack, total).await?;
        r.metric("commands", total as f64, "commands", Target::AtLeast { value: 1000.0 });
        r.metric("time to complete", t.as_secs_f64(), "s", Target::Info);
        r.metric("throughput", total as f64 / t.as_secs_f64().max(1e-9), "commands/s", Target::Info);
        let owners = count(
            &stack,
            "SELECT count(DISTINCT split_part(lease_owner, '/', 1)) FROM agent_commands WHERE lease_owner IS NOT NULL",
        )
        .await?;
        r.metric("dispatchers that delivered", owners as f64, "dispatchers", Target::Equals { value: 2.0 });
        check_effects(&stack, r, &ids, total);
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    result
}
