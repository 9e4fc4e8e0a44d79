//! Drives the stand-in API server with the unmodified kube-rs client, through a
//! kubeconfig, exactly as the agent's Kubernetes runtime will.

mod crud;
mod deploy;
mod helpers;
mod process;
mod propagation;
mod watch;
