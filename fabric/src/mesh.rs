//! [`Mesh`]: listen/connect setup of fabric connections between fabric
//! nodes (agents and ingresses), one connection per (peer, tenant), and
//! their repair when a peer goes away and comes back.
//!
//! Two halves:
//! * a control thread owns the out-of-band TCP connections (one per peer:
//!   the node with the higher id dials, the other listens), speaks
//!   [`wire::mesh`] on them, redials with capped exponential backoff, and
//!   notices a peer's death by its TCP connection closing. It never waits
//!   on one peer: connections on the listener are read as their Hellos
//!   arrive (each within the handshake deadline), and each dial runs on a
//!   short-lived thread of its own, so neither a silent stranger on the
//!   port nor a peer whose process is stopped (its kernel completes the
//!   connection, nobody answers) holds up the other links;
//! * the data-plane thread, which owns the [`Endpoint`], calls
//!   [`Mesh::pump`] every millisecond or so: it opens, connects and closes
//!   the endpoint's connections as the control thread asks, and reports
//!   what changed as [`MeshEvent`]s. The endpoint is never shared.
//!
//! A fabric connection that fails ([`Mesh::peer_failed`]) resets the whole
//! link to that peer: the TCP connection is dropped, both sides close every
//! connection to the other, and the dialer reconnects. Every (re)connection
//! of a peer is an *epoch*; setup messages of an older epoch are ignored, so
//! a blob can never connect a connection of the wrong generation.

use crate::{ConnId, ConnSpec, Endpoint, Transport};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wire::mesh::{MAX_MESH_FRAME, MeshConn, MeshDecodeError, MeshHello, MeshMsg};

/// First redial delay; doubled after each failure up to
/// [`MeshConfig::backoff_max`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Reads of 4 KiB from one link's stream per control-thread round, at most
/// (what was read is decoded before the next round reads more).
const READS_PER_ROUND: usize = 16;
/// How long a control-thread round sleeps when nothing happens.
const TICK: Duration = Duration::from_millis(5);
/// Most connections on the listener waiting for their Hello at once; a
/// new one beyond it drops the oldest that has sent nothing (or else the
/// oldest), after every Hello that has arrived is taken.
const MAX_PENDING: usize = 16;
/// How long an idle link may go without its keepalive probes answered
/// before it is down: a peer that vanishes without a FIN or a reset (host
/// or link lost) goes down in seconds, not after hours. A live but stopped
/// peer process is not affected: its kernel answers. (With data
/// unacknowledged, TCP's retransmission timeout decides; see the emulated
/// NIC's `PEER_SILENCE` for why there is no `TCP_USER_TIMEOUT`.)
const PEER_SILENCE: Duration = Duration::from_secs(5);

/// Sets a link's stream up: no Nagle delay, an idle peer gone after
/// [`PEER_SILENCE`] without an answer.
fn control_stream(s: &TcpStream) -> io::Result<()> {
    use rustix::net::sockopt;
    s.set_nodelay(true)?;
    sockopt::set_socket_keepalive(s, true)?;
    sockopt::set_tcp_keepidle(s, PEER_SILENCE / 5 * 2)?;
    sockopt::set_tcp_keepintvl(s, PEER_SILENCE / 5)?;
    sockopt::set_tcp_keepcnt(s, 3)?;
    Ok(())
}

/// Who this node is and whom it talks to.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// This node's fabric node id.
    pub me: u16,
    /// This node's name (in Hello, for logs).
    pub name: String,
    /// Control listen address (the node's fabric address).
    pub listen: SocketAddr,
    /// Peers: fabric node id and control address.
    pub peers: Vec<(u16, SocketAddr)>,
    /// Tenants: one fabric connection per peer for each.
    pub tenants: Vec<u16>,
    /// Longest redial delay.
    pub backoff_max: Duration,
    /// How long a connection may take to say its Hello, from when it was
    /// dialed or accepted ([`MeshConfig::HANDSHAKE`] in a cluster).
    pub handshake: Duration,
}

impl MeshConfig {
    /// The handshake deadline of a cluster's nodes.
    pub const HANDSHAKE: Duration = Duration::from_secs(2);
}

/// What changed, for the data plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshEvent {
    /// A connection to `peer` for `tenant` was opened (post its receives
    /// now); [`crate::Completion::Connected`] follows when it is up.
    Opened {
        /// Peer node.
        peer: u16,
        /// Tenant.
        tenant: u16,
        /// The connection.
        conn: ConnId,
    },
    /// The link to `peer` is down: these connections were closed; their
    /// outstanding operations complete with errors in later polls.
    PeerDown {
        /// Peer node.
        peer: u16,
        /// The closed connections.
        conns: Vec<ConnId>,
    },
}

pub(crate) enum Cmd {
    Open { peer: u16, epoch: u32 },
    Connect { peer: u16, epoch: u32, tenant: u16, blob: Vec<u8> },
    Down { peer: u16 },
}

pub(crate) enum Note {
    Blob { peer: u16, epoch: u32, tenant: u16, blob: Vec<u8> },
    Reset { peer: u16, epoch: u32 },
}

/// The data-plane half of the mesh (see the module docs). With
/// [`Mesh::start_shards`] there are several halves over one control
/// thread, each with its own tenants and endpoint (one per data-plane
/// core); peers see one node.
#[derive(Debug)]
pub struct Mesh {
    tenants: Vec<u16>,
    /// The index of each tenant in `tenants`.
    slot: HashMap<u16, usize>,
    cmds: Receiver<Cmd>,
    notes: Sender<Note>,
    /// Current epoch and connections of each peer that is up: at `i`, the
    /// connection of `tenants[i]` (`None` if it could not be opened).
    links: HashMap<u16, (u32, Vec<Option<ConnId>>)>,
    /// The peer of each connection in `links`.
    owners: HashMap<ConnId, u16>,
    /// Peers whose link is up (control connection and setup sent).
    up: Arc<AtomicU32>,
    _control: Arc<ControlThread>,
    /// Entries of `links` and `owners` that the lookups of a tenant's
    /// connection and [`Mesh::peer_failed`] looked at (what tests measure
    /// their cost by).
    #[cfg(test)]
    entries_looked: std::cell::Cell<usize>,
}

/// The control thread, stopped and joined when the last half goes.
#[derive(Debug)]
struct ControlThread {
    stop: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.get_mut().ok().and_then(Option::take);
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// A shard's tenants and where the control thread sends its commands.
struct Shard {
    tenants: Vec<u16>,
    cmds: Sender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Open { peer, epoch } => write!(f, "Open({peer}, {epoch})"),
            Cmd::Connect { peer, epoch, tenant, .. } => write!(f, "Connect({peer}, {epoch}, {tenant})"),
            Cmd::Down { peer } => write!(f, "Down({peer})"),
        }
    }
}

impl std::fmt::Debug for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Blob { peer, epoch, tenant, .. } => write!(f, "Blob({peer}, {epoch}, {tenant})"),
            Note::Reset { peer, epoch } => write!(f, "Reset({peer}, {epoch})"),
        }
    }
}

impl Mesh {
    /// Binds the control listener (so a taken port fails here) and starts
    /// the control thread.
    pub fn start(cfg: MeshConfig) -> io::Result<Self> {
        let all = cfg.tenants.clone();
        let mut v = Self::start_shards(cfg, &[all])?;
        v.pop().ok_or_else(|| io::Error::other("no mesh half"))
    }

    /// Like [`start`](Self::start), with one data-plane half per entry of
    /// `shards` (the tenants whose connections it opens, on its own
    /// endpoint). Every tenant of `cfg.tenants` must be in exactly one
    /// shard, and in `cfg.tenants` once.
    pub fn start_shards(cfg: MeshConfig, shards: &[Vec<u16>]) -> io::Result<Vec<Self>> {
        let mut seen: Vec<u16> = shards.iter().flatten().copied().collect();
        seen.sort_unstable();
        let mut want = cfg.tenants.clone();
        want.sort_unstable();
        if seen != want || seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "shards must split the tenants exactly"));
        }
        let name = wire::Name::new(&cfg.name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(cfg.listen)?;
        listener.set_nonblocking(true)?;
        let (notes, note_rx) = channel();
        let mut halves = Vec::with_capacity(shards.len());
        let mut senders = Vec::with_capacity(shards.len());
        for tenants in shards {
            let (cmd_tx, cmds) = channel();
            senders.push(Shard { tenants: tenants.clone(), cmds: cmd_tx });
            halves.push((tenants.clone(), cmds));
        }
        let mut control = Control::new(cfg, name, listener, senders, note_rx);
        let (stop, up) = (control.stop.clone(), control.up.clone());
        let thread = std::thread::Builder::new().name("mesh".into()).spawn(move || control.run())?;
        let control = Arc::new(ControlThread { stop, thread: std::sync::Mutex::new(Some(thread)) });
        Ok(halves.into_iter().map(|(tenants, cmds)| Self::half(tenants, cmds, notes.clone(), &up, &control)).collect())
    }

    /// A half of `tenants` with no link up.
    fn half(
        tenants: Vec<u16>,
        cmds: Receiver<Cmd>,
        notes: Sender<Note>,
        up: &Arc<AtomicU32>,
        control: &Arc<ControlThread>,
    ) -> Self {
        Self {
            slot: tenants.iter().enumerate().map(|(i, &t)| (t, i)).collect(),
            tenants,
            cmds,
            notes,
            links: HashMap::new(),
            owners: HashMap::new(),
            up: up.clone(),
            _control: control.clone(),
            #[cfg(test)]
            entries_looked: std::cell::Cell::new(0),
        }
    }

    /// A half with no control thread, for tests that play the control
    /// thread by hand: they send its commands and read its notes.
    #[cfg(test)]
    pub(crate) fn by_hand(tenants: Vec<u16>) -> (Self, Sender<Cmd>, Receiver<Note>) {
        let (cmd_tx, cmds) = channel();
        let (notes, note_rx) = channel();
        let control =
            Arc::new(ControlThread { stop: Arc::new(AtomicBool::new(false)), thread: std::sync::Mutex::new(None) });
        (Self::half(tenants, cmds, notes, &Arc::new(AtomicU32::new(0)), &control), cmd_tx, note_rx)
    }

    /// Peers whose control link is up now.
    pub fn peers_up(&self) -> u32 {
        self.up.load(Ordering::Relaxed)
    }

    /// The connection to `peer` for `tenant`, while the link is up.
    pub fn conn(&self, peer: u16, tenant: u16) -> Option<ConnId> {
        let (_, conns) = self.links.get(&peer)?;
        self.tenants_conn(conns, tenant)
    }

    /// The connection of `tenant` among a link's `conns`.
    fn tenants_conn(&self, conns: &[Option<ConnId>], tenant: u16) -> Option<ConnId> {
        let &i = self.slot.get(&tenant)?;
        self.looked_at_one();
        conns.get(i).copied().flatten()
    }

    /// Carries out what the control thread asked (open, connect, close
    /// connections of `ep`) and appends what changed to `events`. Cheap when
    /// nothing is pending (one channel poll).
    pub fn pump<T: Transport>(&mut self, ep: &mut Endpoint<T>, events: &mut Vec<MeshEvent>) {
        loop {
            let cmd = match self.cmds.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            };
            match cmd {
                Cmd::Open { peer, epoch } => {
                    self.close(ep, peer, events);
                    let mut conns = Vec::with_capacity(self.tenants.len());
                    for &tenant in &self.tenants {
                        match ep.open(ConnSpec { tenant, peer: u32::from(peer) }) {
                            Ok((conn, blob)) => {
                                conns.push(Some(conn));
                                self.owners.insert(conn, peer);
                                events.push(MeshEvent::Opened { peer, tenant, conn });
                                let _ = self.notes.send(Note::Blob { peer, epoch, tenant, blob });
                            }
                            Err(e) => {
                                log::warn!("mesh: cannot open a connection to node {peer} for tenant {tenant}: {e}");
                                let _ = self.notes.send(Note::Reset { peer, epoch });
                                conns.push(None);
                            }
                        }
                    }
                    self.links.insert(peer, (epoch, conns));
                }
                Cmd::Connect { peer, epoch, tenant, blob } => {
                    let Some((cur, conns)) = self.links.get(&peer) else { continue };
                    if *cur != epoch {
                        continue;
                    }
                    let Some(conn) = self.tenants_conn(conns, tenant) else {
                        log::warn!("mesh: node {peer} sent a blob for tenant {tenant}, which has no connection");
                        continue;
                    };
                    if let Err(e) = ep.connect(conn, &blob) {
                        log::warn!("mesh: connecting to node {peer} for tenant {tenant}: {e}; resetting the link");
                        let _ = self.notes.send(Note::Reset { peer, epoch });
                    }
                }
                Cmd::Down { peer } => self.close(ep, peer, events),
            }
        }
    }

    fn close<T: Transport>(&mut self, ep: &mut Endpoint<T>, peer: u16, events: &mut Vec<MeshEvent>) {
        if let Some((_, conns)) = self.links.remove(&peer) {
            let conns: Vec<ConnId> = conns.into_iter().flatten().collect();
            for &c in &conns {
                self.owners.remove(&c);
                ep.close(c);
            }
            events.push(MeshEvent::PeerDown { peer, conns });
        }
    }

    /// The fabric connection `conn` to `peer` failed: reset the whole link
    /// (both sides close and set up again), if `conn` is one of the link's
    /// now. The failure of a connection of an older epoch (one the mesh
    /// closed itself when it set the link up again, reported after that)
    /// would otherwise reset the new link.
    pub fn peer_failed(&mut self, peer: u16, conn: ConnId) {
        self.looked_at_one();
        if self.owners.get(&conn) == Some(&peer)
            && let Some((epoch, _)) = self.links.get(&peer)
        {
            let _ = self.notes.send(Note::Reset { peer, epoch: *epoch });
        }
    }

    /// Counts one entry of `links` or `owners` looked at (tests only).
    #[inline]
    fn looked_at_one(&self) {
        #[cfg(test)]
        self.entries_looked.set(self.entries_looked.get() + 1);
    }
}

struct Link {
    id: u16,
    addr: SocketAddr,
    /// This side dials (higher id dials lower).
    dial: bool,
    stream: Option<TcpStream>,
    /// The result of the dial in flight, if any.
    dialing: Option<Receiver<io::Result<(TcpStream, u32)>>>,
    rbuf: Vec<u8>,
    epoch: u32,
    next_try: Instant,
    backoff: Duration,
}

/// A connection on the listener whose Hello has not all arrived.
struct Pending {
    stream: TcpStream,
    from: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
}

struct Control {
    cfg: MeshConfig,
    name: wire::Name,
    listener: TcpListener,
    /// Connections on the listener waiting for their Hello, oldest first.
    pending: Vec<Pending>,
    links: Vec<Link>,
    /// Where each half's commands go.
    shards: Vec<Sender<Cmd>>,
    /// The half of each tenant (its index in `shards`).
    shard_of: HashMap<u16, usize>,
    notes: Receiver<Note>,
    up: Arc<AtomicU32>,
    /// Set when the last half goes: the thread ends, dials in flight say
    /// no Hello.
    stop: Arc<AtomicBool>,
    /// Entries of `shard_of` that the routing of the peers' blobs looked
    /// at (what tests measure its cost by).
    #[cfg(test)]
    entries_looked: std::cell::Cell<usize>,
}

fn hello(cfg: &MeshConfig, name: wire::Name) -> MeshHello {
    MeshHello { node: cfg.me, reserved: 0, pid: std::process::id(), layout_hash: wire::LAYOUT_HASH, name }
}

fn send_frame(stream: &mut TcpStream, msg: &MeshMsg<'_>) -> io::Result<()> {
    let mut out = Vec::with_capacity(msg.encoded_len());
    msg.encode(&mut out).map_err(io::Error::other)?;
    stream.write_all(&out)
}

/// Reads a connection's Hello into `buf`, never past the end of its frame
/// (what follows is the peer's setup, read by the main loop). `Ok(None)`:
/// not complete yet, because a non-blocking stream has nothing more for
/// now, or a blocking one reached `deadline` (which bounds the whole
/// Hello: a peer that trickles it byte by byte is cut off there, not
/// allowed the deadline per byte).
fn hello_step(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Option<Instant>) -> io::Result<Option<MeshHello>> {
    let mut chunk = [0u8; 128];
    loop {
        let need = match MeshMsg::decode(buf) {
            Ok((MeshMsg::Hello(h), used)) if used == buf.len() => {
                if h.layout_hash != wire::LAYOUT_HASH {
                    return Err(io::Error::other("peer speaks other wire layouts"));
                }
                return Ok(Some(h));
            }
            Ok(_) => return Err(io::Error::other("expected Hello first")),
            Err(MeshDecodeError::Incomplete { need }) if need <= chunk.len() && need > buf.len() => need,
            Err(e) => return Err(io::Error::other(e)),
        };
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            stream.set_read_timeout(Some(left))?;
        }
        match stream.read(&mut chunk[..need - buf.len()]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the handshake")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // Nothing more now; on a blocking stream the read timed out
            // (Linux says EAGAIN): the deadline passed.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The error of a Hello not complete at its deadline.
fn hello_too_slow() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the peer's Hello took too long")
}

/// Reads one Hello within `deadline` in all from a blocking stream (a
/// dial thread's).
fn read_hello(stream: &mut TcpStream, deadline: Duration) -> io::Result<MeshHello> {
    let mut buf = Vec::with_capacity(128);
    hello_step(stream, &mut buf, Some(Instant::now() + deadline))?.ok_or_else(hello_too_slow)
}

/// One dial of the peer `id` at `addr` (on a thread of its own: a peer
/// whose process is stopped completes the TCP connection but never
/// answers, and the control thread must not wait for it). A mesh that
/// stopped meanwhile does not say Hello: the peer would take it for a new
/// link of this node.
fn dial_peer(
    (addr, id): (SocketAddr, u16),
    me: MeshHello,
    handshake: Duration,
    stop: &AtomicBool,
) -> io::Result<(TcpStream, u32)> {
    let mut s = TcpStream::connect_timeout(&addr, handshake)?;
    if stop.load(Ordering::Relaxed) {
        return Err(io::Error::other("the mesh stopped"));
    }
    send_frame(&mut s, &MeshMsg::Hello(me))?;
    let h = read_hello(&mut s, handshake)?;
    if h.node != id {
        return Err(io::Error::other(format!("{addr} is node {}, expected {id}", h.node)));
    }
    Ok((s, h.pid))
}

impl Control {
    /// The control thread's state, no link up, before it runs: it sends
    /// each half's commands to `shards` and takes the halves' `notes`.
    fn new(
        cfg: MeshConfig,
        name: wire::Name,
        listener: TcpListener,
        shards: Vec<Shard>,
        notes: Receiver<Note>,
    ) -> Self {
        Self {
            links: cfg
                .peers
                .iter()
                .map(|&(id, addr)| Link {
                    id,
                    addr,
                    dial: cfg.me > id,
                    stream: None,
                    dialing: None,
                    rbuf: Vec::with_capacity(2 * MAX_MESH_FRAME),
                    epoch: 0,
                    next_try: Instant::now(),
                    backoff: BACKOFF_MIN,
                })
                .collect(),
            cfg,
            name,
            listener,
            pending: Vec::new(),
            shard_of: shards.iter().enumerate().flat_map(|(k, s)| s.tenants.iter().map(move |&t| (t, k))).collect(),
            shards: shards.into_iter().map(|s| s.cmds).collect(),
            notes,
            up: Arc::new(AtomicU32::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            #[cfg(test)]
            entries_looked: std::cell::Cell::new(0),
        }
    }

    /// Sends `cmd` to every half.
    fn send_all(&self, cmd: impl Fn() -> Cmd) {
        for s in &self.shards {
            let _ = s.send(cmd());
        }
    }

    fn run(&mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let mut busy = self.accept();
            busy |= self.dial();
            busy |= self.read();
            busy |= self.notes();
            self.up.store(self.links.iter().filter(|l| l.stream.is_some()).count() as u32, Ordering::Relaxed);
            if !busy {
                std::thread::sleep(TICK);
            }
        }
    }

    /// A link came up on `stream`: start a new epoch.
    fn link_up(&mut self, k: usize, stream: TcpStream, peer_pid: u32) {
        let l = &mut self.links[k];
        let (id, had) = (l.id, l.stream.is_some());
        if had {
            self.send_all(|| Cmd::Down { peer: id });
        }
        let l = &mut self.links[k];
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("mesh: node {}: {e}", l.id);
            return;
        }
        if let Err(e) = control_stream(&stream) {
            log::warn!("mesh: node {}: setting the link up: {e}", l.id);
        }
        l.epoch = l.epoch.wrapping_add(1);
        l.stream = Some(stream);
        l.rbuf.clear();
        l.backoff = BACKOFF_MIN;
        log::info!("mesh: link to node {} ({}, pid {peer_pid}) up, epoch {}", l.id, l.addr, l.epoch);
        let epoch = l.epoch;
        self.send_all(|| Cmd::Open { peer: id, epoch });
    }

    fn link_down(&mut self, k: usize, why: &str) {
        let l = &mut self.links[k];
        if l.stream.take().is_some() {
            log::warn!("mesh: link to node {} down: {why}", l.id);
            let id = l.id;
            self.send_all(|| Cmd::Down { peer: id });
        }
        let l = &mut self.links[k];
        l.next_try = Instant::now() + l.backoff;
        l.backoff = (l.backoff * 2).min(self.cfg.backoff_max.max(BACKOFF_MIN));
    }

    /// Takes new connections on the listener (non-blocking) and reads the
    /// Hellos of those waiting for theirs.
    fn accept(&mut self) -> bool {
        let mut busy = false;
        loop {
            let (stream, from) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("mesh: accept: {e}");
                    break;
                }
            };
            busy = true;
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("mesh: connection from {from}: {e}");
                continue;
            }
            if self.pending.len() == MAX_PENDING {
                // Full: take what has arrived before dropping anyone.
                self.handshakes();
            }
            if self.pending.len() == MAX_PENDING {
                // A peer's Hello may be on its way in parts: a silent
                // one goes first.
                let k = self.pending.iter().position(|p| p.buf.is_empty()).unwrap_or(0);
                let old = self.pending.remove(k);
                log::warn!("mesh: connection from {} dropped: {MAX_PENDING} are waiting for their Hello", old.from);
            }
            self.pending.push(Pending { stream, from, buf: Vec::new(), deadline: Instant::now() + self.cfg.handshake });
        }
        busy | self.handshakes()
    }

    /// Reads what every connection waiting on the listener has sent; one
    /// whose Hello is complete is answered and its link set up, one past
    /// the handshake deadline or in error is dropped.
    fn handshakes(&mut self) -> bool {
        let mut busy = false;
        let now = Instant::now();
        let mut k = 0;
        while k < self.pending.len() {
            let p = &mut self.pending[k];
            let r = match hello_step(&mut p.stream, &mut p.buf, None) {
                Ok(None) if now < p.deadline => {
                    k += 1;
                    continue;
                }
                Ok(None) => Err(hello_too_slow()),
                Ok(Some(h)) => Ok(h),
                Err(e) => Err(e),
            };
            busy = true;
            let Pending { stream, from, .. } = self.pending.remove(k);
            match r {
                Ok(h) => self.hello_from(stream, from, &h),
                Err(e) => log::warn!("mesh: connection from {from} refused: {e}"),
            }
        }
        busy
    }

    /// A connection on the listener said Hello: if it is a peer that dials
    /// us, answer and set its link up.
    fn hello_from(&mut self, mut stream: TcpStream, from: SocketAddr, h: &MeshHello) {
        let Some(k) = self.links.iter().position(|l| l.id == h.node && !l.dial) else {
            log::warn!("mesh: connection from {from} claims node {}, not a peer that dials us", h.node);
            return;
        };
        // A Hello fits in the empty send buffer of a new connection: this
        // write on the non-blocking stream does not come back short.
        if let Err(e) = send_frame(&mut stream, &MeshMsg::Hello(hello(&self.cfg, self.name))) {
            log::warn!("mesh: hello to node {}: {e}", h.node);
            return;
        }
        self.link_up(k, stream, h.pid);
    }

    /// Starts a dial of every peer we dial that is down and due (one dial
    /// thread each), and takes the result of those that finished.
    fn dial(&mut self) -> bool {
        let now = Instant::now();
        let mut busy = false;
        for k in 0..self.links.len() {
            let l = &mut self.links[k];
            if !l.dial || l.stream.is_some() {
                continue;
            }
            let (id, addr) = (l.id, l.addr);
            if let Some(rx) = &l.dialing {
                let r = match rx.try_recv() {
                    Err(TryRecvError::Empty) => continue,
                    Ok(r) => r,
                    Err(TryRecvError::Disconnected) => Err(io::Error::other("the dial thread ended without a result")),
                };
                l.dialing = None;
                busy = true;
                match r {
                    Ok((s, pid)) => self.link_up(k, s, pid),
                    Err(e) => {
                        log::debug!("mesh: dialing node {id} at {addr}: {e}");
                        self.link_down(k, "dial failed");
                    }
                }
                continue;
            }
            if now < l.next_try {
                continue;
            }
            busy = true;
            let (tx, rx) = channel();
            let me = hello(&self.cfg, self.name);
            let (stop, handshake) = (self.stop.clone(), self.cfg.handshake);
            let spawned = std::thread::Builder::new()
                .name(format!("mesh-dial-{id}"))
                .spawn(move || drop(tx.send(dial_peer((addr, id), me, handshake, &stop))));
            match spawned {
                Ok(_) => self.links[k].dialing = Some(rx),
                Err(e) => {
                    log::warn!("mesh: cannot start a dial of node {id}: {e}");
                    self.link_down(k, "dial failed");
                }
            }
        }
        busy
    }

    fn read(&mut self) -> bool {
        let mut busy = false;
        let mut chunk = [0u8; 4096];
        for k in 0..self.links.len() {
            let mut down = None;
            let l = &mut self.links[k];
            let Some(s) = l.stream.as_mut() else { continue };
            // A bounded read per link and round (then what it read is
            // decoded): a peer writing faster than this thread reads would
            // otherwise grow the buffer without end and starve the other
            // links.
            for _ in 0..READS_PER_ROUND {
                match s.read(&mut chunk) {
                    Ok(0) => {
                        down = Some("closed by the peer".to_owned());
                        break;
                    }
                    Ok(n) => {
                        busy = true;
                        l.rbuf.extend_from_slice(&chunk[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        down = Some(e.to_string());
                        break;
                    }
                }
            }
            let mut used = 0;
            while down.is_none() {
                match MeshMsg::decode(&l.rbuf[used..]) {
                    Ok((MeshMsg::Conn(c, blob), n)) => {
                        used += n;
                        let MeshConn { tenant, .. } = c;
                        let (peer, epoch) = (l.id, l.epoch);
                        #[cfg(test)]
                        self.entries_looked.set(self.entries_looked.get() + 1);
                        match self.shard_of.get(&tenant).and_then(|&k| self.shards.get(k)) {
                            Some(s) => drop(s.send(Cmd::Connect { peer, epoch, tenant, blob: blob.to_vec() })),
                            None => {
                                log::warn!(
                                    "mesh: node {peer} sent a blob for tenant {tenant}, not one of this node's tenants"
                                )
                            }
                        }
                    }
                    Ok((MeshMsg::Hello(_), _)) => down = Some("a second Hello".to_owned()),
                    Err(MeshDecodeError::Incomplete { .. }) => break,
                    Err(e) => down = Some(format!("bad frame: {e}")),
                }
            }
            l.rbuf.drain(..used);
            if let Some(why) = down {
                self.link_down(k, &why);
            }
        }
        busy
    }

    fn notes(&mut self) -> bool {
        let mut busy = false;
        while let Ok(note) = self.notes.try_recv() {
            busy = true;
            let (peer, epoch) = match &note {
                Note::Blob { peer, epoch, .. } | Note::Reset { peer, epoch } => (*peer, *epoch),
            };
            let Some(k) = self.links.iter().position(|l| l.id == peer) else { continue };
            if self.links[k].epoch != epoch || self.links[k].stream.is_none() {
                continue;
            }
            match note {
                Note::Blob { tenant, blob, .. } => {
                    let c = MeshConn { tenant, reserved: 0, blob_len: 0 };
                    let r = self.links[k].stream.as_mut().map(|s| {
                        // The blob is small: a blocking write is fine here.
                        let _ = s.set_nonblocking(false);
                        let r = send_frame(s, &MeshMsg::Conn(c, &blob));
                        let _ = s.set_nonblocking(true);
                        r
                    });
                    if let Some(Err(e)) = r {
                        self.link_down(k, &format!("sending setup: {e}"));
                    }
                }
                Note::Reset { .. } => self.link_down(k, "a fabric connection failed"),
            }
        }
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Completion, EndpointConfig, NullTransport};
    use std::io::Write;

    /// A half of `tenants` (0, 1, ...) played by hand, over an endpoint of
    /// the wire-less transport with room for `max_conns` connections.
    fn half(tenants: u16, max_conns: u32) -> (Mesh, Sender<Cmd>, Receiver<Note>, Endpoint<NullTransport>) {
        let (mesh, cmds, notes) = Mesh::by_hand((0..tenants).collect());
        let cfg = EndpointConfig { max_conns, send_window: 4, recv_depth: 4, send_queue: 4, ..Default::default() };
        (mesh, cmds, notes, Endpoint::new(NullTransport::new(), cfg))
    }

    /// Sends `cmd` and pumps; the events.
    fn command(mesh: &mut Mesh, ep: &mut Endpoint<NullTransport>, cmds: &Sender<Cmd>, cmd: Cmd) -> Vec<MeshEvent> {
        cmds.send(cmd).unwrap();
        let mut events = Vec::new();
        mesh.pump(ep, &mut events);
        events
    }

    /// A blob of the wire-less transport for `tenant` from `peer` at `epoch`.
    fn connect(peer: u16, epoch: u32, tenant: u16) -> Cmd {
        Cmd::Connect { peer, epoch, tenant, blob: b"null".to_vec() }
    }

    /// The connections that came up in the endpoint since the last call.
    fn connected(ep: &mut Endpoint<NullTransport>) -> Vec<ConnId> {
        let mut comps = vec![Completion::Connected(ConnId(0)); 64];
        let mut up = Vec::new();
        loop {
            let n = ep.poll(&mut comps);
            if n == 0 {
                return up;
            }
            up.extend(comps[..n].iter().filter_map(|c| match *c {
                Completion::Connected(c) => Some(c),
                _ => None,
            }));
        }
    }

    /// The connections of an `Opened` list, in order.
    fn opened(events: &[MeshEvent]) -> Vec<ConnId> {
        events
            .iter()
            .filter_map(|e| match *e {
                MeshEvent::Opened { conn, .. } => Some(conn),
                MeshEvent::PeerDown { .. } => None,
            })
            .collect()
    }

    /// Setting a link up looks at one entry of its connection table per
    /// tenant's blob: the work is in proportion to the tenants. Before,
    /// each Connect searched the link's list for its tenant: 300 tenants
    /// looked at 45150 entries.
    #[test]
    fn a_links_setup_looks_at_one_entry_per_tenant() {
        let tenants = 300u16;
        let (mut mesh, cmds, notes, mut ep) = half(tenants, u32::from(tenants));
        let conns = opened(&command(&mut mesh, &mut ep, &cmds, Cmd::Open { peer: 1, epoch: 1 }));
        assert_eq!(conns.len(), usize::from(tenants));
        mesh.entries_looked.set(0);
        for tenant in 0..tenants {
            cmds.send(connect(1, 1, tenant)).unwrap();
        }
        mesh.pump(&mut ep, &mut Vec::new());
        assert_eq!(mesh.entries_looked.get(), usize::from(tenants), "entries looked at by one link's setup");
        let mut up = connected(&mut ep);
        up.sort_unstable();
        assert_eq!(up, conns, "every connection connected");
        for tenant in 0..tenants {
            assert_eq!(mesh.conn(1, tenant), Some(conns[usize::from(tenant)]));
        }
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { .. })));
    }

    /// The failures of a link's old connections (the mesh closed them when
    /// it set the link up again, and each reports `Closed`) look at one
    /// entry each and reset nothing; a failure of a connection of the link
    /// now resets it. Before, each failure searched the new link's list:
    /// 300 tenants looked at 90000 entries for one link set up again.
    #[test]
    fn the_old_connections_failures_look_at_one_entry_each() {
        let tenants = 300u16;
        let (mut mesh, cmds, notes, mut ep) = half(tenants, 2 * u32::from(tenants));
        let old = opened(&command(&mut mesh, &mut ep, &cmds, Cmd::Open { peer: 1, epoch: 1 }));
        let events = command(&mut mesh, &mut ep, &cmds, Cmd::Open { peer: 1, epoch: 2 });
        assert_eq!(events[0], MeshEvent::PeerDown { peer: 1, conns: old.clone() });
        let new = opened(&events);
        let _ = notes.try_iter().count();
        mesh.entries_looked.set(0);
        for &c in &old {
            mesh.peer_failed(1, c);
        }
        assert_eq!(
            mesh.entries_looked.get(),
            usize::from(tenants),
            "entries looked at by the old connections' failures"
        );
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { .. })), "an old connection reset the new link");
        mesh.peer_failed(2, new[7]);
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { .. })), "node 1's connection reset node 2");
        mesh.peer_failed(1, new[7]);
        let resets: Vec<_> = notes.try_iter().filter(|n| matches!(n, Note::Reset { .. })).collect();
        assert!(matches!(resets[..], [Note::Reset { peer: 1, epoch: 2 }]), "{resets:?}");
    }

    /// A blob for a tenant the link has no connection for (not one of this
    /// half's tenants, or one whose connection could not be opened) is
    /// ignored (and logged): nothing is connected, nothing reset, and the
    /// link's own blobs still connect its connections.
    #[test]
    fn a_blob_for_a_tenant_without_a_connection_is_ignored() {
        // Room for two of the three tenants' connections: tenant 2's open
        // fails (and asks for a reset, as a failed open does).
        let (mut mesh, cmds, notes, mut ep) = half(3, 2);
        let conns = opened(&command(&mut mesh, &mut ep, &cmds, Cmd::Open { peer: 1, epoch: 1 }));
        assert_eq!(conns.len(), 2);
        assert_eq!(mesh.conn(1, 2), None);
        let _ = notes.try_iter().count();
        for tenant in [2, 3, 7, u16::MAX] {
            command(&mut mesh, &mut ep, &cmds, connect(1, 1, tenant));
        }
        assert_eq!(connected(&mut ep), [], "a blob of a tenant without a connection connected one");
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { .. })));
        for tenant in 0..2 {
            command(&mut mesh, &mut ep, &cmds, connect(1, 1, tenant));
        }
        assert_eq!(connected(&mut ep), conns);
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { .. })));
    }

    /// A blob of an older epoch, or for a peer with no link, is ignored:
    /// it connects nothing, and the blob of the link's epoch then
    /// connects the connection (a connection given the stale blob first
    /// would refuse the second: it is no longer waiting for one).
    #[test]
    fn a_blob_of_a_stale_epoch_is_ignored() {
        let (mut mesh, cmds, notes, mut ep) = half(2, 8);
        command(&mut mesh, &mut ep, &cmds, Cmd::Open { peer: 1, epoch: 1 });
        let conns = opened(&command(&mut mesh, &mut ep, &cmds, Cmd::Open { peer: 1, epoch: 2 }));
        let _ = notes.try_iter().count();
        let _ = connected(&mut ep);
        for tenant in 0..2 {
            command(&mut mesh, &mut ep, &cmds, connect(1, 1, tenant));
            command(&mut mesh, &mut ep, &cmds, connect(2, 2, tenant));
        }
        assert_eq!(connected(&mut ep), [], "a stale blob connected a connection");
        for tenant in 0..2 {
            command(&mut mesh, &mut ep, &cmds, connect(1, 2, tenant));
        }
        assert_eq!(connected(&mut ep), conns);
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { .. })), "the stale blob reset the link");
    }

    /// A Hello trickled in one byte at a time, each within the read
    /// timeout, is still cut off at the handshake deadline in all.
    #[test]
    fn a_trickled_hello_is_cut_off_at_the_handshake_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A well-formed Hello (64 bytes), one byte every 250 ms: 16 s in all.
        let h = MeshHello {
            node: 1,
            reserved: 0,
            pid: 1,
            layout_hash: wire::LAYOUT_HASH,
            name: wire::Name::new("slow").unwrap(),
        };
        let mut bytes = Vec::new();
        MeshMsg::Hello(h).encode(&mut bytes).unwrap();
        let slow = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for b in bytes {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        let (mut s, _) = l.accept().unwrap();
        let t = std::time::Instant::now();
        let e = read_hello(&mut s, MeshConfig::HANDSHAKE).unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(took < MeshConfig::HANDSHAKE + Duration::from_secs(2), "took {took:?}: {e}");
        drop(s);
        slow.join().unwrap();
    }

    /// A control thread of node 2 with halves of `shards` (over tenants
    /// 0, 1, ...), its link to node 1 up (epoch 1), and node 1's end of
    /// that link.
    fn control_with_link(shards: &[Vec<u16>]) -> (Control, Vec<Receiver<Cmd>>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = MeshConfig {
            me: 2,
            name: "control-test".into(),
            listen: listener.local_addr().unwrap(),
            peers: vec![(1, listener.local_addr().unwrap())],
            tenants: shards.iter().flatten().copied().collect(),
            backoff_max: Duration::from_secs(1),
            handshake: Duration::from_secs(5),
        };
        let (senders, rxs) = shards
            .iter()
            .map(|tenants| {
                let (cmds, rx) = channel();
                (Shard { tenants: tenants.clone(), cmds }, rx)
            })
            .unzip();
        let name = wire::Name::new(&cfg.name).unwrap();
        let mut control = Control::new(cfg, name, listener, senders, channel().1);
        let ours = TcpStream::connect(control.listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = control.listener.accept().unwrap();
        control.link_up(0, ours, 1);
        (control, rxs, theirs)
    }

    /// The control thread hands each blob of a link's setup to its
    /// tenant's half looking at one entry: the work is in proportion to
    /// the tenants. A blob for a tenant of no half goes to none. Before,
    /// each blob searched every half's tenants: 300 tenants in two halves
    /// (and one blob for a tenant of neither) looked at 67950 entries.
    #[test]
    fn a_links_blobs_reach_their_halves_looking_at_one_entry_each() {
        let shards: Vec<Vec<u16>> = vec![(0..150).collect(), (150..300).collect()];
        let (mut control, rxs, mut peer) = control_with_link(&shards);
        for rx in &rxs {
            assert!(matches!(rx.try_iter().collect::<Vec<_>>()[..], [Cmd::Open { peer: 1, epoch: 1 }]));
        }
        for tenant in std::iter::once(999).chain(0..300) {
            let c = MeshConn { tenant, reserved: 0, blob_len: 0 };
            send_frame(&mut peer, &MeshMsg::Conn(c, b"null")).unwrap();
        }
        let mut got = vec![Vec::new(); rxs.len()];
        // Watchdog: the frames are on this machine's loopback.
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.iter().map(Vec::len).sum::<usize>() < 300 {
            assert!(Instant::now() < deadline, "watchdog: blobs handed on {got:?}");
            control.read();
            for (got, rx) in got.iter_mut().zip(&rxs) {
                for cmd in rx.try_iter() {
                    match cmd {
                        Cmd::Connect { peer: 1, epoch: 1, tenant, blob } if blob == b"null" => got.push(tenant),
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
        assert_eq!(got, shards, "the blobs each half was handed");
        assert_eq!(control.entries_looked.get(), 301, "entries looked at by routing one link's 301 blobs");
    }

    /// A tenant in two halves (and twice in the node's tenants) is
    /// refused: each tenant's blobs go to one half. Before, the check
    /// compared the sorted lists only, and both halves took the tenant.
    #[test]
    fn a_tenant_in_two_halves_is_refused() {
        let cfg = MeshConfig {
            me: 1,
            name: "dup-test".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            peers: Vec::new(),
            tenants: vec![1, 1, 2],
            backoff_max: Duration::from_secs(1),
            handshake: Duration::from_secs(5),
        };
        let e = Mesh::start_shards(cfg, &[vec![1, 2], vec![1]]).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}
