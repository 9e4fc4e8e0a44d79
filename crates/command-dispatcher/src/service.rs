//! The `AgentService` gRPC implementation: authenticates, then hands the stream to a
//! [`crate::connection::Connection`].

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use streamspace_proto::agent::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

use crate::{Shared, auth, connection, tls};

#[derive(Debug)]
pub struct AgentServiceImpl {
    shared: Arc<Shared>,
}

impl AgentServiceImpl {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<pb::DispatcherMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentServiceImpl {
    type ConnectStream = OutboundStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if *self.shared.shutdown.borrow() {
            return Err(Status::unavailable(
                "dispatcher is shutting down; connect elsewhere",
            ));
        }
        if !*self.shared.db_ok.borrow() {
            return Err(Status::unavailable(
                "dispatcher cannot reach its database; connect elsewhere",
            ));
        }
        let identity = auth::authenticate(&self.shared, request.metadata()).await?;
        if self.shared.tls.as_ref().is_some_and(|t| t.mutual()) {
            let certs = request.peer_certs();
            if let Err(status) =
                tls::check_identity(certs.as_deref().map(Vec::as_slice), &identity.agent_id)
            {
                tracing::warn!(agent_id = %identity.agent_id, reason = status.message(), "agent refused: its client certificate does not name it");
                return Err(status);
            }
        }
        let inbound = request.into_inner();
        // The handshake runs as a task of its own. Its first step records the connection
        // in the database; if the agent goes away after that (killed, cut off), the server
        // drops this call's future, and a handshake dropped mid-way could neither finish
        // (and be cleaned up when the stream fails) nor undo the record: the agent stayed
        // recorded as connected to a connection nobody served.
        let mut abandoned = Abandoned {
            shared: &self.shared,
            finished: false,
        };
        let handshake =
            tokio::spawn(connection::accept(self.shared.clone(), identity, inbound)).await;
        abandoned.finished = true;
        let outbound = handshake.map_err(|e| {
            tracing::error!(error = %e, "an agent handshake task failed");
            Status::internal("the handshake failed inside the dispatcher; reconnect")
        })??;
        Ok(Response::new(Box::pin(outbound.map(|message| *message))))
    }
}

/// Counts a `Connect` call dropped before its handshake finished.
struct Abandoned<'a> {
    shared: &'a Shared,
    finished: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.shared
                .stats
                .handshakes_abandoned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
