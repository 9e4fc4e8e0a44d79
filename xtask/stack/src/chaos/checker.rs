//! After heal, settle and drain: account for every operation the workload made and every
//! execution and effect the agents recorded, against what the database says.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sqlx::PgPool;

use super::history::{Outcome, Record};

/// The counters of one run. Everything but `ok`, `info`, `fail`, `recovered` and
/// `duplicate_deliveries` must be zero.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    pub ok: u64,
    pub info: u64,
    pub fail: u64,
    /// Lost: `ok` (or an `info` the database shows committed) but never terminal.
    pub lost: u64,
    /// An `info` that turned out accepted (by a retry under its key, or in the database).
    pub recovered: u64,
    /// An execution for a command the database never had.
    pub unexpected: u64,
    /// Extra deliveries that reached the runtime (fine: at-least-once).
    pub duplicate_deliveries: u64,
    /// Effects beyond what the session's completed commands explain (not fine).
    pub duplicate_effects: u64,
    /// A session's commands completed out of acceptance order.
    pub order_violations: u64,
    /// Commands not terminal by the settle deadline.
    pub stuck: u64,
    /// Sessions whose final state in the database disagrees with their process.
    pub state_mismatches: u64,
}

impl Counters {
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.unexpected == 0
            && self.duplicate_effects == 0
            && self.order_violations == 0
            && self.stuck == 0
            && self.state_mismatches == 0
    }
}

/// One command as the database has it.
#[derive(Clone, Debug, sqlx::FromRow, Serialize)]
pub struct CommandRow {
    pub command_id: String,
    pub session_id: Option<String>,
    pub agent_id: String,
    pub action: String,
    pub status: String,
    pub seq: i64,
    pub attempts: i32,
    pub error_message: Option<String>,
}

/// One line of an agent's `executions.log`.
#[derive(Clone, Debug, Serialize)]
pub struct Execution {
    pub at_ms: i64,
    pub command_id: String,
    pub session_id: String,
    pub action: String,
    pub outcome: String,
}

/// One line of an agent's effect journal.
#[derive(Clone, Debug, Serialize)]
pub struct Effect {
    pub at_ms: i64,
    pub effect: String,
    pub session_id: String,
    pub detail: String,
}

/// Everything the checker read, kept for printing a session's history.
#[derive(Debug, Default)]
pub struct Evidence {
    pub commands: Vec<CommandRow>,
    pub sessions: HashMap<String, (String, String)>,
    pub executions: Vec<Execution>,
    pub effects: Vec<Effect>,
    /// Sessions a counter other than the allowed ones points at, with why.
    pub suspects: BTreeMap<String, Vec<String>>,
}

fn terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// Reads the database and the agents' logs and counts. `state_dirs`: each agent's
/// state directory, by agent id.
pub async fn check(
    pool: &PgPool,
    records: &[Record],
    state_dirs: &HashMap<String, PathBuf>,
) -> anyhow::Result<(Counters, Evidence)> {
    let mut c = Counters::default();
    let mut ev = Evidence {
        commands: sqlx::query_as(
            "SELECT command_id, session_id, agent_id, action, status, seq, attempts, error_message \
             FROM agent_commands ORDER BY seq",
        )
        .fetch_all(pool)
        .await?,
        ..Evidence::default()
    };
    let sessions: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id, state, agent_id FROM sessions")
            .fetch_all(pool)
            .await?;
    ev.sessions = sessions
        .into_iter()
        .map(|(id, state, agent)| (id, (state, agent)))
        .collect();
    let keys: HashSet<(String, String)> = sqlx::query_as::<_, (String, String)>(
        "SELECT user_id, idempotency_key FROM api_idempotency",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for dir in state_dirs.values() {
        ev.executions.extend(read_executions(dir));
        ev.effects.extend(read_effects(dir));
    }
    let by_id: HashMap<&str, &CommandRow> = ev
        .commands
        .iter()
        .map(|r| (r.command_id.as_str(), r))
        .collect();

    // Requests.
    let mut suspects: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut flag = |session: &str, why: String| {
        suspects.entry(session.to_owned()).or_default().push(why);
    };
    for r in records {
        match &r.outcome {
            Outcome::Ok { command_id } => {
                c.ok += 1;
                if r.recovered {
                    c.recovered += 1;
                }
                let mut ids = vec![command_id.as_str()];
                if let Some(cancelled) = &r.cancelled_command_id {
                    ids.push(cancelled);
                }
                for id in ids.into_iter().filter(|id| !id.is_empty()) {
                    match by_id.get(id) {
                        Some(row) if terminal(&row.status) => {}
                        Some(row) => {
                            c.lost += 1;
                            flag(
                                &r.session_id,
                                format!("{id} accepted, still {}", row.status),
                            );
                        }
                        None => {
                            c.lost += 1;
                            flag(&r.session_id, format!("{id} accepted, not in the database"));
                        }
                    }
                }
            }
            Outcome::Fail { .. } => c.fail += 1,
            Outcome::Info { .. } => {
                // The gateway stores the answer under the key in the transaction that
                // commits the command: present means committed (its command is held to
                // the same standard by `stuck`), absent means provably never committed.
                c.info += 1;
                if keys.contains(&(r.user.clone(), r.idempotency_key.clone())) {
                    c.recovered += 1;
                }
            }
        }
    }

    for row in &ev.commands {
        if !terminal(&row.status) {
            c.stuck += 1;
            flag(
                row.session_id.as_deref().unwrap_or("-"),
                format!("{} {} stuck {}", row.command_id, row.action, row.status),
            );
        }
    }

    // Executions.
    let mut runs: HashMap<&str, u64> = HashMap::new();
    for e in &ev.executions {
        *runs.entry(e.command_id.as_str()).or_default() += 1;
        if !by_id.contains_key(e.command_id.as_str()) {
            c.unexpected += 1;
            flag(
                &e.session_id,
                format!("{} executed, never accepted", e.command_id),
            );
        }
    }
    c.duplicate_deliveries = runs.values().map(|n| n.saturating_sub(1)).sum();

    // Order: per session, first completion of each command, in time order, must follow
    // the acceptance order (seq).
    let mut completions: BTreeMap<&str, Vec<(i64, i64, &str)>> = BTreeMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for e in &ev.executions {
        if e.outcome != "completed" || !seen.insert(e.command_id.as_str()) {
            continue;
        }
        if let Some(row) = by_id.get(e.command_id.as_str()) {
            completions.entry(e.session_id.as_str()).or_default().push((
                e.at_ms,
                row.seq,
                e.command_id.as_str(),
            ));
        }
    }
    for (session, mut list) in completions {
        list.sort();
        for w in list.windows(2) {
            if w[1].1 < w[0].1 {
                c.order_violations += 1;
                flag(session, format!("{} completed before {}", w[0].2, w[1].2));
            }
        }
    }

    // Effects: never more than the session's completed commands explain.
    let mut completed: HashMap<(&str, &str), u64> = HashMap::new();
    for row in &ev.commands {
        if row.status == "completed"
            && let Some(s) = &row.session_id
        {
            *completed
                .entry((s.as_str(), row.action.as_str()))
                .or_default() += 1;
        }
    }
    let mut effects: HashMap<(&str, &str), u64> = HashMap::new();
    for e in &ev.effects {
        *effects
            .entry((e.session_id.as_str(), e.effect.as_str()))
            .or_default() += 1;
    }
    // A start interrupted by an agent crash is undone by the next agent process (it kills
    // the half-started session, `reason=abandoned-start`) before anyone was told of it;
    // the redelivered start then runs cleanly. That spawn and its kill cancel out.
    for e in &ev.effects {
        if e.effect == "kill" && e.detail.contains("reason=abandoned-start") {
            for kind in ["spawn", "kill"] {
                if let Some(n) = effects.get_mut(&(e.session_id.as_str(), kind)) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }
    for ((session, effect), n) in &effects {
        let allowed = match *effect {
            "spawn" | "kill" => 1,
            "sigstop" => completed
                .get(&(*session, "hibernate_session"))
                .copied()
                .unwrap_or(0),
            "sigcont" => completed
                .get(&(*session, "wake_session"))
                .copied()
                .unwrap_or(0),
            _ => u64::MAX,
        };
        if *n > allowed {
            c.duplicate_effects += n - allowed;
            flag(
                session,
                format!("{n} × {effect}, at most {allowed} explained"),
            );
        }
    }

    // Final states against the runtimes.
    for (session, (state, agent)) in &ev.sessions {
        let Some(dir) = state_dirs.get(agent) else {
            continue;
        };
        let process = process_state(dir, session);
        let agrees = match state.as_str() {
            "terminated" | "failed" => process == Process::Gone,
            "running" => process == Process::Running,
            "hibernated" => process == Process::Frozen,
            _ => false,
        };
        if !agrees {
            c.state_mismatches += 1;
            flag(
                session,
                format!("database says {state}, runtime has {process:?}"),
            );
        }
    }
    ev.suspects = suspects;
    Ok((c, ev))
}

impl Evidence {
    /// Everything known about one session, in order: for a failing run's report.
    pub fn history_of(&self, session: &str, records: &[Record]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in records.iter().filter(|r| r.session_id == session) {
            out.push(format!(
                "t={}ms request {:?} via {} → {:?} (tries {})",
                r.at_ms, r.op, r.transport, r.outcome, r.tries
            ));
        }
        for row in self
            .commands
            .iter()
            .filter(|row| row.session_id.as_deref() == Some(session))
        {
            out.push(format!(
                "seq {} {} {} {} attempts {} {}",
                row.seq,
                row.command_id,
                row.action,
                row.status,
                row.attempts,
                row.error_message.as_deref().unwrap_or("")
            ));
        }
        for e in self.executions.iter().filter(|e| e.session_id == session) {
            out.push(format!(
                "t={} executed {} {} → {}",
                e.at_ms, e.command_id, e.action, e.outcome
            ));
        }
        for e in self.effects.iter().filter(|e| e.session_id == session) {
            out.push(format!("t={} effect {} {}", e.at_ms, e.effect, e.detail));
        }
        if let Some((state, agent)) = self.sessions.get(session) {
            out.push(format!("final: {state} on {agent}"));
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Process {
    Gone,
    Running,
    Frozen,
}

/// What the process runtime has for `session`: its record's process group leader, alive
/// and running, frozen (SIGSTOP), or gone.
fn process_state(state_dir: &Path, session: &str) -> Process {
    let record = state_dir.join("sessions").join(format!("{session}.json"));
    let Some(pid) = std::fs::read_to_string(record)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["pid"].as_i64())
    else {
        return Process::Gone;
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Process::Gone;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    match state {
        None | Some('Z' | 'X') => Process::Gone,
        Some('T' | 't') => Process::Frozen,
        Some(_) => Process::Running,
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn read_executions(state_dir: &Path) -> Vec<Execution> {
    lines(&state_dir.join("executions.log"))
        .iter()
        .filter_map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            Some(Execution {
                at_ms: p.first()?.parse().ok()?,
                command_id: (*p.get(1)?).to_owned(),
                session_id: (*p.get(2)?).to_owned(),
                action: (*p.get(3)?).to_owned(),
                outcome: (*p.get(4)?).to_owned(),
            })
        })
        .collect()
}

fn read_effects(state_dir: &Path) -> Vec<Effect> {
    lines(&state_dir.join("journal.log"))
        .iter()
        .filter_map(|l| {
            let p: Vec<&str> = l.splitn(4, ' ').collect();
            Some(Effect {
                at_ms: p.first()?.parse().ok()?,
                effect: (*p.get(1)?).to_owned(),
                session_id: (*p.get(2)?).to_owned(),
                detail: p.get(3).map(|d| (*d).to_owned()).unwrap_or_default(),
            })
        })
        .collect()
}
