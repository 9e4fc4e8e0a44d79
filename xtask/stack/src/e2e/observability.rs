//! One trace per command across every hop: the three services export spans over
//! OTLP/gRPC to an in-process collector, a session is created (with the client's own
//! `traceparent`) while its agent is down, and once the agent is back and the command
//! has run, the collector must hold one trace with the gateway's request span (a child
//! of the client's), the dispatcher's delivery span (a child of the gateway's) and the
//! agent's execution span (a child of the delivery). Meanwhile `/metrics` of the
//! dispatcher and the gateway are scraped and parsed: the age of the oldest pending
//! command grows while the agent is down and is back to zero after the drain, and the
//! latency histograms are real histograms.

use std::time::Duration;

use super::{Ctx, until};
use crate::api::Api;
use crate::otlp::{CollectedSpan, Collector};
use crate::report::ScenarioReport;
use crate::stack::{Stack, StackOptions, free_port};

/// Where the services serve `/metrics`.
struct Scrape {
    dispatcher: String,
    gateway: String,
    agent: String,
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
}

/// The value of the sample `name{labels}` in Prometheus text; `labels` is the exact
/// label set as rendered (`agent_id="local-0"`), empty for none.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric, found) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        (metric == name && found == labels).then(|| value.parse().ok())?
    })
}

/// Every `streamspace_…` and `process_…` metric name in `text`, sorted.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["streamspace_", "process_"] {
        names.extend(names_with(text, prefix));
    }
    names
}

fn names_with(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `streamspace_queue_*` in a comment names a family, not a metric.
        if !tail[..end].ends_with('_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Whether `name` is a histogram in `text`: its `# TYPE`, `_bucket` samples with `le`
/// (`+Inf` among them), `_sum` and `_count`.
fn is_histogram(text: &str, name: &str) -> bool {
    let typed = text.contains(&format!("# TYPE {name} histogram"));
    let bucket = format!("{name}_bucket{{");
    let buckets = text.lines().filter(|l| l.starts_with(&bucket)).count();
    let inf = text
        .lines()
        .any(|l| l.starts_with(&bucket) && l.contains("le=\"+Inf\""));
    let sum = text.lines().any(|l| l.starts_with(&format!("{name}_sum")));
    let count = text
        .lines()
        .any(|l| l.starts_with(&format!("{name}_count")));
    typed && buckets > 1 && inf && sum && count
}

const LIMIT: Duration = Duration::from_secs(60);
/// The client's traces and spans, as a browser or CLI would send them: one for the
/// start (agent up), one for a hibernate accepted while the agent is down.
const START_TRACE: (&str, &str) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
const HIBERNATE_TRACE: (&str, &str) = ("5cf92f3577b34da6a3ce929d0e0e4737", "11f067aa0ba902b8");
const GRPC_TRACE: (&str, &str) = ("6df92f3577b34da6a3ce929d0e0e4738", "22f067aa0ba902b9");

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let dispatcher_metrics = free_port()?;
    let gateway_metrics = free_port()?;
    let agent_metrics = free_port()?;
    let otel = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            collector.endpoint(),
        ),
        // Export within a tenth of a second, not the default five.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let with = |key: &str, port: u16| {
        let mut env = otel.clone();
        env.push((key.to_owned(), format!("127.0.0.1:{port}")));
        env
    };
    // A template that takes two seconds to come up, so a start is surely in flight
    // when the agent is killed (a forced redelivery).
    let mut agent_env = with("STREAMSPACE_METRICS_LISTEN", agent_metrics);
    agent_env.extend([
        ("STREAMSPACE_TEMPLATES__SLOW-BROWSER__PROGRAM".to_owned(), "sh".to_owned()),
        (
            "STREAMSPACE_TEMPLATES__SLOW-BROWSER__ARGS".to_owned(),
            r#"["-c", "sleep 2 && exec \"$0\" serve-session --session \"$1\" --port \"$2\"", "{agent}", "{session}", "{port}"]"#
                .to_owned(),
        ),
    ]);
    let mut stack = Stack::start(StackOptions {
        echo: ctx.echo,
        agent_env,
        dispatcher_env: with("STREAMSPACE_METRICS_LISTEN", dispatcher_metrics),
        gateway_env: with("STREAMSPACE_HTTP__METRICS_LISTEN", gateway_metrics),
        ..StackOptions::new(ctx.database_url.clone(), ctx.run_dir.clone(), 1, 1)
    })
    .await?;
    let scrape = Scrape {
        dispatcher: format!("http://127.0.0.1:{dispatcher_metrics}/metrics"),
        gateway: format!("http://127.0.0.1:{gateway_metrics}/metrics"),
        agent: format!("http://127.0.0.1:{agent_metrics}/metrics"),
    };
    let result = steps(&mut stack, &collector, &scrape, r).await;
    stack.stop().await;
    result
}

/// The span of `service` in `trace` named `name` (or, for `name` ending in a space,
/// starting with it: the gateway names its request spans `POST /api/v1/sessions`).
fn one<'a>(
    spans: &'a [CollectedSpan],
    trace: &str,
    service: &str,
    name: &str,
) -> Option<&'a CollectedSpan> {
    spans.iter().find(|s| {
        s.trace_id == trace
            && s.service == service
            && (s.name == name || (name.ends_with(' ') && s.name.starts_with(name)))
    })
}

/// Sends `method path` with the client's `traceparent`; returns the JSON answer and the
/// `traceparent` the gateway answered with.
async fn traced(
    stack: &Stack,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    (trace, span): (&str, &str),
) -> anyhow::Result<(serde_json::Value, Option<String>)> {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", stack.gateway_url()))
        .bearer_auth(token)
        .header("traceparent", format!("00-{trace}-{span}-01"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?.error_for_status()?;
    let answered = response
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((response.json().await?, answered))
}

/// Waits until the trace holds the gateway's request, the dispatcher's delivery, the
/// agent's execution of `command` and the dispatcher's applying its result, then says
/// whether each is the child of the one before (the first of the client's span, the
/// result's of the request) and whether any span of the command landed
/// in another trace. `Ok` carries the gateway's and the execution's spans, `Err` what
/// was wrong.
async fn one_trace(
    collector: &Collector,
    (trace, client_span): (&str, &str),
    gateway_span: &str,
    command: &str,
) -> Result<(CollectedSpan, CollectedSpan), String> {
    let found = until(
        "the command's spans from all three services",
        LIMIT,
        || async {
            let spans = collector.spans();
            let of_command = |service: &str, name: &str| {
                spans.iter().find(|s| {
                    s.trace_id == trace
                        && s.service == service
                        && s.name == name
                        && s.attribute("command_id") == Some(command)
                })
            };
            Ok(
                match (
                    one(&spans, trace, "api-gateway", gateway_span),
                    one(&spans, trace, "command-dispatcher", "deliver command"),
                    of_command("streamspace-agent", "execute command"),
                    of_command("command-dispatcher", "apply result"),
                    one(&spans, trace, "api-gateway", "enqueue command"),
                ) {
                    (Some(g), Some(d), Some(e), Some(a), Some(q)) => Some((
                        (g.clone(), q.clone()),
                        d.clone(),
                        e.clone(),
                        a.clone(),
                        spans.clone(),
                    )),
                    _ => None,
                },
            )
        },
    )
    .await;
    let (((gateway, enqueue), delivery, execution, applied, spans), _) = found.map_err(|e| {
        let spans = collector.spans();
        format!(
            "{e}; collected {} spans: {:?}",
            spans.len(),
            spans
                .iter()
                .map(|s| (&s.service, &s.name, &s.trace_id))
                .collect::<Vec<_>>()
        )
    })?;
    let strays = spans
        .iter()
        .filter(|s| s.attribute("command_id") == Some(command) && s.trace_id != trace)
        .count();
    let parented = gateway.parent_span_id == client_span
        && delivery.parent_span_id == gateway.span_id
        && execution.parent_span_id == delivery.span_id
        && execution
            .attribute("agent_id")
            .is_some_and(|a| !a.is_empty())
        && applied.parent_span_id == gateway.span_id
        && enqueue.parent_span_id == gateway.span_id;
    if parented && strays == 0 {
        Ok((gateway, execution))
    } else {
        Err(format!(
            "gateway {} (parent {}), enqueue (parent {}), delivery {} (parent {}), execution {} (parent {}), result applied (parent {}), {strays} spans of the command in other traces",
            gateway.span_id,
            gateway.parent_span_id,
            enqueue.parent_span_id,
            delivery.span_id,
            delivery.parent_span_id,
            execution.span_id,
            execution.parent_span_id,
            applied.parent_span_id,
        ))
    }
}

/// One authenticated `ListSessions` over gRPC and one without a token; whether they
/// were answered as expected.
async fn grpc_calls(stack: &Stack, token: &str) -> anyhow::Result<bool> {
    use streamspace_proto::api::v1 as pb;
    let channel = tonic::transport::Endpoint::from_shared(stack.gateway_grpc_url())?
        .connect()
        .await?;
    let mut client = pb::session_service_client::SessionServiceClient::new(channel);
    let mut authed = tonic::Request::new(pb::ListSessionsRequest { limit: 0 });
    authed
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (trace, span) = GRPC_TRACE;
    authed
        .metadata_mut()
        .insert("traceparent", format!("00-{trace}-{span}-01").parse()?);
    // The answer names the gateway's span in the caller's trace.
    let ok = client.list_sessions(authed).await.is_ok_and(|answer| {
        answer
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with(&format!("00-{trace}-")) && !t.contains(span))
    });
    let refused = client
        .list_sessions(tonic::Request::new(pb::ListSessionsRequest { limit: 0 }))
        .await
        .is_err_and(|s| s.code() == tonic::Code::Unauthenticated);
    Ok(ok && refused)
}

async fn steps(
    stack: &mut Stack,
    collector: &Collector,
    metrics: &Scrape,
    r: &mut ScenarioReport,
) -> anyhow::Result<()> {
    let agent = format!("agent_id=\"{}\"", stack.agents[0].agent_id);
    let token = stack.mint_token("olivia", false).await?;
    let api = Api::new(stack.gateway_url(), token.clone());
    let (created, answered) = traced(
        stack,
        &token,
        reqwest::Method::POST,
        "/api/v1/sessions",
        Some(serde_json::json!({"template": "firefox-browser"})),
        START_TRACE,
    )
    .await?;
    let session = created["id"].as_str().unwrap_or_default().to_owned();
    let start = created["command_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    api.wait_state(&session, "running", LIMIT).await?;
    let started = one_trace(collector, START_TRACE, "POST ", &start).await;

    // The agent is down when the hibernate is accepted; it runs after the agent is back.
    stack.kill_agent(0).await;
    let (accepted, _) = traced(
        stack,
        &token,
        reqwest::Method::PUT,
        &format!("/api/v1/sessions/{session}/hibernate"),
        None,
        HIBERNATE_TRACE,
    )
    .await?;
    let hibernate = accepted["command_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // The age of the agent's oldest pending command grows while it is down.
    let ((first, second), _) = until("the oldest pending command to age", LIMIT, || async {
        let first = sample(
            &scrape(&metrics.dispatcher).await?,
            "streamspace_queue_oldest_pending_age_seconds",
            &agent,
        );
        let Some(first) = first.filter(|age| *age > 0.0) else {
            return Ok(None);
        };
        let second = sample(
            &scrape(&metrics.dispatcher).await?,
            "streamspace_queue_oldest_pending_age_seconds",
            &agent,
        );
        Ok(second.filter(|s| *s > first).map(|s| (first, s)))
    })
    .await
    .unwrap_or(((0.0, 0.0), Duration::ZERO));
    let pending = sample(
        &scrape(&metrics.dispatcher).await?,
        "streamspace_queue_commands",
        &format!("{agent},status=\"pending\""),
    );
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    api.wait_state(&session, "hibernated", LIMIT).await?;
    let later = one_trace(collector, HIBERNATE_TRACE, "PUT ", &hibernate).await;
    let drained = until("the queue gauges to show the drain", LIMIT, || async {
        let text = scrape(&metrics.dispatcher).await?;
        let age = sample(
            &text,
            "streamspace_queue_oldest_pending_age_seconds",
            &agent,
        );
        let open = sample(
            &text,
            "streamspace_queue_commands",
            &format!("{agent},status=\"pending\""),
        );
        Ok((age == Some(0.0) && open == Some(0.0)).then_some(()))
    })
    .await;
    r.check(
        "oldest pending age grows while the agent is down, zero after the drain",
        first > 0.0 && second > first && pending == Some(1.0) && drained.is_ok(),
        "grows with 1 pending, then 0 and 0 pending",
        format!(
            "{first:.3} s then {second:.3} s with {pending:?} pending; after the drain: {}",
            if drained.is_ok() {
                "0"
            } else {
                "not 0 within the limit"
            }
        ),
    );
    // Two gRPC calls, one refused: counted by method and status code.
    let grpc = grpc_calls(stack, &token).await?;
    let dispatcher_text = scrape(&metrics.dispatcher).await?;
    let gateway_text = scrape(&metrics.gateway).await?;
    let list = "/streamspace.api.v1.SessionService/ListSessions";
    let ok = sample(
        &gateway_text,
        "streamspace_grpc_requests_total",
        &format!("method=\"{list}\",code=\"0\""),
    );
    let refused = sample(
        &gateway_text,
        "streamspace_grpc_requests_total",
        &format!("method=\"{list}\",code=\"16\""),
    );
    r.check(
        "gRPC requests by method and code",
        grpc && ok == Some(1.0)
            && refused == Some(1.0)
            && is_histogram(&gateway_text, "streamspace_grpc_request_duration_seconds"),
        "ListSessions: 1 OK (answering its traceparent), 1 UNAUTHENTICATED (16), with a latency histogram",
        format!("OK {ok:?}, UNAUTHENTICATED {refused:?}"),
    );
    let completed = sample(
        &dispatcher_text,
        "streamspace_command_accept_to_completed_seconds_count",
        "",
    );
    let histograms = is_histogram(
        &dispatcher_text,
        "streamspace_command_accept_to_completed_seconds",
    ) && is_histogram(
        &dispatcher_text,
        "streamspace_command_accept_to_delivered_seconds",
    ) && gateway_text
        .contains("# TYPE streamspace_api_request_duration_seconds histogram");
    r.check(
        "latency histograms on /metrics",
        histograms && completed.is_some_and(|n| n >= 2.0),
        "accept→delivered, accept→completed (≥ 2 commands) and REST latency as histograms",
        format!("histograms: {histograms}, completed count {completed:?}"),
    );

    r.check(
        "one trace across gateway, dispatcher, agent",
        started.is_ok() && later.is_ok(),
        "client → gateway request → delivery → execution (and the result applied) in one trace, also when delivered after the agent came back",
        format!(
            "start: {}; hibernate accepted while the agent was down: {}",
            started.as_ref().map_or_else(Clone::clone, |_| "one trace".to_owned()),
            later.as_ref().map_or_else(Clone::clone, |_| "one trace".to_owned()),
        ),
    );
    let expected = started.as_ref().map_or_else(
        |_| "the gateway's request span".to_owned(),
        |(gateway, _)| format!("00-{}-{}-01", START_TRACE.0, gateway.span_id),
    );
    r.check(
        "traceparent answered",
        answered.as_deref() == Some(expected.as_str()),
        &expected,
        answered.as_deref().unwrap_or("no traceparent header"),
    );
    // A forced redelivery: the agent dies while a start runs; after it is back the
    // start is delivered again, and the counter moved by exactly that one.
    let redeliveries = |text: &str| sample(text, "streamspace_command_redeliveries_total", "");
    let before = redeliveries(&scrape(&metrics.dispatcher).await?);
    let (slow, slow_start) = api.create_session("slow-browser").await?;
    until("the slow start to be acknowledged", LIMIT, || async {
        let status: String =
            sqlx::query_scalar("SELECT status FROM agent_commands WHERE command_id = $1")
                .bind(&slow_start)
                .fetch_one(&stack.pool)
                .await?;
        Ok((status == "ack").then_some(()))
    })
    .await?;
    stack.kill_agent(0).await;
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    api.wait_state(&slow, "running", LIMIT).await?;
    let after = redeliveries(&scrape(&metrics.dispatcher).await?);
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM agent_commands WHERE command_id = $1")
            .bind(&slow_start)
            .fetch_one(&stack.pool)
            .await?;
    r.check(
        "redeliveries equal the forced redeliveries",
        before.is_some() && after.zip(before).map(|(a, b)| a - b) == Some(1.0) && attempts == 2,
        "+1 (one start delivered again after the agent was killed mid-start)",
        format!("{before:?} -> {after:?}, the start's attempts {attempts}"),
    );
    let dispatcher_text = scrape(&metrics.dispatcher).await?;

    // The operator assets name only metrics that exist: every `streamspace_*` name in
    // the alert rules and the dashboard is a series in these scrapes.
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/components");
    let rules = std::fs::read_to_string(assets.join("prometheus-rules/rules.yaml"))?;
    let dashboard = std::fs::read_to_string(assets.join("grafana-dashboards/streamspace.json"))?;
    let dashboard_ok = serde_json::from_str::<serde_json::Value>(&dashboard).is_ok();
    // The agent's own: the runtime's operations, timed, and its link.
    let agent_text = scrape(&metrics.agent).await?;
    let starts = sample(
        &agent_text,
        "streamspace_agent_runtime_operation_seconds_count",
        "operation=\"start\",outcome=\"ok\"",
    );
    let connected = sample(&agent_text, "streamspace_agent_connected", "");
    r.check(
        "agent /metrics",
        is_histogram(&agent_text, "streamspace_agent_runtime_operation_seconds")
            && starts.is_some_and(|n| n >= 1.0)
            && connected == Some(1.0),
        "runtime operations as a histogram (≥ 1 start), connected = 1",
        format!("starts {starts:?}, connected {connected:?}"),
    );
    let scraped = format!("{dispatcher_text}{gateway_text}{agent_text}");
    let rss = [&dispatcher_text, &gateway_text, &agent_text]
        .map(|t| sample(t, "process_resident_memory_bytes", "").unwrap_or(0.0));
    r.check(
        "process metrics on every service",
        rss.iter().all(|b| *b > 0.0),
        "process_resident_memory_bytes > 0 for dispatcher, gateway, agent",
        format!("{rss:?}"),
    );
    let mut missing: Vec<String> = metric_names(&format!("{rules}{dashboard}"))
        .into_iter()
        .filter(|name| {
            !scraped.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
        .collect();
    missing.dedup();
    r.check(
        "dashboard and alerts reference scraped metrics",
        dashboard_ok && missing.is_empty(),
        "valid JSON, every streamspace_* and process_* name exported",
        if missing.is_empty() {
            format!("dashboard JSON valid: {dashboard_ok}")
        } else {
            format!("not in any scrape: {missing:?}")
        },
    );
    let spawned = started.as_ref().is_ok_and(|(_, execution)| {
        collector.spans().iter().any(|s| {
            s.trace_id == START_TRACE.0
                && s.service == "streamspace-agent"
                && s.name == "spawn session process"
                && s.parent_span_id == execution.span_id
        })
    });
    r.check(
        "runtime call in the command's trace",
        spawned,
        "the agent's process spawn is a child of the execution",
        if spawned {
            "yes"
        } else {
            "no spawn span under the execution"
        },
    );
    Ok(())
}
