//! The Sinew node agent as a library: the `mesh-agent` binary is a thin CLI over these modules, and the
//! end-to-end tests use the pure parts (the policy reference evaluator) to compute expected verdicts.
//!
//! `run` loads and attaches the eBPF programs (`ebpf`), reads Kubernetes objects from a source (`source`),
//! computes the desired state as a pure function (`state`), and lets the reconciler write the difference into the
//! pinned maps (`ebpf::reconcile`).

pub mod admin;
pub mod client;
pub mod config;
pub mod crds;
pub mod datapath;
pub mod ebpf;
pub mod enrollment;
pub mod events;
pub mod identity;
pub mod k8s;
mod lenient;
pub mod mesh;
pub mod metrics;
pub mod peerauth;
pub mod podns;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod source;
pub mod state;
pub mod sys;
#[cfg(test)]
mod testing;
