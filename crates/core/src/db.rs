//! Connecting to Postgres and keeping the schema in step with this build.
//!
//! `migrations/` is the one schema path; [`MIGRATOR`] embeds it. Services call
//! [`ensure_schema`] at start-up: without `--migrate` a database that is behind is refused
//! with the names of the missing migrations, never silently used.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseConfig;
use crate::error::{Error, Result};

/// The schema, embedded from `migrations/` at the workspace root.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Opens a pool for `config`. Connections are made lazily up to `max_connections`.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool> {
    let mut options: PgConnectOptions = config
        .url
        .expose()
        .parse()
        .map_err(|e| Error::Config(format!("database url: {e}")))?;
    if let Some(mode) = &config.ssl_mode {
        let mode = mode.parse::<sqlx::postgres::PgSslMode>().map_err(|_| {
            Error::Config(format!(
                "database.ssl_mode {mode:?}: use disable, allow, prefer, require, verify-ca or verify-full"
            ))
        })?;
        options = options.ssl_mode(mode);
    }
    if let Some(path) = &config.ssl_root_cert {
        if !path.is_file() {
            return Err(Error::Config(format!(
                "database.ssl_root_cert {} is not a readable file",
                path.display()
            )));
        }
        options = options.ssl_root_cert(path);
    }
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(config.acquire_timeout_secs))
        .connect_with(options.application_name(&config.application_name))
        .await?;
    Ok(pool)
}

/// Grants the gateway's and the dispatcher's roles exactly the privileges their services
/// use (migration 7's `streamspace_grant_roles`), revoking anything else on the project's
/// tables. Run by the schema's owner after migrating; the roles must exist.
pub async fn grant_service_roles(
    pool: &PgPool,
    gateway_role: &str,
    dispatcher_role: &str,
) -> Result<()> {
    sqlx::query!(
        "SELECT streamspace_grant_roles($1::text::name, $2::text::name)",
        gateway_role,
        dispatcher_role
    )
    .fetch_one(pool)
    .await?;
    Ok(())
}

/// Whether the database answers and takes writes (a primary, not a standby in recovery).
/// Services probe it to decide readiness.
pub async fn probe_writable(exec: impl sqlx::PgExecutor<'_>) -> Result<bool> {
    Ok(
        sqlx::query_scalar!(r#"SELECT NOT pg_is_in_recovery() AS "writable!""#)
            .fetch_one(exec)
            .await?,
    )
}

/// What to do when the database schema is behind this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaPolicy {
    /// Refuse to start, naming the missing migrations.
    Require,
    /// Apply the missing migrations (the explicit `--migrate` flag).
    Migrate,
}

/// Checks (or, with [`SchemaPolicy::Migrate`], brings up to date) the schema.
pub async fn ensure_schema(pool: &PgPool, policy: SchemaPolicy) -> Result<()> {
    if policy == SchemaPolicy::Migrate {
        MIGRATOR.run(pool).await?;
        return Ok(());
    }
    let missing = pending_migrations(pool).await?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MigrationsPending { missing })
    }
}

/// Names (`<version>_<description>`) of the migrations this build carries that the
/// database has not applied. A migration applied with different contents is an error.
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<String>> {
    // `_sqlx_migrations` belongs to sqlx, not to our schema, and may not exist yet, so these
    // two statements are the only unchecked SQL of the project.
    let table_exists: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?;
    let applied: HashMap<i64, Vec<u8>> = if table_exists {
        sqlx::query_as::<_, (i64, Vec<u8>)>(
            "SELECT version, checksum FROM _sqlx_migrations WHERE success",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect()
    } else {
        HashMap::new()
    };
    let mut missing = Vec::new();
    for migration in MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
    {
        match applied.get(&migration.version) {
            None => missing.push(format!(
                "{}_{}",
                migration.version,
                migration.description.replace(' ', "_")
            )),
            Some(checksum) if checksum.as_slice() != &*migration.checksum => {
                return Err(Error::MigrationChanged {
                    version: migration.version,
                });
            }
            Some(_) => {}
        }
    }
    Ok(missing)
}
