//! RDMA contexts over `doca_rdma`: two-sided RC with send, send with
//! immediate and receive tasks, connections set up by export and connect
//! blobs (`doca_rdma_export` / `doca_rdma_connect`, called while the
//! context is running, as DOCA's multi-connection samples do).
//!
//! DOCA reports no event when an exported connection comes up: a
//! connection is `Connected` once `doca_rdma_connect` has succeeded on
//! this side. A send posted before the peer has connected its side is
//! retried by the RC transport, so callers that exchange blobs and then
//! connect both sides (the fabric's mesh) need nothing more. A connection
//! fails with its first failed send (its status), or, with every other
//! connection, when the context stops without being asked to (DOCA stops a
//! context on a fatal error).

use super::ctx::{self, data_u64, u64_data};
use super::{Buf, Device, PeInner, ProgressEngine, check};
use crate::slots::Slots;
use crate::{CtxState, DocaError, RdmaConfig, RdmaConnId, RdmaEvent, TaskSubmitError};
use doca_sys as sys;
use std::collections::VecDeque;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

/// InfiniBand's RNR retry count meaning "retry for ever".
const RNR_RETRY_FOREVER: u8 = 7;

#[derive(Debug)]
struct Conn {
    ptr: NonNull<sys::doca_rdma_connection>,
    connected: bool,
    /// Its failure has been reported.
    failed: bool,
}

#[derive(Debug)]
struct SendSlot {
    buf: Buf,
    conn: u32,
    user_data: u64,
}

#[derive(Debug)]
struct RecvSlot {
    buf: Buf,
    user_data: u64,
}

#[derive(Debug)]
struct State {
    cfg: RdmaConfig,
    /// `stop` was called (or the context is being dropped): a stop is no
    /// connection failure.
    stop_asked: bool,
    conns: Vec<Conn>,
    sends: Slots<SendSlot>,
    recvs: Slots<RecvSlot>,
    /// Tasks submitted whose completion the user has not taken yet (the
    /// pool limit: DOCA's own task is freed in its callback).
    sends_out: u32,
    recvs_out: u32,
    events: VecDeque<RdmaEvent>,
}

// SAFETY: the connection pointers are only used under the engine lock
// (see `ctx`); `Buf` is Send.
unsafe impl Send for State {}

impl State {
    /// Whether completions the user has not taken remain.
    fn untaken(&self) -> bool {
        self.sends_out > 0 || self.recvs_out > 0
    }

    fn conn_index(&self, p: *const sys::doca_rdma_connection) -> Option<u32> {
        self.conns.iter().position(|c| ptr::eq(c.ptr.as_ptr(), p)).map(|i| i as u32)
    }

    /// Reports connection `i` failed, once.
    fn fail(&mut self, i: u32, e: DocaError) {
        if let Some(c) = self.conns.get_mut(i as usize)
            && !c.failed
        {
            c.failed = true;
            self.events.push_back(RdmaEvent::ConnectionFailed(RdmaConnId(i), e));
        }
    }
}

/// An RDMA context (`doca_rdma`).
#[derive(Debug)]
pub struct Rdma {
    rdma: NonNull<sys::doca_rdma>,
    ctx: NonNull<sys::doca_ctx>,
    /// On the heap: DOCA holds its address as the context's user data
    /// (leaked with the context if that never stops).
    st: Arc<Mutex<State>>,
    pe: Arc<PeInner>,
    dev: Device,
}

// SAFETY: every DOCA call on `rdma`/`ctx` happens under the engine lock
// (`pe`), the state is behind a Mutex (see `ctx`).
unsafe impl Send for Rdma {}
// SAFETY: as for Send.
unsafe impl Sync for Rdma {}

impl Rdma {
    /// Creates a context on `dev`, connected to `pe`, with fixed task pools
    /// (`cfg`). It starts `Idle`.
    pub fn new(pe: &ProgressEngine, dev: &Device, cfg: RdmaConfig) -> Result<Rdma, DocaError> {
        cfg.validate()?;
        let g = pe.inner.lock();
        let mut r = ptr::null_mut();
        // SAFETY: an open device; valid out-pointer; destroyed in `Drop`.
        check(unsafe { sys::doca_rdma_create(dev.inner.dev.as_ptr(), &mut r) })?;
        let rdma = NonNull::new(r).ok_or(DocaError::DRIVER)?;
        // SAFETY: a live rdma; its ctx lives as long as it does.
        let ctx = match NonNull::new(unsafe { sys::doca_rdma_as_ctx(rdma.as_ptr()) }) {
            Some(c) => c,
            None => {
                // SAFETY: created above, never started.
                unsafe { sys::doca_rdma_destroy(rdma.as_ptr()) };
                return Err(DocaError::DRIVER);
            }
        };
        let st = State {
            cfg,
            stop_asked: false,
            conns: Vec::with_capacity(cfg.max_connections as usize),
            sends: Slots::new(cfg.send_tasks),
            recvs: Slots::new(cfg.recv_tasks),
            sends_out: 0,
            recvs_out: 0,
            events: VecDeque::with_capacity(
                cfg.send_tasks as usize + cfg.recv_tasks as usize + 2 * cfg.max_connections as usize + 4,
            ),
        };
        // Owned from here: on an error below, `Drop` destroys the (idle)
        // context.
        let me = Rdma { rdma, ctx, st: Arc::new(Mutex::new(st)), pe: pe.inner.clone(), dev: dev.clone() };
        let configured = me.configure(pe);
        // Unlocked before `me` can drop: its `Drop` takes the engine lock.
        drop(g);
        configured.map(|()| me)
    }

    fn configure(&self, pe: &ProgressEngine) -> Result<(), DocaError> {
        let (r, cfg) = (self.rdma.as_ptr(), ctx::lock(&self.st).cfg);
        // Every call below configures `r`, a created, idle rdma, with the
        // engine lock held (by `new`); the callbacks are the functions of
        // this module.
        //
        // Two-sided only: nothing of ours is open to remote reads or writes;
        // receives write into local memory.
        // SAFETY: see above.
        check(unsafe { sys::doca_rdma_set_permissions(r, sys::doca_access_flag_DOCA_ACCESS_FLAG_LOCAL_READ_WRITE) })?;
        // The contract: a send waits (is retried) while the peer has no
        // receive posted. DOCA's default RNR retry count is not documented;
        // 7 is RC's "retry for ever". A device that refuses it keeps its
        // default (sends before receives may then fail the connection).
        // SAFETY: see above.
        if let Err(e) = check(unsafe { sys::doca_rdma_set_rnr_retry_count(r, RNR_RETRY_FOREVER) }) {
            log::warn!("doca sdk: doca_rdma_set_rnr_retry_count({RNR_RETRY_FOREVER}): {e}; DOCA's default is kept");
        }
        // A send larger than the device carries would fail only at submit.
        let mut max_msg = 0u32;
        // SAFETY: an open device (held by `self.dev`).
        let info = unsafe { sys::doca_dev_as_devinfo(self.dev.inner.dev.as_ptr()) };
        // SAFETY: the open device's info; valid out-pointer.
        check(unsafe { sys::doca_rdma_cap_get_max_message_size(info, &mut max_msg) })?;
        if max_msg > 0 && cfg.max_send_size > max_msg {
            log::error!(
                "doca sdk: rdma sends of {} bytes asked for; this device carries at most {max_msg}",
                cfg.max_send_size
            );
            return Err(DocaError::INVALID_VALUE);
        }
        // `validate` keeps it at most 1024.
        let conns = u16::try_from(cfg.max_connections).map_err(|_| DocaError::INVALID_VALUE)?;
        // SAFETY: see above.
        check(unsafe { sys::doca_rdma_set_max_num_connections(r, conns) })?;
        // SAFETY: see above.
        check(unsafe { sys::doca_rdma_task_send_set_conf(r, Some(send_ok), Some(send_err), cfg.send_tasks) })?;
        // SAFETY: see above.
        check(unsafe {
            sys::doca_rdma_task_send_imm_set_conf(r, Some(send_imm_ok), Some(send_imm_err), cfg.send_tasks)
        })?;
        // SAFETY: see above.
        check(unsafe { sys::doca_rdma_task_receive_set_conf(r, Some(recv_ok), Some(recv_err), cfg.recv_tasks) })?;
        ctx::connect(&pe.inner, self.ctx, &self.st, state_changed)
    }

    /// The context's state (`Stopping` until every flushed completion has
    /// been taken, see [`ctx::reported`]).
    pub fn state(&self) -> CtxState {
        let _g = self.pe.lock();
        let doca = ctx::ctx_state(self.ctx);
        ctx::reported(doca, ctx::lock(&self.st).untaken())
    }

    /// Asks to start; the context is `Running` after a later `progress()`
    /// (or at once, if DOCA starts it synchronously).
    pub fn start(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        {
            let mut st = ctx::lock(&self.st);
            if ctx::reported(ctx::ctx_state(self.ctx), st.untaken()) != CtxState::Idle {
                return Err(DocaError::BAD_STATE);
            }
            // Only once the start is allowed: a refused start of a
            // stopping context must not turn its stop into a failure.
            st.stop_asked = false;
        }
        ctx::start(self.ctx)
    }

    /// Asks to stop: outstanding tasks are flushed with errors inside
    /// `progress()`, and the context becomes `Idle`.
    pub fn stop(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        ctx::stop(self.ctx)
    }

    /// Creates a connection and returns its blob for the peer's
    /// [`connect`](Self::connect). The context must be `Running`.
    pub fn export(&self) -> Result<(RdmaConnId, Vec<u8>), DocaError> {
        let _g = self.pe.lock();
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        let mut st = ctx::lock(&self.st);
        if st.conns.len() >= st.cfg.max_connections as usize {
            return Err(DocaError::FULL);
        }
        let mut blob: *const std::ffi::c_void = ptr::null();
        let mut len = 0usize;
        let mut conn = ptr::null_mut();
        // SAFETY: a running context; valid out-pointers; the engine lock is
        // held.
        check(unsafe { sys::doca_rdma_export(self.rdma.as_ptr(), &mut blob, &mut len, &mut conn) })?;
        let conn = NonNull::new(conn).ok_or(DocaError::DRIVER)?;
        if blob.is_null() {
            return Err(DocaError::DRIVER);
        }
        // SAFETY: DOCA returns `len` readable bytes, valid until the next
        // export; copied at once.
        let bytes = unsafe { std::slice::from_raw_parts(blob.cast::<u8>(), len) }.to_vec();
        st.conns.push(Conn { ptr: conn, connected: false, failed: false });
        Ok((RdmaConnId(st.conns.len() as u32 - 1), bytes))
    }

    /// Connects an exported connection to the peer's blob. The connection
    /// is reported `Connected` by the next `poll_event`.
    pub fn connect(&self, conn: RdmaConnId, remote_blob: &[u8]) -> Result<(), DocaError> {
        if remote_blob.is_empty() {
            return Err(DocaError::INVALID_VALUE);
        }
        let _g = self.pe.lock();
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        let mut st = ctx::lock(&self.st);
        let c = st.conns.get_mut(conn.0 as usize).ok_or(DocaError::NOT_FOUND)?;
        if c.connected || c.failed {
            return Err(DocaError::BAD_STATE);
        }
        // SAFETY: a running context and one of its exported connections;
        // the blob is readable for its length.
        check(unsafe {
            sys::doca_rdma_connect(self.rdma.as_ptr(), remote_blob.as_ptr().cast(), remote_blob.len(), c.ptr.as_ptr())
        })?;
        c.connected = true;
        st.events.push_back(RdmaEvent::Connected(conn));
        Ok(())
    }

    /// Posts a send of `buf`'s data (with a 32-bit immediate when `imm` is
    /// set) on a connected connection.
    pub fn submit_send(
        &self,
        conn: RdmaConnId,
        buf: Buf,
        imm: Option<u32>,
        user_data: u64,
    ) -> Result<(), TaskSubmitError> {
        let _g = self.pe.lock();
        let mut st = ctx::lock(&self.st);
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if st.sends_out >= st.cfg.send_tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        if buf.data_len() > st.cfg.max_send_size {
            return err(DocaError::TOO_BIG, buf);
        }
        let c = match st.conns.get(conn.0 as usize) {
            None => return err(DocaError::NOT_FOUND, buf),
            Some(c) if !c.connected || c.failed => return err(DocaError::NOT_CONNECTED, buf),
            Some(c) => c.ptr,
        };
        // DOCA sends an empty message when the source buffer is NULL (the
        // send allocators' documentation), not from a buffer without data.
        let b: *const sys::doca_buf = if buf.data_len() == 0 { ptr::null() } else { buf.buf.as_ptr() };
        let slot = match st.sends.put(SendSlot { buf, conn: conn.0, user_data }) {
            Ok(s) => s,
            Err(s) => return err(DocaError::NO_MEMORY, s.buf),
        };
        let (r, ud) = (self.rdma.as_ptr(), u64_data(u64::from(slot)));
        let mut task: *mut sys::doca_task = ptr::null_mut();
        // Both: a running context, one of its connections and a buffer the
        // slot keeps alive until the completion; valid out-pointers; the
        // engine lock is held.
        let res = match imm {
            Some(v) => {
                let mut t = ptr::null_mut();
                // SAFETY: see above.
                let e = unsafe { sys::doca_rdma_task_send_imm_allocate_init(r, c.as_ptr(), b, v.to_be(), ud, &mut t) };
                if !t.is_null() {
                    // SAFETY: the task just allocated.
                    task = unsafe { sys::doca_rdma_task_send_imm_as_task(t) };
                }
                e
            }
            None => {
                let mut t = ptr::null_mut();
                // SAFETY: see above.
                let e = unsafe { sys::doca_rdma_task_send_allocate_init(r, c.as_ptr(), b, ud, &mut t) };
                if !t.is_null() {
                    // SAFETY: the task just allocated.
                    task = unsafe { sys::doca_rdma_task_send_as_task(t) };
                }
                e
            }
        };
        match ctx::submit(res, task, None) {
            Ok(()) => {
                st.sends_out += 1;
                Ok(())
            }
            Err(error) => {
                let s = st.sends.take(u64::from(slot)).expect("the slot just filled");
                err(error, s.buf)
            }
        }
    }

    /// Posts a receive into `buf` (whose data length must be 0).
    pub fn submit_receive(&self, buf: Buf, user_data: u64) -> Result<(), TaskSubmitError> {
        let _g = self.pe.lock();
        let mut st = ctx::lock(&self.st);
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if st.recvs_out >= st.cfg.recv_tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        // A local mmap without local write access cannot take a receive:
        // DOCA would fail the task at completion with a protection error,
        // which breaks the RC connection. Refused here as in the emulated
        // backend. (An import's rights are the exporter's and unknown here:
        // `is_writable` says true, DOCA enforces them.)
        if !buf.mmap.writable {
            return err(DocaError::NOT_PERMITTED, buf);
        }
        if buf.data_len() > 0 {
            return err(DocaError::INVALID_VALUE, buf);
        }
        let b = buf.buf.as_ptr();
        let slot = match st.recvs.put(RecvSlot { buf, user_data }) {
            Ok(s) => s,
            Err(s) => return err(DocaError::NO_MEMORY, s.buf),
        };
        let mut t = ptr::null_mut();
        // SAFETY: a running context and a buffer the slot keeps alive until
        // the completion; valid out-pointer; the engine lock is held.
        let res = unsafe {
            sys::doca_rdma_task_receive_allocate_init(self.rdma.as_ptr(), b, u64_data(u64::from(slot)), &mut t)
        };
        // SAFETY: `t` is the task just allocated, or null.
        let task = if t.is_null() { ptr::null_mut() } else { unsafe { sys::doca_rdma_task_receive_as_task(t) } };
        match ctx::submit(res, task, None) {
            Ok(()) => {
                st.recvs_out += 1;
                Ok(())
            }
            Err(error) => {
                let s = st.recvs.take(u64::from(slot)).expect("the slot just filled");
                err(error, s.buf)
            }
        }
    }

    /// Takes the next event; taking a task's completion returns its slot to
    /// the pool.
    pub fn poll_event(&self) -> Option<RdmaEvent> {
        let mut st = ctx::lock(&self.st);
        let ev = st.events.pop_front()?;
        match ev {
            RdmaEvent::SendDone { .. } => st.sends_out -= 1,
            RdmaEvent::Received { .. } => st.recvs_out -= 1,
            _ => {}
        }
        Some(ev)
    }

    /// Send and receive tasks submitted whose completion has not been
    /// taken yet.
    pub fn tasks_in_use(&self) -> (u32, u32) {
        let st = ctx::lock(&self.st);
        (st.sends_out, st.recvs_out)
    }
}

impl Drop for Rdma {
    fn drop(&mut self) {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        if !ctx::stop_and_drain(&self.pe, self.ctx, &self.st) {
            return;
        }
        // SAFETY: idle, so no task is in flight and no callback will come;
        // every buffer is back in the state (dropped after this).
        if let Err(e) = check(unsafe { sys::doca_rdma_destroy(self.rdma.as_ptr()) }) {
            log::error!("doca sdk: doca_rdma_destroy: {e}");
        }
    }
}

/// A send (with or without immediate) completed: its buffer goes back to
/// the user in a `SendDone`; a failure also fails its connection (unless
/// the context is being stopped, which flushes every task).
fn send_done(task: *mut sys::doca_task, tud: sys::doca_data, cud: sys::doca_data, ok: bool) {
    let status = ctx::finish_task(task, ok);
    // SAFETY: the context's user data is its state (in an `Arc`) (`configure`).
    let Some(m) = (unsafe { ctx::shared::<State>(cud) }) else { return };
    let mut st = ctx::lock(m);
    let Some(s) = st.sends.take(data_u64(tud)) else {
        log::error!("doca sdk: a send completion for no task of ours (slot {})", data_u64(tud));
        return;
    };
    if let Err(e) = status
        && !st.stop_asked
    {
        st.fail(s.conn, e);
    }
    let status = ctx::flushed(status, st.stop_asked);
    st.events.push_back(RdmaEvent::SendDone {
        conn: RdmaConnId(s.conn),
        user_data: s.user_data,
        buf: s.buf,
        result: status,
    });
}

unsafe extern "C" fn send_ok(t: *mut sys::doca_rdma_task_send, tud: sys::doca_data, cud: sys::doca_data) {
    // SAFETY: DOCA passes a live task of this context.
    send_done(unsafe { sys::doca_rdma_task_send_as_task(t) }, tud, cud, true);
}

unsafe extern "C" fn send_err(t: *mut sys::doca_rdma_task_send, tud: sys::doca_data, cud: sys::doca_data) {
    // SAFETY: as in `send_ok`.
    send_done(unsafe { sys::doca_rdma_task_send_as_task(t) }, tud, cud, false);
}

unsafe extern "C" fn send_imm_ok(t: *mut sys::doca_rdma_task_send_imm, tud: sys::doca_data, cud: sys::doca_data) {
    // SAFETY: as in `send_ok`.
    send_done(unsafe { sys::doca_rdma_task_send_imm_as_task(t) }, tud, cud, true);
}

unsafe extern "C" fn send_imm_err(t: *mut sys::doca_rdma_task_send_imm, tud: sys::doca_data, cud: sys::doca_data) {
    // SAFETY: as in `send_ok`.
    send_done(unsafe { sys::doca_rdma_task_send_imm_as_task(t) }, tud, cud, false);
}

/// A receive completed: its buffer goes back to the user in a `Received`,
/// with the data length, the connection and the immediate on success.
fn recv_done(t: *mut sys::doca_rdma_task_receive, tud: sys::doca_data, cud: sys::doca_data, ok: bool) {
    // SAFETY: DOCA passes a live task of this context.
    let task = unsafe { sys::doca_rdma_task_receive_as_task(t) };
    // DOCA's result getters are valid for a successful receive only.
    let (conn_ptr, imm, len) = if ok {
        // SAFETY: a successful receive task (this and the getters below).
        let op = unsafe { sys::doca_rdma_task_receive_get_result_opcode(t) };
        let imm = (op == sys::doca_rdma_opcode_DOCA_RDMA_OPCODE_RECV_SEND_WITH_IMM
            || op == sys::doca_rdma_opcode_DOCA_RDMA_OPCODE_RECV_WRITE_WITH_IMM)
            // SAFETY: see above.
            .then(|| u32::from_be(unsafe { sys::doca_rdma_task_receive_get_result_immediate_data(t) }));
        // SAFETY: see above.
        let dst = unsafe { sys::doca_rdma_task_receive_get_dst_buf(t) };
        let mut len = 0usize;
        // SAFETY: the task's live destination buffer; valid out-pointer.
        let got = check(unsafe { sys::doca_buf_get_data_len(dst, &mut len) });
        // SAFETY: see above.
        let conn = unsafe { sys::doca_rdma_task_receive_get_result_rdma_connection(t) };
        (conn, imm, got.map(|()| len))
    } else {
        (ptr::null(), None, Ok(0))
    };
    let status = ctx::finish_task(task, ok).and(len.map(|_| ()));
    let len = len.unwrap_or(0);
    // SAFETY: the context's user data is its state (in an `Arc`) (`configure`).
    let Some(m) = (unsafe { ctx::shared::<State>(cud) }) else { return };
    let mut st = ctx::lock(m);
    let Some(mut s) = st.recvs.take(data_u64(tud)) else {
        log::error!("doca sdk: a receive completion for no task of ours (slot {})", data_u64(tud));
        return;
    };
    let conn = st.conn_index(conn_ptr).map(RdmaConnId);
    let status = match status {
        Ok(()) if len > s.buf.len as usize => Err(DocaError::TOO_BIG),
        Ok(()) => {
            s.buf.data_len = len as u32;
            Ok(())
        }
        e => ctx::flushed(e, st.stop_asked),
    };
    st.events.push_back(RdmaEvent::Received { conn, user_data: s.user_data, buf: s.buf, imm, result: status });
}

unsafe extern "C" fn recv_ok(t: *mut sys::doca_rdma_task_receive, tud: sys::doca_data, cud: sys::doca_data) {
    recv_done(t, tud, cud, true);
}

unsafe extern "C" fn recv_err(t: *mut sys::doca_rdma_task_receive, tud: sys::doca_data, cud: sys::doca_data) {
    recv_done(t, tud, cud, false);
}

/// The context changed state: a stop nobody asked for (DOCA stops a
/// context on a fatal error) fails every connection; once idle, the
/// connections are gone (DOCA's reference: a restarted context exports and
/// connects again), so their pointers are dropped and a restart starts
/// from an empty table, as in the emulated backend.
unsafe extern "C" fn state_changed(
    ud: sys::doca_data,
    _ctx: *mut sys::doca_ctx,
    _prev: sys::doca_ctx_states,
    next: sys::doca_ctx_states,
) {
    // SAFETY: the context's user data is its state (in an `Arc`) (`configure`).
    let Some(m) = (unsafe { ctx::shared::<State>(ud) }) else { return };
    let mut st = ctx::lock(m);
    let next = ctx::state_of(next);
    if matches!(next, CtxState::Stopping | CtxState::Idle) && !st.stop_asked {
        log::error!("doca sdk: an rdma context stopped on its own ({next:?}): its connections failed");
        for i in 0..st.conns.len() as u32 {
            st.fail(i, DocaError::CONNECTION_ABORTED);
        }
    }
    if next == CtxState::Idle {
        st.conns.clear();
    }
}
