//! The delivery path against real PostgreSQL and real gRPC over loopback sockets: the
//! dispatcher runs in-process (one fresh database per test); agents are the real agent
//! library or, for protocol edge cases, a raw client speaking the protocol.

mod binary;
mod faults;
mod helpers;
mod pipeline;
mod protocol;
mod tls;
