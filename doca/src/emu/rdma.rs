//! Emulated RDMA (RC, two-sided) over TCP.
//!
//! A connection is two TCP streams, one per direction of data: each side
//! dials the listener named in the peer's connection blob and sends its
//! sends on that stream; the peer acknowledges placed sends on the same
//! stream in the reverse direction, so acknowledgements never wait behind
//! data (as RC acks do not wait behind the send queue).
//!
//! Semantics kept:
//! * a send lands only in a posted receive of the peer, in order, with its
//!   immediate; its completion means the peer placed it (acknowledged);
//! * a send with no receive posted waits (receiver not ready, infinite
//!   retry): the receiver stops reading, TCP flow control stalls the sender;
//! * a send larger than the posted receive fails the receive with
//!   `TOO_BIG`, the sender's send with `TOO_BIG`, and the connection;
//! * a vanished peer (EOF, reset) fails every outstanding send of the
//!   connection with `CONNECTION_RESET`, and the posted receives once no
//!   connection of the context can deliver any more;
//! * task pools are fixed at creation; a slot is returned when the user
//!   takes the task's completion; all queues are sized at setup.
//!
//! Cost (what the `fabric` benchmark measures against raw TCP): the
//! emulated NIC gathers frame headers and small payloads (up to
//! [`INLINE_MAX`], from the process's own memory) into one buffer per
//! stream and writes it with one call,
//! and reads ahead up to [`RX_BUF`] bytes per call on the receiving side,
//! placing every complete frame it holds; large payloads still move
//! inside the kernel (`sendfile`, `splice`). Reading ahead keeps the
//! semantics: a frame is placed only into a posted receive and
//! acknowledged only once placed; while none is posted the receiver stops
//! reading, so the sender stalls once its socket and this bounded buffer
//! are full (receiver not ready). Nothing is allocated per message.

use super::dev::Device;
use super::dma::{self, Dma, Moved};
use super::mem::Buf;
use super::pe::{PeShared, Progress, ProgressEngine};
use crate::emu_wire::{ConnBlob, FRAME_LEN, Frame};
use crate::{CtxState, DocaError, RdmaConfig, RdmaConnId, RdmaEvent, TaskSubmitError};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Work done per connection and direction in one progress call, so one
/// busy connection cannot starve the others: rounds of gathering and
/// writing on the send side, messages placed on the receive side.
const BUDGET: usize = 64;

/// Bytes a send stream gathers (frame headers and small payloads) before
/// one socket write.
const TX_BUF: usize = 64 << 10;
/// Payloads up to this size are copied into the gather buffer; larger ones
/// go from the memory file to the socket with `sendfile`.
pub(crate) const INLINE_MAX: usize = 16 << 10;
/// Bytes a receive stream reads ahead in one call.
pub(crate) const RX_BUF: usize = 64 << 10;
/// With nothing buffered, a payload remainder at least this long moves
/// from the socket to the memory file with `splice` instead of through the
/// read-ahead buffer.
const SPLICE_MIN: usize = 32 << 10;
/// Acknowledgement and error frames a send stream reads per call.
const ACK_FRAMES: usize = 16;

const _: () = assert!(FRAME_LEN + INLINE_MAX <= TX_BUF && FRAME_LEN <= RX_BUF);

#[derive(Debug)]
struct SendTask {
    buf: Buf,
    user_data: u64,
    imm: Option<u32>,
    seq: u32,
}

#[derive(Debug)]
struct RecvTask {
    buf: Buf,
    user_data: u64,
}

/// My data to the peer; acknowledgements come back on it.
#[derive(Debug)]
struct OutStream {
    sock: TcpStream,
    hello: [u8; FRAME_LEN],
    hello_off: usize,
    /// Gathered frames; `tx[tx_off..tx_len]` is still to be written.
    tx: Box<[u8]>,
    tx_len: usize,
    tx_off: usize,
    /// The front send's payload goes by `sendfile` once the gathered bytes
    /// (ending with its header) are written: payload bytes sent so far.
    big: Option<usize>,
    /// Acknowledgement frames read; `rx[..rx_have]` holds a partial one.
    rx: [u8; ACK_FRAMES * FRAME_LEN],
    rx_have: usize,
    dma: Dma,
}

#[derive(Debug)]
struct Incoming {
    task: RecvTask,
    len: usize,
    done: usize,
    imm: Option<u32>,
}

/// The peer's data to me; my acknowledgements go back on it.
#[derive(Debug)]
struct InStream {
    sock: TcpStream,
    /// Read-ahead buffer; `rx[rx_off..rx_len]` is unconsumed stream bytes.
    rx: Box<[u8]>,
    rx_off: usize,
    rx_len: usize,
    cur: Option<Incoming>,
    placed: u32,
    ack: [u8; FRAME_LEN],
    ack_off: usize,
    acked: u32,
    dma: Dma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Exported; `connect` not called yet.
    Exported,
    /// Connecting or connected.
    Active,
    Failed(DocaError),
}

#[derive(Debug)]
struct Conn {
    token: u64,
    remote_token: u64,
    /// The peer's largest send, from its blob: our sends are bounded by it.
    remote_max: u32,
    phase: Phase,
    connecting: Option<OwnedFd>,
    out: Option<OutStream>,
    inn: Option<InStream>,
    send_q: VecDeque<SendTask>,
    unacked: VecDeque<SendTask>,
    next_seq: u32,
    reported: bool,
    /// When a connection not up yet fails ([`CONNECT_WAIT`] after
    /// `connect`).
    connect_by: Option<std::time::Instant>,
    /// Streams of a connection this side failed on purpose, kept open so
    /// the error frame reaches the peer before any reset.
    linger: Vec<TcpStream>,
}

#[derive(Debug)]
struct PendingIn {
    sock: TcpStream,
    rx: [u8; FRAME_LEN],
    have: usize,
    since: std::time::Instant,
}

/// How long an accepted stream may take to send its hello before it is
/// dropped (the peer's own stream sends it at once).
const HELLO_WAIT: Duration = Duration::from_secs(2);

/// How long a connection may take to come up after `connect` before it
/// fails with `TIME_OUT` (both streams and hellos; the peer connects as
/// soon as it has this side's blob). Without it, a side whose peer's
/// stream was lost during setup (dropped unheard, say) would wait for it
/// forever while the peer, its own stream up, saw nothing wrong.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    cfg: RdmaConfig,
    dev: Device,
    state: CtxState,
    listener: Option<TcpListener>,
    local: Option<SocketAddr>,
    conns: Vec<Conn>,
    pending: Vec<PendingIn>,
    recv_q: VecDeque<RecvTask>,
    sends_out: u32,
    recvs_out: u32,
    events: VecDeque<RdmaEvent>,
    /// The progress engine: its notification handle watches our sockets.
    pe: Arc<PeShared>,
}

#[derive(Debug)]
struct Core {
    st: Mutex<State>,
}

impl Progress for Core {
    fn progress(&self) -> usize {
        super::lock(&self.st).progress()
    }
}

/// An RDMA context (`doca_rdma`) with its connections and task pools.
#[derive(Debug)]
pub struct Rdma {
    core: Arc<Core>,
    _pe: Arc<PeShared>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Rdma {
    /// Creates an RDMA context on `dev`, connected to `pe`, with fixed task
    /// pools. The context starts `Idle`.
    pub fn new(pe: &ProgressEngine, dev: &Device, cfg: RdmaConfig) -> Result<Rdma, DocaError> {
        cfg.validate()?;
        let events = cfg.send_tasks as usize + cfg.recv_tasks as usize + 2 * cfg.max_connections as usize + 4;
        let st = State {
            cfg,
            dev: dev.clone(),
            state: CtxState::Idle,
            listener: None,
            local: None,
            conns: Vec::with_capacity(cfg.max_connections as usize),
            pending: Vec::with_capacity(2 * cfg.max_connections as usize),
            recv_q: VecDeque::with_capacity(cfg.recv_tasks as usize),
            sends_out: 0,
            recvs_out: 0,
            events: VecDeque::with_capacity(events),
            pe: pe.shared.clone(),
        };
        let core = Arc::new(Core { st: Mutex::new(st) });
        let weak = Arc::downgrade(&core);
        pe.shared.connect(weak);
        Ok(Rdma { core, _pe: pe.shared.clone() })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        super::lock(&self.core.st)
    }

    /// The context's state.
    pub fn state(&self) -> CtxState {
        self.st().state
    }

    /// Asks to start; the context becomes `Running` inside a later
    /// `progress()`.
    pub fn start(&self) -> Result<(), DocaError> {
        let mut st = self.st();
        if st.state != CtxState::Idle {
            return Err(DocaError::BAD_STATE);
        }
        let l = TcpListener::bind(SocketAddr::new(st.dev.info().ip, 0)).map_err(|e| crate::error::os("bind", e))?;
        l.set_nonblocking(true).map_err(|e| crate::error::os("fcntl", e))?;
        st.local = Some(l.local_addr().map_err(|e| crate::error::os("getsockname", e))?);
        st.pe.watch(l.as_fd());
        st.listener = Some(l);
        st.state = CtxState::Starting;
        Ok(())
    }

    /// Asks to stop: outstanding tasks are flushed with `SHUTDOWN` inside
    /// `progress()`, and the context becomes `Idle` once their completions
    /// have been taken.
    pub fn stop(&self) -> Result<(), DocaError> {
        self.st().state.request_stop()
    }

    /// Creates a connection and returns its blob for the peer's
    /// [`connect`](Self::connect). The context must be `Running`.
    pub fn export(&self) -> Result<(RdmaConnId, Vec<u8>), DocaError> {
        let mut st = self.st();
        if st.state != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        if st.conns.len() >= st.cfg.max_connections as usize {
            return Err(DocaError::FULL);
        }
        let addr = st.local.ok_or(DocaError::BAD_STATE)?;
        let token = super::token();
        let cap = st.cfg.send_tasks as usize;
        st.conns.push(Conn {
            token,
            remote_token: 0,
            remote_max: 0,
            phase: Phase::Exported,
            connecting: None,
            out: None,
            inn: None,
            send_q: VecDeque::with_capacity(cap),
            unacked: VecDeque::with_capacity(cap),
            next_seq: 1,
            reported: false,
            connect_by: None,
            linger: Vec::new(),
        });
        let id = RdmaConnId(st.conns.len() as u32 - 1);
        Ok((id, ConnBlob { addr, token, max_send: st.cfg.max_send_size }.encode().to_vec()))
    }

    /// Connects `conn` to the peer connection described by `remote_blob`
    /// (the peer's `export`). The connection is up when
    /// [`RdmaEvent::Connected`] is reported; sends submitted before wait.
    /// The emulation fails a connection not up 10 s (`CONNECT_WAIT`)
    /// after this call with `TIME_OUT` (noticed in `progress`).
    pub fn connect(&self, conn: RdmaConnId, remote_blob: &[u8]) -> Result<(), DocaError> {
        let blob = ConnBlob::decode(remote_blob).map_err(|e| {
            log::warn!("rdma connection blob rejected: {e}");
            DocaError::INVALID_VALUE
        })?;
        let mut st = self.st();
        if st.state != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        let c = st.conns.get_mut(conn.0 as usize).ok_or(DocaError::NOT_FOUND)?;
        if c.phase != Phase::Exported {
            return Err(DocaError::BAD_STATE);
        }
        let family = match blob.addr {
            SocketAddr::V4(_) => rustix::net::AddressFamily::INET,
            SocketAddr::V6(_) => rustix::net::AddressFamily::INET6,
        };
        let fd = rustix::net::socket_with(
            family,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| crate::error::os("socket", e))?;
        match rustix::net::connect(&fd, &blob.addr) {
            Ok(()) | Err(Errno::INPROGRESS) => {}
            Err(e) => {
                log::warn!("rdma connect to {} failed: {e}", blob.addr);
                return Err(DocaError::NOT_CONNECTED);
            }
        }
        st.pe.watch(fd.as_fd());
        let c = st.conns.get_mut(conn.0 as usize).ok_or(DocaError::NOT_FOUND)?;
        c.connecting = Some(fd);
        c.remote_token = blob.token;
        c.remote_max = blob.max_send;
        c.phase = Phase::Active;
        c.connect_by = Some(std::time::Instant::now() + CONNECT_WAIT);
        Ok(())
    }

    /// Posts a send of `buf.data_len()` bytes on `conn`, with an optional
    /// 32-bit immediate.
    pub fn submit_send(
        &self,
        conn: RdmaConnId,
        buf: Buf,
        imm: Option<u32>,
        user_data: u64,
    ) -> Result<(), TaskSubmitError> {
        let mut st = self.st();
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if st.state != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if st.sends_out >= st.cfg.send_tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        if buf.data_len() > st.cfg.max_send_size {
            return err(DocaError::TOO_BIG, buf);
        }
        if !buf.mmap.has_device(&st.dev) || buf.mmap.remote_only {
            return err(DocaError::NOT_PERMITTED, buf);
        }
        let Some(c) = st.conns.get_mut(conn.0 as usize) else { return err(DocaError::NOT_FOUND, buf) };
        if buf.data_len() > c.remote_max && c.phase == Phase::Active {
            return err(DocaError::TOO_BIG, buf);
        }
        match c.phase {
            Phase::Active => {}
            Phase::Exported => return err(DocaError::BAD_STATE, buf),
            Phase::Failed(_) => return err(DocaError::NOT_CONNECTED, buf),
        }
        let seq = c.next_seq;
        c.next_seq = c.next_seq.wrapping_add(1).max(1);
        c.send_q.push_back(SendTask { buf, user_data, imm, seq });
        st.sends_out += 1;
        Ok(())
    }

    /// Posts a receive into `buf` (its whole capacity). The buffer must
    /// hold no data: DOCA places what arrives after the data a buffer
    /// holds, the emulation from its start, so one with data is refused
    /// (`INVALID_VALUE`) rather than treated differently from hardware.
    pub fn submit_receive(&self, buf: Buf, user_data: u64) -> Result<(), TaskSubmitError> {
        let mut st = self.st();
        let err = |error, buf| Err(TaskSubmitError { error, buf });
        if st.state != CtxState::Running {
            return err(DocaError::BAD_STATE, buf);
        }
        if st.recvs_out >= st.cfg.recv_tasks {
            return err(DocaError::NO_MEMORY, buf);
        }
        if !buf.mmap.writable || !buf.mmap.has_device(&st.dev) || buf.mmap.remote_only {
            return err(DocaError::NOT_PERMITTED, buf);
        }
        if buf.data_len() > 0 {
            return err(DocaError::INVALID_VALUE, buf);
        }
        st.recv_q.push_back(RecvTask { buf, user_data });
        st.recvs_out += 1;
        Ok(())
    }

    /// Takes the next event; taking a task's completion returns its slot to
    /// the pool.
    pub fn poll_event(&self) -> Option<RdmaEvent> {
        let mut st = self.st();
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
        let st = self.st();
        (st.sends_out, st.recvs_out)
    }
}

fn next_seq(s: u32) -> u32 {
    s.wrapping_add(1).max(1)
}

fn send_bytes(sock: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    // MSG_NOSIGNAL: a vanished peer is an error code, never SIGPIPE.
    rustix::net::send(sock, bytes, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
}

/// Writes what it can of `buf[*off..]`; `Ok(true)` when all is written.
fn write_some(sock: &TcpStream, buf: &[u8], off: &mut usize) -> Result<bool, DocaError> {
    while *off < buf.len() {
        match send_bytes(sock, &buf[*off..]) {
            Ok(0) => return Err(DocaError::CONNECTION_RESET),
            Ok(n) => *off += n,
            Err(e) if would_block(&e) => return Ok(false),
            Err(_) => return Err(DocaError::CONNECTION_RESET),
        }
    }
    Ok(true)
}

/// Reads what is available into `buf` with one call; `Ok(0)` when nothing
/// is (an empty `buf` reads nothing).
fn read_avail(sock: &TcpStream, buf: &mut [u8]) -> Result<usize, DocaError> {
    if buf.is_empty() {
        return Ok(0);
    }
    loop {
        return match (&mut &*sock).read(buf) {
            Ok(0) => Err(DocaError::CONNECTION_RESET),
            Ok(n) => Ok(n),
            Err(e) if would_block(&e) => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Err(DocaError::CONNECTION_RESET),
        };
    }
}

/// Reads what it can into `buf[*have..]`; `Ok(true)` when full.
fn read_some(sock: &TcpStream, buf: &mut [u8], have: &mut usize) -> Result<bool, DocaError> {
    while *have < buf.len() {
        match (&mut &*sock).read(&mut buf[*have..]) {
            Ok(0) => return Err(DocaError::CONNECTION_RESET),
            Ok(n) => *have += n,
            Err(e) if would_block(&e) => return Ok(false),
            Err(_) => return Err(DocaError::CONNECTION_RESET),
        }
    }
    Ok(true)
}

fn dma_error(e: io::Error) -> DocaError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            DocaError::CONNECTION_RESET
        }
        _ => {
            log::warn!("emulated NIC transfer failed: {e}");
            DocaError::IO_FAILED
        }
    }
}

/// How long an idle stream may go without its keepalive probes answered
/// before it fails like a connection whose peer is gone (the emulated
/// counterpart of an RC queue pair's transport retries): a peer that
/// vanishes without a FIN or a reset (its host or link lost) while nothing
/// was in flight is noticed in seconds, not after hours, and its credits
/// and buffers are not held that long. A live but stopped peer process is
/// not affected: its kernel answers the probes. With data unacknowledged
/// TCP's retransmission timeout still decides (minutes): a shorter
/// `TCP_USER_TIMEOUT` would also cut a live receiver that merely has not
/// read for that long (a zero window), which is how this NIC says
/// "receiver not ready", and it would override the keepalive timing.
pub(crate) const PEER_SILENCE: Duration = Duration::from_secs(5);

/// Sets `sock` up as a stream of the emulated NIC: no Nagle delay, and an
/// idle peer declared gone after [`PEER_SILENCE`] without an answer.
fn nic_stream(sock: &TcpStream) -> io::Result<()> {
    use rustix::net::sockopt;
    sock.set_nodelay(true)?;
    sockopt::set_socket_keepalive(sock, true)?;
    sockopt::set_tcp_keepidle(sock, PEER_SILENCE / 5 * 2)?;
    sockopt::set_tcp_keepintvl(sock, PEER_SILENCE / 5)?;
    sockopt::set_tcp_keepcnt(sock, 3)?;
    Ok(())
}

impl OutStream {
    fn new(sock: TcpStream, remote_token: u64) -> io::Result<Self> {
        nic_stream(&sock)?;
        Ok(Self {
            sock,
            hello: Frame::Hello { token: remote_token }.encode(),
            hello_off: 0,
            tx: vec![0; TX_BUF].into_boxed_slice(),
            tx_len: 0,
            tx_off: 0,
            big: None,
            rx: [0; ACK_FRAMES * FRAME_LEN],
            rx_have: 0,
            dma: Dma::new()?,
        })
    }
}

impl InStream {
    fn new(sock: TcpStream) -> io::Result<Self> {
        nic_stream(&sock)?;
        Ok(Self {
            sock,
            rx: vec![0; RX_BUF].into_boxed_slice(),
            rx_off: 0,
            rx_len: 0,
            cur: None,
            placed: 0,
            ack: [0; FRAME_LEN],
            ack_off: FRAME_LEN,
            acked: 0,
            dma: Dma::new()?,
        })
    }
}

impl Conn {
    fn live(&self) -> bool {
        !matches!(self.phase, Phase::Failed(_))
    }

    /// Finishes a nonblocking connect.
    fn finish_connect(&mut self) -> Result<(), DocaError> {
        let Some(fd) = &self.connecting else { return Ok(()) };
        let mut pfd = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::OUT)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        match rustix::event::poll(&mut pfd, Some(&zero)) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(Errno::INTR) => return Ok(()),
            Err(e) => return Err(crate::error::os("poll", e)),
        }
        match rustix::net::sockopt::socket_error(fd) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                log::warn!("rdma connect failed: {e}");
                return Err(DocaError::NOT_CONNECTED);
            }
        }
        let fd = self.connecting.take().ok_or(DocaError::UNEXPECTED)?;
        let out = OutStream::new(TcpStream::from(fd), self.remote_token).map_err(|e| crate::error::os("socket", e))?;
        self.out = Some(out);
        Ok(())
    }

    /// Writes the hello and queued sends; reads acknowledgements.
    /// `Ok(true)`: stopped on the budget with work perhaps left (sends to
    /// write, acknowledgements to read).
    fn pump_out(&mut self, id: RdmaConnId, events: &mut VecDeque<RdmaEvent>) -> Result<bool, DocaError> {
        let Conn { out, send_q, unacked, .. } = self;
        let Some(out) = out.as_mut() else { return Ok(false) };
        let mut more = false;
        // Acknowledgements and errors from the receiver: only sends written
        // (or being written) can be acknowledged or refused.
        if !unacked.is_empty() || out.big.is_some() {
            more = true;
            for _ in 0..BUDGET {
                let room = out.rx.len() - out.rx_have;
                let n = read_avail(&out.sock, &mut out.rx[out.rx_have..])?;
                if n == 0 {
                    more = false;
                    break;
                }
                out.rx_have += n;
                let whole = out.rx_have - out.rx_have % FRAME_LEN;
                for f in out.rx[..whole].chunks_exact(FRAME_LEN) {
                    on_send_stream_frame(f, id, send_q, unacked, events)?;
                }
                out.rx.copy_within(whole..out.rx_have, 0);
                out.rx_have -= whole;
                if n < room {
                    more = false;
                    break; // the socket had no more
                }
            }
        }
        if !write_some(&out.sock, &out.hello, &mut out.hello_off)? {
            return Ok(more);
        }
        for _ in 0..BUDGET {
            // What was gathered goes out in one call.
            if out.tx_off < out.tx_len && !write_some(&out.sock, &out.tx[..out.tx_len], &mut out.tx_off)? {
                return Ok(more);
            }
            out.tx_off = 0;
            out.tx_len = 0;
            // Then the payload of a large send whose header ended it.
            if let Some(done) = out.big.as_mut() {
                let t = send_q.front().ok_or(DocaError::UNEXPECTED)?;
                let len = t.buf.data_len() as usize;
                while *done < len {
                    let off = t.buf.file_offset() + *done as u64;
                    match out.dma.send(&out.sock, &t.buf.mmap, off, len - *done).map_err(dma_error)? {
                        Moved::Bytes(n) => *done += n,
                        Moved::WouldBlock => return Ok(more),
                        Moved::Eof => return Err(DocaError::CONNECTION_RESET),
                    }
                }
                out.big = None;
                if let Some(t) = send_q.pop_front() {
                    unacked.push_back(t);
                }
            }
            if send_q.is_empty() {
                break;
            }
            // Gather headers and small payloads (of the process's own
            // memory: imported memory goes file to socket in the kernel).
            while let Some(t) = send_q.front() {
                let len = t.buf.data_len() as usize;
                let inline = len <= INLINE_MAX && t.buf.mmap.region().is_some();
                let need = FRAME_LEN + if inline { len } else { 0 };
                if out.tx_len + need > out.tx.len() {
                    break;
                }
                let hdr = Frame::Send { seq: t.seq, len: len as u32, imm: t.imm }.encode();
                out.tx[out.tx_len..out.tx_len + FRAME_LEN].copy_from_slice(&hdr);
                out.tx_len += FRAME_LEN;
                if !inline {
                    out.big = Some(0);
                    break;
                }
                let dst = &mut out.tx[out.tx_len..out.tx_len + len];
                if !dma::read_mem(&t.buf.mmap, t.buf.file_offset(), dst).map_err(dma_error)? {
                    return Err(DocaError::UNEXPECTED);
                }
                out.tx_len += len;
                // Its bytes are gathered: it waits for its acknowledgement.
                if let Some(t) = send_q.pop_front() {
                    unacked.push_back(t);
                }
            }
        }
        // Sends still queued, or gathered and not written, after a budget's
        // worth of rounds.
        Ok(more || !send_q.is_empty() || out.tx_off < out.tx_len)
    }

    /// Places incoming sends into posted receives; acknowledges them.
    /// On error, `true` asks for a graceful close (the peer must read an
    /// error frame first).
    fn pump_in(
        &mut self,
        id: RdmaConnId,
        recv_q: &mut VecDeque<RecvTask>,
        events: &mut VecDeque<RdmaEvent>,
    ) -> Result<bool, (DocaError, bool)> {
        let Some(inn) = self.inn.as_mut() else { return Ok(false) };
        let hard = |e| (e, false);
        let mut placed_now = 0;
        // Each round consumes bytes, places a message or stops; `more`:
        // stopped on the budget, with bytes perhaps still in the socket.
        let mut rounds = 0;
        let more = loop {
            if rounds == 8 * BUDGET {
                break true;
            }
            rounds += 1;
            if let Some(cur) = inn.cur.as_mut() {
                if cur.done < cur.len {
                    let off = cur.task.buf.file_offset() + cur.done as u64;
                    let rest = cur.len - cur.done;
                    let buffered = inn.rx_len - inn.rx_off;
                    if buffered > 0 {
                        let n = buffered.min(rest);
                        let src = &inn.rx[inn.rx_off..inn.rx_off + n];
                        dma::write_mem(&cur.task.buf.mmap, off, src).map_err(|e| hard(dma_error(e)))?;
                        cur.done += n;
                        inn.rx_off += n;
                    } else if rest >= SPLICE_MIN {
                        match inn.dma.recv(&inn.sock, &cur.task.buf.mmap, off, rest) {
                            Ok(Moved::Bytes(n)) => cur.done += n,
                            Ok(Moved::WouldBlock) => break false,
                            Ok(Moved::Eof) => return Err(hard(DocaError::CONNECTION_RESET)),
                            Err(e) => return Err(hard(dma_error(e))),
                        }
                    } else if !inn.fill().map_err(hard)? {
                        break false;
                    }
                    continue;
                }
                let Some(cur) = inn.cur.take() else { break false };
                let mut buf = cur.task.buf;
                // len <= buf.len(), checked when the header was taken.
                let _ = buf.set_data_len(cur.len as u32);
                inn.placed = next_seq(inn.placed);
                events.push_back(RdmaEvent::Received {
                    conn: Some(id),
                    user_data: cur.task.user_data,
                    buf,
                    imm: cur.imm,
                    result: Ok(()),
                });
                placed_now += 1;
                if placed_now >= BUDGET {
                    break true;
                }
                continue;
            }
            if inn.rx_len - inn.rx_off < FRAME_LEN {
                if !inn.fill().map_err(hard)? {
                    break false;
                }
                continue;
            }
            let frame = Frame::decode(&inn.rx[inn.rx_off..inn.rx_off + FRAME_LEN]);
            let (seq, len, imm) = match frame {
                Ok(Frame::Send { seq, len, imm }) if seq == next_seq(inn.placed) => (seq, len as usize, imm),
                other => {
                    log::warn!("rdma: unexpected frame on a receive stream: {other:?}");
                    return Err(hard(DocaError::CONNECTION_ABORTED));
                }
            };
            // Receiver not ready: keep the header, stop reading; the
            // sender stalls in TCP flow control until a receive is posted.
            let Some(task) = recv_q.pop_front() else { break false };
            inn.rx_off += FRAME_LEN;
            if len > task.buf.len() as usize {
                log::warn!("rdma: send of {len} bytes into a receive of {} bytes fails the connection", task.buf.len());
                events.push_back(RdmaEvent::Received {
                    conn: Some(id),
                    user_data: task.user_data,
                    buf: task.buf,
                    imm: None,
                    result: Err(DocaError::TOO_BIG),
                });
                // Best effort: only between two acknowledgement frames.
                if inn.ack_off == FRAME_LEN {
                    let f = Frame::Error { seq, code: DocaError::TOO_BIG.code() }.encode();
                    let mut off = 0;
                    let _ = write_some(&inn.sock, &f, &mut off);
                }
                return Err((DocaError::TOO_BIG, true));
            }
            inn.cur = Some(Incoming { task, len, done: 0, imm });
        };
        // Cumulative acknowledgement of what was placed.
        if inn.ack_off == FRAME_LEN && inn.acked != inn.placed {
            inn.ack = Frame::Ack { seq: inn.placed }.encode();
            inn.ack_off = 0;
            inn.acked = inn.placed;
        }
        if inn.ack_off < FRAME_LEN {
            write_some(&inn.sock, &inn.ack, &mut inn.ack_off).map_err(hard)?;
        }
        Ok(more)
    }
}

/// Handles one acknowledgement or error frame read on a send stream.
fn on_send_stream_frame(
    f: &[u8],
    id: RdmaConnId,
    send_q: &mut VecDeque<SendTask>,
    unacked: &mut VecDeque<SendTask>,
    events: &mut VecDeque<RdmaEvent>,
) -> Result<(), DocaError> {
    match Frame::decode(f) {
        Ok(Frame::Ack { seq }) => {
            // An acknowledgement names a send written and not acknowledged
            // yet (an RC queue pair ignores one outside its window); one
            // beyond must not complete the sends before it as placed.
            let Some(k) = unacked.iter().position(|t| t.seq == seq) else {
                log::warn!("rdma: acknowledgement of send {seq}, which is not awaiting one");
                return Err(DocaError::CONNECTION_ABORTED);
            };
            for t in unacked.drain(..=k) {
                events.push_back(RdmaEvent::SendDone { conn: id, user_data: t.user_data, buf: t.buf, result: Ok(()) });
            }
            Ok(())
        }
        Ok(Frame::Error { seq, code }) => {
            let err = DocaError::from_nonzero(code);
            log::warn!("rdma: peer failed the connection at send {seq}: {err}");
            let q = if unacked.iter().any(|t| t.seq == seq) { unacked } else { send_q };
            if let Some(pos) = q.iter().position(|t| t.seq == seq)
                && let Some(t) = q.remove(pos)
            {
                events.push_back(RdmaEvent::SendDone {
                    conn: id,
                    user_data: t.user_data,
                    buf: t.buf,
                    result: Err(err),
                });
            }
            Err(DocaError::CONNECTION_ABORTED)
        }
        Ok(f) => {
            log::warn!("rdma: unexpected {f:?} on a send stream");
            Err(DocaError::CONNECTION_ABORTED)
        }
        Err(e) => {
            log::warn!("rdma: bad frame from peer: {e}");
            Err(DocaError::CONNECTION_ABORTED)
        }
    }
}

impl InStream {
    /// Reads ahead into the buffer with one call, after moving what is
    /// left to its front; `Ok(false)` when nothing was there.
    fn fill(&mut self) -> Result<bool, DocaError> {
        if self.rx_off > 0 {
            self.rx.copy_within(self.rx_off..self.rx_len, 0);
            self.rx_len -= self.rx_off;
            self.rx_off = 0;
        }
        let n = read_avail(&self.sock, &mut self.rx[self.rx_len..])?;
        self.rx_len += n;
        Ok(n > 0)
    }
}

impl State {
    fn progress(&mut self) -> usize {
        let before = self.events.len();
        match self.state {
            CtxState::Idle => return 0,
            CtxState::Starting => {
                self.state = CtxState::Running;
                return 1;
            }
            CtxState::Stopping => {
                for i in 0..self.conns.len() {
                    self.fail_conn(i, DocaError::SHUTDOWN, false);
                }
                self.flush_receives(DocaError::SHUTDOWN);
                self.pending.clear();
                self.listener = None;
                let mut n = self.events.len() - before;
                if self.sends_out == 0 && self.recvs_out == 0 {
                    self.conns.clear();
                    self.local = None;
                    self.state = CtxState::Idle;
                    n += 1;
                }
                return n;
            }
            CtxState::Running => {}
        }
        // Accepting costs a syscall per progress; it is needed only while
        // some connection still waits for its peer's stream (a stranger
        // dialling meanwhile waits in the backlog, harmless).
        if !self.pending.is_empty() || self.conns.iter().any(|c| c.live() && c.inn.is_none()) {
            self.accept();
        }
        for i in 0..self.conns.len() {
            self.progress_conn(i);
        }
        self.events.len() - before
    }

    fn accept(&mut self) {
        // Hellos read once per round when the table is full (not once per
        // stranger of a crowd).
        let mut heard = false;
        loop {
            let Some(l) = &self.listener else { return };
            match l.accept() {
                Ok((sock, peer)) => {
                    if sock.set_nonblocking(true).is_err() {
                        log::warn!("rdma: dropping connection from {peer}");
                        continue;
                    }
                    // Full: the streams whose hello has come are taken
                    // first; if none had, the stream waiting longest for its
                    // hello makes room (streams that never speak cannot
                    // lock peers out, even when they arrive in a crowd
                    // behind a peer that spoke).
                    if self.pending.len() >= self.pending.capacity() && !heard {
                        self.take_hellos();
                        heard = true;
                    }
                    if self.pending.len() >= self.pending.capacity()
                        && let Some(oldest) = (0..self.pending.len()).min_by_key(|&k| self.pending[k].since)
                    {
                        log::warn!("rdma: too many connections without a hello: the oldest dropped");
                        self.pending.swap_remove(oldest);
                    }
                    self.pe.watch(sock.as_fd());
                    let since = std::time::Instant::now();
                    self.pending.push(PendingIn { sock, rx: [0; FRAME_LEN], have: 0, since });
                }
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    log::warn!("rdma: accept failed: {e}");
                    break;
                }
            }
        }
        self.take_hellos();
    }

    /// Reads what the accepted streams have sent: a stream whose hello is
    /// complete becomes its connection's receive stream; one that sent
    /// something else, failed, or said nothing for [`HELLO_WAIT`] is
    /// dropped.
    fn take_hellos(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            match read_some(&p.sock, &mut p.rx, &mut p.have) {
                Ok(false) if p.since.elapsed() > HELLO_WAIT => {
                    log::warn!("rdma: a connection sent no hello within {HELLO_WAIT:?}: dropped");
                    self.pending.swap_remove(i);
                    continue;
                }
                Ok(false) => {
                    i += 1;
                    continue;
                }
                Err(_) => {
                    self.pending.swap_remove(i);
                    continue;
                }
                Ok(true) => {}
            }
            let p = self.pending.swap_remove(i);
            let token = match Frame::decode(&p.rx) {
                Ok(Frame::Hello { token }) => token,
                other => {
                    log::warn!("rdma: connection without a hello ({other:?}) dropped");
                    continue;
                }
            };
            match self.conns.iter_mut().find(|c| c.token == token && c.live() && c.inn.is_none()) {
                Some(c) => match InStream::new(p.sock) {
                    Ok(s) => c.inn = Some(s),
                    Err(e) => log::warn!("rdma: cannot set up a receive stream: {e}"),
                },
                None => log::warn!("rdma: hello for unknown connection {token:#x} dropped"),
            }
        }
    }

    fn progress_conn(&mut self, i: usize) {
        let id = RdmaConnId(i as u32);
        let State { conns, recv_q, events, pe, .. } = self;
        let c = &mut conns[i];
        if !c.live() {
            return;
        }
        let res = c
            .finish_connect()
            .and_then(|()| c.pump_out(id, events))
            .map_err(|e| (e, false))
            .and_then(|out| Ok(c.pump_in(id, recv_q, events)? || out));
        match res {
            Err((e, graceful)) => {
                self.fail_conn(i, e, graceful);
                return;
            }
            // Stopped on a budget: the sockets, watched edge-triggered,
            // will not announce what they already hold; a sleeper must
            // come back for it.
            Ok(true) => pe.again(),
            Ok(false) => {}
        }
        let up = c.out.as_ref().is_some_and(|o| o.hello_off == FRAME_LEN) && c.inn.is_some();
        if !c.reported && c.phase == Phase::Active {
            if up {
                c.reported = true;
                events.push_back(RdmaEvent::Connected(id));
            } else if c.connect_by.is_some_and(|t| std::time::Instant::now() >= t) {
                log::debug!(
                    "rdma connection {i}: not up {CONNECT_WAIT:?} after connect (own stream {}, peer's stream {})",
                    if c.out.as_ref().is_some_and(|o| o.hello_off == FRAME_LEN) { "up" } else { "not up" },
                    if c.inn.is_some() { "up" } else { "never came" }
                );
                self.fail_conn(i, DocaError::TIME_OUT, false);
            }
        }
    }

    fn fail_conn(&mut self, i: usize, err: DocaError, graceful: bool) {
        let id = RdmaConnId(i as u32);
        let c = &mut self.conns[i];
        if !c.live() {
            return;
        }
        c.phase = Phase::Failed(err);
        if err != DocaError::SHUTDOWN {
            log::warn!("rdma connection {i} failed: {err}");
        }
        self.events.push_back(RdmaEvent::ConnectionFailed(id, err));
        let task_err = if err == DocaError::TOO_BIG { DocaError::CONNECTION_ABORTED } else { err };
        for t in c.unacked.drain(..).chain(c.send_q.drain(..)) {
            self.events.push_back(RdmaEvent::SendDone {
                conn: id,
                user_data: t.user_data,
                buf: t.buf,
                result: Err(task_err),
            });
        }
        if let Some(inn) = c.inn.take() {
            if let Some(cur) = inn.cur {
                self.events.push_back(RdmaEvent::Received {
                    conn: Some(id),
                    user_data: cur.task.user_data,
                    buf: cur.task.buf,
                    imm: None,
                    result: Err(task_err),
                });
            }
            if graceful {
                let _ = inn.sock.shutdown(std::net::Shutdown::Write);
                c.linger.push(inn.sock);
            }
        }
        if let Some(out) = c.out.take()
            && graceful
        {
            c.linger.push(out.sock);
        }
        c.connecting = None;
        if !self.conns.iter().any(Conn::live) {
            self.flush_receives(task_err);
        }
    }

    fn flush_receives(&mut self, err: DocaError) {
        for t in self.recv_q.drain(..) {
            self.events.push_back(RdmaEvent::Received {
                conn: None,
                user_data: t.user_data,
                buf: t.buf,
                imm: None,
                result: Err(err),
            });
        }
    }
}
