//! Emulated comch fast path: consumers and producers on a comch connection
//! (DOCA's `doca_comch_consumer` and `doca_comch_producer`).
//!
//! A consumer listens on a `SOCK_SEQPACKET` socket of its own,
//! `<runtime dir>/comch-fp-<token>.sock`, and announces its id and token
//! over its comch connection; the peer's comch context reports
//! [`ComchEvent::ConsumerUp`](crate::ComchEvent::ConsumerUp) and remembers
//! the token. A producer on that connection connects to the consumer's
//! socket the first time it sends to it.
//!
//! DOCA's rule that a send finds a posted buffer or is refused with
//! `AGAIN` is kept with credits: a producer refused with `AGAIN` asks the
//! consumer for credits (`Want`); the consumer grants one credit per
//! posted receive to the producers that asked (never more credits than
//! posted receives); a producer's submit takes one or fails with `AGAIN`,
//! and each data packet spends one credit on the oldest posted receive.
//! Any producer may fill any posted receive, as in DOCA: while a producer
//! that asked holds none and every posted receive is held by others, the
//! consumer revokes the others' credits, and they give back what they have
//! not spent (`Return`; one that does not within [`REVOKE_WAIT`] loses
//! its link). A packet sent without a credit, credits given back that were
//! not held, or a malformed packet end that producer's link; a payload
//! larger than the buffer it lands in fails that receive with `TOO_BIG`.
//!
//! A consumer or producer whose comch connection goes away (the peer left,
//! the comch context stopped) stops by itself, as a comch client whose
//! server left does: its posted receives or queued sends fail with
//! `NOT_CONNECTED`, and it is `Idle` once those completions are taken.
//!
//! A producer's send completes once its packet is in the consumer's
//! socket; a consumer that stops before reading it flushes the receive the
//! packet was meant for with `SHUTDOWN` (the payload is dropped).
//!
//! Packets ([`crate::emu_wire::FastPathPacket`],
//! [`crate::emu_wire::FastPathCredit`]): producer to consumer data
//! `[0][producer id u32 LE][imm length u8][imm][payload]`, `Want` `[1]`,
//! `Return` `[2][count u32 LE]`; consumer to producer `Grant`
//! `[0][count u32 LE]` and `Revoke` `[1]`. Payload bytes are
//! read from the producer's memory file and written into the consumer's
//! (`pread`/`pwrite` at the buffers' file offsets): neither side reads
//! memory it imported through a mapping.

use super::comch::{self, Core as ComchCore};
use super::dev::Device;
use super::mem::{Buf, Mmap, MmapInner};
use super::pe::{PeShared, Progress, ProgressEngine};
use crate::emu_wire::{
    ComchPacket, FAST_PATH_CTRL_LEN, FAST_PATH_HDR as HDR, FAST_PATH_MAX_IMM, FastPathCredit, FastPathDecodeError,
    FastPathPacket,
};
use crate::{
    COMCH_FAST_PATH_MAX, COMCH_MAX_IMM, ComchConnId, ComchPeer, CtxState, DocaError, FastPathConfig, FastPathEvent,
    Imm, TaskSubmitError,
};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, SocketAddrUnix, SocketFlags};
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const _: () = assert!(FAST_PATH_MAX_IMM == COMCH_MAX_IMM);

/// The largest data packet: header, immediate, payload (the consumer's
/// read buffer and the producer's build buffer).
const PACKET_MAX: usize = HDR + COMCH_MAX_IMM + COMCH_FAST_PATH_MAX as usize;

/// Packets a link reads per progress call, so one busy producer cannot
/// starve the others.
const BUDGET: usize = 64;

/// How long a producer asked to give back its credits may take before the
/// consumer cuts its link (one that stopped progressing, or a peer
/// hoarding credits, cannot keep the posted receives from the others).
pub(crate) const REVOKE_WAIT: Duration = Duration::from_secs(5);

/// Ids of consumers and producers: unique in this process, so unique per
/// connection, as DOCA's are; never 0 (DOCA's "none").
fn next_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(1);
    // Relaxed: only uniqueness matters.
    N.fetch_add(1, Ordering::Relaxed).max(1)
}

fn fp_path(token: u64) -> PathBuf {
    comch::runtime_dir().join(format!("comch-fp-{token:016x}.sock"))
}

/// The parent comch context, its device and the connection of `on`.
fn parent(on: ComchPeer<'_>) -> (Arc<ComchCore>, Device, ComchConnId) {
    match on {
        ComchPeer::Server(s, c) => (s.core().clone(), s.device().clone(), c),
        ComchPeer::Client(c) => (c.core().clone(), c.device().clone(), c.conn()),
    }
}

fn would_block(e: Errno) -> bool {
    e == Errno::AGAIN || e == Errno::INTR
}

/// One producer connected to a consumer.
#[derive(Debug)]
struct Link {
    fd: OwnedFd,
    /// Credits granted and neither spent nor given back.
    credits: u32,
    /// Credits granted and not yet written to the socket (at most
    /// `credits`: the producer cannot spend or give back these).
    unsent: u32,
    /// It asked for credits since it was last revoked: grants go to it.
    active: bool,
    /// It asked for credits and was granted none since.
    hungry: bool,
    /// When it was asked to give back its credits (until it does).
    revoked: Option<Instant>,
    /// The revoke is still to be written.
    revoke_unsent: bool,
}

impl Link {
    fn new(fd: OwnedFd) -> Self {
        Self { fd, credits: 0, unsent: 0, active: false, hungry: false, revoked: None, revoke_unsent: false }
    }

    /// Writes `c`; `false` when the socket is full (retried at a later
    /// progress, which its writability wakes) or broken (seen by `read`).
    fn send(&self, c: FastPathCredit) -> bool {
        let mut b = [0u8; FAST_PATH_CTRL_LEN];
        let n = c.encode(&mut b);
        rustix::net::send(&self.fd, &b[..n], SendFlags::DONTWAIT | SendFlags::NOSIGNAL).is_ok()
    }
}

#[derive(Debug)]
struct ConsState {
    pe: Arc<PeShared>,
    parent: Arc<ComchCore>,
    conn: ComchConnId,
    mmap: Arc<MmapInner>,
    cfg: FastPathConfig,
    id: u32,
    token: u64,
    state: CtxState,
    /// What a flush fails posted receives with: `SHUTDOWN` for a stop
    /// asked for, `NOT_CONNECTED` when the connection went away.
    flush_err: DocaError,
    listener: Option<OwnedFd>,
    links: Vec<Link>,
    /// Posted receives, oldest first.
    posted: VecDeque<(Buf, u64)>,
    /// Credits granted over all links and not yet spent (at most
    /// `posted.len()`).
    granted: u32,
    /// Receives submitted whose completion the user has not taken.
    recvs_out: u32,
    events: VecDeque<FastPathEvent>,
    /// Where a packet is read.
    rx: Box<[u8]>,
    next_grant: usize,
}

#[derive(Debug)]
struct ConsCore {
    st: Mutex<ConsState>,
}

impl Progress for ConsCore {
    fn progress(&self) -> usize {
        super::lock(&self.st).progress()
    }
}

/// A fast-path consumer (`doca_comch_consumer`): posts buffers of its mmap
/// that producers on the peer's side of its comch connection fill.
#[derive(Debug)]
pub struct ComchConsumer {
    core: Arc<ConsCore>,
    _pe: Arc<PeShared>,
    _dev: Device,
}

impl ComchConsumer {
    /// Creates a consumer on `on`'s connection (which must be up:
    /// `NOT_CONNECTED` otherwise) for buffers of `mmap` (local, writable, on
    /// the connection's device: `NOT_PERMITTED` otherwise). It starts `Idle`.
    pub fn new(pe: &ProgressEngine, on: ComchPeer<'_>, mmap: &Mmap, cfg: FastPathConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let (parent, dev, conn) = parent(on);
        if !super::lock(&parent.st).is_up(conn) {
            return Err(DocaError::NOT_CONNECTED);
        }
        let m = &mmap.inner;
        if !m.writable || m.imported || !m.has_device(&dev) {
            return Err(DocaError::NOT_PERMITTED);
        }
        let st = ConsState {
            pe: pe.shared.clone(),
            parent,
            conn,
            mmap: m.clone(),
            cfg,
            id: next_id(),
            token: super::token(),
            state: CtxState::Idle,
            flush_err: DocaError::SHUTDOWN,
            listener: None,
            links: Vec::new(),
            posted: VecDeque::with_capacity(cfg.tasks as usize),
            granted: 0,
            recvs_out: 0,
            events: VecDeque::with_capacity(cfg.tasks as usize),
            rx: vec![0; PACKET_MAX].into_boxed_slice(),
            next_grant: 0,
        };
        let core = Arc::new(ConsCore { st: Mutex::new(st) });
        pe.shared.connect(Arc::downgrade(&core) as _);
        Ok(Self { core, _pe: pe.shared.clone(), _dev: dev })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, ConsState> {
        super::lock(&self.core.st)
    }

    /// The consumer's id, which the peer's producers send to.
    pub fn id(&self) -> u32 {
        self.st().id
    }

    /// The context's state.
    pub fn state(&self) -> CtxState {
        self.st().state
    }

    /// Asks to start: the socket is bound and the consumer announced to the
    /// peer now (`NOT_CONNECTED` when the connection is down); it is
    /// `Running` after a `progress()`.
    pub fn start(&self) -> Result<(), DocaError> {
        let mut st = self.st();
        if st.state != CtxState::Idle {
            return Err(DocaError::BAD_STATE);
        }
        comch::make_runtime_dir()?;
        let path = fp_path(st.token);
        let fd = comch::seqpacket()?;
        let addr = SocketAddrUnix::new(path.as_path()).map_err(|e| crate::error::os("socket path", e))?;
        rustix::net::bind(&fd, &addr).map_err(|e| crate::error::os("bind", e))?;
        if let Err(e) = rustix::net::listen(&fd, 64) {
            let _ = std::fs::remove_file(&path);
            return Err(crate::error::os("listen", e));
        }
        let up = ComchPacket::ConsumerUp { id: st.id, token: st.token };
        if let Err(e) = super::lock(&st.parent.st).announce(st.conn, up) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        st.pe.watch(fd.as_fd());
        st.listener = Some(fd);
        st.state = CtxState::Starting;
        Ok(())
    }

    /// Asks to stop: the peer is told the consumer is gone, producers'
    /// links close, posted receives are flushed with `SHUTDOWN` inside
    /// `progress()`; `Idle` once their completions have been taken.
    pub fn stop(&self) -> Result<(), DocaError> {
        self.st().state.request_stop()
    }

    /// Posts `buf` (of this consumer's mmap, with no data) for a producer
    /// to fill.
    pub fn submit_receive(&self, buf: Buf, user_data: u64) -> Result<(), TaskSubmitError> {
        let mut st = self.st();
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if st.state != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if st.recvs_out >= st.cfg.tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        if !Arc::ptr_eq(&buf.mmap, &st.mmap) || buf.data_len() > 0 {
            return err(DocaError::INVALID_VALUE, buf);
        }
        st.posted.push_back((buf, user_data));
        st.recvs_out += 1;
        Ok(())
    }

    /// Takes the next event; taking a receive's completion returns its slot
    /// to the pool.
    pub fn poll_event(&self) -> Option<FastPathEvent> {
        let mut st = self.st();
        let ev = st.events.pop_front()?;
        st.recvs_out -= 1;
        Some(ev)
    }
}

impl ConsState {
    fn progress(&mut self) -> usize {
        let before = self.events.len();
        match self.state {
            CtxState::Idle => return 0,
            CtxState::Starting => {
                self.state = CtxState::Running;
                return 1;
            }
            CtxState::Stopping => {
                if self.listener.is_some() {
                    self.close();
                }
                let result = Err(self.flush_err);
                while let Some((buf, user_data)) = self.posted.pop_front() {
                    let (imm, producer) = (Imm::default(), 0);
                    self.events.push_back(FastPathEvent::Received { user_data, buf, imm, producer, result });
                }
                let mut n = self.events.len() - before;
                if self.recvs_out == 0 {
                    self.state = CtxState::Idle;
                    self.flush_err = DocaError::SHUTDOWN;
                    n += 1;
                }
                return n;
            }
            CtxState::Running => {}
        }
        if !super::lock(&self.parent.st).is_up(self.conn) {
            log::debug!("comch consumer {}: its connection went away; stopping", self.id);
            self.state = CtxState::Stopping;
            self.flush_err = DocaError::NOT_CONNECTED;
            return self.progress();
        }
        self.accept();
        self.read();
        self.cut_hoarders();
        self.grant();
        self.events.len() - before
    }

    /// Tells the peer the consumer is gone (the connection may be gone
    /// already: then there is no one to tell), and closes its sockets.
    fn close(&mut self) {
        let _ = super::lock(&self.parent.st).announce(self.conn, ComchPacket::ConsumerDown { id: self.id });
        self.listener = None;
        self.links.clear();
        self.granted = 0;
        let _ = std::fs::remove_file(fp_path(self.token));
    }

    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        loop {
            match rustix::net::accept_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(fd) => {
                    self.pe.watch(fd.as_fd());
                    self.links.push(Link::new(fd));
                }
                Err(e) if would_block(e) => break,
                Err(e) => {
                    log::warn!("comch consumer {}: accept failed: {e}", self.id);
                    break;
                }
            }
        }
    }

    /// Drops link `i` (closed, or it broke the protocol): its unspent
    /// credits go back.
    fn drop_link(&mut self, i: usize) {
        let l = self.links.swap_remove(i);
        self.granted -= l.credits;
    }

    fn read(&mut self) {
        let mut i = 0;
        while i < self.links.len() {
            let mut dropped = false;
            for n in 0.. {
                if n == BUDGET {
                    // More may wait: come back (edge-triggered watch).
                    self.pe.again();
                    break;
                }
                let got =
                    rustix::net::recv(&self.links[i].fd, &mut self.rx[..], RecvFlags::DONTWAIT | RecvFlags::TRUNC);
                match got {
                    Ok((_, 0)) => {
                        self.drop_link(i);
                        dropped = true;
                        break;
                    }
                    Ok((_, len)) => {
                        if let Err(why) = self.take(i, len) {
                            log::warn!("comch consumer {}: a producer {why}; its link is closed", self.id);
                            self.drop_link(i);
                            dropped = true;
                            break;
                        }
                    }
                    Err(e) if would_block(e) => break,
                    Err(_) => {
                        self.drop_link(i);
                        dropped = true;
                        break;
                    }
                }
            }
            if !dropped {
                i += 1;
            }
        }
    }

    /// Takes the packet of `len` bytes in `rx`, from link `i`.
    fn take(&mut self, i: usize, len: usize) -> Result<(), &'static str> {
        if len > self.rx.len() {
            return Err("sent a packet over the size cap");
        }
        let l = &mut self.links[i];
        let (producer, imm, payload) = match FastPathPacket::decode(&self.rx[..len]) {
            Err(_) => return Err("sent a malformed packet"),
            Ok(FastPathPacket::Want) => {
                (l.active, l.hungry) = (true, true);
                return Ok(());
            }
            Ok(FastPathPacket::Return(k)) => {
                // Only credits written to its socket are the producer's to
                // give back or spend: unsent ones are cancelled when a
                // revoke is decided (`grant`), which needs them still held.
                if k > l.credits - l.unsent {
                    return Err("gave back credits it did not hold");
                }
                l.credits -= k;
                l.revoked = None;
                self.granted -= k;
                return Ok(());
            }
            Ok(FastPathPacket::Data { producer, imm, payload }) => (producer, imm, payload),
        };
        if l.credits == l.unsent {
            // No credit written to it (see `Return` above).
            return Err("sent without a credit");
        }
        let imm = Imm::new(imm).map_err(|_| "sent an immediate over the cap")?;
        l.credits -= 1;
        self.granted -= 1;
        let (mut buf, user_data) = self.posted.pop_front().ok_or("sent beyond the posted receives")?;
        let result = if payload.len() > buf.len() as usize {
            Err(DocaError::TOO_BIG)
        } else {
            match rustix::io::pwrite(self.mmap.fd(), payload, buf.file_offset()) {
                Ok(n) if n == payload.len() => buf.set_data_len(n as u32),
                Ok(_) | Err(_) => Err(DocaError::DRIVER),
            }
        };
        self.events.push_back(FastPathEvent::Received { user_data, buf, imm, producer, result });
        Ok(())
    }

    /// Cuts the links asked to give back their credits longer than
    /// [`REVOKE_WAIT`] ago.
    fn cut_hoarders(&mut self) {
        if self.links.iter().all(|l| l.revoked.is_none()) {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.links.len() {
            if self.links[i].revoked.is_some_and(|t| now.saturating_duration_since(t) > REVOKE_WAIT) {
                log::warn!(
                    "comch consumer {}: a producer kept its credits {REVOKE_WAIT:?} after a revoke; its link is closed",
                    self.id
                );
                self.drop_link(i);
            } else {
                i += 1;
            }
        }
    }

    /// Grants the posted receives no credit stands for yet to the links
    /// that asked, those still waiting for their first first, round robin;
    /// revokes the credits of the others when one that asked holds none
    /// and none is left; writes what was decided.
    fn grant(&mut self) {
        self.distribute();
        if self.links.iter().any(|l| l.hungry && l.credits == 0) {
            let now = Instant::now();
            let mut freed = false;
            for l in &mut self.links {
                if l.hungry || l.credits == 0 || l.revoked.is_some() {
                    continue;
                }
                // Credits not written yet are simply taken back.
                l.credits -= l.unsent;
                self.granted -= l.unsent;
                freed |= l.unsent > 0;
                l.unsent = 0;
                l.active = false;
                if l.credits > 0 {
                    l.revoked = Some(now);
                    l.revoke_unsent = true;
                }
            }
            if freed {
                self.distribute();
            }
        }
        for l in &mut self.links {
            if l.revoke_unsent && l.send(FastPathCredit::Revoke) {
                l.revoke_unsent = false;
            }
            if l.unsent > 0 && l.send(FastPathCredit::Grant(l.unsent)) {
                l.unsent = 0;
            }
        }
    }

    /// Gives each posted receive no credit stands for to a link that
    /// asked, hungry ones first, round robin.
    fn distribute(&mut self) {
        let k = self.links.len();
        while (self.granted as usize) < self.posted.len() {
            let order = (0..k).map(|j| (self.next_grant + j) % k);
            let Some(i) = order.clone().find(|&i| self.links[i].hungry).or_else(|| {
                let mut order = order;
                order.find(|&i| self.links[i].active)
            }) else {
                break;
            };
            self.next_grant = i + 1;
            let l = &mut self.links[i];
            l.credits += 1;
            l.unsent += 1;
            l.hungry = false;
            self.granted += 1;
        }
    }
}

impl Drop for ConsState {
    fn drop(&mut self) {
        if self.listener.is_some() {
            self.close();
        }
    }
}

/// A producer's link to one consumer.
#[derive(Debug)]
struct PLink {
    consumer: u32,
    fd: OwnedFd,
    /// Credits granted and not yet taken by a submission.
    credits: u32,
    /// Revoked credits to give back (`return_due`: a `Return` is owed,
    /// even of none).
    returning: u32,
    return_due: bool,
    /// A submission was refused with `AGAIN`: a `Want` is to be written.
    want_due: bool,
    /// A `Want` was written and no grant or revoke has come since.
    wanted: bool,
}

impl PLink {
    /// Writes `p` (not data); `false` when the socket is full or broken.
    fn send(&self, p: FastPathPacket<'_>) -> bool {
        let mut b = [0u8; FAST_PATH_CTRL_LEN];
        let Some(n) = p.encode_ctrl(&mut b) else { return false };
        rustix::net::send(&self.fd, &b[..n], SendFlags::DONTWAIT | SendFlags::NOSIGNAL).is_ok()
    }
}

#[derive(Debug)]
struct SendTask {
    buf: Buf,
    user_data: u64,
    consumer: u32,
    imm: Imm,
}

#[derive(Debug)]
struct ProdState {
    pe: Arc<PeShared>,
    parent: Arc<ComchCore>,
    conn: ComchConnId,
    dev: Device,
    cfg: FastPathConfig,
    id: u32,
    state: CtxState,
    /// What a flush fails queued sends with (see the consumer's).
    flush_err: DocaError,
    links: Vec<PLink>,
    queue: VecDeque<SendTask>,
    /// Sends submitted whose completion the user has not taken.
    sends_out: u32,
    events: VecDeque<FastPathEvent>,
    /// Where a packet is built.
    tx: Box<[u8]>,
}

#[derive(Debug)]
struct ProdCore {
    st: Mutex<ProdState>,
}

impl Progress for ProdCore {
    fn progress(&self) -> usize {
        super::lock(&self.st).progress()
    }
}

/// A fast-path producer (`doca_comch_producer`): sends buffers into the
/// posted buffers of the peer's consumers on its comch connection.
#[derive(Debug)]
pub struct ComchProducer {
    core: Arc<ProdCore>,
    _pe: Arc<PeShared>,
}

impl ComchProducer {
    /// Creates a producer on `on`'s connection (which must be up:
    /// `NOT_CONNECTED` otherwise). It starts `Idle`.
    pub fn new(pe: &ProgressEngine, on: ComchPeer<'_>, cfg: FastPathConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let (parent, dev, conn) = parent(on);
        if !super::lock(&parent.st).is_up(conn) {
            return Err(DocaError::NOT_CONNECTED);
        }
        let st = ProdState {
            pe: pe.shared.clone(),
            parent,
            conn,
            dev,
            cfg,
            id: next_id(),
            state: CtxState::Idle,
            flush_err: DocaError::SHUTDOWN,
            links: Vec::new(),
            queue: VecDeque::with_capacity(cfg.tasks as usize),
            sends_out: 0,
            events: VecDeque::with_capacity(cfg.tasks as usize),
            tx: vec![0; PACKET_MAX].into_boxed_slice(),
        };
        let core = Arc::new(ProdCore { st: Mutex::new(st) });
        pe.shared.connect(Arc::downgrade(&core) as _);
        Ok(Self { core, _pe: pe.shared.clone() })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, ProdState> {
        super::lock(&self.core.st)
    }

    /// The producer's id, which consumers report with what it wrote.
    pub fn id(&self) -> u32 {
        self.st().id
    }

    /// The context's state.
    pub fn state(&self) -> CtxState {
        self.st().state
    }

    /// Asks to start; the producer is `Running` after a `progress()`.
    pub fn start(&self) -> Result<(), DocaError> {
        let mut st = self.st();
        if st.state != CtxState::Idle {
            return Err(DocaError::BAD_STATE);
        }
        st.state = CtxState::Starting;
        Ok(())
    }

    /// Asks to stop: queued sends fail with `SHUTDOWN` inside `progress()`;
    /// `Idle` once their completions have been taken.
    pub fn stop(&self) -> Result<(), DocaError> {
        self.st().state.request_stop()
    }

    /// Sends `buf`'s data with `imm` into a posted buffer of the peer's
    /// consumer `consumer`. `AGAIN` while that consumer has no buffer
    /// posted for this producer (credits arrive inside `progress()`: retry
    /// after one); `NOT_FOUND` for a consumer the peer has not announced
    /// (or has stopped); a send queued for a consumer that stops fails with
    /// `NOT_CONNECTED`.
    pub fn submit_send(&self, buf: Buf, consumer: u32, imm: &[u8], user_data: u64) -> Result<(), TaskSubmitError> {
        let mut st = self.st();
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if st.state != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        let Ok(imm) = Imm::new(imm) else { return err(DocaError::INVALID_VALUE, buf) };
        if buf.data_len() > COMCH_FAST_PATH_MAX {
            return err(DocaError::TOO_BIG, buf);
        }
        if buf.mmap.remote_only || !buf.mmap.has_device(&st.dev) {
            return err(DocaError::NOT_PERMITTED, buf);
        }
        if st.sends_out >= st.cfg.tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        let i = match st.links.iter().position(|l| l.consumer == consumer) {
            Some(i) => i,
            None => match st.link(consumer) {
                Ok(()) => st.links.len() - 1,
                Err(e) => return err(e, buf),
            },
        };
        let l = &mut st.links[i];
        if l.credits == 0 {
            // Ask for credits (written inside progress): DOCA's caller
            // retries after one.
            l.want_due |= !l.wanted;
            return err(DocaError::AGAIN, buf);
        }
        st.links[i].credits -= 1;
        st.queue.push_back(SendTask { buf, user_data, consumer, imm });
        st.sends_out += 1;
        Ok(())
    }

    /// Takes the next event; taking a send's completion returns its slot to
    /// the pool.
    pub fn poll_event(&self) -> Option<FastPathEvent> {
        let mut st = self.st();
        let ev = st.events.pop_front()?;
        st.sends_out -= 1;
        Some(ev)
    }
}

impl ProdState {
    /// Connects to the peer's consumer `consumer`.
    fn link(&mut self, consumer: u32) -> Result<(), DocaError> {
        let token = super::lock(&self.parent.st).remote_consumer(self.conn, consumer).ok_or(DocaError::NOT_FOUND)?;
        let fd = comch::seqpacket()?;
        let path = fp_path(token);
        let addr = SocketAddrUnix::new(path.as_path()).map_err(|e| crate::error::os("socket path", e))?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => {}
            // The consumer's backlog is full: try again.
            Err(Errno::AGAIN) => return Err(DocaError::AGAIN),
            Err(_) => return Err(DocaError::NOT_FOUND),
        }
        self.pe.watch(fd.as_fd());
        self.links.push(PLink {
            consumer,
            fd,
            credits: 0,
            returning: 0,
            return_due: false,
            want_due: false,
            wanted: false,
        });
        Ok(())
    }

    /// Reads what link `i`'s consumer sent (grants, revokes); `false` when
    /// the link closed or the consumer broke the protocol.
    fn read_link(&mut self, i: usize) -> bool {
        let mut b = [0u8; 8];
        let l = &mut self.links[i];
        for _ in 0..BUDGET {
            match rustix::net::recv(&l.fd, &mut b[..], RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
                Ok((_, 0)) => return false,
                // A packet longer than `b` (TRUNC reports its real length)
                // is of the wrong length whatever its kind.
                Ok((_, n)) => match b
                    .get(..n)
                    .map_or(Err(FastPathDecodeError::Length { kind: b[0], len: n }), FastPathCredit::decode)
                {
                    Ok(FastPathCredit::Grant(c)) => {
                        l.credits = l.credits.saturating_add(c);
                        l.wanted = false;
                    }
                    Ok(FastPathCredit::Revoke) => {
                        l.returning = l.returning.saturating_add(l.credits);
                        l.credits = 0;
                        l.return_due = true;
                        // No longer among those granted to: ask again.
                        l.wanted = false;
                    }
                    Err(e) => {
                        log::warn!("comch producer {}: the consumer sent a bad packet ({e}); link closed", self.id);
                        return false;
                    }
                },
                Err(e) if would_block(e) => return true,
                Err(_) => return false,
            }
        }
        // More may wait: come back (edge-triggered watch).
        self.pe.again();
        true
    }

    fn progress(&mut self) -> usize {
        let before = self.events.len();
        match self.state {
            CtxState::Idle => return 0,
            CtxState::Starting => {
                self.state = CtxState::Running;
                return 1;
            }
            CtxState::Stopping => {
                self.links.clear();
                let result = Err(self.flush_err);
                while let Some(t) = self.queue.pop_front() {
                    self.events.push_back(FastPathEvent::SendDone { user_data: t.user_data, buf: t.buf, result });
                }
                let mut n = self.events.len() - before;
                if self.sends_out == 0 {
                    self.state = CtxState::Idle;
                    self.flush_err = DocaError::SHUTDOWN;
                    n += 1;
                }
                return n;
            }
            CtxState::Running => {}
        }
        if !super::lock(&self.parent.st).is_up(self.conn) {
            log::debug!("comch producer {}: its connection went away; stopping", self.id);
            self.state = CtxState::Stopping;
            self.flush_err = DocaError::NOT_CONNECTED;
            return self.progress();
        }
        // A link that closed is dropped; its queued sends fail in `write`.
        let mut i = 0;
        while i < self.links.len() {
            if self.read_link(i) {
                i += 1;
            } else {
                self.links.swap_remove(i);
            }
        }
        self.write();
        self.events.len() - before
    }

    fn write(&mut self) {
        // Credits given back and asked for; a full socket is retried at a
        // later progress (its writability wakes one).
        for l in &mut self.links {
            if l.return_due && l.send(FastPathPacket::Return(l.returning)) {
                (l.returning, l.return_due) = (0, false);
            }
            if l.want_due && l.send(FastPathPacket::Want) {
                (l.want_due, l.wanted) = (false, true);
            }
        }
        while let Some(t) = self.queue.front() {
            let Some(l) = self.links.iter().find(|l| l.consumer == t.consumer) else {
                let t = self.queue.pop_front().expect("front");
                let result = Err(DocaError::NOT_CONNECTED);
                self.events.push_back(FastPathEvent::SendDone { user_data: t.user_data, buf: t.buf, result });
                continue;
            };
            let n = t.buf.data_len() as usize;
            let at = FastPathPacket::encode_head(self.id, t.imm.as_bytes(), &mut self.tx).expect("tx holds any head");
            let read = rustix::io::pread(t.buf.mmap.fd(), &mut self.tx[at..at + n], t.buf.file_offset());
            let result = match read {
                Ok(got) if got == n => {
                    match rustix::net::send(&l.fd, &self.tx[..at + n], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                        Ok(_) => Ok(()),
                        // The consumer's socket is full: later.
                        Err(e) if would_block(e) => return,
                        Err(_) => Err(DocaError::NOT_CONNECTED),
                    }
                }
                Ok(_) | Err(_) => Err(DocaError::DRIVER),
            };
            let t = self.queue.pop_front().expect("front");
            self.events.push_back(FastPathEvent::SendDone { user_data: t.user_data, buf: t.buf, result });
        }
    }
}
