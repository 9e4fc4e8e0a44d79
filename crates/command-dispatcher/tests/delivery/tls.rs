//! The agent link over TLS and mutual TLS: the real agent library (and, for refusals, a
//! raw client) against a dispatcher serving certificates from files, issued by a private
//! CA made for each test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use streamspace_agent::{Agent, AgentConfig, ConnectionState, RunningAgent, RuntimeKind};
use streamspace_command_dispatcher::{DispatcherConfig, TlsConfig};
use streamspace_devpg::devcerts::{DevCa, IssuedFiles};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::helpers::{TestDispatcher, eventually, fast_config, hello, open, open_on, stop};

const LIMIT: Duration = Duration::from_secs(20);

/// A CA, the dispatcher's certificate for `localhost`, and a directory for the rest.
struct Pki {
    dir: TempDir,
    ca: DevCa,
    ca_file: PathBuf,
    server: IssuedFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("streamspace test CA").unwrap();
        let ca_file = ca.write_ca(dir.path()).unwrap();
        let server = ca
            .server(&["localhost", "127.0.0.1"])
            .unwrap()
            .write(dir.path(), "dispatcher")
            .unwrap();
        Self {
            dir,
            ca,
            ca_file,
            server,
        }
    }

    /// A client certificate naming `names`, written as `stem.pem`/`stem.key`.
    fn client(&self, stem: &str, names: &[&str]) -> IssuedFiles {
        self.ca
            .client(names)
            .unwrap()
            .write(self.dir.path(), stem)
            .unwrap()
    }

    fn dispatcher_config(&self, mutual: bool) -> TlsConfig {
        TlsConfig {
            cert_file: self.server.cert.clone(),
            key_file: self.server.key.clone(),
            client_ca_file: mutual.then(|| self.ca_file.clone()),
            reload_interval_ms: 50,
        }
    }
}

async fn start(pki: &Pki, mutual: bool) -> TestDispatcher {
    let url = streamspace_devpg::testdb::fresh_database_url(&streamspace_core::db::MIGRATOR).await;
    let config = DispatcherConfig {
        tls: Some(pki.dispatcher_config(mutual)),
        ..fast_config(&url)
    };
    TestDispatcher::start_with(config).await
}

fn https(d: &TestDispatcher) -> String {
    format!("https://localhost:{}", d.addr.port())
}

/// The real agent (recording runtime) dialing over TLS, trusting `ca`.
async fn agent(
    d: &TestDispatcher,
    token: &str,
    state: &Path,
    ca: &Path,
    identity: Option<&IssuedFiles>,
) -> RunningAgent {
    let mut config = AgentConfig::new(https(d), token, state);
    config.runtime = RuntimeKind::Record;
    config.tls_ca_file = Some(ca.to_owned());
    config.tls_cert_file = identity.map(|i| i.cert.clone());
    config.tls_key_file = identity.map(|i| i.key.clone());
    Agent::build(config).await.unwrap().spawn()
}

/// A TLS channel trusting `ca_pem`, presenting `identity` when given.
async fn tls_channel(
    d: &TestDispatcher,
    ca_pem: &str,
    identity: Option<&IssuedFiles>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(i) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&i.cert).unwrap(),
            std::fs::read(&i.key).unwrap(),
        ));
    }
    Endpoint::from_shared(https(d))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

async fn delivered_and_completed(d: &TestDispatcher, agent_id: &str) {
    let cmd = stop(agent_id, "s-1");
    let id = cmd.command_id.to_string();
    d.enqueue(&[cmd]).await;
    eventually("the command completed over TLS", LIMIT, || async {
        (d.statuses(std::slice::from_ref(&id)).await[0] == "completed").then_some(())
    })
    .await;
}

#[tokio::test]
async fn commands_are_delivered_over_tls_and_plaintext_clients_get_nothing() {
    let pki = Pki::new();
    let d = start(&pki, false).await;
    let token = d.agent("agent-a").await;
    let state = tempfile::tempdir().unwrap();
    let mut running = agent(&d, &token, state.path(), &pki.ca_file, None).await;
    running.wait_connected(None).await.unwrap();
    delivered_and_completed(&d, "agent-a").await;

    // A plaintext client on the TLS port never reaches the service; the failed handshake
    // is counted.
    let before = d
        .metric("streamspace_dispatcher_tls_handshake_failures_total")
        .await;
    let plain = tokio::time::timeout(
        LIMIT,
        open(&format!("http://{}", d.addr), Some(&token), hello(vec![])),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "a plaintext client was served on the TLS port"
    );
    eventually("the failed handshake counted", LIMIT, || async {
        (d.metric("streamspace_dispatcher_tls_handshake_failures_total")
            .await
            > before)
            .then_some(())
    })
    .await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_serves_the_agent_its_certificate_names() {
    let pki = Pki::new();
    let d = start(&pki, true).await;
    let token = d.agent("agent-a").await;
    let cert = pki.client("agent-a", &["agent-a"]);
    let state = tempfile::tempdir().unwrap();
    let mut running = agent(&d, &token, state.path(), &pki.ca_file, Some(&cert)).await;
    running.wait_connected(None).await.unwrap();
    delivered_and_completed(&d, "agent-a").await;
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_certificate_naming_another_agent_is_refused() {
    let pki = Pki::new();
    let d = start(&pki, true).await;
    let token_a = d.agent("agent-a").await;
    d.agent("agent-b").await;
    let cmd = stop("agent-a", "s-1");
    let id = cmd.command_id.to_string();
    d.enqueue(&[cmd]).await;
    let ca_pem = pki.ca.cert_pem();

    // agent-a's credential with agent-b's certificate: authenticated, then refused.
    let cert_b = pki.client("agent-b", &["agent-b"]);
    let channel = tls_channel(&d, &ca_pem, Some(&cert_b)).await.unwrap();
    let err = open_on(channel, Some(&token_a), hello(vec![]))
        .await
        .expect_err("a certificate of agent-b with the credential of agent-a was served");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("agent-b"), "{err:?}");

    // No certificate at all: the handshake itself fails.
    let bare = tls_channel(&d, &ca_pem, None).await;
    let refused = match bare {
        Err(_) => true,
        Ok(channel) => open_on(channel, Some(&token_a), hello(vec![]))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA naming the right agent: refused by the handshake.
    let other = DevCa::new("someone else's CA").unwrap();
    let forged = other
        .client(&["agent-a"])
        .unwrap()
        .write(pki.dir.path(), "forged")
        .unwrap();
    let refused = match tls_channel(&d, &ca_pem, Some(&forged)).await {
        Err(_) => true,
        Ok(channel) => open_on(channel, Some(&token_a), hello(vec![]))
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from an unknown CA was served");
    assert!(!d.agent_online("agent-a").await);
    assert_eq!(d.statuses(&[id]).await[0], "pending");
}

#[tokio::test]
async fn renewed_certificate_files_are_served_without_a_restart() {
    let pki = Pki::new();
    let d = start(&pki, false).await;
    // A renewal from a new CA, so a client can tell which certificate it was served.
    let renewed_ca = DevCa::new("renewed CA").unwrap();
    let renewed_pem = renewed_ca.cert_pem();
    assert!(
        tls_channel(&d, &renewed_pem, None).await.is_err(),
        "the renewed CA was trusted before the renewal"
    );

    // Written the way a broken renewal might be: key first, the certificate later.
    let renewed = renewed_ca.server(&["localhost"]).unwrap();
    std::fs::write(&pki.server.key, &renewed.key_pem).unwrap();
    // A mismatched pair is refused, and the old certificate is still served.
    eventually("the mismatched pair refused", LIMIT, || async {
        (d.metric("streamspace_dispatcher_tls_reload_failures_total")
            .await
            > 0.0)
            .then_some(())
    })
    .await;
    tls_channel(&d, &pki.ca.cert_pem(), None)
        .await
        .expect("the previous certificate is still served");
    assert_eq!(
        d.metric("streamspace_dispatcher_tls_reloads_total").await,
        0.0
    );

    std::fs::write(&pki.server.cert, &renewed.cert_pem).unwrap();
    eventually("the renewed certificate served", LIMIT, || async {
        tls_channel(&d, &renewed_pem, None).await.ok().map(|_| ())
    })
    .await;
    assert_eq!(
        d.metric("streamspace_dispatcher_tls_reloads_total").await,
        1.0
    );
    assert!(
        tls_channel(&d, &pki.ca.cert_pem(), None).await.is_err(),
        "the replaced certificate is still served"
    );
}

/// The agent reads its certificate again on every dial: once a renewal names it, the next
/// dial is accepted without a restart.
#[tokio::test]
async fn the_agent_presents_a_renewed_client_certificate_on_its_next_dial() {
    let pki = Pki::new();
    let d = start(&pki, true).await;
    let token = d.agent("agent-a").await;
    // Issued for the wrong name: refused, and the agent keeps redialing.
    let files = pki.client("agent", &["agent-z"]);
    let state = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(https(&d), &token, state.path());
    config.runtime = RuntimeKind::Record;
    config.reconnect_base_ms = 20;
    config.reconnect_cap_ms = 100;
    config.tls_ca_file = Some(pki.ca_file.clone());
    config.tls_cert_file = Some(files.cert.clone());
    config.tls_key_file = Some(files.key.clone());
    let mut running = Agent::build(config).await.unwrap().spawn();
    eventually("a refused dial", LIMIT, || async {
        let refused = matches!(
            &*running.connection().borrow(),
            ConnectionState::Disconnected { last_error: Some(e) } if e.contains("agent-z")
        );
        refused.then_some(())
    })
    .await;
    assert!(!d.agent_online("agent-a").await);

    let renewed = pki.ca.client(&["agent-a"]).unwrap();
    std::fs::write(&files.key, &renewed.key_pem).unwrap();
    std::fs::write(&files.cert, &renewed.cert_pem).unwrap();
    tokio::time::timeout(LIMIT, running.wait_connected(None))
        .await
        .expect("connected with the renewed certificate")
        .unwrap();
    delivered_and_completed(&d, "agent-a").await;
    running.shutdown().await.unwrap();
}
