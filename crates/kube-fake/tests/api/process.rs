//! The standalone binary: starts, writes its kubeconfig, serves kube-rs, takes its
//! behaviour from flags, answers the test-only hooks, stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};

use crate::helpers::{DEADLINE, NS, client_from, deployment};

/// The binary, started with `args`, once it has printed its address.
struct Running {
    child: Child,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

async fn spawn(args: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamspace-kube-fake"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--namespace",
            NS,
            "--kubeconfig-out",
        ])
        .arg(&kubeconfig)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the fake");
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(line.starts_with("listening on http://127.0.0.1:"), "{line}");
    Running {
        child,
        kubeconfig,
        _dir: dir,
    }
}

impl Running {
    /// SIGTERM through `kill(1)`, so this test needs no signal crate; the binary's one
    /// shutdown path handles it and exits 0.
    fn stop(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = self.child.kill();
        }
        let status = self.child.wait().unwrap();
        assert!(status.success() || status.code().is_none(), "{status:?}");
    }
}

#[tokio::test]
async fn the_binary_prints_its_address_after_writing_the_kubeconfig() {
    let running = spawn(&[]).await;
    let client = client_from(&running.kubeconfig).await;
    let api: kube::Api<Deployment> = kube::Api::default_namespaced(client);
    api.create(&PostParams::default(), &deployment("p1", "img", 0))
        .await
        .unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    running.stop();
}

#[tokio::test]
async fn the_binary_takes_its_failure_modes_from_flags_and_serves_the_hooks() {
    let running = spawn(&[
        "--admission-deny-image-prefix",
        "nope/",
        "--oom-image-prefix",
        "boom/",
        "--pvc-bind-delay-ms",
        "0",
        "--pod-ready-delay-ms",
        "0",
    ])
    .await;
    let kubeconfig = Kubeconfig::read_from(&running.kubeconfig).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    // Without kube-rs' retries, to see the throttled answer itself.
    config.default_retry = false;
    let client = Client::try_from(config).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for (name, image) in [
        ("refused", "nope/x"),
        ("killed", "boom/x"),
        ("allowed", "denied/x"),
    ] {
        deployments
            .create(&PostParams::default(), &deployment(name, image, 1))
            .await
            .unwrap();
    }
    let failure = |d: Option<&Deployment>| {
        d?.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "ReplicaFailure")?
            .message
            .clone()
    };
    let refused = tokio::time::timeout(
        DEADLINE,
        kube::runtime::wait::await_condition(
            deployments.clone(),
            "refused",
            move |d: Option<&Deployment>| failure(d).is_some(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        failure(refused.as_ref()).unwrap(),
        "admission webhook \"images.policy.streamspace.test\" denied the request: image nope/x is not allowed"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let oom_killed = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| {
                s.container_statuses
                    .as_ref()?
                    .first()?
                    .last_state
                    .as_ref()?
                    .terminated
                    .as_ref()?
                    .reason
                    .clone()
            })
            .as_deref()
            == Some("OOMKilled")
    };
    // The pods' names are generated: follow them all until both have shown up as
    // expected.
    let mut events = watcher(pods, watcher::Config::default())
        .applied_objects()
        .boxed();
    let (mut killed, mut allowed) = (false, false);
    while !(killed && allowed) {
        let pod = tokio::time::timeout(DEADLINE, events.try_next())
            .await
            .expect("the pods before the deadline")
            .unwrap()
            .expect("watch open");
        let session = pod.metadata.labels.as_ref().map(|l| l["session"].clone());
        killed |= session.as_deref() == Some("killed") && oom_killed(&pod);
        allowed |= session.as_deref() == Some("allowed");
    }

    let throttle = http::Request::post("/fake/v1/throttle?count=1")
        .body(kube::client::Body::from(Vec::new()))
        .unwrap();
    assert_eq!(client.send(throttle).await.unwrap().status().as_u16(), 204);
    let err = deployments.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 429),
        "{err:?}"
    );
    assert!(deployments.list(&ListParams::default()).await.is_ok());
    running.stop();
}
