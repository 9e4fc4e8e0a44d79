//! Watches: one `LISTEN` connection per gateway ([`ChangeHub`]) fans change notifications
//! out to the watchers of each session or command, which turn them into events.
//!
//! A watcher subscribes before it reads, reads the row with the snapshot it was read in,
//! and then reports every notified change that snapshot does not already contain, in
//! commit order. After the listener reconnects (notifications may have been lost) every
//! watcher re-reads and reports the state if it moved.
//!
//! One notified change costs one database read however many watch that row: the hub hands
//! every subscriber of it the same [`SharedRead`], which the first watcher to need it
//! fills and the others wait for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use streamspace_core::CommandId;
use streamspace_core::api::{Change, ChangeListener, ChangeNote, Snapshot, sessions};
use streamspace_core::queue::CommandQueue;
use tokio::sync::{mpsc, watch};

use crate::error::ApiError;
use crate::service::views::{CommandEventView, CommandView, SessionEventView, SessionView};

/// Events buffered per watch before the watcher waits for its client.
const WATCH_BUFFER: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Session(String),
    Command(String),
}

/// A row read once for one notified change, shared by every watcher of that row.
#[derive(Clone, Debug)]
enum Row {
    Session(streamspace_core::api::SessionRecord),
    Command(streamspace_core::queue::CommandRecord),
}

/// The read of one change: done by whichever watcher gets to it first.
type SharedRead = Arc<tokio::sync::OnceCell<Result<Option<Row>, String>>>;

#[derive(Clone, Debug)]
enum Signal {
    Note(ChangeNote, SharedRead),
    Resync,
}

/// Each watched row's subscribers, by subscription id.
type Subscribers = HashMap<Key, Vec<(u64, mpsc::UnboundedSender<Signal>)>>;

/// Routes change notifications to the subscriptions of the row they concern.
#[derive(Debug, Default)]
pub struct ChangeHub {
    subscribers: Mutex<Subscribers>,
    next_id: AtomicU64,
    /// Open watches per user.
    open: Mutex<HashMap<String, u32>>,
    /// Rows read for notified changes (one per change, not per watcher).
    reads: AtomicU64,
}

/// One open watch of a user; dropping it (the watch ended) gives the place back.
#[derive(Debug)]
pub struct WatchPermit {
    hub: Arc<ChangeHub>,
    user_id: String,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        let mut open = self.hub.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user_id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// A live subscription; dropping it unsubscribes.
#[derive(Debug)]
struct Subscription {
    hub: Arc<ChangeHub>,
    key: Key,
    id: u64,
    rx: mpsc::UnboundedReceiver<Signal>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self.hub.lock();
        if let Some(list) = subs.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                subs.remove(&self.key);
            }
        }
    }
}

impl ChangeHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        // A poisoned map is still a consistent map: entries are only pushed or removed.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more watch of `user_id`, or 429 when the user already holds `max`
    /// (0: no limit).
    pub fn admit_watch(self: &Arc<Self>, user_id: &str, max: u32) -> Result<WatchPermit, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user_id.to_owned()).or_default();
        if max > 0 && *n >= max {
            if *n == 0 {
                open.remove(user_id);
            }
            return Err(ApiError::QuotaExceeded(format!(
                "this user already holds {max} open watches on this gateway (limits.max_watches_per_user); close one first"
            )));
        }
        *n += 1;
        Ok(WatchPermit {
            hub: self.clone(),
            user_id: user_id.to_owned(),
        })
    }

    /// Database reads made for notified changes since start.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Reads the changed row once for all its watchers: the first caller runs `read`, the
    /// others wait for its result.
    async fn read_once<F, Fut>(&self, shared: &SharedRead, read: F) -> Result<Option<Row>, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = streamspace_core::Result<Option<Row>>>,
    {
        shared
            .get_or_init(|| async {
                self.reads.fetch_add(1, Ordering::Relaxed);
                read().await.map_err(|e| e.to_string())
            })
            .await
            .clone()
    }

    /// Open watches of `user_id` (for tests and metrics).
    pub fn open_watches(&self, user_id: &str) -> u32 {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(user_id).copied().unwrap_or(0)
    }

    fn subscribe(self: &Arc<Self>, key: Key) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().entry(key.clone()).or_default().push((id, tx));
        Subscription {
            hub: self.clone(),
            key,
            id,
            rx,
        }
    }

    fn dispatch(&self, change: Change) {
        let subs = self.lock();
        match change {
            Change::Session(note) => send(&subs, &Key::Session(note.id.clone()), note),
            Change::Command(note) => send(&subs, &Key::Command(note.id.clone()), note),
            Change::Resync => {
                for list in subs.values() {
                    for (_, tx) in list {
                        let _ = tx.send(Signal::Resync);
                    }
                }
            }
        }
    }

    /// Listens until `shutdown` flips. Runs as one background task per gateway.
    pub async fn run(self: Arc<Self>, pool: PgPool, mut shutdown: watch::Receiver<bool>) {
        let mut listener = ChangeListener::new(pool);
        loop {
            tokio::select! {
                change = listener.recv() => self.dispatch(change),
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

fn send(subs: &Subscribers, key: &Key, note: ChangeNote) {
    if let Some(list) = subs.get(key) {
        let read = SharedRead::default();
        for (_, tx) in list {
            let _ = tx.send(Signal::Note(note.clone(), read.clone()));
        }
    }
}

/// A shared read that failed, as the watch's last event.
fn read_failed(what: &str, e: String) -> ApiError {
    ApiError::Unavailable {
        message: format!("reading the {what} after a change failed ({e}); watch again"),
        retry_after: None,
    }
}

fn session_terminal(state: &str) -> bool {
    state == "terminated"
}

fn command_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// Starts a session watch; `None` when the session is not the user's.
pub async fn watch_session(
    hub: Arc<ChangeHub>,
    pool: PgPool,
    user_id: String,
    id: String,
    mut shutdown: watch::Receiver<bool>,
    permit: WatchPermit,
) -> streamspace_core::Result<Option<mpsc::Receiver<Result<SessionEventView, ApiError>>>> {
    let mut sub = hub.subscribe(Key::Session(id.clone()));
    let Some((record, mut snapshot)) = sessions::session_get_snapshot(&pool, &user_id, &id).await?
    else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let mut last = record.state.clone();
        let first = SessionEventView {
            state: record.state.clone(),
            session: SessionView::from(record),
        };
        if tx.send(Ok(first)).await.is_err() || session_terminal(&last) {
            return;
        }
        loop {
            let signal = tokio::select! {
                s = sub.rx.recv() => s,
                _ = shutdown.wait_for(|s| *s) => None,
                _ = tx.closed() => None,
            };
            let event = match signal {
                None => return,
                Some(Signal::Note(note, _)) if snapshot.contains(note.xid) => continue,
                Some(Signal::Note(note, read)) => {
                    let row = hub
                        .read_once(&read, || async {
                            Ok(sessions::session_get(&pool, &user_id, &id)
                                .await?
                                .map(Row::Session))
                        })
                        .await;
                    match row {
                        Ok(Some(Row::Session(r))) => Ok(SessionEventView {
                            state: note.state,
                            session: SessionView::from(r),
                        }),
                        Ok(_) => return,
                        Err(e) => Err(read_failed("session", e)),
                    }
                }
                Some(Signal::Resync) => {
                    match sessions::session_get_snapshot(&pool, &user_id, &id).await {
                        Ok(Some((r, s))) => {
                            snapshot = s;
                            if r.state == last {
                                continue;
                            }
                            Ok(SessionEventView {
                                state: r.state.clone(),
                                session: SessionView::from(r),
                            })
                        }
                        Ok(None) => return,
                        Err(e) => Err(ApiError::from(e)),
                    }
                }
            };
            let done = match &event {
                Ok(e) => {
                    last = e.state.clone();
                    session_terminal(&last)
                }
                Err(_) => true,
            };
            if tx.send(event).await.is_err() || done {
                return;
            }
        }
    });
    Ok(Some(rx))
}

/// Starts a command watch (visibility is checked by the caller); `None` when the command
/// does not exist.
pub async fn watch_command(
    hub: Arc<ChangeHub>,
    pool: PgPool,
    id: CommandId,
    mut shutdown: watch::Receiver<bool>,
    permit: WatchPermit,
) -> streamspace_core::Result<Option<mpsc::Receiver<Result<CommandEventView, ApiError>>>> {
    let mut sub = hub.subscribe(Key::Command(id.to_string()));
    let Some((record, mut snapshot)) = sessions::command_get_snapshot(&pool, &id).await? else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        let mut last = record.status.clone();
        let first = CommandEventView {
            status: record.status.clone(),
            command: CommandView::from(record),
        };
        if tx.send(Ok(first)).await.is_err() || command_terminal(&last) {
            return;
        }
        loop {
            let signal = tokio::select! {
                s = sub.rx.recv() => s,
                _ = shutdown.wait_for(|s| *s) => None,
                _ = tx.closed() => None,
            };
            let event = match signal {
                None => return,
                Some(Signal::Note(note, _)) if snapshot.contains(note.xid) => continue,
                Some(Signal::Note(note, read)) => {
                    let row = hub
                        .read_once(&read, || async {
                            Ok(CommandQueue::command_get(&pool, &id)
                                .await?
                                .map(Row::Command))
                        })
                        .await;
                    match row {
                        Ok(Some(Row::Command(r))) => Ok(CommandEventView {
                            status: note.state,
                            command: CommandView::from(r),
                        }),
                        Ok(_) => return,
                        Err(e) => Err(read_failed("command", e)),
                    }
                }
                Some(Signal::Resync) => match resync_command(&pool, &id, &mut snapshot).await {
                    Ok(Some(r)) if r.status == last => continue,
                    Ok(Some(r)) => Ok(CommandEventView {
                        status: r.status.clone(),
                        command: CommandView::from(r),
                    }),
                    Ok(None) => return,
                    Err(e) => Err(ApiError::from(e)),
                },
            };
            let done = match &event {
                Ok(e) => {
                    last = e.status.clone();
                    command_terminal(&last)
                }
                Err(_) => true,
            };
            if tx.send(event).await.is_err() || done {
                return;
            }
        }
    });
    Ok(Some(rx))
}

async fn resync_command(
    pool: &PgPool,
    id: &CommandId,
    snapshot: &mut Snapshot,
) -> streamspace_core::Result<Option<streamspace_core::queue::CommandRecord>> {
    Ok(sessions::command_get_snapshot(pool, id)
        .await?
        .map(|(r, s)| {
            *snapshot = s;
            r
        }))
}
