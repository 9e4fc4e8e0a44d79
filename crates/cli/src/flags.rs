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
    /// Bearer token (a JWT; `streamspace-api-gateway mint-token` makes development ones).
    #[arg(long, env = "STREAMSPACE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
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
    Watch { id: String },
}

#[derive(Debug, Subcommand)]
pub enum CommandCommand {
    /// Show one command.
    Get { command_id: String },
    /// Follow a command until it ends.
    Watch { command_id: String },
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
