//! Configuration in layers: built-in defaults, then an optional TOML file, then
//! `STREAMSPACE_`-prefixed environment variables. Each service declares one `serde` struct
//! and calls [`load`]; values are passed on explicitly as structs, never read ad hoc.
//!
//! Environment names map onto the struct path with `__` between levels, lower-cased:
//! `STREAMSPACE_DATABASE__MAX_CONNECTIONS=20` sets `database.max_connections`. Values are
//! parsed as TOML scalars when they can be (`20`, `true`, `1.5`), else taken as strings.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The environment prefix of every setting.
pub const ENV_PREFIX: &str = "STREAMSPACE_";

/// Loads `T` from defaults (its `serde(default)`s), `file` when given, then the environment.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T> {
    load_from(file, std::env::vars())
}

/// [`load`] with an explicit environment, for tests.
pub fn load_from<T: DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T> {
    let mut root = toml::Table::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        root = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("parsing {}: {e}", path.display())))?;
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // `STREAMSPACE_CONFIG` names the file itself; it is not a setting.
        if rest == "CONFIG" || rest.is_empty() {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        insert(&mut root, &path, parse_scalar(&value)).map_err(|conflict| {
            Error::Config(format!("{name}: {conflict} is not a table of settings"))
        })?;
    }
    toml::Value::Table(root)
        .try_into()
        .map_err(|e: toml::de::Error| Error::Config(e.message().to_owned()))
}

fn parse_scalar(raw: &str) -> toml::Value {
    // Parse through a one-key document so TOML's own scalar rules apply.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn insert(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Ok(()),
        [leaf] => {
            table.insert(leaf.clone(), value);
            Ok(())
        }
        [head, rest @ ..] => {
            let entry = table
                .entry(head.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            match entry {
                toml::Value::Table(inner) => insert(inner, rest, value),
                _ => Err(head.clone()),
            }
        }
    }
}

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

/// Settings of the Postgres connection pool, shared by every service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` URL. A secret because it usually carries the password.
    #[serde(skip_serializing)]
    pub url: Secret<String>,
    pub max_connections: u32,
    pub acquire_timeout_secs: u64,
    /// Shown in `pg_stat_activity`, so operators can tell the services apart.
    pub application_name: String,
    /// TLS to the server, overriding the URL's `sslmode`: `disable`, `prefer`, `require`,
    /// `verify-ca` or `verify-full` (production: `verify-full`, the server's name checked
    /// against its certificate).
    pub ssl_mode: Option<String>,
    /// PEM CA bundle the server's certificate is verified against (`verify-ca`,
    /// `verify-full`); overrides the URL's `sslrootcert`.
    pub ssl_root_cert: Option<std::path::PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://localhost/streamspace".to_owned()),
            max_connections: 10,
            acquire_timeout_secs: 5,
            application_name: "streamspace".to_owned(),
            ssl_mode: None,
            ssl_root_cert: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Example {
        database: DatabaseConfig,
        name: String,
        verbose: bool,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("ss-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "name = \"from-file\"\n[database]\nmax_connections = 3\n",
        )
        .unwrap();
        let cfg: Example = load_from(
            Some(&file),
            env(&[
                ("STREAMSPACE_DATABASE__MAX_CONNECTIONS", "7"),
                ("STREAMSPACE_VERBOSE", "true"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.name, "from-file");
        assert_eq!(cfg.database.max_connections, 7);
        assert_eq!(cfg.database.acquire_timeout_secs, 5, "default kept");
        assert!(cfg.verbose);
    }

    #[test]
    fn unknown_keys_and_bad_types_are_named() {
        let err = load_from::<Example>(None, env(&[("STREAMSPACE_DATABASE__MAX_CONECTIONS", "7")]))
            .unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
        let err =
            load_from::<Example>(None, env(&[("STREAMSPACE_VERBOSE", "yes please")])).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let cfg: Example = load_from(
            None,
            env(&[("STREAMSPACE_DATABASE__URL", "postgres://u:hunter2@h/db")]),
        )
        .unwrap();
        assert_eq!(cfg.database.url.expose(), "postgres://u:hunter2@h/db");
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
