//! The StreamSpace API gateway.
//! Its delivery path lands with the delivery-path issue.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the api-gateway is not implemented yet (see the delivery-path issue)")
}
