//! The connections this replica holds, by agent: used to wake a connection's delivery
//! loop and to fence an older connection of the same agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

/// Handle on one live connection.
#[derive(Debug, Clone)]
pub struct ConnectionHandle {
    pub epoch: i64,
    /// Wakes the delivery loop: new work may be claimable.
    pub wake: Arc<Notify>,
    /// Set to `true` to make the connection close itself (it was superseded).
    pub close: watch::Sender<bool>,
}

#[derive(Debug, Default)]
pub struct Registry {
    connections: Mutex<HashMap<String, ConnectionHandle>>,
}

impl Registry {
    /// Registers `handle` as the agent's current connection, closing any older one.
    ///
    /// Epochs decide, not arrival order: when this replica already holds a *newer*
    /// connection of the agent (a slow handshake finishing after a redial's), nothing
    /// changes and `Err(newer_epoch)` tells the caller to end itself.
    pub fn register(&self, agent_id: &str, handle: ConnectionHandle) -> Result<(), i64> {
        let mut map = self.lock();
        if let Some(current) = map.get(agent_id)
            && current.epoch > handle.epoch
        {
            return Err(current.epoch);
        }
        let old = map.insert(agent_id.to_owned(), handle);
        drop(map);
        if let Some(old) = old {
            tracing::info!(
                agent_id,
                old_epoch = old.epoch,
                "newer connection supersedes an older one"
            );
            let _ = old.close.send(true);
        }
        Ok(())
    }

    /// Removes the agent's entry only if it is still connection `epoch`: an old
    /// connection's clean-up never removes its successor.
    pub fn unregister(&self, agent_id: &str, epoch: i64) {
        let mut map = self.lock();
        if map.get(agent_id).is_some_and(|h| h.epoch == epoch) {
            map.remove(agent_id);
        }
    }

    pub fn wake(&self, agent_id: &str) {
        if let Some(h) = self.lock().get(agent_id) {
            h.wake.notify_one();
        }
    }

    pub fn wake_all(&self) {
        for h in self.lock().values() {
            h.wake.notify_one();
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectionHandle>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // operation is a single insert/remove/read), so a poisoned lock is still usable.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(epoch: i64) -> (ConnectionHandle, watch::Receiver<bool>) {
        let (close, rx) = watch::channel(false);
        (
            ConnectionHandle {
                epoch,
                wake: Arc::new(Notify::new()),
                close,
            },
            rx,
        )
    }

    #[test]
    fn an_older_connection_never_replaces_a_newer_one() {
        let registry = Registry::default();
        let (new, new_rx) = handle(8);
        registry.register("a", new).unwrap();
        let (old, old_rx) = handle(7);
        assert_eq!(registry.register("a", old), Err(8));
        assert!(!*new_rx.borrow(), "the newer connection stays open");
        assert!(!*old_rx.borrow());
        // The older one's clean-up does not remove the newer entry either.
        registry.unregister("a", 7);
        assert_eq!(registry.len(), 1);

        let (newest, _) = handle(9);
        registry.register("a", newest).unwrap();
        assert!(*new_rx.borrow(), "superseded connection told to close");
    }
}
