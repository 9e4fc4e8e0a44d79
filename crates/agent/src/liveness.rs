//! The agent's liveness: while its runtime turns, a task rewrites `state_dir/alive` every
//! [`ALIVE_INTERVAL`]; `streamspace-agent alive` (the Kubernetes liveness probe) fails when
//! that file is missing or older than a bound. A wedged agent — its async runtime no longer
//! running tasks — stops rewriting it and is restarted; an agent that merely cannot reach
//! the dispatcher keeps it fresh (restarting it would not help).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the file is rewritten, unless `liveness_interval_ms` says otherwise.
pub const ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// The probe's default bound: six missed rewrites.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

/// The file under `state_dir`.
pub fn alive_file(state_dir: &Path) -> PathBuf {
    state_dir.join("alive")
}

/// Rewrites the file every `interval`, forever (the caller aborts the task).
pub async fn keep_alive(state_dir: PathBuf, interval: Duration) {
    let path = alive_file(&state_dir);
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        if let Err(e) = tokio::fs::write(&path, format!("{now}\n")).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the liveness file");
        }
    }
}

/// How old the file is, or why the agent does not count as alive.
pub fn check(state_dir: &Path, max_age: Duration) -> Result<Duration, String> {
    let path = alive_file(state_dir);
    let modified = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(|e| {
            format!(
                "{}: {e} (is the agent running with this state_dir?)",
                path.display()
            )
        })?;
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or(Duration::ZERO);
    if age > max_age {
        return Err(format!(
            "{} was last written {}s ago (more than {}s): the agent is not running its tasks",
            path.display(),
            age.as_secs(),
            max_age.as_secs()
        ));
    }
    Ok(age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_is_kept_fresh_and_checked_against_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let err = check(dir.path(), DEFAULT_MAX_AGE).unwrap_err();
        assert!(err.contains("alive"), "{err}");
        let task = tokio::spawn(keep_alive(dir.path().to_owned(), ALIVE_INTERVAL));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while check(dir.path(), DEFAULT_MAX_AGE).is_err() {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        // Older than a zero bound as soon as any time passes.
        std::thread::sleep(Duration::from_millis(5));
        assert!(check(dir.path(), Duration::ZERO).is_err());
    }
}
