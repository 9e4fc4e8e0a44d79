//! What a process runtime can start (its template catalog) and how it is configured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    DEFAULT_MONITOR_INTERVAL, DEFAULT_READY_TIMEOUT_MS, DEFAULT_STOP_GRACE, DEFAULT_TEMPLATES,
};
use crate::error::Error;

/// How to start one kind of session.
///
/// `program`, `args` and `env` values may use `{session}` (the session id), `{port}` (the
/// TCP port the session must listen on, on 127.0.0.1) and `{agent}` (the executable that
/// provides `serve-session`, normally the agent itself). The session also gets
/// `SESSION_ID` and `SESSION_PORT` in its environment — which is otherwise cleared: only
/// `PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, `LC_*`, `TZ`, `TMPDIR` and `TERM` are
/// inherited from the agent, so no session sees the agent's credential.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How long after spawning (or waking) the port must accept connections.
    #[serde(default = "default_ready_timeout_ms")]
    pub ready_timeout_ms: u64,
}

fn default_ready_timeout_ms() -> u64 {
    DEFAULT_READY_TIMEOUT_MS
}

impl Template {
    /// The agent's own tiny HTTP server, which needs nothing installed on the machine.
    pub fn serve_session() -> Self {
        Self {
            program: "{agent}".into(),
            args: [
                "serve-session",
                "--session",
                "{session}",
                "--port",
                "{port}",
            ]
            .map(String::from)
            .into(),
            env: BTreeMap::new(),
            ready_timeout_ms: DEFAULT_READY_TIMEOUT_MS,
        }
    }

    /// Checks what the runtime relies on: the session id appears in the command line
    /// (that is how a restarted agent recognises its processes), and the port is passed on
    /// somehow (through an argument, or the environment variable).
    pub(super) fn validate(&self, name: &str) -> Result<(), Error> {
        if !self.args.iter().any(|a| a.contains("{session}")) && !self.program.contains("{session}")
        {
            return Err(Error::Config(format!(
                "template {name:?}: its command line must contain {{session}} so a restarted agent can recognise the process"
            )));
        }
        if self.program.is_empty() {
            return Err(Error::Config(format!("template {name:?}: empty program")));
        }
        if self.ready_timeout_ms == 0 {
            return Err(Error::Config(format!(
                "template {name:?}: ready_timeout_ms must be positive"
            )));
        }
        Ok(())
    }
}

/// The templates a [`ProcessRuntime`] can start, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog(pub(super) BTreeMap<String, Template>);

impl Default for Catalog {
    /// `firefox-browser`, `chrome-browser` and `desktop-xfce`, each running
    /// [`Template::serve_session`] so they work on a bare machine.
    fn default() -> Self {
        Self(
            DEFAULT_TEMPLATES
                .into_iter()
                .map(|name| (name.to_owned(), Template::serve_session()))
                .collect(),
        )
    }
}

impl Catalog {
    pub fn empty() -> Self {
        Self(BTreeMap::new())
    }

    /// Adds `template` under `name`, replacing any template of that name.
    pub fn with(mut self, name: impl Into<String>, template: Template) -> Self {
        self.0.insert(name.into(), template);
        self
    }

    /// The default catalog with `overrides` added or replacing same-named templates.
    pub fn default_with(overrides: BTreeMap<String, Template>) -> Self {
        let mut catalog = Self::default();
        catalog.0.extend(overrides);
        catalog
    }

    pub fn get(&self, name: &str) -> Option<&Template> {
        self.0.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// Settings of a [`ProcessRuntime`].
#[derive(Clone, Debug)]
pub struct ProcessRuntimeConfig {
    /// Holds `sessions/` (records and output) and `journal.log`.
    pub state_dir: PathBuf,
    pub catalog: Catalog,
    /// Substituted for `{agent}` in templates: the executable providing `serve-session`.
    pub agent_exe: PathBuf,
    /// Between SIGTERM and SIGKILL on stop.
    pub stop_grace: Duration,
    pub monitor_interval: Duration,
    /// Host name put in session URLs (sessions listen on 127.0.0.1).
    pub advertise_host: String,
}

impl ProcessRuntimeConfig {
    /// Defaults for everything but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            catalog: Catalog::default(),
            agent_exe: default_agent_exe(),
            stop_grace: DEFAULT_STOP_GRACE,
            monitor_interval: DEFAULT_MONITOR_INTERVAL,
            advertise_host: "127.0.0.1".into(),
        }
    }
}

/// The executable that provides `serve-session`: this one when it is the agent; otherwise
/// (a test harness embedding the agent library) the `streamspace-agent` binary that cargo
/// built next to it, so in-process tests of other crates get working default templates.
pub fn default_agent_exe() -> PathBuf {
    let current = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("streamspace-agent"));
    let is_agent = current
        .file_stem()
        .is_some_and(|stem| stem == "streamspace-agent");
    if is_agent {
        return current;
    }
    // Test binaries live in target/<profile>/deps/, binaries in target/<profile>/.
    let candidates = [current.parent(), current.parent().and_then(Path::parent)];
    let built = candidates
        .into_iter()
        .flatten()
        .map(|dir| dir.join("streamspace-agent"))
        .find(|path| path.is_file());
    built.unwrap_or(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_must_name_the_session() {
        let mut t = Template::serve_session();
        assert!(t.validate("ok").is_ok());
        t.args.retain(|a| a != "{session}");
        let err = t.validate("bad").unwrap_err();
        assert!(err.to_string().contains("{session}"), "{err}");
    }

    #[test]
    fn default_catalog_has_the_documented_templates() {
        let catalog = Catalog::default();
        let names: Vec<&str> = catalog.names().collect();
        assert_eq!(names, ["chrome-browser", "desktop-xfce", "firefox-browser"]);
    }
}
