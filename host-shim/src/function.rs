//! The function API: attach to the tenant pool through host-shimd, allocate,
//! write payloads in place, send descriptors straight into the destination
//! function's ring (no intermediate hop), receive, free.
//!
//! Hot path: `send` is one owner hand-over per buffer, one ring push and, only
//! when the receiver sleeps, one doorbell write; `recv` pops descriptors in
//! batches and validates each against the pool before any payload is
//! touched. Descriptors that fail validation are dropped and counted by
//! reason ([`Function::rejected`]); they never reach the caller.

use crate::sock::Conn;
use shm::pool::{AcceptError, Lease, LocalCache};
use shm::ring::{Consumer, Doorbell, Ring, RingPushError, Wait};
use shm::{AllocError, FreeError, Pool, WriteError};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};
use wire::ctrl::{Attach, AttachOk, CTRL_MAX_FRAME, CtrlMsg, Hello, Lookup, Role};
use wire::desc::{NO_NODE, NO_ROUTE};
use wire::{CtrlFrame, Descriptor, ErrorCode, Name, Owner};

/// How long a receiver spins on its ring before it sleeps on its doorbell.
/// Longer than a wake-up costs on these machines (an eventfd round trip
/// is ~45 us), so a busy chain never sleeps, and short enough that an idle
/// function costs nothing measurable.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// Descriptors taken from the inbound ring at once.
pub(crate) const BATCH: usize = 32;
/// Buffers a function keeps in its private allocation cache, at most: and
/// at most a sixteenth of its pool ([`cache_cap`]), so that in a small pool
/// the caches of a few idle functions cannot hold every free buffer.
const CACHE: usize = 32;

/// The cache size for a pool of `buffers` buffers (see [`CACHE`]).
fn cache_cap(buffers: u32) -> usize {
    (buffers as usize / 16).min(CACHE)
}
/// The reason [`Function::rejected`] counts a descriptor under when its
/// sender took its buffers back: the push published as the ring was closed
/// (host-shimd stopping cleanly, or dropping this function), saw the ring
/// closed and failed (see [`shm::ring::RingPushError::Abandoned`]). Normal
/// in a clean stop, so not logged; counted only once the ring is closed.
pub const TAKEN_BACK: &str = "taken_back";

/// Attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// host-shimd could not be reached.
    #[error("cannot reach host-shimd: {0}")]
    Io(#[from] io::Error),
    /// A name is not a valid DNE name.
    #[error("invalid name: {0}")]
    Name(#[from] wire::NameError),
    /// host-shimd refused.
    #[error("host-shimd refused the attach: {0}")]
    Refused(ErrorCode),
    /// host-shimd answered something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The pool or ring passed by host-shimd could not be mapped.
    #[error("mapping shared memory: {0}")]
    Map(String),
}

/// How long a function waits for host-shimd's answer to an attach or a
/// lookup before the call fails (`AttachError::Io`, `SendErrorKind::Shimd`;
/// a late answer is told apart by its sequence number and skipped).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How long host-shimd's answer that a function has no live instance (or
/// does not exist) is reused before asking again.
pub const ABSENT_TTL: Duration = Duration::from_millis(50);

/// How long host-shimd's answer that the agent stands in for a function of
/// this node without a live instance ([`wire::ctrl::Peer::STANDIN`]) is
/// used before asking again: calls go to the function's other nodes until
/// a local instance is back, found within this much.
pub const STANDIN_TTL: Duration = Duration::from_millis(100);

/// Why a send failed. The message comes back in [`SendError::msg`] whenever
/// the caller still owns it, so nothing is lost.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SendErrorKind {
    /// The destination is not a function of this node (or of the cluster).
    #[error("unknown function")]
    UnknownFunction,
    /// The destination is no name a function can have (empty, longer than
    /// a name, a character names do not use): the caller's mistake, not a
    /// function that may yet be configured. Nothing was done; host-shimd
    /// was not asked.
    #[error("destination is not a valid function name: {0}")]
    BadName(wire::NameError),
    /// The destination belongs to another tenant: refused.
    #[error("destination belongs to another tenant")]
    TenantMismatch,
    /// The destination has no live instance.
    #[error("destination has no live instance")]
    NoInstance,
    /// The destination's ring is full (back-pressure: retry later).
    #[error("destination ring full")]
    Full,
    /// The message's buffers are not owned as expected (a peer interfered).
    #[error("ownership: {0}")]
    Ownership(String),
    /// host-shimd could not be asked.
    #[error("host-shimd: {0}")]
    Shimd(String),
    /// host-shimd is gone: it stopped and marked every ring it made
    /// abandoned (a clean stop: SIGTERM, SIGINT), or its end of the
    /// control connection closed (asked about a function not looked up
    /// before). Nothing sent through this attach would be delivered any
    /// more; the message is handed back, unless its receiver took it as
    /// host-shimd stopped (a push that published just as the ring was
    /// abandoned). Attach again once a new host-shimd is up (or exit and
    /// let the supervisor restart the function). After host-shimd was
    /// killed outright (SIGKILL), sends into rings looked up before are
    /// not refused: see README.md, "When host-shimd goes away".
    #[error("host-shimd is gone (it stopped; attach again to the new one)")]
    ShimdGone,
    /// The message is in another pool than this function's: it came from a
    /// [`Function`] attached to another tenant's pool or to another
    /// host-shimd. Nothing was done; the message comes back untouched,
    /// still the message of the function it came from.
    #[error("message of another pool (another tenant's or another host-shimd's attach)")]
    ForeignMsg,
    /// The message's descriptor has fields no receiver accepts (a status
    /// without [`wire::DescFlags::ERROR`], an unknown flag, a reserved
    /// field set, see [`Descriptor::validate_fields`]): its receiver would
    /// drop it. Nothing was handed over.
    #[error("descriptor refused: {0}")]
    BadDescriptor(wire::DescriptorError),
}

/// A failed send; `msg` is the message when the caller still owns it.
#[derive(Debug, thiserror::Error)]
#[error("send failed: {kind}")]
pub struct SendError {
    /// What went wrong.
    pub kind: SendErrorKind,
    /// The message, handed back.
    pub msg: Option<Msg>,
}

/// Freeing a message failed.
#[derive(Debug, thiserror::Error)]
pub enum MsgFreeError {
    /// The message is in another pool than this function's (see
    /// [`SendErrorKind::ForeignMsg`]): nothing was done, here it is,
    /// untouched; free it with the function it came from.
    #[error("message of another pool (another tenant's or another host-shimd's attach)")]
    Foreign(Msg),
    /// Its buffers were not all this function's to free (a process sharing
    /// the pool rewrote a link or an owner); the message is gone.
    #[error(transparent)]
    Pool(#[from] FreeError),
}

impl MsgFreeError {
    /// A short, stable, lowercase name (used as a metrics label):
    /// `foreign`, or the pool's [`FreeError::as_str`].
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Foreign(_) => "foreign",
            Self::Pool(e) => e.as_str(),
        }
    }
}

/// Access to a message's payload failed; the message is untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The message is in another pool than this function's (see
    /// [`SendErrorKind::ForeignMsg`]).
    #[error("message of another pool (another tenant's or another host-shimd's attach)")]
    ForeignMsg,
    /// No such fragment: past the end of the chain, or behind a link that
    /// leads out of the pool (a process sharing the pool rewrote it).
    #[error("no fragment {0} in the message")]
    NoFragment(u32),
    /// The data does not fit the message's buffers.
    #[error(transparent)]
    Len(#[from] wire::DescriptorError),
}

impl From<WriteError> for PayloadError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Len(e) => Self::Len(e),
            WriteError::ForeignLease => Self::ForeignMsg,
        }
    }
}

/// Receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// Waiting on the doorbell failed.
    #[error("doorbell: {0}")]
    Io(#[from] io::Error),
    /// host-shimd is gone (or dropped this function), nothing will
    /// arrive any more. Seen once the ring is empty: while a receive
    /// sleeps (the control connection hung up: host-shimd stopped or was
    /// killed), and also while it spins when host-shimd stopped cleanly
    /// (it marks the ring closed).
    #[error(
        "host-shimd is gone (it stopped or was killed) or dropped this function: nothing more will arrive; attach again"
    )]
    ShimdGone,
}

/// A message this function holds: its buffers (a lease in the pool) and its
/// descriptor fields.
#[derive(Debug)]
#[must_use = "a message holds pool buffers: send or free it"]
pub struct Msg {
    /// Its buffers, and the pool they are in ([`Lease::pool`]).
    lease: Lease,
    desc: Descriptor,
}

impl Msg {
    /// Payload length in bytes.
    pub fn len(&self) -> u32 {
        self.lease.len()
    }
    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.lease.is_empty()
    }
    /// Buffers in the chain.
    pub fn frags(&self) -> u32 {
        self.lease.frags()
    }
    /// The descriptor as received (or as it will be sent).
    pub fn desc(&self) -> &Descriptor {
        &self.desc
    }
    /// Request id carried end to end.
    pub fn request(&self) -> u32 {
        self.desc.request
    }
    /// Sets the request id.
    pub fn set_request(&mut self, request: u32) {
        self.desc.request = request;
    }
    /// Function id of the sender.
    pub fn src_fn(&self) -> u16 {
        self.desc.src_fn
    }
    /// Mutable descriptor fields (route, hop, flags, ...). `tenant`, `buf`
    /// and `len` are set from the lease and the sender when it is sent.
    pub fn desc_mut(&mut self) -> &mut Descriptor {
        &mut self.desc
    }
    /// A message from a lease and its descriptor fields (the agent builds
    /// messages out of buffers that arrived over the fabric). It is the
    /// message of the lease's pool ([`Lease::pool`]), as any other: a
    /// [`Function`] attached to another pool refuses it
    /// ([`Function::owns`]), and so does every function for a lease made
    /// by [`Lease::by_index`], which is no mapped pool's.
    pub fn from_parts(lease: Lease, desc: Descriptor) -> Self {
        let desc = Descriptor { buf: lease.head(), len: lease.len(), ..desc };
        Self { lease, desc }
    }
    /// The lease and the descriptor.
    pub fn into_parts(self) -> (Lease, Descriptor) {
        (self.lease, self.desc)
    }
}

struct Instance {
    ring: Ring,
    bell: Doorbell,
    slot: u16,
}

struct PeerSet {
    function: u16,
    instances: Vec<Instance>,
    next: usize,
    /// The agent stands in for the function until then (see
    /// [`STANDIN_TTL`]); what goes through it is marked
    /// [`DescFlags::ELSEWHERE`].
    standin_until: Option<Instant>,
}

impl PeerSet {
    /// The flags of a message with `flags` sent to this set: marked
    /// [`DescFlags::ELSEWHERE`] through a stand-in, and otherwise not (a
    /// function forwarding a message that was sent on to reach it starts a
    /// new hop, which may be sent on once again); the agent's own sends
    /// keep theirs.
    fn marks(&self, flags: u16, agent: bool) -> u16 {
        use wire::DescFlags;
        if self.standin_until.is_some() {
            flags | DescFlags::ELSEWHERE
        } else if agent {
            flags
        } else {
            flags & !DescFlags::ELSEWHERE
        }
    }
}

/// An attached function instance.
pub struct Function {
    conn: Conn,
    info: AttachOk,
    pool: Pool,
    cache: LocalCache,
    inbox: Consumer,
    bell: Doorbell,
    peers: HashMap<String, PeerSet>,
    /// Functions host-shimd recently said have no live instance (or do not
    /// exist), and until when that answer is reused instead of asking
    /// again: a sender that keeps addressing such a function (the agent,
    /// on its data path) does not make a blocking round trip per message.
    absent: HashMap<String, (Instant, SendErrorKind)>,
    /// Accepted by [`try_recv`](Self::try_recv), not yet returned.
    taken: VecDeque<Msg>,
    scratch: [Descriptor; BATCH],
    scratch_msgs: Vec<Msg>,
    rejected: HashMap<&'static str, u64>,
    /// Frees that failed, by reason ([`MsgFreeError::as_str`]).
    free_failed: HashMap<&'static str, u64>,
    seq: u32,
    spin: Duration,
    /// Attached as the node's agent: sends keep each message's `src_fn`.
    agent: bool,
}

impl core::fmt::Debug for Function {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Function").field("info", &self.info).finish_non_exhaustive()
    }
}

fn expect_fds(fds: Vec<OwnedFd>, n: usize) -> Result<Vec<OwnedFd>, AttachError> {
    if fds.len() == n {
        Ok(fds)
    } else {
        Err(AttachError::Protocol(format!("expected {n} descriptors, got {}", fds.len())))
    }
}

impl Function {
    /// Attaches to host-shimd at `socket` as an instance of `function` of
    /// `tenant`. host-shimd checks the claim against the cluster config and
    /// refuses another tenant's pool.
    pub fn attach(socket: &Path, tenant: &str, function: &str) -> Result<Self, AttachError> {
        Self::attach_as(socket, tenant, function, Role::Function)
    }

    /// Attaches the node's agent to `tenant`'s pool and uplink ring (the
    /// ring functions push messages for other nodes into). Messages it
    /// sends keep their `src_fn`.
    pub fn attach_agent(socket: &Path, tenant: &str) -> Result<Self, AttachError> {
        Self::attach_as(socket, tenant, wire::ctrl::AGENT_NAME, Role::Agent)
    }

    fn attach_as(socket: &Path, tenant: &str, function: &str, role: Role) -> Result<Self, AttachError> {
        let conn = Conn::connect(socket)?;
        let pid = std::process::id();
        let hello = Hello {
            role: role as u8,
            reserved: 0,
            node: NO_NODE,
            pid,
            layout_hash: wire::LAYOUT_HASH,
            name: Name::new(function)?,
        };
        // host-shimd answers at once; one stopped or hung must not hang
        // its clients for ever (the agent's data-plane thread looks names
        // up, for every tenant).
        conn.set_recv_timeout(Some(ANSWER_WITHIN))?;
        conn.send(&CtrlFrame { seq: 0, msg: CtrlMsg::Hello(hello) }, &[])?;
        let attach =
            Attach { tenant: Name::new(tenant)?, function: Name::new(function)?, instance: 0, reserved: 0, pid };
        conn.send(&CtrlFrame { seq: 1, msg: CtrlMsg::Attach(attach) }, &[])?;
        let mut buf = [0u8; CTRL_MAX_FRAME];
        let r = conn.recv(&mut buf)?;
        if r.len == 0 {
            return Err(AttachError::Protocol("host-shimd closed the connection".into()));
        }
        let (frame, _) = CtrlFrame::decode(&buf[..r.len]).map_err(|e| AttachError::Protocol(e.to_string()))?;
        let info = match frame.msg {
            CtrlMsg::AttachOk(ok) => ok,
            CtrlMsg::Error(e) => {
                return Err(AttachError::Refused(ErrorCode::from_u8(e.code).unwrap_or(ErrorCode::BadRoute)));
            }
            other => return Err(AttachError::Protocol(format!("unexpected {:?}", other.kind()))),
        };
        let mut fds = expect_fds(r.fds, 3)?.into_iter();
        let (pool_fd, ring_fd, bell_fd) = match (fds.next(), fds.next(), fds.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(AttachError::Protocol("missing descriptors".into())),
        };
        let pool = Pool::open(pool_fd).map_err(|e| AttachError::Map(e.to_string()))?;
        let ring = Ring::open(ring_fd).map_err(|e| AttachError::Map(e.to_string()))?;
        if pool.geometry().tenant() != info.tenant || ring.header().owner_slot != u32::from(info.slot) {
            return Err(AttachError::Protocol("pool or ring does not match the attach reply".into()));
        }
        log::info!(
            "attached {function} (tenant {tenant}) slot {} pool {} buffers of {} B ({})",
            info.slot,
            info.buf_count,
            info.buf_size,
            pool.backing()
        );
        Ok(Self {
            conn,
            cache: LocalCache::new(Owner::Held(info.slot), cache_cap(pool.geometry().buf_count())),
            info,
            pool,
            inbox: ring.into_consumer(),
            bell: Doorbell::from_fd(bell_fd),
            peers: HashMap::new(),
            absent: HashMap::new(),
            taken: VecDeque::with_capacity(BATCH),
            scratch: [Descriptor::default(); BATCH],
            scratch_msgs: Vec::with_capacity(BATCH),
            rejected: HashMap::new(),
            free_failed: HashMap::new(),
            seq: 2,
            spin: DEFAULT_SPIN,
            agent: role == Role::Agent,
        })
    }

    /// Whether host-shimd is still there (its end of the control
    /// connection is open). Never blocks.
    pub fn shimd_alive(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.conn, PollFlags::IN)];
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => !fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR),
            Err(_) => true,
        }
    }

    /// The attach reply: ids, slot, pool geometry.
    pub fn info(&self) -> &AttachOk {
        &self.info
    }

    /// The tenant pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sets how long `recv` spins before sleeping.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Sends a reply toward the node that originated the request
    /// (`desc().origin`, the ingress), through the agent: the message keeps
    /// its request id and route, and is marked [`wire::DescFlags::REPLY`].
    pub fn reply(&mut self, mut msg: Msg) -> Result<(), SendError> {
        msg.desc.flags |= wire::DescFlags::REPLY;
        self.send(msg, wire::ctrl::AGENT_NAME)
    }

    fn holder(&self) -> Owner {
        Owner::Held(self.info.slot)
    }

    /// Whether `msg` may be used with this function: its buffers are in
    /// this function's pool (it came from this function or from another
    /// attached to the same pool, or was made by [`Msg::from_parts`] from
    /// a lease of that pool; see [`shm::PoolId`]).
    /// A message of another pool is refused by every method that takes
    /// one ([`SendErrorKind::ForeignMsg`], [`MsgFreeError::Foreign`],
    /// [`PayloadError::ForeignMsg`]).
    pub fn owns(&self, msg: &Msg) -> bool {
        self.pool.owns(&msg.lease)
    }

    /// Allocates a message of `len` payload bytes (a chain when it does not
    /// fit one buffer).
    pub fn alloc(&mut self, len: u32) -> Result<Msg, AllocError> {
        let lease = self.pool.alloc_cached(&mut self.cache, len)?;
        let desc = Descriptor {
            tenant: self.info.tenant,
            src_fn: self.info.function,
            route: NO_ROUTE,
            origin: NO_NODE,
            len,
            buf: lease.head(),
            ..Default::default()
        };
        Ok(Msg { lease, desc })
    }

    /// Payload bytes of fragment `k` (zero copy); empty past the end, at a
    /// broken link, or for a message of another pool, as for an empty
    /// message: a caller that must tell these apart uses
    /// [`try_payload`](Self::try_payload), which says which.
    pub fn payload<'a>(&'a self, msg: &'a Msg, k: u32) -> &'a [u8] {
        self.try_payload(msg, k).unwrap_or(&[])
    }

    /// Mutable payload bytes of fragment `k` (zero copy); empty past the
    /// end, at a broken link, or for a message of another pool, and what
    /// is written into an empty slice goes nowhere: a caller that must know
    /// uses [`try_payload_mut`](Self::try_payload_mut), which says which.
    pub fn payload_mut<'a>(&'a self, msg: &'a mut Msg, k: u32) -> &'a mut [u8] {
        self.try_payload_mut(msg, k).unwrap_or_default()
    }

    /// [`payload`](Self::payload), with the reason when there are no bytes:
    /// [`PayloadError::NoFragment`] past the end or at a link of the chain
    /// that leads out of the pool (a process sharing the pool rewrote it),
    /// [`PayloadError::ForeignMsg`] for a message of another pool (whose
    /// buffer indices name other buffers in this function's pool).
    pub fn try_payload<'a>(&'a self, msg: &'a Msg, k: u32) -> Result<&'a [u8], PayloadError> {
        if !self.owns(msg) {
            return Err(PayloadError::ForeignMsg);
        }
        self.pool.frag(&msg.lease, k).ok_or(PayloadError::NoFragment(k))
    }

    /// [`payload_mut`](Self::payload_mut), with the reason when there are
    /// no bytes (as for [`try_payload`](Self::try_payload)).
    pub fn try_payload_mut<'a>(&'a self, msg: &'a mut Msg, k: u32) -> Result<&'a mut [u8], PayloadError> {
        if !self.owns(msg) {
            return Err(PayloadError::ForeignMsg);
        }
        self.pool.frag_mut(&mut msg.lease, k).ok_or(PayloadError::NoFragment(k))
    }

    /// Copies `data` into a message allocated for `data.len()` bytes.
    pub fn write(&self, msg: &mut Msg, data: &[u8]) -> Result<(), PayloadError> {
        Ok(self.pool.write(&mut msg.lease, data)?)
    }

    /// Copies the whole payload out (for tests and diagnostics); empty for
    /// a message of another pool, and short of [`Msg::len`] at a broken
    /// link ([`try_payload`](Self::try_payload) says which).
    pub fn read_to_vec(&self, msg: &Msg) -> Vec<u8> {
        if !self.owns(msg) {
            return Vec::new();
        }
        self.pool.read_to_vec(&msg.lease)
    }

    /// Frees a message. A message of another pool is refused and handed
    /// back ([`MsgFreeError::Foreign`]). A failure is also counted
    /// ([`free_failed`](Self::free_failed)).
    pub fn free(&mut self, msg: Msg) -> Result<u32, MsgFreeError> {
        let r = if self.owns(&msg) {
            self.pool.free_cached(&mut self.cache, msg.lease).map_err(MsgFreeError::Pool)
        } else {
            Err(MsgFreeError::Foreign(msg))
        };
        if let Err(e) = &r {
            *self.free_failed.entry(e.as_str()).or_insert(0) += 1;
        }
        r
    }

    fn lookup(&mut self, to: &str) -> Result<(), SendErrorKind> {
        // Refused before the cache of absent functions, which holds names
        // host-shimd answered for.
        let name = Name::new(to).map_err(SendErrorKind::BadName)?;
        let now = Instant::now();
        if let Some((until, kind)) = self.absent.get(to) {
            if now < *until {
                return Err(kind.clone());
            }
            self.absent.remove(to);
        }
        let r = self.ask_shimd(to, name);
        if let Err(kind @ (SendErrorKind::NoInstance | SendErrorKind::UnknownFunction)) = &r {
            self.absent.retain(|_, (until, _)| *until > now);
            self.absent.insert(to.to_owned(), (now + ABSENT_TTL, kind.clone()));
        }
        r
    }

    /// Asks host-shimd for the instances of `to` (`name`: `to` as a
    /// checked name).
    fn ask_shimd(&mut self, to: &str, name: Name) -> Result<(), SendErrorKind> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let shimd = |e: io::Error| match e.kind() {
            // Its end of the connection is closed: it is gone.
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected => {
                SendErrorKind::ShimdGone
            }
            _ => SendErrorKind::Shimd(e.to_string()),
        };
        self.conn.send(&CtrlFrame { seq, msg: CtrlMsg::Lookup(Lookup { function: name }) }, &[]).map_err(shimd)?;
        let mut set = PeerSet { function: 0, instances: Vec::new(), next: 0, standin_until: None };
        let mut buf = [0u8; CTRL_MAX_FRAME];
        loop {
            let r = self.conn.recv(&mut buf).map_err(shimd)?;
            if r.len == 0 {
                return Err(SendErrorKind::ShimdGone);
            }
            let (frame, _) = CtrlFrame::decode(&buf[..r.len]).map_err(|e| SendErrorKind::Shimd(e.to_string()))?;
            if frame.seq != seq {
                // The rest of an earlier lookup that failed half-way (its
                // descriptors close here): not this function's peers.
                continue;
            }
            match frame.msg {
                CtrlMsg::Peer(p) => {
                    let mut fds = r.fds.into_iter();
                    let (Some(ring_fd), Some(bell_fd)) = (fds.next(), fds.next()) else {
                        return Err(SendErrorKind::Shimd("peer without descriptors".into()));
                    };
                    let ring = Ring::open(ring_fd).map_err(|e| SendErrorKind::Shimd(e.to_string()))?;
                    set.function = p.function;
                    if p.flags & wire::ctrl::Peer::STANDIN != 0 {
                        set.standin_until = Some(Instant::now() + STANDIN_TTL);
                    }
                    set.instances.push(Instance { ring, bell: Doorbell::from_fd(bell_fd), slot: p.slot });
                }
                CtrlMsg::Ack(_) => break,
                CtrlMsg::Error(e) => {
                    return Err(match ErrorCode::from_u8(e.code) {
                        Some(ErrorCode::TenantMismatch) => SendErrorKind::TenantMismatch,
                        _ => SendErrorKind::UnknownFunction,
                    });
                }
                other => return Err(SendErrorKind::Shimd(format!("unexpected {:?}", other.kind()))),
            }
        }
        if set.instances.is_empty() {
            return Err(SendErrorKind::NoInstance);
        }
        self.peers.insert(to.to_owned(), set);
        Ok(())
    }

    /// Makes sure the instances of `to` are known: looks them up unless
    /// they are, or asks again once a stand-in answer expired.
    fn peers_of(&mut self, to: &str) -> Result<(), SendErrorKind> {
        match self.peers.get(to) {
            Some(set) if set.standin_until.is_none_or(|t| Instant::now() < t) => Ok(()),
            Some(_) => {
                self.peers.remove(to);
                self.lookup(to)
            }
            None => self.lookup(to),
        }
    }

    /// Sends a message to an instance of function `to` (round robin over
    /// its live instances). On failure the message comes back in the error
    /// unless a peer took it. Once host-shimd has stopped cleanly it fails
    /// with [`SendErrorKind::ShimdGone`] (still one load of the ring's
    /// closed flag, no system call). A message of another pool is refused
    /// ([`SendErrorKind::ForeignMsg`]) before anything is done.
    pub fn send(&mut self, msg: Msg, to: &str) -> Result<(), SendError> {
        if !self.owns(&msg) {
            return Err(SendError { kind: SendErrorKind::ForeignMsg, msg: Some(msg) });
        }
        if let Err(e) = msg.desc.validate_fields() {
            return Err(SendError { kind: SendErrorKind::BadDescriptor(e), msg: Some(msg) });
        }
        let mut msg = msg;
        let mut relooked = false;
        loop {
            if let Err(kind) = self.peers_of(to) {
                return Err(SendError { kind, msg: Some(msg) });
            }
            match self.try_send(msg, to) {
                Ok(()) => return Ok(()),
                Err((SendErrorKind::NoInstance, Some(m))) if !relooked => {
                    self.peers.remove(to);
                    relooked = true;
                    msg = m;
                }
                Err((kind, msg)) => return Err(SendError { kind, msg }),
            }
        }
    }

    fn try_send(&mut self, msg: Msg, to: &str) -> Result<(), (SendErrorKind, Option<Msg>)> {
        let holder = self.holder();
        let Some(set) = self.peers.get_mut(to) else { return Err((SendErrorKind::NoInstance, Some(msg))) };
        let mut msg = msg;
        while !set.instances.is_empty() {
            let i = set.next % set.instances.len();
            set.next = set.next.wrapping_add(1);
            let inst = &set.instances[i];
            let to_owner = Owner::Function(inst.slot);
            let src_fn = if self.agent { msg.desc.src_fn } else { self.info.function };
            let flags = set.marks(msg.desc.flags, self.agent);
            let desc = Descriptor { tenant: self.info.tenant, src_fn, dst_fn: set.function, flags, ..msg.desc };
            let (head, len) = match self.pool.hand_over(msg.lease, to_owner) {
                Ok(v) => v,
                Err((lease, e)) => {
                    return Err((SendErrorKind::Ownership(e.to_string()), Some(Msg { lease, desc })));
                }
            };
            let desc = Descriptor { buf: head, len, ..desc };
            match inst.ring.push(&[desc]) {
                Ok(p) => {
                    if p.wake {
                        // A failed doorbell only delays: the receiver's wait
                        // times out into a re-check; log it.
                        if let Err(e) = inst.bell.ring() {
                            log::warn!("doorbell of {to}: {e}");
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    let lease = match self.pool.take_back(head, len, to_owner, holder) {
                        Ok(l) => l,
                        // host-shimd is gone and reclaims nothing: the ring
                        // was abandoned as the push published, and its
                        // receiver took the message (or a peer of the
                        // tenant took the buffers).
                        Err(_) if e == RingPushError::Abandoned => return Err((SendErrorKind::ShimdGone, None)),
                        // The receiver died and host-shimd reclaimed the
                        // buffers: they are back in the pool, not lost.
                        Err(_) => return Err((SendErrorKind::NoInstance, None)),
                    };
                    msg = Msg { lease, desc };
                    match e {
                        RingPushError::Full => return Err((SendErrorKind::Full, Some(msg))),
                        // Every ring this function has came from the same
                        // host-shimd: no other instance would take it.
                        RingPushError::Abandoned => return Err((SendErrorKind::ShimdGone, Some(msg))),
                        RingPushError::Closed | RingPushError::Corrupted => {
                            set.instances.swap_remove(i);
                        }
                    }
                }
            }
        }
        Err((SendErrorKind::NoInstance, Some(msg)))
    }

    /// Sends several messages to `to` with batched ring pushes (one push
    /// and at most one doorbell per batch of up to 32). Returns how many
    /// were sent; on an error the unsent messages stay in `msgs`, in order
    /// (a message whose receiver died holding it is not returned: host-shimd
    /// put its buffers back in the pool; nor is one its receiver took as
    /// host-shimd stopped). [`SendErrorKind::ShimdGone`] as for
    /// [`send`](Self::send); a message of another pool stops the batch like
    /// a refused descriptor ([`SendErrorKind::ForeignMsg`]: it and the
    /// messages after it stay in `msgs`, untouched).
    pub fn send_batch(&mut self, msgs: &mut Vec<Msg>, to: &str) -> Result<usize, SendErrorKind> {
        let holder = self.holder();
        let mut sent = 0;
        let mut relooked = false;
        while !msgs.is_empty() {
            self.peers_of(to)?;
            let Some(set) = self.peers.get_mut(to) else { return Err(SendErrorKind::NoInstance) };
            if set.instances.is_empty() {
                self.peers.remove(to);
                if relooked {
                    return Err(SendErrorKind::NoInstance);
                }
                relooked = true;
                continue;
            }
            let i = set.next % set.instances.len();
            set.next = set.next.wrapping_add(1);
            let inst = &set.instances[i];
            let to_owner = Owner::Function(inst.slot);
            // Hand over a chunk; stop at the first message we cannot, or
            // that no receiver would accept.
            let mut descs = [Descriptor::default(); BATCH];
            let mut k = 0;
            let mut refused = None;
            let n = msgs.len().min(BATCH);
            for m in msgs.drain(..n) {
                if refused.is_some() {
                    self.scratch_msgs.push(m);
                    continue;
                }
                if !self.pool.owns(&m.lease) {
                    refused = Some(SendErrorKind::ForeignMsg);
                    self.scratch_msgs.push(m);
                    continue;
                }
                if let Err(e) = m.desc.validate_fields() {
                    refused = Some(SendErrorKind::BadDescriptor(e));
                    self.scratch_msgs.push(m);
                    continue;
                }
                let src_fn = if self.agent { m.desc.src_fn } else { self.info.function };
                let flags = set.marks(m.desc.flags, self.agent);
                let desc = Descriptor { tenant: self.info.tenant, src_fn, dst_fn: set.function, flags, ..m.desc };
                match self.pool.hand_over(m.lease, to_owner) {
                    Ok((head, len)) => {
                        descs[k] = Descriptor { buf: head, len, ..desc };
                        k += 1;
                    }
                    Err((lease, e)) => {
                        refused = Some(SendErrorKind::Ownership(e.to_string()));
                        self.scratch_msgs.push(Msg { lease, desc });
                    }
                }
            }
            let (pushed, err) = match inst.ring.push(&descs[..k]) {
                Ok(p) => {
                    if p.wake
                        && let Err(e) = inst.bell.ring()
                    {
                        log::warn!("doorbell of {to}: {e}");
                    }
                    (p.count, None)
                }
                Err(e) => (0, Some(e)),
            };
            sent += pushed;
            // Take back what did not go in, ahead of the untouched rest.
            let mut back: Vec<Msg> = Vec::with_capacity(k - pushed + self.scratch_msgs.len());
            for d in &descs[pushed..k] {
                if let Ok(lease) = self.pool.take_back(d.buf, d.len, to_owner, holder) {
                    back.push(Msg { lease, desc: *d });
                }
            }
            back.append(&mut self.scratch_msgs);
            msgs.splice(0..0, back);
            match err {
                None if refused.is_none() => {}
                None => return Err(refused.unwrap_or(SendErrorKind::Full)),
                Some(RingPushError::Full) => return Err(SendErrorKind::Full),
                Some(RingPushError::Abandoned) => return Err(SendErrorKind::ShimdGone),
                Some(RingPushError::Closed | RingPushError::Corrupted) => {
                    if let Some(set) = self.peers.get_mut(to) {
                        set.instances.swap_remove(i);
                    }
                }
            }
        }
        Ok(sent)
    }

    fn reject(&mut self, e: AcceptError) {
        let n = self.rejected.entry(e.as_str()).or_insert(0);
        *n += 1;
        if n.is_power_of_two() {
            log::warn!("dropped bad descriptor ({e}); {n} of this kind so far");
        }
    }

    /// Receives without waiting.
    ///
    /// Descriptors are taken from the ring, validated and accepted (their
    /// buffers now held by this process) before they are consumed from
    /// it: a process killed in between leaves them in the ring, never in
    /// neither place. That matters for the agent, whose uplink ring
    /// outlives it (host-shimd, reclaiming what a dead agent held, also
    /// consumes what it had taken: [`shm::ring::Ring::skip_taken`]).
    ///
    /// One call looks at one lap of the ring at most: `None` once it has
    /// dropped that many descriptors in a row, even if more are waiting.
    /// Producers that keep the ring full of descriptors that fail
    /// validation would otherwise hold the call for as long as they keep
    /// it up (the agent, which takes each tenant's uplink this way, would
    /// serve no other tenant meanwhile).
    pub fn try_recv(&mut self) -> Option<Msg> {
        // (The capacity as checked when the ring was opened.)
        let mut left = self.inbox.ring().header().capacity as usize;
        loop {
            if let Some(m) = self.taken.pop_front() {
                return Some(m);
            }
            let n = self.inbox.peek(&mut self.scratch[..left.min(BATCH)]);
            if n == 0 {
                return None;
            }
            left -= n;
            for k in 0..n {
                let d = self.scratch[k];
                match self.pool.accept(&d, self.info.slot) {
                    Ok(lease) => self.taken.push_back(Msg { lease, desc: d }),
                    // Its sender took it back after the ring was closed (a
                    // push that published as host-shimd stopped). The failed
                    // accept read the owner the take-back wrote (its Acquire
                    // pairs with the AcqRel of that owner move in
                    // `Pool::take_back`), and the sender had seen the closed
                    // flag before it: this Acquire load sees it too. A bad
                    // descriptor in a ring still open is still reported.
                    Err(AcceptError::NotOwner { .. }) if self.inbox.ring().is_closed() => {
                        *self.rejected.entry(TAKEN_BACK).or_insert(0) += 1;
                    }
                    Err(e) => self.reject(e),
                }
            }
            self.inbox.commit(n);
        }
    }

    /// For a caller that sleeps on this function's doorbell together with
    /// other fds (the agent): announces the sleep; `false` means a message
    /// is already waiting (do not sleep). Call
    /// [`sleep_end`](Self::sleep_end) after waking either way.
    pub fn sleep_begin(&mut self) -> bool {
        self.taken.is_empty() && self.inbox.prepare_sleep()
    }

    /// After [`sleep_begin`](Self::sleep_begin): awake again; the doorbell
    /// is cleared.
    pub fn sleep_end(&mut self) {
        self.inbox.end_sleep();
        if let Err(e) = self.bell.drain() {
            log::warn!("doorbell: {e}");
        }
    }

    /// Messages waiting in the inbound rings of the instances of `to` this
    /// function has looked up (`None`: never looked up). A ring whose
    /// cursors a peer corrupted counts as its capacity.
    pub fn peer_queue_depth(&self, to: &str) -> Option<u64> {
        let set = self.peers.get(to)?;
        Some(set.instances.iter().map(|i| i.ring.pending().min(u64::from(i.ring.header().capacity))).sum())
    }

    /// The doorbell's fd (readable when rung), to sleep on.
    pub fn doorbell_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.bell.fd()
    }

    /// Receives, spinning briefly and then sleeping on the doorbell, until
    /// a valid message arrives or `timeout` passes (`None`, or one too
    /// long for the clock such as `Duration::MAX`: forever).
    ///
    /// The sleep also watches the control connection: once host-shimd is
    /// gone it fails with [`RecvError::ShimdGone`] (after the messages
    /// already in the ring are taken). A wait too short to sleep (a zero
    /// timeout, or one within the spin) does not look:
    /// [`shimd_alive`](Self::shimd_alive) tells.
    pub fn recv_timeout(&mut self, timeout: Option<Duration>) -> Result<Option<Msg>, RecvError> {
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        loop {
            if let Some(m) = self.try_recv() {
                return Ok(Some(m));
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(l) if !l.is_zero() => Some(l),
                    _ => return Ok(None),
                },
                None => None,
            };
            // Wait without popping: `try_recv` above takes what arrived
            // (accepted before it leaves the ring). Descriptors popped and
            // held here unaccepted would name buffers still marked as sent
            // to this function and in no ring, which host-shimd's orphan
            // scan frees after a death in the tenant.
            // A hang-up of the control connection is looked at only when
            // the wait sleeps; the ring's closed flag (host-shimd stopped
            // cleanly, or dropped this function) also while it spins.
            let hangup = Some(std::os::fd::AsFd::as_fd(&self.conn));
            match self.inbox.wait_ready(&self.bell, hangup, self.spin, left)? {
                Wait::HungUp | Wait::Closed => return Err(RecvError::ShimdGone),
                Wait::Ready | Wait::TimedOut => {}
            }
        }
    }

    /// Receives, waiting as long as it takes; fails once host-shimd is
    /// gone ([`RecvError::ShimdGone`]).
    pub fn recv(&mut self) -> Result<Msg, RecvError> {
        loop {
            if let Some(m) = self.recv_timeout(None)? {
                return Ok(m);
            }
        }
    }

    /// Buffers in this function's private allocation cache.
    pub fn cached_buffers(&self) -> usize {
        self.cache.len()
    }

    /// Descriptors dropped by validation, by reason
    /// ([`AcceptError::as_str`]), and those whose sender took them back as
    /// the ring was closed ([`TAKEN_BACK`]).
    pub fn rejected(&self) -> &HashMap<&'static str, u64> {
        &self.rejected
    }

    /// Calls of [`free`](Self::free) that failed so far, by reason
    /// ([`MsgFreeError::as_str`]); each error also went to its caller. For
    /// a caller that reports them elsewhere (the agent, in its metrics).
    pub fn free_failed(&self) -> &HashMap<&'static str, u64> {
        &self.free_failed
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        // A clean detach gives the cached buffers back at once; after a
        // crash host-shimd reclaims them (they are recorded as held by us).
        self.pool.drain_cache(&mut self.cache);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A receive fails with `ShimdGone` both when host-shimd's control
    /// connection hung up and when it marked the ring closed as it stopped
    /// cleanly (no connection involved): the message says what happened,
    /// as the send's does. Before, it said "the control connection
    /// closed", which after a clean stop is not what was seen.
    #[test]
    fn shimd_gone_on_receive_says_what_happened() {
        let text = RecvError::ShimdGone.to_string();
        assert!(!text.contains("control connection"), "{text}");
        assert!(text.starts_with("host-shimd is gone"), "{text}");
        assert!(text.contains("attach again"), "{text}");
    }

    /// host-shimd in this process for node `n0` of the cluster config
    /// `text` (its `runtime_dir` is set here), and what `clients` returned:
    /// `clients` runs on another thread, and host-shimd serves on this one
    /// until it ends (the attaches and lookups wait for its answers).
    pub(crate) fn shimd_serving<T: Send + 'static>(
        name: &str,
        text: &str,
        clients: impl FnOnce(&Path) -> T + Send + 'static,
    ) -> (crate::daemon::Shimd, T, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("dne-fn-{name}-{}", std::process::id()));
        let text = format!(
            "[[node]]\nname = \"n0\"\naddress = \"127.0.0.1:7101\"\nruntime_dir = \"{}\"\n\n{text}",
            dir.display()
        );
        let mut shimd = crate::daemon::Shimd::new(config::Cluster::parse(&text).unwrap(), "n0").unwrap();
        let socket = crate::daemon::socket_path(&dir);
        let t = std::thread::spawn(move || clients(&socket));
        while !t.is_finished() {
            shimd.poll_once(None, Duration::from_millis(10)).unwrap();
        }
        (shimd, t.join().unwrap(), dir)
    }

    /// Tenant `t` with functions `a` and `b` (a ring of 8), tenant `u`
    /// with function `c`; pools of the same geometry, so their buffer
    /// indices come out in the same order.
    const TWO_TENANTS: &str = "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 4096\nbuffers = 64\nrecv_quota = 8\n\n\
         [[function]]\nname = \"a\"\ntenant = \"t\"\nnode = \"n0\"\n\n\
         [[function]]\nname = \"b\"\ntenant = \"t\"\nnode = \"n0\"\nring_capacity = 8\n\n\
         [[tenant]]\nname = \"u\"\nweight = 1\nbuf_size = 4096\nbuffers = 64\nrecv_quota = 8\n\n\
         [[function]]\nname = \"c\"\ntenant = \"u\"\nnode = \"n0\"\n";

    /// Buffers of `f`'s pool neither free nor in the caches of `fs`.
    fn held(f: &Function, fs: &[&Function]) -> usize {
        let cached: usize = fs.iter().map(|f| f.cached_buffers()).sum();
        f.pool().geometry().buf_count() as usize - f.pool().free_buffers() as usize - cached
    }

    /// A function's private allocation cache holds at most a small share of
    /// a small pool, so the other functions of the tenant still find
    /// buffers when nothing is in flight. Before, each attach kept up to 32
    /// buffers: in a pool of 64, two functions that had each sent one
    /// message held all of them, and a third got `Exhausted`.
    #[test]
    fn a_small_pools_buffers_are_not_hoarded_by_the_caches() {
        const THREE: &str = "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 4096\nbuffers = 64\nrecv_quota = 8\n\n\
             [[function]]\nname = \"a\"\ntenant = \"t\"\nnode = \"n0\"\n\n\
             [[function]]\nname = \"b\"\ntenant = \"t\"\nnode = \"n0\"\n\n\
             [[function]]\nname = \"c\"\ntenant = \"t\"\nnode = \"n0\"\n";
        let (_shimd, (), dir) = shimd_serving("fn-hoard", THREE, |socket| {
            let mut fs: Vec<Function> =
                ["a", "b", "c"].iter().map(|n| Function::attach(socket, "t", n).unwrap()).collect();
            for (k, f) in fs.iter_mut().enumerate() {
                let m = f.alloc(100).unwrap_or_else(|e| panic!("function {k}: {e}"));
                f.free(m).unwrap();
            }
            let cached: usize = fs.iter().map(|f| f.cached_buffers()).sum();
            assert!(cached <= 16, "the caches hold {cached} of 64 buffers");
            // Each can still take a 16-buffer chain at once, in turn.
            for (k, f) in fs.iter_mut().enumerate() {
                let m = f.alloc(16 * 4096 - 1024).unwrap_or_else(|e| panic!("function {k}: {e}"));
                f.free(m).unwrap();
            }
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A destination that no function can be named (empty, longer than a
    /// name, a character names do not use) is the caller's mistake, as in
    /// `attach` and the C ABI's `dne_send` (`DNE_ERR_INVALID_ARG`), not a
    /// function that may yet be configured: `send` and `send_batch` refuse
    /// it as such, hand the messages back, and still send to a valid name.
    /// Before, both said `UnknownFunction`, the answer for a well-formed
    /// name host-shimd does not know.
    #[test]
    fn a_destination_that_is_no_valid_name_is_refused_as_such() {
        let (_shimd, (), dir) = shimd_serving("fn-badname", TWO_TENANTS, |socket| {
            let mut a = Function::attach(socket, "t", "a").unwrap();
            let mut b = Function::attach(socket, "t", "b").unwrap();
            let long = "b".repeat(wire::name::NAME_MAX + 1);
            for to in ["", "b c", "b/c", "é", long.as_str()] {
                let m = a.alloc(1).unwrap();
                let e = a.send(m, to).unwrap_err();
                assert!(matches!(e.kind, SendErrorKind::BadName(_)), "{to:?}: {e}");
                a.free(e.msg.expect("handed back")).unwrap();
                let mut batch = vec![a.alloc(1).unwrap()];
                let e = a.send_batch(&mut batch, to).unwrap_err();
                assert!(matches!(e, SendErrorKind::BadName(_)), "{to:?}: {e}");
                assert_eq!(batch.len(), 1, "{to:?}: the message stays");
                a.free(batch.pop().unwrap()).unwrap();
            }
            let m = a.alloc(1).unwrap();
            a.send(m, "b").unwrap();
            let m = b.recv_timeout(Some(Duration::from_secs(10))).unwrap().expect("the message to b");
            b.free(m).unwrap();
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A message of tenant `t`'s pool used with a function of tenant `u`
    /// (both attached in this process) is refused by every method that
    /// takes one, with the message handed back untouched, and it stays
    /// usable with the functions of its own pool (another attach to it
    /// included). Before: `c.payload` and `c.read_to_vec` read, and
    /// `c.write` overwrote, the bytes of `c`'s own message at the same
    /// buffer index; `c.send` and `c.send_batch` failed with
    /// `Ownership("buffer 31 is owned by 0x20002, not by the caller")`,
    /// an index of the wrong pool; `c.free` returned
    /// `Err(NotOwner { index: 31, .. })` and consumed the message, whose
    /// buffer stayed held until `a` detached.
    #[test]
    fn a_message_of_another_tenants_pool_is_refused_and_stays_usable() {
        let (_shimd, (), dir) = shimd_serving("fn-foreign", TWO_TENANTS, |socket| {
            let mut a = Function::attach(socket, "t", "a").unwrap();
            let mut b = Function::attach(socket, "t", "b").unwrap();
            let mut c = Function::attach(socket, "u", "c").unwrap();
            let mut m = a.alloc(3).unwrap();
            a.write(&mut m, b"abc").unwrap();
            let mut k = c.alloc(3).unwrap();
            c.write(&mut k, b"xyz").unwrap();
            assert_eq!(m.desc().buf, k.desc().buf, "the same index in both pools");
            assert!(!c.owns(&m) && a.owns(&m) && b.owns(&m));

            assert_eq!(c.try_payload(&m, 0), Err(PayloadError::ForeignMsg));
            assert_eq!(c.try_payload_mut(&mut m, 0), Err(PayloadError::ForeignMsg));
            assert!(c.payload(&m, 0).is_empty());
            assert!(c.payload_mut(&mut m, 0).is_empty());
            assert!(c.read_to_vec(&m).is_empty());
            assert_eq!(c.write(&mut m, b"QQQ"), Err(PayloadError::ForeignMsg));
            assert_eq!(c.read_to_vec(&k), b"xyz", "c's own message is untouched");

            let e = c.send(m, "c").unwrap_err();
            assert!(matches!(e.kind, SendErrorKind::ForeignMsg), "{e}");
            let m = e.msg.expect("handed back");
            let e = c.reply(m).unwrap_err();
            assert!(matches!(e.kind, SendErrorKind::ForeignMsg), "{e}");
            let k2 = c.alloc(1).unwrap();
            let mut batch = vec![k2, e.msg.expect("handed back")];
            assert!(matches!(c.send_batch(&mut batch, "c"), Err(SendErrorKind::ForeignMsg)));
            assert_eq!(batch.len(), 1, "the one of c's pool went, the other stays");
            let m = batch.pop().unwrap();
            let got = c.try_recv().expect("c's own message arrived");
            c.free(got).unwrap();
            let before = held(&a, &[&a, &b]);
            let Err(MsgFreeError::Foreign(m)) = c.free(m) else { panic!("c freed a message of t's pool") };
            assert_eq!(held(&a, &[&a, &b]), before);

            // Untouched, and still free to move within its pool.
            assert_eq!((m.len(), m.desc().buf), (3, k.desc().buf));
            assert_eq!(b.read_to_vec(&m), b"abc");
            b.send(m, "a").unwrap();
            let got = a.try_recv().expect("b's send arrived");
            assert_eq!(a.read_to_vec(&got), b"abc");
            assert_eq!(b.free(got).unwrap(), 1);
            assert_eq!(held(&a, &[&a, &b]), 0);
            c.free(k).unwrap();
            assert_eq!(held(&c, &[&c]), 0);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The agent attaches to every tenant's pool in one slot, so its
    /// functions of two tenants hold their buffers as the same owner: a
    /// message of one used with the other is refused too. Before,
    /// `au.send` of `at`'s message returned `Ok` and delivered to `c` the
    /// buffer of `u`'s pool that `au` still held as another message (two
    /// holders of one buffer), and `au.free` of another returned `Ok(1)`,
    /// putting a buffer of `u`'s pool that `au` held into its cache a
    /// second time; the buffers of `t`'s pool stayed held.
    #[test]
    fn the_agents_of_two_tenants_refuse_each_others_messages() {
        let (_shimd, (), dir) = shimd_serving("foreign-agent", TWO_TENANTS, |socket| {
            let mut at = Function::attach_agent(socket, "t").unwrap();
            let mut au = Function::attach_agent(socket, "u").unwrap();
            let mut c = Function::attach(socket, "u", "c").unwrap();
            assert_eq!(at.info().slot, au.info().slot);
            let m = at.alloc(3).unwrap();
            let keep = au.alloc(3).unwrap();
            assert_eq!(m.desc().buf, keep.desc().buf, "the same index in both pools");

            let e = au.send(m, "c").unwrap_err();
            assert!(matches!(e.kind, SendErrorKind::ForeignMsg), "{e}");
            assert!(c.try_recv().is_none(), "nothing reached c");
            let m = e.msg.expect("handed back");
            let Err(MsgFreeError::Foreign(m)) = au.free(m) else { panic!("au freed a message of t's pool") };
            assert_eq!(held(&au, &[&au]), 1, "u's pool: only `keep` is held");

            assert_eq!(at.free(m).unwrap(), 1);
            assert_eq!(held(&at, &[&at]), 0);
            au.send(keep, "c").unwrap();
            let got = c.try_recv().expect("au's own message arrived");
            c.free(got).unwrap();
            assert_eq!(held(&au, &[&au, &c]), 0);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A message rebuilt with `Msg::from_parts` (as the agent and the
    /// bridge do) is still the message of its lease's pool: a function of
    /// another pool refuses it and hands it back like any other.
    #[test]
    fn a_message_made_from_parts_keeps_its_pool() {
        let (_shimd, (), dir) = shimd_serving("foreign-parts", TWO_TENANTS, |socket| {
            let mut at = Function::attach_agent(socket, "t").unwrap();
            let mut au = Function::attach_agent(socket, "u").unwrap();
            let mut c = Function::attach(socket, "u", "c").unwrap();
            let (lease, desc) = at.alloc(3).unwrap().into_parts();
            let keep = au.alloc(3).unwrap();
            assert_eq!(lease.head(), keep.desc().buf, "the same index in both pools");
            let mut m = Msg::from_parts(lease, desc);
            assert!(!au.owns(&m) && at.owns(&m));
            assert_eq!(au.try_payload_mut(&mut m, 0), Err(PayloadError::ForeignMsg));
            let e = au.send(m, "c").unwrap_err();
            assert!(matches!(e.kind, SendErrorKind::ForeignMsg), "{e}");
            let m = e.msg.expect("handed back");
            let r = au.free(m);
            let Err(MsgFreeError::Foreign(m)) = r else { panic!("au freed a message of t's pool: {r:?}") };
            assert!(c.try_recv().is_none(), "nothing reached c");
            assert_eq!(held(&au, &[&au]), 1, "u's pool: only `keep` is held");
            assert_eq!(at.free(m).unwrap(), 1);
            assert_eq!(au.free(keep).unwrap(), 1);
            assert_eq!(held(&at, &[&at]) + held(&au, &[&au]), 0);
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Functions `a` and `b` of tenant `t` under a host-shimd serving
    /// [`TWO_TENANTS`], after `a` sent `b` one message and `b` freed it
    /// (so each has the other's ring open).
    fn a_and_b_after_one_message(name: &str) -> (crate::daemon::Shimd, (Function, Function), std::path::PathBuf) {
        let (shimd, (a, mut b), dir) = shimd_serving(name, TWO_TENANTS, |socket| {
            let b = Function::attach(socket, "t", "b").unwrap();
            let mut a = Function::attach(socket, "t", "a").unwrap();
            let m = a.alloc(1).unwrap();
            a.send(m, "b").unwrap();
            (a, b)
        });
        let got = b.try_recv().expect("the first message");
        b.free(got).unwrap();
        (shimd, (a, b), dir)
    }

    /// A descriptor its sender took back after the ring was closed (its
    /// push published as host-shimd stopped, saw the ring abandoned and
    /// failed, and the sender took its buffers back before the receiver
    /// looked) is counted under its own reason and not logged; in a ring
    /// still open the same is a `not_owner`, reported. Before, both were
    /// counted as `not_owner` (left: `None`, right: `Some(1)` for
    /// `taken_back`), with a warning, in an ordinary clean stop.
    #[test]
    fn a_descriptor_its_sender_took_back_from_a_closed_ring_is_counted_apart() {
        let (shimd, (mut a, mut b), dir) = a_and_b_after_one_message("taken-back");
        /// `a` sends to `b`, `closing` (host-shimd) is dropped, and `a`
        /// takes the message back as `try_send` does after a push that
        /// failed as it published; then `b` looks.
        fn take_back(a: &mut Function, b: &mut Function, closing: Option<crate::daemon::Shimd>) {
            let m = a.alloc(1).unwrap();
            let (head, len) = (m.desc().buf, m.len());
            a.send(m, "b").unwrap();
            drop(closing);
            let (from, holder) = (Owner::Function(b.info().slot), Owner::Held(a.info().slot));
            let lease = a.pool().take_back(head, len, from, holder).unwrap();
            assert!(b.try_recv().is_none());
            a.pool().free(lease).unwrap();
        }
        take_back(&mut a, &mut b, None);
        assert_eq!(b.rejected().get("not_owner"), Some(&1));
        assert_eq!(b.rejected().get(TAKEN_BACK), None);
        // host-shimd stops: its rings are abandoned.
        take_back(&mut a, &mut b, Some(shimd));
        assert!(b.inbox.ring().is_abandoned());
        assert_eq!(b.rejected().get(TAKEN_BACK), Some(&1));
        assert_eq!(b.rejected().get("not_owner"), Some(&1), "no more than before");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A producer that keeps a function's ring full of descriptors no
    /// receiver accepts holds a `try_recv` for one lap of the ring at most:
    /// the call then says nothing is ready, as it does for an empty ring
    /// (the agent, which takes each tenant's uplink this way, goes on to
    /// its other tenants and its fabric). Before, the call went on for as
    /// long as the producer kept the ring from emptying: here one producer
    /// thread stretched some of 1000 calls to 47 to 257 descriptors (up
    /// to 32 laps), and producers on cores of their own can keep it up
    /// for as long as they like. An accepted message counts towards a
    /// caller's batch; a dropped one counted nowhere.
    #[test]
    fn a_flood_of_bad_descriptors_holds_a_receive_for_one_lap_at_most() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let (_shimd, (mut a, mut b), dir) = a_and_b_after_one_message("bad-flood");
        // `a`'s way into b's ring (a ring of 8), for a producer that
        // pushes what it likes.
        let ring = a.peers.remove("b").unwrap().instances.swap_remove(0).ring;
        let cap = u64::from(b.inbox.ring().header().capacity);
        assert_eq!(cap, 8);
        let bad = [Descriptor { tenant: a.info().tenant, buf: u32::MAX, len: 1, ..Descriptor::default() }; 8];
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut pushed = 0u64;
                while pushed < 10_000_000 && !stop.load(Relaxed) {
                    match ring.push(&bad) {
                        Ok(p) => pushed += p.count as u64,
                        Err(_) => std::thread::yield_now(),
                    }
                }
                pushed
            })
        };
        let rejected = |f: &Function| f.rejected().values().sum::<u64>();
        // Calls made while the producer is at work, and the most bad
        // descriptors one of them looked at.
        let mut most = 0;
        for _ in 0..1000 {
            // The ring full: the producer is at work.
            while b.inbox.ring().pending() < cap && !producer.is_finished() {
                std::thread::yield_now();
            }
            let before = rejected(&b);
            assert!(b.try_recv().is_none());
            most = most.max(rejected(&b) - before);
        }
        stop.store(true, Relaxed);
        let pushed = producer.join().unwrap();
        assert!(most <= cap, "a try_recv looked at {most} bad descriptors (the producer pushed {pushed})");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
