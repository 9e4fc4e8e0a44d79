//! Drives the stand-in API server with the unmodified kube-rs client, through a
//! kubeconfig, exactly as the agent's Kubernetes runtime will.

mod apply;
mod crud;
mod deploy;
mod deploy_observability;
mod helpers;
mod kubelet;
mod process;
mod propagation;
mod quota;
mod rollout;
mod throttle;
mod volumes;
mod watch;
