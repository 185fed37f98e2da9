//! `dpu-agent`: DNE, the network engine on the BlueField's Arm cores (or on the
//! host CPU in host mode). It owns every RDMA resource, imports each tenant's
//! host pool, forwards descriptors between nodes with two-sided sends straight
//! from host memory, delivers what arrives to local functions, and keeps
//! tenants fair and isolated (DESIGN.md sections 1-6).
//!
//! Modules:
//! * [`cli`]: the command line of the `dpu-agent` binary;
//! * [`agent`]: `dpu-agent run`, attach to the host and run the engine;
//! * [`engine`]: the data-plane loop (uplink, route, schedule, fabric,
//!   deliver), generic over the fabric transport and the host link;
//! * [`hostlink`]: what the engine needs of the host side, and a null link;
//! * [`comchlink`]: the host link of `mode = "dpu"` (comch and imported pools);
//! * [`sched`]: the weighted deficit round robin over tenants;
//! * [`metrics`]: Prometheus metrics, `/status` and `/ready`;
//! * [`demo`]: the one-command cluster on one machine.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod comchlink;
pub mod demo;
pub mod engine;
pub mod hostlink;
pub mod metrics;
pub mod sched;
