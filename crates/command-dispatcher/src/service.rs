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
        let outbound = connection::accept(self.shared.clone(), identity, inbound).await?;
        Ok(Response::new(Box::pin(outbound.map(|message| *message))))
    }
}
