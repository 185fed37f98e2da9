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
//! One deliberate exception: the payload bytes of a buffer this process
//! holds (a [`pool::Lease`]) are handed out as plain slices, because
//! functions must read and write payloads in place (zero copy). Only
//! processes of the same tenant map those bytes, and a tenant is one
//! security domain (DESIGN.md section 2); everything a peer can use to
//! steer this process (descriptors, ring cursors, chain links, owners) is
//! still read through checked atomics.
//!
//! Modules:
//! * [`region`]: memfd-backed mappings (2 MiB hugetlb pages when the host has
//!   them reserved, locked 4 KiB pages otherwise) and their checked accessors;
//! * [`alloc`]: the lock-free, ABA-safe cross-process allocator;
//! * [`pool`]: tenant pools: buffers, chains, owners, leases, crash reclaim;
//! * [`ring`]: the lock-free MPSC descriptor ring and its sleep handshake.

// Under `--cfg loom` only the lock-free algorithms and their models build:
// loom's atomics cannot live in shared memory.
pub mod alloc;
#[cfg(not(loom))]
pub mod pool;
#[cfg(not(loom))]
pub mod region;
pub mod ring;
mod sync;

pub use alloc::{AllocError, FreeError};
#[cfg(not(loom))]
pub use pool::{AcceptError, JoinError, Lease, LocalCache, Pool, PoolId, PoolOpenError, WriteError};
#[cfg(not(loom))]
pub use region::{AccessError, Backing, PagePolicy, Region, RegionError, memory_available};
