//! `streams`: one dispatcher holding many agents at once. Each simulated agent is what the
//! dispatcher sees of a real one: its own credential, its own TCP connection and HTTP/2
//! `Connect` stream, a `Hello`, then a heartbeat on the interval the `Welcome` asks for.
//! Measured: how many streams are held with every heartbeat recorded on time, and the
//! dispatcher's resident memory per stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::json;
use streamspace_proto::agent::v1::{self as pb, agent_message::Msg, dispatcher_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::pipeline::{record_stack_options, until};
use super::{Env, Run};
use crate::stack::{Stack, register_agent};

/// Agents connecting or registering at once.
const CONCURRENCY: usize = 64;

pub async fn streams(env: &Env) -> anyhow::Result<Run> {
    let n = 10_000;
    let window = Duration::from_secs(if env.full() { 60 } else { 10 });
    // Each side holds one socket per agent (the simulator here, the dispatcher, which
    // inherits the limit, there).
    raise_fd_limit(n as u64 + 1_024)?;
    let url = env.fresh_database().await?;
    let mut stack = Stack::start(record_stack_options(url, env, 0, false)).await?;
    let result = measure(env, &stack, n, window).await;
    stack.stop().await;
    result
}

async fn measure(env: &Env, stack: &Stack, n: usize, window: Duration) -> anyhow::Result<Run> {
    let pid = stack.dispatchers[0]
        .proc
        .as_ref()
        .and_then(|p| p.pid())
        .context("the dispatcher's pid")?;
    let dispatcher = stack.dispatcher_url(0);

    if env.pgss {
        super::queue::pgss_reset(&mut *stack.pool.acquire().await?).await?;
    }
    let started = Instant::now();
    let credentials: Vec<(String, String)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let pool = stack.pool.clone();
            async move {
                let id = format!("sim-{i}");
                let token = register_agent(&pool, &id).await?;
                anyhow::Ok((id, token))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let register_s = started.elapsed().as_secs_f64();
    if env.pgss {
        super::queue::print_top_statements(&stack.pool, &format!("registering {n} agents")).await?;
        super::queue::pgss_reset(&mut *stack.pool.acquire().await?).await?;
    }

    let rss_before = rss_kib(pid.as_raw())?;
    let ended = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let agents: Vec<Simulated> = futures_util::stream::iter(credentials)
        .map(|(_, token): (String, String)| {
            let (dispatcher, ended) = (dispatcher.clone(), ended.clone());
            async move { Simulated::connect(&dispatcher, &token, ended).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let connect_s = started.elapsed().as_secs_f64();
    if env.pgss {
        super::queue::print_top_statements(&stack.pool, &format!("connecting {n} agents")).await?;
    }
    let interval = agents
        .first()
        .map(|a| a.heartbeat_interval)
        .context("no agent connected")?;

    // Hold them all for the window, then look: every stream still open, every agent's
    // last heartbeat recorded within one interval (plus the write's own time).
    tokio::time::sleep(window).await;
    let held = n - ended.load(Ordering::Relaxed);
    let late_after = interval.as_secs_f64() * 1.5;
    let (late,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM agents WHERE agent_id LIKE 'sim-%'
           AND (last_heartbeat_at IS NULL
                OR last_heartbeat_at < now() - make_interval(secs => $1))",
    )
    .bind(late_after)
    .fetch_one(&stack.pool)
    .await?;
    let rss_after = rss_kib(pid.as_raw())?;
    let per_stream_kb = (rss_after.saturating_sub(rss_before)) as f64 * 1.024 / n as f64;
    let dropped = Instant::now();
    drop(agents);
    // The streams end with their senders; the dispatcher notices and lets them go.
    until("the simulated agents to disconnect", Duration::from_secs(120), || {
        let pool = stack.pool.clone();
        async move {
            let (connected,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM agents WHERE agent_id LIKE 'sim-%' AND connected_owner IS NOT NULL",
            )
            .fetch_one(&pool)
            .await?;
            Ok(connected == 0)
        }
    })
    .await?;
    let disconnect_s = dropped.elapsed().as_secs_f64();
    let on_time = held.saturating_sub(late as usize);
    Ok(Run {
        value: on_time as f64,
        secondary: Some(per_stream_kb),
        details: json!({
            "agents": n, "registered_in_s": register_s, "connected_in_s": connect_s,
            "all_offline_in_s": disconnect_s, "window_s": window.as_secs_f64(),
            "heartbeat_interval_ms": interval.as_millis() as u64,
            "streams_ended_early": n - held, "heartbeats_late": late,
            "late_means_older_than_s": late_after,
            "dispatcher_rss_kib": { "before": rss_before, "after": rss_after },
        }),
    })
}

/// One simulated agent: its stream's sender (dropping it ends the stream) and the tasks
/// that beat and read.
struct Simulated {
    _tx: mpsc::Sender<pb::AgentMessage>,
    heartbeat_interval: Duration,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Simulated {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Simulated {
    async fn connect(url: &str, token: &str, ended: Arc<AtomicUsize>) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .context("connecting a simulated agent")?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(pb::AgentMessage {
            msg: Some(Msg::Hello(pb::Hello {
                agent_version: "streams-bench".into(),
                protocol_version: pb::PROTOCOL_VERSION,
                runtime: "record".into(),
                ..Default::default()
            })),
        })
        .await?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let mut inbound = client.connect(request).await?.into_inner();
        let welcome = match inbound.message().await?.and_then(|m| m.msg) {
            Some(dispatcher_message::Msg::Welcome(w)) => w,
            other => bail!("expected Welcome, got {other:?}"),
        };
        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(1)));
        let beats = tx.clone();
        let beating = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let beat = pb::AgentMessage {
                    msg: Some(Msg::Heartbeat(pb::Heartbeat::default())),
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        let reading = tokio::spawn(async move {
            // Nothing is queued for these agents; any end of the stream is early.
            while let Ok(Some(_)) = inbound.message().await {}
            ended.fetch_add(1, Ordering::Relaxed);
        });
        Ok(Self {
            _tx: tx,
            heartbeat_interval: interval,
            tasks: [beating, reading],
        })
    }
}

/// Resident set size of `pid`, in KiB.
fn rss_kib(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS in /proc/PID/status")
}

/// Raises this process's open-file limit to the hard limit (children inherit it) and
/// checks it covers `want`: each simulated agent holds a socket.
fn raise_fd_limit(want: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < want {
        bail!(
            "open-file limit {soft} is below the {want} this benchmark needs (raise `ulimit -n`)"
        );
    }
    Ok(())
}
