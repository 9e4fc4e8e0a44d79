//! The workload: many users, each driving sessions through the real api-gateway (REST for
//! some users, gRPC for others) — create, then hibernate/wake (half of them without waiting
//! for the session to settle, so they queue behind each other), then delete. Every request is recorded as ok, fail or info; an info is retried under the
//! same `Idempotency-Key`, as a careful client would.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::Value;
use streamspace_proto::api::v1 as api;
use streamspace_proto::api::v1::session_service_client::SessionServiceClient;
use tonic::transport::Channel;

use super::history::{History, Op, Outcome, Record, ms};

/// Per try: a request that takes longer is an `info` and is retried.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request is retried under its key before it stays `info`.
const RETRY_FOR: Duration = Duration::from_secs(45);
/// How long a session may take to settle before its client gives up on it.
const SETTLE_FOR: Duration = Duration::from_secs(90);

/// One user's connection to the gateway.
#[derive(Clone, Debug)]
pub enum Client {
    Rest {
        base: String,
        token: String,
        http: reqwest::Client,
    },
    Grpc {
        token: String,
        client: SessionServiceClient<Channel>,
    },
}

/// What one try learned.
enum Try {
    Accepted {
        command_id: String,
        session_id: String,
        cancelled: Option<String>,
    },
    Rejected {
        status: u16,
        message: String,
    },
    Unknown(String),
}

impl Client {
    pub fn rest(base: String, token: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(TRY_TIMEOUT)
            .build()
            .expect("an HTTP client");
        Client::Rest { base, token, http }
    }

    pub fn grpc(url: &str, token: String) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(TRY_TIMEOUT)
            .timeout(TRY_TIMEOUT)
            .connect_lazy();
        Ok(Client::Grpc {
            token,
            client: SessionServiceClient::new(channel),
        })
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Client::Rest { .. } => "rest",
            Client::Grpc { .. } => "grpc",
        }
    }

    async fn send(&self, op: Op, session: &str, key: &str) -> Try {
        match self {
            Client::Rest { base, token, http } => {
                let (method, path, body) = match op {
                    Op::Create => (
                        Method::POST,
                        "/api/v1/sessions".to_owned(),
                        Some(serde_json::json!({ "template": "firefox-browser" })),
                    ),
                    Op::Hibernate => (
                        Method::PUT,
                        format!("/api/v1/sessions/{session}/hibernate"),
                        None,
                    ),
                    Op::Wake => (
                        Method::PUT,
                        format!("/api/v1/sessions/{session}/wake"),
                        None,
                    ),
                    Op::Delete => (Method::DELETE, format!("/api/v1/sessions/{session}"), None),
                };
                let mut req = http
                    .request(method, format!("{base}{path}"))
                    .bearer_auth(token)
                    .header("Idempotency-Key", key);
                if let Some(b) = body {
                    req = req.json(&b);
                }
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => return Try::Unknown(format!("{e}")),
                };
                let status = resp.status().as_u16();
                let text = match resp.text().await {
                    Ok(t) => t,
                    Err(e) => return Try::Unknown(format!("reading the answer: {e}")),
                };
                let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
                match status {
                    202 => Try::Accepted {
                        command_id: field("command_id").unwrap_or_default(),
                        session_id: field("id").unwrap_or_else(|| session.to_owned()),
                        cancelled: field("cancelled_command_id"),
                    },
                    400..=499 => Try::Rejected {
                        status,
                        message: field("detail").unwrap_or_else(|| body.to_string()),
                    },
                    _ => Try::Unknown(format!("{status} {body}")),
                }
            }
            Client::Grpc { token, client } => {
                let mut client = client.clone();
                let answer = match op {
                    Op::Create => client
                        .create_session(with_meta(
                            api::CreateSessionRequest {
                                template: "firefox-browser".into(),
                                ..Default::default()
                            },
                            token,
                            key,
                        ))
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            (r.command_id, r.id, None)
                        }),
                    Op::Hibernate => client
                        .hibernate_session(with_meta(
                            api::HibernateSessionRequest { id: session.into() },
                            token,
                            key,
                        ))
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            (r.command_id, r.id, None)
                        }),
                    Op::Wake => client
                        .wake_session(with_meta(
                            api::WakeSessionRequest { id: session.into() },
                            token,
                            key,
                        ))
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            (r.command_id, r.id, None)
                        }),
                    Op::Delete => client
                        .delete_session(with_meta(
                            api::DeleteSessionRequest { id: session.into() },
                            token,
                            key,
                        ))
                        .await
                        .map(|r| {
                            let r = r.into_inner();
                            let cancelled = Some(r.cancelled_command_id).filter(|c| !c.is_empty());
                            (r.command_id, r.id, cancelled)
                        }),
                };
                match answer {
                    Ok((command_id, session_id, cancelled)) => Try::Accepted {
                        command_id,
                        session_id,
                        cancelled,
                    },
                    Err(s) => {
                        use tonic::Code::*;
                        match s.code() {
                            InvalidArgument | NotFound | AlreadyExists | PermissionDenied
                            | FailedPrecondition | OutOfRange | Unauthenticated
                            | ResourceExhausted => Try::Rejected {
                                status: s.code() as u16,
                                message: s.message().to_owned(),
                            },
                            _ => Try::Unknown(format!("{:?}: {}", s.code(), s.message())),
                        }
                    }
                }
            }
        }
    }

    /// The session's state, or `None` when it cannot be read right now.
    async fn state(&self, session: &str) -> Option<String> {
        match self {
            Client::Rest { base, token, http } => {
                let r = http
                    .get(format!("{base}/api/v1/sessions/{session}"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .ok()?;
                if !r.status().is_success() {
                    return None;
                }
                let v: Value = r.json().await.ok()?;
                v.get("state").and_then(Value::as_str).map(str::to_owned)
            }
            Client::Grpc { token, client } => {
                let mut client = client.clone();
                let mut req = tonic::Request::new(api::GetSessionRequest { id: session.into() });
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().ok()?);
                client
                    .get_session(req)
                    .await
                    .ok()
                    .map(|s| s.into_inner().state)
            }
        }
    }

    /// One logical request: tries under one key until the answer is definite or
    /// [`RETRY_FOR`] passes.
    pub(crate) async fn request(
        &self,
        user: &str,
        op: Op,
        session: &str,
        started: Instant,
    ) -> Record {
        let key = uuid::Uuid::new_v4().to_string();
        let at = started.elapsed();
        let t0 = Instant::now();
        let mut tries = 0;
        let mut had_info = false;
        let outcome = loop {
            tries += 1;
            match self.send(op, session, &key).await {
                Try::Accepted {
                    command_id,
                    session_id,
                    cancelled,
                } => {
                    return Record {
                        user: user.to_owned(),
                        transport: self.transport(),
                        op,
                        session_id,
                        idempotency_key: key,
                        outcome: Outcome::Ok { command_id },
                        tries,
                        recovered: had_info,
                        cancelled_command_id: cancelled,
                        at_ms: ms(at),
                        latency_ms: ms(t0.elapsed()),
                    };
                }
                Try::Rejected { status, message } => break Outcome::Fail { status, message },
                Try::Unknown(error) => {
                    had_info = true;
                    if t0.elapsed() > RETRY_FOR {
                        break Outcome::Info { error };
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Record {
            user: user.to_owned(),
            transport: self.transport(),
            op,
            session_id: session.to_owned(),
            idempotency_key: key,
            outcome,
            tries,
            recovered: false,
            cancelled_command_id: None,
            at_ms: ms(at),
            latency_ms: ms(t0.elapsed()),
        }
    }

    /// Polls until the session is `running` or `hibernated` (its next command may go), or
    /// `None` when it ended (`terminated`, `failed`) or did not settle in time.
    async fn settled(&self, session: &str) -> Option<String> {
        let deadline = Instant::now() + SETTLE_FOR;
        while Instant::now() < deadline {
            match self.state(session).await.as_deref() {
                Some(s @ ("running" | "hibernated")) => return Some(s.to_owned()),
                Some("terminated" | "failed") => return None,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        None
    }
}

/// How much work, and how wide.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub sessions: usize,
    /// Hibernate/wake requests per session between its create and its delete.
    pub toggles: usize,
    /// Every `keep_every`-th session is left running at the end (the others are deleted),
    /// so the final check compares live sessions with their processes, not only ended ones.
    pub keep_every: usize,
    /// Sessions driven at once.
    pub parallel: usize,
}

/// Sessions needed for about `commands` requests: a deleted session makes `toggles + 2`,
/// a kept one `toggles + 1`.
pub fn sessions_for(commands: usize, toggles: usize, keep_every: usize) -> usize {
    let keep_every = keep_every.max(1);
    (commands * keep_every).div_ceil(keep_every * (toggles + 2) - 1)
}

/// Runs the workload to the end; `clients` are the users' clients.
pub async fn run(clients: Vec<(String, Client)>, shape: Shape, seed: u64, history: Arc<History>) {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let clients = Arc::new(clients);
    let mut tasks = Vec::new();
    for worker in 0..shape.parallel {
        let next = next.clone();
        let clients = clients.clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (worker as u64).wrapping_mul(0x9e37_79b9));
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= shape.sessions {
                    return;
                }
                let (user, client) = &clients[n % clients.len()];
                // A little jitter, so requests do not march in lockstep.
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
                let delete = n % shape.keep_every != shape.keep_every - 1;
                session_life(
                    user,
                    client,
                    shape.toggles,
                    delete,
                    started,
                    &history,
                    &mut rng,
                )
                .await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn session_life(
    user: &str,
    client: &Client,
    toggles: usize,
    delete: bool,
    started: Instant,
    history: &History,
    rng: &mut StdRng,
) {
    let created = client.request(user, Op::Create, "", started).await;
    let session = match &created.outcome {
        Outcome::Ok { .. } => created.session_id.clone(),
        _ => {
            history.push(created);
            return;
        }
    };
    history.push(created);
    // What the session will be once its accepted commands have run; `None` after a
    // request whose outcome is unknown (then the next one waits to see).
    let mut intended = Some("running".to_owned());
    for _ in 0..toggles {
        // Half the toggles wait for the session to settle; the others go at once and are
        // accepted against its intended state, queueing behind the commands before them
        // (per-session backlogs a few deep, also behind a start that has not run yet).
        let wait = intended.is_none() || rng.random_bool(0.5);
        if wait {
            let Some(state) = client.settled(&session).await else {
                break;
            };
            intended = Some(state);
        }
        let (op, after) = if intended.as_deref() == Some("running") {
            (Op::Hibernate, "hibernated")
        } else {
            (Op::Wake, "running")
        };
        let record = client.request(user, op, &session, started).await;
        intended = matches!(record.outcome, Outcome::Ok { .. }).then(|| after.to_owned());
        history.push(record);
    }
    // Not waiting for the last toggle to settle: the stop queues behind it, so per-session
    // order is exercised (a stop is accepted in any non-terminal state).
    if delete {
        history.push(client.request(user, Op::Delete, &session, started).await);
    }
}

/// A gRPC request with the caller's token and idempotency key.
fn with_meta<T>(msg: T, token: &str, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let m = r.metadata_mut();
    if let Ok(v) = format!("Bearer {token}").parse() {
        m.insert("authorization", v);
    }
    if let Ok(v) = key.parse() {
        m.insert("idempotency-key", v);
    }
    r
}
