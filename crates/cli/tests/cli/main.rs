//! The real `streamspace` binary against an in-process api-gateway on a fresh database.
//! The dispatcher's part (claim, ack, complete) is played through the real queue.

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use streamspace_api_gateway::{App, GatewayConfig, auth};
use streamspace_core::CommandQueue;
use streamspace_core::agents::{self, ConnectInfo, NewAgent};
use streamspace_core::config::{DatabaseConfig, Secret};
use streamspace_core::db::{self, SchemaPolicy};
use streamspace_core::queue::{ClaimParams, Completion, QueueConfig};

struct Env {
    url: String,
    config: GatewayConfig,
    pool: PgPool,
    queue: CommandQueue,
}

async fn gateway() -> Env {
    let db_url = streamspace_devpg::testdb::fresh_database_url(&db::MIGRATOR).await;
    let mut config = GatewayConfig {
        database: DatabaseConfig {
            url: Secret::new(db_url.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.grpc.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.http.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.auth.hmac_secret = Some(Secret::new("cli-test-secret-of-thirty-two-bytes!".into()));
    config.auth.dev_tokens = true;
    let app = App::build(config.clone(), SchemaPolicy::Require)
        .await
        .unwrap();
    let url = format!("http://{}", app.grpc_addr());
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    let pool = PgPool::connect(&db_url).await.unwrap();
    let queue = CommandQueue::new(pool.clone(), QueueConfig::default()).unwrap();
    agents::agent_create(
        &pool,
        &NewAgent {
            agent_id: "a-1".into(),
            cluster: "default".into(),
            region: "default".into(),
            max_sessions: None,
        },
    )
    .await
    .unwrap();
    agents::agent_connect(&pool, "a-1", "test", &ConnectInfo::default())
        .await
        .unwrap();
    Env {
        url,
        config,
        pool,
        queue,
    }
}

impl Env {
    fn token(&self, user: &str, admin: bool) -> String {
        auth::mint_dev_token(&self.config.auth, user, admin).unwrap()
    }

    fn cli(&self, token: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamspace"));
        cmd.args(args)
            .env("STREAMSPACE_API_URL", &self.url)
            .env("STREAMSPACE_TOKEN", token)
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, token: &str, args: &[&str]) -> Output {
        self.cli(token, args).output().await.unwrap()
    }

    /// Plays the dispatcher for the next command of `a-1`, once one is pending.
    async fn deliver_next(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let lease = loop {
            let batch = self
                .queue
                .command_claim(ClaimParams {
                    agent_id: "a-1",
                    owner: "test",
                    limit: 1,
                    epoch: None,
                    pipeline_depth: 1,
                })
                .await
                .unwrap();
            if let Some(cmd) = batch.commands.into_iter().next() {
                break cmd.lease.unwrap();
            }
            assert!(Instant::now() < deadline, "no command was queued");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.queue.command_ack_one(lease.clone()).await.unwrap();
        self.queue
            .command_complete_one(Completion {
                lease,
                result: Some(serde_json::json!({"session": {"url": "http://s.example"}})),
            })
            .await
            .unwrap();
    }
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn create_wait_list_get_delete_and_agents() {
    let env = gateway().await;
    let alice = env.token("alice", false);

    // create --wait follows the start command to its end while "the dispatcher" works.
    let waiting = env
        .cli(
            &alice,
            &[
                "sessions",
                "create",
                "firefox-browser",
                "--wait",
                "-o",
                "json",
            ],
        )
        .output();
    let (out, ()) = tokio::join!(waiting, env.deliver_next());
    let out = out.unwrap();
    let session: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(session["state"], "running");
    assert_eq!(session["url"], "http://s.example");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("completed"), "progress shown: {progress}");
    let id = session["id"].as_str().unwrap().to_owned();

    let table = stdout(&env.run(&alice, &["sessions", "list"]).await);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("running"), "{table}");
    let one: Value = serde_json::from_str(&stdout(
        &env.run(&alice, &["sessions", "get", &id, "-o", "json"])
            .await,
    ))
    .unwrap();
    assert_eq!(one["agent_id"], "a-1");

    // Delete without waiting: the answer names the queued stop.
    let del: Value = serde_json::from_str(&stdout(
        &env.run(&alice, &["sessions", "delete", &id, "-o", "json"])
            .await,
    ))
    .unwrap();
    assert_eq!(del["state"], "terminating");
    let stop = del["command_id"].as_str().unwrap().to_owned();
    let cmd = stdout(&env.run(&alice, &["commands", "get", &stop]).await);
    assert!(
        cmd.contains("stop_session") && cmd.contains("pending"),
        "{cmd}"
    );
    let args = ["commands", "watch", stop.as_str()];
    let (watched, ()) = tokio::join!(env.run(&alice, &args), env.deliver_next());
    assert!(stdout(&watched).contains("completed"));
    let state: String = sqlx::query_scalar("SELECT state FROM sessions WHERE id = $1")
        .bind(&id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(state, "terminated");

    // Agents need an admin token.
    let ops = env.token("ops", true);
    let agents = stdout(&env.run(&ops, &["agents", "list"]).await);
    assert!(
        agents.contains("a-1") && agents.contains("online"),
        "{agents}"
    );
    let denied = env.run(&alice, &["agents", "list"]).await;
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("admin role"));
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn failures_exit_with_one_code_per_kind_and_the_servers_message() {
    let env = gateway().await;
    let alice = env.token("alice", false);

    let missing = env.run(&alice, &["sessions", "get", "nope"]).await;
    assert_eq!(code(&missing), Some(3), "not found: {}", stderr(&missing));
    let err = stderr(&missing);
    assert!(
        err.contains("NotFound") && err.contains("session nope not found"),
        "{err}"
    );

    // A pending session will be running: waking it is a conflict.
    let created: Value = serde_json::from_str(&stdout(
        &env.run(
            &alice,
            &["sessions", "create", "firefox-browser", "-o", "json"],
        )
        .await,
    ))
    .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let conflict = env.run(&alice, &["sessions", "wake", &id]).await;
    assert_eq!(code(&conflict), Some(4), "conflict: {}", stderr(&conflict));

    // Under -o json the error is one JSON object on stderr.
    let json_err = env
        .run(&alice, &["sessions", "wake", &id, "-o", "json"])
        .await;
    assert_eq!(code(&json_err), Some(4));
    let e: Value = serde_json::from_str(stderr(&json_err).trim()).unwrap();
    assert_eq!(e["error"]["kind"], "conflict");
    assert_eq!(e["error"]["exit_code"], 4);
    assert_eq!(e["error"]["grpc_code"], "FailedPrecondition");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("will be running"),
        "{e}"
    );

    let no_token = env.run("", &["sessions", "list"]).await;
    assert_eq!(code(&no_token), Some(5));
    assert!(stderr(&no_token).contains("STREAMSPACE_TOKEN"));
    let bad_token = env.run("x.y.z", &["sessions", "list"]).await;
    assert_eq!(code(&bad_token), Some(5), "{}", stderr(&bad_token));

    // Nobody listens on port 9 of this machine.
    let unreachable = env
        .cli(&alice, &["sessions", "list"])
        .env("STREAMSPACE_API_URL", "http://127.0.0.1:9")
        .output()
        .await
        .unwrap();
    assert_eq!(code(&unreachable), Some(6), "{}", stderr(&unreachable));

    let usage = env.run(&alice, &["sessions", "frobnicate"]).await;
    assert_eq!(code(&usage), Some(2));
    // The token is never an argument: there is no flag for it.
    let on_argv = env.run("", &["--token", &alice, "sessions", "list"]).await;
    assert_eq!(code(&on_argv), Some(2), "{}", stderr(&on_argv));
    // A CA file is read, and only for https://.
    let ca_for_plaintext = env
        .run(&alice, &["--ca-file", "/etc/hostname", "sessions", "list"])
        .await;
    assert_eq!(code(&ca_for_plaintext), Some(2));
    assert!(stderr(&ca_for_plaintext).contains("https://"));
    let missing_ca = env
        .cli(
            &alice,
            &["--ca-file", "/nonexistent/ca.pem", "sessions", "list"],
        )
        .env("STREAMSPACE_API_URL", "https://127.0.0.1:9")
        .output()
        .await
        .unwrap();
    assert_eq!(code(&missing_ca), Some(2), "{}", stderr(&missing_ca));
    assert!(stderr(&missing_ca).contains("/nonexistent/ca.pem"));
    let timeout_without_wait = env
        .run(&alice, &["sessions", "hibernate", &id, "--timeout", "1s"])
        .await;
    assert_eq!(code(&timeout_without_wait), Some(2));
}

#[tokio::test]
async fn wait_gives_up_at_its_timeout_and_the_token_can_come_from_a_file() {
    let env = gateway().await;
    let alice = env.token("alice", false);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{alice}\n")).unwrap();
    let token_file = token_file.to_str().unwrap();

    // Nobody delivers the start: --wait ends at its timeout, exit 7, the command goes on.
    let waited = env
        .run(
            "",
            &[
                "--token-file",
                token_file,
                "sessions",
                "create",
                "firefox-browser",
                "--wait",
                "--timeout",
                "300ms",
            ],
        )
        .await;
    assert_eq!(code(&waited), Some(7), "{}", stderr(&waited));
    let err = stderr(&waited);
    assert!(
        err.contains("did not end within 0.3 s") && err.contains("it is pending"),
        "{err}"
    );
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM agent_commands WHERE status = 'pending'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(pending, 1, "the start is still queued");

    let missing_file = env
        .run(
            "",
            &["--token-file", "/nonexistent/token", "sessions", "list"],
        )
        .await;
    assert_eq!(code(&missing_file), Some(2), "{}", stderr(&missing_file));
}
