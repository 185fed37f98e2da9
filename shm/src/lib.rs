//! `shm`: shared memory between the processes of one host.
//!
//! Contract: all the `unsafe` that touches memory a peer process can write
//! lives in this crate, behind accessors that check bounds and alignment
//! before every access and never create `&T`/`&mut T` into shared bytes
//! (volatile copies for data, atomics for shared counters).
//!
//! Written by hand rather than with a shared-memory IPC library because the
//! pool must be one region that DNE creates and controls, so that it can be
//! exported to the DPU (DOCA mmap export) and registered with the NIC as one
//! memory region.
//!
//! Modules:
//! * [`region`]: memfd-backed mappings (2 MiB hugetlb pages when the host has
//!   them reserved, locked 4 KiB pages otherwise) and their checked accessors.

pub mod region;

pub use region::{AccessError, Backing, PagePolicy, Region, RegionError};
