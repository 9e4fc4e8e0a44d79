//! `cargo xtask e2e`: the original project's integration test plan, automated against real
//! processes started like `cargo xtask up` does. Each scenario gets a fresh database and
//! working directory; results go to a summary table and `target/e2e/report.json`.

mod agent_restart;
mod agent_tls;
mod balance;
mod chaos;
mod command_retry;
mod db_roles;
mod heartbeat;
mod kubernetes;
mod observability;
mod resources;
mod throughput;
mod up_supervisor;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use streamspace_core::db::MIGRATOR;

use crate::api::Api;
use crate::report::{self, ScenarioReport};
use crate::stack::{Stack, StackOptions};

/// How thorough a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Smaller follow-up volumes (CI).
    Quick,
    /// The full plan: 10,000 commands drained after downtime, 50 sessions for resources.
    Full,
}

/// What a scenario gets.
#[derive(Debug)]
pub struct Ctx {
    pub profile: Profile,
    pub run_dir: PathBuf,
    pub database_url: String,
    pub echo: bool,
}

impl Ctx {
    /// Starts a stack for this scenario.
    pub async fn stack(&self, dispatchers: usize, agents: usize) -> anyhow::Result<Stack> {
        self.stack_with_agent_env(dispatchers, agents, vec![]).await
    }

    /// Starts a stack with extra agent settings.
    pub async fn stack_with_agent_env(
        &self,
        dispatchers: usize,
        agents: usize,
        agent_env: Vec<(String, String)>,
    ) -> anyhow::Result<Stack> {
        Stack::start(StackOptions {
            echo: self.echo,
            agent_env,
            ..StackOptions::new(
                self.database_url.clone(),
                self.run_dir.clone(),
                dispatchers,
                agents,
            )
        })
        .await
    }
}

type ScenarioFn = for<'a> fn(
    &'a Ctx,
    &'a mut ScenarioReport,
) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

/// Every scenario, in run order.
pub const SCENARIOS: &[(&str, ScenarioFn)] = &[
    ("3.2-command-retry", |c, r| {
        Box::pin(command_retry::run(c, r))
    }),
    ("3.1-agent-restart", |c, r| {
        Box::pin(agent_restart::run(c, r))
    }),
    ("3.3-heartbeat", |c, r| Box::pin(heartbeat::run(c, r))),
    ("3.4-balance", |c, r| Box::pin(balance::run(c, r))),
    ("agent-mtls", |c, r| Box::pin(agent_tls::run(c, r))),
    ("db-roles", |c, r| Box::pin(db_roles::run(c, r))),
    ("4.1-throughput", |c, r| Box::pin(throughput::run(c, r))),
    ("4.2-resources", |c, r| Box::pin(resources::run(c, r))),
    ("chaos-stream-cut", |c, r| Box::pin(chaos::stream_cut(c, r))),
    ("chaos-dispatcher-kill", |c, r| {
        Box::pin(chaos::dispatcher_kill(c, r))
    }),
    ("chaos-two-dispatchers", |c, r| {
        Box::pin(chaos::two_dispatchers(c, r))
    }),
    ("kubernetes-runtime", |c, r| Box::pin(kubernetes::run(c, r))),
    ("observability", |c, r| Box::pin(observability::run(c, r))),
    ("up-supervisor", |c, r| Box::pin(up_supervisor::run(c, r))),
];

/// Runs the selected scenarios; returns whether all passed.
pub async fn run(
    profile: Profile,
    only: Option<String>,
    echo: bool,
    report_path: PathBuf,
) -> anyhow::Result<bool> {
    let selected: Vec<_> = SCENARIOS
        .iter()
        .filter(|(name, _)| only.as_deref().is_none_or(|o| o == *name))
        .collect();
    if selected.is_empty() {
        let names: Vec<_> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        anyhow::bail!(
            "no scenario named {:?}; known: {}",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    let mut reports = Vec::new();
    let total = selected.len();
    for (i, (name, scenario)) in selected.into_iter().enumerate() {
        eprintln!("[{}/{total}] {name} …", i + 1);
        let started = Instant::now();
        let mut report = ScenarioReport::new(name);
        let run_dir =
            std::env::temp_dir().join(format!("streamspace-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        let database_url = streamspace_devpg::testdb::fresh_database_url(&MIGRATOR).await;
        let ctx = Ctx {
            profile,
            run_dir: run_dir.clone(),
            database_url,
            echo,
        };
        if let Err(e) = scenario(&ctx, &mut report).await {
            report.fail(format!("scenario aborted: {e:#}"));
        }
        report.duration_s = started.elapsed().as_secs_f64();
        if std::env::var_os("E2E_KEEP_RUN_DIR").is_some() {
            eprintln!("kept {} (database {})", run_dir.display(), ctx.database_url);
        } else {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        eprintln!(
            "[{}/{total}] {name} {} in {:.1}s",
            i + 1,
            if report.pass { "passed" } else { "FAILED" },
            report.duration_s
        );
        reports.push(report);
    }
    println!("{}", report::summary(&reports));
    report::write_json(&report_path, &reports).context("writing the report")?;
    eprintln!("report: {}", report_path.display());
    Ok(reports.iter().all(|r| r.pass))
}

/// A user's API client for `stack`, with a freshly minted development token.
pub async fn user_api(stack: &Stack, user: &str) -> anyhow::Result<Api> {
    let token = stack.mint_token(user, false).await?;
    Ok(Api::new(stack.gateway_url(), token))
}

/// Polls `f` until it yields `Some`, or fails with `what` after `limit`.
pub async fn until<T, F, Fut>(
    what: &str,
    limit: Duration,
    mut f: F,
) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok((v, started.elapsed()));
        }
        if started.elapsed() > limit {
            anyhow::bail!("expected {what} within {limit:?}; it did not happen");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
