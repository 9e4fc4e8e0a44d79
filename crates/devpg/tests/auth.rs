//! The private cluster accepts only its own connections over TCP: the superuser's password
//! is required (another local user cannot walk in), and the URL the cluster hands out
//! carries it.

use streamspace_devpg::{ClusterOptions, PgCluster};

#[tokio::test(flavor = "multi_thread")]
async fn tcp_connections_need_the_superusers_password() {
    let cluster = tokio::task::spawn_blocking(|| PgCluster::start(ClusterOptions::default()))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let (one,): (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(&sqlx::PgPool::connect(&url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(one, 1);

    for wrong in ["", ":not-the-password"] {
        let url = format!(
            "postgres://postgres{wrong}@127.0.0.1:{}/postgres",
            cluster.port()
        );
        let err = sqlx::PgPool::connect(&url)
            .await
            .expect_err("refused without the password");
        let text = err.to_string();
        assert!(
            text.contains("password"),
            "expected an authentication failure, got: {text}"
        );
    }
    let password = std::fs::read_to_string(cluster.password_file()).unwrap();
    let password = password.trim();
    assert!(password.len() >= 32 && url.contains(password));
    assert!(
        !cluster.display_url("postgres").contains(password),
        "the printable URL hides the password"
    );
}
