//! The faults, one injector each, driven by a seeded random schedule: quiet, inject,
//! hold the fault for a random while, heal — until the workload ends. `mixed` draws from
//! all of them. Every injection is logged with its time, for the report and for replay
//! with `--seed`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::Rng;
use rand::rngs::StdRng;
use serde::Serialize;
use streamspace_devpg::PgCluster;
use streamspace_faultnet::FaultProxy;
use tokio::sync::watch;

use crate::stack::Stack;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    AgentKill,
    DispatcherKill,
    GatewayKill,
    PostgresRestart,
    DbNetwork,
    AgentPause,
    Partition,
    RuntimeFaults,
    ReconnectStorm,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::AgentKill,
        Fault::DispatcherKill,
        Fault::GatewayKill,
        Fault::PostgresRestart,
        Fault::DbNetwork,
        Fault::AgentPause,
        Fault::Partition,
        Fault::RuntimeFaults,
        Fault::ReconnectStorm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::AgentKill => "agent-kill",
            Fault::DispatcherKill => "dispatcher-kill",
            Fault::GatewayKill => "gateway-kill",
            Fault::PostgresRestart => "postgres-restart",
            Fault::DbNetwork => "db-network",
            Fault::AgentPause => "agent-pause",
            Fault::Partition => "partition",
            Fault::RuntimeFaults => "runtime-faults",
            Fault::ReconnectStorm => "reconnect-storm",
        }
    }
}

/// One injection, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct FaultEvent {
    pub at_ms: u64,
    pub fault: &'static str,
    pub detail: String,
    /// How long the fault lasted until it was healed.
    pub held_ms: u64,
}

/// What the injectors act on.
#[derive(Debug)]
pub struct Env {
    pub stack: Stack,
    /// Between every service and PostgreSQL.
    pub db_proxy: FaultProxy,
    pub cluster: PgCluster,
    /// The dispatchers' lease: a paused agent stays paused longer than this.
    pub lease: Duration,
}

fn between(rng: &mut StdRng, lo_ms: u64, hi_ms: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo_ms..=hi_ms))
}

/// Injects faults drawn from `faults` until `stop` turns true, then heals everything.
pub async fn inject(
    env: &mut Env,
    faults: &[Fault],
    rng: &mut StdRng,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) -> anyhow::Result<Vec<FaultEvent>> {
    let mut log = Vec::new();
    loop {
        let quiet = between(rng, 300, 1_500);
        tokio::select! {
            () = tokio::time::sleep(quiet) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let fault = faults[rng.random_range(0..faults.len())];
        let at = started.elapsed();
        let t0 = Instant::now();
        let detail = apply(env, fault, rng).await?;
        log.push(FaultEvent {
            at_ms: super::history::ms(at),
            fault: fault.name(),
            detail,
            held_ms: super::history::ms(t0.elapsed()),
        });
    }
    heal_all(env).await?;
    Ok(log)
}

/// One injection, held and healed; returns what was done.
async fn apply(env: &mut Env, fault: Fault, rng: &mut StdRng) -> anyhow::Result<String> {
    let agents = env.stack.agents.len();
    Ok(match fault {
        Fault::AgentKill => {
            let i = rng.random_range(0..agents);
            let pause = between(rng, 100, 1_500);
            env.stack.kill_agent(i).await;
            tokio::time::sleep(pause).await;
            env.stack.spawn_agent(i).await?;
            format!("SIGKILL agent {i}, restarted after {pause:?}")
        }
        Fault::DispatcherKill => {
            let i = rng.random_range(0..env.stack.dispatchers.len());
            let pause = between(rng, 100, 1_500);
            env.stack.kill_dispatcher(i).await;
            tokio::time::sleep(pause).await;
            env.stack.start_dispatcher(i).await?;
            format!("SIGKILL dispatcher {i}, restarted after {pause:?}")
        }
        Fault::GatewayKill => {
            let pause = between(rng, 100, 1_000);
            env.stack.kill_gateway().await;
            tokio::time::sleep(pause).await;
            env.stack.start_gateway().await?;
            format!("SIGKILL gateway, restarted after {pause:?}")
        }
        Fault::PostgresRestart => {
            let pause = between(rng, 200, 1_500);
            tokio::task::block_in_place(|| env.cluster.crash());
            tokio::time::sleep(pause).await;
            tokio::task::block_in_place(|| env.cluster.restart())?;
            format!("PostgreSQL stopped -m immediate, started again after {pause:?}")
        }
        Fault::DbNetwork => match rng.random_range(0..3) {
            0 => {
                env.db_proxy.sever();
                "database connections cut".to_owned()
            }
            1 => {
                let hold = between(rng, 500, 3_000);
                env.db_proxy.blackhole();
                tokio::time::sleep(hold).await;
                env.db_proxy.pass();
                format!("database connections black-holed for {hold:?}")
            }
            _ => {
                let hold = between(rng, 300, 2_000);
                env.db_proxy.down();
                tokio::time::sleep(hold).await;
                env.db_proxy.pass();
                format!("database refused for {hold:?}")
            }
        },
        Fault::AgentPause => {
            let i = rng.random_range(0..agents);
            let hold = env.lease + between(rng, 300, 1_500);
            env.stack.signal_agent(i, Signal::SIGSTOP)?;
            tokio::time::sleep(hold).await;
            env.stack.signal_agent(i, Signal::SIGCONT)?;
            format!("SIGSTOP agent {i} for {hold:?} (longer than its lease)")
        }
        Fault::Partition => {
            let i = rng.random_range(0..agents);
            let hold = between(rng, 500, 3_000);
            let proxy = env.stack.agents[i]
                .proxy
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("partition needs agent proxies"))?;
            proxy.cut();
            tokio::time::sleep(hold).await;
            proxy.heal();
            format!("agent {i} ⇄ dispatcher black-holed for {hold:?}")
        }
        Fault::RuntimeFaults => {
            // The runtimes fail calls on their own (fault injection on); this makes the
            // agent reconnect too, so listings fail during handshakes as well.
            let i = rng.random_range(0..agents);
            if let Some(p) = &env.stack.agents[i].proxy {
                p.sever();
            }
            format!("agent {i}'s stream cut while its runtime fails calls at random")
        }
        Fault::ReconnectStorm => {
            let rounds = rng.random_range(2..=4);
            for _ in 0..rounds {
                // Handshakes slowed: every statement's reply held for a moment.
                env.db_proxy.hold_pg_completions();
                for a in &env.stack.agents {
                    if let Some(p) = &a.proxy {
                        p.sever();
                    }
                }
                tokio::time::sleep(between(rng, 100, 400)).await;
                env.db_proxy.pass();
                tokio::time::sleep(between(rng, 50, 300)).await;
            }
            format!("{rounds} rounds: every agent's stream cut at once, handshakes slowed")
        }
    })
}

/// Everything back: database reachable, every process running, every link open.
pub async fn heal_all(env: &mut Env) -> anyhow::Result<()> {
    env.db_proxy.pass();
    tokio::task::block_in_place(|| env.cluster.restart())?;
    for i in 0..env.stack.dispatchers.len() {
        if env.stack.dispatchers[i].proc.is_none() {
            env.stack.start_dispatcher(i).await?;
        }
    }
    if env.stack.gateway.as_ref().is_none_or(|g| g.proc.is_none()) {
        env.stack.start_gateway().await?;
    }
    for i in 0..env.stack.agents.len() {
        if let Some(p) = &env.stack.agents[i].proxy {
            p.heal();
        }
        if env.stack.agents[i].proc.is_none() {
            env.stack.spawn_agent(i).await?;
        } else {
            let _ = env.stack.signal_agent(i, Signal::SIGCONT);
        }
    }
    Ok(())
}
