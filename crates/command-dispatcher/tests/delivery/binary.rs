//! The dispatcher binary's start-up contract, as a real process.

use std::process::Command;

use streamspace_command_dispatcher::DispatcherConfig;

fn dispatcher(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_streamspace-command-dispatcher"))
        .args(args)
        .env("STREAMSPACE_DATABASE__URL", url)
        .env("STREAMSPACE_LISTEN", "127.0.0.1:0")
        .env("STREAMSPACE_METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the dispatcher binary")
}

#[tokio::test]
async fn refuses_an_empty_database_without_migrate_and_names_the_migration() {
    let url = streamspace_devpg::testdb::empty_database_url().await;
    let out = dispatcher(&url, &[]);
    assert!(!out.status.success(), "must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = streamspace_core::db::MIGRATOR.iter().next().unwrap();
    assert!(
        stderr.contains(&first.version.to_string()),
        "names the missing migration: {stderr}"
    );
    assert!(stderr.contains("--migrate"), "says how to fix it: {stderr}");

    let out = dispatcher(&url, &["--migrate", "--exit-after-migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    assert!(
        streamspace_core::db::pending_migrations(&pool)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn bad_configuration_is_named() {
    let url = streamspace_devpg::testdb::empty_database_url().await;
    let out = Command::new(env!("CARGO_BIN_EXE_streamspace-command-dispatcher"))
        .env("STREAMSPACE_DATABASE__URL", &url)
        .env("STREAMSPACE_HEARTBEAT_INTERVAL_MS", "5000")
        .env("STREAMSPACE_OFFLINE_AFTER_MS", "6000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("offline_after_ms"), "{stderr}");
}

/// `deploy/`'s dispatcher configuration loads and validates, with mutual TLS on.
#[test]
fn the_shipped_configuration_loads_and_validates() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/base/config/command-dispatcher.toml");
    let env = [(
        "STREAMSPACE_DATABASE__URL".to_owned(),
        "postgres://u@db/streamspace".to_owned(),
    )];
    let config: DispatcherConfig = streamspace_core::config::load_from(Some(&path), env)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    config.validate().unwrap();
    let tls = config.tls.expect("the shipped dispatcher serves TLS");
    assert!(
        tls.client_ca_file.is_some(),
        "and requires client certificates"
    );
}

/// The migration Job's `--grant-roles`: malformed lists and missing roles are named; with
/// the roles present the grants land (a service role can read the queue, not change the
/// schema).
#[tokio::test]
async fn the_migration_job_grants_the_service_roles() {
    let url = streamspace_devpg::testdb::empty_database_url().await;
    let out = dispatcher(
        &url,
        &["--migrate", "--exit-after-migrate", "--grant-roles=one"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GATEWAY_ROLE,DISPATCHER_ROLE"));

    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (gw, dp) = (format!("bin_gw_{suffix}"), format!("bin_dp_{suffix}"));
    let roles = format!("--grant-roles={gw},{dp}");
    let out = dispatcher(&url, &["--migrate", "--exit-after-migrate", &roles]);
    assert!(!out.status.success(), "granted to roles that do not exist");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&gw));

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for role in [&gw, &dp] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role}")))
            .execute(&pool)
            .await
            .unwrap();
    }
    let out = dispatcher(&url, &["--migrate", "--exit-after-migrate", &roles]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let can = |role: &str, privilege: &str, table: &str| {
        let pool = pool.clone();
        let (role, privilege, table) = (role.to_owned(), privilege.to_owned(), table.to_owned());
        async move {
            let (yes,): (bool,) = sqlx::query_as("SELECT has_table_privilege($1, $2, $3)")
                .bind(&role)
                .bind(&table)
                .bind(&privilege)
                .fetch_one(&pool)
                .await
                .unwrap();
            yes
        }
    };
    assert!(can(&dp, "UPDATE", "agent_commands").await);
    assert!(!can(&dp, "INSERT", "sessions").await);
    assert!(can(&gw, "INSERT", "sessions").await);
    assert!(!can(&gw, "DELETE", "agent_commands").await);
    let (schema_create,): (bool,) =
        sqlx::query_as("SELECT has_schema_privilege($1, 'public', 'CREATE')")
            .bind(&gw)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!schema_create, "the gateway's role may change the schema");
}
