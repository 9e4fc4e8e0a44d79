//! `streamspace-kube-fake`: the stand-in Kubernetes API server as a process, for
//! end-to-end runs. Prints `listening on http://ADDR` once the kubeconfig is written.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use streamspace_kube_fake::{Denial, FakeCluster, FakeConfig};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A stand-in Kubernetes API server for StreamSpace tests"
)]
struct Flags {
    /// Address to serve on; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at this server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// The kubeconfig's default namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Bearer token required from clients.
    #[arg(long, default_value = streamspace_kube_fake::DEFAULT_TOKEN)]
    token: String,
    /// Milliseconds from pod creation to running.
    #[arg(long, default_value_t = 200)]
    pod_ready_delay_ms: u64,
    /// Image prefixes that fail to pull (repeatable).
    #[arg(long = "fail-image-prefix", default_value = streamspace_kube_fake::DEFAULT_FAIL_IMAGE_PREFIX)]
    fail_image_prefixes: Vec<String>,
    /// Image prefixes whose containers crash-loop (repeatable).
    #[arg(long = "crash-image-prefix", default_value = streamspace_kube_fake::DEFAULT_CRASH_IMAGE_PREFIX)]
    crash_image_prefixes: Vec<String>,
    /// Image prefixes whose containers start, then are OOM-killed (repeatable).
    #[arg(long = "oom-image-prefix", default_value = streamspace_kube_fake::DEFAULT_OOM_IMAGE_PREFIX)]
    oom_image_prefixes: Vec<String>,
    /// Image prefixes the pretend admission webhook refuses (repeatable).
    #[arg(long = "admission-deny-image-prefix", default_value = streamspace_kube_fake::DEFAULT_ADMISSION_DENY_IMAGE_PREFIX)]
    admission_deny_image_prefixes: Vec<String>,
    /// Milliseconds from a claim's creation to its binding.
    #[arg(long, default_value_t = streamspace_kube_fake::DEFAULT_PVC_BIND_DELAY.as_millis() as u64)]
    pvc_bind_delay_ms: u64,
    /// Deny a request kind with 403, as `verb:resource` (repeatable), e.g. `delete:services`.
    #[arg(long = "deny", value_parser = parse_denial)]
    denials: Vec<Denial>,
}

fn parse_denial(s: &str) -> Result<Denial, String> {
    Denial::parse(s).ok_or_else(|| format!("expected verb:resource, got {s:?}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = FakeConfig {
        token: flags.token,
        pod_ready_delay: Duration::from_millis(flags.pod_ready_delay_ms),
        fail_image_prefixes: flags.fail_image_prefixes,
        crash_image_prefixes: flags.crash_image_prefixes,
        oom_image_prefixes: flags.oom_image_prefixes,
        admission_deny_image_prefixes: flags.admission_deny_image_prefixes,
        pvc_bind_delay: Duration::from_millis(flags.pvc_bind_delay_ms),
        denials: flags.denials,
        ..FakeConfig::default()
    };
    let cluster = FakeCluster::bind(flags.listen, config)
        .await
        .context("starting the fake API server")?;
    if let Some(path) = &flags.kubeconfig_out {
        cluster
            .write_kubeconfig(path, &flags.namespace)
            .context("writing the kubeconfig")?;
    }
    // Printed last, so whoever waits for this line may use the kubeconfig at once.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", cluster.url()).context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    shutdown_signal().await;
    cluster.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
