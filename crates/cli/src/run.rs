//! Runs one command against the api-gateway.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use streamspace_proto::api::v1 as pb;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::error::{CliError, Context as _, Kind, Result};
use crate::flags::{AgentCommand, Change, Command, CommandCommand, Flags, Format, SessionCommand};
use crate::output;

/// Adds the bearer token (and, for one call, an idempotency key) to every request.
#[derive(Clone)]
struct Auth {
    bearer: MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        Ok(req)
    }
}

type Sessions = pb::session_service_client::SessionServiceClient<InterceptedService<Channel, Auth>>;
type Agents =
    pb::agent_admin_service_client::AgentAdminServiceClient<InterceptedService<Channel, Auth>>;

fn keyed<T>(msg: T, change: &Change) -> Result<Request<T>> {
    let mut req = Request::new(msg);
    if let Some(key) = &change.idempotency_key {
        req.metadata_mut().insert(
            "idempotency-key",
            key.parse().or_kind(Kind::Usage, || {
                "--idempotency-key must be visible ASCII".into()
            })?,
        );
    }
    Ok(req)
}

/// Where the bearer token comes from unless `--token-file` says otherwise.
pub const TOKEN_VAR: &str = "STREAMSPACE_TOKEN";

pub async fn run(flags: Flags) -> Result<ExitCode> {
    let token = match &flags.token_file {
        Some(path) => std::fs::read_to_string(path)
            .or_kind(Kind::Usage, || {
                format!("cannot read --token-file {}", path.display())
            })?
            .trim()
            .to_owned(),
        // Read here, not by clap: a `--token` flag would invite tokens on the command line.
        None => std::env::var(TOKEN_VAR).unwrap_or_default(),
    };
    if token.is_empty() {
        return Err(CliError::new(
            Kind::Unauthenticated,
            "no token: set STREAMSPACE_TOKEN or pass --token-file PATH (development: `streamspace-api-gateway mint-token --user NAME`)",
        ));
    }
    let bearer = format!("Bearer {token}").parse().or_kind(Kind::Usage, || {
        "the token contains characters that cannot be sent".into()
    })?;
    let mut endpoint = Endpoint::from_shared(flags.api_url.clone())
        .or_kind(Kind::Usage, || {
            format!("invalid --api-url {:?}", flags.api_url)
        })?
        .connect_timeout(Duration::from_secs(10));
    if flags.api_url.starts_with("https://") {
        let tls = match &flags.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).or_kind(Kind::Usage, || {
                    format!("cannot read --ca-file {}", path.display())
                })?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .or_kind(Kind::Usage, || "TLS settings for --api-url".into())?;
    } else if flags.ca_file.is_some() {
        return Err(CliError::new(
            Kind::Usage,
            "--ca-file is for an https:// --api-url",
        ));
    }
    let channel = endpoint.connect().await.or_kind(Kind::Unavailable, || {
        format!("cannot reach the api-gateway at {}", flags.api_url)
    })?;
    let auth = Auth { bearer };
    let sessions = Sessions::new(InterceptedService::new(channel.clone(), auth.clone()));
    let agents = Agents::new(InterceptedService::new(channel, auth));
    let format = flags.output;
    match flags.command {
        Command::Sessions(cmd) => session(sessions, cmd, format).await,
        Command::Commands(cmd) => command(sessions, cmd, format).await,
        Command::Agents(cmd) => agent(agents, cmd, format).await,
    }
}

async fn session(mut c: Sessions, cmd: SessionCommand, format: Format) -> Result<ExitCode> {
    match cmd {
        SessionCommand::Create {
            template,
            memory,
            cpu,
            cluster,
            region,
            change,
        } => {
            let msg = pb::CreateSessionRequest {
                template,
                resources: Some(pb::Resources {
                    memory: memory.unwrap_or_default(),
                    cpu: cpu.unwrap_or_default(),
                }),
                cluster: cluster.unwrap_or_default(),
                region: region.unwrap_or_default(),
            };
            let a = c.create_session(keyed(msg, &change)?).await?.into_inner();
            accepted(
                &mut c,
                format,
                &change,
                &a.id,
                &a.command_id,
                vec![
                    ("id", json!(a.id)),
                    ("state", json!(a.state)),
                    ("agent_id", json!(a.agent_id)),
                    ("command_id", json!(a.command_id)),
                ],
            )
            .await
        }
        SessionCommand::List { limit } => {
            let list = c
                .list_sessions(pb::ListSessionsRequest {
                    limit: limit.unwrap_or(0),
                })
                .await?
                .into_inner();
            output::list(format, &list.sessions);
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Get { id } => {
            let s = c.get_session(pb::GetSessionRequest { id }).await?;
            output::one(format, &s.into_inner());
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Delete { id, change } => {
            let a = c
                .delete_session(keyed(pb::DeleteSessionRequest { id }, &change)?)
                .await?
                .into_inner();
            let opt = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
            accepted(
                &mut c,
                format,
                &change,
                &a.id,
                &a.command_id,
                vec![
                    ("id", json!(a.id)),
                    ("state", json!(a.state)),
                    ("command_id", opt(&a.command_id)),
                    ("cancelled_command_id", opt(&a.cancelled_command_id)),
                ],
            )
            .await
        }
        SessionCommand::Hibernate { id, change } => {
            let a = c
                .hibernate_session(keyed(pb::HibernateSessionRequest { id }, &change)?)
                .await?
                .into_inner();
            changed(&mut c, format, &change, a).await
        }
        SessionCommand::Wake { id, change } => {
            let a = c
                .wake_session(keyed(pb::WakeSessionRequest { id }, &change)?)
                .await?
                .into_inner();
            changed(&mut c, format, &change, a).await
        }
        SessionCommand::Commands { id } => {
            let list = c
                .list_session_commands(pb::ListSessionCommandsRequest { session_id: id })
                .await?
                .into_inner();
            output::list(format, &list.commands);
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Watch { id, timeout } => {
            let mut stream = c
                .watch_session(pb::WatchSessionRequest { id: id.clone() })
                .await?
                .into_inner();
            let deadline = timeout.map(|t| (tokio::time::Instant::now() + t, t));
            loop {
                let next = match deadline {
                    Some((at, t)) => tokio::time::timeout_at(at, stream.message())
                        .await
                        .map_err(|_| {
                            CliError::new(
                                Kind::Timeout,
                                format!("session {id} did not end within {}", seconds(t)),
                            )
                        })?,
                    None => stream.message().await,
                };
                let Some(event) = next? else { break };
                match format {
                    Format::Json => println!(
                        "{}",
                        json!({"state": event.state, "session": event.session.as_ref().map(output::Render::json)})
                    ),
                    Format::Table => println!("{}  {}", now(), event.state),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn changed(
    c: &mut Sessions,
    format: Format,
    change: &Change,
    a: pb::SessionCommandResponse,
) -> Result<ExitCode> {
    accepted(
        c,
        format,
        change,
        &a.id,
        &a.command_id,
        vec![
            ("id", json!(a.id)),
            ("state", json!(a.state)),
            ("command_id", json!(a.command_id)),
        ],
    )
    .await
}

/// Prints what a change returned; with `--wait`, follows its command to the end first
/// and then prints the session as it is now.
async fn accepted(
    c: &mut Sessions,
    format: Format,
    change: &Change,
    session_id: &str,
    command_id: &str,
    answer: Vec<(&str, Value)>,
) -> Result<ExitCode> {
    if !change.wait || command_id.is_empty() {
        output::fields(format, &answer);
        return Ok(ExitCode::SUCCESS);
    }
    let last = follow(c, command_id, change.timeout).await?;
    let session = c
        .get_session(pb::GetSessionRequest {
            id: session_id.to_owned(),
        })
        .await?
        .into_inner();
    output::one(format, &session);
    finished(&last)
}

/// Exit status for a finished command: success only when it completed.
fn finished(last: &pb::Command) -> Result<ExitCode> {
    match last.status.as_str() {
        "completed" => Ok(ExitCode::SUCCESS),
        other => {
            let why = if last.error_message.is_empty() {
                String::new()
            } else {
                format!(": {}", last.error_message)
            };
            eprintln!("command {} {other}{why}", last.command_id);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn now() -> String {
    // Seconds since the epoch are enough to order lines; the server's times are exact.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", t.as_secs(), t.subsec_millis())
}

/// Follows a command with WatchCommand until it ends, with a progress indicator on
/// stderr (a spinner on a terminal, one line per status otherwise).
async fn follow(
    c: &mut Sessions,
    command_id: &str,
    timeout: Option<Duration>,
) -> Result<pb::Command> {
    let Some(limit) = timeout else {
        return follow_to_end(c, command_id).await;
    };
    match tokio::time::timeout(limit, follow_to_end(&mut c.clone(), command_id)).await {
        Ok(last) => last,
        Err(_) => {
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
            // Say where it stands; the command itself goes on.
            let now = c
                .get_command(pb::GetCommandRequest {
                    command_id: command_id.to_owned(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or_else(|_| "unknown".into());
            Err(CliError::new(
                Kind::Timeout,
                format!(
                    "command {command_id} did not end within {} (it is {now}; it goes on without us)",
                    seconds(limit)
                ),
            ))
        }
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

async fn follow_to_end(c: &mut Sessions, command_id: &str) -> Result<pb::Command> {
    let mut stream = c
        .watch_command(pb::WatchCommandRequest {
            command_id: command_id.to_owned(),
        })
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let frames = ['|', '/', '-', '\\'];
    let mut frame = 0usize;
    let mut status_now = String::from("waiting");
    let mut last: Option<pb::Command> = None;
    loop {
        tokio::select! {
            msg = stream.message() => {
                match msg? {
                    Some(event) => {
                        status_now = event.status.clone();
                        if !tty {
                            eprintln!("{command_id} {status_now} ({:.1}s)", started.elapsed().as_secs_f64());
                        }
                        last = event.command;
                    }
                    None => break,
                }
            }
            _ = tick.tick(), if tty => {}
        }
        if tty {
            frame = (frame + 1) % frames.len();
            eprint!(
                "\r{} {command_id} {status_now:<10} {:>6.1}s",
                frames[frame],
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        eprintln!(
            "\r  {command_id} {status_now:<10} {:>6.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    let Some(last) = last else {
        return Err(CliError::new(
            Kind::Unavailable,
            format!("the watch of {command_id} ended without any event"),
        ));
    };
    if !matches!(last.status.as_str(), "completed" | "failed" | "cancelled") {
        return Err(CliError::new(
            Kind::Unavailable,
            format!(
                "the watch of {command_id} ended early (status {}); the server may be shutting down",
                last.status
            ),
        ));
    }
    Ok(last)
}

async fn command(mut c: Sessions, cmd: CommandCommand, format: Format) -> Result<ExitCode> {
    match cmd {
        CommandCommand::Get { command_id } => {
            let cmd = c
                .get_command(pb::GetCommandRequest { command_id })
                .await?
                .into_inner();
            output::one(format, &cmd);
            Ok(ExitCode::SUCCESS)
        }
        CommandCommand::Watch {
            command_id,
            timeout,
        } => {
            let last = follow(&mut c, &command_id, timeout).await?;
            output::one(format, &last);
            finished(&last)
        }
    }
}

async fn agent(mut c: Agents, cmd: AgentCommand, format: Format) -> Result<ExitCode> {
    match cmd {
        AgentCommand::List => {
            let list = c.list_agents(pb::ListAgentsRequest {}).await?.into_inner();
            output::list(format, &list.agents);
        }
        AgentCommand::Get { agent_id } => {
            let a = c
                .get_agent(pb::GetAgentRequest { agent_id })
                .await?
                .into_inner();
            output::one(format, &a);
        }
        AgentCommand::Register {
            agent_id,
            cluster,
            region,
            max_sessions,
        } => {
            let a = c
                .register_agent(pb::RegisterAgentRequest {
                    agent_id,
                    cluster: cluster.unwrap_or_default(),
                    region: region.unwrap_or_default(),
                    max_sessions: max_sessions.unwrap_or(0),
                })
                .await?
                .into_inner();
            output::one(format, &a);
        }
        AgentCommand::IssueCredential { agent_id } => {
            let cred = c
                .issue_credential(pb::IssueCredentialRequest { agent_id })
                .await?
                .into_inner();
            output::fields(
                format,
                &[
                    ("credential_id", json!(cred.credential_id)),
                    ("agent_id", json!(cred.agent_id)),
                    ("token", json!(cred.token)),
                ],
            );
            if format == Format::Table {
                eprintln!("the token is shown only now; store it where the agent reads it");
            }
        }
        AgentCommand::RevokeCredential {
            agent_id,
            credential_id,
        } => {
            c.revoke_credential(pb::RevokeCredentialRequest {
                agent_id,
                credential_id: credential_id.clone(),
            })
            .await?;
            if format == Format::Json {
                println!("{}", json!({"revoked": credential_id}));
            } else {
                println!("revoked {credential_id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
