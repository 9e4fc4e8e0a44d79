//! The StreamSpace agent: dials the command-dispatcher and runs sessions.
//! Its delivery path lands with the delivery-path issue.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the agent is not implemented yet (see the delivery-path issue)")
}
