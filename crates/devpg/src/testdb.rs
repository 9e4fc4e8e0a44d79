//! A fresh, migrated database per test.
//!
//! The server is `DATABASE_URL` when set (its database is used for administration), or
//! else one private [`PgCluster`] per test process, started on first use and stopped by its
//! watchdog when the process exits. Migrations run once into a template database; each
//! test then gets `CREATE DATABASE … TEMPLATE …`, which takes milliseconds.

use std::sync::OnceLock;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;

use crate::{ClusterOptions, PgCluster};

static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();
static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// URL of the administrative database of the test server.
pub fn admin_url() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url;
    }
    let cluster = CLUSTER
        .get_or_init(|| PgCluster::start(ClusterOptions::default()).map_err(|e| e.to_string()));
    match cluster {
        Ok(c) => c.url("postgres"),
        Err(e) => panic!("cannot start the test PostgreSQL: {e}"),
    }
}

fn with_database(url: &str, dbname: &str) -> String {
    // Replace the path of a `postgres://…/db?params` URL.
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{dbname}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `CREATE DATABASE name [TEMPLATE template]`. Both names are generated here from a
/// fixed prefix and a UUID's hex digits, so they are safe identifiers.
async fn create_database(admin: &str, name: &str, template: Option<&str>) {
    let sql = match template {
        Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
        None => format!("CREATE DATABASE {name}"),
    };
    let mut conn = PgConnection::connect(admin)
        .await
        .expect("connect to test server");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    conn.close().await.ok();
}

/// A new database with `migrator` applied. Returns its URL.
pub async fn fresh_database_url(migrator: &'static Migrator) -> String {
    let admin = admin_url();
    let template = TEMPLATE
        .get_or_init(|| async {
            let name = format!("streamspace_tpl_{}", uuid::Uuid::new_v4().simple());
            create_database(&admin, &name, None).await;
            let mut tpl = PgConnection::connect(&with_database(&admin, &name))
                .await
                .expect("connect to template database");
            migrator
                .run(&mut tpl)
                .await
                .expect("apply migrations to template database");
            tpl.close().await.ok();
            name
        })
        .await;
    let name = format!("streamspace_test_{}", uuid::Uuid::new_v4().simple());
    create_database(&admin, &name, Some(template)).await;
    with_database(&admin, &name)
}

/// A pool on a new database with `migrator` applied.
pub async fn fresh_database(migrator: &'static Migrator) -> PgPool {
    let url = fresh_database_url(migrator).await;
    PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("connect to test database")
}

/// A new, empty database (no migrations): for testing start-up checks.
pub async fn empty_database_url() -> String {
    let admin = admin_url();
    let name = format!("streamspace_empty_{}", uuid::Uuid::new_v4().simple());
    create_database(&admin, &name, None).await;
    with_database(&admin, &name)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}
