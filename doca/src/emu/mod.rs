//! The emulated backend: DOCA's objects and rules in software.
//!
//! * devices: a configurable list ([`dev`]);
//! * memory: mmaps over memfds, export as `/proc/<pid>/fd/<n>` plus the
//!   file's identity, import without any byte access ([`mem`]);
//! * the progress engine and the context state machine ([`pe`]);
//! * comch over Unix `SOCK_SEQPACKET` sockets at a path derived from the
//!   server name, so it works across network namespaces of one host
//!   ([`comch`]);
//! * RDMA over TCP with two-sided semantics: a send lands only in a posted
//!   receive, in order, with its immediate; it waits while none is posted;
//!   a send larger than the receive fails the connection; a vanished peer
//!   fails every outstanding task ([`rdma`]). Payload bytes move between the
//!   memfds and the sockets inside the kernel ([`dma`]);
//! * the comch fast path: consumers posting buffers, producers filling
//!   them, with DOCA's `AGAIN` when none is posted ([`fastpath`]).

pub(crate) mod comch;
pub(crate) mod dev;
pub(crate) mod dma;
pub(crate) mod fastpath;
pub(crate) mod mem;
pub(crate) mod pe;
pub(crate) mod rdma;

pub use comch::{ComchClient, ComchServer, runtime_dir};
pub use dev::{DEVICES_ENV, Device, DeviceInfo, devices};
pub use fastpath::{ComchConsumer, ComchProducer};
pub use mem::{Buf, BufInventory, MemRange, Mmap, MmapBuilder, RemoteMmap};
pub use pe::ProgressEngine;
pub use rdma::Rdma;

/// Locks a context's state. A panic while holding the lock leaves the state
/// as it was at the panic; the emulation continues with it rather than
/// poisoning every later call.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh nonzero token (connection names, not secrets).
pub(crate) fn token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    // Relaxed: only uniqueness matters.
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish() | 1
}
