//! The C ABI of the function library (`dne_shim.h`, generated from this file
//! by cbindgen at build time; pkg-config name `dne-shim`).
//!
//! The calls return a [`dne_status`] (0 = ok; [`dne_status_str`] turns a
//! code into a message), except `dne_detach`, the message accessors and
//! the two functions that name a code. No call unwinds into C: a panic
//! inside is caught and reported as `DNE_ERR_INTERNAL`; an accessor that
//! panics returns what it returns for NULL, and `dne_detach` returns.
//! Handles are opaque pointers; a message handle is owned by the caller until `dne_send` succeeds or `dne_free`
//! frees it, and a failed call leaves it as it was (the same pointer),
//! except where the call's doc names a status that does not. A
//! message is used with an attach to the pool it is in: another tenant's
//! attach (or one to another host-shimd) in the same process is refused
//! (`DNE_ERR_FOREIGN_MSG`). Messages are boxed (one small heap allocation
//! per message, the price of an opaque C handle; the Rust API has none).
//!
//! Threads: a `dne_fn` holds its function's receive state and buffer
//! cache, so it is used by one thread at a time (calls on one handle from
//! two threads at once are undefined behaviour). A function with several
//! threads serializes its calls on the handle, or attaches once per thread
//! (each attach is an instance with its own ring). Message handles move
//! freely between threads.
#![allow(unsafe_code, non_camel_case_types)]

use crate::function::{AttachError, Function, Msg, MsgFreeError, RecvError, SendErrorKind};
use std::ffi::{CStr, c_char, c_int};
use std::mem::MaybeUninit;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Duration;

/// Directory of the generated `dne_shim.h` (for tests and packaging).
pub const INCLUDE_DIR: &str = concat!(env!("OUT_DIR"), "/include");
/// Directory of the generated build-tree `dne-shim.pc`.
pub const PKGCONFIG_DIR: &str = concat!(env!("OUT_DIR"), "/pkgconfig");

/// Status codes of the C API.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dne_status {
    /// Success.
    DNE_OK = 0,
    /// A pointer was NULL or a string was not valid UTF-8 / not a valid name.
    DNE_ERR_INVALID_ARG = 1,
    /// host-shimd could not be reached or answered wrongly.
    DNE_ERR_SHIMD = 2,
    /// host-shimd refused: the function or tenant does not match the config.
    DNE_ERR_REFUSED = 3,
    /// No free buffer in the tenant pool, or the message is too large.
    DNE_ERR_EXHAUSTED = 4,
    /// The destination function is unknown.
    DNE_ERR_UNKNOWN_FUNCTION = 5,
    /// The destination belongs to another tenant.
    DNE_ERR_TENANT_MISMATCH = 6,
    /// The destination has no live instance.
    DNE_ERR_NO_INSTANCE = 7,
    /// The destination's ring is full; retry later (the message is kept).
    DNE_ERR_FULL = 8,
    /// Nothing arrived before the timeout.
    DNE_ERR_TIMEOUT = 9,
    /// The message's buffers are not owned as expected.
    DNE_ERR_OWNERSHIP = 10,
    /// A bug: a panic was caught at the C boundary.
    DNE_ERR_INTERNAL = 11,
    /// host-shimd is gone (it stopped): nothing will arrive any more, and
    /// nothing sent would be delivered (`dne_send` hands the message
    /// back). Detach, and attach again to the new host-shimd or exit.
    DNE_ERR_SHIMD_GONE = 12,
    /// The message is in another pool than the function's: it came from
    /// another attach of this process, of another tenant or to another
    /// host-shimd. Nothing was done; the message is still the caller's,
    /// for the attach it came from.
    DNE_ERR_FOREIGN_MSG = 13,
}

impl dne_status {
    /// Every status, in code order.
    pub const ALL: [dne_status; 14] = [
        dne_status::DNE_OK,
        dne_status::DNE_ERR_INVALID_ARG,
        dne_status::DNE_ERR_SHIMD,
        dne_status::DNE_ERR_REFUSED,
        dne_status::DNE_ERR_EXHAUSTED,
        dne_status::DNE_ERR_UNKNOWN_FUNCTION,
        dne_status::DNE_ERR_TENANT_MISMATCH,
        dne_status::DNE_ERR_NO_INSTANCE,
        dne_status::DNE_ERR_FULL,
        dne_status::DNE_ERR_TIMEOUT,
        dne_status::DNE_ERR_OWNERSHIP,
        dne_status::DNE_ERR_INTERNAL,
        dne_status::DNE_ERR_SHIMD_GONE,
        dne_status::DNE_ERR_FOREIGN_MSG,
    ];

    /// The status with code `code`, if there is one.
    fn from_int(code: c_int) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as c_int == code)
    }
}

/// The error codes of error descriptors, as `dne_msg_error_code` returns
/// them (the values of `wire::ErrorCode`; `dne_error_code_str` names
/// each). In C the type is a `uint8_t`: a received message may carry a
/// code newer than this list, so compare, never assume it is one of them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dne_error_code {
    /// The destination function is not in the routing table.
    DNE_MSG_ERR_UNKNOWN_FUNCTION = 1,
    /// The destination's node cannot be reached.
    DNE_MSG_ERR_UNREACHABLE = 2,
    /// The destination function died with the message in flight.
    DNE_MSG_ERR_PEER_DIED = 3,
    /// The message was not answered in time.
    DNE_MSG_ERR_TIMEOUT = 4,
    /// The tenant's queue or credits stayed exhausted.
    DNE_MSG_ERR_OVERLOADED = 5,
    /// A descriptor failed validation.
    DNE_MSG_ERR_BAD_DESCRIPTOR = 6,
    /// A descriptor named another tenant's pool.
    DNE_MSG_ERR_TENANT_MISMATCH = 7,
    /// The message is larger than the receiver accepts.
    DNE_MSG_ERR_TOO_LARGE = 8,
    /// No buffer could be allocated.
    DNE_MSG_ERR_POOL_EXHAUSTED = 9,
    /// The function itself reported a failure.
    DNE_MSG_ERR_FUNCTION_FAILED = 10,
    /// The route or hop does not exist.
    DNE_MSG_ERR_BAD_ROUTE = 11,
    /// The peer speaks another protocol or layout version.
    DNE_MSG_ERR_VERSION_MISMATCH = 12,
}

impl dne_error_code {
    /// Every code, in numeric order (as `wire::ErrorCode::ALL`).
    pub const ALL: [dne_error_code; 12] = [
        dne_error_code::DNE_MSG_ERR_UNKNOWN_FUNCTION,
        dne_error_code::DNE_MSG_ERR_UNREACHABLE,
        dne_error_code::DNE_MSG_ERR_PEER_DIED,
        dne_error_code::DNE_MSG_ERR_TIMEOUT,
        dne_error_code::DNE_MSG_ERR_OVERLOADED,
        dne_error_code::DNE_MSG_ERR_BAD_DESCRIPTOR,
        dne_error_code::DNE_MSG_ERR_TENANT_MISMATCH,
        dne_error_code::DNE_MSG_ERR_TOO_LARGE,
        dne_error_code::DNE_MSG_ERR_POOL_EXHAUSTED,
        dne_error_code::DNE_MSG_ERR_FUNCTION_FAILED,
        dne_error_code::DNE_MSG_ERR_BAD_ROUTE,
        dne_error_code::DNE_MSG_ERR_VERSION_MISMATCH,
    ];
}

/// An attached function (opaque).
#[derive(Debug)]
pub struct dne_fn {
    f: Function,
}

impl dne_fn {
    fn new(f: Function) -> Self {
        Self { f }
    }

    /// A handle for `msg`.
    fn handle(msg: Msg) -> *mut dne_msg {
        Box::into_raw(Box::new(dne_msg { msg }))
    }
}

/// A message held by the caller (opaque). The message records the pool
/// it is in: it is used with any attach to that pool, and refused by the
/// others (`DNE_ERR_FOREIGN_MSG`).
#[derive(Debug)]
pub struct dne_msg {
    msg: Msg,
}

/// A static, NUL-terminated description of `status` (a `dne_status`
/// value; "unknown status" for any other number).
#[unsafe(no_mangle)]
pub extern "C" fn dne_status_str(status: c_int) -> *const c_char {
    guard_or(c"internal error".as_ptr(), || status_str(status).as_ptr())
}

fn status_str(status: c_int) -> &'static CStr {
    // (An `int`, not the enum: C may pass any number, and a Rust enum
    // holding a value it does not name is undefined behaviour.)
    let Some(status) = dne_status::from_int(status) else { return c"unknown status" };
    match status {
        dne_status::DNE_OK => c"ok",
        dne_status::DNE_ERR_INVALID_ARG => c"invalid argument",
        dne_status::DNE_ERR_SHIMD => c"host-shimd unreachable or protocol error",
        dne_status::DNE_ERR_REFUSED => c"refused by host-shimd",
        dne_status::DNE_ERR_EXHAUSTED => c"pool exhausted or message too large",
        dne_status::DNE_ERR_UNKNOWN_FUNCTION => c"unknown function",
        dne_status::DNE_ERR_TENANT_MISMATCH => c"destination belongs to another tenant",
        dne_status::DNE_ERR_NO_INSTANCE => c"destination has no live instance",
        dne_status::DNE_ERR_FULL => c"destination ring full",
        dne_status::DNE_ERR_TIMEOUT => c"timed out",
        dne_status::DNE_ERR_OWNERSHIP => c"buffer ownership violated",
        dne_status::DNE_ERR_INTERNAL => c"internal error",
        dne_status::DNE_ERR_SHIMD_GONE => c"host-shimd is gone (it stopped; attach again to the new one)",
        dne_status::DNE_ERR_FOREIGN_MSG => c"message of another attach's pool",
    }
}

/// Runs the body of a call that returns a status: a panic becomes
/// `DNE_ERR_INTERNAL` instead of unwinding into C (which aborts).
fn guard(f: impl FnOnce() -> dne_status) -> dne_status {
    guard_or(dne_status::DNE_ERR_INTERNAL, f)
}

/// Runs the body of a call: a panic returns `on_panic` instead of
/// unwinding into C (which aborts).
fn guard_or<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            // Its drop may panic too, which must not unwind into C.
            // Nothing is logged: the host program's logger may be what
            // panicked.
            crate::drop_panic_payload(payload);
            on_panic
        }
    }
}

/// Reads a C string argument.
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated string valid for this call.
unsafe fn arg<'a>(p: *const c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL (checked above) and NUL-terminated (caller contract).
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}

fn send_status(kind: &SendErrorKind) -> dne_status {
    match kind {
        SendErrorKind::UnknownFunction => dne_status::DNE_ERR_UNKNOWN_FUNCTION,
        SendErrorKind::TenantMismatch => dne_status::DNE_ERR_TENANT_MISMATCH,
        SendErrorKind::NoInstance => dne_status::DNE_ERR_NO_INSTANCE,
        SendErrorKind::Full => dne_status::DNE_ERR_FULL,
        SendErrorKind::Ownership(_) => dne_status::DNE_ERR_OWNERSHIP,
        SendErrorKind::Shimd(_) => dne_status::DNE_ERR_SHIMD,
        SendErrorKind::ShimdGone => dne_status::DNE_ERR_SHIMD_GONE,
        SendErrorKind::BadName(_) | SendErrorKind::BadDescriptor(_) => dne_status::DNE_ERR_INVALID_ARG,
        SendErrorKind::ForeignMsg => dne_status::DNE_ERR_FOREIGN_MSG,
    }
}

/// Attaches to host-shimd at `socket` as function `function` of `tenant`.
///
/// # Safety
///
/// The strings are NUL-terminated; `out` is a valid pointer to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_attach(
    socket: *const c_char,
    tenant: *const c_char,
    function: *const c_char,
    out: *mut *mut dne_fn,
) -> dne_status {
    guard(|| {
        // SAFETY: caller contract: NUL-terminated strings or NULL.
        let s = unsafe { arg(socket) };
        // SAFETY: as above.
        let t = unsafe { arg(tenant) };
        // SAFETY: as above.
        let f = unsafe { arg(function) };
        let (Some(s), Some(t), Some(f)) = (s, t, f) else {
            return dne_status::DNE_ERR_INVALID_ARG;
        };
        if out.is_null() {
            return dne_status::DNE_ERR_INVALID_ARG;
        }
        match Function::attach(Path::new(s), t, f).map(dne_fn::new) {
            Ok(func) => {
                // SAFETY: `out` is non-NULL (checked) and writable (contract).
                unsafe { out.write(Box::into_raw(Box::new(func))) };
                dne_status::DNE_OK
            }
            Err(AttachError::Refused(_)) => dne_status::DNE_ERR_REFUSED,
            Err(AttachError::Name(_)) => dne_status::DNE_ERR_INVALID_ARG,
            Err(e) => {
                log::warn!("dne_attach: {e}");
                dne_status::DNE_ERR_SHIMD
            }
        }
    })
}

/// Detaches and frees the handle. Send or free every message first: the
/// buffers of the messages this attach still holds are returned to the
/// pool by host-shimd, and their handles must not be used again, not even
/// with `dne_free` through another attach (the buffers may belong to
/// other messages by then); each such handle's small allocation is lost.
///
/// # Safety
///
/// `f` is NULL or a handle from `dne_attach`, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_detach(f: *mut dne_fn) {
    guard_or((), || {
        if !f.is_null() {
            // SAFETY: from `Box::into_raw` in `dne_attach` (caller contract).
            drop(unsafe { Box::from_raw(f) });
        }
    })
}

/// Allocates a message of `len` payload bytes.
///
/// # Safety
///
/// `f` is a live handle; `out` is a valid pointer to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_alloc(f: *mut dne_fn, len: u32, out: *mut *mut dne_msg) -> dne_status {
    guard(|| {
        // SAFETY: live handle or NULL (caller contract); NULL is refused.
        let Some(f) = (unsafe { f.as_mut() }) else { return dne_status::DNE_ERR_INVALID_ARG };
        if out.is_null() {
            return dne_status::DNE_ERR_INVALID_ARG;
        }
        match f.f.alloc(len) {
            Ok(m) => {
                // SAFETY: `out` is non-NULL (checked) and writable (contract).
                unsafe { out.write(dne_fn::handle(m)) };
                dne_status::DNE_OK
            }
            Err(_) => dne_status::DNE_ERR_EXHAUSTED,
        }
    })
}

/// Payload bytes of fragment `frag` of `m` (zero copy); their count goes to
/// `*len`. NULL for a fragment past the end, behind a link of the chain
/// that leads out of the pool (a process sharing the pool rewrote it), or
/// when `m` is in another pool than `f`'s (see `DNE_ERR_FOREIGN_MSG`).
///
/// # Safety
///
/// `f` and `m` are live handles, `len` is writable. The bytes stay valid
/// until `m` is sent or freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_msg_data(f: *mut dne_fn, m: *mut dne_msg, frag: u32, len: *mut u32) -> *mut u8 {
    guard_or(std::ptr::null_mut(), || {
        // SAFETY: live handle or NULL (caller contract).
        let f = unsafe { f.as_ref() };
        // SAFETY: as above.
        let m = unsafe { m.as_mut() };
        let (Some(f), Some(m)) = (f, m) else { return std::ptr::null_mut() };
        // NULL past the end, at a link a process sharing the pool rewrote,
        // and for a message of another pool.
        let Ok(bytes) = f.f.try_payload_mut(&mut m.msg, frag) else { return std::ptr::null_mut() };
        if !len.is_null() {
            // SAFETY: non-NULL (checked) and writable (contract). The
            // length fits: a fragment is at most one buffer.
            unsafe { len.write(bytes.len() as u32) };
        }
        bytes.as_mut_ptr()
    })
}

/// Payload length of `m` in bytes (0 for NULL).
///
/// # Safety
///
/// `m` is NULL or a live message handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_msg_len(m: *const dne_msg) -> u32 {
    guard_or(0, || {
        // SAFETY: live handle or NULL (caller contract).
        unsafe { m.as_ref() }.map_or(0, |m| m.msg.len())
    })
}

/// Buffers in `m`'s chain (0 for NULL).
///
/// # Safety
///
/// `m` is NULL or a live message handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_msg_frags(m: *const dne_msg) -> u32 {
    guard_or(0, || {
        // SAFETY: live handle or NULL (caller contract).
        unsafe { m.as_ref() }.map_or(0, |m| m.msg.frags())
    })
}

/// Request id of `m` (0 for NULL).
///
/// # Safety
///
/// `m` is NULL or a live message handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_msg_request(m: *const dne_msg) -> u32 {
    guard_or(0, || {
        // SAFETY: live handle or NULL (caller contract).
        unsafe { m.as_ref() }.map_or(0, |m| m.msg.request())
    })
}

/// Whether `m` is an error descriptor rather than a call (false for NULL):
/// a message this function sent that came back undelivered, or an error
/// answer to one. It is not to be handled or forwarded as a call: free it
/// (`dne_msg_error_code` says why it came back).
///
/// # Safety
///
/// `m` is NULL or a live message handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_msg_is_error(m: *const dne_msg) -> bool {
    guard_or(false, || {
        // SAFETY: live handle or NULL (caller contract).
        unsafe { m.as_ref() }.is_some_and(|m| m.msg.desc().is_error())
    })
}

/// The error code of an error descriptor (a `DNE_MSG_ERR_*` value of
/// `dne_error_code`, 1 and up; `dne_error_code_str` names it); 0 when `m`
/// is not an error descriptor or is NULL.
///
/// # Safety
///
/// `m` is NULL or a live message handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_msg_error_code(m: *const dne_msg) -> u8 {
    guard_or(0, || {
        // SAFETY: live handle or NULL (caller contract).
        unsafe { m.as_ref() }.map_or(0, |m| if m.msg.desc().is_error() { m.msg.desc().status } else { 0 })
    })
}

/// A static, NUL-terminated name of error code `code` (as
/// `dne_msg_error_code` returns it, a `dne_error_code`: "overloaded" for
/// `DNE_MSG_ERR_OVERLOADED`, "peer_died", ...; "unknown error code" for
/// any other number).
#[unsafe(no_mangle)]
pub extern "C" fn dne_error_code_str(code: c_int) -> *const c_char {
    use wire::ErrorCode;
    guard_or(c"unknown error code".as_ptr(), || {
        let Some(code) = u8::try_from(code).ok().and_then(ErrorCode::from_u8) else {
            return c"unknown error code".as_ptr();
        };
        code.as_c_str().as_ptr()
    })
}

/// Sends `*m` to function `to`. On success `*m` becomes NULL (the message
/// is gone). On failure `*m` is left as it was, the same handle, and the
/// caller still owns it, except after `DNE_ERR_NO_INSTANCE` with
/// `*m == NULL`: the receiver died holding it and host-shimd returned its
/// buffers to the pool (the handle is freed), and after `DNE_ERR_INTERNAL`
/// with `*m == NULL` (the message is lost).
/// `DNE_ERR_SHIMD_GONE`: host-shimd stopped; `*m` is the caller's (free it),
/// or NULL when the receiver took it as host-shimd stopped.
/// `DNE_ERR_FOREIGN_MSG`: `*m` is in another attach's pool; nothing was done.
/// `DNE_ERR_INVALID_ARG`: `f`, `m`, `*m` or `to` is NULL, or `to` is not a
/// valid function name; nothing was done.
///
/// # Safety
///
/// `f` is a live handle, `m` points to a live message handle, `to` is a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_send(f: *mut dne_fn, m: *mut *mut dne_msg, to: *const c_char) -> dne_status {
    guard(|| {
        // SAFETY: caller contract: live handle or NULL.
        let Some(f) = (unsafe { f.as_mut() }) else { return dne_status::DNE_ERR_INVALID_ARG };
        // SAFETY: caller contract: NUL-terminated or NULL.
        let Some(to) = (unsafe { arg(to) }) else { return dne_status::DNE_ERR_INVALID_ARG };
        // A name no function can have (empty, too long, a character names
        // do not use) is the caller's mistake, as in `dne_attach`, not a
        // function that may yet appear. The send reads this copy: `to` may
        // point into the message's own payload, which is the receiver's
        // once handed over.
        let Ok(name) = wire::Name::new(to) else { return dne_status::DNE_ERR_INVALID_ARG };
        let Ok(to) = name.as_str() else { return dne_status::DNE_ERR_INVALID_ARG };
        if m.is_null() {
            return dne_status::DNE_ERR_INVALID_ARG;
        }
        // SAFETY: `m` is non-NULL (checked) and points to a handle slot
        // (caller contract).
        let raw = unsafe { m.read() };
        if raw.is_null() {
            return dne_status::DNE_ERR_INVALID_ARG;
        }
        // The handle's allocation stays, to take the message back on a
        // failure: the caller's pointer (and any copy of it) stays valid.
        // `MaybeUninit<dne_msg>` has `dne_msg`'s layout.
        // SAFETY: from `Box::into_raw` in this module (caller contract;
        // non-NULL, checked above).
        let slot = unsafe { Box::from_raw(raw.cast::<MaybeUninit<dne_msg>>()) };
        // The message is moved out: from here the box holds no value, and
        // dropping it frees the allocation only.
        // SAFETY: initialised: it is the live handle the caller passed.
        let msg = unsafe { slot.assume_init_read() }.msg;
        // The slot no longer owns the handle: cleared before the send, so
        // that even a panic inside it (caught by `guard`) cannot leave the
        // caller a pointer to freed memory.
        // SAFETY: `m` is non-NULL and writable (checked, contract).
        unsafe { m.write(std::ptr::null_mut()) };
        match f.f.send(msg, to) {
            Ok(()) => dne_status::DNE_OK,
            Err(e) => {
                // Back into the same allocation: `*m` is `raw` again.
                let back = e.msg.map_or(std::ptr::null_mut(), |msg| Box::into_raw(Box::write(slot, dne_msg { msg })));
                // SAFETY: as above.
                unsafe { m.write(back) };
                send_status(&e.kind)
            }
        }
    })
}

/// Receives one message, waiting up to `timeout_ms` milliseconds (negative:
/// forever). Spins briefly, then sleeps on the doorbell. `DNE_ERR_TIMEOUT`:
/// nothing arrived in time. `DNE_ERR_SHIMD_GONE`: host-shimd is gone (seen
/// once nothing is left to take: when the wait sleeps, or while it spins
/// after host-shimd stopped cleanly; a zero timeout does neither).
/// `DNE_ERR_SHIMD`: waiting on the doorbell failed.
///
/// # Safety
///
/// `f` is a live handle; `out` is a valid pointer to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_recv(f: *mut dne_fn, timeout_ms: i32, out: *mut *mut dne_msg) -> dne_status {
    guard(|| {
        // SAFETY: caller contract: live handle or NULL.
        let Some(f) = (unsafe { f.as_mut() }) else { return dne_status::DNE_ERR_INVALID_ARG };
        if out.is_null() {
            return dne_status::DNE_ERR_INVALID_ARG;
        }
        let t = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        match f.f.recv_timeout(t) {
            Ok(Some(m)) => {
                // SAFETY: `out` is non-NULL (checked) and writable (contract).
                unsafe { out.write(dne_fn::handle(m)) };
                dne_status::DNE_OK
            }
            Ok(None) => dne_status::DNE_ERR_TIMEOUT,
            Err(RecvError::ShimdGone) => dne_status::DNE_ERR_SHIMD_GONE,
            Err(RecvError::Io(e)) => {
                log::warn!("dne_recv: {e}");
                dne_status::DNE_ERR_SHIMD
            }
        }
    })
}

/// Frees a message. `DNE_ERR_FOREIGN_MSG`: `m` is in another attach's pool
/// (free it with the `dne_fn` it came from); it is left as it was.
/// `DNE_ERR_INVALID_ARG`: `f` is NULL; nothing was done, `m` is still the
/// caller's. After any other status `m` is gone (`DNE_ERR_OWNERSHIP`: its
/// buffers were not all this function's to free). `m` NULL: `DNE_OK`.
///
/// # Safety
///
/// `f` is a live handle; `m` is NULL or a live message handle, not used
/// afterwards unless refused with `DNE_ERR_FOREIGN_MSG` or
/// `DNE_ERR_INVALID_ARG`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dne_free(f: *mut dne_fn, m: *mut dne_msg) -> dne_status {
    guard(|| {
        // SAFETY: caller contract: live handle or NULL.
        let Some(f) = (unsafe { f.as_mut() }) else { return dne_status::DNE_ERR_INVALID_ARG };
        if m.is_null() {
            return dne_status::DNE_OK;
        }
        // As in `dne_send`: the allocation stays until the message is
        // freed, to take it back when it is refused.
        // SAFETY: from `Box::into_raw` in this module (caller contract;
        // non-NULL, checked above).
        let slot = unsafe { Box::from_raw(m.cast::<MaybeUninit<dne_msg>>()) };
        // SAFETY: initialised: it is the live handle the caller passed.
        let msg = unsafe { slot.assume_init_read() }.msg;
        match f.f.free(msg) {
            Ok(_) => dne_status::DNE_OK,
            Err(MsgFreeError::Foreign(msg)) => {
                // Back into the same allocation: `m` is the caller's again.
                let back = Box::into_raw(Box::write(slot, dne_msg { msg }));
                debug_assert_eq!(back, m);
                dne_status::DNE_ERR_FOREIGN_MSG
            }
            Err(MsgFreeError::Pool(_)) => dne_status::DNE_ERR_OWNERSHIP,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function::tests::shimd_serving;

    #[test]
    fn every_status_has_a_message() {
        for (code, st) in dne_status::ALL.into_iter().enumerate() {
            assert_eq!(st as c_int, code as c_int);
            // SAFETY: `dne_status_str` returns a static C string.
            let msg = unsafe { CStr::from_ptr(dne_status_str(st as c_int)) };
            assert!(!msg.to_bytes().is_empty());
            assert_ne!(msg, c"unknown status");
        }
    }

    /// C may pass any number as a status: numbers no status has get a
    /// message too. Before, the parameter was the Rust enum, and such a
    /// number was undefined behaviour (a crash or a garbage string).
    #[test]
    fn numbers_that_are_no_status_get_a_message() {
        for code in [14, 200, -1, c_int::MIN, c_int::MAX] {
            // SAFETY: `dne_status_str` returns a static C string.
            let msg = unsafe { CStr::from_ptr(dne_status_str(code)) };
            assert_eq!(msg, c"unknown status", "{code}");
        }
    }

    /// The header's `DNE_MSG_ERR_*` constants are `wire::ErrorCode`'s
    /// values, every one of them, named as `dne_error_code_str` names them
    /// (`tests/tests/c_abi.rs` in dne-tests checks the same from C).
    #[test]
    fn the_c_error_codes_are_the_wire_codes() {
        assert_eq!(dne_error_code::ALL.len(), wire::ErrorCode::ALL.len());
        for (c, w) in dne_error_code::ALL.into_iter().zip(wire::ErrorCode::ALL) {
            assert_eq!(c as u8, w as u8, "{c:?}");
            assert_eq!(format!("{c:?}"), format!("DNE_MSG_ERR_{}", w.as_str().to_uppercase()));
        }
    }

    /// A C function can tell an error descriptor from a call, and why it
    /// came back. Before, the C ABI had no way to: the C sample forwarded a
    /// bounced message as if it were a call.
    #[test]
    fn error_descriptors_are_told_apart_from_calls() {
        use wire::{DescFlags, Descriptor, ErrorCode, Owner};
        let g = wire::desc::PoolGeometry::new(1, 256, 64, 64, 8).unwrap();
        let pool = shm::Pool::create("dne-ffi-test", g, shm::PagePolicy::Normal).unwrap();
        let msg = |desc: Descriptor| dne_msg { msg: Msg::from_parts(pool.alloc(1, Owner::Held(0)).unwrap(), desc) };
        let call = msg(Descriptor::default());
        let bounced =
            msg(Descriptor { flags: DescFlags::ERROR, status: ErrorCode::Overloaded as u8, ..Default::default() });
        let reply = msg(Descriptor { flags: DescFlags::REPLY, status: 200, ..Default::default() });
        let is = |m: *const dne_msg| {
            // SAFETY: a live handle or NULL (both in the contract).
            let error = unsafe { dne_msg_is_error(m) };
            // SAFETY: as above.
            (error, unsafe { dne_msg_error_code(m) })
        };
        assert_eq!(is(&call), (false, 0));
        assert_eq!(is(&bounced), (true, ErrorCode::Overloaded as u8));
        assert_eq!(is(&reply), (false, 0), "a status without the error flag is no error code");
        assert_eq!(is(std::ptr::null()), (false, 0));
        for c in ErrorCode::ALL {
            // SAFETY: `dne_error_code_str` returns a static C string.
            let name = unsafe { CStr::from_ptr(dne_error_code_str(c_int::from(c as u8))) };
            assert_eq!(name.to_str(), Ok(c.as_str()));
        }
        for c in [0, 13, 255, 256, -1] {
            // SAFETY: as above.
            let name = unsafe { CStr::from_ptr(dne_error_code_str(c)) };
            assert_eq!(name, c"unknown error code", "{c}");
        }
    }

    const ONE_TENANT: &str = "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 4096\nbuffers = 64\nrecv_quota = 8\n\n\
         [[function]]\nname = \"a\"\ntenant = \"t\"\nnode = \"n0\"\n\n\
         [[function]]\nname = \"b\"\ntenant = \"t\"\nnode = \"n0\"\nring_capacity = 8\n";

    /// Through the C ABI, once host-shimd has stopped (here: dropped, as
    /// at the end of its SIGTERM handling), a send into a ring looked up
    /// before fails with `DNE_ERR_SHIMD_GONE` and leaves the message with
    /// the caller, and a receive ends with the same status. Before, the
    /// send returned `DNE_OK` into a ring nobody would serve again.
    #[test]
    fn after_host_shimd_stopped_a_send_says_so_and_the_message_stays_the_callers() {
        let (shimd, (a, _b), dir) = shimd_serving("gone", ONE_TENANT, |socket| {
            let b = Function::attach(socket, "t", "b").unwrap();
            let mut a = Function::attach(socket, "t", "a").unwrap();
            let m = a.alloc(5).unwrap();
            a.send(m, "b").unwrap();
            (a, b)
        });
        drop(shimd);
        let mut f = dne_fn::new(a);
        let mut m = std::ptr::null_mut();
        // SAFETY: a live handle and a writable slot.
        assert_eq!(unsafe { dne_alloc(&mut f, 3, &mut m) }, dne_status::DNE_OK);
        // SAFETY: a live handle, a slot holding a live message, a C string.
        let st = unsafe { dne_send(&mut f, &mut m, c"b".as_ptr()) };
        assert_eq!(st, dne_status::DNE_ERR_SHIMD_GONE);
        assert!(!m.is_null(), "the message handed back");
        // SAFETY: the live message handle `dne_send` wrote back.
        assert_eq!(unsafe { dne_msg_len(m) }, 3);
        // SAFETY: a live handle and message, not used afterwards.
        assert_eq!(unsafe { dne_free(&mut f, m) }, dne_status::DNE_OK);
        let mut got = std::ptr::null_mut();
        // SAFETY: a live handle and a writable slot (60 s: the watchdog).
        assert_eq!(unsafe { dne_recv(&mut f, 60_000, &mut got) }, dne_status::DNE_ERR_SHIMD_GONE);
        assert!(got.is_null());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failed `dne_send` leaves `*m` as it was: the same handle, so a
    /// copy of the pointer the caller kept is still that message (here
    /// after `DNE_ERR_FULL`, then `DNE_ERR_SHIMD_GONE`). Before, the
    /// message came back in a new handle and the old pointer was freed.
    #[test]
    fn a_failed_send_leaves_the_callers_handle_as_it_was() {
        let (shimd, (a, _b), dir) = shimd_serving("same", ONE_TENANT, |socket| {
            let b = Function::attach(socket, "t", "b").unwrap();
            let mut a = Function::attach(socket, "t", "a").unwrap();
            // Fill b's ring (8 slots): b never receives.
            loop {
                let m = a.alloc(1).unwrap();
                match a.send(m, "b") {
                    Ok(()) => {}
                    Err(e) if matches!(e.kind, SendErrorKind::Full) => {
                        a.free(e.msg.unwrap()).unwrap();
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            (a, b)
        });
        let mut f = dne_fn::new(a);
        let mut m = std::ptr::null_mut();
        // SAFETY: a live handle and a writable slot.
        assert_eq!(unsafe { dne_alloc(&mut f, 3, &mut m) }, dne_status::DNE_OK);
        let kept = m;
        // SAFETY: a live handle, a slot holding a live message, a C string.
        assert_eq!(unsafe { dne_send(&mut f, &mut m, c"b".as_ptr()) }, dne_status::DNE_ERR_FULL);
        assert_eq!(m, kept, "after DNE_ERR_FULL");
        drop(shimd);
        // SAFETY: as above.
        assert_eq!(unsafe { dne_send(&mut f, &mut m, c"b".as_ptr()) }, dne_status::DNE_ERR_SHIMD_GONE);
        assert_eq!(m, kept, "after DNE_ERR_SHIMD_GONE");
        // SAFETY: the caller's copy is the live handle.
        assert_eq!(unsafe { dne_msg_len(kept) }, 3);
        // SAFETY: a live handle and message, not used afterwards.
        assert_eq!(unsafe { dne_free(&mut f, kept) }, dne_status::DNE_OK);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `dne_free` with the handle of an attach to another tenant's pool
    /// (both attaches in this process) refuses the message with
    /// `DNE_ERR_FOREIGN_MSG` and leaves it the caller's: freed with its
    /// own attach it goes back to its pool. `dne_msg_data` gives no bytes
    /// and `dne_send` refuses it the same way. Before, `dne_free` returned
    /// `DNE_ERR_OWNERSHIP` and freed the handle: the caller could neither
    /// use nor free it, and its buffer stayed held until the detach.
    #[test]
    fn freeing_with_another_tenants_handle_is_refused_and_the_message_stays() {
        let text = format!(
            "{ONE_TENANT}\n[[tenant]]\nname = \"u\"\nweight = 1\nbuf_size = 4096\nbuffers = 64\nrecv_quota = 8\n\n\
             [[function]]\nname = \"c\"\ntenant = \"u\"\nnode = \"n0\"\n"
        );
        let (_shimd, (a, c), dir) = shimd_serving("foreign", &text, |socket| {
            (Function::attach(socket, "t", "a").unwrap(), Function::attach(socket, "u", "c").unwrap())
        });
        let (mut fa, mut fc) = (dne_fn::new(a), dne_fn::new(c));
        let free_in = |f: &dne_fn| f.f.pool().free_buffers() as usize + f.f.cached_buffers();
        let before = free_in(&fa);
        let mut m = std::ptr::null_mut();
        // SAFETY: a live handle and a writable slot.
        assert_eq!(unsafe { dne_alloc(&mut fa, 3, &mut m) }, dne_status::DNE_OK);
        assert_eq!(free_in(&fa), before - 1);
        // SAFETY: live handles (of two attaches).
        let st = unsafe { dne_free(&mut fc, m) };
        assert_eq!(st, dne_status::DNE_ERR_FOREIGN_MSG);
        // SAFETY: the message is still the caller's (refused above).
        assert_eq!(unsafe { dne_msg_len(m) }, 3);
        let mut len = 0;
        // SAFETY: as above: another tenant's handle gets no payload.
        assert!(unsafe { dne_msg_data(&mut fc, m, 0, &mut len) }.is_null());
        let kept = m;
        // SAFETY: as above; a slot holding the message, a C string.
        assert_eq!(unsafe { dne_send(&mut fc, &mut m, c"c".as_ptr()) }, dne_status::DNE_ERR_FOREIGN_MSG);
        assert_eq!(m, kept);
        // SAFETY: a live handle and message, not used afterwards.
        assert_eq!(unsafe { dne_free(&mut fa, m) }, dne_status::DNE_OK);
        assert_eq!(free_in(&fa), before);
        let _ = std::fs::remove_dir_all(&dir);
    }

    std::thread_local! {
        /// Whether [`PanickingLogger`] panics on this thread.
        static PANIC_ON_LOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// How many records [`PanickingLogger`] panicked at, on this thread.
        static LOG_PANICS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// A logger that panics at every record on a thread that set
    /// `PANIC_ON_LOG` (a host program's logger with a bug), and ignores
    /// every record on the other threads (the other tests').
    struct PanickingLogger;

    impl log::Log for PanickingLogger {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            PANIC_ON_LOG.with(std::cell::Cell::get)
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                LOG_PANICS.with(|n| n.set(n.get() + 1));
                panic!("the host's logger failed on: {}", record.args());
            }
        }
        fn flush(&self) {}
    }

    /// A panic inside `dne_detach` (here: the process's logger panics on
    /// the warning the detach logs when a cached buffer is no longer its
    /// own) is caught at the C boundary; the call returns. Before,
    /// `dne_detach` was not guarded: the panic reached the `extern "C"`
    /// boundary and the process aborted ("panic in a function that cannot
    /// unwind").
    #[test]
    fn a_panic_while_detaching_does_not_unwind_into_c() {
        let (_shimd, a, dir) = shimd_serving("detach-panic", ONE_TENANT, |socket| {
            let mut a = Function::attach(socket, "t", "a").unwrap();
            let m = a.alloc(5).unwrap();
            a.free(m).unwrap();
            a
        });
        assert!(a.cached_buffers() > 0, "the freed buffer is in the attach's cache");
        // host-shimd's reclaim of a dead attach, run while it is alive: the
        // cached buffers are free in the pool, so the detach's drain of its
        // cache finds them not its own and logs a warning.
        assert!(a.pool().reclaim(a.info().slot) > 0);
        log::set_logger(&PanickingLogger).expect("no other test of this binary sets a logger");
        log::set_max_level(log::LevelFilter::Warn);
        PANIC_ON_LOG.with(|p| p.set(true));
        let f = Box::into_raw(Box::new(dne_fn::new(a)));
        // SAFETY: a handle from `Box::into_raw`, not used afterwards.
        unsafe { dne_detach(f) };
        PANIC_ON_LOG.with(|p| p.set(false));
        assert_eq!(LOG_PANICS.with(std::cell::Cell::get), 1, "the logger panicked inside dne_detach");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A panic whose payload panics when dropped (`panic_any` can throw
    /// any type) is caught at the C boundary too: the guard returns its
    /// `on_panic` value. Before, the guard dropped the payload outside any
    /// `catch_unwind`; the drop's panic unwound out of it, and in an
    /// `extern "C"` function the process aborted.
    #[test]
    fn a_panic_payload_that_panics_when_dropped_stays_in_the_guard() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("the panic payload's drop panicked");
            }
        }
        assert_eq!(guard_or(7, || -> i32 { std::panic::panic_any(Bomb) }), 7);
        assert_eq!(guard(|| std::panic::panic_any(Bomb)), dne_status::DNE_ERR_INTERNAL);
    }

    #[test]
    fn null_arguments_are_refused_not_dereferenced() {
        let mut out = std::ptr::null_mut();
        let null = std::ptr::null_mut();
        // SAFETY: NULL strings and handles are part of every call's contract.
        let st = unsafe { dne_attach(std::ptr::null(), c"a".as_ptr(), c"b".as_ptr(), &mut out) };
        assert_eq!(st, dne_status::DNE_ERR_INVALID_ARG);
        // SAFETY: as above.
        assert_eq!(unsafe { dne_alloc(null, 1, std::ptr::null_mut()) }, dne_status::DNE_ERR_INVALID_ARG);
        // SAFETY: as above.
        assert_eq!(unsafe { dne_recv(null, 0, std::ptr::null_mut()) }, dne_status::DNE_ERR_INVALID_ARG);
        // SAFETY: as above.
        assert_eq!(unsafe { dne_msg_len(std::ptr::null()) }, 0);
        // SAFETY: as above.
        assert!(unsafe { dne_msg_data(null, std::ptr::null_mut(), 0, std::ptr::null_mut()) }.is_null());
        // SAFETY: as above.
        unsafe { dne_detach(null) };
        assert!(out.is_null());
    }
}
