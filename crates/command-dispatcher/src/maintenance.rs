//! Background upkeep of the queue, one named service per job. Both run on every replica;
//! the queue's statements skip rows another replica is working on.

use std::sync::Arc;
use std::time::Duration;

use crate::Shared;

/// Most rows one rescue or prune pass touches.
const BATCH: i64 = 1_000;

/// Returns expired leases (their dispatcher crashed or was cut off) to the queue, and fails
/// commands whose `expires_at` passed before delivery.
#[derive(Debug)]
pub struct LeaseRescuer {
    shared: Arc<Shared>,
    interval: Duration,
}

impl LeaseRescuer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let interval = Duration::from_millis(shared.config.maintenance.rescue_interval_ms.max(10));
        Self { shared, interval }
    }

    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let queue = &self.shared.queue;
            match queue.command_rescue_expired(BATCH).await {
                Ok(r) if !r.requeued.is_empty() => self.shared.registry.wake_all(),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "lease rescue failed"),
            }
            if let Err(e) = queue.command_expire().await {
                tracing::error!(error = %e, "expiring commands failed");
            }
        }
    }
}

/// Deletes terminal commands, then ended sessions without open commands, older than the
/// retention window, in batches.
#[derive(Debug)]
pub struct CommandPruner {
    shared: Arc<Shared>,
    interval: Duration,
    retention: Duration,
}

impl CommandPruner {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = &shared.config.maintenance;
        let interval = Duration::from_millis(m.prune_interval_ms.max(1_000));
        let retention = Duration::from_secs(m.retention_hours * 3600);
        Self {
            shared,
            interval,
            retention,
        }
    }

    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match self.shared.queue.command_prune(self.retention, BATCH).await {
                    Ok(n) if n == BATCH as u64 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "pruning commands failed");
                        break;
                    }
                }
            }
            loop {
                match self.shared.queue.session_prune(self.retention, BATCH).await {
                    Ok(n) if n == BATCH as u64 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "pruning sessions failed");
                        break;
                    }
                }
            }
        }
    }
}
