//! The standalone binary: starts, writes its kubeconfig, serves kube-rs, stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{ListParams, PostParams};

use crate::helpers::{NS, client_from, deployment};

#[tokio::test]
async fn the_binary_prints_its_address_after_writing_the_kubeconfig() {
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
    let client = client_from(&kubeconfig).await;
    let api: kube::Api<Deployment> = kube::Api::default_namespaced(client);
    api.create(&PostParams::default(), &deployment("p1", "img", 0))
        .await
        .unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    nix_free_terminate(&mut child);
    let status = child.wait().unwrap();
    assert!(status.success() || status.code().is_none(), "{status:?}");
}

/// SIGTERM through `kill(1)`, so this test needs no signal crate; the binary's one
/// shutdown path handles it and exits 0.
fn nix_free_terminate(child: &mut std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = child.kill();
    }
}
