//! `fabric`: the engine-facing transport of DNE: two-sided sends with a
//! 32-bit immediate, posted receives, completions polled in batches, explicit
//! connections per (tenant, peer), receiver-advertised credits.
//!
//! Backends: `doca` (DOCA RDMA through the `doca` crate, real or emulated)
//! and `verbs` (rdma-core ibverbs, for host mode on any RoCE/IB NIC). What
//! one send carries is defined in [`wire::fabric`]: a
//! [`wire::FabricHeader`] in the buffer's headroom, then the payload.
//!
//! The trait and its backends are being built in their own issue (fabric).
#![forbid(unsafe_code)]

pub use wire::fabric::{FabricHeader, HEADROOM, Immediate, MsgKind};
