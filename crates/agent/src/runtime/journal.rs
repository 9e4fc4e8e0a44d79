//! The effect journal: one line per real effect a runtime had on the machine, appended to
//! `<state_dir>/journal.log` as `<unix_ms> <effect> <session_id> <detail>`.
//!
//! It exists so that end-to-end tests (and operators) can count effects from outside the
//! agent process: "a redelivered command never doubles an effect" is proved by counting
//! `spawn` lines, across agent restarts. Lines are written with one `write` call each on
//! an `O_APPEND` file, so concurrent writers never interleave within a line.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// File name of the journal inside the runtime's state directory.
pub const JOURNAL_FILE: &str = "journal.log";

/// A real effect on the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    /// A session process was started.
    Spawn,
    /// A session's process group was signalled to terminate (stop, or clean-up of a
    /// session that failed to start or died).
    Kill,
    /// A session's process group was frozen (hibernate).
    Sigstop,
    /// A session's process group was resumed (wake).
    Sigcont,
}

impl Effect {
    pub const ALL: [Effect; 4] = [
        Effect::Spawn,
        Effect::Kill,
        Effect::Sigstop,
        Effect::Sigcont,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Spawn => "spawn",
            Effect::Kill => "kill",
            Effect::Sigstop => "sigstop",
            Effect::Sigcont => "sigcont",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many effects of each kind this process has had (since the runtime was opened).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    pub spawn: u64,
    pub kill: u64,
    pub sigstop: u64,
    pub sigcont: u64,
}

/// The appending side, with in-process counters next to the file.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    counts: [AtomicU64; 4],
}

impl Journal {
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(JOURNAL_FILE);
        crate::private_fs::create_dir(state_dir)?;
        let file = crate::private_fs::append(&path)?;
        Ok(Self {
            path,
            file: Mutex::new(file),
            counts: Default::default(),
        })
    }

    /// Records an effect that already happened. A journal that cannot be written is
    /// logged, not returned: the effect took place, and failing the operation would make
    /// the dispatcher believe otherwise.
    pub fn record(&self, effect: Effect, session_id: &str, detail: &str) {
        self.counts[effect.index()].fetch_add(1, Ordering::Relaxed);
        let line = format!("{} {effect} {session_id} {detail}\n", unix_ms());
        // A poisoned lock only means another writer panicked mid-call; the file is fine.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(path = %self.path.display(), error = %e, %effect, session_id, "cannot append to the effect journal");
        }
    }

    pub fn effects(&self) -> Effects {
        let get = |e: Effect| self.counts[e.index()].load(Ordering::Relaxed);
        Effects {
            spawn: get(Effect::Spawn),
            kill: get(Effect::Kill),
            sigstop: get(Effect::Sigstop),
            sigcont: get(Effect::Sigcont),
        }
    }
}

/// One parsed journal line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub unix_ms: i64,
    pub effect: String,
    pub session_id: String,
    pub detail: String,
}

/// Reads the journal of `state_dir` (empty when there is none yet). Lines that do not
/// parse are skipped: the journal is evidence, not configuration.
pub fn read(state_dir: &Path) -> io::Result<Vec<JournalEntry>> {
    let file = match File::open(state_dir.join(JOURNAL_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut entries = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let mut parts = line.splitn(4, ' ');
        let (Some(ms), Some(effect), Some(session)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(unix_ms) = ms.parse() else { continue };
        entries.push(JournalEntry {
            unix_ms,
            effect: effect.to_owned(),
            session_id: session.to_owned(),
            detail: parts.next().unwrap_or_default().to_owned(),
        });
    }
    Ok(entries)
}

/// How many `effect` lines the journal of `state_dir` holds for `session_id`.
pub fn count(state_dir: &Path, effect: Effect, session_id: &str) -> io::Result<usize> {
    Ok(read(state_dir)?
        .iter()
        .filter(|e| e.effect == effect.as_str() && e.session_id == session_id)
        .count())
}

pub(crate) fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.record(Effect::Spawn, "s1", "pid=1 port=2");
        journal.record(Effect::Spawn, "s2", "pid=3 port=4");
        journal.record(Effect::Kill, "s1", "pgid=1");
        let entries = read(dir.path()).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].detail, "pid=1 port=2");
        assert_eq!(count(dir.path(), Effect::Spawn, "s1").unwrap(), 1);
        assert_eq!(journal.effects().spawn, 2);
        assert_eq!(journal.effects().kill, 1);
    }
}
