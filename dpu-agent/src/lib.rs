//! `dpu-agent`: DNE, the network engine on the BlueField's Arm cores (or on the
//! host CPU in host mode). It owns every RDMA resource, imports each tenant's
//! host pool, forwards descriptors between nodes with two-sided sends straight
//! from host memory, delivers what arrives to local functions, and keeps
//! tenants fair and isolated (DESIGN.md sections 1-6).
//!
//! Modules:
//! * [`cli`]: the command line of the `dpu-agent` binary.
//!
//! The engine (config, engine loop, routing, scheduling, host link, metrics)
//! is being built in its own issue (dpu-agent).
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod demo;
pub mod engine;
pub mod metrics;
pub mod sched;
