//! Emulated comch: a server and its clients over Unix `SOCK_SEQPACKET`
//! sockets (reliable, ordered, message boundaries kept) bound at
//! `<runtime dir>/comch-<server name>.sock`. A filesystem path, not an
//! abstract socket: abstract sockets are per network namespace, paths are
//! shared by every namespace of the host, as the PCIe link is.
//!
//! Messages are capped at the configured size (at most
//! [`COMCH_MAX_MSG_SIZE`](crate::COMCH_MAX_MSG_SIZE)); send tasks come from
//! a fixed pool with preallocated message slots; received messages wait in
//! a fixed ring until taken (when it is full, reading stops: backpressure).
//!
//! After the client's hello every packet starts with a kind byte: a user
//! message, or the announcement of a fast-path consumer started (its id and
//! the token naming its socket) or gone on this connection (see
//! `fastpath`; layouts in [`crate::emu_wire::ComchPacket`]). A packet that
//! does not decode disconnects the peer that sent it. Announcements wait in
//! the receive queue like messages (each holds a slot until its event is
//! taken), and a peer may have at most 256 consumers announced on a
//! connection (more disconnect it): what a peer sends stays bounded.

use super::dev::Device;
use super::pe::{PeShared, Progress, ProgressEngine};
use crate::{ComchConfig, ComchConnId, ComchEvent, CtxState, DocaError};
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::RUNTIME_DIR_ENV;

/// Directory of the emulated comch sockets: `$DNE_EMU_RUNTIME_DIR`, else
/// `/tmp/dne-emu-<uid>`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os(RUNTIME_DIR_ENV) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(format!("/tmp/dne-emu-{}", rustix::process::getuid().as_raw())),
    }
}

/// Creates the runtime directory. The default one, at a path any user can
/// predict, is created private (0700); one that exists must be this
/// user's and closed to others' writes: another user who made it first
/// could put their own sockets in place of ours.
pub(crate) fn make_runtime_dir() -> Result<(), DocaError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = runtime_dir();
    if std::env::var_os(RUNTIME_DIR_ENV).is_some() {
        // The operator's choice.
        return std::fs::create_dir_all(&dir).map_err(|e| crate::error::os("mkdir", e));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(&dir).map_err(|e| crate::error::os("stat", e))?;
            let uid = rustix::process::getuid().as_raw();
            if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
                log::warn!(
                    "comch: {} is not a directory of uid {uid} closed to others' writes; refusing it",
                    dir.display()
                );
                return Err(DocaError::NOT_PERMITTED);
            }
            Ok(())
        }
        Err(e) => Err(crate::error::os("mkdir", e)),
    }
}

pub(crate) fn socket_path(name: &str) -> Result<PathBuf, DocaError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !name.starts_with('.');
    if !ok {
        return Err(DocaError::INVALID_VALUE);
    }
    Ok(runtime_dir().join(format!("comch-{name}.sock")))
}

pub(crate) fn seqpacket() -> Result<OwnedFd, DocaError> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| crate::error::os("socket", e))
}

/// How often a server looks for new clients (see `State::accept`).
const ACCEPT_EVERY: Duration = Duration::from_millis(1);
/// How long an accepted client may take to send its hello; a silent one
/// is dropped after that, and the one silent longest makes room when the
/// server is full (sockets that never speak cannot lock clients out).
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// A silent client makes room for a new one only once silent this long (a
/// real client sends its hello as it connects).
const HELLO_GRACE: Duration = Duration::from_millis(100);

/// The id of the connection in peer slot `i`: the slot, and the slot's
/// generation in the high half.
fn conn_id(i: usize, gens: &[u16]) -> ComchConnId {
    ComchConnId(i as u32 | u32::from(gens[i]) << 16)
}

/// Reads a silent peer's hello: `Some(true)` when it came, `Some(false)`
/// when nothing has yet, `None` when the peer sent something else or left.
fn said_hello(p: &Peer) -> Option<bool> {
    let mut h = [0u8; 16];
    match rustix::net::recv(&p.fd, &mut h[..], RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
        Ok((_, n)) if n == HELLO.len() && h[..n] == HELLO[..] => Some(true),
        Err(Errno::AGAIN) | Err(Errno::INTR) => Some(false),
        _ => None,
    }
}

/// First message of every client: names the protocol, so a server counts
/// only real clients (a probe that connects and leaves is never reported).
const HELLO: &[u8; 8] = b"DNECOMCH";

use crate::emu_wire::{COMCH_CTRL_LEN as CTRL_LEN, COMCH_MSG as K_MSG, ComchPacket};

#[derive(Debug)]
struct Peer {
    fd: OwnedFd,
    /// The client's hello arrived (always true on the client side).
    up: bool,
    /// When it was accepted (or connected).
    since: Instant,
}

#[derive(Debug)]
enum Role {
    /// `next_accept`: when `progress` next looks for new clients, unless
    /// the engine's notification was cleared since the last look
    /// (`clears`, see `State::accept`).
    Server {
        listener: Option<OwnedFd>,
        next_accept: Instant,
        clears: u64,
    },
    Client {
        next_try: Instant,
    },
}

#[derive(Debug)]
enum Ev {
    Public(ComchEvent),
    Msg {
        conn: u32,
        slot: u32,
        len: u32,
    },
    /// A consumer announcement, holding a receive slot until taken (like
    /// a message: what a peer sends waits in a bounded queue).
    Held {
        slot: u32,
        ev: ComchEvent,
    },
}

/// Consumers a peer may have announced on one connection at once; a peer
/// announcing more is disconnected (the table and its events are bounded).
const MAX_REMOTE_CONSUMERS: usize = 256;

#[derive(Debug)]
struct SendTask {
    conn: u32,
    slot: u32,
    len: u32,
    user_data: u64,
}

/// A control packet waiting for its connection.
#[derive(Debug)]
struct Ctrl {
    conn: u32,
    bytes: [u8; CTRL_LEN],
    len: usize,
}

#[derive(Debug)]
pub(crate) struct State {
    cfg: ComchConfig,
    /// The progress engine, whose notification handle watches every
    /// socket of the context.
    pe: Arc<PeShared>,
    role: Role,
    path: PathBuf,
    bound: bool,
    state: CtxState,
    peers: Vec<Option<Peer>>,
    /// Generation of each peer slot, in the high half of the ids of its
    /// connections: an id names one connection, not whichever takes its
    /// slot next (a send queued for a client that left is refused, not
    /// sent to the next).
    gens: Vec<u16>,
    blocked: Vec<bool>,
    send_q: VecDeque<SendTask>,
    send_free: Vec<u32>,
    send_data: Box<[u8]>,
    recv_free: Vec<u32>,
    recv_data: Box<[u8]>,
    sends_out: u32,
    events: VecDeque<Ev>,
    /// Consumer announcements to send, ahead of queued messages.
    ctrl_q: VecDeque<Ctrl>,
    /// The peer's consumers: (connection, id, token of its socket).
    remote_consumers: Vec<(ComchConnId, u32, u64)>,
}

#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) st: Mutex<State>,
}

impl Progress for Core {
    fn progress(&self) -> usize {
        super::lock(&self.st).progress()
    }
}

impl State {
    fn new(cfg: ComchConfig, pe: Arc<PeShared>, role: Role, path: PathBuf, peers: usize) -> Self {
        // A kind byte before every message.
        let m = cfg.max_msg_size as usize + 1;
        let events = (cfg.send_tasks + cfg.recv_queue) as usize + 2 * peers + 4;
        Self {
            cfg,
            pe,
            role,
            path,
            bound: false,
            state: CtxState::Idle,
            peers: (0..peers).map(|_| None).collect(),
            gens: vec![0; peers],
            blocked: vec![false; peers],
            send_q: VecDeque::with_capacity(cfg.send_tasks as usize),
            send_free: (0..cfg.send_tasks).rev().collect(),
            send_data: vec![0; m * cfg.send_tasks as usize].into_boxed_slice(),
            recv_free: (0..cfg.recv_queue).rev().collect(),
            recv_data: vec![0; m * cfg.recv_queue as usize].into_boxed_slice(),
            sends_out: 0,
            events: VecDeque::with_capacity(events),
            ctrl_q: VecDeque::new(),
            remote_consumers: Vec::new(),
        }
    }

    /// Queues an announcement of a local consumer to the peer of `id`
    /// (`fastpath`): `NOT_CONNECTED` when that connection is not up.
    pub(crate) fn announce(&mut self, id: ComchConnId, pkt: ComchPacket<'_>) -> Result<(), DocaError> {
        let conn = id.index();
        if self.state != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        if !self.peers.get(conn as usize).is_some_and(|p| p.as_ref().is_some_and(|p| p.up)) || self.id(conn) != id {
            return Err(DocaError::NOT_CONNECTED);
        }
        let mut bytes = [0; CTRL_LEN];
        let len = pkt.encode_ctrl(&mut bytes).ok_or(DocaError::INVALID_VALUE)?;
        self.ctrl_q.push_back(Ctrl { conn, bytes, len });
        Ok(())
    }

    /// The token of the peer's consumer `consumer` on connection `id`.
    pub(crate) fn remote_consumer(&self, id: ComchConnId, consumer: u32) -> Option<u64> {
        self.remote_consumers.iter().find(|&&(c, i, _)| c == id && i == consumer).map(|&(_, _, t)| t)
    }

    /// Whether connection `id` is up.
    pub(crate) fn is_up(&self, id: ComchConnId) -> bool {
        self.state == CtxState::Running
            && self.peers.get(id.index() as usize).is_some_and(|p| p.as_ref().is_some_and(|p| p.up))
            && self.id(id.index()) == id
    }

    /// The id of the connection in peer slot `i` now.
    fn id(&self, i: u32) -> ComchConnId {
        conn_id(i as usize, &self.gens)
    }

    /// Slot `slot` of a message area: a kind byte, then up to `max` bytes.
    fn slot(data: &mut [u8], max: u32, slot: u32) -> &mut [u8] {
        let m = max as usize + 1;
        &mut data[slot as usize * m..(slot as usize + 1) * m]
    }

    fn submit(&mut self, id: ComchConnId, msg: &[u8], user_data: u64) -> Result<(), DocaError> {
        let conn = id.index();
        if self.state != CtxState::Running {
            return Err(DocaError::BAD_STATE);
        }
        if msg.is_empty() {
            return Err(DocaError::INVALID_VALUE);
        }
        if msg.len() > self.cfg.max_msg_size as usize {
            return Err(DocaError::TOO_BIG);
        }
        if !self.peers.get(conn as usize).is_some_and(|p| p.as_ref().is_some_and(|p| p.up)) || self.id(conn) != id {
            return Err(DocaError::NOT_CONNECTED);
        }
        let slot = self.send_free.pop().ok_or(DocaError::NO_MEMORY)?;
        let data = Self::slot(&mut self.send_data, self.cfg.max_msg_size, slot);
        data[0] = K_MSG;
        data[1..=msg.len()].copy_from_slice(msg);
        self.send_q.push_back(SendTask { conn, slot, len: msg.len() as u32 + 1, user_data });
        self.sends_out += 1;
        Ok(())
    }

    fn poll_event(&mut self, out: &mut [u8]) -> Option<ComchEvent> {
        match self.events.pop_front()? {
            Ev::Public(e) => {
                if let ComchEvent::SendDone { .. } = e {
                    self.sends_out -= 1;
                }
                Some(e)
            }
            Ev::Msg { conn, slot, len } => {
                let conn = ComchConnId(conn);
                let data = &Self::slot(&mut self.recv_data, self.cfg.max_msg_size, slot)[1..=len as usize];
                let n = data.len().min(out.len());
                out[..n].copy_from_slice(&data[..n]);
                self.recv_free.push(slot);
                Some(ComchEvent::Message { conn, len, truncated: n < data.len() })
            }
            Ev::Held { slot, ev } => {
                self.recv_free.push(slot);
                Some(ev)
            }
        }
    }

    fn disconnect(&mut self, conn: u32, err: DocaError) {
        match self.peers[conn as usize].take() {
            Some(p) if p.up => {}
            _ => return,
        }
        let id = self.id(conn);
        self.remote_consumers.retain(|&(c, _, _)| c != id);
        self.ctrl_q.retain(|c| c.conn != conn);
        self.events.push_back(Ev::Public(ComchEvent::Disconnected(id)));
        let State { send_q, send_free, events, .. } = self;
        send_q.retain(|t| {
            if t.conn != conn {
                return true;
            }
            send_free.push(t.slot);
            events.push_back(Ev::Public(ComchEvent::SendDone { conn: id, user_data: t.user_data, result: Err(err) }));
            false
        });
        if matches!(self.role, Role::Client { .. }) && self.state == CtxState::Running {
            // A client whose server went away stops, as DOCA's does.
            self.state = CtxState::Stopping;
        }
    }

    fn progress(&mut self) -> usize {
        let before = self.events.len();
        match self.state {
            CtxState::Idle => return 0,
            CtxState::Starting => return self.starting(),
            CtxState::Stopping => {
                for i in 0..self.peers.len() {
                    self.disconnect(i as u32, DocaError::SHUTDOWN);
                }
                if let Role::Server { listener, .. } = &mut self.role {
                    *listener = None;
                }
                self.unbind();
                let mut n = self.events.len() - before;
                if self.sends_out == 0 {
                    self.state = CtxState::Idle;
                    n += 1;
                }
                return n;
            }
            CtxState::Running => {}
        }
        self.accept();
        self.read();
        self.write();
        self.events.len() - before
    }

    fn starting(&mut self) -> usize {
        match &mut self.role {
            Role::Server { .. } => {
                self.state = CtxState::Running;
                1
            }
            Role::Client { next_try } => {
                let now = Instant::now();
                if now < *next_try {
                    return 0;
                }
                // The server may not exist yet: retry, as DOCA's client
                // stays starting until it is accepted.
                *next_try = now + Duration::from_millis(2);
                let Ok(fd) = seqpacket() else { return 0 };
                let Ok(addr) = SocketAddrUnix::new(self.path.as_path()) else { return 0 };
                let hello = rustix::net::connect(&fd, &addr)
                    .and_then(|()| rustix::net::send(&fd, HELLO, SendFlags::DONTWAIT | SendFlags::NOSIGNAL));
                match hello {
                    Ok(_) => {
                        self.pe.watch(fd.as_fd());
                        self.peers[0] = Some(Peer { fd, up: true, since: Instant::now() });
                        self.state = CtxState::Running;
                        self.events.push_back(Ev::Public(ComchEvent::Connected(ComchConnId(0))));
                        2
                    }
                    Err(e) => {
                        log::trace!("comch client: {} not reachable yet: {e}", self.path.display());
                        0
                    }
                }
            }
        }
    }

    /// Takes new clients, at most every [`ACCEPT_EVERY`]: a nonblocking
    /// `accept` that finds none still makes the kernel allocate (and free)
    /// a socket, which per `progress` call would cost more than the
    /// messages; a client waits a millisecond at most. Except the first
    /// progress after the notification was cleared, which always looks:
    /// the listener's readiness was reported once and the clear forgot it,
    /// so a caller that then sleeps (clear, progress, sleep) would sleep
    /// with a client waiting.
    fn accept(&mut self) {
        let Role::Server { listener: Some(l), next_accept, clears } = &mut self.role else { return };
        let now = Instant::now();
        let cleared = self.pe.clears();
        if now < *next_accept && cleared == *clears {
            return;
        }
        (*next_accept, *clears) = (now + ACCEPT_EVERY, cleared);
        let l = &*l;
        loop {
            match rustix::net::accept_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(fd) => {
                    let free = self.peers.iter().position(Option::is_none).or_else(|| {
                        // Full: the hellos already sent count first (the
                        // clients accepted before this one in the same
                        // round have not been read yet).
                        for i in 0..self.peers.len() {
                            let Some(p) = self.peers[i].as_mut().filter(|p| !p.up) else { continue };
                            match said_hello(p) {
                                Some(true) => {
                                    p.up = true;
                                    let id = conn_id(i, &self.gens);
                                    self.events.push_back(Ev::Public(ComchEvent::Connected(id)));
                                }
                                Some(false) => {}
                                None => self.peers[i] = None,
                            }
                        }
                        if let Some(i) = self.peers.iter().position(Option::is_none) {
                            return Some(i);
                        }
                        // Then the client silent longest makes room, if it
                        // has been silent a while.
                        let silent = self
                            .peers
                            .iter()
                            .enumerate()
                            .filter_map(|(i, p)| p.as_ref().filter(|p| !p.up).map(|p| (p.since, i)));
                        let (since, i) = silent.min()?;
                        if now.saturating_duration_since(since) < HELLO_GRACE {
                            return None;
                        }
                        log::warn!("comch server {}: full; a client that sent no hello dropped", self.path.display());
                        self.peers[i] = None;
                        Some(i)
                    });
                    match free {
                        Some(i) => {
                            self.pe.watch(fd.as_fd());
                            self.peers[i] = Some(Peer { fd, up: false, since: now });
                            self.gens[i] = self.gens[i].wrapping_add(1);
                        }
                        None => {
                            log::warn!("comch server {}: client limit reached, refusing one", self.path.display())
                        }
                    }
                }
                Err(Errno::AGAIN) | Err(Errno::INTR) => break,
                Err(e) => {
                    log::warn!("comch accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn read(&mut self) {
        let max = self.cfg.max_msg_size;
        for i in 0..self.peers.len() {
            while let Some(peer) = &mut self.peers[i] {
                if !peer.up {
                    match said_hello(peer) {
                        Some(true) => {
                            peer.up = true;
                            let id = conn_id(i, &self.gens);
                            self.events.push_back(Ev::Public(ComchEvent::Connected(id)));
                            continue;
                        }
                        Some(false) if peer.since.elapsed() > HELLO_WAIT => {
                            log::warn!("comch server: a client sent no hello within {HELLO_WAIT:?}; dropped");
                            self.peers[i] = None;
                            break;
                        }
                        Some(false) => break,
                        None => {
                            self.peers[i] = None;
                            break;
                        }
                    }
                }
                let fd = &peer.fd;
                let Some(&slot) = self.recv_free.last() else {
                    // The receive queue is full: what the socket still
                    // holds is read by a later progress, once the caller
                    // has taken these. Tell a sleeper to come back.
                    self.pe.again();
                    return;
                };
                let buf = Self::slot(&mut self.recv_data, max, slot);
                match rustix::net::recv(fd, &mut *buf, RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
                    Ok((_, 0)) => self.disconnect(i as u32, DocaError::NOT_CONNECTED),
                    Ok((_, n)) if n > max as usize + 1 => {
                        log::warn!("comch: peer sent {n} bytes, above the {max}-byte cap; disconnecting it");
                        self.disconnect(i as u32, DocaError::NOT_CONNECTED);
                    }
                    Ok((_, n)) => {
                        let id = conn_id(i, &self.gens);
                        match ComchPacket::decode(&buf[..n]) {
                            Ok(ComchPacket::Msg(_)) => {
                                self.recv_free.pop();
                                self.events.push_back(Ev::Msg { conn: id.0, slot, len: n as u32 - 1 });
                            }
                            Ok(ComchPacket::ConsumerUp { id: cid, token }) => {
                                let known = |&(c, i, _): &(ComchConnId, u32, u64)| c == id && i == cid;
                                if let Some(e) = self.remote_consumers.iter_mut().find(|e| known(e)) {
                                    e.2 = token;
                                } else if self.remote_consumers.iter().filter(|&&(c, _, _)| c == id).count()
                                    >= MAX_REMOTE_CONSUMERS
                                {
                                    log::warn!(
                                        "comch: a peer announced more than {MAX_REMOTE_CONSUMERS} consumers; disconnecting it"
                                    );
                                    self.disconnect(i as u32, DocaError::NOT_CONNECTED);
                                    continue;
                                } else {
                                    self.remote_consumers.push((id, cid, token));
                                }
                                self.recv_free.pop();
                                self.events
                                    .push_back(Ev::Held { slot, ev: ComchEvent::ConsumerUp { conn: id, id: cid } });
                            }
                            Ok(ComchPacket::ConsumerDown { id: cid }) => {
                                let before = self.remote_consumers.len();
                                self.remote_consumers.retain(|&(c, i, _)| !(c == id && i == cid));
                                if self.remote_consumers.len() < before {
                                    self.recv_free.pop();
                                    let ev = ComchEvent::ConsumerDown { conn: id, id: cid };
                                    self.events.push_back(Ev::Held { slot, ev });
                                }
                            }
                            Err(e) => {
                                log::warn!("comch: {e} from a peer; disconnecting it");
                                self.disconnect(i as u32, DocaError::NOT_CONNECTED);
                            }
                        }
                    }
                    Err(Errno::AGAIN) | Err(Errno::INTR) => break,
                    Err(_) => self.disconnect(i as u32, DocaError::NOT_CONNECTED),
                }
            }
        }
    }

    fn write(&mut self) {
        self.blocked.iter_mut().for_each(|b| *b = false);
        let mut gone = Vec::new();
        let State { send_q, send_free, send_data, peers, gens, blocked, events, cfg, ctrl_q, .. } = self;
        ctrl_q.retain(|c| {
            let i = c.conn as usize;
            if blocked[i] {
                return true;
            }
            let Some(Peer { fd, .. }) = &peers[i] else { return false };
            match rustix::net::send(fd, &c.bytes[..c.len], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(_) => false,
                Err(Errno::AGAIN) | Err(Errno::INTR) => {
                    blocked[i] = true;
                    true
                }
                Err(e) => {
                    log::warn!("comch send failed: {e}");
                    if !gone.contains(&c.conn) {
                        gone.push(c.conn);
                    }
                    false
                }
            }
        });
        send_q.retain(|t| {
            let c = t.conn as usize;
            if blocked[c] {
                return true;
            }
            let Some(Peer { fd, .. }) = &peers[c] else { return true };
            let data = &Self::slot(send_data, cfg.max_msg_size, t.slot)[..t.len as usize];
            let result = match rustix::net::send(fd, data, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(_) => Ok(()),
                Err(Errno::AGAIN) | Err(Errno::INTR) => {
                    blocked[c] = true;
                    return true;
                }
                Err(e) => {
                    log::warn!("comch send failed: {e}");
                    if !gone.contains(&t.conn) {
                        gone.push(t.conn);
                    }
                    Err(DocaError::NOT_CONNECTED)
                }
            };
            send_free.push(t.slot);
            let conn = conn_id(c, gens);
            events.push_back(Ev::Public(ComchEvent::SendDone { conn, user_data: t.user_data, result }));
            false
        });
        for c in gone {
            self.disconnect(c, DocaError::NOT_CONNECTED);
        }
    }

    fn unbind(&mut self) {
        if self.bound {
            let _ = std::fs::remove_file(&self.path);
            self.bound = false;
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.unbind();
    }
}

fn start_server(st: &mut State) -> Result<(), DocaError> {
    if st.state != CtxState::Idle {
        return Err(DocaError::BAD_STATE);
    }
    make_runtime_dir()?;
    let addr = SocketAddrUnix::new(st.path.as_path()).map_err(|_| DocaError::INVALID_VALUE)?;
    let fd = seqpacket()?;
    if let Err(e) = rustix::net::bind(&fd, &addr) {
        if e != Errno::ADDRINUSE {
            return Err(crate::error::os("bind", e));
        }
        // A live server owns the name, or a dead one left its socket.
        let probe = seqpacket()?;
        match rustix::net::connect(&probe, &addr) {
            Ok(()) | Err(Errno::AGAIN) => return Err(DocaError::IN_USE),
            Err(_) => {
                let _ = std::fs::remove_file(&st.path);
                rustix::net::bind(&fd, &addr).map_err(|e| crate::error::os("bind", e))?;
            }
        }
    }
    st.bound = true;
    rustix::net::listen(&fd, 128).map_err(|e| crate::error::os("listen", e))?;
    st.pe.watch(fd.as_fd());
    st.role = Role::Server { listener: Some(fd), next_accept: Instant::now(), clears: st.pe.clears() };
    st.state = CtxState::Starting;
    Ok(())
}

macro_rules! ctx_common {
    ($t:ident) => {
        impl $t {
            fn st(&self) -> std::sync::MutexGuard<'_, State> {
                super::lock(&self.core.st)
            }

            /// The context's state.
            pub fn state(&self) -> CtxState {
                self.st().state
            }

            /// Asks to stop: peers are disconnected and queued sends fail
            /// with `SHUTDOWN` inside `progress()`; the context is `Idle` once
            /// their completions have been taken.
            pub fn stop(&self) -> Result<(), DocaError> {
                self.st().state.request_stop()
            }

            /// Takes the next event. A message's bytes are copied into
            /// `msg` (which should hold `max_msg_size` bytes); taking a
            /// send's completion returns its slot to the pool.
            pub fn poll_event(&self, msg: &mut [u8]) -> Option<ComchEvent> {
                self.st().poll_event(msg)
            }

            /// The configured message cap.
            pub fn max_msg_size(&self) -> u32 {
                self.st().cfg.max_msg_size
            }
        }
    };
}

/// A comch server (`doca_comch_server`, on the DPU): accepts clients by
/// name.
#[derive(Debug)]
pub struct ComchServer {
    core: Arc<Core>,
    _pe: Arc<PeShared>,
    _dev: Device,
}

ctx_common!(ComchServer);

impl ComchServer {
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    pub(crate) fn device(&self) -> &Device {
        &self._dev
    }

    /// Creates a server named `name` (letters, digits, `.`, `-`, `_`; at
    /// most 64 bytes) on `dev`, connected to `pe`. It starts `Idle`.
    pub fn new(pe: &ProgressEngine, dev: &Device, name: &str, cfg: ComchConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let path = socket_path(name)?;
        let role = Role::Server { listener: None, next_accept: Instant::now(), clears: 0 };
        let st = State::new(cfg, pe.shared.clone(), role, path, cfg.max_clients as usize);
        let core = Arc::new(Core { st: Mutex::new(st) });
        pe.shared.connect(Arc::downgrade(&core) as _);
        Ok(Self { core, _pe: pe.shared.clone(), _dev: dev.clone() })
    }

    /// Asks to start: the name is taken now (`IN_USE` when a live server
    /// has it); the server is `Running` after a `progress()`.
    pub fn start(&self) -> Result<(), DocaError> {
        start_server(&mut self.st())
    }

    /// Queues a message to a connected client.
    pub fn send(&self, conn: ComchConnId, msg: &[u8], user_data: u64) -> Result<(), DocaError> {
        self.st().submit(conn, msg, user_data)
    }
}

/// A comch client (`doca_comch_client`, on the host): connects to a server
/// by name.
#[derive(Debug)]
pub struct ComchClient {
    core: Arc<Core>,
    _pe: Arc<PeShared>,
    _dev: Device,
}

ctx_common!(ComchClient);

impl ComchClient {
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    pub(crate) fn device(&self) -> &Device {
        &self._dev
    }

    /// Creates a client of the server named `name`, on `dev`, connected to
    /// `pe`. It starts `Idle`.
    pub fn new(pe: &ProgressEngine, dev: &Device, name: &str, cfg: ComchConfig) -> Result<Self, DocaError> {
        cfg.validate()?;
        let path = socket_path(name)?;
        let st = State::new(cfg, pe.shared.clone(), Role::Client { next_try: Instant::now() }, path, 1);
        let core = Arc::new(Core { st: Mutex::new(st) });
        pe.shared.connect(Arc::downgrade(&core) as _);
        Ok(Self { core, _pe: pe.shared.clone(), _dev: dev.clone() })
    }

    /// Asks to start: the client is `Running` once a `progress()` has
    /// connected it to its server (it keeps trying until the server
    /// exists).
    pub fn start(&self) -> Result<(), DocaError> {
        let mut st = self.st();
        if st.state != CtxState::Idle {
            return Err(DocaError::BAD_STATE);
        }
        st.role = Role::Client { next_try: Instant::now() };
        st.state = CtxState::Starting;
        Ok(())
    }

    /// Queues a message to the server.
    pub fn send(&self, msg: &[u8], user_data: u64) -> Result<(), DocaError> {
        self.st().submit(ComchConnId(0), msg, user_data)
    }

    /// The connection to the server (index 0).
    pub fn conn(&self) -> ComchConnId {
        ComchConnId(0)
    }
}
