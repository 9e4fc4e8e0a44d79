//! What went wrong, as a script needs it: one exit code per kind of failure, and the
//! message as text or (under `-o json`) as a JSON object on stderr.

use std::fmt;
use std::process::ExitCode;

use serde_json::json;
use tonic::{Code, Status};

use crate::flags::Format;

/// The kinds of failure, each with its own exit code (documented in `docs/api.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 1: the command ran and ended `failed` or `cancelled`, or anything not listed below.
    Failure,
    /// 2: the invocation or the input is wrong (also clap's own code for bad flags).
    Usage,
    /// 3: no such session, command or agent (or not yours).
    NotFound,
    /// 4: the request contradicts the current or intended state, or already exists.
    Conflict,
    /// 5: no token, a bad token, or a role the call needs.
    Unauthenticated,
    /// 6: the api-gateway cannot be reached or is not ready; retrying later may help.
    Unavailable,
    /// 7: `--timeout` passed before the command ended.
    Timeout,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Failure => 1,
            Kind::Usage => 2,
            Kind::NotFound => 3,
            Kind::Conflict => 4,
            Kind::Unauthenticated => 5,
            Kind::Unavailable => 6,
            Kind::Timeout => 7,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Failure => "failure",
            Kind::Usage => "usage",
            Kind::NotFound => "not_found",
            Kind::Conflict => "conflict",
            Kind::Unauthenticated => "unauthenticated",
            Kind::Unavailable => "unavailable",
            Kind::Timeout => "timeout",
        }
    }
}

/// A failure of one `streamspace` invocation.
#[derive(Debug)]
pub struct CliError {
    pub kind: Kind,
    pub message: String,
    /// The server's status code, when the server answered.
    pub grpc: Option<Code>,
}

pub type Result<T> = std::result::Result<T, CliError>;

impl CliError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            grpc: None,
        }
    }

    /// Prints the error the way `format` asks and gives the exit code.
    pub fn report(&self, format: Format) -> ExitCode {
        match format {
            Format::Json => eprintln!(
                "{}",
                json!({"error": {
                    "kind": self.kind.name(),
                    "exit_code": self.kind.exit_code(),
                    "grpc_code": self.grpc.map(|c| format!("{c:?}")),
                    "message": self.message,
                }})
            ),
            Format::Table => eprintln!("error: {self}"),
        }
        ExitCode::from(self.kind.exit_code())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.grpc {
            Some(code) => write!(f, "{code:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let kind = match s.code() {
            Code::NotFound => Kind::NotFound,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => Kind::Conflict,
            Code::Unauthenticated | Code::PermissionDenied => Kind::Unauthenticated,
            Code::Unavailable | Code::ResourceExhausted => Kind::Unavailable,
            Code::DeadlineExceeded => Kind::Timeout,
            Code::InvalidArgument | Code::OutOfRange => Kind::Usage,
            _ => Kind::Failure,
        };
        Self {
            kind,
            message: s.message().to_owned(),
            grpc: Some(s.code()),
        }
    }
}

/// `Result` helpers: attach a kind and a message to any other error.
pub trait Context<T> {
    fn or_kind(self, kind: Kind, message: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn or_kind(self, kind: Kind, message: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| CliError::new(kind, format!("{}: {e}", message())))
    }
}

impl<T> Context<T> for Option<T> {
    fn or_kind(self, kind: Kind, message: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| CliError::new(kind, message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_own_exit_code() {
        let kinds = [
            Kind::Failure,
            Kind::Usage,
            Kind::NotFound,
            Kind::Conflict,
            Kind::Unauthenticated,
            Kind::Unavailable,
            Kind::Timeout,
        ];
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.exit_code()).collect();
        codes.dedup();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn server_codes_map_to_kinds() {
        let kind = |c| CliError::from(Status::new(c, "x")).kind;
        assert_eq!(kind(Code::NotFound), Kind::NotFound);
        assert_eq!(kind(Code::FailedPrecondition), Kind::Conflict);
        assert_eq!(kind(Code::PermissionDenied), Kind::Unauthenticated);
        assert_eq!(kind(Code::Unavailable), Kind::Unavailable);
        assert_eq!(kind(Code::InvalidArgument), Kind::Usage);
        assert_eq!(kind(Code::Internal), Kind::Failure);
    }
}
