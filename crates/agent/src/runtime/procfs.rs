//! Just enough of Linux `/proc` to tell whether a session's processes live, which state
//! they are in, and whether a recorded pid still belongs to the session (pids are reused).

use std::fs;

/// The fields of `/proc/<pid>/stat` the process runtime needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// `R`, `S`, `D`, `T` (stopped), `t`, `Z` (zombie), `X`, …
    pub state: char,
    pub pgrp: i32,
    /// Start time in clock ticks since boot: with the pid, a process's unique identity.
    pub start_ticks: u64,
}

impl ProcStat {
    /// A zombie or dead entry no longer runs anything; only its parent's wait removes it.
    pub fn is_running_anything(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

pub(crate) fn stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a stat line. The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so the fixed fields are counted from the *last* `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) pgrp(5) … starttime(22); index = field - 3.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// The process's argv, or `None` when it is gone (or a kernel thread).
pub(crate) fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

/// Processes of group `pgid` that still run anything (zombies excluded), with their stat.
pub(crate) fn group_members(pgid: i32) -> Vec<(i32, ProcStat)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, st)| st.pgrp == pgid && st.is_running_anything())
        .collect()
}

/// Live processes (zombies excluded) whose environment has `key=value`, with their stat.
/// Processes of other users are skipped (their environment is unreadable).
pub(crate) fn processes_with_env(key: &str, value: &str) -> Vec<(i32, ProcStat)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted = format!("{key}={value}");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|raw| raw.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
        })
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, st)| st.is_running_anything())
        .collect()
}

/// Whether `pid` is still the process that was recorded: alive, not a zombie, and (when
/// known) started at the recorded time, so a recycled pid is not mistaken for the session.
pub(crate) fn is_same_live_process(pid: i32, start_ticks: Option<u64>) -> bool {
    match stat(pid) {
        Some(st) => st.is_running_anything() && start_ticks.is_none_or(|t| t == st.start_ticks),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_names_with_spaces_and_parens_parse() {
        let line = "4242 (we ird) (name) T 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let st = parse_stat(line).unwrap();
        assert_eq!(st.state, 'T');
        assert_eq!(st.pgrp, 4242);
        assert_eq!(st.start_ticks, 987654);
        assert!(st.is_stopped());
    }

    #[test]
    fn own_process_is_alive_and_has_a_cmdline() {
        let me = std::process::id() as i32;
        let st = stat(me).unwrap();
        assert!(st.is_running_anything());
        assert!(is_same_live_process(me, Some(st.start_ticks)));
        assert!(!is_same_live_process(me, Some(st.start_ticks + 1)));
        assert!(!cmdline(me).unwrap().is_empty());
    }
}
