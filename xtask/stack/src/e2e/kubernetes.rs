//! The seed's command-retry sequence through the Kubernetes runtime, then what an operator
//! would hit first on a real cluster: homes across hibernation, quota rejections, drift,
//! template changes, failed starts holding quota. The agent process runs
//! `runtime = "kubernetes"` against the Kubernetes API stand-in (`streamspace-kube-fake`,
//! a real process speaking the real REST paths; see docs/kubernetes.md for what it models),
//! whose test paths (`/fake/v1/…`) read and write files in the pods' volumes.

use std::time::{Duration, Instant};

use super::{Ctx, until, user_api};
use crate::report::{ScenarioReport, Target};
use crate::stack::free_port;
use crate::supervisor::{Spec, Supervised, bin_dir};

const LIMIT: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "sessions";
/// Bearer token the stand-in requires (written into its kubeconfig).
const TOKEN: &str = "e2e-kube-token";
/// A template whose container crashes on the stand-in (its `crash/` image prefix).
const CRASHING: &str = "crashing";
/// How long a start the cluster refuses may take to be reported failed.
const REFUSAL_LIMIT: Duration = Duration::from_secs(10);

/// The stand-in's API (as a client with the agent's token would call it).
#[derive(Clone)]
struct Kube {
    http: reqwest::Client,
    base: String,
}

impl Kube {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Vec<u8>)> {
        let resp = req.bearer_auth(TOKEN).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.send(self.http.get(self.url(path))).await?;
        anyhow::ensure!(
            status == 200,
            "GET {path}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        Ok(serde_json::from_slice(&body)?)
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let (status, answer) = self
            .send(self.http.post(self.url(path)).json(&body))
            .await?;
        anyhow::ensure!(
            status == 201,
            "POST {path}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let (status, answer) = self.send(self.http.delete(self.url(path))).await?;
        anyhow::ensure!(
            status == 200 || status == 202,
            "DELETE {path}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    }

    fn core(path: &str) -> String {
        format!("/api/v1/namespaces/{NAMESPACE}/{path}")
    }

    /// The session's live pod, once there is exactly one.
    async fn live_pod(&self, session: &str) -> anyhow::Result<Option<String>> {
        let pods = self
            .get(&Self::core(&format!(
                "pods?labelSelector=session%3D{session}"
            )))
            .await?;
        let live: Vec<String> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        Ok((live.len() == 1).then(|| live[0].clone()))
    }

    fn file_path(pod: &str, file: &str) -> String {
        format!("/fake/v1/namespaces/{NAMESPACE}/pods/{pod}/files{file}")
    }

    async fn write_file(&self, pod: &str, file: &str, contents: &[u8]) -> anyhow::Result<()> {
        let (status, answer) = self
            .send(
                self.http
                    .put(self.url(&Self::file_path(pod, file)))
                    .body(contents.to_vec()),
            )
            .await?;
        anyhow::ensure!(
            status < 300,
            "writing {file} in {pod}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    }

    async fn read_file(&self, pod: &str, file: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let (status, body) = self
            .send(self.http.get(self.url(&Self::file_path(pod, file))))
            .await?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            _ => anyhow::bail!(
                "reading {file} in {pod}: {status} {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

fn quota(name: &str, memory: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": name},
        "spec": {"hard": {"limits.memory": memory}},
    })
}

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
        (
            format!(
                "STREAMSPACE_KUBERNETES__TEMPLATES__{}__IMAGE",
                CRASHING.to_uppercase()
            ),
            "crash/streamspace-session:0".to_string(),
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

        let kube = Kube { http: kube, base: format!("http://127.0.0.1:{port}") };
        operator_rows(&mut stack, &api, &kube, r).await
    }
    .await;
    stack.stop().await;
    fake.stop(Duration::from_secs(5)).await;
    result
}

/// The rows of issue #13: what the runtime does about homes, refusals, drift, template
/// changes and failed starts, seen through the API and the cluster.
async fn operator_rows(
    stack: &mut crate::stack::Stack,
    api: &crate::api::Api,
    kube: &Kube,
    r: &mut ScenarioReport,
) -> anyhow::Result<()> {
    // A file written in the session's home before hibernation is there after wake.
    let (home, _) = api.create_session("firefox-browser").await?;
    api.wait_state(&home, "running", LIMIT).await?;
    let (pod, _) = until("the session's pod", LIMIT, || kube.live_pod(&home)).await?;
    kube.write_file(&pod, "/config/profile/prefs.js", b"homepage")
        .await?;
    api.hibernate(&home).await?;
    api.wait_state(&home, "hibernated", LIMIT).await?;
    api.wake(&home).await?;
    api.wait_state(&home, "running", LIMIT).await?;
    let (woken_pod, _) = until("the woken session's pod", LIMIT, || kube.live_pod(&home)).await?;
    let read = kube
        .read_file(&woken_pod, "/config/profile/prefs.js")
        .await?;
    r.check(
        "hibernate keeps home volume",
        woken_pod != pod && read.as_deref() == Some(&b"homepage"[..]),
        "a new pod reads the file written before hibernation",
        format!(
            "pod {pod} -> {woken_pod}, file {:?}",
            read.map(|b| String::from_utf8_lossy(&b).into_owned())
        ),
    );

    // A Service deleted by hand is back (a new one, owned by the session's Deployment).
    let service_path = Kube::core(&format!("services/{home}"));
    let before = kube.get(&service_path).await?["metadata"]["uid"].clone();
    kube.delete(&service_path).await?;
    let repaired = until("the Service to be repaired", LIMIT, || async {
        let (status, body) = kube.send(kube.http.get(kube.url(&service_path))).await?;
        if status != 200 {
            return Ok(None);
        }
        let now: serde_json::Value = serde_json::from_slice(&body)?;
        Ok((now["metadata"]["uid"] != before).then_some(()))
    })
    .await;
    r.check(
        "drift repaired",
        repaired.is_ok(),
        "the Service is recreated",
        match &repaired {
            Ok((_, took)) => format!("back after {} ms", took.as_millis()),
            Err(e) => e.to_string(),
        },
    );

    // The agent restarts with the template changed; the next wake applies it.
    api.hibernate(&home).await?;
    api.wait_state(&home, "hibernated", LIMIT).await?;
    let changed_image = "lscr.io/linuxserver/firefox:changed";
    stack.kill_agent(0).await;
    stack.options.agent_env.push((
        "STREAMSPACE_KUBERNETES__TEMPLATES__FIREFOX-BROWSER__IMAGE".into(),
        changed_image.into(),
    ));
    stack.spawn_agent(0).await?;
    stack.wait_agent_online(0).await?;
    api.wake(&home).await?;
    api.wait_state(&home, "running", LIMIT).await?;
    let d = kube
        .get(&format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{home}"
        ))
        .await?;
    let image = d["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    r.check(
        "template change applied on wake",
        image == changed_image,
        changed_image,
        image,
    );
    api.delete_session(&home).await?;
    api.wait_state(&home, "terminated", LIMIT).await?;

    // A start over quota fails fast, with the quota's words, and is not retried.
    let quotas = Kube::core("resourcequotas");
    kube.post(&quotas, quota("too-small", "1Gi")).await?;
    let (refused, command) = api.create_session("firefox-browser").await?;
    let took = api.wait_state(&refused, "failed", LIMIT).await?;
    let (status, error, attempts): (String, Option<String>, i32) = sqlx::query_as(
        "SELECT status, error_message, attempts FROM agent_commands WHERE command_id = $1",
    )
    .bind(&command)
    .fetch_one(&stack.pool)
    .await?;
    let error = error.unwrap_or_default();
    r.check(
        "quota rejection reported",
        took <= REFUSAL_LIMIT
            && status == "failed"
            && attempts == 1
            && error.contains("exceeded quota: too-small"),
        "failed within 10 s after 1 attempt, naming the quota",
        format!(
            "{status} after {} ms, {attempts} attempt(s): {error}",
            took.as_millis()
        ),
    );
    kube.delete(&format!("{quotas}/too-small")).await?;

    // A failed start gives its quota back: room for one session, a crashing one first.
    kube.post(&quotas, quota("one-session", "3Gi")).await?;
    let (crashing, _) = api.create_session(CRASHING).await?;
    api.wait_state(&crashing, "failed", LIMIT).await?;
    let (next, _) = api.create_session("firefox-browser").await?;
    let fitted = api.wait_state(&next, "running", LIMIT).await;
    r.check(
        "failed start releases quota",
        fitted.is_ok(),
        "the next session runs in the room the failed one left",
        match &fitted {
            Ok(took) => format!("running after {} ms", took.as_millis()),
            Err(e) => e.to_string(),
        },
    );
    kube.delete(&format!("{quotas}/one-session")).await?;
    Ok(())
}
