//! Comch over `doca_comch`: the server on the DPU (bound to the host PF's
//! representor) and the client on the host, with send tasks, received
//! messages and connection events.
//!
//! Received messages are copied out of DOCA's receive buffer inside the
//! callback (DOCA owns it only for the callback's duration) into buffers
//! recycled through the event queue; `poll_event` copies them into the
//! caller's buffer. A message being sent is copied into its task's slot,
//! which stays alive until the send completes.
//!
//! The server's representor is the host PF's: the one whose PCI address
//! [`HOST_REP_ENV`] names, else the device's first network representor of
//! a PF (the list also holds VF and SF representors), else its first.
//! A client is `Connected` when its context is running (DOCA's client runs
//! once connected) and `Disconnected` when it leaves running; a server's
//! clients are `Disconnected` when it stops.

use super::ctx::{self, data_u64, u64_data};
use super::{Device, PeInner, ProgressEngine, check};
use crate::slots::Slots;
use crate::{ComchConfig, ComchConnId, ComchEvent, CtxState, DocaError};
use doca_sys as sys;
use std::collections::VecDeque;
use std::ffi::{CStr, CString, c_char};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};

/// Environment variable naming the PCI address of the representor a comch
/// server is bound to (the host PF's, as `doca_devinfo_rep_get_pci_addr_str`
/// spells it); without it, the device's first PF network representor.
pub const HOST_REP_ENV: &str = "DNE_DOCA_HOST_REP";

#[derive(Debug)]
enum Ev {
    Public(ComchEvent),
    Msg { conn: ComchConnId, bytes: Vec<u8> },
}

#[derive(Debug)]
struct Peer {
    ptr: NonNull<sys::doca_comch_connection>,
    id: ComchConnId,
}

#[derive(Debug)]
struct SendSlot {
    conn: ComchConnId,
    user_data: u64,
}

#[derive(Debug)]
struct State {
    cfg: ComchConfig,
    stop_asked: bool,
    /// Connected peers by slot (a client has one, slot 0).
    peers: Vec<Option<Peer>>,
    /// Generation of the next server connection (the id's high bits).
    next_gen: u32,
    sends: Slots<SendSlot>,
    /// The bytes of each send slot's message, alive until it completes.
    send_bufs: Vec<Box<[u8]>>,
    /// Sends submitted whose completion the user has not taken.
    sends_out: u32,
    events: VecDeque<Ev>,
    /// Message buffers given back by `poll_event`, reused by the receive
    /// callback.
    spare: Vec<Vec<u8>>,
    /// The client this state belongs to (`None` for a server).
    client: Option<NonNull<sys::doca_comch_client>>,
}

// SAFETY: the connection pointers are only used under the engine lock
// (see `ctx`).
unsafe impl Send for State {}

impl State {
    fn new(cfg: ComchConfig, peers: usize, client: Option<NonNull<sys::doca_comch_client>>) -> Self {
        let max = cfg.max_msg_size as usize;
        Self {
            cfg,
            stop_asked: false,
            peers: (0..peers).map(|_| None).collect(),
            next_gen: 1,
            sends: Slots::new(cfg.send_tasks),
            send_bufs: (0..cfg.send_tasks).map(|_| vec![0u8; max].into_boxed_slice()).collect(),
            sends_out: 0,
            events: VecDeque::with_capacity(cfg.recv_queue as usize + cfg.send_tasks as usize + 2 * peers),
            spare: (0..cfg.recv_queue).map(|_| Vec::with_capacity(max)).collect(),
            client,
        }
    }

    fn peer(&self, id: ComchConnId) -> Option<&Peer> {
        self.peers.get(id.index() as usize)?.as_ref().filter(|p| p.id == id)
    }

    fn take_event(&mut self, out: &mut [u8]) -> Option<ComchEvent> {
        match self.events.pop_front()? {
            Ev::Public(e) => {
                if let ComchEvent::SendDone { .. } = e {
                    self.sends_out -= 1;
                }
                Some(e)
            }
            Ev::Msg { conn, bytes } => {
                let n = bytes.len().min(out.len());
                out[..n].copy_from_slice(&bytes[..n]);
                let ev = ComchEvent::Message { conn, len: bytes.len() as u32, truncated: n < bytes.len() };
                self.spare.push(bytes);
                Some(ev)
            }
        }
    }

    fn message(&mut self, conn: ComchConnId, data: &[u8]) {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(data);
        self.events.push_back(Ev::Msg { conn, bytes: b });
    }
}

/// What distinguishes a server from a client.
#[derive(Debug)]
enum Kind {
    Server { srv: NonNull<sys::doca_comch_server>, rep: NonNull<sys::doca_dev_rep> },
    Client { cli: NonNull<sys::doca_comch_client> },
}

/// One comch context and what it shares with its callbacks.
#[derive(Debug)]
pub(super) struct Core {
    kind: Kind,
    ctx: NonNull<sys::doca_ctx>,
    /// On the heap: DOCA holds its address as the context's user data
    /// (leaked with the context if that never stops).
    st: Arc<Mutex<State>>,
    pe: Arc<PeInner>,
    _dev: Device,
}

// SAFETY: every DOCA call on the context happens under the engine lock
// (`pe`), the state is behind a Mutex (see `ctx`).
unsafe impl Send for Core {}
// SAFETY: as for Send.
unsafe impl Sync for Core {}

impl Core {
    /// Configures a created context and connects it to the engine. The
    /// caller holds the engine lock.
    fn configure(&self, pe: &ProgressEngine, dev: &Device) -> Result<(), DocaError> {
        let cfg = ctx::lock(&self.st).cfg;
        let mut cap = 0u32;
        // SAFETY: an open device.
        let info = unsafe { sys::doca_dev_as_devinfo(dev.inner.dev.as_ptr()) };
        // SAFETY: the open device's info; valid out-pointer.
        check(unsafe { sys::doca_comch_cap_get_max_msg_size(info, &mut cap) })?;
        if cfg.max_msg_size > cap {
            log::error!(
                "doca sdk: comch messages of {} bytes asked for; this device carries at most {cap}",
                cfg.max_msg_size
            );
            return Err(DocaError::INVALID_VALUE);
        }
        // DOCA's receive queue and send task pool may not exceed the
        // device's; a smaller one only means DOCA reads fewer messages per
        // round (they are queued here until taken) or refuses a send with
        // NO_MEMORY earlier (the backpressure `send` reports anyway).
        let (mut max_queue, mut max_tasks) = (0u32, 0u32);
        // SAFETY: the open device's info; valid out-pointer.
        check(unsafe { sys::doca_comch_cap_get_max_recv_queue_size(info, &mut max_queue) })?;
        // SAFETY: as above.
        check(unsafe { sys::doca_comch_cap_get_max_send_tasks(info, &mut max_tasks) })?;
        let recv_queue = if max_queue > 0 { cfg.recv_queue.min(max_queue) } else { cfg.recv_queue };
        let send_tasks = if max_tasks > 0 { cfg.send_tasks.min(max_tasks) } else { cfg.send_tasks };
        if (recv_queue, send_tasks) != (cfg.recv_queue, cfg.send_tasks) {
            log::info!(
                "doca sdk: comch receive queue {recv_queue} (asked {}), send tasks {send_tasks} (asked {}): the device's limits",
                cfg.recv_queue,
                cfg.send_tasks
            );
        }
        // Every call below configures a created, idle context, with the
        // engine lock held; the callbacks are the functions of this module
        // and the user data is the state (in an `Arc`), which outlives the context.
        match self.kind {
            Kind::Server { srv, .. } => {
                let s = srv.as_ptr();
                // SAFETY: see above.
                check(unsafe {
                    sys::doca_comch_server_task_send_set_conf(s, Some(send_ok), Some(send_err), send_tasks)
                })?;
                // SAFETY: see above.
                check(unsafe { sys::doca_comch_server_event_msg_recv_register(s, Some(server_msg)) })?;
                // SAFETY: see above.
                check(unsafe {
                    sys::doca_comch_server_event_connection_status_changed_register(
                        s,
                        Some(server_connected),
                        Some(server_disconnected),
                    )
                })?;
                // SAFETY: see above.
                check(unsafe { sys::doca_comch_server_set_max_msg_size(s, cfg.max_msg_size) })?;
                // SAFETY: see above.
                check(unsafe { sys::doca_comch_server_set_recv_queue_size(s, recv_queue) })?;
                // SAFETY: see above.
                check(unsafe {
                    sys::doca_comch_server_event_consumer_register(
                        s,
                        Some(server_consumer_up),
                        Some(server_consumer_down),
                    )
                })?;
            }
            Kind::Client { cli } => {
                let c = cli.as_ptr();
                // SAFETY: see above.
                check(unsafe {
                    sys::doca_comch_client_task_send_set_conf(c, Some(send_ok), Some(send_err), send_tasks)
                })?;
                // SAFETY: see above.
                check(unsafe { sys::doca_comch_client_event_msg_recv_register(c, Some(client_msg)) })?;
                // SAFETY: see above.
                check(unsafe { sys::doca_comch_client_set_max_msg_size(c, cfg.max_msg_size) })?;
                // SAFETY: see above.
                check(unsafe { sys::doca_comch_client_set_recv_queue_size(c, recv_queue) })?;
                // SAFETY: see above.
                check(unsafe {
                    sys::doca_comch_client_event_consumer_register(
                        c,
                        Some(client_consumer_up),
                        Some(client_consumer_down),
                    )
                })?;
            }
        }
        ctx::connect(&pe.inner, self.ctx, &self.st, state_changed)
    }

    fn finish(self, pe: &ProgressEngine, dev: &Device, g: std::sync::MutexGuard<'_, ()>) -> Result<Self, DocaError> {
        let configured = self.configure(pe, dev);
        // Unlocked before `self` can drop: its `Drop` takes the engine lock.
        drop(g);
        configured.map(|()| self)
    }

    /// DOCA's state, `Stopping` until every send completion of a stopped
    /// context has been taken (see [`ctx::reported`]).
    fn state(&self) -> CtxState {
        let _g = self.pe.lock();
        let doca = ctx::ctx_state(self.ctx);
        ctx::reported(doca, ctx::lock(&self.st).sends_out > 0)
    }

    fn start(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        {
            let mut st = ctx::lock(&self.st);
            if ctx::reported(ctx::ctx_state(self.ctx), st.sends_out > 0) != CtxState::Idle {
                return Err(DocaError::BAD_STATE);
            }
            // Only once the start is allowed (as for `Rdma::start`).
            st.stop_asked = false;
        }
        ctx::start(self.ctx)
    }

    fn stop(&self) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        ctx::stop(self.ctx)
    }

    fn send(&self, id: ComchConnId, msg: &[u8], user_data: u64) -> Result<(), DocaError> {
        let _g = self.pe.lock();
        let mut st = ctx::lock(&self.st);
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        if msg.is_empty() {
            return Err(DocaError::INVALID_VALUE);
        }
        if msg.len() > st.cfg.max_msg_size as usize {
            return Err(DocaError::TOO_BIG);
        }
        let peer = st.peer(id).ok_or(DocaError::NOT_CONNECTED)?.ptr;
        if st.sends_out >= st.cfg.send_tasks {
            return Err(DocaError::NO_MEMORY);
        }
        let slot = st.sends.put(SendSlot { conn: id, user_data }).map_err(|_| DocaError::NO_MEMORY)?;
        let bytes = &mut st.send_bufs[slot as usize][..msg.len()];
        bytes.copy_from_slice(msg);
        let (p, n) = (bytes.as_ptr(), msg.len() as u32);
        let mut t = ptr::null_mut();
        // Both: a running context and one of its connections; the message
        // bytes live in the slot until the completion; valid out-pointer;
        // the engine lock is held.
        let r = check(match self.kind {
            // SAFETY: see above.
            Kind::Server { srv, .. } => unsafe {
                sys::doca_comch_server_task_send_alloc_init(srv.as_ptr(), peer.as_ptr(), p.cast(), n, &mut t)
            },
            // SAFETY: see above.
            Kind::Client { cli } => unsafe {
                sys::doca_comch_client_task_send_alloc_init(cli.as_ptr(), peer.as_ptr(), p.cast(), n, &mut t)
            },
        })
        .and_then(|()| {
            if t.is_null() {
                return Err(DocaError::DRIVER);
            }
            // SAFETY: the task just allocated.
            let task = unsafe { sys::doca_comch_task_send_as_task(t) };
            // SAFETY: as above; the slot is its user data.
            unsafe { sys::doca_task_set_user_data(task, u64_data(u64::from(slot))) };
            // SAFETY: as above.
            check(unsafe { sys::doca_task_submit(task) }).inspect_err(|_| {
                // SAFETY: allocated, not submitted.
                unsafe { sys::doca_task_free(task) }
            })
        });
        match r {
            Ok(()) => {
                st.sends_out += 1;
                Ok(())
            }
            Err(e) => {
                st.sends.take(u64::from(slot));
                Err(e)
            }
        }
    }

    /// The DOCA connection of `id` and the engine lock's owner, for a
    /// fast-path context created on it (`NOT_CONNECTED` when it is not up).
    /// The caller holds the engine lock.
    pub(super) fn connection(&self, id: ComchConnId) -> Result<NonNull<sys::doca_comch_connection>, DocaError> {
        if ctx::ctx_state(self.ctx) != CtxState::Running {
            return Err(DocaError::NOT_CONNECTED);
        }
        ctx::lock(&self.st).peer(id).map(|p| p.ptr).ok_or(DocaError::NOT_CONNECTED)
    }

    pub(super) fn pe(&self) -> &Arc<PeInner> {
        &self.pe
    }

    /// The device the context runs on.
    pub(super) fn device(&self) -> &Device {
        &self._dev
    }

    fn poll_event(&self, msg: &mut [u8]) -> Option<ComchEvent> {
        ctx::lock(&self.st).take_event(msg)
    }

    fn max_msg_size(&self) -> u32 {
        ctx::lock(&self.st).cfg.max_msg_size
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        let _g = self.pe.lock();
        ctx::lock(&self.st).stop_asked = true;
        if !ctx::stop_and_drain(&self.pe, self.ctx, &self.st) {
            return;
        }
        let r = match self.kind {
            Kind::Server { srv, rep } => {
                // SAFETY: idle: no task in flight, no callback to come.
                let r = check(unsafe { sys::doca_comch_server_destroy(srv.as_ptr()) });
                // SAFETY: the server bound to it is destroyed.
                if let Err(e) = check(unsafe { sys::doca_dev_rep_close(rep.as_ptr()) }) {
                    log::error!("doca sdk: doca_dev_rep_close: {e}");
                }
                r
            }
            // SAFETY: idle: no task in flight, no callback to come.
            Kind::Client { cli } => check(unsafe { sys::doca_comch_client_destroy(cli.as_ptr()) }),
        };
        if let Err(e) = r {
            log::error!("doca sdk: destroying a comch context: {e}");
        }
    }
}

fn c_name(name: &str) -> Result<CString, DocaError> {
    CString::new(name).map_err(|_| DocaError::INVALID_VALUE)
}

/// Opens the host PF's representor on `dev` (see the module doc).
fn host_rep(dev: &Device) -> Result<NonNull<sys::doca_dev_rep>, DocaError> {
    // Empty (as the packaged defaults file leaves it) is unset.
    let want = std::env::var(HOST_REP_ENV).ok().filter(|w| !w.is_empty());
    let mut list = ptr::null_mut();
    let mut n = 0u32;
    // SAFETY: an open device; valid out-pointers; the list is destroyed
    // below.
    check(unsafe {
        sys::doca_devinfo_rep_create_list(
            dev.inner.dev.as_ptr(),
            sys::doca_devinfo_rep_filter_DOCA_DEVINFO_REP_FILTER_NET as i32,
            &mut list,
            &mut n,
        )
    })?;
    // The entry to open: the one at the configured address; without one,
    // the first PF representor (the host PF's: the list also holds the
    // host's VFs and the DPU's SFs), else the first of the list.
    let mut chosen: Option<(*mut sys::doca_devinfo_rep, String)> = None;
    for i in 0..n as usize {
        // SAFETY: i < n, the length DOCA returned with the list.
        let ri = unsafe { list.wrapping_add(i).read() };
        let mut pci = [0 as c_char; 64];
        // SAFETY: a live list entry; the buffer is larger than DOCA's
        // PCI address size.
        if check(unsafe { sys::doca_devinfo_rep_get_pci_addr_str(ri, pci.as_mut_ptr()) }).is_err() {
            continue;
        }
        // SAFETY: DOCA NUL-terminates the string inside the buffer.
        let addr = unsafe { CStr::from_ptr(pci.as_ptr()) }.to_string_lossy().into_owned();
        if let Some(w) = &want {
            if *w == addr {
                chosen = Some((ri, addr));
                break;
            }
            continue;
        }
        let mut ty: sys::doca_pci_func_type = sys::doca_pci_func_type_DOCA_PCI_FUNC_TYPE_VF;
        // SAFETY: a live list entry; valid out-pointer.
        let pf = check(unsafe { sys::doca_devinfo_rep_get_pci_func_type(ri, &mut ty) }).is_ok()
            && ty == sys::doca_pci_func_type_DOCA_PCI_FUNC_TYPE_PF;
        if pf {
            chosen = Some((ri, addr));
            break;
        }
        if chosen.is_none() {
            chosen = Some((ri, addr));
        }
    }
    let found = match &chosen {
        Some((ri, addr)) => {
            let mut rep = ptr::null_mut();
            // SAFETY: a live list entry; valid out-pointer; closed by the
            // server's `Drop`.
            let r = check(unsafe { sys::doca_dev_rep_open(*ri, &mut rep) })
                .and_then(|()| NonNull::new(rep).ok_or(DocaError::DRIVER));
            if r.is_ok() {
                log::info!("doca sdk: comch server on representor {addr}");
            }
            r
        }
        None => Err(DocaError::NOT_FOUND),
    };
    // SAFETY: the list came from `doca_devinfo_rep_create_list`; an opened
    // representor stays valid after it is destroyed.
    unsafe { sys::doca_devinfo_rep_destroy_list(list) };
    if found.is_err() {
        log::error!(
            "doca sdk: no network representor{} on {} for the comch server (set {HOST_REP_ENV})",
            want.map(|w| format!(" at {w}")).unwrap_or_default(),
            dev.info().name
        );
    }
    found
}

macro_rules! ctx_common {
    ($t:ident) => {
        impl $t {
            /// The context's state.
            pub fn state(&self) -> CtxState {
                self.core.state()
            }

            /// Asks to stop: peers are disconnected and outstanding sends
            /// fail inside `progress()`; the context then becomes `Idle`.
            pub fn stop(&self) -> Result<(), DocaError> {
                self.core.stop()
            }

            /// Takes the next event. A message's bytes are copied into
            /// `msg` (which should hold `max_msg_size` bytes); taking a
            /// send's completion returns its slot to the pool.
            pub fn poll_event(&self, msg: &mut [u8]) -> Option<ComchEvent> {
                self.core.poll_event(msg)
            }

            /// The configured message cap (checked against the device's).
            pub fn max_msg_size(&self) -> u32 {
                self.core.max_msg_size()
            }

            /// Asks to start; the context is `Running` after a later
            /// `progress()`.
            pub fn start(&self) -> Result<(), DocaError> {
                self.core.start()
            }
        }
    };
}

/// A comch server (`doca_comch_server`, on the DPU).
#[derive(Debug)]
pub struct ComchServer {
    core: Arc<Core>,
}

ctx_common!(ComchServer);

impl ComchServer {
    pub(super) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Creates a server named `name` on `dev` (bound to the host PF's
    /// representor), connected to `pe`. It starts `Idle`.
    pub fn new(pe: &ProgressEngine, dev: &Device, name: &str, cfg: ComchConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let cname = c_name(name)?;
        let g = pe.inner.lock();
        let rep = host_rep(dev)?;
        let mut s = ptr::null_mut();
        // SAFETY: an open device and representor; a NUL-terminated name;
        // valid out-pointer; destroyed by `Core::drop`.
        let created = check(unsafe {
            sys::doca_comch_server_create(dev.inner.dev.as_ptr(), rep.as_ptr(), cname.as_ptr(), &mut s)
        })
        .and_then(|()| NonNull::new(s).ok_or(DocaError::DRIVER))
        // SAFETY: a live server; its ctx lives as long as it does.
        .map(|srv| (srv, NonNull::new(unsafe { sys::doca_comch_server_as_ctx(srv.as_ptr()) })));
        let (srv, ctx) = match created {
            Ok((srv, Some(ctx))) => (srv, ctx),
            Ok((srv, None)) => {
                // SAFETY: created above, never started.
                unsafe { sys::doca_comch_server_destroy(srv.as_ptr()) };
                // SAFETY: opened above; its server is destroyed.
                unsafe { sys::doca_dev_rep_close(rep.as_ptr()) };
                return Err(DocaError::DRIVER);
            }
            Err(e) => {
                // SAFETY: opened above, used by nothing.
                unsafe { sys::doca_dev_rep_close(rep.as_ptr()) };
                return Err(e);
            }
        };
        let st = Arc::new(Mutex::new(State::new(cfg, cfg.max_clients as usize, None)));
        let core = Core { kind: Kind::Server { srv, rep }, ctx, st, pe: pe.inner.clone(), _dev: dev.clone() };
        Ok(Self { core: Arc::new(core.finish(pe, dev, g)?) })
    }

    /// Queues a message to a connected client.
    pub fn send(&self, conn: ComchConnId, msg: &[u8], user_data: u64) -> Result<(), DocaError> {
        self.core.send(conn, msg, user_data)
    }
}

/// A comch client (`doca_comch_client`, on the host).
#[derive(Debug)]
pub struct ComchClient {
    core: Arc<Core>,
}

ctx_common!(ComchClient);

impl ComchClient {
    pub(super) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Creates a client of the server named `name`, on `dev`, connected to
    /// `pe`. It starts `Idle`.
    pub fn new(pe: &ProgressEngine, dev: &Device, name: &str, cfg: ComchConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let cname = c_name(name)?;
        let g = pe.inner.lock();
        let mut c = ptr::null_mut();
        // SAFETY: an open device; a NUL-terminated name; valid out-pointer;
        // destroyed by `Core::drop`.
        check(unsafe { sys::doca_comch_client_create(dev.inner.dev.as_ptr(), cname.as_ptr(), &mut c) })?;
        let cli = NonNull::new(c).ok_or(DocaError::DRIVER)?;
        // SAFETY: a live client; its ctx lives as long as it does.
        let Some(ctx) = NonNull::new(unsafe { sys::doca_comch_client_as_ctx(cli.as_ptr()) }) else {
            // SAFETY: created above, never started.
            unsafe { sys::doca_comch_client_destroy(cli.as_ptr()) };
            return Err(DocaError::DRIVER);
        };
        let st = Arc::new(Mutex::new(State::new(cfg, 1, Some(cli))));
        let core = Core { kind: Kind::Client { cli }, ctx, st, pe: pe.inner.clone(), _dev: dev.clone() };
        Ok(Self { core: Arc::new(core.finish(pe, dev, g)?) })
    }

    /// Queues a message to the server.
    pub fn send(&self, msg: &[u8], user_data: u64) -> Result<(), DocaError> {
        self.core.send(ComchConnId(0), msg, user_data)
    }

    /// The connection to the server (index 0).
    pub fn conn(&self) -> ComchConnId {
        ComchConnId(0)
    }
}

/// The state a connection's context holds as user data.
///
/// # Safety
/// `ctx` is a live context of this module (its user data is a
/// `Mutex<State>` in an `Arc` that outlives it).
unsafe fn state_of_ctx<'a>(ctx: *mut sys::doca_ctx) -> Option<&'a Mutex<State>> {
    let mut ud = u64_data(0);
    // SAFETY: the caller's contract; valid out-pointer.
    check(unsafe { sys::doca_ctx_get_user_data(ctx, &mut ud) }).ok()?;
    // SAFETY: the caller's contract.
    unsafe { ctx::shared::<State>(ud) }
}

/// The state of the server a connection belongs to.
///
/// # Safety
/// `conn` is a live connection DOCA passed to a callback of a server made
/// here.
unsafe fn server_state<'a>(conn: *mut sys::doca_comch_connection) -> Option<&'a Mutex<State>> {
    // SAFETY: the caller's contract.
    let srv = unsafe { sys::doca_comch_server_get_server_ctx(conn) };
    if srv.is_null() {
        return None;
    }
    // SAFETY: a live server made here (the caller's contract).
    let ctx = unsafe { sys::doca_comch_server_as_ctx(srv) };
    // SAFETY: its context, whose user data is set by `configure`.
    unsafe { state_of_ctx(ctx) }
}

unsafe extern "C" fn server_connected(
    _ev: *mut sys::doca_comch_event_connection_status_changed,
    conn: *mut sys::doca_comch_connection,
    ok: u8,
) {
    let Some(ptr) = NonNull::new(conn) else { return };
    if ok == 0 {
        log::warn!("doca sdk: a comch client failed to connect");
        return;
    }
    // SAFETY: DOCA passes a live connection of a server made here.
    let Some(m) = (unsafe { server_state(conn) }) else { return };
    let mut st = ctx::lock(m);
    let Some(slot) = st.peers.iter().position(Option::is_none) else {
        log::error!("doca sdk: comch server full ({} clients): a client is disconnected", st.peers.len());
        drop(st);
        // SAFETY: as above.
        let srv = unsafe { sys::doca_comch_server_get_server_ctx(conn) };
        // SAFETY: the live server of the connection, from its callback.
        if let Err(e) = check(unsafe { sys::doca_comch_server_disconnect(srv, conn) }) {
            log::error!("doca sdk: doca_comch_server_disconnect: {e}");
        }
        return;
    };
    let id = ComchConnId((st.next_gen << 16) | slot as u32);
    st.next_gen = (st.next_gen + 1) & 0xFFFF;
    if st.next_gen == 0 {
        st.next_gen = 1;
    }
    // SAFETY: as above; the id tells later callbacks which peer it is.
    if let Err(e) = check(unsafe { sys::doca_comch_connection_set_user_data(conn, u64_data(u64::from(id.0))) }) {
        log::error!("doca sdk: doca_comch_connection_set_user_data: {e}");
    }
    st.peers[slot] = Some(Peer { ptr, id });
    st.events.push_back(Ev::Public(ComchEvent::Connected(id)));
}

/// The id a server connection was given when it connected.
///
/// # Safety
/// `conn` is a live connection DOCA passed to a callback.
unsafe fn conn_id(conn: *mut sys::doca_comch_connection) -> ComchConnId {
    // SAFETY: the caller's contract.
    ComchConnId(data_u64(unsafe { sys::doca_comch_connection_get_user_data(conn) }) as u32)
}

unsafe extern "C" fn server_disconnected(
    _ev: *mut sys::doca_comch_event_connection_status_changed,
    conn: *mut sys::doca_comch_connection,
    _ok: u8,
) {
    // SAFETY: DOCA passes a live connection of a server made here.
    let Some(m) = (unsafe { server_state(conn) }) else { return };
    // SAFETY: as above.
    let id = unsafe { conn_id(conn) };
    let mut st = ctx::lock(m);
    if st.peer(id).is_some_and(|p| ptr::eq(p.ptr.as_ptr(), conn)) {
        st.peers[id.index() as usize] = None;
        st.events.push_back(Ev::Public(ComchEvent::Disconnected(id)));
    }
}

unsafe extern "C" fn server_msg(
    _ev: *mut sys::doca_comch_event_msg_recv,
    buf: *mut u8,
    len: u32,
    conn: *mut sys::doca_comch_connection,
) {
    // SAFETY: DOCA passes a live connection of a server made here.
    let Some(m) = (unsafe { server_state(conn) }) else { return };
    // SAFETY: as above.
    let id = unsafe { conn_id(conn) };
    // SAFETY: DOCA's receive buffer holds `len` bytes for the callback.
    let data = if buf.is_null() { &[][..] } else { unsafe { std::slice::from_raw_parts(buf, len as usize) } };
    let mut st = ctx::lock(m);
    if st.peer(id).is_none() {
        log::warn!("doca sdk: a comch message from a connection the server does not know: dropped");
        return;
    }
    st.message(id, data);
}

unsafe extern "C" fn client_msg(
    _ev: *mut sys::doca_comch_event_msg_recv,
    buf: *mut u8,
    len: u32,
    conn: *mut sys::doca_comch_connection,
) {
    // SAFETY: DOCA passes the live connection of a client made here.
    let cli = unsafe { sys::doca_comch_client_get_client_ctx(conn) };
    if cli.is_null() {
        return;
    }
    // SAFETY: a live client made here.
    let ctx = unsafe { sys::doca_comch_client_as_ctx(cli) };
    // SAFETY: its context, whose user data is set by `configure`.
    let Some(m) = (unsafe { state_of_ctx(ctx) }) else { return };
    // SAFETY: DOCA's receive buffer holds `len` bytes for the callback.
    let data = if buf.is_null() { &[][..] } else { unsafe { std::slice::from_raw_parts(buf, len as usize) } };
    ctx::lock(m).message(ComchConnId(0), data);
}

fn send_done(task: *mut sys::doca_comch_task_send, tud: sys::doca_data, cud: sys::doca_data, ok: bool) {
    // SAFETY: DOCA passes a live task of this context.
    let t = unsafe { sys::doca_comch_task_send_as_task(task) };
    let result = ctx::finish_task(t, ok);
    // SAFETY: the context's user data is its state (in an `Arc`) (`configure`).
    let Some(m) = (unsafe { ctx::shared::<State>(cud) }) else { return };
    let mut st = ctx::lock(m);
    let result = ctx::flushed(result, st.stop_asked);
    match st.sends.take(data_u64(tud)) {
        Some(s) => {
            st.events.push_back(Ev::Public(ComchEvent::SendDone { conn: s.conn, user_data: s.user_data, result }))
        }
        None => log::error!("doca sdk: a comch send completion for no task of ours (slot {})", data_u64(tud)),
    }
}

unsafe extern "C" fn send_ok(t: *mut sys::doca_comch_task_send, tud: sys::doca_data, cud: sys::doca_data) {
    send_done(t, tud, cud, true);
}

unsafe extern "C" fn send_err(t: *mut sys::doca_comch_task_send, tud: sys::doca_data, cud: sys::doca_data) {
    send_done(t, tud, cud, false);
}

/// A client is connected while its context runs: entering `Running`
/// connects it (slot 0), leaving it disconnects it. A server that stops
/// disconnects every client it has: their connections end with it (DOCA's
/// own disconnect callbacks may not come for them), and a restarted server
/// must not hand DOCA a connection pointer of its previous run.
unsafe extern "C" fn state_changed(
    ud: sys::doca_data,
    _ctx: *mut sys::doca_ctx,
    _prev: sys::doca_ctx_states,
    next: sys::doca_ctx_states,
) {
    // SAFETY: the context's user data is its state (in an `Arc`) (`configure`).
    let Some(m) = (unsafe { ctx::shared::<State>(ud) }) else { return };
    let mut st = ctx::lock(m);
    let Some(cli) = st.client else {
        if matches!(ctx::state_of(next), CtxState::Stopping | CtxState::Idle) {
            let State { peers, events, .. } = &mut *st;
            for p in peers.iter_mut().filter_map(Option::take) {
                events.push_back(Ev::Public(ComchEvent::Disconnected(p.id)));
            }
        }
        return;
    };
    match (ctx::state_of(next), st.peers[0].is_some()) {
        (CtxState::Running, false) => {
            let mut conn = ptr::null_mut();
            // SAFETY: the live client whose state this is; valid
            // out-pointer.
            if let Err(e) = check(unsafe { sys::doca_comch_client_get_connection(cli.as_ptr(), &mut conn) }) {
                log::error!("doca sdk: doca_comch_client_get_connection: {e}");
                return;
            }
            let Some(ptr) = NonNull::new(conn) else { return };
            let id = ComchConnId(0);
            st.peers[0] = Some(Peer { ptr, id });
            st.events.push_back(Ev::Public(ComchEvent::Connected(id)));
        }
        (CtxState::Stopping | CtxState::Idle, true) => {
            st.peers[0] = None;
            st.events.push_back(Ev::Public(ComchEvent::Disconnected(ComchConnId(0))));
        }
        _ => {}
    }
}

/// The peer created (`up`) or retired consumer `id` on a server connection.
///
/// # Safety
/// `conn` is a live connection DOCA passed to a callback of a server made
/// here.
unsafe fn server_consumer(conn: *mut sys::doca_comch_connection, id: u32, up: bool) {
    // SAFETY: the caller's contract.
    let Some(m) = (unsafe { server_state(conn) }) else { return };
    // SAFETY: as above.
    let c = unsafe { conn_id(conn) };
    let mut st = ctx::lock(m);
    if st.peer(c).is_some() {
        let ev = if up { ComchEvent::ConsumerUp { conn: c, id } } else { ComchEvent::ConsumerDown { conn: c, id } };
        st.events.push_back(Ev::Public(ev));
    }
}

unsafe extern "C" fn server_consumer_up(
    _ev: *mut sys::doca_comch_event_consumer,
    conn: *mut sys::doca_comch_connection,
    id: u32,
) {
    // SAFETY: DOCA passes a live connection of a server made here.
    unsafe { server_consumer(conn, id, true) }
}

unsafe extern "C" fn server_consumer_down(
    _ev: *mut sys::doca_comch_event_consumer,
    conn: *mut sys::doca_comch_connection,
    id: u32,
) {
    // SAFETY: as in `server_consumer_up`.
    unsafe { server_consumer(conn, id, false) }
}

/// The peer (the server) created or retired consumer `id`.
///
/// # Safety
/// `conn` is the live connection of a client made here.
unsafe fn client_consumer(conn: *mut sys::doca_comch_connection, id: u32, up: bool) {
    // SAFETY: the caller's contract.
    let cli = unsafe { sys::doca_comch_client_get_client_ctx(conn) };
    if cli.is_null() {
        return;
    }
    // SAFETY: a live client made here.
    let ctx = unsafe { sys::doca_comch_client_as_ctx(cli) };
    // SAFETY: its context, whose user data is set by `configure`.
    let Some(m) = (unsafe { state_of_ctx(ctx) }) else { return };
    let c = ComchConnId(0);
    let ev = if up { ComchEvent::ConsumerUp { conn: c, id } } else { ComchEvent::ConsumerDown { conn: c, id } };
    ctx::lock(m).events.push_back(Ev::Public(ev));
}

unsafe extern "C" fn client_consumer_up(
    _ev: *mut sys::doca_comch_event_consumer,
    conn: *mut sys::doca_comch_connection,
    id: u32,
) {
    // SAFETY: DOCA passes the live connection of a client made here.
    unsafe { client_consumer(conn, id, true) }
}

unsafe extern "C" fn client_consumer_down(
    _ev: *mut sys::doca_comch_event_consumer,
    conn: *mut sys::doca_comch_connection,
    id: u32,
) {
    // SAFETY: as in `client_consumer_up`.
    unsafe { client_consumer(conn, id, false) }
}
