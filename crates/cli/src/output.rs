//! Rendering: aligned tables for people, JSON (one document per result) for scripts.

use serde_json::{Value, json};
use streamspace_proto::api::v1 as pb;

use crate::flags::Format;

/// Something the CLI can print.
pub trait Render {
    fn headers() -> &'static [&'static str];
    fn row(&self) -> Vec<String>;
    fn json(&self) -> Value;
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn opt(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

impl Render for pb::Session {
    fn headers() -> &'static [&'static str] {
        &["ID", "TEMPLATE", "STATE", "AGENT", "URL", "CREATED"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.template.clone(),
            self.state.clone(),
            self.agent_id.clone(),
            or_dash(&self.url),
            self.created_at.clone(),
        ]
    }
    fn json(&self) -> Value {
        let r = self.resources.clone().unwrap_or_default();
        json!({
            "id": self.id, "user_id": self.user_id, "template": self.template,
            "agent_id": self.agent_id, "state": self.state,
            "resources": {"memory": opt(&r.memory), "cpu": opt(&r.cpu)},
            "url": opt(&self.url), "status_message": opt(&self.status_message),
            "created_at": self.created_at, "updated_at": self.updated_at,
            "terminated_at": opt(&self.terminated_at),
        })
    }
}

impl Render for pb::Command {
    fn headers() -> &'static [&'static str] {
        &[
            "COMMAND", "ACTION", "STATUS", "ATTEMPTS", "SESSION", "ERROR",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.command_id.clone(),
            self.action.clone(),
            self.status.clone(),
            format!("{}/{}", self.attempts, self.max_attempts),
            or_dash(&self.session_id),
            or_dash(&self.error_message),
        ]
    }
    fn json(&self) -> Value {
        json!({
            "command_id": self.command_id, "session_id": opt(&self.session_id),
            "agent_id": self.agent_id, "action": self.action, "status": self.status,
            "error_message": opt(&self.error_message), "attempts": self.attempts,
            "max_attempts": self.max_attempts, "created_at": self.created_at,
            "sent_at": opt(&self.sent_at), "acknowledged_at": opt(&self.acknowledged_at),
            "completed_at": opt(&self.completed_at), "updated_at": self.updated_at,
            "result": serde_json::from_str::<Value>(&self.result_json).unwrap_or(Value::Null),
        })
    }
}

impl Render for pb::Agent {
    fn headers() -> &'static [&'static str] {
        &[
            "AGENT",
            "CLUSTER",
            "REGION",
            "STATUS",
            "SESSIONS",
            "LAST HEARTBEAT",
        ]
    }
    fn row(&self) -> Vec<String> {
        let cap = if self.max_sessions == 0 {
            String::new()
        } else {
            format!("/{}", self.max_sessions)
        };
        vec![
            self.agent_id.clone(),
            self.cluster.clone(),
            self.region.clone(),
            if self.online { "online" } else { "offline" }.into(),
            format!("{}{cap}", self.active_sessions),
            or_dash(&self.last_heartbeat_at),
        ]
    }
    fn json(&self) -> Value {
        json!({
            "agent_id": self.agent_id, "cluster": self.cluster, "region": self.region,
            "online": self.online, "last_heartbeat_at": opt(&self.last_heartbeat_at),
            "connected_at": opt(&self.connected_at),
            "disconnected_at": opt(&self.disconnected_at),
            "agent_version": opt(&self.agent_version),
            "active_sessions": self.active_sessions,
            "max_sessions": if self.max_sessions == 0 { Value::Null } else { json!(self.max_sessions) },
            "created_at": self.created_at,
        })
    }
}

/// Prints a list: a table (or a note when empty), or a JSON array.
pub fn list<T: Render>(format: Format, items: &[T]) {
    match format {
        Format::Json => println!("{}", Value::Array(items.iter().map(Render::json).collect())),
        Format::Table if items.is_empty() => eprintln!("(none)"),
        Format::Table => print!("{}", table(T::headers(), items.iter().map(Render::row))),
    }
}

/// Prints one item.
pub fn one<T: Render>(format: Format, item: &T) {
    match format {
        Format::Json => println!("{}", item.json()),
        Format::Table => print!("{}", table(T::headers(), [item.row()])),
    }
}

/// Prints a key/value answer (what a change returned).
pub fn fields(format: Format, pairs: &[(&str, Value)]) {
    match format {
        Format::Json => {
            let map: serde_json::Map<String, Value> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            println!("{}", Value::Object(map));
        }
        Format::Table => {
            let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in pairs {
                let shown = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{k:<width$}  {shown}");
            }
        }
    }
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "STATE"],
            [
                vec!["a-long-id".into(), "running".into()],
                vec!["b".into(), "-".into()],
            ],
        );
        assert_eq!(t, "ID         STATE\na-long-id  running\nb          -\n");
    }
}
