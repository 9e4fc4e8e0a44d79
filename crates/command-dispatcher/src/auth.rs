//! Agent authentication: a per-agent bearer credential in the `authorization` metadata.
//! The agent's identity comes from the credential only, never from a message field.

use streamspace_core::agents::{self, AgentIdentity};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::Shared;

/// The agent a request's credential proves, or `UNAUTHENTICATED` with a reason that
/// does not reveal whether a credential exists.
pub async fn authenticate(
    shared: &Shared,
    metadata: &MetadataMap,
) -> Result<AgentIdentity, Status> {
    let header = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated("missing `authorization: Bearer <agent credential>` metadata")
    })?;
    let value = header
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not valid ASCII"))?;
    let token = value.strip_prefix("Bearer ").ok_or_else(|| {
        Status::unauthenticated("authorization metadata must be `Bearer <agent credential>`")
    })?;
    match agents::agent_authenticate(shared.queue.pool(), token.trim()).await {
        Ok(Some(identity)) => Ok(identity),
        Ok(None) => Err(Status::unauthenticated(
            "unknown or revoked agent credential",
        )),
        Err(e) => {
            tracing::error!(error = %e, "credential check failed");
            Err(Status::unavailable(
                "cannot verify credentials right now; retry",
            ))
        }
    }
}
