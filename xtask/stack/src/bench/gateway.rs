//! The public API under load: many users, one HTTP/1.1 keep-alive connection per worker,
//! against the release gateway with rate limits off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::pipeline::{percentile, record_stack_options, wait_completed};
use super::{Env, Run};
use crate::stack::Stack;

const USERS: usize = 32;
const WORKERS: usize = 32;

struct Users {
    base: String,
    tokens: Vec<String>,
    http: reqwest::Client,
}

impl Users {
    async fn mint(stack: &Stack) -> anyhow::Result<Arc<Self>> {
        let mut tokens = Vec::with_capacity(USERS);
        for n in 0..USERS {
            tokens.push(stack.mint_token(&format!("bench-user-{n}"), false).await?);
        }
        Ok(Arc::new(Self {
            base: stack.gateway_url(),
            tokens,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(WORKERS * 4)
                .build()?,
        }))
    }

    /// `POST /api/v1/sessions` as user `n`; the answer's status and body.
    async fn create(&self, n: usize, body: &Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}/api/v1/sessions", self.base))
            .bearer_auth(&self.tokens[n % USERS])
            .json(body)
            .send()
            .await
            .context("POST /api/v1/sessions")?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn get(&self, n: usize, id: &str) -> anyhow::Result<u16> {
        let resp = self
            .http
            .get(format!("{}/api/v1/sessions/{id}", self.base))
            .bearer_auth(&self.tokens[n % USERS])
            .send()
            .await
            .context("GET /api/v1/sessions/{id}")?;
        let status = resp.status().as_u16();
        resp.bytes().await?;
        Ok(status)
    }
}

fn create_body() -> Value {
    // Naming the cluster lets an offline agent take the session (its start waits).
    json!({ "template": "firefox-browser", "cluster": "local" })
}

/// A stack whose only agent is registered but never started.
async fn offline_stack(env: &Env) -> anyhow::Result<Stack> {
    let url = env.fresh_database().await?;
    let stack = Stack::start(record_stack_options(url, env, 0, true)).await?;
    crate::stack::register_agent(&stack.pool, "bench-offline").await?;
    Ok(stack)
}

/// `WORKERS` tasks calling `op` back to back for `window`; `(ok, latencies_ms)`.
async fn closed_loop<F, Fut>(window: Duration, op: F) -> anyhow::Result<(usize, Vec<f64>)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let deadline = Instant::now() + window;
    let mut tasks = JoinSet::new();
    for w in 0..WORKERS {
        let op = op.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let t = Instant::now();
                op(w + i * WORKERS).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                i += 1;
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok((all.len(), all))
}

/// Requests issued at `rate`/s for `window` whatever earlier ones are doing (open loop);
/// each latency runs from the request's scheduled time, so a stall is not hidden. Also
/// returns how late each request left against its schedule (the pacer's own error).
async fn open_loop<F, Fut, T>(
    rate: f64,
    window: Duration,
    op: F,
) -> anyhow::Result<(Vec<(f64, T)>, Vec<f64>)>
where
    F: Fn(usize, DateTime<Utc>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let total = (rate * window.as_secs_f64()) as usize;
    // The schedule is kept by a thread of its own: tokio's timer rounds a deadline up to
    // its next millisecond tick, which made requests leave 0.97 ms late at the median
    // (and counted that in every latency); a thread's sleep wakes within tens of µs.
    let (tick_tx, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        for i in 0..total {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            if tick_tx.send((i, due)).is_err() {
                return;
            }
        }
    });
    let mut tasks = JoinSet::new();
    let mut late = Vec::with_capacity(total);
    while let Some((i, due)) = ticks.recv().await {
        let due = tokio::time::Instant::from_std(due);
        late.push(due.elapsed().as_secs_f64() * 1e3);
        let op = op.clone();
        let scheduled = Utc::now() - (tokio::time::Instant::now() - due);
        tasks.spawn(async move {
            let out = op(i, scheduled).await?;
            anyhow::Ok((due.elapsed().as_secs_f64() * 1e3, out))
        });
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    let mut all = Vec::with_capacity(total);
    while let Some(r) = tasks.join_next().await {
        all.push(r??);
    }
    Ok((all, late))
}

/// Saturation throughput of session creates (sessions queued for an offline agent), then
/// p99 latency at 1,000 creates/s offered.
pub async fn create(env: &Env) -> anyhow::Result<Run> {
    let window = Duration::from_secs(if env.full() { 15 } else { 5 });
    let mut stack = offline_stack(env).await?;
    let result = async {
        let users = Users::mint(&stack).await?;
        let body = Arc::new(create_body());
        let op = {
            let (users, body) = (users.clone(), body.clone());
            move |n: usize| {
                let (users, body) = (users.clone(), body.clone());
                async move {
                    let (status, answer) = users.create(n, &body).await?;
                    if status != 202 {
                        bail!("create answered {status}: {answer}");
                    }
                    Ok(())
                }
            }
        };
        closed_loop(Duration::from_secs(1), op.clone()).await?;
        if env.pgss {
            super::queue::pgss_reset(&mut *stack.pool.acquire().await?).await?;
        }
        let started = Instant::now();
        let (ok, mut lat) = closed_loop(window, op.clone()).await?;
        let rate = ok as f64 / started.elapsed().as_secs_f64();
        if env.pgss {
            super::queue::print_top_statements(&stack.pool, "saturated creates").await?;
        }
        let (open, _) = open_loop(1_000.0, window, move |n, _| op(n)).await?;
        let mut open_lat: Vec<f64> = open.into_iter().map(|(ms, ())| ms).collect();
        Ok(Run {
            value: rate,
            secondary: Some(percentile(&mut open_lat, 99.0)),
            details: json!({
                "workers": WORKERS, "users": USERS, "window_s": window.as_secs_f64(),
                "saturation_p50_ms": percentile(&mut lat, 50.0),
                "saturation_p99_ms": percentile(&mut lat, 99.0),
                "at_1000_per_s_p50_ms": percentile(&mut open_lat, 50.0),
                "at_1000_per_s_requests": open_lat.len(),
            }),
        })
    }
    .await;
    stack.stop().await;
    result
}

/// Saturation throughput of reading one's own session.
pub async fn get(env: &Env) -> anyhow::Result<Run> {
    let window = Duration::from_secs(if env.full() { 15 } else { 5 });
    let mut stack = offline_stack(env).await?;
    let result = async {
        let users = Users::mint(&stack).await?;
        let mut ids = Vec::with_capacity(USERS);
        for n in 0..USERS {
            let (status, body) = users.create(n, &create_body()).await?;
            if status != 202 {
                bail!("create answered {status}: {body}");
            }
            ids.push(body["id"].as_str().context("id in the answer")?.to_owned());
        }
        let ids = Arc::new(ids);
        let op = move |n: usize| {
            let (users, ids) = (users.clone(), ids.clone());
            async move {
                let status = users.get(n, &ids[n % USERS]).await?;
                if status != 200 {
                    bail!("get answered {status}");
                }
                Ok(())
            }
        };
        closed_loop(Duration::from_secs(1), op.clone()).await?;
        let started = Instant::now();
        let (ok, mut lat) = closed_loop(window, op).await?;
        Ok(Run {
            value: ok as f64 / started.elapsed().as_secs_f64(),
            secondary: None,
            details: json!({
                "workers": WORKERS, "users": USERS, "window_s": window.as_secs_f64(),
                "p50_ms": percentile(&mut lat, 50.0), "p99_ms": percentile(&mut lat, 99.0),
            }),
        })
    }
    .await;
    stack.stop().await;
    result
}

/// Sessions created through REST at 200/s while the agent is connected: milliseconds
/// from each request's scheduled send time to its start command's `completed_at`.
pub async fn latency_200(env: &Env) -> anyhow::Result<Run> {
    let window = Duration::from_secs(if env.full() { 30 } else { 10 });
    let url = env.fresh_database().await?;
    let mut stack = Stack::start(record_stack_options(url, env, 1, true)).await?;
    let result = async {
        let users = Users::mint(&stack).await?;
        let body = Arc::new(json!({ "template": "firefox-browser" }));
        let op = move |n: usize, scheduled: DateTime<Utc>| {
            let (users, body) = (users.clone(), body.clone());
            async move {
                let (status, answer) = users.create(n, &body).await?;
                if status != 202 {
                    bail!("create answered {status}: {answer}");
                }
                let id = answer["command_id"]
                    .as_str()
                    .context("command_id in the answer")?
                    .to_owned();
                Ok((id, scheduled))
            }
        };
        // Warm-up: connections, prepared statements, the agent's first commands.
        let (warm, _) = open_loop(200.0, Duration::from_secs(1), op.clone()).await?;
        if env.pgss {
            super::queue::pgss_reset(&mut *stack.pool.acquire().await?).await?;
        }
        let (sent, mut late) = open_loop(200.0, window, op).await?;
        wait_completed(
            &stack.pool,
            warm.len() + sent.len(),
            Duration::from_secs(120),
        )
        .await?;
        if env.pgss {
            super::queue::print_top_statements(&stack.pool, "creates at 200/s").await?;
        }
        let ids: Vec<String> = sent.iter().map(|(_, (id, _))| id.clone()).collect();
        let done: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT command_id, sent_at, completed_at FROM agent_commands WHERE command_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&stack.pool)
        .await?;
        let done: std::collections::HashMap<String, (DateTime<Utc>, DateTime<Utc>)> = done
            .into_iter()
            .map(|(id, sent, completed)| (id, (sent, completed)))
            .collect();
        let ms = |from: DateTime<Utc>, to: DateTime<Utc>| {
            (to - from).num_microseconds().unwrap_or(0) as f64 / 1e3
        };
        let mut lat = Vec::with_capacity(sent.len());
        let mut start = Vec::with_capacity(sent.len());
        let mut accept = Vec::with_capacity(sent.len());
        for (accept_ms, (id, scheduled)) in &sent {
            let (pushed, completed) = done.get(id).context("a sent command without completion")?;
            lat.push(ms(*scheduled, *completed));
            start.push(ms(*scheduled, *pushed));
            accept.push(*accept_ms);
        }
        let spread = |v: &mut Vec<f64>| {
            json!({ "n": v.len(), "p50": percentile(v, 50.0), "p90": percentile(v, 90.0),
                    "p99": percentile(v, 99.0), "max": percentile(v, 100.0) })
        };
        let (start_ms, complete_ms) = (spread(&mut start), spread(&mut lat));
        Ok(Run {
            value: percentile(&mut lat, 50.0),
            secondary: Some(percentile(&mut lat, 99.0)),
            details: json!({
                "requests": sent.len(), "rate_per_s": 200, "window_s": window.as_secs_f64(),
                "max_ms": percentile(&mut lat, 100.0),
                "accept_p50_ms": percentile(&mut accept, 50.0),
                // How late requests left against their schedule (counted in every figure).
                "pacer_late_p50_ms": percentile(&mut late, 50.0),
                "pacer_late_p99_ms": percentile(&mut late, 99.0),
                "accept_p99_ms": percentile(&mut accept, 99.0),
                // Scheduled send -> pushed to the agent, and -> completed.
                "start_ms": start_ms,
                "complete_ms": complete_ms,
            }),
        })
    }
    .await;
    stack.stop().await;
    result
}
