//! Wake-ups: `LISTEN` on the queue's channel. A hint only — notifications are lost while
//! the listener reconnects — so callers also poll, and sweep everything after a reconnect
//! ([`Wakeup::Resync`]).

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::NOTIFY_CHANNEL;
use crate::error::Result;

/// What a listener learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// New work for this agent was committed.
    Agent(String),
    /// The listener (re)connected: anything may have been missed.
    Resync,
}

/// A `LISTEN` connection on the queue's channel that reconnects by itself.
#[derive(Debug)]
pub struct CommandListener {
    pool: PgPool,
    listener: Option<PgListener>,
}

impl CommandListener {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            listener: None,
        }
    }

    /// The next wake-up. Never fails: connection problems are logged, retried after a
    /// short pause, and reported as [`Wakeup::Resync`] once listening again.
    pub async fn recv(&mut self) -> Wakeup {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.connect().await {
                    Ok(l) => {
                        self.listener = Some(l);
                        return Wakeup::Resync;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "command listener cannot connect; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            };
            match listener.try_recv().await {
                Ok(Some(n)) => return Wakeup::Agent(n.payload().to_owned()),
                // The connection dropped; notifications may have been lost meanwhile.
                Ok(None) => return Wakeup::Resync,
                Err(e) => {
                    tracing::warn!(error = %e, "command listener lost its connection");
                    self.listener = None;
                }
            }
        }
    }

    async fn connect(&self) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }
}
