//! Generated protobuf and gRPC code for StreamSpace's protocols, shared by every service
//! so there is one copy. `streamspace-core` does not depend on it.
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations, clippy::all)]

/// The agent protocol (`proto/streamspace/agent/v1/agent.proto`).
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("streamspace.agent.v1");

        /// The protocol version this build speaks.
        pub const PROTOCOL_VERSION: u32 = 1;

        /// Listed in `Hello.capabilities` by an agent that runs pipelined commands (those
        /// with `Command.after_command_id`) strictly after their predecessor, and answers
        /// `NotRun` when that predecessor did not complete. Only such agents get them.
        pub const PIPELINE_CAPABILITY: &str = "pipeline";
    }
}

/// The public API (`proto/streamspace/api/v1/api.proto`), served by the api-gateway.
pub mod api {
    pub mod v1 {
        tonic::include_proto!("streamspace.api.v1");
    }
}

/// Encoded descriptors of every service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("streamspace_descriptor");
