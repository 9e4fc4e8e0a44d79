//! Change notifications for watches: `LISTEN` on the session and command channels that
//! migration 3's triggers notify on every state change.
//!
//! Each notification carries the row id, its new state and the id of the transaction
//! that made the change. A watcher first reads the row together with the database
//! [`Snapshot`] it read in, then applies only notifications the snapshot does not already
//! contain, so it never reports a state older than the one it started from. Postgres
//! delivers notifications in commit order, so a watcher sees every change in order.
//! Notifications are lost while the listener reconnects: it then reports
//! [`Change::Resync`], and watchers re-read.

use std::time::Duration;

use sqlx::PgConnection;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::error::{Error, Result};

/// Channel of session state changes (migration 3).
pub const SESSION_CHANNEL: &str = "streamspace_session_changes";
/// Channel of command status changes (migration 3).
pub const COMMAND_CHANNEL: &str = "streamspace_command_changes";

/// One notified change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeNote {
    pub id: String,
    /// The new session state or command status.
    pub state: String,
    /// The transaction that made the change.
    pub xid: u64,
}

impl ChangeNote {
    fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.split(' ');
        let id = parts.next()?.to_owned();
        let state = parts.next()?.to_owned();
        let xid = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Self { id, state, xid })
    }
}

/// What the listener learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Session(ChangeNote),
    Command(ChangeNote),
    /// The listener (re)connected: changes may have been missed; re-read.
    Resync,
}

/// A `LISTEN` connection on both change channels that reconnects by itself.
#[derive(Debug)]
pub struct ChangeListener {
    pool: PgPool,
    listener: Option<PgListener>,
}

impl ChangeListener {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            listener: None,
        }
    }

    /// The next change. Never fails: connection problems are logged, retried after a short
    /// pause and reported as [`Change::Resync`] once listening again.
    pub async fn recv(&mut self) -> Change {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.connect().await {
                    Ok(l) => {
                        self.listener = Some(l);
                        return Change::Resync;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change listener cannot connect; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            };
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let Some(note) = ChangeNote::parse(n.payload()) else {
                        tracing::warn!(payload = n.payload(), "malformed change notification");
                        continue;
                    };
                    return match n.channel() {
                        SESSION_CHANNEL => Change::Session(note),
                        _ => Change::Command(note),
                    };
                }
                // The connection dropped and was re-established; changes may be lost.
                Ok(None) => return Change::Resync,
                Err(e) => {
                    tracing::warn!(error = %e, "change listener lost its connection");
                    self.listener = None;
                }
            }
        }
    }

    async fn connect(&self) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener
            .listen_all([SESSION_CHANNEL, COMMAND_CHANNEL])
            .await?;
        Ok(listener)
    }
}

/// A database snapshot (`pg_current_snapshot()`): which transactions a read could see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Snapshot {
    /// The snapshot of the current statement (of the transaction, at REPEATABLE READ).
    pub async fn current(conn: &mut PgConnection) -> Result<Self> {
        let text = sqlx::query_scalar!(r#"SELECT pg_current_snapshot()::text AS "snapshot!""#)
            .fetch_one(&mut *conn)
            .await?;
        text.parse()
    }

    /// Whether the committed transaction `xid` is visible in this snapshot, i.e. a read in
    /// the snapshot already reflects its changes.
    pub fn contains(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

impl std::str::FromStr for Snapshot {
    type Err = Error;

    /// Parses Postgres' `xmin:xmax:xip,xip,…` text form.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidInput(format!("malformed snapshot {s:?}"));
        let mut parts = s.split(':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let in_progress = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().map_err(|_| bad()))
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            xmin,
            xmax,
            in_progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_parse_and_judge_visibility() {
        let s: Snapshot = "10:20:12,15".parse().unwrap();
        assert!(s.contains(9), "committed before the snapshot");
        assert!(s.contains(11), "committed between xmin and xmax");
        assert!(!s.contains(12), "in progress at the snapshot");
        assert!(!s.contains(20), "started after the snapshot");
        let s: Snapshot = "7:7:".parse().unwrap();
        assert!(s.contains(6) && !s.contains(7));
        assert!("7".parse::<Snapshot>().is_err());
        assert!("a:b:".parse::<Snapshot>().is_err());
    }

    #[test]
    fn notes_parse() {
        assert_eq!(
            ChangeNote::parse("cmd-1 sent 42"),
            Some(ChangeNote {
                id: "cmd-1".into(),
                state: "sent".into(),
                xid: 42
            })
        );
        assert_eq!(ChangeNote::parse("cmd-1 sent"), None);
        assert_eq!(ChangeNote::parse("cmd-1 sent x"), None);
    }
}
