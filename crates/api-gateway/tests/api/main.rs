//! The api-gateway's integration tests: one binary, a fresh database per test, REST
//! through the router without a socket, gRPC over loopback.

mod admin;
mod auth;
mod grpc;
mod helpers;
mod idempotency;
mod jwks;
mod openapi;
mod ratelimit;
mod sessions;
mod startup;
