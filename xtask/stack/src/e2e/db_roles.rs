//! Least privilege in the database: the gateway and the dispatcher run as roles of their
//! own, granted by `streamspace_grant_roles` exactly what each uses (no DDL, no more), and
//! a session's whole life plus agent administration still work; what a role was not
//! granted is refused by PostgreSQL.

use std::time::Duration;

use sqlx::PgPool;

use super::{Ctx, user_api};
use crate::api::Api;
use crate::report::{ScenarioReport, Target};
use crate::stack::{Stack, StackOptions, random_secret};

const LIMIT: Duration = Duration::from_secs(60);

/// `url` with its user and password replaced.
fn as_role(url: &str, role: &str, password: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("unexpected database URL form"))?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    Ok(format!("{scheme}://{role}:{password}@{host}"))
}

/// Creates a LOGIN role with `password`.
async fn create_role(pool: &PgPool, role: &str, password: &str) -> anyhow::Result<()> {
    // Identifiers and the password are ours (letters and digits), not user input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{password}'"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether `sql`, run as the role behind `url`, is refused for lack of privilege.
async fn refused(url: &str, sql: &'static str) -> anyhow::Result<bool> {
    let pool = PgPool::connect(url).await?;
    let outcome = sqlx::query(sql).execute(&pool).await;
    pool.close().await;
    Ok(match outcome {
        Err(sqlx::Error::Database(e)) => e.code().as_deref() == Some("42501"),
        _ => false,
    })
}

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    let owner = PgPool::connect(&ctx.database_url).await?;
    streamspace_core::db::ensure_schema(&owner, streamspace_core::db::SchemaPolicy::Migrate)
        .await?;
    // Roles are cluster-wide: a suffix keeps reruns apart.
    let suffix = &random_secret()[..8]
        .to_ascii_lowercase()
        .replace(['-', '_'], "x");
    let (gateway, dispatcher) = (format!("ss_gw_{suffix}"), format!("ss_dp_{suffix}"));
    let password = random_secret().replace(|c: char| !c.is_ascii_alphanumeric(), "");
    create_role(&owner, &gateway, &password).await?;
    create_role(&owner, &dispatcher, &password).await?;
    streamspace_core::db::grant_service_roles(&owner, &gateway, &dispatcher).await?;
    let gateway_url = as_role(&ctx.database_url, &gateway, &password)?;
    let dispatcher_url = as_role(&ctx.database_url, &dispatcher, &password)?;

    let url_env = |url: &str| vec![("STREAMSPACE_DATABASE__URL".to_owned(), url.to_owned())];
    let mut stack = Stack::start(StackOptions {
        echo: ctx.echo,
        gateway_env: url_env(&gateway_url),
        dispatcher_env: url_env(&dispatcher_url),
        ..StackOptions::new(ctx.database_url.clone(), ctx.run_dir.clone(), 1, 1)
    })
    .await?;
    let result = steps(&stack, r, &gateway_url, &dispatcher_url).await;
    stack.stop().await;
    result
}

async fn steps(
    stack: &Stack,
    r: &mut ScenarioReport,
    gateway_url: &str,
    dispatcher_url: &str,
) -> anyhow::Result<()> {
    let api = user_api(stack, "dana").await?;
    let (id, _) = api.create_session("firefox-browser").await?;
    api.wait_state(&id, "running", LIMIT).await?;
    api.hibernate(&id).await?;
    api.wait_state(&id, "hibernated", LIMIT).await?;
    api.wake(&id).await?;
    api.wait_state(&id, "running", LIMIT).await?;
    api.delete_session(&id).await?;
    let waited = api.wait_state(&id, "terminated", LIMIT).await?;
    r.metric(
        "a session's whole life under least-privilege roles",
        waited.as_secs_f64(),
        "s",
        Target::AtMost { value: 30.0 },
    );

    let admin = Api::new(stack.gateway_url(), stack.mint_token("ops", true).await?);
    let registered = admin
        .call(
            reqwest::Method::POST,
            "/api/v1/admin/agents",
            Some(serde_json::json!({"agent_id": "least-privilege-1"})),
        )
        .await?;
    let issued = admin
        .call(
            reqwest::Method::POST,
            "/api/v1/admin/agents/least-privilege-1/credentials",
            None,
        )
        .await?;
    r.check(
        "agent administration under the gateway's role",
        registered.status == 201 && issued.status == 201,
        "HTTP 201, 201",
        format!("HTTP {}, {}", registered.status, issued.status),
    );

    let denied = [
        refused(gateway_url, "CREATE TABLE gateway_was_here (x int)").await?,
        refused(gateway_url, "DELETE FROM agent_commands").await?,
        refused(dispatcher_url, "CREATE TABLE dispatcher_was_here (x int)").await?,
        refused(dispatcher_url, "INSERT INTO agent_credentials (credential_id, agent_id, token_sha256) VALUES ('c', 'a', 'x')").await?,
        refused(dispatcher_url, "DELETE FROM api_idempotency").await?,
    ];
    r.check(
        "what a role was not granted is refused (no DDL, no foreign tables)",
        denied.iter().all(|d| *d),
        "5 of 5 refused",
        format!("{} of 5 refused", denied.iter().filter(|d| **d).count()),
    );
    Ok(())
}
