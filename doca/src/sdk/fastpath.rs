//! The comch fast path over `doca_comch_consumer` and
//! `doca_comch_producer`: a consumer posts buffers of its mmap, which
//! producers on the peer's side of its connection fill (over PCIe, with no
//! comch message per transfer).
//!
//! Both are contexts like the others of this backend (see [`ctx`]): every
//! DOCA call runs under the engine lock, callbacks push into event queues.
//! A consumer or producer keeps its comch server or client alive (DOCA
//! requires the connection to outlive it). DOCA refuses a producer's
//! submission with `AGAIN` while the consumer has no buffer posted; that
//! error is handed to the caller, who retries after a progress.

use super::comch::Core as ComchCore;
use super::ctx::{self, data_u64, u64_data};
use super::{Buf, Mmap, MmapInner, PeInner, ProgressEngine, check};
use crate::slots::Slots;
use crate::{
    COMCH_FAST_PATH_MAX, COMCH_MAX_IMM, ComchPeer, CtxState, DocaError, FastPathConfig, FastPathEvent, Imm,
    TaskSubmitError,
};
use doca_sys as sys;
use std::collections::VecDeque;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

/// The comch context of `on` and its connection.
fn parent(on: ComchPeer<'_>) -> (Arc<ComchCore>, crate::ComchConnId) {
    match on {
        ComchPeer::Server(s, c) => (s.core().clone(), c),
        ComchPeer::Client(c) => (c.core().clone(), c.conn()),
    }
}

#[derive(Debug)]
struct ConsState {
    cfg: FastPathConfig,
    stop_asked: bool,
    posted: Slots<(Buf, u64)>,
    /// Receives submitted whose completion the user has not taken.
    recvs_out: u32,
    events: VecDeque<FastPathEvent>,
}

/// A fast-path consumer (`doca_comch_consumer`).
#[derive(Debug)]
pub struct ComchConsumer {
    cons: NonNull<sys::doca_comch_consumer>,
    ctx: NonNull<sys::doca_ctx>,
    /// On the heap: DOCA holds its address as the context's user data
    /// (leaked with the context if that never stops).
    st: Arc<Mutex<ConsState>>,
    pe: Arc<PeInner>,
    mmap: Arc<MmapInner>,
    _parent: Arc<ComchCore>,
}

// SAFETY: every DOCA call on the consumer happens under the engine lock,
// the state is behind a Mutex (see `ctx`).
unsafe impl Send for ComchConsumer {}
// SAFETY: as for Send.
unsafe impl Sync for ComchConsumer {}

impl ComchConsumer {
    /// Creates a consumer on `on`'s connection (`NOT_CONNECTED` when it is
    /// not up) for buffers of `mmap`. It starts `Idle`.
    pub fn new(pe: &ProgressEngine, on: ComchPeer<'_>, mmap: &Mmap, cfg: FastPathConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let (parent, conn) = parent(on);
        // The connection, under its context's engine lock (which may be
        // another engine than this context's).
        let c = {
            let _pg = parent.pe().lock();
            parent.connection(conn)?
        };
        let g = pe.inner.lock();
        let mut p = ptr::null_mut();
        // SAFETY: an established connection and a started mmap; valid
        // out-pointer; destroyed in `Drop`.
        check(unsafe { sys::doca_comch_consumer_create(c.as_ptr(), mmap.inner.mmap.as_ptr(), &mut p) })?;
        let cons = NonNull::new(p).ok_or(DocaError::DRIVER)?;
        // SAFETY: a live consumer; its ctx lives as long as it does.
        let Some(ctx) = NonNull::new(unsafe { sys::doca_comch_consumer_as_ctx(cons.as_ptr()) }) else {
            // SAFETY: created above, never started.
            unsafe { sys::doca_comch_consumer_destroy(cons.as_ptr()) };
            return Err(DocaError::DRIVER);
        };
        let st = ConsState {
            cfg,
            stop_asked: false,
            posted: Slots::new(cfg.tasks),
            recvs_out: 0,
            events: VecDeque::with_capacity(cfg.tasks as usize),
        };
        let me = ComchConsumer {
            cons,
            ctx,
            st: Arc::new(Mutex::new(st)),
            pe: pe.inner.clone(),
            mmap: mmap.inner.clone(),
            _parent: parent,
        };
        let configured = me.configure(pe);
        // Unlocked before `me` can drop: its `Drop` takes the engine lock.
        drop(g);
        configured.map(|()| me)
    }

    fn configure(&self, pe: &ProgressEngine) -> Result<(), DocaError> {
        let c = self.cons.as_ptr();
        // Every call below configures `c`, a created, idle consumer, with
        // the engine lock held (by `new`).
        // The immediate: as long as this API's, unless the device takes
        // less (DOCA refuses more than its capability).
        let mut max_imm = 0u32;
        // SAFETY: the parent's open device.
        let info = unsafe { sys::doca_dev_as_devinfo(self._parent.device().inner.dev.as_ptr()) };
        // SAFETY: the open device's info; valid out-pointer.
        check(unsafe { sys::doca_comch_consumer_cap_get_max_imm_data_len(info, &mut max_imm) })?;
        // SAFETY: see above.
        check(unsafe { sys::doca_comch_consumer_set_imm_data_len(c, max_imm.min(COMCH_MAX_IMM as u32)) })?;
        // SAFETY: see above; the callbacks are this module's.
        check(unsafe {
            sys::doca_comch_consumer_task_post_recv_set_conf(c, Some(recv_ok), Some(recv_err), self.cfg().tasks)
        })?;
        ctx::connect(&pe.inner, self.ctx, &self.st, cons_state_changed)
    }

    fn cfg(&self) -> FastPathConfig {
        ctx::lock(&self.st).cfg
    }

    /// The consumer's id, which the peer's producers send to.
    pub fn id(&self) -> u32 {
        let _g = self.pe.lock();
        let mut id = 0;
        // SAFETY: a live consumer; valid out-pointer.
        if let Err(e) = check(unsafe { sys::doca_comch_consumer_get_id(self.cons.as_ptr(), &mut id) }) {
            log::error!("doca sdk: doca_comch_consumer_get_id: {e}");
        }
        id
    }

    /// The context's state (`Stopping` until flushed completions are taken).
    pub fn state(&self) -> CtxState {
        let _g = self.pe.lock();
        self.state_locked()
    }

    /// Asks to start.
    pub fn start(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        if self.state_locked() != CtxState::Idle {
            return Err(DocaError::BAD_STATE);
        }
        ctx::lock(&self.st).stop_asked = false;
        ctx::start(self.ctx)
    }

    fn state_locked(&self) -> CtxState {
        ctx::reported(ctx::ctx_state(self.ctx), ctx::lock(&self.st).recvs_out > 0)
    }

    /// Asks to stop: posted receives are flushed with `SHUTDOWN`.
    pub fn stop(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        ctx::stop(self.ctx)
    }

    /// Posts `buf` (of this consumer's mmap, with no data) for a producer
    /// to fill.
    pub fn submit_receive(&self, buf: Buf, user_data: u64) -> Result<(), TaskSubmitError> {
        let _g = self.pe.lock();
        let mut st = ctx::lock(&self.st);
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if st.recvs_out >= st.cfg.tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        if !Arc::ptr_eq(&buf.mmap, &self.mmap) || buf.data_len() > 0 {
            return err(DocaError::INVALID_VALUE, buf);
        }
        let b = buf.buf.as_ptr();
        let slot = match st.posted.put((buf, user_data)) {
            Ok(s) => s,
            Err((buf, _)) => return err(DocaError::NO_MEMORY, buf),
        };
        let mut t = ptr::null_mut();
        // SAFETY: a running consumer and a buffer of its mmap, which the
        // slot keeps alive until the completion; valid out-pointer.
        let alloc = unsafe { sys::doca_comch_consumer_task_post_recv_alloc_init(self.cons.as_ptr(), b, &mut t) };
        let task = if t.is_null() {
            ptr::null_mut()
        } else {
            // SAFETY: the task just allocated.
            unsafe { sys::doca_comch_consumer_task_post_recv_as_task(t) }
        };
        match ctx::submit(alloc, task, Some(u64_data(u64::from(slot)))) {
            Ok(()) => {
                st.recvs_out += 1;
                Ok(())
            }
            Err(error) => {
                let (buf, _) = st.posted.take(u64::from(slot)).expect("the slot just filled");
                err(error, buf)
            }
        }
    }

    /// Takes the next event; taking a completion returns its slot.
    pub fn poll_event(&self) -> Option<FastPathEvent> {
        let mut st = ctx::lock(&self.st);
        let ev = st.events.pop_front()?;
        st.recvs_out -= 1;
        Some(ev)
    }
}

impl Drop for ComchConsumer {
    fn drop(&mut self) {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        if !ctx::stop_and_drain(&self.pe, self.ctx, &self.st) {
            return;
        }
        // SAFETY: idle: no task in flight, no callback to come.
        if let Err(e) = check(unsafe { sys::doca_comch_consumer_destroy(self.cons.as_ptr()) }) {
            log::error!("doca sdk: doca_comch_consumer_destroy: {e}");
        }
    }
}

/// A post-receive completed: the buffer goes back with what was written.
fn recv_done(t: *mut sys::doca_comch_consumer_task_post_recv, tud: sys::doca_data, cud: sys::doca_data, ok: bool) {
    // Result getters are valid on a successful completion only.
    let (imm, producer, len) = if ok {
        // SAFETY: a successful task of this consumer (this and the getters
        // below).
        let p = unsafe { sys::doca_comch_consumer_task_post_recv_get_imm_data(t) };
        // SAFETY: see above.
        let n = unsafe { sys::doca_comch_consumer_task_post_recv_get_imm_data_len(t) } as usize;
        let imm = if p.is_null() {
            Imm::default()
        } else {
            // SAFETY: DOCA's immediate bytes, `n` of them, valid in the
            // callback.
            Imm::new(unsafe { std::slice::from_raw_parts(p, n.min(COMCH_MAX_IMM)) }).unwrap_or_default()
        };
        // SAFETY: see above.
        let producer = unsafe { sys::doca_comch_consumer_task_post_recv_get_producer_id(t) };
        // SAFETY: see above.
        let b = unsafe { sys::doca_comch_consumer_task_post_recv_get_buf(t) };
        let mut len = 0usize;
        // SAFETY: the task's live buffer; valid out-pointer.
        let got = check(unsafe { sys::doca_buf_get_data_len(b, &mut len) });
        (imm, producer, got.map(|()| len))
    } else {
        (Imm::default(), 0, Ok(0))
    };
    // SAFETY: DOCA passes a live task of this consumer.
    let task = unsafe { sys::doca_comch_consumer_task_post_recv_as_task(t) };
    let status = ctx::finish_task(task, ok).and(len.map(|_| ()));
    // SAFETY: the context's user data is its state (in an `Arc`) (`configure`).
    let Some(m) = (unsafe { ctx::shared::<ConsState>(cud) }) else { return };
    let mut st = ctx::lock(m);
    let Some((mut buf, user_data)) = st.posted.take(data_u64(tud)) else {
        log::error!("doca sdk: a post-receive completion for no task of ours (slot {})", data_u64(tud));
        return;
    };
    let result = match (ctx::flushed(status, st.stop_asked), len) {
        (Ok(()), Ok(n)) if n <= buf.len as usize => {
            buf.data_len = n as u32;
            Ok(())
        }
        (Ok(()), _) => Err(DocaError::TOO_BIG),
        (e, _) => e,
    };
    st.events.push_back(FastPathEvent::Received { user_data, buf, imm, producer, result });
}

unsafe extern "C" fn recv_ok(
    t: *mut sys::doca_comch_consumer_task_post_recv,
    tud: sys::doca_data,
    cud: sys::doca_data,
) {
    recv_done(t, tud, cud, true);
}

unsafe extern "C" fn recv_err(
    t: *mut sys::doca_comch_consumer_task_post_recv,
    tud: sys::doca_data,
    cud: sys::doca_data,
) {
    recv_done(t, tud, cud, false);
}

unsafe extern "C" fn cons_state_changed(
    _ud: sys::doca_data,
    _ctx: *mut sys::doca_ctx,
    _prev: sys::doca_ctx_states,
    _next: sys::doca_ctx_states,
) {
}

#[derive(Debug)]
struct SendSlot {
    buf: Buf,
    user_data: u64,
    /// The immediate, alive until the completion (DOCA takes a pointer).
    imm: [u8; COMCH_MAX_IMM],
}

#[derive(Debug)]
struct ProdState {
    cfg: FastPathConfig,
    stop_asked: bool,
    sends: Slots<SendSlot>,
    /// Sends submitted whose completion the user has not taken.
    sends_out: u32,
    events: VecDeque<FastPathEvent>,
}

/// A fast-path producer (`doca_comch_producer`).
#[derive(Debug)]
pub struct ComchProducer {
    prod: NonNull<sys::doca_comch_producer>,
    ctx: NonNull<sys::doca_ctx>,
    /// On the heap: DOCA holds its address as the context's user data
    /// (leaked with the context if that never stops).
    st: Arc<Mutex<ProdState>>,
    pe: Arc<PeInner>,
    _parent: Arc<ComchCore>,
}

// SAFETY: as for `ComchConsumer`.
unsafe impl Send for ComchProducer {}
// SAFETY: as for Send.
unsafe impl Sync for ComchProducer {}

impl ComchProducer {
    /// Creates a producer on `on`'s connection (`NOT_CONNECTED` when it is
    /// not up). It starts `Idle`.
    pub fn new(pe: &ProgressEngine, on: ComchPeer<'_>, cfg: FastPathConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let (parent, conn) = parent(on);
        // The connection, under its context's engine lock (which may be
        // another engine than this context's).
        let c = {
            let _pg = parent.pe().lock();
            parent.connection(conn)?
        };
        let g = pe.inner.lock();
        let mut p = ptr::null_mut();
        // SAFETY: an established connection; valid out-pointer; destroyed
        // in `Drop`.
        check(unsafe { sys::doca_comch_producer_create(c.as_ptr(), &mut p) })?;
        let prod = NonNull::new(p).ok_or(DocaError::DRIVER)?;
        // SAFETY: a live producer; its ctx lives as long as it does.
        let Some(ctx) = NonNull::new(unsafe { sys::doca_comch_producer_as_ctx(prod.as_ptr()) }) else {
            // SAFETY: created above, never started.
            unsafe { sys::doca_comch_producer_destroy(prod.as_ptr()) };
            return Err(DocaError::DRIVER);
        };
        let st = ProdState {
            cfg,
            stop_asked: false,
            sends: Slots::new(cfg.tasks),
            sends_out: 0,
            events: VecDeque::with_capacity(cfg.tasks as usize),
        };
        let me = ComchProducer { prod, ctx, st: Arc::new(Mutex::new(st)), pe: pe.inner.clone(), _parent: parent };
        // SAFETY: a created, idle producer; the engine lock is held; the
        // callbacks are this module's.
        let configured = check(unsafe {
            sys::doca_comch_producer_task_send_set_conf(prod.as_ptr(), Some(send_ok), Some(send_err), cfg.tasks)
        })
        .and_then(|()| ctx::connect(&pe.inner, me.ctx, &me.st, prod_state_changed));
        // Unlocked before `me` can drop: its `Drop` takes the engine lock.
        drop(g);
        configured.map(|()| me)
    }

    /// The producer's id, which consumers report with what it wrote.
    pub fn id(&self) -> u32 {
        let _g = self.pe.lock();
        let mut id = 0;
        // SAFETY: a live producer; valid out-pointer.
        if let Err(e) = check(unsafe { sys::doca_comch_producer_get_id(self.prod.as_ptr(), &mut id) }) {
            log::error!("doca sdk: doca_comch_producer_get_id: {e}");
        }
        id
    }

    /// The context's state (`Stopping` until flushed completions are taken).
    pub fn state(&self) -> CtxState {
        let _g = self.pe.lock();
        self.state_locked()
    }

    fn state_locked(&self) -> CtxState {
        ctx::reported(ctx::ctx_state(self.ctx), ctx::lock(&self.st).sends_out > 0)
    }

    /// Asks to start.
    pub fn start(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        if self.state_locked() != CtxState::Idle {
            return Err(DocaError::BAD_STATE);
        }
        ctx::lock(&self.st).stop_asked = false;
        ctx::start(self.ctx)
    }

    /// Asks to stop: queued sends are flushed with `SHUTDOWN`.
    pub fn stop(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        ctx::stop(self.ctx)
    }

    /// Sends `buf`'s data with `imm` into a posted buffer of the peer's
    /// consumer `consumer`; `AGAIN` (DOCA's) while it has none posted.
    pub fn submit_send(&self, buf: Buf, consumer: u32, imm: &[u8], user_data: u64) -> Result<(), TaskSubmitError> {
        let _g = self.pe.lock();
        let mut st = ctx::lock(&self.st);
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if imm.len() > COMCH_MAX_IMM {
            return err(DocaError::INVALID_VALUE, buf);
        }
        if buf.data_len() > COMCH_FAST_PATH_MAX {
            return err(DocaError::TOO_BIG, buf);
        }
        if st.sends_out >= st.cfg.tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        let b = buf.buf.as_ptr();
        let mut bytes = [0u8; COMCH_MAX_IMM];
        bytes[..imm.len()].copy_from_slice(imm);
        let slot = match st.sends.put(SendSlot { buf, user_data, imm: bytes }) {
            Ok(s) => s,
            Err(s) => return err(DocaError::NO_MEMORY, s.buf),
        };
        let imm_ptr = match st.sends.get_mut(slot) {
            Some(s) if !imm.is_empty() => s.imm.as_mut_ptr(),
            _ => ptr::null_mut(),
        };
        let mut t = ptr::null_mut();
        // SAFETY: a running producer; the buffer and the immediate live in
        // the slot (a fixed table: its entries do not move) until the
        // completion; valid out-pointer.
        let alloc = unsafe {
            sys::doca_comch_producer_task_send_alloc_init(
                self.prod.as_ptr(),
                b,
                imm_ptr,
                imm.len() as u32,
                consumer,
                &mut t,
            )
        };
        let task = if t.is_null() {
            ptr::null_mut()
        } else {
            // SAFETY: the task just allocated.
            unsafe { sys::doca_comch_producer_task_send_as_task(t) }
        };
        match ctx::submit(alloc, task, Some(u64_data(u64::from(slot)))) {
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

    /// Takes the next event; taking a completion returns its slot.
    pub fn poll_event(&self) -> Option<FastPathEvent> {
        let mut st = ctx::lock(&self.st);
        let ev = st.events.pop_front()?;
        st.sends_out -= 1;
        Some(ev)
    }
}

impl Drop for ComchProducer {
    fn drop(&mut self) {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        if !ctx::stop_and_drain(&self.pe, self.ctx, &self.st) {
            return;
        }
        // SAFETY: idle: no task in flight, no callback to come.
        if let Err(e) = check(unsafe { sys::doca_comch_producer_destroy(self.prod.as_ptr()) }) {
            log::error!("doca sdk: doca_comch_producer_destroy: {e}");
        }
    }
}

fn send_done(t: *mut sys::doca_comch_producer_task_send, tud: sys::doca_data, cud: sys::doca_data, ok: bool) {
    // SAFETY: DOCA passes a live task of this producer.
    let task = unsafe { sys::doca_comch_producer_task_send_as_task(t) };
    let status = ctx::finish_task(task, ok);
    // SAFETY: the context's user data is its state (in an `Arc`).
    let Some(m) = (unsafe { ctx::shared::<ProdState>(cud) }) else { return };
    let mut st = ctx::lock(m);
    let result = ctx::flushed(status, st.stop_asked);
    match st.sends.take(data_u64(tud)) {
        Some(s) => st.events.push_back(FastPathEvent::SendDone { user_data: s.user_data, buf: s.buf, result }),
        None => log::error!("doca sdk: a producer send completion for no task of ours (slot {})", data_u64(tud)),
    }
}

unsafe extern "C" fn send_ok(t: *mut sys::doca_comch_producer_task_send, tud: sys::doca_data, cud: sys::doca_data) {
    send_done(t, tud, cud, true);
}

unsafe extern "C" fn send_err(t: *mut sys::doca_comch_producer_task_send, tud: sys::doca_data, cud: sys::doca_data) {
    send_done(t, tud, cud, false);
}

unsafe extern "C" fn prod_state_changed(
    _ud: sys::doca_data,
    _ctx: *mut sys::doca_ctx,
    _prev: sys::doca_ctx_states,
    _next: sys::doca_ctx_states,
) {
}
