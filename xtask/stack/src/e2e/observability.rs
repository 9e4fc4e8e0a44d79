//! One trace per command across every hop: the three services export spans over
//! OTLP/gRPC to an in-process collector, a session is created (with the client's own
//! `traceparent`) while its agent is down, and once the agent is back and the command
//! has run, the collector must hold one trace with the gateway's request span (a child
//! of the client's), the dispatcher's delivery span (a child of the gateway's) and the
//! agent's execution span (a child of the delivery).

use std::time::Duration;

use super::{Ctx, until};
use crate::api::Api;
use crate::otlp::{CollectedSpan, Collector};
use crate::report::ScenarioReport;
use crate::stack::{Stack, StackOptions};

const LIMIT: Duration = Duration::from_secs(60);
/// The client's traces and spans, as a browser or CLI would send them: one for the
/// start (agent up), one for a hibernate accepted while the agent is down.
const START_TRACE: (&str, &str) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
const HIBERNATE_TRACE: (&str, &str) = ("5cf92f3577b34da6a3ce929d0e0e4737", "11f067aa0ba902b8");

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let otel = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            collector.endpoint(),
        ),
        // Export within a tenth of a second, not the default five.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let mut stack = Stack::start(StackOptions {
        echo: ctx.echo,
        agent_env: otel.clone(),
        dispatcher_env: otel.clone(),
        gateway_env: otel,
        ..StackOptions::new(ctx.database_url.clone(), ctx.run_dir.clone(), 1, 1)
    })
    .await?;
    let result = steps(&mut stack, &collector, r).await;
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

/// Waits until the trace holds the gateway's request, the dispatcher's delivery and the
/// agent's execution of `command`, then says whether each is the child of the one
/// before (the first of the client's span) and whether any span of the command landed
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
            let execution = spans.iter().find(|s| {
                s.trace_id == trace
                    && s.service == "streamspace-agent"
                    && s.name == "execute command"
                    && s.attribute("command_id") == Some(command)
            });
            Ok(
                match (
                    one(&spans, trace, "api-gateway", gateway_span),
                    one(&spans, trace, "command-dispatcher", "deliver command"),
                    execution,
                ) {
                    (Some(g), Some(d), Some(e)) => {
                        Some((g.clone(), d.clone(), e.clone(), spans.clone()))
                    }
                    _ => None,
                },
            )
        },
    )
    .await;
    let ((gateway, delivery, execution, spans), _) = found.map_err(|e| {
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
        && execution.parent_span_id == delivery.span_id;
    if parented && strays == 0 {
        Ok((gateway, execution))
    } else {
        Err(format!(
            "gateway {} (parent {}), delivery {} (parent {}), execution {} (parent {}), {strays} spans of the command in other traces",
            gateway.span_id,
            gateway.parent_span_id,
            delivery.span_id,
            delivery.parent_span_id,
            execution.span_id,
            execution.parent_span_id,
        ))
    }
}

async fn steps(
    stack: &mut Stack,
    collector: &Collector,
    r: &mut ScenarioReport,
) -> anyhow::Result<()> {
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
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    api.wait_state(&session, "hibernated", LIMIT).await?;
    let later = one_trace(collector, HIBERNATE_TRACE, "PUT ", &hibernate).await;

    r.check(
        "one trace across gateway, dispatcher, agent",
        started.is_ok() && later.is_ok(),
        "client → gateway request → delivery → execution in one trace, also when delivered after the agent came back",
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
