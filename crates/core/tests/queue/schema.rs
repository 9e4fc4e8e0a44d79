//! Start-up schema checks.

use streamspace_core::Error;
use streamspace_core::db::{self, SchemaPolicy};

#[tokio::test]
async fn empty_database_is_refused_naming_the_missing_migration() {
    let url = streamspace_devpg::testdb::empty_database_url().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();

    let err = db::ensure_schema(&pool, SchemaPolicy::Require)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MigrationsPending { .. }), "{err:?}");
    let msg = err.to_string();
    let first = db::MIGRATOR.iter().next().unwrap();
    assert!(
        msg.contains(&first.version.to_string()),
        "names the migration: {msg}"
    );
    assert!(msg.contains("--migrate"), "says how to fix it: {msg}");

    db::ensure_schema(&pool, SchemaPolicy::Migrate)
        .await
        .expect("explicit migrate applies");
    db::ensure_schema(&pool, SchemaPolicy::Require)
        .await
        .expect("now current");
    assert!(db::pending_migrations(&pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_changed_migration_is_an_error_not_a_guess() {
    let url = streamspace_devpg::testdb::fresh_database_url(&db::MIGRATOR).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea")
        .execute(&pool)
        .await
        .unwrap();
    let err = db::ensure_schema(&pool, SchemaPolicy::Require)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MigrationChanged { .. }), "{err:?}");
}

/// `database.ssl_mode` is applied over the URL: the test server speaks no TLS, so
/// `require` and `verify-full` fail to connect (nothing goes in clear), `disable` connects;
/// a missing CA file and an unknown mode are configuration errors naming the setting.
#[tokio::test]
async fn the_ssl_mode_setting_is_enforced_over_the_url() {
    use streamspace_core::config::{DatabaseConfig, Secret};
    let url = streamspace_devpg::testdb::empty_database_url().await;
    let config = |mode: Option<&str>| DatabaseConfig {
        url: Secret::new(url.clone()),
        ssl_mode: mode.map(str::to_owned),
        acquire_timeout_secs: 5,
        ..DatabaseConfig::default()
    };
    db::connect(&config(Some("disable"))).await.unwrap();
    for mode in ["require", "verify-full"] {
        let err = db::connect(&config(Some(mode))).await.unwrap_err();
        assert!(!matches!(err, Error::Config(_)), "{mode}: {err}");
    }
    let err = db::connect(&config(Some("sometimes"))).await.unwrap_err();
    assert!(err.to_string().contains("database.ssl_mode"), "{err}");
    let err = db::connect(&DatabaseConfig {
        ssl_root_cert: Some("/nonexistent/ca.pem".into()),
        ..config(Some("verify-full"))
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("ssl_root_cert"), "{err}");
}
