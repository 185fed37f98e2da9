//! What the SDK backend's contexts ([`Rdma`](super::Rdma),
//! [`ComchServer`](super::ComchServer), [`ComchClient`](super::ComchClient))
//! share: DOCA's state names, the asynchronous start and stop, teardown
//! through progress, task completion and user data.
//!
//! Locking (what makes the contexts `Send + Sync` although DOCA's progress
//! engine and its contexts are not thread safe): every DOCA call on an
//! engine or on a context connected to it runs under the engine's lock
//! ([`PeInner::lock`]), and the callbacks DOCA makes run inside
//! `doca_pe_progress`, under that lock too. A context's own state sits in a
//! `Mutex` that callbacks take; the API side takes it under the engine lock
//! (order: engine, then state) and never holds it across `doca_ctx_start`,
//! `doca_ctx_stop` or `doca_pe_progress`, which may call back.

use super::{PeInner, check};
use crate::{CtxState, DocaError};
use doca_sys as sys;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a context's teardown progresses its engine for the context to
/// become idle before it gives up and leaks the context (DOCA may still
/// call back into it, so it cannot be destroyed).
const TEARDOWN: Duration = Duration::from_secs(2);

/// DOCA's context state as ours.
pub(super) fn state_of(s: sys::doca_ctx_states) -> CtxState {
    match s {
        sys::doca_ctx_states_DOCA_CTX_STATE_STARTING => CtxState::Starting,
        sys::doca_ctx_states_DOCA_CTX_STATE_RUNNING => CtxState::Running,
        sys::doca_ctx_states_DOCA_CTX_STATE_STOPPING => CtxState::Stopping,
        _ => CtxState::Idle,
    }
}

/// The context's state (`doca_ctx_get_state`); `Idle` if DOCA cannot say.
/// The caller holds the engine lock.
pub(super) fn ctx_state(ctx: NonNull<sys::doca_ctx>) -> CtxState {
    let mut s: sys::doca_ctx_states = sys::doca_ctx_states_DOCA_CTX_STATE_IDLE;
    // SAFETY: the context is live (its owner calls this); valid out-pointer.
    match check(unsafe { sys::doca_ctx_get_state(ctx.as_ptr(), &mut s) }) {
        Ok(()) => state_of(s),
        Err(e) => {
            log::error!("doca sdk: doca_ctx_get_state: {e}");
            CtxState::Idle
        }
    }
}

/// The state this API reports for a context DOCA says is in `doca`:
/// DOCA's, except that a context DOCA has brought to idle stays
/// `Stopping` while completions the user has not taken remain (`untaken`).
/// DOCA goes idle as soon as its tasks are freed, which this backend does
/// inside their completion callbacks; the contract (and the emulated
/// backend) has a stopped context become `Idle` only once the user has
/// taken every flushed completion.
pub(super) fn reported(doca: CtxState, untaken: bool) -> CtxState {
    if doca == CtxState::Idle && untaken { CtxState::Stopping } else { doca }
}

/// A failed task's outcome as reported: a task flushed by a stop the user
/// asked for is `SHUTDOWN`, as in the emulated backend (DOCA reports a
/// flushed task with a driver status); any other keeps DOCA's status.
pub(super) fn flushed(r: Result<(), DocaError>, stop_asked: bool) -> Result<(), DocaError> {
    match r {
        Err(_) if stop_asked => Err(DocaError::SHUTDOWN),
        r => r,
    }
}

/// `doca_ctx_start` / `doca_ctx_stop`: `IN_PROGRESS` means "asked, finished
/// later through progress", which is this API's contract for both.
pub(super) fn asked(ret: sys::doca_error_t) -> Result<(), DocaError> {
    match check(ret) {
        Err(DocaError::IN_PROGRESS) => Ok(()),
        r => r,
    }
}

/// Asks the context to start. The caller holds the engine lock and no
/// state lock (DOCA may report the new state at once).
pub(super) fn start(ctx: NonNull<sys::doca_ctx>) -> Result<(), DocaError> {
    if ctx_state(ctx) != CtxState::Idle {
        return Err(DocaError::BAD_STATE);
    }
    // SAFETY: a configured, connected, idle context.
    asked(unsafe { sys::doca_ctx_start(ctx.as_ptr()) })
}

/// Asks the context to stop (outstanding tasks are flushed with errors
/// through progress). The caller holds the engine lock and no state lock.
pub(super) fn stop(ctx: NonNull<sys::doca_ctx>) -> Result<(), DocaError> {
    match ctx_state(ctx) {
        CtxState::Starting | CtxState::Running => {}
        _ => return Err(DocaError::BAD_STATE),
    }
    // SAFETY: a live, started context.
    asked(unsafe { sys::doca_ctx_stop(ctx.as_ptr()) })
}

/// Stops the context and progresses its engine until it is idle, so that
/// it may be destroyed. `false` when it did not become idle within
/// [`TEARDOWN`]: the caller must then leak the context, and `st`, the state
/// its callbacks point at, is leaked here (DOCA may still call back into
/// it). The caller holds the engine lock (`pe`) and no state lock.
pub(super) fn stop_and_drain<T>(pe: &PeInner, ctx: NonNull<sys::doca_ctx>, st: &Arc<Mutex<T>>) -> bool {
    if ctx_state(ctx) == CtxState::Idle {
        return true;
    }
    let _ = stop(ctx);
    let deadline = Instant::now() + TEARDOWN;
    loop {
        if ctx_state(ctx) == CtxState::Idle {
            return true;
        }
        if Instant::now() > deadline {
            log::error!("doca sdk: a context did not stop within {TEARDOWN:?}; it is leaked, not destroyed");
            // One more owner that never drops: the state outlives its owner.
            std::mem::forget(Arc::clone(st));
            return false;
        }
        pe.progress_locked();
    }
}

/// Locks a context's state; a panic that poisoned it left nothing half
/// written that the next user could not handle, so the guard is taken.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A context's shared state from the user data DOCA hands a callback.
///
/// # Safety
/// `ud.ptr` must be the pointer the context's owner stored with
/// `doca_ctx_set_user_data`: a `Mutex<T>` in an `Arc` that outlives the
/// context (its owner destroys the context before dropping it).
pub(super) unsafe fn shared<'a, T>(ud: sys::doca_data) -> Option<&'a Mutex<T>> {
    // SAFETY: the caller's contract: the pointer member of the union is
    // what was stored.
    let p = unsafe { ud.ptr }.cast::<Mutex<T>>().cast_const();
    // SAFETY: the caller's contract: it points at a live Mutex<T>.
    unsafe { p.as_ref() }
}

/// A completed task's outcome (its status, for the error callback), then
/// frees it: DOCA's pool slot comes back at once, ours when the user takes
/// the completion.
pub(super) fn finish_task(task: *mut sys::doca_task, ok: bool) -> Result<(), DocaError> {
    let r = if ok {
        Ok(())
    } else {
        // SAFETY: a live task DOCA completed with an error.
        check(unsafe { sys::doca_task_get_status(task) }).and(Err(DocaError::UNKNOWN))
    };
    // SAFETY: a live, completed task, never used after this.
    unsafe { sys::doca_task_free(task) };
    r
}

/// Gives a created, idle context its user data (`state`, on the heap) and its
/// state callback, and connects it to the engine. The caller holds the
/// engine lock; `state` outlives the context.
pub(super) fn connect<T>(
    pe: &PeInner,
    ctx: NonNull<sys::doca_ctx>,
    state: &Mutex<T>,
    cb: unsafe extern "C" fn(sys::doca_data, *mut sys::doca_ctx, sys::doca_ctx_states, sys::doca_ctx_states),
) -> Result<(), DocaError> {
    // SAFETY: a created, idle context; the state outlives it (caller).
    check(unsafe { sys::doca_ctx_set_user_data(ctx.as_ptr(), ptr_data(state)) })?;
    // SAFETY: as above; `cb` reads the user data as a `Mutex<T>`.
    check(unsafe { sys::doca_ctx_set_state_changed_cb(ctx.as_ptr(), Some(cb)) })?;
    // SAFETY: a live engine, whose lock the caller holds.
    check(unsafe { sys::doca_pe_connect_ctx(pe.pe.as_ptr(), ctx.as_ptr()) })
}

/// User data holding a pointer (a context's shared state).
pub(super) fn ptr_data<T>(p: &T) -> sys::doca_data {
    sys::doca_data { ptr: (p as *const T).cast_mut().cast() }
}

/// User data holding an integer (a slot index).
pub(super) fn u64_data(v: u64) -> sys::doca_data {
    sys::doca_data { u64_: v }
}

/// The integer a task's user data holds.
pub(super) fn data_u64(d: sys::doca_data) -> u64 {
    // SAFETY: every task this backend submits stores an integer (its
    // slot); both members are 8 bytes, so any bits are a valid u64.
    unsafe { d.u64_ }
}

/// Submits an allocated task (giving it `user_data` first, for tasks whose
/// allocation takes none); on any failure the task (if allocated) is freed
/// and what it used stays with the caller.
pub(super) fn submit(
    alloc: sys::doca_error_t,
    task: *mut sys::doca_task,
    user_data: Option<sys::doca_data>,
) -> Result<(), DocaError> {
    let r = check(alloc).and_then(|()| {
        if task.is_null() {
            return Err(DocaError::DRIVER);
        }
        if let Some(ud) = user_data {
            // SAFETY: a task just allocated, not submitted.
            unsafe { sys::doca_task_set_user_data(task, ud) };
        }
        // SAFETY: a task just allocated on a running context.
        check(unsafe { sys::doca_task_submit(task) })
    });
    if r.is_err() && !task.is_null() {
        // SAFETY: the task was allocated and not submitted.
        unsafe { sys::doca_task_free(task) };
    }
    r
}
