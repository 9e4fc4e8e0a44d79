//! Generated protobuf and gRPC code for StreamSpace's protocols, shared by every service
//! so there is one copy. `streamspace-core` does not depend on it.
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations, clippy::all)]

/// The codec of every generated service and client: prost's, with smaller starting
/// buffers. tonic starts each call's encode and decode buffers at 8 KiB; a dispatcher
/// holds one long-lived call per agent, so with 10,000 agents that was 160 MB of buffers
/// that messages of a few hundred bytes never fill (heaptrack, `docs/performance.md`).
/// Buffers still grow to whatever a message needs.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// The starting size of a call's encode and decode buffers.
    pub const BUFFER_BYTES: usize = 1024;
    /// tonic's default: an encoder yields after this many buffered bytes.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// [`tonic_prost::ProstCodec`] with [`BUFFER_BYTES`] starting buffers.
    #[derive(Debug, Clone, Copy)]
    pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
        }
    }
}

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
