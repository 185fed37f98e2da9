//! `doca`: the safe Rust API over the DOCA objects DNE uses (devices, mmap
//! export and import, buffers, the progress engine, comch, RDMA contexts and
//! tasks), with two backends behind one API:
//!
//! * `sdk` (feature `sdk`): over `doca-sys`, for BlueField and ConnectX
//!   machines with the DOCA SDK installed;
//! * `emu` (the default): a software implementation that keeps DOCA's rules,
//!   so everything above it runs and is tested on any Linux machine.
//!
//! Contract (both backends; `tests/conformance.rs` checks it):
//! * contexts ([`Rdma`], [`ComchServer`], [`ComchClient`]) start and stop
//!   asynchronously: `start`/`stop` only ask, the transitions to
//!   [`CtxState::Running`] and [`CtxState::Idle`] happen inside
//!   [`ProgressEngine::progress`], which never blocks (except that DOCA
//!   starts an RDMA context synchronously: on a card it may be `Running`
//!   when `start` returns; callers progress until `Running`, which works
//!   with both); everything a context does (I/O, completions, connection
//!   events) happens there too;
//! * the progress engine's notification handle fires only once armed
//!   ([`ProgressEngine::request_notification`]) and once per arm; DOCA's
//!   flow is arm, wait, [`ProgressEngine::clear_notification`], progress
//!   until it returns 0, arm again;
//! * task pools are fixed when a context is created; an exhausted pool is
//!   `DocaError::NO_MEMORY` at submission (backpressure, never a hidden
//!   queue); a slot comes back when the user takes the task's completion;
//! * [`Mmap`] is local memory (a `shm::Region` or a memory fd the caller
//!   keeps); [`RemoteMmap`] is memory imported from another process's
//!   export and has no byte access: it can only be handed to tasks;
//! * RDMA is two-sided RC: a send lands only in a posted receive of the
//!   peer, in order, with its 32-bit immediate; with no receive posted it
//!   waits; a send larger than the receive fails the connection; a peer
//!   that vanishes fails every outstanding task with a typed error;
//! * ownership follows DOCA's teardown order: every object keeps what it was
//!   created from alive (buffers their mmap and inventory, mmaps their
//!   memory and devices, contexts their progress engine and device), so
//!   dropping in any order tears down in the right one; the progress engine
//!   is `!Sync` (one thread progresses it);
//! * the comch fast path: a [`ComchConsumer`] on a comch connection posts
//!   buffers of its mmap and the peer learns its id
//!   ([`ComchEvent::ConsumerUp`]); a [`ComchProducer`] on the peer's side
//!   sends into the oldest posted buffer, with up to [`COMCH_MAX_IMM`]
//!   immediate bytes, or is refused with `AGAIN` while none is posted for
//!   it (DOCA's rule: the caller retries after a progress); any producer
//!   on the connection may fill any posted buffer;
//! * errors are [`DocaError`], DOCA's `doca_error_t` values.
//!
//! Modules: [`error`] (the error code), [`emu_wire`] (the emulated backend's
//! byte layouts, decoded defensively), and the backend's objects re-exported
//! at the top level.
#![cfg_attr(not(feature = "sdk"), forbid(unsafe_code))]

pub mod emu_wire;
pub mod error;
#[cfg(any(test, feature = "sdk"))]
mod slots;
mod types;

#[cfg(not(feature = "sdk"))]
mod emu;
#[cfg(not(feature = "sdk"))]
pub use emu::*;

#[cfg(feature = "sdk")]
mod sdk;
#[cfg(feature = "sdk")]
pub use sdk::*;

pub use emu_wire::MAX_RDMA_MSG;
pub use error::DocaError;
pub use types::{
    Access, COMCH_FAST_PATH_MAX, COMCH_MAX_IMM, ComchConfig, ComchConnId, ComchEvent, CtxState, FastPathConfig,
    FastPathEvent, Imm, RdmaConfig, RdmaConnId, RdmaEvent, TaskSubmitError,
};

/// The comch connection a fast-path consumer or producer runs on: one of a
/// server's connections, or a client's.
#[derive(Clone, Copy, Debug)]
pub enum ComchPeer<'a> {
    /// A server's connection.
    Server(&'a ComchServer, ComchConnId),
    /// A client's connection to its server.
    Client(&'a ComchClient),
}

/// Largest comch message (DOCA comch's control-path cap is 4080 bytes on
/// BlueField; the SDK backend also checks the device's own capability).
pub const COMCH_MAX_MSG_SIZE: u32 = 4080;

/// Environment variable naming the directory of the emulated backend's
/// comch sockets (both sides of a host link must agree on it); the SDK
/// backend ignores it.
pub const RUNTIME_DIR_ENV: &str = "DNE_EMU_RUNTIME_DIR";

/// Environment variable naming the DOCA device the host link uses (the
/// agent's comch server on the DPU, host-shimd's bridge on the host): an
/// IB device name (`mlx5_0`) or a PCI address (`0000:03:00.0`). Without
/// it (or empty), the first device.
pub const DEVICE_ENV: &str = "DNE_DOCA_DEVICE";

/// Opens the device [`DEVICE_ENV`] names (by IB name, then by PCI
/// address), or the first device when it is not set or empty. A name that matches
/// no device is `NOT_FOUND`, logged with the devices there are: never
/// silently another device.
pub fn open_host_link_device() -> Result<Device, DocaError> {
    let want = std::env::var_os(DEVICE_ENV).unwrap_or_default();
    let want = want.to_string_lossy();
    if want.is_empty() {
        return Device::open_first();
    }
    Device::open_by_name(&want).or_else(|_| Device::open_by_pci(&want)).inspect_err(|e| {
        let have: Vec<String> =
            devices().unwrap_or_default().into_iter().map(|d| format!("{} ({})", d.name, d.pci_addr)).collect();
        log::error!("{DEVICE_ENV}={want}: no such DOCA device ({e}); devices here: {}", have.join(", "));
    })
}

/// The DOCA backend compiled into this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The installed NVIDIA DOCA SDK.
    Sdk,
    /// The software emulation.
    Emu,
}

impl Backend {
    /// Lowercase name, as shown in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sdk => "sdk",
            Backend::Emu => "emu",
        }
    }
}

/// The backend of this build: `sdk` with the `sdk` feature, `emu` otherwise.
pub const BACKEND: Backend = if cfg!(feature = "sdk") { Backend::Sdk } else { Backend::Emu };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_feature() {
        assert_eq!(BACKEND.as_str(), if cfg!(feature = "sdk") { "sdk" } else { "emu" });
    }
}
