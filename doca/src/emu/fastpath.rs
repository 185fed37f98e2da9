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
//! `AGAIN` is kept with credits: the consumer grants its producers one
//! credit per posted receive (never more credits than posted receives), a
//! producer's submit takes one or fails with `AGAIN`, and each data packet
//! spends one credit on the oldest posted receive. A packet sent without a
//! credit, or malformed, ends that producer's link; one larger than the
//! buffer it lands in fails that receive with `TOO_BIG`.
//!
//! Packets ([`crate::emu_wire::FastPathPacket`]): producer to consumer
//! `[producer id u32 LE][imm length u8][imm][payload]`, consumer to
//! producer `[credits u32 LE]`. Payload bytes are
//! read from the producer's memory file and written into the consumer's
//! (`pread`/`pwrite` at the buffers' file offsets): neither side reads
//! memory it imported through a mapping.

use super::comch::{self, Core as ComchCore};
use super::dev::Device;
use super::mem::{Buf, Mmap, MmapInner};
use super::pe::{PeShared, Progress, ProgressEngine};
use crate::emu_wire::{ComchPacket, FAST_PATH_HDR as HDR, FAST_PATH_MAX_IMM, FastPathPacket, decode_credit};
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

const _: () = assert!(FAST_PATH_MAX_IMM == COMCH_MAX_IMM);

/// Packets a link reads per progress call, so one busy producer cannot
/// starve the others.
const BUDGET: usize = 64;

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
    /// Credits granted and not yet spent.
    credits: u32,
    /// Credits granted and not yet written to the socket.
    unsent: u32,
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
            listener: None,
            links: Vec::new(),
            posted: VecDeque::with_capacity(cfg.tasks as usize),
            granted: 0,
            recvs_out: 0,
            events: VecDeque::with_capacity(cfg.tasks as usize),
            rx: vec![0; HDR + COMCH_MAX_IMM + COMCH_FAST_PATH_MAX as usize].into_boxed_slice(),
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
                while let Some((buf, user_data)) = self.posted.pop_front() {
                    let (imm, producer, result) = (Imm::default(), 0, Err(DocaError::SHUTDOWN));
                    self.events.push_back(FastPathEvent::Received { user_data, buf, imm, producer, result });
                }
                let mut n = self.events.len() - before;
                if self.recvs_out == 0 {
                    self.state = CtxState::Idle;
                    n += 1;
                }
                return n;
            }
            CtxState::Running => {}
        }
        self.accept();
        self.read();
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
                    self.links.push(Link { fd, credits: 0, unsent: 0 });
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
                        if let Err(why) = self.place(i, len) {
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

    /// Places the packet of `len` bytes in `rx`, from link `i`, into the
    /// oldest posted receive.
    fn place(&mut self, i: usize, len: usize) -> Result<(), &'static str> {
        if len > self.rx.len() {
            return Err("sent a packet over the size cap");
        }
        let pkt = FastPathPacket::decode(&self.rx[..len]).map_err(|_| "sent a malformed packet")?;
        if self.links[i].credits == 0 {
            return Err("sent without a credit");
        }
        let imm = Imm::new(pkt.imm).map_err(|_| "sent an immediate over the cap")?;
        self.links[i].credits -= 1;
        self.granted -= 1;
        let (mut buf, user_data) = self.posted.pop_front().ok_or("sent beyond the posted receives")?;
        let result = if pkt.payload.len() > buf.len() as usize {
            Err(DocaError::TOO_BIG)
        } else {
            match rustix::io::pwrite(self.mmap.fd(), pkt.payload, buf.file_offset()) {
                Ok(n) if n == pkt.payload.len() => buf.set_data_len(n as u32),
                Ok(_) | Err(_) => Err(DocaError::DRIVER),
            }
        };
        let producer = pkt.producer;
        self.events.push_back(FastPathEvent::Received { user_data, buf, imm, producer, result });
        Ok(())
    }

    /// Grants the posted receives no credit stands for yet, round robin
    /// over the links, and writes what was granted.
    fn grant(&mut self) {
        let k = self.links.len();
        if k > 0 {
            while (self.granted as usize) < self.posted.len() {
                let l = &mut self.links[self.next_grant % k];
                self.next_grant = self.next_grant.wrapping_add(1);
                l.credits += 1;
                l.unsent += 1;
                self.granted += 1;
            }
        }
        for l in &mut self.links {
            if l.unsent == 0 {
                continue;
            }
            // A full socket is retried at the next progress; a producer
            // gone is seen closed by `read`.
            if rustix::net::send(&l.fd, &l.unsent.to_le_bytes(), SendFlags::DONTWAIT | SendFlags::NOSIGNAL).is_ok() {
                l.unsent = 0;
            }
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
    credits: u32,
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
            links: Vec::new(),
            queue: VecDeque::with_capacity(cfg.tasks as usize),
            sends_out: 0,
            events: VecDeque::with_capacity(cfg.tasks as usize),
            tx: vec![0; HDR + COMCH_MAX_IMM + COMCH_FAST_PATH_MAX as usize].into_boxed_slice(),
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
    /// after one); `NOT_FOUND`
    /// for a consumer the peer has not announced (or has stopped).
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
        if st.links[i].credits == 0 {
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
        self.links.push(PLink { consumer, fd, credits: 0 });
        Ok(())
    }

    /// Reads the credits link `i`'s consumer granted; `false` when the
    /// link closed.
    fn take_credits(&mut self, i: usize) -> bool {
        let mut b = [0u8; 8];
        loop {
            match rustix::net::recv(&self.links[i].fd, &mut b[..], RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
                Ok((_, 0)) => return false,
                Ok((_, n)) => match b.get(..n).and_then(decode_credit) {
                    Some(c) => self.links[i].credits = self.links[i].credits.saturating_add(c),
                    None => {
                        log::warn!("comch producer {}: the consumer sent a {n}-byte credit; link closed", self.id);
                        return false;
                    }
                },
                Err(e) if would_block(e) => return true,
                Err(_) => return false,
            }
        }
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
                while let Some(t) = self.queue.pop_front() {
                    let result = Err(DocaError::SHUTDOWN);
                    self.events.push_back(FastPathEvent::SendDone { user_data: t.user_data, buf: t.buf, result });
                }
                let mut n = self.events.len() - before;
                if self.sends_out == 0 {
                    self.state = CtxState::Idle;
                    n += 1;
                }
                return n;
            }
            CtxState::Running => {}
        }
        // A link that closed is dropped; its queued sends fail in `write`.
        let mut i = 0;
        while i < self.links.len() {
            if self.take_credits(i) {
                i += 1;
            } else {
                self.links.swap_remove(i);
            }
        }
        self.write();
        self.events.len() - before
    }

    fn write(&mut self) {
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
