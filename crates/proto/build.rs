//! Compiles `proto/` with protox (pure Rust: no system `protoc`) and writes the encoded
//! descriptor set for gRPC reflection next to the generated code.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Canonical, so protox can match the files against the include path.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../proto")
        .canonicalize()?;
    let files = [
        "streamspace/agent/v1/agent.proto",
        "streamspace/api/v1/api.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("streamspace_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // `build_transport(false)`: the RPC is named `Connect`, which would clash with the
    // generated `AgentServiceClient::connect` constructor; clients use `new(channel)`.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
