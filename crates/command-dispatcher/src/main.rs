//! The StreamSpace command-dispatcher.
//! Its delivery path lands with the delivery-path issue.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the command-dispatcher is not implemented yet (see the delivery-path issue)")
}
