//! Every flag and subcommand of `streamspace`, in one place.

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "streamspace",
    version,
    about = "StreamSpace command-line client: sessions, commands and agents over gRPC"
)]
pub struct Flags {
    /// gRPC address of the api-gateway.
    #[arg(
        long,
        env = "STREAMSPACE_API_URL",
        default_value = "http://127.0.0.1:9090",
        global = true
    )]
    pub api_url: String,
    /// Read the bearer token (a JWT) from this file instead of `STREAMSPACE_TOKEN`. There
    /// is no flag taking the token itself: an argument shows in the process list and the
    /// shell history.
    #[arg(long, env = "STREAMSPACE_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// For an `https://` --api-url: PEM file of the CA that signed the gateway's (or its
    /// ingress's) certificate. Default: the WebPKI roots.
    #[arg(long, env = "STREAMSPACE_CA_FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Your sessions.
    #[command(subcommand, alias = "session")]
    Sessions(SessionCommand),
    /// Commands sent to agents.
    #[command(subcommand, alias = "command")]
    Commands(CommandCommand),
    /// Agents (admin).
    #[command(subcommand, alias = "agent")]
    Agents(AgentCommand),
}

#[derive(Debug, Args)]
pub struct Change {
    /// Follow the queued command until it ends, showing its progress.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (e.g. 30s, 2m, 500ms) with exit code 7; the
    /// command itself goes on.
    #[arg(long, value_parser = parse_duration, requires = "wait")]
    pub timeout: Option<std::time::Duration>,
    /// Idempotency key: retrying with the same key never repeats the change.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Create a session from a template, e.g. `firefox-browser`.
    Create {
        template: String,
        /// Memory, e.g. 512Mi.
        #[arg(long)]
        memory: Option<String>,
        /// CPU, e.g. 250m.
        #[arg(long)]
        cpu: Option<String>,
        /// Only agents of this cluster (also queues for an offline agent of it).
        #[arg(long)]
        cluster: Option<String>,
        /// Only agents of this region.
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        change: Change,
    },
    /// List your sessions, newest first.
    List {
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one session.
    Get { id: String },
    /// Stop a session (queued also while its agent is down).
    #[command(alias = "stop")]
    Delete {
        id: String,
        #[command(flatten)]
        change: Change,
    },
    /// Hibernate a running session.
    Hibernate {
        id: String,
        #[command(flatten)]
        change: Change,
    },
    /// Wake a hibernated session.
    Wake {
        id: String,
        #[command(flatten)]
        change: Change,
    },
    /// A session's commands in order.
    Commands { id: String },
    /// Print each state change of a session until it is terminated.
    Watch {
        id: String,
        /// Give up after this long (e.g. 30s, 2m) with exit code 7.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CommandCommand {
    /// Show one command.
    Get { command_id: String },
    /// Follow a command until it ends.
    Watch {
        command_id: String,
        /// Give up after this long (e.g. 30s, 2m) with exit code 7.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// All agents with liveness and load.
    List,
    /// One agent.
    Get { agent_id: String },
    /// Register an agent.
    Register {
        agent_id: String,
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        max_sessions: Option<i32>,
    },
    /// Issue a credential for an agent; the token is printed once.
    IssueCredential { agent_id: String },
    /// Revoke an agent credential.
    RevokeCredential {
        agent_id: String,
        credential_id: String,
    },
}

/// `500ms`, `30s`, `2m`, `1h`, or plain seconds (`30`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("{text:?}: a timeout must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
