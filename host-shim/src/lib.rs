//! `host-shim`: the thin host side of DNE.
//!
//! * [`function`]: the library functions link (Rust API here, C ABI in
//!   [`ffi`]): attach to the tenant pool through host-shimd, allocate a
//!   buffer, write the payload in place, send a [`wire::Descriptor`] straight
//!   into the destination function's inbound ring (direct function routing:
//!   no intermediate hop), receive, free.
//! * [`daemon`]: host-shimd, the per-host daemon: pools from the cluster
//!   config, the function registry, fd passing, crash reclaim. Not on the
//!   data path.
//! * [`sock`]: the control connection (Unix seqpacket + `SCM_RIGHTS`).
//! * [`backlog`]: deliveries waiting for room in a function's ring, in
//!   order per function (the agent's and host-shimd's bridge's).
//!
//! The only `unsafe` of this crate is the C ABI in [`ffi`] (raw pointers from
//! C callers); all shared-memory access goes through `shm`.
#![deny(unsafe_code)]

pub mod backlog;
pub mod bridge;
pub mod comch;
pub mod daemon;
pub mod ffi;
pub mod function;
pub mod sock;

pub use function::{AttachError, Function, Msg, RecvError, SendError, SendErrorKind};

/// Drops a caught panic's payload. Its drop may panic too (any type can be
/// thrown): that panic is caught here, and its own payload forgotten
/// (leaked, a few bytes once per such panic), not dropped, as its drop
/// could panic in turn. Returns whether the drop panicked. For the places
/// a panic must not unwind out of: host-shimd's bridge replacement loop
/// and the C ABI's guard.
pub(crate) fn drop_panic_payload(payload: Box<dyn std::any::Any + Send>) -> bool {
    // Unwind safety: the closure owns the payload and touches nothing
    // else.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(payload))) {
        Ok(()) => false,
        Err(again) => {
            std::mem::forget(again);
            true
        }
    }
}
