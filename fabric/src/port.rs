//! [`Port`]: a fabric node's whole data path over tenant pools, shared by
//! the agent and the ingress: one [`Endpoint`], its [`Mesh`], one
//! registered region per tenant pool, receives kept posted per connection,
//! messages sent as one fabric send per pool buffer, and received fragments
//! reassembled into one chain.
//!
//! Buffer layout: every pool buffer starts with [`HEADROOM`](crate::HEADROOM) bytes; the
//! [`FabricHeader`] occupies its last [`HEADER_LEN`] bytes, right before
//! the payload, so header and payload go out as one contiguous send from
//! the pool and land the same way in the receiver's buffer (which is posted
//! at the same offset). The NIC reads and writes the pool; nobody copies.
//!
//! Isolation: a connection belongs to one tenant; what arrives on it lands
//! in that tenant's pool and is reported as that tenant's, whatever the
//! peer wrote in the header.
//!
//! Poll-driven, single-threaded; no allocation per message (the event
//! vector and every table are sized at start and reused).

use crate::{
    Completion, CompletionError, ConnId, Endpoint, HEADER_LEN, ImportedPool, Memory, Mesh, MeshConfig, MeshEvent,
    RecvWr, RegionId, SendWr, Transport,
};
use shm::pool::Lease;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::{Descriptor, FabricHeader, Immediate, MsgKind};
use zerocopy::{FromBytes, IntoBytes};

/// Offset of the fabric header in a buffer.
pub const HDR_OFF: u64 = wire::fabric::HEADER_OFFSET as u64;
/// Token bit of receive work requests.
const RECV_TOKEN: u64 = 1 << 63;
/// How long a chain being received may go without a new fragment, while
/// its sender has credits or while this port holds every buffer of the
/// tenant's pool, before its fragments are freed and the rest of it
/// dropped as it comes ([`PortEvent::ChainStalled`]). A stopped or
/// misbehaving sender holds the fragments it sent; and a sender posts a
/// chain's fragments as credits allow, so chains open on several
/// connections can hold the whole pool: then no receive can be posted, no
/// credit goes out and none of them can finish.
pub const CHAIN_STALL: Duration = Duration::from_secs(5);
/// How long a chain may wait for this port's receives (its sender out of
/// credits) while buffers of the pool are elsewhere (with the functions,
/// queued for other nodes) before it is dropped all the same: far beyond
/// any request's timeout, it breaks a wait across nodes (each node's pool
/// held by chains from the other and by messages for it) that no single
/// port can see.
pub const CHAIN_WAIT: Duration = Duration::from_secs(60);
/// A gap between two looks for stalled chains longer than this (the
/// port was not driven: a stopped process, a busy machine) restarts
/// every chain's count: no sender stalled meanwhile.
const LOOK_GAP: Duration = Duration::from_secs(1);

/// A tenant pool as the port sees it.
#[derive(Clone, Copy, Debug)]
pub enum PoolView<'a> {
    /// Mapped in this process: the port writes and reads fabric headers.
    Local(&'a shm::Pool),
    /// Imported from its exporter, not readable here (the agent on the
    /// DPU): the exporter wrote the headers of what is sent, and received
    /// messages carry what the completions tell (tenant, destination from
    /// the immediate, length) for the exporter to complete from the header.
    Imported(&'a ImportedPool),
}

impl<'p> PoolView<'p> {
    /// The pool's geometry.
    pub fn geometry(&self) -> wire::PoolGeometry {
        match self {
            Self::Local(p) => p.geometry(),
            Self::Imported(p) => p.geometry(),
        }
    }

    /// Offset of buffer `index` in the registered memory.
    pub fn buf_offset(&self, index: u32) -> Option<u64> {
        match self {
            Self::Local(p) => p.buf_offset(index),
            Self::Imported(p) => p.buf_offset(index),
        }
    }

    /// The buffers of a held chain, in order.
    #[inline]
    pub fn frags<'l>(self, lease: &'l Lease) -> impl Iterator<Item = u32> + use<'p, 'l> {
        match self {
            Self::Local(p) => Either::Local(p.chain(lease)),
            Self::Imported(p) => Either::Imported(p.chain(lease)),
        }
    }
}

/// One of two iterators (no allocation, no dynamic dispatch).
enum Either<A, B> {
    Local(A),
    Imported(B),
}

impl<A: Iterator<Item = u32>, B: Iterator<Item = u32>> Iterator for Either<A, B> {
    type Item = u32;
    #[inline]
    fn next(&mut self) -> Option<u32> {
        match self {
            Self::Local(a) => a.next(),
            Self::Imported(b) => b.next(),
        }
    }
}

/// Where a tenant's buffers come from (the agent: its attach to the host
/// pool, or the pool the host exported to it; the ingress: its own pool).
pub trait Buffers {
    /// The tenant pool.
    fn view(&self) -> PoolView<'_>;
    /// One buffer to post a receive with (`None`: pool exhausted).
    fn alloc_one(&mut self) -> Option<Lease>;
    /// Returns buffers to the pool.
    fn free(&mut self, lease: Lease);
}

/// What happened, from [`Port::poll`] and [`Port::control`].
#[derive(Debug)]
pub enum PortEvent {
    /// A tenant's connection to `peer` is up.
    Up {
        /// Tenant.
        tenant: u16,
        /// Peer node.
        peer: u16,
    },
    /// A tenant's connection to `peer` that was up failed (its peer broke
    /// the protocol or crashed, the fabric lost it): said once, by the
    /// [`Port::control`] after the [`Port::poll`] that saw the failure,
    /// after any [`PortEvent::PeerDown`] that control reports. The mesh
    /// resets the link, and its `PeerDown` follows unless it came first.
    /// A connection closed with its link gets no `Down` of its own.
    Down {
        /// Tenant.
        tenant: u16,
        /// Peer node.
        peer: u16,
    },
    /// The link to `peer` went down (every connection to it closed; its
    /// sends in flight complete with errors).
    PeerDown {
        /// Peer node.
        peer: u16,
    },
    /// A message was sent (all its fragments placed), or failed. The
    /// buffers come back to the caller either way.
    Sent {
        /// Tenant.
        tenant: u16,
        /// The node it was sent to.
        peer: u16,
        /// The message's buffers.
        lease: Lease,
        /// Its descriptor.
        desc: Descriptor,
        /// The caller's tag.
        tag: u64,
        /// Outcome.
        result: Result<(), CompletionError>,
    },
    /// A whole message arrived (a chain in the tenant's pool).
    Received {
        /// Tenant (the connection's).
        tenant: u16,
        /// Sender node.
        peer: u16,
        /// The chain.
        lease: Lease,
        /// The descriptor the sender wrote, `tenant` set to the
        /// connection's.
        desc: Descriptor,
    },
    /// A peer broke the protocol (its connection failed) or sent a chain
    /// that does not add up (dropped).
    Protocol {
        /// Tenant.
        tenant: u16,
        /// Peer node.
        peer: u16,
    },
    /// A receive could not be posted: the tenant's pool is empty (once
    /// per connection each time it runs short: not again until a refill
    /// of it found a buffer).
    NoBuffer {
        /// Tenant.
        tenant: u16,
    },
    /// A chain from `peer` got no new fragment for the port's
    /// `chain_stall` ([`CHAIN_STALL`]): the message is dropped, the
    /// fragments it held are free again, and the rest of it is freed as
    /// it arrives.
    ChainStalled {
        /// Tenant.
        tenant: u16,
        /// Sender node.
        peer: u16,
    },
}

#[derive(Debug)]
struct Flight {
    tenant: u16,
    peer: u16,
    msg: Option<(Lease, Descriptor)>,
    tag: u64,
    left: u32,
    error: Option<CompletionError>,
}

#[derive(Debug)]
struct Posted {
    tenant: u16,
    lease: Lease,
}

#[derive(Debug)]
struct Conn {
    peer: u16,
    tenant: u16,
    up: bool,
    parts: Vec<Lease>,
    first: Option<Descriptor>,
    /// Payload bytes of the chain being received so far.
    got: u32,
    /// The chain being received is malformed: its fragments are freed as
    /// they come, and it is dropped at its last.
    bad: bool,
    /// The chain being received was dropped as stalled: its remaining
    /// fragments are freed as they come, and its last ends it quietly.
    stalled: bool,
    /// Fragments received (wrapping), and when [`Port::control`] last saw
    /// the count move while a chain was open.
    frags: u32,
    seen: (u32, Option<Instant>),
    /// The last refill found the pool empty (told once, in a
    /// [`PortEvent::NoBuffer`]).
    starved: bool,
    /// The connection failed or was closed: no receive is posted on it
    /// again (the peer's next link is a new connection, a new `Conn`).
    dead: bool,
    posted: u32,
    want: u32,
}

/// A fixed table with a free list.
#[derive(Debug)]
struct Table<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Table<T> {
    fn new(n: usize) -> Self {
        Self { items: (0..n).map(|_| None).collect(), free: (0..n as u32).rev().collect() }
    }
    /// Stores `v` under a free index; a full table gives `v` back.
    fn insert(&mut self, v: T) -> Result<u32, T> {
        let Some(i) = self.free.pop() else { return Err(v) };
        self.items[i as usize] = Some(v);
        Ok(i)
    }
    fn get_mut(&mut self, i: u64) -> Option<&mut T> {
        self.items.get_mut(usize::try_from(i).ok()?)?.as_mut()
    }
    fn remove(&mut self, i: u64) -> Option<T> {
        let k = u32::try_from(i).ok()?;
        let v = self.items.get_mut(k as usize)?.take()?;
        self.free.push(k);
        Some(v)
    }
}

/// A set of connection indices, in order: a bit per index, and a bit per
/// word of those saying whether it has any set, so that finding the next
/// member skips 4096 absent indices per word looked at.
#[derive(Debug, Default)]
struct IndexSet {
    words: Vec<u64>,
    summary: Vec<u64>,
    len: usize,
}

impl IndexSet {
    /// Makes `i` a member (`on`) or not.
    fn set(&mut self, i: usize, on: bool) {
        let (w, bit) = (i / 64, 1u64 << (i % 64));
        if w >= self.words.len() {
            if !on {
                return;
            }
            self.words.resize(w + 1, 0);
            self.summary.resize(w / 64 + 1, 0);
        }
        if (self.words[w] & bit != 0) == on {
            return;
        }
        self.words[w] ^= bit;
        if on {
            self.len += 1;
            self.summary[w / 64] |= 1 << (w % 64);
        } else {
            self.len -= 1;
            if self.words[w] == 0 {
                self.summary[w / 64] &= !(1 << (w % 64));
            }
        }
    }

    /// The first member at `from` or after.
    fn next(&self, from: usize) -> Option<usize> {
        let w = from / 64;
        let rest = self.words.get(w)? & (!0u64 << (from % 64));
        if rest != 0 {
            return Some(w * 64 + rest.trailing_zeros() as usize);
        }
        // The next word with a member, from the summary.
        let w = w + 1;
        let mut mask = !0u64 << (w % 64);
        for s in w / 64..self.summary.len() {
            let rest = self.summary[s] & mask;
            if rest != 0 {
                let w = s * 64 + rest.trailing_zeros() as usize;
                return Some(w * 64 + self.words[w].trailing_zeros() as usize);
            }
            mask = !0;
        }
        None
    }

    /// The members, in order.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(self.next(0), |&i| self.next(i + 1))
    }
}

/// What one connection adds to the port's [`Counts`].
#[derive(Clone, Copy, Debug, Default)]
struct Part {
    tenant: u16,
    up: bool,
    /// Receives wanted and not posted, when up.
    deficit: u32,
    posted: u32,
    /// Fragments held of the chain being received.
    parts: u32,
    /// A refill would post receives on it: not dead, short of its `want`.
    short: bool,
    /// A chain is being received on it, not dropped as stalled: the look
    /// for stalled chains checks it.
    open: bool,
}

impl Part {
    fn of(c: &Conn) -> Self {
        Self {
            tenant: c.tenant,
            up: c.up,
            deficit: if c.up { c.want.saturating_sub(c.posted) } else { 0 },
            posted: c.posted,
            parts: u32::try_from(c.parts.len()).unwrap_or(u32::MAX),
            short: !c.dead && c.posted < c.want,
            open: c.first.is_some() && !c.stalled,
        }
    }
}

/// Sums and sets over the connections, kept where a connection's `up`,
/// `dead`, `posted`, `parts`, `first` or `stalled` changes (or the
/// connection is dropped), so that the queries drivers make on every turn
/// cost the same however many connections the port has, and
/// [`Port::control`] looks only at the connections that need something.
#[derive(Debug)]
struct Counts {
    /// Per tenant: over its connections that are up, receives wanted
    /// and not posted.
    deficit: Vec<u32>,
    /// Per tenant: receives posted on its connections.
    posted: Vec<u32>,
    /// Per tenant: fragments its connections hold of chains being
    /// received.
    parts: Vec<u32>,
    /// Tenants whose deficit changed since [`Port::next_deficit_change`]
    /// last gave them, each once (`listed`).
    changed: Vec<u16>,
    listed: Vec<bool>,
    /// Connections up.
    up: usize,
    /// Connections a refill would post receives on ([`Part::short`]).
    short: IndexSet,
    /// Connections with a chain open ([`Part::open`]).
    open: IndexSet,
}

impl Counts {
    /// Every tenant is listed as changed at first: a driver's first look
    /// sets what it keeps from scratch.
    fn new(tenants: usize) -> Self {
        Self {
            deficit: vec![0; tenants],
            posted: vec![0; tenants],
            parts: vec![0; tenants],
            changed: (0..tenants as u16).rev().collect(),
            listed: vec![true; tenants],
            up: 0,
            short: IndexSet::default(),
            open: IndexSet::default(),
        }
    }

    /// Connection `i` went from adding `before` to adding `after` (`None`:
    /// no connection there; both, when given, of the same tenant).
    /// (Wrapping: the sums are exact modulo 2^32 whatever the order of
    /// the changes.)
    fn update(&mut self, i: usize, before: Option<Part>, after: Option<Part>) {
        let Some(t) = after.or(before).map(|p| p.tenant) else { return };
        debug_assert!(before.is_none_or(|b| b.tenant == t), "a connection's tenant changed");
        let none = Part { tenant: t, ..Part::default() };
        let (b, a) = (before.unwrap_or(none), after.unwrap_or(none));
        self.up = (self.up + usize::from(a.up)).saturating_sub(usize::from(b.up));
        self.short.set(i, a.short);
        self.open.set(i, a.open);
        let k = usize::from(t);
        let (Some(d), Some(p), Some(f)) = (self.deficit.get_mut(k), self.posted.get_mut(k), self.parts.get_mut(k))
        else {
            return;
        };
        *d = d.wrapping_sub(b.deficit).wrapping_add(a.deficit);
        *p = p.wrapping_sub(b.posted).wrapping_add(a.posted);
        *f = f.wrapping_sub(b.parts).wrapping_add(a.parts);
        if b.deficit != a.deficit && !self.listed[k] {
            self.listed[k] = true;
            self.changed.push(t);
        }
    }

    /// Buffers of tenant `t`'s pool the port holds: receives posted and
    /// fragments of chains being received.
    fn held(&self, t: usize) -> u64 {
        let get = |v: &[u32]| u64::from(v.get(t).copied().unwrap_or(0));
        get(&self.posted) + get(&self.parts)
    }
}

/// Sizes of a port.
#[derive(Clone, Copy, Debug)]
pub struct PortSizes {
    /// Messages in flight at once, all tenants together; one tenant may
    /// have its share (this divided by the number of tenants, at least
    /// one) at most, so that a tenant whose peers take nothing of what it
    /// sends (each can hold a send window and a queue of `queue_high`)
    /// cannot hold the slots the other tenants' messages need. Likewise a
    /// tenant's connection to one peer may have the tenant's share divided
    /// by the number of peers (at least one) at most, so that its stalled
    /// peers cannot hold the slots its messages to the others need (with
    /// fewer slots in a share than peers, they can).
    pub flights: usize,
    /// Fabric sends of one connection queued in the endpoint before
    /// [`Port::can_send`] says no.
    pub queue_high: usize,
    /// A chain being received that gets no fragment for this long is
    /// dropped ([`CHAIN_STALL`])...
    pub chain_stall: Duration,
    /// ...or for this long when it waits for this port's receives while
    /// the pool's buffers are elsewhere ([`CHAIN_WAIT`]).
    pub chain_wait: Duration,
}

impl PortSizes {
    /// `flights` and `queue_high`, the chain timeouts [`CHAIN_STALL`] and
    /// [`CHAIN_WAIT`].
    pub fn new(flights: usize, queue_high: usize) -> Self {
        Self { flights, queue_high, chain_stall: CHAIN_STALL, chain_wait: CHAIN_WAIT }
    }
}

/// Per-tenant settings.
#[derive(Debug)]
pub struct PortTenant<B> {
    /// The tenant's id in the cluster (what connections and descriptors
    /// carry); the port's own index of the tenant is its position.
    pub id: u16,
    /// Where its buffers come from.
    pub bufs: B,
    /// Receives each of its connections keeps posted.
    pub per_conn: u32,
}

/// The data path of a fabric node (see the module docs).
#[derive(Debug)]
pub struct Port<T: Transport, B: Buffers> {
    ep: Endpoint<T>,
    mesh: Mesh,
    /// Cluster tenant id of each of the port's tenants.
    ids: Vec<u16>,
    /// The port's index of each cluster tenant id (`u16::MAX`: not its).
    index: Vec<u16>,
    bufs: Vec<B>,
    regions: Vec<RegionId>,
    per_conn: Vec<u32>,
    conns: Vec<Option<Conn>>,
    /// The connection of (peer, tenant) at `peer * tenants + tenant`, as
    /// the mesh opened it (a dense copy of [`Mesh::conn`], which the data
    /// path asks several times per message).
    routes: Vec<Option<ConnId>>,
    flights: Table<Flight>,
    /// Flights of each tenant, and the most one tenant may have
    /// ([`PortSizes::flights`]).
    tenant_flights: Vec<u32>,
    flight_share: u32,
    /// Flights of each tenant to each peer, indexed like `routes` (those
    /// of a connection that failed count until they complete, against the
    /// connection that replaces it), and the most one may have.
    route_flights: Vec<u32>,
    route_share: u32,
    posted: Table<Posted>,
    /// Sums and sets over `conns`.
    counts: Counts,
    sizes: PortSizes,
    comps: Vec<Completion>,
    events: Vec<MeshEvent>,
    /// The fragments (offset, payload length) of the message being sent.
    stage: Vec<(u64, u32)>,
    /// (Tenant, peer) of the connections that were up and failed since
    /// the last [`Port::control`], which reports them
    /// ([`PortEvent::Down`]). Its capacity is kept at least the number of
    /// connection slots, so a failure never makes it grow: a slot's
    /// connection fails once, and a slot gets a new connection only in
    /// `control`, which empties the list.
    failed: Vec<(u16, u16)>,
    /// When [`Port::drop_stalled_chains`] last looked.
    looked: Option<Instant>,
    /// Connections the per-tenant receive queries, [`Port::conns_up`] and
    /// [`Port::control`] looked at (what tests measure their cost by).
    #[cfg(test)]
    conns_looked: std::cell::Cell<usize>,
    /// Look at every connection in `control`, as before the port kept
    /// `counts.short` and `counts.open` (the reference tests hold the
    /// kept sets to).
    #[cfg(test)]
    by_scan: bool,
}

/// Setting a port up failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Registering a pool failed.
    #[error("registering the pool of tenant {0}: {1}")]
    Register(u16, crate::RegionRegisterError),
    /// Mapping a pool for the fabric failed.
    #[error("mapping the pool of tenant {0}: {1}")]
    Map(u16, String),
    /// The mesh could not start (its listen address is taken, say).
    #[error("fabric control listener: {0}")]
    Mesh(std::io::Error),
}

impl<T: Transport, B: Buffers> Port<T, B> {
    /// Registers every tenant pool with `ep` (a mapping of its own) and
    /// starts the mesh; `mesh.tenants` must be the tenants' ids. Methods
    /// name a tenant by its index in `tenants`.
    pub fn new(
        ep: Endpoint<T>,
        mesh: MeshConfig,
        tenants: Vec<PortTenant<B>>,
        sizes: PortSizes,
    ) -> Result<Self, PortError> {
        let npeers = mesh.peers.len();
        let mesh = Mesh::start(mesh).map_err(PortError::Mesh)?;
        Self::with_mesh(ep, mesh, npeers, tenants, sizes)
    }

    /// Like [`new`](Self::new) over a started mesh half (one of
    /// [`Mesh::start_shards`]) whose tenants are `tenants`' ids, with
    /// `npeers` peers.
    pub fn with_mesh(
        mut ep: Endpoint<T>,
        mesh: Mesh,
        npeers: usize,
        tenants: Vec<PortTenant<B>>,
        sizes: PortSizes,
    ) -> Result<Self, PortError> {
        let mut regions = Vec::with_capacity(tenants.len());
        let mut bufs = Vec::with_capacity(tenants.len());
        let mut per_conn = Vec::with_capacity(tenants.len());
        let ids: Vec<u16> = tenants.iter().map(|pt| pt.id).collect();
        let mut index = vec![u16::MAX; ids.iter().map(|&i| usize::from(i) + 1).max().unwrap_or(0)];
        for (k, &id) in (0u16..).zip(&ids) {
            index[usize::from(id)] = k;
        }
        let npeers = npeers.max(1);
        for pt in tenants {
            let t = pt.id;
            let mem = match pt.bufs.view() {
                PoolView::Local(pool) => {
                    let fd = pool.region().fd().try_clone_to_owned().map_err(|e| PortError::Map(t, e.to_string()))?;
                    let region = shm::Region::open(fd).map_err(|e| PortError::Map(t, e.to_string()))?;
                    ep.register(Memory::Local(Arc::new(region)))
                }
                PoolView::Imported(pool) => ep.register(Memory::Export(pool.blob())),
            };
            regions.push(mem.map_err(|e| PortError::Register(t, e))?);
            per_conn.push(pt.per_conn);
            bufs.push(pt.bufs);
        }
        let recvs: usize = per_conn.iter().map(|&p| (p as usize + 1) * npeers * 2).sum();
        let flight_share = u32::try_from(sizes.flights / bufs.len().max(1)).unwrap_or(u32::MAX).max(1);
        let route_share = (flight_share / u32::try_from(npeers).unwrap_or(u32::MAX)).max(1);
        let counts = Counts::new(bufs.len());
        Ok(Self {
            tenant_flights: vec![0; bufs.len()],
            flight_share,
            route_flights: Vec::new(),
            route_share,
            ep,
            mesh,
            ids,
            index,
            bufs,
            regions,
            routes: Vec::new(),
            per_conn,
            conns: Vec::new(),
            flights: Table::new(sizes.flights),
            posted: Table::new(recvs),
            counts,
            sizes,
            comps: vec![Completion::EMPTY; 64],
            events: Vec::with_capacity(16),
            stage: Vec::with_capacity(64),
            failed: Vec::new(),
            looked: None,
            #[cfg(test)]
            conns_looked: std::cell::Cell::new(0),
            #[cfg(test)]
            by_scan: false,
        })
    }

    /// The cluster tenant id of the port's tenant `t`.
    pub fn tenant_id(&self, t: u16) -> u16 {
        self.ids[usize::from(t)]
    }

    /// The buffers of tenant `t`.
    pub fn bufs(&self, t: u16) -> &B {
        &self.bufs[usize::from(t)]
    }

    /// The buffers of tenant `t`, mutably.
    pub fn bufs_mut(&mut self, t: u16) -> &mut B {
        &mut self.bufs[usize::from(t)]
    }

    /// The transport's notification fd (see
    /// [`Transport::notification_fd`]); `None`: nap instead of sleeping.
    pub fn notification_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.ep.transport().notification_fd()
    }

    /// Clears the transport's notification; poll once more before
    /// sleeping on [`notification_fd`](Self::notification_fd).
    pub fn clear_notification(&mut self) {
        self.ep.transport_mut().clear_notification();
    }

    /// Messages sent whose completion has not been reported yet.
    pub fn in_flight(&self) -> usize {
        self.flights.items.len() - self.flights.free.len()
    }

    /// Peers whose control link is up.
    pub fn peers_up(&self) -> u32 {
        self.mesh.peers_up()
    }

    /// Tenant connections that are up.
    /// (Kept as connections change: costs the same however many there are.)
    pub fn conns_up(&self) -> usize {
        self.counts.up
    }

    fn route(&mut self, peer: u16) -> &mut [Option<ConnId>] {
        let n = self.bufs.len();
        let i = usize::from(peer) * n;
        if self.routes.len() < i + n {
            self.routes.resize(i + n, None);
            self.route_flights.resize(i + n, 0);
        }
        &mut self.routes[i..i + n]
    }

    /// Index of tenant `t`'s route to `peer` in `routes` and
    /// `route_flights`.
    #[inline]
    fn route_index(&self, t: u16, peer: u16) -> usize {
        usize::from(peer) * self.bufs.len() + usize::from(t)
    }

    /// The mesh's connection of tenant `t` to `peer`, up or not. A tenant
    /// index past the port's names none (its route index would fall on the
    /// next peer's connections).
    fn mesh_conn(&self, t: u16, peer: u16) -> Option<ConnId> {
        if usize::from(t) >= self.bufs.len() {
            return None;
        }
        *self.routes.get(self.route_index(t, peer))?
    }

    fn conn(&self, t: u16, peer: u16) -> Option<ConnId> {
        let c = self.mesh_conn(t, peer)?;
        debug_assert_eq!(self.mesh.conn(peer, self.ids[usize::from(t)]), Some(c));
        self.conns.get(c.index() as usize)?.as_ref().filter(|s| s.up).map(|_| c)
    }

    /// Whether tenant `t`'s connection to `peer` is up.
    pub fn is_up(&self, t: u16, peer: u16) -> bool {
        self.conn(t, peer).is_some()
    }

    /// Fails tenant `t`'s connection to `peer` on purpose, through the
    /// backend ([`Transport::abort`]): its outstanding work completes with
    /// errors, the peer sees the connection go, and this port learns of
    /// the failure in a later [`poll`](Self::poll), as of any other (a
    /// [`PortEvent::Down`] at the next [`control`](Self::control) if it
    /// was up; the mesh resets the link). For fault injection in tests of
    /// what sits above the port. `false`: the mesh has no connection of
    /// `t` to `peer` (or the port has no tenant `t`).
    pub fn abort(&mut self, t: u16, peer: u16) -> bool {
        let Some(c) = self.mesh_conn(t, peer) else { return false };
        self.ep.transport_mut().abort(c);
        true
    }

    /// Whether tenant `t`'s connection to any of `nodes` is up.
    pub fn any_up(&self, t: u16, nodes: &[u16]) -> bool {
        nodes.iter().any(|&n| self.is_up(t, n))
    }

    /// The first of `nodes`, in turn from `*next` on, whose connection for
    /// tenant `t` is up; `*next` moves past it (round robin over a
    /// function's nodes). `None`: none of them is up.
    pub fn next_up(&self, t: u16, nodes: &[u16], next: &mut usize) -> Option<u16> {
        next_where(nodes, next, |n| self.is_up(t, n))
    }

    /// Like [`next_up`](Self::next_up), for the first node a message of
    /// tenant `t` may be posted to now ([`can_send`](Self::can_send)):
    /// binding a message to a node only when it can go keeps a node that
    /// stopped granting credits from holding more than it already took.
    pub fn next_can_send(&self, t: u16, nodes: &[u16], next: &mut usize) -> Option<u16> {
        next_where(nodes, next, |n| self.can_send(t, n))
    }

    /// Bytes of sends (fragments, headers included) waiting at this port
    /// for credits or window, every connection together: posted, not on
    /// the wire yet.
    pub fn queued_bytes(&self) -> u64 {
        self.ep.queued_bytes()
    }

    /// Sends the peer currently allows tenant `t` (0 when down).
    pub fn credits(&self, t: u16, peer: u16) -> u32 {
        self.conn(t, peer).map_or(0, |c| self.ep.credits(c))
    }

    /// Receives tenant `t`'s connections that are up still want posted
    /// (for lack of buffers, or between a completion and its refill).
    /// (Kept as connections change: costs the same however many there are.)
    pub fn recv_deficit(&self, t: u16) -> u32 {
        self.counts.deficit.get(usize::from(t)).copied().unwrap_or(0)
    }

    /// Receives posted for tenant `t` now.
    pub fn recvs_posted(&self, t: u16) -> u32 {
        self.counts.posted.get(usize::from(t)).copied().unwrap_or(0)
    }

    /// A tenant whose [`recv_deficit`](Self::recv_deficit) changed since
    /// this last gave it (every tenant once at first); `None`: no other.
    /// A driver that keeps each tenant's deficit can update only these
    /// instead of asking for every tenant's on every turn.
    pub fn next_deficit_change(&mut self) -> Option<u16> {
        let t = self.counts.changed.pop()?;
        self.counts.listed[usize::from(t)] = false;
        Some(t)
    }

    /// Whether a message of tenant `t` to `peer` may be posted now: the
    /// connection is up, the peer granted credits, the endpoint's queue is
    /// short and a flight slot of the tenant's share, and of its
    /// connection's, is free.
    pub fn can_send(&self, t: u16, peer: u16) -> bool {
        self.conn(t, peer).is_some_and(|c| {
            self.has_flight(t, peer) && self.ep.queued(c) < self.sizes.queue_high && self.ep.credits(c) > 0
        })
    }

    /// Whether tenant `t` may have one more message in flight, to `peer`
    /// (its share of the flight slots and its connection's, see
    /// [`PortSizes::flights`]).
    #[inline]
    fn has_flight(&self, t: u16, peer: u16) -> bool {
        !self.flights.free.is_empty()
            && self.tenant_flights.get(usize::from(t)).is_some_and(|&n| n < self.flight_share)
            && self.route_flights.get(self.route_index(t, peer)).is_some_and(|&n| n < self.route_share)
    }

    /// Sends a message (a chain of tenant `t`'s pool held by the caller)
    /// to `peer`: writes the fabric header into each buffer's headroom
    /// (an imported pool's exporter wrote them) and posts one send per
    /// buffer. The message comes back in a
    /// [`PortEvent::Sent`] with `tag`; on an immediate failure it comes
    /// back here.
    #[allow(clippy::result_large_err)]
    pub fn send(
        &mut self,
        t: u16,
        peer: u16,
        lease: Lease,
        desc: Descriptor,
        tag: u64,
    ) -> Result<(), (Lease, Descriptor, CompletionError)> {
        let Some(conn) = self.conn(t, peer) else { return Err((lease, desc, CompletionError::PeerGone)) };
        let view = self.bufs[usize::from(t)].view();
        let cap = view.geometry().payload_cap();
        let count = u16::try_from(lease.frags()).unwrap_or(u16::MAX);
        // Every fragment is found and stamped before any is posted: the
        // links of a local pool's chain are in memory the tenant's
        // processes can write, and a chain cut short there would go out
        // without its last fragment (the peer's next message on the
        // connection would then fail it, for every tenant of the link).
        self.stage.clear();
        // (An inclusive range: an open one would step past u16::MAX after
        // a chain of 65535, the most a pool allows.)
        for (k, idx) in (0..=u16::MAX).zip(view.frags(&lease)) {
            let flen = wire::desc::frag_len(lease.len(), cap, u32::from(k));
            let stamped = match view {
                PoolView::Local(pool) => {
                    let h = FabricHeader::new(MsgKind::Data, desc, k, count, flen);
                    pool.buf_offset(idx).filter(|o| pool.region().copy_in(o + HDR_OFF, h.as_bytes()).is_ok())
                }
                PoolView::Imported(pool) => pool.buf_offset(idx),
            };
            let Some(off) = stamped else { break };
            self.stage.push((off, flen));
        }
        if self.stage.len() != usize::from(count) || u32::from(count) != lease.frags() {
            return Err((lease, desc, CompletionError::BadChain));
        }
        if !self.has_flight(t, peer) {
            return Err((lease, desc, CompletionError::Transport(-1)));
        }
        let Ok(token) = self.flights.insert(Flight { tenant: t, peer, msg: None, tag, left: 0, error: None }) else {
            return Err((lease, desc, CompletionError::Transport(-1)));
        };
        let route = self.route_index(t, peer);
        self.tenant_flights[usize::from(t)] += 1;
        self.route_flights[route] += 1;
        let region = self.regions[usize::from(t)];
        let mut posted = 0;
        let mut error = None;
        for (k, &(off, flen)) in (0..=u16::MAX).zip(&self.stage) {
            let imm = Immediate::new(MsgKind::Data as u8, desc.dst_fn, k == 0, k + 1 == count).0;
            let wr =
                SendWr { region, offset: off + HDR_OFF, len: HEADER_LEN as u32 + flen, imm, token: u64::from(token) };
            match self.ep.post_send(conn, wr) {
                Ok(()) => posted += 1,
                Err(e) => {
                    log::debug!("fabric port: a send to node {peer} was refused: {e}");
                    error = Some(CompletionError::Closed);
                    break;
                }
            }
        }
        if posted == 0 {
            self.flights.remove(u64::from(token));
            self.tenant_flights[usize::from(t)] -= 1;
            self.route_flights[route] -= 1;
            return Err((lease, desc, error.unwrap_or(CompletionError::Closed)));
        }
        if let Some(f) = self.flights.get_mut(u64::from(token)) {
            f.msg = Some((lease, desc));
            f.left = posted;
            f.error = error;
        }
        Ok(())
    }

    /// Setup work (every millisecond or so): runs the mesh, drops stalled
    /// chains, posts receives that are missing. Appends what changed to
    /// `out`. Besides what the mesh reports, it looks only at connections
    /// short of receives and at those receiving a chain.
    pub fn control(&mut self, out: &mut Vec<PortEvent>) {
        self.control_at(Instant::now(), out);
    }

    /// [`control`](Self::control) at `now`.
    fn control_at(&mut self, now: Instant, out: &mut Vec<PortEvent>) {
        let mut events = std::mem::take(&mut self.events);
        self.mesh.pump(&mut self.ep, &mut events);
        for e in events.drain(..) {
            match e {
                MeshEvent::Opened { peer, tenant: id, conn } => {
                    let Some(&tenant) = self.index.get(usize::from(id)).filter(|&&t| t != u16::MAX) else {
                        continue;
                    };
                    if let Some(r) = self.route(peer).get_mut(usize::from(tenant)) {
                        *r = Some(conn);
                    }
                    let i = conn.index() as usize;
                    if self.conns.len() <= i {
                        self.conns.resize_with(i + 1, || None);
                        self.failed.reserve(self.conns.len().saturating_sub(self.failed.len()));
                    }
                    let want = self.per_conn.get(usize::from(tenant)).copied().unwrap_or(1);
                    // A connection that failed mid-message may have kept the
                    // first fragments of a chain that never completed.
                    if let Some(old) = self.conns[i].take() {
                        self.counts.update(i, Some(Part::of(&old)), None);
                        for l in old.parts {
                            self.bufs[usize::from(old.tenant)].free(l);
                        }
                    }
                    // Room for a chain of 64 fragments, or the endpoint's
                    // share per connection when it has many (the rest when a
                    // longer chain comes).
                    let parts = Vec::with_capacity(self.ep.conn_reserve_entries().min(64));
                    let conn = Conn {
                        peer,
                        tenant,
                        up: false,
                        parts,
                        first: None,
                        got: 0,
                        bad: false,
                        stalled: false,
                        frags: 0,
                        seen: (0, None),
                        starved: false,
                        dead: false,
                        posted: 0,
                        want,
                    };
                    self.counts.update(i, None, Some(Part::of(&conn)));
                    self.conns[i] = Some(conn);
                }
                MeshEvent::PeerDown { peer, conns } => {
                    self.route(peer).fill(None);
                    for c in conns {
                        let i = c.index() as usize;
                        if let Some(Some(st)) = self.conns.get_mut(i) {
                            let before = Part::of(st);
                            (st.up, st.dead) = (false, true);
                            // The rest of a chain open now may still be
                            // completed (what the backend had before the
                            // close): freed as it comes, like a stalled one's.
                            st.stalled |= st.first.take().is_some();
                            let t = usize::from(st.tenant);
                            for l in st.parts.drain(..) {
                                self.bufs[t].free(l);
                            }
                            self.counts.update(i, Some(before), Some(Part::of(st)));
                        }
                    }
                    out.push(PortEvent::PeerDown { peer });
                }
            }
        }
        self.events = events;
        // After the mesh's events: a connection closed with its link is
        // in its PeerDown, before.
        for (tenant, peer) in self.failed.drain(..) {
            out.push(PortEvent::Down { tenant, peer });
        }
        self.drop_stalled_chains(now, out);
        #[cfg(test)]
        if self.by_scan {
            self.looked_at(self.conns.len());
            for i in 0..self.conns.len() {
                self.refill(ConnId::new(i as u32), out);
            }
            return;
        }
        // In the order of the connections' indices, as a look at each
        // would (which connection gets the last buffers of a pool).
        let mut next = self.counts.short.next(0);
        while let Some(i) = next {
            // A refill changes whether `i` is short, no other connection.
            next = self.counts.short.next(i + 1);
            self.looked_at(1);
            self.refill(ConnId::new(i as u32), out);
        }
    }

    /// Drops the chains being received that got no fragment for
    /// `chain_stall` while their sender had credits or this port held the
    /// whole pool, or for `chain_wait` in any case (see [`CHAIN_STALL`],
    /// [`CHAIN_WAIT`]); the refill that follows posts their buffers again.
    fn drop_stalled_chains(&mut self, now: Instant, out: &mut Vec<PortEvent>) {
        #[cfg(test)]
        if self.by_scan {
            return self.drop_stalled_chains_by_scan(now, out);
        }
        let paused = self.looked.is_some_and(|t| now.saturating_duration_since(t) > LOOK_GAP);
        self.looked = Some(now);
        // Only connections with a chain open (a chain's count starts at
        // the first look after its first fragment: see `received`), in
        // the order of their indices, as a look at each would (a drop
        // frees buffers of the tenant, which the next may count as held).
        let mut next = self.counts.open.next(0);
        while let Some(i) = next {
            // A drop changes whether `i` is open, no other connection.
            next = self.counts.open.next(i + 1);
            self.looked_at(1);
            let Some(Some(st)) = self.conns.get_mut(i) else { continue };
            if paused {
                st.seen.1 = None;
                continue;
            }
            let since = match st.seen {
                (n, Some(since)) if n == st.frags => since,
                _ => {
                    st.seen = (st.frags, Some(now));
                    continue;
                }
            };
            let t = usize::from(st.tenant);
            // One receive is kept for credit messages: with no other
            // posted, the sender waits for this port.
            let waits_for_us = st.posted <= 1;
            // Buffers this port holds (chains' fragments, posted
            // receives): a pool only the port can free.
            let all_here = self.counts.held(t) >= u64::from(self.bufs[t].view().geometry().buf_count());
            let limit = if waits_for_us && !all_here { self.sizes.chain_wait } else { self.sizes.chain_stall };
            if now.saturating_duration_since(since) < limit {
                continue;
            }
            log::warn!(
                "fabric: a chain from node {} got no fragment for {limit:?} ({} held, {}); dropped",
                st.peer,
                st.parts.len(),
                match (waits_for_us, all_here) {
                    (false, _) => "its sender had credits",
                    (true, true) => "waiting for receives, every buffer of the pool held by the fabric",
                    (true, false) => "waiting for receives",
                }
            );
            let before = Part::of(st);
            for l in st.parts.drain(..) {
                self.bufs[t].free(l);
            }
            (st.stalled, st.seen.1) = (true, None);
            out.push(PortEvent::ChainStalled { tenant: st.tenant, peer: st.peer });
            self.counts.update(i, Some(before), Some(Part::of(st)));
        }
    }

    /// Counts `n` connections looked at (tests only).
    #[inline]
    fn looked_at(&self, n: usize) {
        #[cfg(test)]
        self.conns_looked.set(self.conns_looked.get() + n);
        #[cfg(not(test))]
        let _ = n;
    }

    fn refill(&mut self, conn: ConnId, out: &mut Vec<PortEvent>) {
        let i = conn.index() as usize;
        let Some(Some(st)) = self.conns.get_mut(i) else { return };
        if st.dead {
            return;
        }
        let t = usize::from(st.tenant);
        while st.posted < st.want {
            let Some(lease) = self.bufs[t].alloc_one() else {
                // Said once per time the connection runs short, not on
                // every refill until buffers come back.
                if !st.starved {
                    st.starved = true;
                    out.push(PortEvent::NoBuffer { tenant: st.tenant });
                }
                return;
            };
            st.starved = false;
            let view = self.bufs[t].view();
            let len = view.geometry().buf_size() - HDR_OFF as u32;
            let Some(off) = view.buf_offset(lease.head()) else {
                self.bufs[t].free(lease);
                return;
            };
            let token = match self.posted.insert(Posted { tenant: st.tenant, lease }) {
                Ok(token) => token,
                Err(p) => {
                    // Full (receives of connections gone but not yet flushed):
                    // the buffer goes back, and the refill is tried again later.
                    self.bufs[t].free(p.lease);
                    return;
                }
            };
            let wr =
                RecvWr { region: self.regions[t], offset: off + HDR_OFF, len, token: RECV_TOKEN | u64::from(token) };
            if let Err(e) = self.ep.post_recv(conn, wr) {
                log::debug!("fabric port: posting a receive on {conn:?}: {e}");
                if let Some(p) = self.posted.remove(u64::from(token)) {
                    self.bufs[t].free(p.lease);
                }
                return;
            }
            let before = Part::of(st);
            st.posted += 1;
            self.counts.update(i, Some(before), Some(Part::of(st)));
        }
    }

    /// Polls the fabric once; appends what happened to `out`; returns how
    /// many completions were handled.
    pub fn poll(&mut self, out: &mut Vec<PortEvent>) -> usize {
        let mut comps = std::mem::take(&mut self.comps);
        let n = self.ep.poll(&mut comps);
        for c in &comps[..n] {
            match *c {
                Completion::Connected(conn) => {
                    let i = conn.index() as usize;
                    if let Some(Some(st)) = self.conns.get_mut(i) {
                        let before = Part::of(st);
                        st.up = true;
                        self.counts.update(i, Some(before), Some(Part::of(st)));
                        out.push(PortEvent::Up { tenant: st.tenant, peer: st.peer });
                    }
                }
                Completion::ConnFailed { conn, error } => {
                    let i = conn.index() as usize;
                    if let Some(Some(st)) = self.conns.get_mut(i) {
                        let before = Part::of(st);
                        (st.up, st.dead) = (false, true);
                        self.counts.update(i, Some(before), Some(Part::of(st)));
                        if before.up {
                            // Within the capacity kept (see `failed`).
                            self.failed.push((st.tenant, st.peer));
                        }
                        if matches!(error, CompletionError::Protocol(_)) {
                            out.push(PortEvent::Protocol { tenant: st.tenant, peer: st.peer });
                        }
                        if error == CompletionError::Closed {
                            // A close of this side: the mesh's, or `Port::abort`.
                            log::debug!("fabric: a connection to node {} closed", st.peer);
                        } else {
                            log::warn!("fabric: a connection to node {} failed: {error}", st.peer);
                        }
                        self.mesh.peer_failed(st.peer, conn);
                    }
                }
                Completion::Sent { token, result, .. } => self.sent(token, result, out),
                Completion::Received { conn, token, result } => self.received(conn, token, result, out),
            }
        }
        self.comps = comps;
        n
    }

    fn sent(&mut self, token: u64, result: Result<(), CompletionError>, out: &mut Vec<PortEvent>) {
        let Some(f) = self.flights.get_mut(token) else { return };
        if let Err(e) = result {
            f.error.get_or_insert(e);
        }
        f.left = f.left.saturating_sub(1);
        if f.left > 0 {
            return;
        }
        let Some(f) = self.flights.remove(token) else { return };
        if let Some(n) = self.tenant_flights.get_mut(usize::from(f.tenant)) {
            *n = n.saturating_sub(1);
        }
        let route = self.route_index(f.tenant, f.peer);
        if let Some(n) = self.route_flights.get_mut(route) {
            *n = n.saturating_sub(1);
        }
        if let Some((lease, desc)) = f.msg {
            let result = f.error.map_or(Ok(()), Err);
            out.push(PortEvent::Sent { tenant: f.tenant, peer: f.peer, lease, desc, tag: f.tag, result });
        }
    }

    fn received(
        &mut self,
        conn: ConnId,
        token: u64,
        result: Result<crate::Received, CompletionError>,
        out: &mut Vec<PortEvent>,
    ) {
        let Some(p) = self.posted.remove(token & !RECV_TOKEN) else { return };
        let t = usize::from(p.tenant);
        let i = conn.index() as usize;
        let ok = match self.conns.get_mut(i) {
            Some(Some(st)) => {
                let before = Part::of(st);
                st.posted = st.posted.saturating_sub(1);
                self.counts.update(i, Some(before), Some(Part::of(st)));
                result.ok()
            }
            _ => None,
        };
        // The endpoint checked the header against the immediate and the
        // chain order; read the descriptor it carries. An imported pool's
        // header is not ours to read: the descriptor says what the
        // completions told (destination, length), and the exporter
        // completes it from the header.
        let header = ok.and_then(|r| match self.bufs[t].view() {
            PoolView::Local(pool) => {
                let mut hdr = [0u8; HEADER_LEN];
                let off = pool.buf_offset(p.lease.head())?;
                pool.region().copy_out(off + HDR_OFF, &mut hdr).ok()?;
                FabricHeader::read_from_bytes(&hdr).ok().map(|h| (r, Some(h.desc)))
            }
            PoolView::Imported(_) => Some((r, None)),
        });
        let Some((r, read)) = header else {
            self.bufs[t].free(p.lease);
            return;
        };
        let Some(Some(st)) = self.conns.get_mut(i) else {
            self.bufs[t].free(p.lease);
            return;
        };
        let before = Part::of(st);
        if r.frag.index == 0 {
            let told = || Descriptor { dst_fn: Immediate(r.imm).dst_fn(), ..Descriptor::default() };
            st.first = Some(read.unwrap_or_else(told));
            (st.got, st.bad, st.stalled) = (0, false, false);
            // Its count of time without a fragment starts at the next look
            // for stalled chains.
            st.seen.1 = None;
        }
        st.frags = st.frags.wrapping_add(1);
        let payload = r.len.saturating_sub(HEADER_LEN as u32);
        if read.is_none()
            && let Some(d) = st.first.as_mut()
        {
            d.len = d.len.saturating_add(payload);
        }
        // A sender splits a message so that every fragment but the last
        // fills its buffer (`wire::desc::frag_len`), in at most the
        // tenant's `max_chain` fragments, all of kind data. Anything else
        // would be delivered with bytes the peer did not send (what the
        // receive buffer held before: an earlier message of the tenant),
        // or hold the tenant's receive buffers for a chain no pool takes.
        let g = self.bufs[t].view().geometry();
        st.got = st.got.saturating_add(payload);
        st.bad |= payload > g.payload_cap()
            || (!r.frag.last && payload != g.payload_cap())
            || st.parts.len() >= g.max_chain() as usize
            || Immediate(r.imm).kind() != Some(MsgKind::Data);
        if st.bad || st.stalled {
            self.bufs[t].free(p.lease);
        } else {
            st.parts.push(p.lease);
        }
        let (peer, tenant) = (st.peer, st.tenant);
        if r.frag.last && st.stalled {
            // Dropped (and told) when it stalled.
            (st.first, st.stalled) = (None, false);
        } else if r.frag.last {
            let first = st.first.take().filter(|d| !st.bad && d.len == st.got);
            let mut parts = std::mem::take(&mut st.parts);
            // Why a local pool did not link the parts, when not the length.
            let mut unlinked = None;
            let joined = first.and_then(|d| {
                let lease = match self.bufs[t].view() {
                    PoolView::Local(pool) => match pool.join(&mut parts, d.len) {
                        Ok(lease) => Some(lease),
                        Err(shm::JoinError::Len(_)) => None,
                        Err(e) => {
                            unlinked = Some(e);
                            None
                        }
                    },
                    PoolView::Imported(pool) => pool.join(&mut parts, d.len),
                };
                Some((lease?, d))
            });
            match joined {
                Some((lease, d)) => {
                    let id = self.ids[usize::from(tenant)];
                    out.push(PortEvent::Received { tenant, peer, lease, desc: Descriptor { tenant: id, ..d } })
                }
                _ => {
                    match unlinked {
                        // The tenant's buffer source gave receive buffers
                        // the pool does not link (a bug here, not the peer's).
                        Some(e) => log::error!("fabric: a chain from node {peer}: its receive buffers: {e}; dropped"),
                        None => log::warn!("fabric: a chain from node {peer} does not add up; dropped"),
                    }
                    out.push(PortEvent::Protocol { tenant, peer });
                    for l in parts.drain(..) {
                        self.bufs[t].free(l);
                    }
                }
            }
            if let Some(Some(st)) = self.conns.get_mut(i) {
                st.parts = parts;
            }
        }
        if let Some(Some(st)) = self.conns.get(i) {
            self.counts.update(i, Some(before), Some(Part::of(st)));
        }
        self.refill(conn, out);
    }
}

/// The first of `nodes`, in turn from `*next` on, that passes `ok`; `*next`
/// moves past it.
fn next_where(nodes: &[u16], next: &mut usize, ok: impl Fn(u16) -> bool) -> Option<u16> {
    let k = nodes.len();
    let i = (0..k).map(|j| (*next + j) % k).find(|&i| ok(nodes[i]))?;
    *next = (i + 1) % k;
    Some(nodes[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Cmd, Note};
    use crate::{EndpointConfig, NullTransport};
    use shm::Pool;
    use wire::Owner;

    impl<T: Transport, B: Buffers> Port<T, B> {
        /// [`Port::drop_stalled_chains`] as it was before the port kept
        /// the connections with a chain open: a look at every connection
        /// (and a sum over them of the buffers held). It keeps the counts
        /// up to date, for its drops to be seen by the refills that follow.
        pub(super) fn drop_stalled_chains_by_scan(&mut self, now: Instant, out: &mut Vec<PortEvent>) {
            let paused = self.looked.is_some_and(|t| now.saturating_duration_since(t) > LOOK_GAP);
            self.looked = Some(now);
            let mut held = vec![0u64; self.bufs.len()];
            self.looked_at(2 * self.conns.len());
            for st in self.conns.iter().flatten() {
                held[usize::from(st.tenant)] += st.parts.len() as u64 + u64::from(st.posted);
            }
            for i in 0..self.conns.len() {
                let Some(st) = self.conns[i].as_mut() else { continue };
                if st.first.is_none() || st.stalled || paused {
                    st.seen.1 = None;
                    continue;
                }
                let since = match st.seen {
                    (n, Some(since)) if n == st.frags => since,
                    _ => {
                        st.seen = (st.frags, Some(now));
                        continue;
                    }
                };
                let t = usize::from(st.tenant);
                let waits_for_us = st.posted <= 1;
                let all_here = held[t] >= u64::from(self.bufs[t].view().geometry().buf_count());
                let limit = if waits_for_us && !all_here { self.sizes.chain_wait } else { self.sizes.chain_stall };
                if now.saturating_duration_since(since) < limit {
                    continue;
                }
                let before = Part::of(st);
                held[t] -= st.parts.len() as u64;
                for l in st.parts.drain(..) {
                    self.bufs[t].free(l);
                }
                (st.stalled, st.seen.1) = (true, None);
                out.push(PortEvent::ChainStalled { tenant: st.tenant, peer: st.peer });
                self.counts.update(i, Some(before), Some(Part::of(st)));
            }
        }
    }

    /// A tenant pool, and how many buffers `alloc_one` was asked for
    /// (receives posted or tried).
    struct PoolBufs(Pool, u64);

    impl Buffers for PoolBufs {
        fn view(&self) -> PoolView<'_> {
            PoolView::Local(&self.0)
        }
        fn alloc_one(&mut self) -> Option<Lease> {
            self.1 += 1;
            self.0.alloc(self.0.geometry().payload_cap(), Owner::Held(1)).ok()
        }
        fn free(&mut self, lease: Lease) {
            self.0.free(lease).unwrap();
        }
    }

    /// The null fabric, keeping what the tests look at: the immediates of
    /// the data sends posted, and (`hold`) the receives posted, for a test
    /// to land a peer's messages in (`land`) instead of the null fabric's
    /// loopback (which also carries the credits). Data sends on a
    /// connection of `stall` never complete (a peer that takes nothing of
    /// what it granted).
    #[derive(Debug, Default)]
    struct Wire {
        hold: bool,
        stall: Vec<ConnId>,
        null: NullTransport,
        sent: Vec<u32>,
        recvs: std::collections::VecDeque<(ConnId, u64, u64)>,
        landed: std::collections::VecDeque<crate::RawCompletion>,
    }

    impl Transport for Wire {
        fn name(&self) -> &'static str {
            "wire"
        }
        fn register(&mut self, id: RegionId, mem: crate::Memory<'_>) -> Result<(), crate::RegionRegisterError> {
            self.null.register(id, mem)
        }
        fn region_len(&self, id: RegionId) -> Option<u64> {
            self.null.region_len(id)
        }
        fn open(&mut self, id: ConnId, depth: crate::ConnDepth) -> Result<Vec<u8>, crate::ConnSetupError> {
            self.null.open(id, depth)
        }
        fn connect(&mut self, id: ConnId, blob: &[u8]) -> Result<(), crate::ConnSetupError> {
            self.null.connect(id, blob)
        }
        fn send(
            &mut self,
            conn: ConnId,
            src: Option<(RegionId, u64, u32)>,
            imm: Option<u32>,
            user_data: u64,
        ) -> Result<(), crate::RawPostError> {
            if src.is_some() {
                self.sent.push(imm.unwrap_or(0));
                if self.stall.contains(&conn) {
                    return Ok(());
                }
            }
            self.null.send(conn, src, imm, user_data)
        }
        fn recv(&mut self, conn: ConnId, dst: (RegionId, u64, u32), user_data: u64) -> Result<(), crate::RawPostError> {
            if !self.hold {
                return self.null.recv(conn, dst, user_data);
            }
            self.recvs.push_back((conn, dst.1, user_data));
            Ok(())
        }
        fn poll(&mut self, out: &mut [crate::RawCompletion]) -> usize {
            let mut n = self.null.poll(out);
            while n < out.len()
                && let Some(c) = self.landed.pop_front()
            {
                out[n] = c;
                n += 1;
            }
            n
        }
        fn abort(&mut self, conn: ConnId) {
            self.null.abort(conn)
        }
    }

    /// A port of one tenant (1 KiB buffers, chains of at most 4) over
    /// `t`, with `peers` peers, its mesh driven by hand.
    fn port_over<T: Transport>(
        t: T,
        peers: usize,
    ) -> (Port<T, PoolBufs>, std::sync::mpsc::Sender<Cmd>, std::sync::mpsc::Receiver<Note>) {
        port_of(t, peers, 64)
    }

    /// [`port_over`] with a pool of `buffers` buffers.
    fn port_of<T: Transport>(
        t: T,
        peers: usize,
        buffers: u32,
    ) -> (Port<T, PoolBufs>, std::sync::mpsc::Sender<Cmd>, std::sync::mpsc::Receiver<Note>) {
        let g = wire::PoolGeometry::new(0, 1024, buffers, wire::fabric::HEADROOM, 4).unwrap();
        let pool = Pool::create("port-test", g, shm::PagePolicy::Normal).unwrap();
        let (mesh, cmds, notes) = Mesh::by_hand(vec![0]);
        let ep = Endpoint::new(t, EndpointConfig { max_conns: 8, max_chain: 8, ..Default::default() });
        let tenants = vec![PortTenant { id: 0, bufs: PoolBufs(pool, 0), per_conn: 4 }];
        let port = Port::with_mesh(ep, mesh, peers, tenants, PortSizes::new(16, 16)).unwrap();
        (port, cmds, notes)
    }

    /// Opens and connects tenant 0's connection to `peer`.
    fn link_up<T: Transport>(port: &mut Port<T, PoolBufs>, cmds: &std::sync::mpsc::Sender<Cmd>, peer: u16) {
        let mut out = Vec::new();
        cmds.send(Cmd::Open { peer, epoch: 1 }).unwrap();
        port.control(&mut out);
        cmds.send(Cmd::Connect { peer, epoch: 1, tenant: 0, blob: b"null".to_vec() }).unwrap();
        settle(port, &mut out);
        assert!(port.is_up(0, peer), "{out:?}");
    }

    /// One tenant's peers that take none of the sends they granted credits
    /// for hold at most that tenant's share of the port's flight slots:
    /// another tenant's messages to a healthy peer still go. Before, the
    /// slots were one pool for every tenant, and tenant 0's stalled peers
    /// (80 messages each: a send window and a queue) took all 200 of them;
    /// tenant 1 could send nothing to anyone. (All four of tenant 0's
    /// peers stall: each of its connections may hold a quarter of its
    /// share.)
    #[test]
    fn one_tenants_stalled_peers_do_not_hold_another_tenants_sends() {
        let pools: Vec<PoolBufs> = (0..2)
            .map(|_| {
                let g = wire::PoolGeometry::new(0, 1024, 1024, wire::fabric::HEADROOM, 4).unwrap();
                PoolBufs(Pool::create("port-test-share", g, shm::PagePolicy::Normal).unwrap(), 0)
            })
            .collect();
        let (mesh, cmds, _notes) = Mesh::by_hand(vec![0, 1]);
        let ep = Endpoint::new(Wire::default(), EndpointConfig { max_conns: 16, max_chain: 8, ..Default::default() });
        let tenants = (0..2).zip(pools).map(|(id, bufs)| PortTenant { id, bufs, per_conn: 4 }).collect();
        let mut port = Port::with_mesh(ep, mesh, 4, tenants, PortSizes::new(200, 16)).unwrap();
        let mut out = Vec::new();
        for peer in 1..=4 {
            cmds.send(Cmd::Open { peer, epoch: 1 }).unwrap();
            port.control(&mut out);
            for tenant in 0..2 {
                cmds.send(Cmd::Connect { peer, epoch: 1, tenant, blob: b"null".to_vec() }).unwrap();
            }
            settle(&mut port, &mut out);
            assert!(port.is_up(0, peer) && port.is_up(1, peer), "{out:?}");
        }
        let stalled: Vec<ConnId> = (1..=4).map(|peer| port.mesh.conn(peer, 0).unwrap()).collect();
        port.ep.transport_mut().stall = stalled;
        let send = |port: &mut Port<Wire, PoolBufs>, t: u16, peer: u16, tag: u64| {
            let lease = port.bufs(t).0.alloc(8, Owner::Held(1)).unwrap();
            let desc = Descriptor { tenant: t, dst_fn: 3, len: 8, ..Descriptor::default() };
            port.send(t, peer, lease, desc, tag).map_err(|(l, _, e)| {
                port.bufs_mut(t).free(l);
                e
            })
        };
        // Tenant 0 sends to its stalled peers all they let it.
        let mut sent = 0;
        for _ in 0..1000 {
            let Some(peer) = (1..=4).find(|&p| port.can_send(0, p)) else { break };
            send(&mut port, 0, peer, 0).unwrap();
            sent += 1;
            settle(&mut port, &mut out);
        }
        assert!((1..=4).all(|p| !port.can_send(0, p)), "tenant 0 kept sending");
        assert_eq!(sent, 100, "tenant 0's share");
        assert!(!out.iter().any(|e| matches!(e, PortEvent::Sent { tenant: 0, .. })), "{out:?}");
        out.clear();
        // Tenant 1's messages to its healthy peer go, and complete.
        for tag in 0..50 {
            assert!(port.can_send(1, 4), "tenant 1 is held back by tenant 0's stalled peers ({sent} in flight)");
            send(&mut port, 1, 4, tag).unwrap();
            settle(&mut port, &mut out);
        }
        let done = out.iter().filter(|e| matches!(e, PortEvent::Sent { tenant: 1, peer: 4, result: Ok(()), .. }));
        assert_eq!(done.count(), 50, "{out:?}");
    }

    /// Within one tenant, peers that take none of the sends they granted
    /// credits for hold at most a connection's part of the tenant's flight
    /// slots (its share divided by the number of peers): the tenant's
    /// messages to a healthy peer still go. Before, a connection could
    /// hold a send window and a queue (80 messages here), and three
    /// stalled peers took all 200 of the tenant's slots: its sends to the
    /// fourth, healthy, peer stopped too.
    #[test]
    fn a_tenants_stalled_peers_do_not_hold_its_sends_to_a_healthy_peer() {
        let g = wire::PoolGeometry::new(0, 1024, 1024, wire::fabric::HEADROOM, 4).unwrap();
        let pool = PoolBufs(Pool::create("port-test-conn-share", g, shm::PagePolicy::Normal).unwrap(), 0);
        let (mesh, cmds, _notes) = Mesh::by_hand(vec![0]);
        let ep = Endpoint::new(Wire::default(), EndpointConfig { max_conns: 16, max_chain: 8, ..Default::default() });
        let tenants = vec![PortTenant { id: 0, bufs: pool, per_conn: 4 }];
        let mut port = Port::with_mesh(ep, mesh, 4, tenants, PortSizes::new(200, 16)).unwrap();
        let mut out = Vec::new();
        for peer in 1..=4 {
            link_up(&mut port, &cmds, peer);
        }
        let stalled: Vec<ConnId> = (1..=3).map(|peer| port.mesh.conn(peer, 0).unwrap()).collect();
        port.ep.transport_mut().stall = stalled;
        let send = |port: &mut Port<Wire, PoolBufs>, peer: u16, tag: u64| {
            let lease = port.bufs(0).0.alloc(8, Owner::Held(1)).unwrap();
            let desc = Descriptor { tenant: 0, dst_fn: 3, len: 8, ..Descriptor::default() };
            port.send(0, peer, lease, desc, tag).map_err(|(l, _, e)| {
                port.bufs_mut(0).free(l);
                e
            })
        };
        // The stalled peers take all they let the tenant send.
        let mut sent = 0;
        for _ in 0..1000 {
            let Some(peer) = (1..=3).find(|&p| port.can_send(0, p)) else { break };
            send(&mut port, peer, 0).unwrap();
            sent += 1;
            settle(&mut port, &mut out);
        }
        assert!((1..=3).all(|p| !port.can_send(0, p)), "the tenant kept sending");
        assert!(!out.iter().any(|e| matches!(e, PortEvent::Sent { .. })), "{out:?}");
        out.clear();
        // Its messages to the healthy peer go, and complete.
        for tag in 0..50 {
            assert!(port.can_send(0, 4), "held back by its stalled peers ({sent} in flight)");
            send(&mut port, 4, tag).unwrap();
            settle(&mut port, &mut out);
        }
        let done = out.iter().filter(|e| matches!(e, PortEvent::Sent { peer: 4, result: Ok(()), .. }));
        assert_eq!(done.count(), 50, "{out:?}");
        assert_eq!(sent, 150, "each stalled peer holds 200 / 4");
    }

    /// Lands a peer's fabric message (its header, then `payload` bytes) in
    /// the oldest receive posted.
    fn land(port: &mut Port<Wire, PoolBufs>, kind: MsgKind, h: FabricHeader, payload: u32) {
        let (conn, off, user_data) = port.ep.transport_mut().recvs.pop_front().expect("a receive posted");
        let mut bytes = h.as_bytes().to_vec();
        bytes.resize(HEADER_LEN + payload as usize, 0x5A);
        port.bufs(0).0.region().copy_in(off, &bytes).unwrap();
        let imm = Immediate::new(kind as u8, h.desc.dst_fn, h.frag_index == 0, h.frag_index + 1 == h.frag_count).0;
        let len = bytes.len() as u32;
        let c = crate::RawCompletion::Recv { conn, user_data, len, imm: Some(imm), result: Ok(()) };
        port.ep.transport_mut().landed.push_back(c);
    }

    /// A chain whose link in the pool a process of the tenant rewrote
    /// after the agent took it (its functions map the pool read-write):
    /// nothing is posted and the send fails with `BadChain`. Before, the
    /// walk stopped early, the fragments went out without the last one
    /// and the message was reported sent; the peer's next message on the
    /// connection then failed it, resetting the link for every tenant.
    #[test]
    fn a_chain_cut_short_in_the_pool_is_not_sent() {
        let (mut port, cmds, _notes) = port_over(Wire::default(), 1);
        link_up(&mut port, &cmds, 1);
        let cap = port.bufs(0).0.geometry().payload_cap();
        let lease = port.bufs(0).0.alloc(2 * cap, Owner::Held(1)).unwrap();
        let head = lease.head();
        // (The head's link, as a function would write it.)
        let meta = wire::segment::PoolLayout::new(port.bufs(0).0.geometry()).meta_offset(head).unwrap();
        let link = meta + core::mem::offset_of!(wire::segment::BufMeta, next_chain) as u64;
        port.bufs(0).0.region().copy_in(link, &(u32::MAX - 1).to_le_bytes()).unwrap();
        let desc = Descriptor { tenant: 0, dst_fn: 3, len: 2 * cap, ..Descriptor::default() };
        let Err((back, _, e)) = port.send(0, 1, lease, desc, 7) else { panic!("a cut chain was sent") };
        assert_eq!((e, back.head()), (CompletionError::BadChain, head));
        let mut out = Vec::new();
        settle(&mut port, &mut out);
        assert_eq!(port.ep.transport().sent, [] as [u32; 0], "nothing posted");
        assert!(!out.iter().any(|e| matches!(e, PortEvent::Sent { .. })), "{out:?}");
        // An intact chain still goes, first to last.
        let lease = port.bufs(0).0.alloc(2 * cap, Owner::Held(1)).unwrap();
        port.send(0, 1, lease, desc, 8).unwrap();
        settle(&mut port, &mut out);
        let sent = port.ep.transport().sent.clone();
        assert_eq!(
            sent.iter().map(|&i| (Immediate(i).is_first(), Immediate(i).is_last())).collect::<Vec<_>>(),
            [(true, false), (false, true)]
        );
    }

    /// A chain of the longest a pool allows (65535 fragments, the fabric's
    /// 16-bit fragment index) is staged and posted whole. Before, counting
    /// its fragments with an open `u16` range overflowed just after the
    /// last: a panic in builds with overflow checks (debug).
    #[test]
    fn a_chain_of_the_most_fragments_is_sent() {
        let most = wire::desc::MAX_CHAIN;
        let g = wire::PoolGeometry::new(0, 128, most + 64, wire::fabric::HEADROOM, most).unwrap();
        let pool = Pool::create("port-test-longest", g, shm::PagePolicy::Normal).unwrap();
        let (mesh, cmds, _notes) = Mesh::by_hand(vec![0]);
        let ecfg = EndpointConfig { max_conns: 8, max_chain: u16::MAX, send_queue: 2 * most, ..Default::default() };
        let ep = Endpoint::new(Wire { hold: true, ..Wire::default() }, ecfg);
        let tenants = vec![PortTenant { id: 0, bufs: PoolBufs(pool, 0), per_conn: 4 }];
        let mut port = Port::with_mesh(ep, mesh, 1, tenants, PortSizes::new(16, 16)).unwrap();
        link_up(&mut port, &cmds, 1);
        let len = most * g.payload_cap();
        let lease = port.bufs(0).0.alloc(len, Owner::Held(1)).unwrap();
        assert_eq!(lease.frags(), most);
        let desc = Descriptor { tenant: 0, dst_fn: 3, len, ..Descriptor::default() };
        assert!(port.send(0, 1, lease, desc, 1).is_ok());
        assert_eq!(port.ep.queued(port.conn(0, 1).unwrap()) + port.ep.transport().sent.len(), most as usize);
    }

    /// A peer's chain is delivered only when its fragments are what a
    /// sender makes: every one but the last full, the total the header's,
    /// kind data, at most the tenant's `max_chain`. Before, a first
    /// fragment of 10 bytes under a header saying 1920 was delivered as
    /// 1920 bytes, 950 of them what the receive buffer held before (an
    /// earlier message of the tenant, another client's at the ingress).
    #[test]
    fn malformed_chains_from_a_peer_are_dropped_and_their_buffers_kept() {
        let (mut port, cmds, _notes) = port_over(Wire { hold: true, ..Wire::default() }, 1);
        link_up(&mut port, &cmds, 1);
        let cap = port.bufs(0).0.geometry().payload_cap();
        let before = port_free(&port);
        let desc = |len: u32| Descriptor { tenant: 0, dst_fn: 3, len, ..Descriptor::default() };
        let h = |len: u32, k: u16, n: u16, flen: u32| FabricHeader::new(MsgKind::Data, desc(len), k, n, flen);
        // (What the peer does: the fragments it lands, each its kind,
        // header and payload bytes.)
        type Frags = Vec<(MsgKind, FabricHeader, u32)>;
        let mut cases: Vec<(&str, Frags)> = vec![
            (
                "a short first fragment",
                vec![(MsgKind::Data, h(2 * cap, 0, 2, 10), 10), (MsgKind::Data, h(2 * cap, 1, 2, cap), cap)],
            ),
            (
                "fragments short of the header's total",
                vec![(MsgKind::Data, h(2 * cap + 5, 0, 2, cap), cap), (MsgKind::Data, h(2 * cap + 5, 1, 2, 1), 1)],
            ),
            ("a control message", vec![(MsgKind::Control, FabricHeader::new(MsgKind::Control, desc(8), 0, 1, 8), 8)]),
        ];
        // Longer than max_chain (4): the fifth fragment (the endpoint
        // allows chains as long as any tenant's).
        cases.push(("five fragments", (0..5).map(|k| (MsgKind::Data, h(5 * cap, k, 5, cap), cap)).collect()));
        for (what, frags) in cases {
            let mut out = Vec::new();
            for (kind, hdr, payload) in frags {
                land(&mut port, kind, hdr, payload);
                settle(&mut port, &mut out);
            }
            assert!(!out.iter().any(|e| matches!(e, PortEvent::Received { .. })), "{what}: delivered: {out:?}");
            assert!(out.iter().any(|e| matches!(e, PortEvent::Protocol { tenant: 0, peer: 1 })), "{what}: {out:?}");
            assert_eq!(port_free(&port), before, "{what}: its buffers are posted again or free");
        }
        // A well-made chain is delivered.
        let mut out = Vec::new();
        land(&mut port, MsgKind::Data, h(cap + 7, 0, 2, cap), cap);
        land(&mut port, MsgKind::Data, h(cap + 7, 1, 2, 7), 7);
        settle(&mut port, &mut out);
        let got: Vec<u32> = out
            .iter()
            .filter_map(|e| if let PortEvent::Received { desc, .. } = e { Some(desc.len) } else { None })
            .collect();
        assert_eq!(got, [cap + 7], "{out:?}");
    }

    /// Looks for stalled chains every 500 ms from `from` to `to` (as
    /// `control` would, every millisecond), returning the last time.
    fn look_until(port: &mut Port<Wire, PoolBufs>, from: Instant, to: Instant, out: &mut Vec<PortEvent>) -> Instant {
        let mut t = from;
        while t < to {
            port.drop_stalled_chains(t, out);
            t += Duration::from_millis(500);
        }
        port.drop_stalled_chains(to, out);
        to
    }

    fn stalled(out: &[PortEvent]) -> usize {
        out.iter().filter(|e| matches!(e, PortEvent::ChainStalled { .. })).count()
    }

    /// A chain whose fragments stop coming while its sender has credits is
    /// dropped after `chain_stall` without a new fragment, and the buffers
    /// it held are free again; the rest of it is freed as it arrives,
    /// quietly, and the next chain is delivered. A chain that keeps coming,
    /// however slowly, is not dropped, nor one the port was not driven for
    /// (a stopped agent). Before, nothing ever freed them.
    #[test]
    fn a_chain_that_stops_coming_is_dropped_and_its_buffers_freed() {
        let (mut port, cmds, _notes) = port_over(Wire { hold: true, ..Wire::default() }, 1);
        link_up(&mut port, &cmds, 1);
        let cap = port.bufs(0).0.geometry().payload_cap();
        let before = port_free(&port);
        let desc = |len: u32| Descriptor { tenant: 0, dst_fn: 3, len, ..Descriptor::default() };
        let frag = |k: u16| FabricHeader::new(MsgKind::Data, desc(4 * cap), k, 4, cap);
        // Completions only: the stall check runs at the times given below,
        // not from `control`.
        let poll = |port: &mut Port<Wire, PoolBufs>, out: &mut Vec<PortEvent>| while port.poll(out) > 0 {};
        let mut out = Vec::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        land(&mut port, MsgKind::Data, frag(0), cap);
        land(&mut port, MsgKind::Data, frag(1), cap);
        poll(&mut port, &mut out);
        assert_eq!(port_free(&port), before - 2, "the first two fragments are held");
        let t = look_until(&mut port, t0, t0 + CHAIN_STALL - ms, &mut out);
        land(&mut port, MsgKind::Data, frag(2), cap);
        poll(&mut port, &mut out);
        // A fragment came: the stall counts from the first look after it.
        let t = look_until(&mut port, t, t + CHAIN_STALL - ms, &mut out);
        assert_eq!(stalled(&out), 0, "{out:?}");
        // The port not driven for longer than the stall: no verdict then.
        port.drop_stalled_chains(t + 3 * CHAIN_STALL, &mut out);
        assert_eq!(stalled(&out), 0, "{out:?}");
        assert_eq!(port_free(&port), before - 3);
        look_until(&mut port, t + 3 * CHAIN_STALL, t + 4 * CHAIN_STALL + ms, &mut out);
        assert!(matches!(out[..], [PortEvent::ChainStalled { tenant: 0, peer: 1 }]), "{out:?}");
        assert_eq!(port_free(&port), before, "its buffers are free again");
        // Its last fragment after all: freed, no protocol error.
        land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc(4 * cap), 3, 4, 9), 9);
        settle(&mut port, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(port_free(&port), before);
        // The next chain is delivered whole.
        land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc(cap + 7), 0, 2, cap), cap);
        land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc(cap + 7), 1, 2, 7), 7);
        settle(&mut port, &mut out);
        assert!(
            matches!(out[1..], [PortEvent::Received { desc: Descriptor { len, .. }, .. }] if len == cap + 7),
            "{out:?}"
        );
    }

    /// Fragments of a chain the fabric completes after the mesh closed its
    /// connection (completions the backend had before the close) are freed
    /// as they come, even when the chain's last never comes. Before, the
    /// close had forgotten the chain's start, the rest was kept as the
    /// start of nothing, and nothing looked at it again: the buffers were
    /// held until the connection's slot was reused (never, if the peer
    /// never came back).
    #[test]
    fn fragments_completed_after_the_link_went_down_are_freed() {
        let (mut port, cmds, _notes) = port_over(Wire { hold: true, ..Wire::default() }, 1);
        link_up(&mut port, &cmds, 1);
        let cap = port.bufs(0).0.geometry().payload_cap();
        let before = port_free(&port);
        let desc = Descriptor { tenant: 0, dst_fn: 3, len: 3 * cap, ..Descriptor::default() };
        let frag = |k: u16| FabricHeader::new(MsgKind::Data, desc, k, 3, cap);
        let mut out = Vec::new();
        land(&mut port, MsgKind::Data, frag(0), cap);
        while port.poll(&mut out) > 0 {}
        cmds.send(Cmd::Down { peer: 1 }).unwrap();
        port.control(&mut out);
        assert!(out.iter().any(|e| matches!(e, PortEvent::PeerDown { peer: 1 })), "{out:?}");
        // The chain's second fragment was completed before the close.
        land(&mut port, MsgKind::Data, frag(1), cap);
        settle(&mut port, &mut out);
        let t0 = Instant::now();
        look_until(&mut port, t0, t0 + CHAIN_WAIT + Duration::from_secs(1), &mut out);
        assert!(!out.iter().any(|e| matches!(e, PortEvent::Received { .. })), "{out:?}");
        assert_eq!(port_free(&port), before, "a fragment is held");
    }

    /// A chain whose sender waits for this port's receives (the functions
    /// hold the rest of the pool) is not dropped after `chain_stall`: the
    /// buffers come back when the functions are done. Only after
    /// `chain_wait`. But when this port holds every buffer of the pool,
    /// nothing else can free one: it is dropped after `chain_stall`.
    #[test]
    fn a_chain_waiting_for_receives_is_dropped_only_when_nothing_else_can_free_a_buffer() {
        // 64 buffers, the functions holding all the port does not: or 4,
        // the three fragments and the receive kept for credit messages.
        for buffers in [64, 4] {
            let (mut port, cmds, _notes) = port_of(Wire { hold: true, ..Wire::default() }, 1, buffers);
            link_up(&mut port, &cmds, 1);
            let cap = port.bufs(0).0.geometry().payload_cap();
            let poll = |port: &mut Port<Wire, PoolBufs>, out: &mut Vec<PortEvent>| while port.poll(out) > 0 {};
            let mut out = Vec::new();
            let mut functions = Vec::new();
            while let Some(l) = port.bufs_mut(0).alloc_one() {
                functions.push(l);
            }
            let desc = |len: u32| Descriptor { tenant: 0, dst_fn: 3, len, ..Descriptor::default() };
            for k in 0..3 {
                land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc(4 * cap), k, 4, cap), cap);
            }
            poll(&mut port, &mut out);
            assert_eq!(port.ep.transport().recvs.len(), 1, "only the receive kept for credit messages");
            let t0 = Instant::now();
            let t = look_until(&mut port, t0, t0 + CHAIN_STALL + Duration::from_millis(1), &mut out);
            if buffers == 4 {
                assert_eq!(stalled(&out), 1, "the port holds the whole pool: {out:?}");
                assert_eq!(port.bufs(0).0.free_buffers(), 3, "the chain's buffers are free");
                continue;
            }
            assert_eq!(stalled(&out), 0, "a chain waiting for receives the functions will free was dropped: {out:?}");
            look_until(&mut port, t, t0 + CHAIN_WAIT + Duration::from_millis(1), &mut out);
            assert_eq!(stalled(&out), 1, "but not for ever: {out:?}");
            drop(functions);
        }
    }

    /// A peer that sends more than it was granted (here: four messages at
    /// once on a grant of three, the fourth taking the receive kept for
    /// credit messages) fails its connection as a protocol error. Before,
    /// the grant arithmetic wrapped and no credit update was ever due
    /// again: the connection wedged for good.
    #[test]
    fn a_peer_beyond_its_credits_fails_its_connection() {
        let (mut port, cmds, notes) = port_over(Wire { hold: true, ..Wire::default() }, 1);
        link_up(&mut port, &cmds, 1);
        assert_eq!(port.ep.transport().recvs.len(), 4, "three granted, one kept for credit messages");
        let desc = Descriptor { tenant: 0, dst_fn: 3, len: 8, ..Descriptor::default() };
        for _ in 0..4 {
            land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc, 0, 1, 8), 8);
        }
        let mut out = Vec::new();
        settle(&mut port, &mut out);
        let got = out.iter().filter(|e| matches!(e, PortEvent::Received { .. })).count();
        assert_eq!(got, 3, "{out:?}");
        assert!(notes.try_iter().any(|n| matches!(n, Note::Reset { peer: 1, .. })), "the link is reset");
        assert!(!port.is_up(0, 1));
    }

    /// A connection whose tenant's pool is empty is said short once, not
    /// on every refill (every millisecond) until buffers come back; and
    /// again once it ran short anew after a refill found buffers.
    #[test]
    fn a_connection_short_of_buffers_is_told_once_per_time() {
        let (mut port, cmds, _notes) = port_over(Wire { hold: true, ..Wire::default() }, 1);
        link_up(&mut port, &cmds, 1);
        let all = port.bufs(0).0.free_buffers();
        let taken: Vec<Lease> = (0..all).map(|_| port.bufs(0).0.alloc(8, Owner::Held(1)).unwrap()).collect();
        let desc = Descriptor { tenant: 0, dst_fn: 3, len: 8, ..Descriptor::default() };
        let short = |out: &[PortEvent]| out.iter().filter(|e| matches!(e, PortEvent::NoBuffer { .. })).count();
        let mut out = Vec::new();
        for round in 0..2 {
            land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc, 0, 1, 8), 8);
            out.clear();
            for _ in 0..50 {
                settle(&mut port, &mut out);
            }
            assert_eq!(short(&out), 1, "round {round}: {out:?}");
            // The message's buffer comes back: the refill posts it, and the
            // connection is not short any more.
            let got =
                out.drain(..).find_map(|e| if let PortEvent::Received { lease, .. } = e { Some(lease) } else { None });
            port.bufs_mut(0).free(got.expect("delivered"));
            settle(&mut port, &mut out);
        }
        for l in taken {
            port.bufs_mut(0).free(l);
        }
    }

    /// The connections of a port whose endpoint has many reserve only a
    /// share of the room for the chain being received (8 fragments here)
    /// and grow it for a longer chain, which is delivered whole; a small
    /// port's reserve 64, as before. Before, every connection reserved 64
    /// fragments (1 KiB) whatever the cluster: 97 MiB for the 99000
    /// connections of 1000 tenants on 100 nodes.
    #[test]
    fn a_large_ports_connections_reserve_a_share_of_the_chain_being_received() {
        let parts = |port: &Port<Wire, PoolBufs>| {
            let i = port.mesh.conn(1, 0).unwrap().index() as usize;
            port.conns[i].as_ref().unwrap().parts.capacity()
        };
        let (mut small, cmds, _notes) = port_over(Wire::default(), 1);
        link_up(&mut small, &cmds, 1);
        assert_eq!(parts(&small), 64);
        let g = wire::PoolGeometry::new(0, 1024, 64, wire::fabric::HEADROOM, 16).unwrap();
        let pool = Pool::create("port-test-parts", g, shm::PagePolicy::Normal).unwrap();
        let (mesh, cmds, _notes) = Mesh::by_hand(vec![0]);
        let ecfg = EndpointConfig { max_conns: 1 << 20, max_chain: 16, ..Default::default() };
        let ep = Endpoint::new(Wire { hold: true, ..Wire::default() }, ecfg);
        let tenants = vec![PortTenant { id: 0, bufs: PoolBufs(pool, 0), per_conn: 4 }];
        let mut port = Port::with_mesh(ep, mesh, 1, tenants, PortSizes::new(16, 16)).unwrap();
        link_up(&mut port, &cmds, 1);
        assert_eq!(parts(&port), 8, "fragments of a chain being received reserved");
        let cap = g.payload_cap();
        let desc = Descriptor { tenant: 0, dst_fn: 3, len: 12 * cap, ..Descriptor::default() };
        let mut out = Vec::new();
        for k in 0..12 {
            land(&mut port, MsgKind::Data, FabricHeader::new(MsgKind::Data, desc, k, 12, cap), cap);
            settle(&mut port, &mut out);
        }
        let got: Vec<u32> = out
            .iter()
            .filter_map(|e| if let PortEvent::Received { desc, .. } = e { Some(desc.len) } else { None })
            .collect();
        assert_eq!(got, [12 * cap], "{out:?}");
    }

    /// Buffers of tenant 0 free or posted as receives.
    fn port_free<T: Transport>(port: &Port<T, PoolBufs>) -> u32 {
        port.bufs(0).0.free_buffers() + port.recvs_posted(0)
    }

    /// The (tenant, peer) of the `Down`s in `out`.
    fn downs(out: &[PortEvent]) -> Vec<(u16, u16)> {
        out.iter()
            .filter_map(|e| match *e {
                PortEvent::Down { tenant, peer } => Some((tenant, peer)),
                _ => None,
            })
            .collect()
    }

    /// [`Port::abort`] fails the one connection it names, through the
    /// backend: reported like any failure (a `Down` at the next control);
    /// the connection to another peer stays up. A connection the mesh has
    /// not opened is not there to fail.
    #[test]
    fn abort_fails_the_named_connection_through_the_backend() {
        let (mut port, cmds, _notes) = port_over(NullTransport::new(), 2);
        assert!(!port.abort(0, 1), "no connection to node 1 yet");
        link_up(&mut port, &cmds, 1);
        link_up(&mut port, &cmds, 2);
        assert!(port.abort(0, 1));
        let mut out = Vec::new();
        while port.poll(&mut out) > 0 {}
        port.control(&mut out);
        assert_eq!(downs(&out), [(0, 1)]);
        assert!(!port.is_up(0, 1) && port.is_up(0, 2));
    }

    /// A tenant the port does not have names no connection: `abort`
    /// fails nothing and says so. Before, the index of (tenant, peer) ran
    /// into the next peer's connections, and `abort(1, 1)` on a port of one
    /// tenant failed tenant 0's connection to node 2.
    #[test]
    fn abort_of_a_tenant_the_port_does_not_have_fails_nothing() {
        let (mut port, cmds, _notes) = port_over(NullTransport::new(), 2);
        link_up(&mut port, &cmds, 1);
        link_up(&mut port, &cmds, 2);
        assert!(!port.abort(1, 1), "the port has one tenant");
        let mut out = Vec::new();
        while port.poll(&mut out) > 0 {}
        port.control(&mut out);
        assert_eq!(downs(&out), [], "{out:?}");
        assert!(port.is_up(0, 1) && port.is_up(0, 2));
        // Nor is one of its connections up, or holding credits.
        assert!(!port.is_up(1, 1), "the port has one tenant");
        assert_eq!(port.credits(1, 1), 0);
    }

    /// A connection that was up and failed is reported once, as a `Down`,
    /// by the next `control` (not by `poll`, on the data path), so that a
    /// driver need not look at every connection to find it; the list of
    /// failures does not grow on a failure. One that failed before it came
    /// up is not reported, nor are the connections closed with their link
    /// (its `PeerDown` says so).
    #[test]
    fn a_connection_that_was_up_and_failed_is_reported_once_by_the_next_control() {
        let (mut port, cmds, _notes) = port_over(NullTransport::new(), 2);
        link_up(&mut port, &cmds, 1);
        let mut out = Vec::new();
        cmds.send(Cmd::Open { peer: 2, epoch: 1 }).unwrap();
        port.control(&mut out);
        let room = port.failed.capacity();
        assert!(room >= port.conns.len(), "{room} failures kept for {} connections", port.conns.len());
        for peer in [1, 2] {
            port.ep.transport_mut().abort(port.mesh.conn(peer, 0).unwrap());
        }
        out.clear();
        while port.poll(&mut out) > 0 {}
        assert!(!port.is_up(0, 1));
        assert_eq!(downs(&out), [], "reported by poll");
        assert_eq!(port.failed.capacity(), room, "the list of failures grew");
        port.control(&mut out);
        assert_eq!(downs(&out), [(0, 1)], "reported by control: node 1's, not node 2's (never up)");
        out.clear();
        settle(&mut port, &mut out);
        assert_eq!(downs(&out), [], "reported again");
        // A link that goes down with its connection up: a PeerDown only.
        link_up(&mut port, &cmds, 2);
        cmds.send(Cmd::Down { peer: 2 }).unwrap();
        out.clear();
        settle(&mut port, &mut out);
        assert!(out.iter().any(|e| matches!(e, PortEvent::PeerDown { peer: 2 })), "{out:?}");
        assert_eq!(downs(&out), [], "a connection closed with its link");
    }

    /// A connection that failed on its own (its peer crashed) is still the
    /// mesh's, under that peer, until the mesh closes it (the peer's Down):
    /// its id is not given to another peer's connection before. Before,
    /// peer 2's new connection got it, and peer 1's Down then closed it
    /// (and until then tenant 0's route to node 1 led to node 2).
    #[test]
    fn a_failed_connection_is_not_reused_before_the_mesh_closes_it() {
        let (mut port, cmds, notes) = port_over(NullTransport::new(), 2);
        link_up(&mut port, &cmds, 1);
        let c1 = port.mesh.conn(1, 0).unwrap();
        let mut out = Vec::new();
        port.ep.transport_mut().abort(c1);
        settle(&mut port, &mut out);
        assert!(notes.try_iter().any(|n| matches!(n, Note::Reset { peer: 1, .. })));
        assert!(!port.is_up(0, 1));
        link_up(&mut port, &cmds, 2);
        assert_ne!(port.mesh.conn(2, 0), Some(c1), "reused while the mesh holds it");
        assert!(!port.is_up(0, 1), "node 1's route leads to node 2's connection");
        cmds.send(Cmd::Down { peer: 1 }).unwrap();
        settle(&mut port, &mut out);
        assert!(port.is_up(0, 2), "node 1's Down closed node 2's connection");
        assert!(!notes.try_iter().any(|n| matches!(n, Note::Reset { peer: 2, .. })));
    }

    /// A connection that failed (its peer crashed), and then was closed
    /// (the peer's Down), gets no receive posted again: not one buffer is
    /// taken from the pool for it until the peer's link is set up anew,
    /// when the new connection gets its receives. Before, every `control`
    /// (every millisecond) took a buffer, tried to post it on the dead
    /// connection, logged the refusal and gave the buffer back, for as
    /// long as the connection's slot was not reused.
    #[test]
    fn receives_are_not_tried_on_a_dead_connection() {
        let (mut port, cmds, _notes) = port_over(NullTransport::new(), 1);
        link_up(&mut port, &cmds, 1);
        let mut out = Vec::new();
        port.ep.transport_mut().abort(port.mesh.conn(1, 0).unwrap());
        settle(&mut port, &mut out);
        assert!(!port.is_up(0, 1));
        for down in [false, true] {
            if down {
                cmds.send(Cmd::Down { peer: 1 }).unwrap();
                settle(&mut port, &mut out);
            }
            let tried = port.bufs(0).1;
            for _ in 0..100 {
                port.control(&mut out);
            }
            assert_eq!(port.bufs(0).1 - tried, 0, "down: {down}: buffers taken to post on a dead connection");
        }
        assert_eq!(port.recvs_posted(0), 0);
        // The link set up again: the new connection's receives are posted.
        cmds.send(Cmd::Open { peer: 1, epoch: 2 }).unwrap();
        port.control(&mut out);
        cmds.send(Cmd::Connect { peer: 1, epoch: 2, tenant: 0, blob: b"null".to_vec() }).unwrap();
        settle(&mut port, &mut out);
        assert!(port.is_up(0, 1), "{out:?}");
        assert_eq!(port.recvs_posted(0), 4);
    }

    /// Polls until the fabric has nothing more to say.
    fn settle<T: Transport>(port: &mut Port<T, PoolBufs>, out: &mut Vec<PortEvent>) {
        for _ in 0..100 {
            port.control(out);
            if port.poll(out) == 0 {
                return;
            }
        }
        panic!("the null fabric kept completing");
    }

    /// When a peer's link is set up again (a new epoch) the mesh closes the
    /// old epoch's connections, and their failures (`Closed`, this side's
    /// own doing) come out of the fabric after the new epoch's connections
    /// were opened. They are not a failure of the new link: before, each
    /// reset the link just set up (a peer that came back quickly was set up
    /// twice, or more while the closes kept overtaking the setups).
    #[test]
    fn connections_the_mesh_closed_do_not_reset_the_link_that_replaced_them() {
        let (mut port, cmds, notes) = port_over(NullTransport::new(), 1);
        let mut out = Vec::new();
        for epoch in 1..=3 {
            if epoch > 1 {
                // The peer dialed again before this node saw its old link
                // close: the control thread says Down and Open in one go.
                cmds.send(Cmd::Down { peer: 1 }).unwrap();
            }
            cmds.send(Cmd::Open { peer: 1, epoch }).unwrap();
            port.control(&mut out);
            assert!(matches!(notes.try_recv(), Ok(Note::Blob { peer: 1, tenant: 0, .. })), "epoch {epoch}: our blob");
            cmds.send(Cmd::Connect { peer: 1, epoch, tenant: 0, blob: b"null".to_vec() }).unwrap();
            out.clear();
            settle(&mut port, &mut out);
            assert!(out.iter().any(|e| matches!(e, PortEvent::Up { tenant: 0, peer: 1 })), "epoch {epoch}: {out:?}");
            assert!(port.is_up(0, 1), "epoch {epoch}");
            let resets: Vec<Note> = notes.try_iter().collect();
            assert!(resets.is_empty(), "epoch {epoch}: the new link was reset: {resets:?}");
        }
    }

    /// A port of `tenants` tenants (ids 0, 1, ...; pools of `buffers`
    /// buffers of 1 KiB, 4 receives per connection) over `t`, with
    /// `peers` peers, its mesh driven by hand.
    fn port_of_tenants<T: Transport>(
        t: T,
        tenants: u16,
        peers: u16,
        buffers: u32,
    ) -> (Port<T, PoolBufs>, std::sync::mpsc::Sender<Cmd>, std::sync::mpsc::Receiver<Note>) {
        let (mesh, cmds, notes) = Mesh::by_hand((0..tenants).collect());
        // Room for every connection twice (a link set up again).
        let max_conns = 2 * u32::from(tenants) * u32::from(peers);
        let ep = Endpoint::new(t, EndpointConfig { max_conns, max_chain: 8, ..Default::default() });
        let tenants = (0..tenants)
            .map(|id| {
                let g = wire::PoolGeometry::new(0, 1024, buffers, wire::fabric::HEADROOM, 4).unwrap();
                let pool = Pool::create("port-test-counts", g, shm::PagePolicy::Normal).unwrap();
                PortTenant { id, bufs: PoolBufs(pool, 0), per_conn: 4 }
            })
            .collect();
        let port = Port::with_mesh(ep, mesh, usize::from(peers), tenants, PortSizes::new(64, 16)).unwrap();
        (port, cmds, notes)
    }

    /// Opens `peer`'s link (epoch `epoch`) and connects every tenant's
    /// connection over it.
    fn peer_up<T: Transport>(port: &mut Port<T, PoolBufs>, cmds: &std::sync::mpsc::Sender<Cmd>, peer: u16, epoch: u32) {
        let mut out = Vec::new();
        cmds.send(Cmd::Open { peer, epoch }).unwrap();
        port.control(&mut out);
        for tenant in 0..port.bufs.len() as u16 {
            cmds.send(Cmd::Connect { peer, epoch, tenant, blob: b"null".to_vec() }).unwrap();
        }
        settle(port, &mut out);
        assert!((0..port.bufs.len() as u16).all(|t| port.is_up(t, peer)), "{out:?}");
    }

    /// Receives tenant `t`'s connections that are up want posted, by
    /// looking at every connection (what `recv_deficit` keeps).
    fn deficit_scan<T: Transport>(port: &Port<T, PoolBufs>, t: u16) -> u32 {
        port.conns.iter().flatten().filter(|c| c.tenant == t && c.up).map(|c| c.want.saturating_sub(c.posted)).sum()
    }

    /// Receives posted for tenant `t`, by looking at every connection
    /// (what `recvs_posted` keeps).
    fn posted_scan<T: Transport>(port: &Port<T, PoolBufs>, t: u16) -> u32 {
        port.conns.iter().flatten().filter(|c| c.tenant == t).map(|c| c.posted).sum()
    }

    /// The receive queries a driver makes for every tenant on every turn
    /// (the ingress edge's reserve of receive buffers, the agent's gauge
    /// of receives posted) look at no connection. Before, each looked at
    /// every connection of the port: 10 tenants with 10 peers each looked
    /// at 10 x 2 x 100 connections per turn.
    #[test]
    fn the_receive_queries_do_not_look_at_every_connection() {
        let (tenants, peers) = (10u16, 10u16);
        let (mut port, cmds, _notes) = port_of_tenants(Wire::default(), tenants, peers, 64);
        for peer in 1..=peers {
            peer_up(&mut port, &cmds, peer, 1);
        }
        assert_eq!(port.conns_up(), 100);
        port.conns_looked.set(0);
        for t in 0..tenants {
            assert_eq!(port.recv_deficit(t), 0);
            assert_eq!(port.recvs_posted(t), 40);
        }
        assert_eq!(port.conns_looked.get(), 0, "connections looked at by one turn's queries of {tenants} tenants");
    }

    /// Lands a one-fragment message of `payload` bytes in the oldest
    /// receive held for `conn` (tenant `t`'s).
    fn land_on(port: &mut Port<Wire, PoolBufs>, conn: ConnId, t: u16, payload: u32) {
        let recvs = &mut port.ep.transport_mut().recvs;
        let k = recvs.iter().position(|r| r.0 == conn).expect("a receive posted on the connection");
        let (_, off, user_data) = recvs.remove(k).unwrap();
        let desc = Descriptor { tenant: t, dst_fn: 3, len: payload, ..Descriptor::default() };
        let h = FabricHeader::new(MsgKind::Data, desc, 0, 1, payload);
        let mut bytes = h.as_bytes().to_vec();
        bytes.resize(HEADER_LEN + payload as usize, 0x5A);
        port.bufs(t).0.region().copy_in(off, &bytes).unwrap();
        let imm = Immediate::new(MsgKind::Data as u8, 3, true, true).0;
        let len = bytes.len() as u32;
        let c = crate::RawCompletion::Recv { conn, user_data, len, imm: Some(imm), result: Ok(()) };
        port.ep.transport_mut().landed.push_back(c);
    }

    /// The receives held for connections the port no longer has up
    /// complete with `Closed` (what a backend does with the receives of a
    /// connection it closed).
    fn flush_dead(port: &mut Port<Wire, PoolBufs>) {
        let dead = |port: &Port<Wire, PoolBufs>, c: ConnId| {
            port.conns.get(c.index() as usize).and_then(Option::as_ref).is_none_or(|st| st.dead)
        };
        let held: Vec<_> = std::mem::take(&mut port.ep.transport_mut().recvs).into();
        for (conn, off, user_data) in held {
            if dead(port, conn) {
                let result = Err(CompletionError::Closed);
                let c = crate::RawCompletion::Recv { conn, user_data, len: 0, imm: None, result };
                port.ep.transport_mut().landed.push_back(c);
            } else {
                port.ep.transport_mut().recvs.push_back((conn, off, user_data));
            }
        }
    }

    /// The receive counts kept per tenant equal a look at every connection
    /// after each kind of change: receives posted (on connections not yet
    /// up too), connections up, messages landing and held by the caller
    /// (the pool runs short: receives wanted and not posted), buffers given
    /// back (a refill), a connection failing with receives posted, a
    /// peer's link closed and set up again (new connections in the slots
    /// of the old). A driver that reads the deficit only of the tenants
    /// [`Port::next_deficit_change`] gives holds what one reading every
    /// tenant's after every step would.
    #[test]
    fn the_receive_counts_kept_per_tenant_match_the_connections() {
        let (tenants, peers) = (3u16, 3u16);
        // 10 buffers a tenant: its 3 connections want 12 receives.
        let (mut port, cmds, _notes) = port_of_tenants(Wire { hold: true, ..Wire::default() }, tenants, peers, 10);
        // What a driver keeps of each tenant's deficit (MAX: nothing yet).
        let mut kept = vec![u32::MAX; usize::from(tenants)];
        let mut steps = 0;
        let mut check = |port: &mut Port<Wire, PoolBufs>, what: &str| {
            steps += 1;
            while let Some(t) = port.next_deficit_change() {
                kept[usize::from(t)] = port.recv_deficit(t);
            }
            for t in 0..tenants {
                let (deficit, posted) = (deficit_scan(port, t), posted_scan(port, t));
                assert_eq!(port.recv_deficit(t), deficit, "{what}: tenant {t}'s deficit");
                assert_eq!(port.recvs_posted(t), posted, "{what}: tenant {t}'s receives posted");
                assert_eq!(kept[usize::from(t)], deficit, "{what}: tenant {t}'s deficit changed, not listed");
            }
        };
        check(&mut port, "a new port");
        let mut out = Vec::new();
        for peer in 1..=peers {
            // Opened: receives are posted before the connections are up.
            cmds.send(Cmd::Open { peer, epoch: 1 }).unwrap();
            port.control(&mut out);
            check(&mut port, &format!("peer {peer} opened"));
            for tenant in 0..tenants {
                cmds.send(Cmd::Connect { peer, epoch: 1, tenant, blob: b"null".to_vec() }).unwrap();
                settle(&mut port, &mut out);
                check(&mut port, &format!("tenant {tenant} up at peer {peer}"));
            }
        }
        assert!(deficit_scan(&port, 0) > 0, "the pool is short of what the connections want");
        // Messages land and are held: the pools run dry. (Within what
        // the port granted: peer 3's connections have 2 receives posted,
        // one of them kept for credit messages.)
        let mut held = Vec::new();
        for (round, peers) in [[1, 2, 3], [1, 2, 0]].into_iter().enumerate() {
            for (t, peer) in [(0, 1), (1, 2), (1, 3), (2, 3)] {
                if !peers.contains(&peer) {
                    continue;
                }
                let conn = port.mesh.conn(peer, t).unwrap();
                land_on(&mut port, conn, t, 100);
                out.clear();
                settle(&mut port, &mut out);
                for e in out.drain(..) {
                    if let PortEvent::Received { tenant, lease, .. } = e {
                        held.push((tenant, lease));
                    }
                }
                check(&mut port, &format!("round {round}: tenant {t} received from peer {peer}"));
            }
        }
        assert_eq!((held.len(), port.conns_up()), (6, 9), "messages held, connections up");
        // Tenant 1's connection to peer 2 fails, short of receives; the
        // ones it had complete.
        let c = port.mesh.conn(2, 1).unwrap();
        assert!(port.conns[c.index() as usize].as_ref().is_some_and(|st| st.posted < st.want));
        port.ep.transport_mut().abort(c);
        port.poll(&mut out);
        check(&mut port, "a connection failed");
        flush_dead(&mut port);
        settle(&mut port, &mut out);
        check(&mut port, "its receives completed");
        // Peer 3's link closes (its connections short of receives); the
        // closes come, its receives complete later.
        cmds.send(Cmd::Down { peer: 3 }).unwrap();
        port.control(&mut out);
        check(&mut port, "peer 3 down");
        settle(&mut port, &mut out);
        check(&mut port, "peer 3's closes came");
        // Given back: the refills post them again.
        for (t, lease) in held.drain(..) {
            port.bufs_mut(t).free(lease);
            port.control(&mut out);
            check(&mut port, &format!("a buffer of tenant {t} given back"));
        }
        // Both links are set up again, one with receives of its old
        // connections still to complete.
        peer_up(&mut port, &cmds, 3, 2);
        check(&mut port, "peer 3 up again");
        cmds.send(Cmd::Down { peer: 2 }).unwrap();
        settle(&mut port, &mut out);
        check(&mut port, "peer 2 down");
        peer_up(&mut port, &cmds, 2, 2);
        check(&mut port, "peer 2 up again");
        flush_dead(&mut port);
        settle(&mut port, &mut out);
        check(&mut port, "the old receives completed");
        // Nothing changing: no tenant is listed.
        for _ in 0..10 {
            port.control(&mut out);
            port.poll(&mut out);
        }
        assert_eq!(port.next_deficit_change(), None, "listed with nothing changed");
        assert!(steps > 30, "{steps} steps");
    }

    /// An idle port (every connection up and full of receives, no chain
    /// being received) looks at no connection in its per-millisecond
    /// `control`, nor in `conns_up`, which its drivers ask for on every
    /// turn: the work is in proportion to the connections that need
    /// something, and here none does.
    #[test]
    fn an_idle_ports_control_looks_at_no_connection() {
        let (tenants, peers) = (10u16, 20u16);
        let (mut port, cmds, _notes) = port_of_tenants(Wire::default(), tenants, peers, 128);
        for peer in 1..=peers {
            peer_up(&mut port, &cmds, peer, 1);
        }
        let mut out = Vec::new();
        settle(&mut port, &mut out);
        port.conns_looked.set(0);
        port.control(&mut out);
        assert_eq!(port.conns_up(), 200);
        assert_eq!(port.recvs_posted(0), 80, "every receive posted");
        assert_eq!(port.conns_looked.get(), 0, "connections looked at by one control and conns_up, 200 connections");
    }

    /// The counts and sets kept over the connections equal a look at each.
    fn assert_kept<T: Transport>(port: &Port<T, PoolBufs>, what: &str) {
        let conns = || port.conns.iter().enumerate().filter_map(|(i, c)| Some((i, c.as_ref()?)));
        let up = conns().filter(|(_, c)| c.up).count();
        assert_eq!(port.conns_up(), up, "{what}: connections up");
        let short: Vec<usize> = conns().filter(|(_, c)| !c.dead && c.posted < c.want).map(|(i, _)| i).collect();
        assert_eq!(port.counts.short.iter().collect::<Vec<_>>(), short, "{what}: connections short of receives");
        assert_eq!(port.counts.short.len, short.len(), "{what}: connections short of receives");
        let open: Vec<usize> = conns().filter(|(_, c)| c.first.is_some() && !c.stalled).map(|(i, _)| i).collect();
        assert_eq!(port.counts.open.iter().collect::<Vec<_>>(), open, "{what}: connections receiving a chain");
        assert_eq!(port.counts.open.len, open.len(), "{what}: connections receiving a chain");
        for t in 0..port.bufs.len() as u16 {
            let parts: usize = conns().filter(|(_, c)| c.tenant == t).map(|(_, c)| c.parts.len()).sum();
            let held = (parts as u32 + posted_scan(port, t)) as u64;
            assert_eq!(port.counts.held(usize::from(t)), held, "{what}: tenant {t}'s buffers held");
            assert_eq!(port.recv_deficit(t), deficit_scan(port, t), "{what}: tenant {t}'s deficit");
            assert_eq!(port.recvs_posted(t), posted_scan(port, t), "{what}: tenant {t}'s receives posted");
        }
    }

    #[test]
    fn an_index_set_finds_its_members_in_order() {
        let mut set = IndexSet::default();
        let members = [0, 1, 63, 64, 200, 4095, 4096, 4097, 9000, 70000];
        for &i in members.iter().rev() {
            set.set(i, true);
        }
        set.set(5, false);
        set.set(1_000_000, false);
        assert_eq!(set.iter().collect::<Vec<_>>(), members);
        assert_eq!((set.len, set.next(9001), set.next(70001), set.next(2_000_000)), (10, Some(70000), None, None));
        for &i in &members[..9] {
            set.set(i, false);
        }
        assert_eq!((set.iter().collect::<Vec<_>>(), set.len), (vec![70000], 1));
        set.set(70000, false);
        assert_eq!((set.next(0), set.len), (None, 0));
    }

    /// `s` without the pool ids of the leases it shows (each port has
    /// pools of its own).
    fn unpooled(s: String) -> String {
        s.split(", pool: PoolId(")
            .enumerate()
            .map(|(k, p)| if k == 0 { p } else { &p[p.find(')').unwrap() + 1..] })
            .collect()
    }

    /// One of two ports driven the same way (`by_scan`: the one that looks
    /// at every connection, as before), with the messages it delivered
    /// held, and its own clock.
    struct Side {
        port: Port<Wire, PoolBufs>,
        cmds: std::sync::mpsc::Sender<Cmd>,
        _notes: std::sync::mpsc::Receiver<Note>,
        held: Vec<(u16, Lease)>,
        out: Vec<PortEvent>,
        now: Instant,
    }

    impl Side {
        /// One `control`, a millisecond after the last.
        fn control(&mut self) {
            self.now += Duration::from_millis(1);
            self.port.control_at(self.now, &mut self.out);
        }

        /// `control` and `poll` until the fabric has nothing more to say.
        fn settle(&mut self) {
            for _ in 0..100 {
                self.control();
                if self.port.poll(&mut self.out) == 0 {
                    return;
                }
            }
            panic!("the fabric kept completing");
        }

        /// Fragment `k` of a chain of `count` fragments of `len` bytes from
        /// `peer` to tenant `t`, landed in the oldest receive of their
        /// connection, if it has one besides the one kept for credit
        /// messages; then settles.
        fn land(&mut self, t: u16, peer: u16, k: u16, count: u16, len: u32) {
            let port = &mut self.port;
            let conn = port.mesh.conn(peer, t).unwrap();
            let recvs = &mut port.ep.transport_mut().recvs;
            if recvs.iter().filter(|r| r.0 == conn).count() < 2 {
                return;
            }
            let at = recvs.iter().position(|r| r.0 == conn).unwrap();
            let (_, off, user_data) = recvs.remove(at).unwrap();
            let cap = port.bufs(t).0.geometry().payload_cap();
            let flen = wire::desc::frag_len(len, cap, u32::from(k));
            let desc = Descriptor { tenant: t, dst_fn: 3, len, ..Descriptor::default() };
            let mut bytes = FabricHeader::new(MsgKind::Data, desc, k, count, flen).as_bytes().to_vec();
            bytes.resize(HEADER_LEN + flen as usize, 0x5A);
            port.bufs(t).0.region().copy_in(off, &bytes).unwrap();
            let imm = Immediate::new(MsgKind::Data as u8, 3, k == 0, k + 1 == count).0;
            let len = bytes.len() as u32;
            let c = crate::RawCompletion::Recv { conn, user_data, len, imm: Some(imm), result: Ok(()) };
            port.ep.transport_mut().landed.push_back(c);
            self.settle();
        }

        /// Looks for stalled chains every 500 ms (with a `control` each
        /// time) until `secs` seconds from now.
        fn wait(&mut self, secs: u64) {
            let to = self.now + Duration::from_secs(secs);
            while self.now < to {
                self.now += Duration::from_millis(500);
                self.port.control_at(self.now, &mut self.out);
            }
        }
    }

    /// A port that looks only at the connections short of receives and at
    /// those receiving a chain does what one looking at every connection
    /// did: the same receives posted, from the same buffers, the same
    /// chains dropped as stalled at the same times, the same events, and
    /// its counts of connections up, short of receives and receiving a
    /// chain equal a look at each, through links set up, messages held
    /// until the pools run dry and given back, chains that stall (their
    /// sender with credits, or waiting for receives), that complete, that
    /// are cut by a failure or a link going down, a pause in the looks,
    /// and links set up again.
    #[test]
    fn a_port_looking_only_at_connections_that_need_something_does_what_a_scan_did() {
        let (tenants, peers) = (3u16, 3u16);
        let now = Instant::now();
        let mut sides: Vec<Side> = [false, true]
            .into_iter()
            .map(|by_scan| {
                // 10 buffers a tenant: its 3 connections want 12 receives.
                let (mut port, cmds, _notes) =
                    port_of_tenants(Wire { hold: true, ..Wire::default() }, tenants, peers, 10);
                port.by_scan = by_scan;
                Side { port, cmds, _notes, held: Vec::new(), out: Vec::new(), now }
            })
            .collect();
        let mut told = Vec::new();
        let mut steps = 0;
        let mut step = |sides: &mut Vec<Side>, what: &str, f: &dyn Fn(&mut Side)| {
            steps += 1;
            for side in sides.iter_mut() {
                f(side);
                assert_kept(&side.port, &format!("{what} (by scan: {})", side.port.by_scan));
            }
            let [kept, scan] = &mut sides[..] else { unreachable!() };
            assert_eq!(unpooled(format!("{:?}", kept.out)), unpooled(format!("{:?}", scan.out)), "{what}: events");
            let state = |s: &Side| {
                let conns: Vec<_> = s
                    .port
                    .conns
                    .iter()
                    .flatten()
                    .map(|c| {
                        let open = c.first.is_some() && !c.stalled;
                        (
                            c.up,
                            c.dead,
                            c.posted,
                            format!("{:?}", c.parts),
                            c.first,
                            c.stalled,
                            c.starved,
                            open.then_some(c.seen),
                        )
                    })
                    .collect();
                let pools: Vec<_> = s.port.bufs.iter().map(|b| (b.0.free_buffers(), b.1)).collect();
                format!("{conns:?} {pools:?} {:?} {:?}", s.port.ep.transport().recvs, s.port.looked)
            };
            assert_eq!(unpooled(state(kept)), unpooled(state(scan)), "{what}: connections, pools, receives posted");
            for side in sides.iter_mut() {
                for e in side.out.drain(..) {
                    match e {
                        PortEvent::Received { tenant, lease, .. } => side.held.push((tenant, lease)),
                        e if side.port.by_scan => told.push(format!("{e:?}")),
                        _ => {}
                    }
                }
            }
        };
        step(&mut sides, "new ports", &|_| {});
        for peer in 1..=peers {
            step(&mut sides, &format!("peer {peer} opened"), &|s| {
                s.cmds.send(Cmd::Open { peer, epoch: 1 }).unwrap();
                s.control();
            });
            for tenant in 0..tenants {
                step(&mut sides, &format!("tenant {tenant} up at peer {peer}"), &|s| {
                    s.cmds.send(Cmd::Connect { peer, epoch: 1, tenant, blob: b"null".to_vec() }).unwrap();
                    s.settle();
                });
            }
        }
        let cap = sides[0].port.bufs(0).0.geometry().payload_cap();
        // Chains start: their first fragments are held. One of two
        // fragments completes; the rest stall.
        for (t, peer, frags) in [(0, 1, 2), (1, 1, 3), (2, 1, 1), (2, 2, 1), (0, 2, 1)] {
            for k in 0..frags {
                step(&mut sides, &format!("fragment {k} of tenant {t} from peer {peer}"), &|s| {
                    s.land(t, peer, k, 4, 4 * cap)
                });
            }
        }
        step(&mut sides, "a chain of two fragments", &|s| {
            s.land(1, 2, 0, 2, 2 * cap);
            s.land(1, 2, 1, 2, 2 * cap);
        });
        for k in 0..12 {
            step(&mut sides, &format!("looks, {k}s"), &|s| s.wait(1));
        }
        // The rest of the stalled chains comes, and is freed.
        for (t, peer, from) in [(0, 1, 2), (1, 1, 3), (2, 1, 1), (2, 2, 1), (0, 2, 1)] {
            for k in from..4 {
                step(&mut sides, &format!("late fragment {k} of tenant {t} from peer {peer}"), &|s| {
                    s.land(t, peer, k, 4, 4 * cap)
                });
            }
        }
        // Messages land and are held: the pools run dry.
        for (t, peer) in [(0, 3), (1, 3), (1, 2), (2, 3), (0, 3), (1, 3), (0, 1), (2, 1), (2, 2), (0, 2), (1, 1)] {
            step(&mut sides, &format!("a message of tenant {t} from peer {peer}"), &|s| s.land(t, peer, 0, 1, 100));
        }
        // Chains start again, their senders soon waiting for receives
        // while the pool's buffers are elsewhere.
        for (t, peer) in [(0, 1), (1, 1), (2, 1), (2, 2), (1, 2)] {
            step(&mut sides, &format!("another chain of tenant {t} from peer {peer}"), &|s| {
                s.land(t, peer, 0, 3, 3 * cap)
            });
        }
        for k in 0..7 {
            step(&mut sides, &format!("looks, waiting for receives, {k}s"), &|s| s.wait(1));
        }
        // A pause in the looks: no verdict.
        step(&mut sides, "the port not driven", &|s| {
            s.now += Duration::from_secs(90);
            s.control();
        });
        for k in 0..7 {
            step(&mut sides, &format!("looks after the pause, {k}s"), &|s| s.wait(1));
        }
        step(&mut sides, "looks, long after", &|s| s.wait(60));
        // A connection with a chain open fails; a link with chains open
        // goes down.
        step(&mut sides, "tenant 2's connection to peer 2 failed", &|s| {
            let c = s.port.mesh.conn(2, 2).unwrap();
            s.port.ep.transport_mut().abort(c);
            s.settle();
        });
        step(&mut sides, "peer 1 down", &|s| {
            s.cmds.send(Cmd::Down { peer: 1 }).unwrap();
            s.settle();
        });
        step(&mut sides, "the receives of closed connections completed", &|s| {
            flush_dead(&mut s.port);
            s.settle();
        });
        // Given back: the refills post them again.
        for k in 0..sides[0].held.len() {
            step(&mut sides, &format!("held message {k} given back"), &|s| {
                let (t, lease) = s.held.remove(0);
                s.port.bufs_mut(t).free(lease);
                s.control();
            });
        }
        // Both links set up again, in the slots of the old connections.
        for peer in [1, 2] {
            step(&mut sides, &format!("peer {peer} down"), &|s| {
                s.cmds.send(Cmd::Down { peer }).unwrap();
                s.settle();
            });
            step(&mut sides, &format!("peer {peer} opened again"), &|s| {
                s.cmds.send(Cmd::Open { peer, epoch: 2 }).unwrap();
                s.control();
            });
            for tenant in 0..tenants {
                step(&mut sides, &format!("tenant {tenant} up again at peer {peer}"), &|s| {
                    s.cmds.send(Cmd::Connect { peer, epoch: 2, tenant, blob: b"null".to_vec() }).unwrap();
                    s.settle();
                });
            }
        }
        step(&mut sides, "a chain on a new connection", &|s| s.land(1, 1, 0, 2, 2 * cap));
        for k in 0..7 {
            step(&mut sides, &format!("looks at the end, {k}s"), &|s| s.wait(1));
        }
        let count = |what: &str| told.iter().filter(|e| e.starts_with(what)).count();
        assert!(steps > 60, "{steps} steps");
        assert!(count("ChainStalled") >= 3, "chains stalled: {told:?}");
        assert!(count("NoBuffer") >= 3, "connections short of buffers: {told:?}");
    }
}
