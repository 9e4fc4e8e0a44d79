//! The seed's command-retry sequence through the Kubernetes runtime: the agent process
//! runs `runtime = "kubernetes"` against the Kubernetes API stand-in (`streamspace-kube-fake`,
//! a real process speaking the real REST paths; see docs/kubernetes.md for what it models).

use std::time::{Duration, Instant};

use super::{Ctx, until, user_api};
use crate::report::{ScenarioReport, Target};
use crate::stack::free_port;
use crate::supervisor::{Spec, Supervised, bin_dir};

const LIMIT: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "sessions";
/// Bearer token the stand-in requires (written into its kubeconfig).
const TOKEN: &str = "e2e-kube-token";

pub async fn run(ctx: &Ctx, r: &mut ScenarioReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(&ctx.run_dir)?;
    let kubeconfig = ctx.run_dir.join("kubeconfig");
    let port = free_port()?;
    let mut fake = Supervised::start(
        Spec {
            name: "kube-fake".into(),
            program: bin_dir()?.join("streamspace-kube-fake"),
            args: vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--kubeconfig-out".into(),
                kubeconfig.display().to_string(),
                "--namespace".into(),
                NAMESPACE.into(),
                "--token".into(),
                TOKEN.into(),
            ],
            env: vec![],
            echo: ctx.echo,
        },
        7,
    )?;
    until("the Kubernetes stand-in to listen", LIMIT, || {
        let kubeconfig = kubeconfig.clone();
        async move {
            Ok((kubeconfig.is_file()
                && tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok())
            .then_some(()))
        }
    })
    .await?;
    let env = vec![
        ("STREAMSPACE_RUNTIME".to_string(), "kubernetes".to_string()),
        (
            "STREAMSPACE_KUBERNETES__KUBECONFIG".to_string(),
            kubeconfig.display().to_string(),
        ),
        (
            "STREAMSPACE_KUBERNETES__NAMESPACE".to_string(),
            NAMESPACE.to_string(),
        ),
    ];
    let mut stack = ctx.stack_with_agent_env(1, 1, env).await?;
    let result = async {
        let api = user_api(&stack, "admin").await?;
        let kube = reqwest::Client::new();
        let deployments = |session: &str| {
            let url = format!(
                "http://127.0.0.1:{port}/apis/apps/v1/namespaces/{NAMESPACE}/deployments?labelSelector=session%3D{session}"
            );
            let kube = kube.clone();
            async move {
                let v: serde_json::Value = kube
                    .get(url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await?
                    .json()
                    .await?;
                anyhow::Ok(v["items"].as_array().map_or(0, Vec::len))
            }
        };

        let (session, _) = api.create_session("firefox-browser").await?;
        let started = api.wait_state(&session, "running", LIMIT).await?;
        r.metric("session start (Deployment ready)", started.as_secs_f64(), "s", Target::AtMost { value: 60.0 });
        r.metric("Deployments for the session", deployments(&session).await? as f64, "objects", Target::Equals { value: 1.0 });

        stack.kill_agent(0).await;
        let answer = api.delete_session(&session).await?;
        r.check("API accepts command (agent down)", answer.status == 202, "HTTP 202", format!("HTTP {}", answer.status));
        let (status, error): (String, Option<String>) = sqlx::query_as(
            "SELECT status, error_message FROM agent_commands WHERE session_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(&session)
        .fetch_one(&stack.pool)
        .await?;
        r.check("command pending with NULL error_message", status == "pending" && error.is_none(), "pending, NULL", format!("{status}, {error:?}"));

        let restarted = Instant::now();
        stack.spawn_agent(0).await?;
        stack.wait_agent_online(0).await?;
        r.metric("agent reconnection", restarted.elapsed().as_secs_f64(), "s", Target::AtMost { value: 30.0 });
        let done = api.wait_state(&session, "terminated", LIMIT).await?;
        r.metric("stop processed after reconnect", done.as_secs_f64() * 1000.0, "ms", Target::Info);
        r.metric("Deployments left for the session", deployments(&session).await? as f64, "objects", Target::Equals { value: 0.0 });
        anyhow::Ok(())
    }
    .await;
    stack.stop().await;
    fake.stop(Duration::from_secs(5)).await;
    result
}
