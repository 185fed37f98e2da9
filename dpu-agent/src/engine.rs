//! The engine: one data-plane thread that moves every tenant's messages
//! between the host and the fabric (DESIGN.md sections 3 and 5).
//!
//! Per loop iteration, with no allocation and no lock on the way:
//! 1. **uplink**: take descriptors functions pushed into each tenant's
//!    uplink ring (validated and accepted against the tenant pool by the
//!    host link), route them: to a peer node's send queue, to a local
//!    function, or back to the sender as an error descriptor;
//! 2. **schedule**: one weighted deficit round robin round over the tenants'
//!    send queues ([`crate::sched`]); a message goes out as one fabric send
//!    per buffer, straight from the pool (the fabric header is written into
//!    each buffer's headroom), only when its connection has credits;
//! 3. **complete**: poll the fabric in batches: finished sends free their
//!    buffers (or return the message to its sender as an error when the
//!    peer failed); received fragments are collected per connection into a
//!    chain and delivered to the destination function's ring as one
//!    descriptor; every consumed receive is replaced at once with a fresh
//!    buffer of the same tenant's pool (its quota stays posted);
//! 4. **redeliver** messages whose destination ring was full.
//!
//! Every millisecond or so it also runs the mesh (fabric connection setup
//! and repair), checks that host-shimd is alive, and publishes gauges.
//!
//! Isolation: each tenant has its own pool, uplink ring, send queue and
//! fabric connection per peer, and so its own receives and credits; a
//! message received on tenant A's connection lands in A's pool and can
//! only be delivered to A's functions.

use crate::hostlink::HostLink;
use crate::metrics::{Drop as Why, Metrics, Tally};
use crate::sched::{Backlog, Drr, QUANTUM};
use config::Cluster;
use fabric::cluster::MakeTransport;
use fabric::{Buffers, CompletionError, Port, PortEvent, Transport};
use host_shim::backlog::DeliveryBacklog;
use host_shim::{Function, Msg, SendErrorKind};
use shm::pool::Lease;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wire::desc::NO_NODE;
use wire::{DescFlags, Descriptor, ErrorCode};

/// Descriptors taken from one uplink per iteration, by default.
pub const UPLINK_BATCH: usize = 32;
/// How long a message waits for its peer's link to come up before it goes
/// back to its sender as Unreachable.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);
/// How often the control work runs.
const CONTROL_EVERY: Duration = Duration::from_millis(1);
/// How long an idle engine that shares its cores keeps polling (yielding
/// between polls) before it sleeps on events (as long as functions spin on
/// their rings, [`host_shim::function::DEFAULT_SPIN`]).
pub const IDLE_SPIN: Duration = Duration::from_micros(50);
/// Wire bytes the engine keeps in flight on the fabric at most, all
/// tenants together (a message is always allowed when none is; bytes
/// waiting at the port, for a peer's credits or for room in a connection's
/// send window, are not counted). Past it
/// the scheduler holds messages back and decides, by weight and bytes, who
/// goes next when sends complete: the NIC's own per-connection arbitration
/// (by message) never sees a backlog to reorder. 1 MiB covers 100 Gb/s
/// with about 80 us of completion delay.
pub const INFLIGHT_BUDGET: u64 = 1 << 20;
/// A node that has had messages of this engine on the wire and completed
/// none of them for this long is stalled (its agent stopped, say): what
/// it holds no longer counts against [`INFLIGHT_BUDGET`].
pub const STALLED_AFTER: Duration = Duration::from_millis(20);
/// Messages of one tenant waiting for the scheduler before its uplink is
/// left alone (then the uplink ring fills and functions see `Full`).
const QUEUE_LIMIT: usize = host_shim::daemon::UPLINK_CAPACITY as usize;
/// Messages the send queues of one engine reserve at start, all tenants
/// and peers together: each (tenant, peer) queue reserves its share, at
/// most 256 and at least 8, and grows past it only when a burst needs it.
/// A small cluster's queues reserve 256 each, so its data path does not
/// allocate; a large one's do not take gigabytes before a message moves.
const SEND_RESERVE: usize = 1 << 18;
const _: () = assert!(config::MAX_NODE_QUEUE as usize == QUEUE_LIMIT);
// Calls of one tenant waiting for one node (or one function's nodes)
// beyond its `node_queue` (config) go back to their senders as
// `Overloaded`: a node that takes nothing (stopped, overloaded) holds that
// many calls, and the tenant's uplink keeps flowing for the other nodes (it
// stops only at `QUEUE_LIMIT`, with several such nodes). Replies and errors
// are not refused (an `Overloaded` error in place of a reply would wait in
// the same queue): only `QUEUE_LIMIT` bounds them.
/// A nap when the engine cannot sleep on events.
const NAP: Duration = Duration::from_micros(50);
/// One tenant's failed frees ([`HostLink::free_failed`]). A process of the
/// tenant can make every free fail, at message rate: they are logged as
/// host-shimd's bridge logs its own, the first at the next control pass,
/// then at most once per [`host_shim::bridge::FREE_FAILED_LOG_EVERY`] with
/// the count since the last line.
#[derive(Clone, Debug, Default)]
struct FreeFailed {
    /// By reason, as the host link last reported its running totals.
    seen: Vec<(&'static str, u64)>,
    /// What is still to be logged, and when.
    log: host_shim::bridge::FreeFailedLog,
}

impl FreeFailed {
    /// Failures so far.
    fn total(&self) -> u64 {
        self.seen.iter().map(|&(_, n)| n).sum()
    }
}

/// Records `total`, a running count for `reason`, in `seen`; returns how
/// much it grew since the last (all of it the first time; nothing if the
/// count went down).
fn grown(seen: &mut Vec<(&'static str, u64)>, reason: &'static str, total: u64) -> u64 {
    let before = match seen.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, last)) => std::mem::replace(last, total).min(total),
        None => {
            seen.push((reason, total));
            0
        }
    };
    total - before
}

/// How the engine ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Stopped,
    /// host-shimd went away: the caller re-attaches and starts a new engine.
    HostLost,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's id.
    pub node: u16,
    /// Idle policy. `Some(after)`: the node shares its cores with
    /// everything else (emulated mode), so an empty poll yields the core,
    /// and after `after` without work the loop sleeps until a function
    /// sends, the fabric has news, or the next control tick. `None`: spin
    /// forever (a core of its own, as on the DPU).
    pub idle_sleep_after: Option<Duration>,
    /// Start of the process: latency tags are nanoseconds since.
    pub epoch: Instant,
    /// Descriptors taken from each tenant's uplink per iteration
    /// ([`UPLINK_BATCH`]; the `engine` benchmark also runs 1).
    pub batch: usize,
    /// Which data-plane core this engine is (`--cores`), for readiness
    /// and status.
    pub core: usize,
}

/// A message waiting for the scheduler.
#[derive(Debug)]
struct Out {
    msg: Msg,
    /// Its queue: the node it goes to, or, from `fabric_nodes` on,
    /// `fabric_nodes + k` for a call to the function with key `k` of its
    /// tenant ([`Engine::fn_key`]) that runs on several other nodes, bound
    /// to one of them only when it is sent (see [`Engine::spread_fn`]).
    peer: u16,
    since: Instant,
}

/// The host link of one tenant, as the fabric port's buffer source.
#[derive(Debug)]
pub struct Link<H>(pub H);

impl<H: HostLink> Buffers for Link<H> {
    fn view(&self) -> fabric::PoolView<'_> {
        self.0.view()
    }
    fn alloc_one(&mut self) -> Option<Lease> {
        self.0.alloc_buffer()
    }
    fn free(&mut self, lease: Lease) {
        self.0.free(Msg::from_parts(lease, Descriptor::default()));
    }
}

/// One tenant's messages waiting for the scheduler: a FIFO per peer node,
/// so a peer without credits (or down) holds back only the messages for
/// it, never the tenant's traffic to the other peers; and one per function
/// that runs on several other nodes, whose calls wait there until one of
/// those nodes can take one.
#[derive(Debug)]
struct Sends<O = Out> {
    /// Indexed by peer node id.
    by_peer: Vec<VecDeque<O>>,
    /// The peers with messages waiting, in turn order: the first whose head
    /// can go is served, then goes to the back (round robin over peers).
    active: VecDeque<u16>,
    len: usize,
}

/// What [`Sends`] holds: something for a peer node.
trait ForPeer {
    fn peer(&self) -> u16;
}

impl ForPeer for Out {
    fn peer(&self) -> u16 {
        self.peer
    }
}

impl<O: ForPeer> Sends<O> {
    /// Queues for `peers` nodes, each with room for `room` messages, then
    /// `spread` more (allocated when first used).
    fn new(peers: u16, spread: usize, room: usize) -> Self {
        let by_peer =
            (0..peers).map(|_| VecDeque::with_capacity(room)).chain((0..spread).map(|_| VecDeque::new())).collect();
        Self { by_peer, active: VecDeque::with_capacity(usize::from(peers)), len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `out` behind the other messages for its peer (a valid node
    /// id: the caller routed it).
    #[inline]
    fn push(&mut self, out: O) {
        let peer = out.peer();
        let q = &mut self.by_peer[usize::from(peer)];
        if q.is_empty() {
            self.active.push_back(peer);
        }
        q.push_back(out);
        self.len += 1;
    }

    /// The position in turn order of the first peer whose head message
    /// `ready` accepts.
    #[inline]
    fn pick(&self, ready: impl Fn(&O) -> bool) -> Option<usize> {
        for (i, &p) in self.active.iter().enumerate() {
            if let Some(o) = self.by_peer[usize::from(p)].front()
                && ready(o)
            {
                return Some(i);
            }
        }
        None
    }

    /// The head message of the peer at position `i` in turn order.
    #[inline]
    fn head(&self, i: usize) -> Option<&O> {
        self.active.get(i).and_then(|&p| self.by_peer[usize::from(p)].front())
    }

    /// Makes the peer at position `i` the first in turn.
    #[inline]
    fn bring_forward(&mut self, i: usize) {
        if let Some(p) = self.active.remove(i) {
            self.active.push_front(p);
        }
    }

    /// Takes the head message of the peer at position `i`; that peer's
    /// turn is over.
    #[inline]
    fn take(&mut self, i: usize) -> Option<O> {
        let p = *self.active.get(i)?;
        let q = &mut self.by_peer[usize::from(p)];
        let out = q.pop_front()?;
        self.len -= 1;
        let more = !q.is_empty();
        // One peer alone keeps its place (the common case: no reordering).
        if !(more && self.active.len() == 1) {
            self.active.remove(i);
            if more {
                self.active.push_back(p);
            }
        }
        Some(out)
    }

    /// Messages waiting for `peer`.
    fn queued_for(&self, peer: u16) -> usize {
        self.by_peer.get(usize::from(peer)).map_or(0, VecDeque::len)
    }

    /// Takes every message waiting for `peer`.
    fn take_peer(&mut self, peer: u16) -> VecDeque<O> {
        self.active.retain(|&p| p != peer);
        let q = std::mem::take(&mut self.by_peer[usize::from(peer)]);
        self.len -= q.len();
        q
    }
}

#[derive(Debug)]
struct Tenant {
    /// Its messages waiting for the scheduler: a queue per fabric node,
    /// then one per function of the tenant, by key ([`Engine::fn_key`]).
    sends: Sends,
    /// Local deliveries waiting for room in the destination ring, with the
    /// node each came from over the fabric (`None`: from this node); its
    /// functions by key.
    backlog: DeliveryBacklog<(Msg, Option<u16>)>,
    /// The cluster ids of its functions, by key.
    fns: Vec<u16>,
}

/// The engine of one node, over fabric transport `T` and host links `H`.
pub struct Engine<T: Transport, H: HostLink = Function> {
    cfg: Arc<Cluster>,
    set: Settings,
    /// Nodes of each function id.
    fn_nodes: Vec<Vec<u16>>,
    /// Per function id: where the next pick of one of its nodes starts.
    fn_next: Vec<usize>,
    /// Per tenant and buffer index: the node the message last delivered
    /// with that head buffer came from over the fabric ([`NO_NODE`]: from
    /// this node). An error a host link hands back about it (DPU mode: the
    /// bridge found no instance) goes there: its sender may run on several
    /// nodes.
    arrived: Vec<Vec<u16>>,
    /// Per tenant and buffer index: the caller's node a call marked
    /// ELSEWHERE is on its way back to (see [`Engine::undeliverable`]),
    /// from when it is marked (a host link may rewrite its headers first)
    /// until its send completes or fails ([`NO_NODE`]: none). A failed
    /// send drops it: an error about it could go only there.
    back_to: Vec<Vec<u16>>,
    /// Entries of `back_to` set (none: nothing to look up or clear).
    backs: usize,
    /// Tenant of each function id.
    fn_tenant: Vec<u16>,
    /// Per function id: its key, its index among its tenant's functions
    /// (in cluster order). A tenant's queues and backlog have a place for
    /// each of its own functions only, so they grow with the cluster's
    /// functions, not with tenants times functions. Meaningful for the
    /// functions of this engine's tenants.
    fn_key: Vec<u16>,
    /// Per tenant: uplink rejections by reason, as the host link last
    /// reported its running totals.
    rejected_seen: Vec<Vec<(&'static str, u64)>>,
    /// Per tenant: failed frees of its buffers.
    free_failed: Vec<FreeFailed>,
    /// Number of fabric nodes (worker nodes and ingresses).
    fabric_nodes: u16,
    /// This engine's tenants (indexed by position, as in `port`) and their
    /// cluster ids: all of them with one data-plane core, a share with
    /// several (`--cores`).
    tenants: Vec<Tenant>,
    ids: Vec<u16>,
    port: Port<T, Link<H>>,
    drr: Drr,
    metrics: Arc<Metrics>,
    /// Per-tenant counts not yet added to `metrics` (see
    /// [`crate::metrics`]).
    tally: Vec<Tally>,
    /// Per function id: deliveries (messages, bytes) not yet added.
    fn_tally: Vec<(u64, u64)>,
    /// The function ids whose `fn_tally` is not zero, each once: a flush
    /// visits these, not every function of the cluster. Its capacity,
    /// reserved at start, is the number of `here_fns` (the only
    /// ones delivered to), so it never grows on the data path.
    fn_moved: Vec<u16>,
    /// The functions of this engine's tenants that run on this node:
    /// function id and the tenant's index here (the per-function gauges
    /// this engine publishes).
    here_fns: Vec<(u16, u16)>,
    events: Vec<PortEvent>,
    next_status: Instant,
    /// Wire bytes sent and not yet completed ([`INFLIGHT_BUDGET`]).
    inflight: u64,
    /// Per fabric node: what of `inflight` went there.
    wire: Vec<OnWire>,
    /// Per tenant and fabric node: when its link went down, the start of
    /// the latest outage (`None`: never seen down). A message waits
    /// [`UNREACHABLE_AFTER`] for a link from the later of its queueing and
    /// this: a call that waited long for credits is not bounced the moment
    /// its node's link blips. A link that goes down again less than
    /// [`UNREACHABLE_AFTER`] after the tenant's connection came up, or
    /// before it came up, is in the same outage (a flapping link would
    /// otherwise start the wait anew at every flap, and hold the calls for
    /// as long as it flaps). So a connection that fails (a new outage when
    /// it had been up that long), comes back and goes down again within
    /// that time is in the outage that began at its failure: a message
    /// that had waited long for credits waits [`UNREACHABLE_AFTER`] from
    /// the failure, the time the link was up again included, and goes back
    /// at the second down if that has passed. Per tenant: after a blip the
    /// tenants' connections come up one by one.
    went_down: Vec<Vec<Option<Instant>>>,
    /// Per tenant and fabric node: when the tenant's connection to it came
    /// up (`None`: it has gone down since, or never came up), to tell a
    /// flap from a new outage (see `went_down`). A connection that fails
    /// is not up at once for the port, but its outage starts only when the
    /// engine sees it: at the `PeerDown` of the link's reset that follows,
    /// or at the next control pass, where the port reports the failure
    /// ([`PortEvent::Down`], see `conn_lost`). Until then a message
    /// waits for it as for one that is up: one that waited long for
    /// credits is not bounced in that moment.
    came_up: Vec<Vec<Option<Instant>>>,
    /// Wire bytes of the nodes that are stalled ([`STALLED_AFTER`]), as
    /// of the last control pass.
    stalled: u64,
    /// Function entries the control passes visited (publishing
    /// per-function counters and gauges), for tests.
    #[cfg(test)]
    fn_visits: usize,
    /// Tenant connections (tenant, node) looked at for a failure the
    /// engine has not seen yet, for tests.
    #[cfg(test)]
    conn_looks: usize,
    /// The port's `Down`s (tenant, node) and `PeerDown`s (node) the
    /// engine handled, in order, for tests.
    #[cfg(test)]
    downs: Vec<(u16, u16)>,
    #[cfg(test)]
    peer_downs: Vec<u16>,
    /// Tenant connections (tenant, node) whose credits the control passes
    /// looked at (for the `credits` gauge), for tests.
    #[cfg(test)]
    credit_looks: usize,
}

/// This engine's messages on the wire to one node.
#[derive(Clone, Copy, Debug, Default)]
struct OnWire {
    /// Wire bytes sent and not yet completed.
    bytes: u64,
    /// Sends completed since the last control pass.
    done: u32,
    /// Since when bytes have been out and none completed.
    quiet_since: Option<Instant>,
}

impl<T: Transport, H: HostLink> core::fmt::Debug for Engine<T, H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine").field("node", &self.set.node).finish_non_exhaustive()
    }
}

impl<T: Transport, H: HostLink> Engine<T, H> {
    /// Builds the engine over attached host links (one per tenant, in
    /// tenant order): registers each pool with the fabric, starts the mesh.
    pub fn new(
        cfg: Arc<Cluster>,
        set: Settings,
        links: Vec<H>,
        metrics: Arc<Metrics>,
        make: MakeTransport<T>,
    ) -> anyhow::Result<Self> {
        let all: Vec<u16> = (0..cfg.tenants.len() as u16).collect();
        let mesh = fabric::cluster::start_meshes(&cfg, set.node, std::slice::from_ref(&all))?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no mesh"))?;
        Self::on_mesh(cfg, set, mesh, all.into_iter().zip(links).collect(), metrics, make)
    }

    /// Builds the engine of some tenants (`links`: cluster tenant id and
    /// host link) over a half of the node's mesh for them (one of
    /// [`fabric::cluster::start_meshes`]), for one of several data-plane
    /// cores.
    pub fn on_mesh(
        cfg: Arc<Cluster>,
        set: Settings,
        mesh: fabric::Mesh,
        links: Vec<(u16, H)>,
        metrics: Arc<Metrics>,
        make: MakeTransport<T>,
    ) -> anyhow::Result<Self> {
        let now = Instant::now();
        let ids: Vec<u16> = links.iter().map(|(id, _)| *id).collect();
        let flights = ids.len() * host_shim::daemon::UPLINK_CAPACITY as usize;
        let bufs = links.into_iter().map(|(id, h)| (id, Link(h))).collect();
        let port = fabric::cluster::open_port_on(&cfg, set.node, mesh, bufs, flights, make)?;
        let weights: Vec<(u32, Option<u64>)> = ids
            .iter()
            .map(|&id| &cfg.tenants[usize::from(id)])
            .map(|t| (t.weight, t.rate_cap_mbps.map(|m| u64::from(m) * 1_000_000)))
            .collect();
        let fabric_nodes = cfg.fabric_nodes();
        // A node per buffer of each tenant's pool ([`NO_NODE`] for now).
        let per_buffer =
            || ids.iter().map(|&id| vec![NO_NODE; cfg.tenants[usize::from(id)].buffers as usize]).collect();
        let room = (SEND_RESERVE / (ids.len() * usize::from(fabric_nodes)).max(1)).clamp(8, 256);
        let fn_tenant: Vec<u16> = cfg.functions.iter().map(|f| cfg.tenant_id(&f.tenant).unwrap_or(u16::MAX)).collect();
        let mut local_of = vec![None; cfg.tenants.len()];
        for (t, &id) in ids.iter().enumerate() {
            if let Some(l) = local_of.get_mut(usize::from(id)) {
                *l = Some(t as u16);
            }
        }
        let mut fns = vec![Vec::new(); ids.len()];
        let mut fn_key = vec![0; cfg.functions.len()];
        for (f, &id) in fn_tenant.iter().enumerate() {
            if let Some(&Some(t)) = local_of.get(usize::from(id)) {
                let own: &mut Vec<u16> = &mut fns[usize::from(t)];
                fn_key[f] = own.len() as u16;
                own.push(f as u16);
            }
        }
        let tenants = fns
            .into_iter()
            .zip(&ids)
            .map(|(fns, &id)| {
                // A function's queue key, `fabric_nodes + key`, is a u16.
                if u16::try_from(usize::from(fabric_nodes) + fns.len()).is_err() {
                    anyhow::bail!(
                        "tenant {} has {} functions and the cluster {fabric_nodes} fabric nodes; \
                         an engine numbers both within 65535",
                        cfg.tenants[usize::from(id)].name,
                        fns.len()
                    );
                }
                Ok(Tenant {
                    sends: Sends::new(fabric_nodes, fns.len(), room),
                    backlog: DeliveryBacklog::new(fns.len()),
                    fns,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let ntenants = ids.len();
        let fn_nodes: Vec<Vec<u16>> = cfg.functions.iter().map(|f| cfg.function_nodes(f)).collect();
        let here_fns: Vec<(u16, u16)> = (0..cfg.functions.len())
            .filter(|&f| fn_nodes[f].contains(&set.node))
            .filter_map(|f| Some((f as u16, local_of.get(usize::from(fn_tenant[f])).copied().flatten()?)))
            .collect();
        Ok(Self {
            tally: vec![Tally::default(); ids.len()],
            fn_tally: vec![(0, 0); cfg.functions.len()],
            fn_moved: Vec::with_capacity(here_fns.len()),
            here_fns,
            fn_nodes,
            fn_next: vec![0; cfg.functions.len()],
            arrived: per_buffer(),
            back_to: per_buffer(),
            backs: 0,
            fn_tenant,
            fn_key,
            rejected_seen: vec![Vec::new(); ids.len()],
            free_failed: vec![FreeFailed::default(); ids.len()],
            fabric_nodes,
            drr: Drr::new(&weights, QUANTUM, now),
            cfg,
            set,
            tenants,
            ids,
            port,
            metrics,
            events: Vec::with_capacity(256),
            next_status: now,
            inflight: 0,
            wire: vec![OnWire::default(); usize::from(fabric_nodes)],
            went_down: vec![vec![None; usize::from(fabric_nodes)]; ntenants],
            came_up: vec![vec![None; usize::from(fabric_nodes)]; ntenants],
            stalled: 0,
            #[cfg(test)]
            fn_visits: 0,
            #[cfg(test)]
            conn_looks: 0,
            #[cfg(test)]
            downs: Vec::new(),
            #[cfg(test)]
            peer_downs: Vec::new(),
            #[cfg(test)]
            credit_looks: 0,
        })
    }

    /// The cluster id of this engine's tenant `t`.
    #[inline]
    fn gid(&self, t: usize) -> usize {
        usize::from(self.ids[t])
    }

    fn link(&mut self, t: usize) -> &mut H {
        &mut self.port.bufs_mut(t as u16).0
    }

    /// Runs until `stop` is set or host-shimd goes away.
    pub fn run(&mut self, stop: &AtomicBool) -> Exit {
        let mut next_control = Instant::now();
        let mut idle_since = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_control {
                if stop.load(Ordering::Relaxed) {
                    self.answer_before_stopping();
                    self.flush();
                    return Exit::Stopped;
                }
                if !(0..self.tenants.len()).all(|t| self.port.bufs(t as u16).0.alive()) {
                    self.flush();
                    return Exit::HostLost;
                }
                self.control(now);
                next_control = now + CONTROL_EVERY;
            }
            if self.step(now) > 0 {
                idle_since = now;
            } else if let Some(after) = self.set.idle_sleep_after {
                if now.duration_since(idle_since) > after {
                    // Idle for a while: sleep until a function sends, the
                    // fabric has news, or the next control tick.
                    self.sleep(next_control.saturating_duration_since(now));
                } else {
                    // Sharing cores: an empty poll first gives the core to
                    // whoever is runnable (the functions, the ingress).
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Sleeps up to `max` on the uplinks' doorbells and the fabric's
    /// notification fd. Without a notification fd or a link's wake fd, or
    /// with deliveries waiting for room in a function's ring (nothing would
    /// wake us), it naps [`NAP`] instead.
    fn sleep(&mut self, max: Duration) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let n = self.tenants.len();
        if self.port.notification_fd().is_none()
            || self.tenants.iter().any(|t| !t.backlog.is_empty())
            || (0..n).any(|t| self.port.bufs(t as u16).0.wake_fd().is_none())
        {
            std::thread::sleep(max.min(NAP));
            return;
        }
        self.port.clear_notification();
        // What happened before the clear is found now.
        if self.step(Instant::now()) > 0 {
            return;
        }
        let mut armed = 0;
        while armed < n && self.link(armed).sleep_begin() {
            armed += 1;
        }
        if armed == n {
            // Built only when going to sleep (idle), never per message.
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(n + 1);
            if let Some(fd) = self.port.notification_fd() {
                fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
            }
            for t in 0..n {
                if let Some(fd) = self.port.bufs(t as u16).0.wake_fd() {
                    fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
                }
            }
            let ts = Timespec { tv_sec: max.as_secs() as i64, tv_nsec: i64::from(max.subsec_nanos()) };
            if let Err(e) = poll(&mut fds, Some(&ts))
                && e != rustix::io::Errno::INTR
            {
                log::warn!("engine: sleeping: {e}");
                std::thread::sleep(max.min(NAP));
            }
        }
        for t in 0..armed.min(n) {
            self.link(t).sleep_end();
        }
        // The one that refused to sleep (work waiting) needs no end; but
        // ending is harmless and keeps its flag clear.
        if armed < n {
            self.link(armed).sleep_end();
        }
    }

    /// One pass of the data path: uplinks, one scheduler round, one fabric
    /// poll, the delivery backlog. Returns how much work it found.
    pub fn step(&mut self, now: Instant) -> usize {
        let mut work = self.uplink(now);
        work += self.schedule(now);
        work += self.complete(now);
        work + self.redeliver()
    }

    /// Tenant connections that are up.
    pub fn conns_up(&self) -> usize {
        self.port.conns_up()
    }

    /// The control work: fabric connection setup and repair, gauges,
    /// status (run every `CONTROL_EVERY` by [`run`](Self::run)).
    pub fn control(&mut self, now: Instant) {
        self.flush();
        if self.port.in_flight() == 0 {
            // Nothing in flight: nothing counted either (a safety net; every
            // send's completion subtracts what it added).
            self.inflight = 0;
            self.wire.iter_mut().for_each(|w| w.bytes = 0);
        }
        self.stalled = 0;
        for w in &mut self.wire {
            if w.bytes == 0 || w.done > 0 {
                w.quiet_since = None;
            } else if now.saturating_duration_since(*w.quiet_since.get_or_insert(now)) >= STALLED_AFTER {
                self.stalled += w.bytes;
            }
            w.done = 0;
        }
        let mut events = std::mem::take(&mut self.events);
        self.port.control(&mut events);
        self.handle(&mut events, now);
        self.events = events;
        self.metrics.peers_up.set(i64::from(self.port.peers_up()));
        for t in 0..self.tenants.len() {
            let m = &self.metrics.tenants[self.gid(t)];
            m.queue_depth.set(self.tenants[t].sends.len() as i64);
            m.recvs_posted.set(i64::from(self.port.recvs_posted(t as u16)));
            let g = self.gid(t);
            let (metrics, name, seen) = (&self.metrics, &self.cfg.tenants[g].name, &mut self.rejected_seen[t]);
            let link = &self.port.bufs(t as u16).0;
            link.rejected(&mut |reason, total| metrics.add_uplink_rejected(name, reason, grown(seen, reason, total)));
            let ff = &mut self.free_failed[t];
            link.free_failed(&mut |reason, total| {
                let n = grown(&mut ff.seen, reason, total);
                metrics.add_free_failed(name, reason, n);
                ff.log.add(n);
            });
            if let Some(n) = ff.log.due(now) {
                log::warn!(
                    "tenant {name}: {n} frees of buffers the agent held failed ({} so far, by reason {:?}): a process of the tenant rewrote their owner words or chain links; they stay out of the pool until host-shimd reclaims them",
                    ff.total(),
                    ff.seen
                );
            }
        }
        self.metrics.set_ready(self.set.core, true);
        if now >= self.next_status {
            self.next_status = now + Duration::from_millis(100);
            // A sum over every tenant's connection to every node: at the
            // status ticks, not at every pass.
            for t in 0..self.tenants.len() {
                let credits: u32 = (0..self.fabric_nodes).map(|p| self.port.credits(t as u16, p)).sum();
                self.metrics.tenants[self.gid(t)].credits.set(i64::from(credits));
                #[cfg(test)]
                {
                    self.credit_looks += usize::from(self.fabric_nodes);
                }
            }
            for &(f, t) in &self.here_fns {
                #[cfg(test)]
                {
                    self.fn_visits += 1;
                }
                let f = usize::from(f);
                let depth = self.port.bufs(t).0.queue_depth(&self.cfg.functions[f].name).unwrap_or(0);
                self.metrics.functions[f].queue_depth.set(depth as i64);
            }
            self.metrics.set_status(self.set.core, self.status_part());
        }
    }

    /// Adds the data path's own counts to the shared metrics.
    pub fn flush(&mut self) {
        for (t, tally) in self.tally.iter_mut().enumerate() {
            tally.flush(&self.metrics.tenants[usize::from(self.ids[t])]);
        }
        for f in self.fn_moved.drain(..) {
            #[cfg(test)]
            {
                self.fn_visits += 1;
            }
            let f = usize::from(f);
            if let (Some(t), Some(m)) = (self.fn_tally.get_mut(f), self.metrics.functions.get(f)) {
                let (n, b) = std::mem::take(t);
                m.delivered.inc_by(n);
                m.delivered_bytes.inc_by(b);
            }
        }
    }

    /// This core's part of the `/status` document.
    fn status_part(&self) -> crate::metrics::StatusPart {
        use std::fmt::Write as _;
        let node = &self.cfg.nodes[usize::from(self.set.node)];
        let mut part = crate::metrics::StatusPart {
            node: node.name.clone(),
            mode: format!("{:?}", node.mode),
            peers: u32::from(self.fabric_nodes - 1),
            peers_up: self.port.peers_up(),
            conns_up: self.port.conns_up(),
            tenants: Vec::with_capacity(self.tenants.len()),
        };
        for (i, t) in self.tenants.iter().enumerate() {
            let m = &self.metrics.tenants[self.gid(i)];
            let mut s = String::new();
            let _ = write!(
                s,
                "{{\"name\":\"{}\",\"core\":{},\"queue\":{},\"backlog\":{},\"tx_messages\":{},\"rx_messages\":{},\"free_buffers\":{},\"free_failed\":{},\"drops\":{{",
                self.cfg.tenants[self.gid(i)].name,
                self.set.core,
                t.sends.len(),
                t.backlog.len(),
                m.tx_msgs.get(),
                m.rx_msgs.get(),
                self.port.bufs(i as u16).0.free_buffers(),
                self.free_failed[i].total(),
            );
            for (k, w) in Why::ALL.iter().enumerate() {
                let _ = write!(s, "{}\"{}\":{}", if k > 0 { "," } else { "" }, w.as_str(), m.drops(*w));
            }
            s.push_str("}}");
            part.tenants.push((self.ids[i], s));
        }
        part
    }

    /// Acts on what the port reported.
    fn handle(&mut self, events: &mut Vec<PortEvent>, now: Instant) {
        for e in events.drain(..) {
            match e {
                PortEvent::Up { tenant, peer } => {
                    if let Some(u) = self.came_up[usize::from(tenant)].get_mut(usize::from(peer)) {
                        *u = Some(now);
                    }
                    log::info!(
                        "fabric: tenant {} connected to node {peer}",
                        self.cfg.tenants[self.gid(usize::from(tenant))].name
                    );
                }
                PortEvent::Down { tenant, peer } => {
                    #[cfg(test)]
                    self.downs.push((tenant, peer));
                    self.conn_lost(tenant, peer, now)
                }
                PortEvent::PeerDown { peer } => {
                    #[cfg(test)]
                    self.peer_downs.push(peer);
                    self.peer_down(peer, now)
                }
                PortEvent::Sent { tenant, peer, lease, desc, tag, result } => {
                    let t = usize::from(tenant);
                    let msg = Msg::from_parts(lease, desc);
                    self.inflight = self.inflight.saturating_sub(wire_bytes(&msg));
                    if let Some(w) = self.wire.get_mut(usize::from(peer)) {
                        w.bytes = w.bytes.saturating_sub(wire_bytes(&msg));
                        w.done += 1;
                    }
                    match result {
                        Ok(()) => {
                            let m = &mut self.tally[t];
                            m.tx_msgs += 1;
                            m.tx_bytes += u64::from(msg.len());
                            let el = now.saturating_duration_since(self.set.epoch).as_nanos() as u64;
                            m.latency.observe_ns(el.saturating_sub(tag));
                            self.clear_back(t, msg.desc().buf);
                            self.free_msg(t, msg);
                        }
                        Err(_) => self.bounce(t, msg, ErrorCode::PeerDied, Why::PeerDied),
                    }
                }
                PortEvent::Received { tenant, peer, lease, desc } => {
                    let t = usize::from(tenant);
                    let msg = Msg::from_parts(lease, desc);
                    let m = &mut self.tally[t];
                    m.rx_msgs += 1;
                    m.rx_bytes += u64::from(msg.len());
                    self.deliver(t, msg, Some(peer));
                }
                PortEvent::Protocol { tenant, .. } => {
                    self.metrics.tenants[self.gid(usize::from(tenant))].drop(Why::Protocol)
                }
                PortEvent::NoBuffer { tenant } => {
                    self.metrics.tenants[self.gid(usize::from(tenant))].drop(Why::NoBuffer)
                }
                PortEvent::ChainStalled { tenant, .. } => {
                    self.metrics.tenants[self.gid(usize::from(tenant))].drop(Why::StalledChain)
                }
            }
        }
    }

    /// Tenant `t`'s connection to `p` went down at `now`: a new outage,
    /// unless the link is flapping (see `went_down`).
    fn went_down_at(&mut self, t: usize, p: usize, now: Instant) {
        let down = self.went_down.get_mut(t).and_then(|d| d.get_mut(p));
        let up = self.came_up.get_mut(t).and_then(|u| u.get_mut(p));
        let (Some(down), Some(up)) = (down, up) else { return };
        let settled = up.take().is_some_and(|u| now.saturating_duration_since(u) >= UNREACHABLE_AFTER);
        if down.is_none() || settled {
            *down = Some(now);
        }
    }

    /// Tenant `tenant`'s connection to `peer` failed (the port's
    /// [`PortEvent::Down`], at a control pass): if it came up and is not
    /// up now (the `PeerDown` of the link's reset has not come yet), it
    /// went down at `now` (see `came_up`).
    fn conn_lost(&mut self, tenant: u16, peer: u16, now: Instant) {
        #[cfg(test)]
        {
            self.conn_looks += 1;
        }
        let (t, p) = (usize::from(tenant), usize::from(peer));
        let came_up = self.came_up.get(t).and_then(|u| u.get(p)).is_some_and(Option::is_some);
        if came_up && !self.port.is_up(tenant, peer) {
            self.went_down_at(t, p, now);
        }
    }

    fn peer_down(&mut self, peer: u16, now: Instant) {
        // Messages queued for the peer go back to their senders (calls to
        // a function with other nodes wait in its own queue, not here).
        if peer >= self.fabric_nodes {
            return;
        }
        for t in 0..self.went_down.len() {
            self.went_down_at(t, usize::from(peer), now);
        }
        for t in 0..self.tenants.len() {
            let mut q = self.tenants[t].sends.take_peer(peer);
            for out in q.drain(..) {
                self.bounce(t, out.msg, ErrorCode::Unreachable, Why::Unreachable);
            }
            // The emptied queue goes back, with its room, unless a bounce
            // queued something new for the peer meanwhile.
            let s = &mut self.tenants[t].sends;
            if s.by_peer[usize::from(peer)].is_empty() {
                s.by_peer[usize::from(peer)] = q;
            }
        }
    }

    /// Takes descriptors off the uplinks and routes them.
    fn uplink(&mut self, now: Instant) -> usize {
        let mut n = 0;
        for t in 0..self.tenants.len() {
            for _ in 0..self.set.batch {
                if self.tenants[t].sends.len() >= QUEUE_LIMIT {
                    // Nothing taken, but the link keeps working (in DPU
                    // mode a spinning engine would otherwise stop reading
                    // comch, and so stop getting receive buffers back).
                    self.link(t).progress();
                    break;
                }
                let Some(msg) = self.link(t).take() else { break };
                n += 1;
                self.tally[t].uplink_msgs += 1;
                self.route(t, msg, now);
            }
            for _ in 0..self.set.batch {
                let Some(msg) = self.link(t).take_returned() else { break };
                n += 1;
                let from = self.arrived[t].get(msg.desc().buf as usize).copied();
                self.undeliverable(t, msg, from);
            }
            for _ in 0..self.set.batch {
                let Some(d) = self.link(t).take_lost() else { break };
                n += 1;
                let from = self.arrived[t].get(d.buf as usize).copied();
                self.answer_lost(t, d, from);
            }
        }
        n
    }

    /// Where a message from a local function goes.
    fn route(&mut self, t: usize, msg: Msg, now: Instant) {
        let d = *msg.desc();
        let peer = if d.flags & DescFlags::REPLY != 0 {
            // Replies travel to the ingress that originated the request.
            if d.origin == NO_NODE || d.origin >= self.fabric_nodes || d.origin == self.set.node {
                self.drop_msg(t, msg, Why::BadOrigin);
                return;
            }
            d.origin
        } else if let Some(n) = self.error_back(t, &d) {
            n
        } else if let Some(n) = self.back_of(t, &d) {
            // Back to its caller's node (not held to the node's share: at
            // most one per call that node sent here).
            return self.tenants[t].sends.push(Out { msg, peer: n, since: now });
        } else {
            let f = usize::from(d.dst_fn);
            if f >= self.fn_nodes.len() {
                return self.bounce(t, msg, ErrorCode::UnknownFunction, Why::UnknownFunction);
            }
            if self.fn_tenant[f] != self.ids[t] {
                // A function of another tenant: refused here, not sent to
                // be refused by the peer.
                return self.bounce(t, msg, ErrorCode::TenantMismatch, Why::TenantMismatch);
            }
            let here = self.runs_here(f);
            // (An error for a caller here is delivered here, whatever the
            // call it answers was marked.)
            let elsewhere = d.flags & (DescFlags::ELSEWHERE | DescFlags::ERROR) == DescFlags::ELSEWHERE;
            if here && !elsewhere {
                // An instance on this node: no fabric hop.
                return self.deliver(t, msg, None);
            }
            match self.fn_nodes[f][..] {
                [n] if !here => n,
                // Several nodes: bound to one when it is sent (never this
                // one, to which there is no connection: so a call marked
                // ELSEWHERE, whose function has no live instance here, goes
                // to another).
                [_, _, ..] => {
                    if here {
                        self.metrics.tenants[self.gid(t)].elsewhere.inc();
                    }
                    // (Fits: checked at start.)
                    self.fabric_nodes + self.fn_key[f]
                }
                // Marked ELSEWHERE for a function on this node alone; or
                // (never: the cluster file is checked when loaded) one on
                // no node.
                _ => return self.bounce(t, msg, ErrorCode::Unreachable, Why::Unreachable),
            }
        };
        // Queued even while the peer's link is down: it may be coming up
        // (this agent just restarted, or the peer did); the scheduler
        // bounces it as Unreachable only after UNREACHABLE_AFTER.
        // Calls beyond the node's share go back; replies and errors wait
        // (an error in place of a reply would wait in the same queue).
        let call = d.flags & (DescFlags::REPLY | DescFlags::ERROR) == 0;
        if call && self.share_used(t, peer) {
            return self.bounce(t, msg, ErrorCode::Overloaded, Why::Overloaded);
        }
        self.tenants[t].sends.push(Out { msg, peer, since: now });
    }

    /// Whether tenant `t` has its `node_queue` of messages waiting for
    /// `peer` (a node, or a function's nodes) already: a call for it goes
    /// back to its sender as `Overloaded`.
    fn share_used(&self, t: usize, peer: u16) -> bool {
        self.tenants[t].sends.queued_for(peer) >= self.cfg.tenants[self.gid(t)].node_queue as usize
    }

    /// Stopping: the messages still waiting to be sent go back as
    /// `Unreachable`, so that callers on this node hear at once instead of
    /// waiting for replies that will never come (errors for callers on
    /// other nodes or an ingress are queued and not sent: those see this
    /// node go down, and what it had taken fail as `PeerDied`).
    fn answer_before_stopping(&mut self) {
        for t in 0..self.tenants.len() {
            let mut waiting = Vec::with_capacity(self.tenants[t].sends.len());
            while let Some(o) = self.tenants[t].sends.take(0) {
                waiting.push(o.msg);
            }
            for msg in waiting {
                self.bounce(t, msg, ErrorCode::Unreachable, Why::Unreachable);
            }
        }
        // (Over comch the answers wait in the link's outbox.)
        for t in 0..self.tenants.len() {
            self.link(t).flush_out();
        }
    }

    /// One scheduler round.
    fn schedule(&mut self, now: Instant) -> usize {
        if self.tenants.iter().all(|t| t.sends.is_empty()) {
            return 0;
        }
        let mut drr = std::mem::replace(&mut self.drr, Drr::new(&[], 1, now));
        let n = drr.round(self, now);
        self.drr = drr;
        n
    }

    /// Polls the fabric once.
    fn complete(&mut self, now: Instant) -> usize {
        let mut events = std::mem::take(&mut self.events);
        let n = self.port.poll(&mut events);
        self.handle(&mut events, now);
        self.events = events;
        n
    }

    /// Where an error a host link handed back goes: the node the message it
    /// is about came from, if that was over the fabric.
    fn error_back(&self, t: usize, d: &Descriptor) -> Option<u16> {
        if d.flags & DescFlags::ERROR == 0 {
            return None;
        }
        let n = *self.arrived.get(t)?.get(d.buf as usize)?;
        (n != NO_NODE && n != self.set.node && n < self.fabric_nodes).then_some(n)
    }

    /// The function whose calls tenant `t`'s queue `key` holds, if it is
    /// one of the queues of functions on several nodes (see [`Out::peer`]).
    #[inline]
    fn spread_fn(&self, t: usize, key: u16) -> Option<usize> {
        let k = key.checked_sub(self.fabric_nodes)?;
        self.tenants[t].fns.get(usize::from(k)).map(|&f| usize::from(f))
    }

    /// Whether function `f` runs on this node.
    fn runs_here(&self, f: usize) -> bool {
        self.fn_nodes.get(f).is_some_and(|n| n.contains(&self.set.node))
    }

    /// Hands a message to a local function (the destination, or for error
    /// descriptors the original sender). `from`: the node it came from over
    /// the fabric, where an error about it goes back.
    fn deliver(&mut self, t: usize, msg: Msg, from: Option<u16>) {
        self.deliver_as(t, msg, from, false)
    }

    /// [`deliver`](Self::deliver); `retry`: the message comes from the
    /// backlog (its function's messages still there are behind it).
    fn deliver_as(&mut self, t: usize, msg: Msg, from: Option<u16>, retry: bool) {
        let d = *msg.desc();
        if d.flags & DescFlags::REPLY != 0 && d.flags & DescFlags::ERROR == 0 {
            // A reply never ends on a worker node.
            return self.drop_msg(t, msg, Why::BadOrigin);
        }
        let f = usize::from(d.dst_fn);
        if self.fn_tenant.get(f) != Some(&self.ids[t]) {
            return self.drop_msg(t, msg, Why::UnknownFunction);
        }
        if let Some(a) = self.arrived[t].get_mut(d.buf as usize) {
            *a = from.unwrap_or(NO_NODE);
        }
        self.clear_back(t, d.buf);
        // A function that does not run here: a call back at its caller's
        // node (see `undeliverable`). A link over an imported pool does not
        // know the descriptor whole: its host hands it back.
        let here = self.runs_here(f);
        if !here && matches!(self.link(t).view(), fabric::PoolView::Local(_)) {
            return self.undeliverable(t, msg, from);
        }
        // (A function of tenant `t`: checked above.)
        let key = self.fn_key[f];
        if !retry && self.tenants[t].backlog.holds(key) {
            // Behind its function's messages waiting for room.
            return self.tenants[t].backlog.wait(key, (msg, from), false);
        }
        let len = u64::from(msg.len());
        let cfg = self.cfg.clone();
        // A call of a function on another node goes into the ring marked
        // ELSEWHERE (its function may see it; it means nothing there): a
        // descriptor does not name its caller's node, and this mark is how
        // host-shimd, answering the calls waiting in the ring of an
        // instance that dies, knows the call came through the agent and
        // sends its answer back through it, to the node `arrived` records,
        // not to an instance of the caller on this node. A delivery that
        // fails takes the mark off again (the call may still go on). Over
        // an imported pool the host takes the descriptor from the fabric
        // header, and host-shimd's bridge marks it.
        let from_far = from.is_some_and(|n| n < self.fabric_nodes && n != self.set.node);
        let mark = from_far
            && d.origin == NO_NODE
            && d.may_go_elsewhere()
            && matches!(self.link(t).view(), fabric::PoolView::Local(_));
        let mut msg = msg;
        if mark {
            msg.desc_mut().flags |= DescFlags::ELSEWHERE;
        }
        let unmark = |mut msg: Msg| {
            if mark {
                msg.desc_mut().flags &= !DescFlags::ELSEWHERE;
            }
            msg
        };
        match self.link(t).deliver(msg, d.dst_fn, &cfg.functions[f].name) {
            // (In DPU mode a message for a function not here is handed to
            // the host only to come back.)
            Ok(()) if here => {
                let m = &mut self.fn_tally[f];
                if m.0 == 0 {
                    // (f < 65536: a descriptor's `dst_fn`.)
                    self.fn_moved.push(f as u16);
                }
                m.0 += 1;
                m.1 += len;
            }
            Ok(()) => {}
            Err(e) => match (e.kind, e.msg) {
                (SendErrorKind::Full, Some(msg)) => self.tenants[t].backlog.wait(key, (unmark(msg), from), retry),
                (_, Some(msg)) => self.undeliverable(t, unmark(msg), from),
                (_, None) => self.answer_lost(t, d, from),
            },
        }
    }

    /// A message lost in its delivery here: its instance died after its
    /// ring was looked up, and host-shimd took the message's buffers back
    /// (`d`: its descriptor; `from` as for [`deliver`](Self::deliver)).
    /// In DPU mode host-shimd's bridge reports it later
    /// ([`HostLink::take_lost`]), and `from` is where the engine recorded
    /// the message came from.
    /// A call is answered as [`undeliverable`](Self::undeliverable) would
    /// when it may not go on (its payload is gone): `PeerDied`, to the
    /// ingress or the caller, in an empty message of a buffer taken from
    /// the pool for it. None to be had: counted as [`Why::Unanswered`],
    /// and its caller waits for its timeout. An error or a reply is
    /// dropped (its caller is gone).
    #[cold]
    fn answer_lost(&mut self, t: usize, d: Descriptor, from: Option<u16>) {
        if d.flags & (DescFlags::ERROR | DescFlags::REPLY) != 0 {
            return self.metrics.tenants[self.gid(t)].drop(Why::NoInstance);
        }
        let Some(lease) = self.link(t).alloc_empty() else {
            return self.metrics.tenants[self.gid(t)].drop(Why::Unanswered);
        };
        let from = from.filter(|&n| n < self.fabric_nodes && n != self.set.node);
        // Over an imported pool the error comes back through the uplink
        // once the host rewrote its headers, and is routed by where the
        // message in its buffer came from.
        if let Some(a) = self.arrived[t].get_mut(lease.head() as usize) {
            *a = from.unwrap_or(NO_NODE);
        }
        self.bounce_from(t, Msg::from_parts(lease, d), ErrorCode::PeerDied, Why::NoInstance, from);
    }

    /// A message no live instance of its function on this node took (the
    /// host link's delivery failed, or in DPU mode the host handed it
    /// back), or one for a function that does not run here. `from`: the
    /// node it came from over the fabric. A call not sent on for this
    /// reason before goes to another node of its function, once
    /// ([`DescFlags::ELSEWHERE`]): a call of an ingress, or of a function
    /// on this node, straight there (an error about it goes to the
    /// ingress, or comes back here); a call of a function on another node
    /// back to that node first (where an error about it must go: its
    /// caller may run on several nodes), which sends it to a node of the
    /// function other than this one. Anything else goes back to its
    /// caller as `PeerDied`; an error is dropped.
    fn undeliverable(&mut self, t: usize, mut msg: Msg, from: Option<u16>) {
        let d = *msg.desc();
        let f = usize::from(d.dst_fn);
        let call = d.flags & (DescFlags::ERROR | DescFlags::REPLY) == 0;
        let from = from.filter(|&n| n < self.fabric_nodes && n != self.set.node);
        let from_function = d.origin == NO_NODE;
        if !self.runs_here(f) {
            if f >= self.fn_nodes.len() || !(call && from_function && d.flags & DescFlags::ELSEWHERE != 0) {
                return self.drop_msg(t, msg, Why::UnknownFunction);
            }
            // Back at its caller's node: to another node of the function
            // (none: the caller hears so), within that node's share like
            // any call for it (beyond, its caller here hears so).
            return match self.other_node(t, f, from) {
                Some(n) if self.share_used(t, n) => self.bounce(t, msg, ErrorCode::Overloaded, Why::Overloaded),
                Some(n) => self.tenants[t].sends.push(Out { msg, peer: n, since: Instant::now() }),
                None => self.bounce_from(t, msg, ErrorCode::PeerDied, Why::NoInstance, None),
            };
        }
        if !call {
            // Its caller is gone.
            return self.drop_msg(t, msg, Why::NoInstance);
        }
        let back = match from {
            Some(c) if from_function => Some(c),
            _ => None,
        };
        let onward = match back {
            Some(c) => self.fn_nodes[f].iter().any(|&n| n != c && n != self.set.node),
            None => self.fn_nodes[f].len() > 1,
        };
        if !(d.may_go_elsewhere() && onward) {
            return self.bounce_from(t, msg, ErrorCode::PeerDied, Why::NoInstance, from);
        }
        msg.desc_mut().flags |= DescFlags::ELSEWHERE;
        if let Some(c) = back {
            self.metrics.tenants[self.gid(t)].elsewhere.inc();
            if let Some(b) = self.back_to[t].get_mut(d.buf as usize) {
                if *b == NO_NODE {
                    self.backs += 1;
                }
                *b = c;
            }
        }
        // Its headers rewritten (at once, or, over an imported pool, when
        // the host hands it back through the uplink): routed.
        if let Some(msg) = self.link(t).restamp(msg) {
            self.route(t, msg, Instant::now());
        }
    }

    /// The caller's node a call marked ELSEWHERE is on its way back to
    /// (see [`Engine::back_to`]).
    fn back_of(&self, t: usize, d: &Descriptor) -> Option<u16> {
        if self.backs == 0
            || d.flags & (DescFlags::ELSEWHERE | DescFlags::ERROR | DescFlags::REPLY) != DescFlags::ELSEWHERE
        {
            return None;
        }
        let n = *self.back_to.get(t)?.get(d.buf as usize)?;
        (n != NO_NODE).then_some(n)
    }

    /// Forgets where the message with head buffer `buf` was going back
    /// to; whether it was going back.
    fn clear_back(&mut self, t: usize, buf: u32) -> bool {
        if self.backs == 0 {
            return false;
        }
        match self.back_to.get_mut(t).and_then(|b| b.get_mut(buf as usize)) {
            Some(b) if *b != NO_NODE => {
                *b = NO_NODE;
                self.backs -= 1;
                true
            }
            _ => false,
        }
    }

    /// A node of function `f` other than this one and `not` to send a
    /// call of tenant `t` to: one that can take it now, else one that is
    /// up, else any (the call waits for it, or goes back as unreachable).
    fn other_node(&mut self, t: usize, f: usize, not: Option<u16>) -> Option<u16> {
        let here = self.set.node;
        let k = self.fn_nodes[f].len();
        let start = self.fn_next[f];
        let order = (0..k).map(|j| self.fn_nodes[f][(start + j) % k]).filter(|&n| n != here && Some(n) != not);
        let t16 = t as u16;
        let pick = order
            .clone()
            .find(|&n| self.port.can_send(t16, n))
            .or_else(|| order.clone().find(|&n| self.port.is_up(t16, n)))
            .or_else(|| order.clone().next());
        self.fn_next[f] = (start + 1) % k.max(1);
        pick
    }

    /// Tries the backlogged deliveries again (see [`DeliveryBacklog`]).
    fn redeliver(&mut self) -> usize {
        let mut n = 0;
        for t in 0..self.tenants.len() {
            let k = self.tenants[t].backlog.len();
            self.tenants[t].backlog.begin_pass();
            while let Some((msg, from)) = self.tenants[t].backlog.next_to_try() {
                self.deliver_as(t, msg, from, true);
            }
            // Work only if something left the backlog.
            n += k.saturating_sub(self.tenants[t].backlog.len());
        }
        n
    }

    /// [`bounce_from`](Self::bounce_from) for a message a function of this
    /// node sent.
    fn bounce(&mut self, t: usize, msg: Msg, code: ErrorCode, why: Why) {
        self.bounce_from(t, msg, code, why, None);
    }

    /// Returns a message to whoever waits for it, as an error descriptor:
    /// the ingress that originated the request if any (it answers the
    /// client), otherwise the sending function: on the node the message
    /// came from over the fabric (`from`), or on this node.
    fn bounce_from(&mut self, t: usize, mut msg: Msg, code: ErrorCode, why: Why, from: Option<u16>) {
        let d = *msg.desc();
        if d.flags & DescFlags::ERROR != 0 {
            // Never bounce a bounce.
            return self.drop_msg(t, msg, why);
        }
        if self.clear_back(t, d.buf) {
            // A call on its way back to its caller's node, which it did not
            // reach: an error about it could go only there.
            return self.drop_msg(t, msg, why);
        }
        self.metrics.tenants[self.gid(t)].drop(why);
        {
            let dm = msg.desc_mut();
            dm.flags |= DescFlags::ERROR;
            dm.status = code as u8;
        }
        let now = Instant::now();
        if d.origin != NO_NODE && d.origin < self.fabric_nodes && d.origin != self.set.node {
            msg.desc_mut().flags |= DescFlags::REPLY;
            if self.port.is_up(t as u16, d.origin) {
                self.requeue(t, msg, d.origin, now);
            } else {
                self.free_msg(t, msg);
            }
            return;
        }
        msg.desc_mut().dst_fn = d.src_fn;
        match from {
            None => self.deliver(t, msg, None),
            // The sender is on another node: the error travels back over
            // the fabric like any message.
            Some(n) if n < self.fabric_nodes && self.port.is_up(t as u16, n) => self.requeue(t, msg, n, now),
            Some(_) => self.free_msg(t, msg),
        }
    }

    /// Queues a message whose descriptor the engine changed for `peer`,
    /// once its fabric headers say so (see [`HostLink::restamp`]).
    fn requeue(&mut self, t: usize, msg: Msg, peer: u16, now: Instant) {
        if let Some(msg) = self.link(t).restamp(msg) {
            self.tenants[t].sends.push(Out { msg, peer, since: now });
        }
    }

    fn drop_msg(&mut self, t: usize, msg: Msg, why: Why) {
        self.metrics.tenants[self.gid(t)].drop(why);
        self.free_msg(t, msg);
    }

    fn free_msg(&mut self, t: usize, msg: Msg) {
        self.link(t).free(msg);
    }
}

/// Bytes a message puts on the wire: its payload and a fabric header per
/// buffer.
#[inline]
fn wire_bytes(msg: &Msg) -> u64 {
    u64::from(msg.len()) + u64::from(msg.frags()) * fabric::HEADER_LEN as u64
}

impl<T: Transport, H: HostLink> Engine<T, H> {
    /// The position (in turn order) of the first queue of tenant `t` whose
    /// head message can go now: its peer (for a call to a function on
    /// several nodes, one of them) granted credits, or its link (all of
    /// them) is down and the message has waited [`UNREACHABLE_AFTER`] (it
    /// then goes back to its sender).
    #[inline]
    fn first_ready(&self, t: usize) -> Option<usize> {
        let t16 = t as u16;
        // Waited long enough for a link: since it was queued, and since
        // the latest of its nodes' links went down (none of them failed
        // without the engine having seen it yet, see `came_up`).
        let gave_up = |since: Instant, nodes: &[u16]| {
            let (down, up) = (&self.went_down[t], &self.came_up[t]);
            if nodes.iter().any(|&n| up.get(usize::from(n)).is_some_and(Option::is_some)) {
                return false;
            }
            let down = nodes.iter().filter_map(|&n| down.get(usize::from(n)).copied().flatten()).max();
            down.map_or(since, |d| d.max(since)).elapsed() > UNREACHABLE_AFTER
        };
        self.tenants[t].sends.pick(|o| match self.spread_fn(t, o.peer) {
            None => self.port.can_send(t16, o.peer) || (!self.port.is_up(t16, o.peer) && gave_up(o.since, &[o.peer])),
            Some(f) => {
                let nodes = &self.fn_nodes[f];
                nodes.iter().any(|&n| self.port.can_send(t16, n))
                    || (!self.port.any_up(t16, nodes) && gave_up(o.since, nodes))
            }
        })
    }
}

impl<T: Transport, H: HostLink> Backlog for Engine<T, H> {
    /// The head of the first peer in turn ([`ready`](Self::ready) brings
    /// one that can go there).
    #[inline]
    fn head(&self, t: usize) -> Option<u64> {
        self.tenants[t].sends.head(0).map(|o| wire_bytes(&o.msg))
    }

    /// Bytes still waiting at the port (for their peer's credits, or for
    /// room in the connection's send window) are not on the wire and do
    /// not count, nor do the bytes on the wire to a stalled node
    /// ([`STALLED_AFTER`]): a tenant whose peer stopped granting (its
    /// functions hung) or stopped taking what it had granted (its agent
    /// stopped, which the emulated NIC, acknowledging only what the peer
    /// process placed, shows as sends that never complete) must not hold
    /// the budget of every other tenant of this core. (So each connection's
    /// queue at the port can add to what the budget allows on the wire once
    /// its credits come; a stalled node's queued bytes are left out twice,
    /// which lets at most that much more onto the wire.)
    #[inline]
    fn room(&self) -> bool {
        self.inflight.saturating_sub(self.port.queued_bytes()).saturating_sub(self.stalled) < INFLIGHT_BUDGET
    }

    #[inline]
    fn ready(&mut self, t: usize) -> Option<u64> {
        let i = self.first_ready(t)?;
        let s = &mut self.tenants[t].sends;
        if i > 0 {
            s.bring_forward(i);
        }
        s.head(0).map(|o| wire_bytes(&o.msg))
    }

    fn send(&mut self, t: usize) {
        let Some(out) = self.tenants[t].sends.take(0) else { return };
        let tag = out.since.saturating_duration_since(self.set.epoch).as_nanos() as u64;
        let bytes = wire_bytes(&out.msg);
        let peer = match self.spread_fn(t, out.peer) {
            None => out.peer,
            // The next of the function's nodes that can take it (none: all
            // are down, and the send below bounces it).
            Some(f) => self.port.next_can_send(t as u16, &self.fn_nodes[f], &mut self.fn_next[f]).unwrap_or(NO_NODE),
        };
        let (lease, desc) = out.msg.into_parts();
        match self.port.send(t as u16, peer, lease, desc, tag) {
            Ok(()) => {
                self.inflight += bytes;
                if let Some(w) = self.wire.get_mut(usize::from(peer)) {
                    w.bytes += bytes;
                }
            }
            // Its chain was rewritten in the pool after it was taken.
            Err((lease, desc, CompletionError::BadChain)) => {
                self.bounce(t, Msg::from_parts(lease, desc), ErrorCode::BadDescriptor, Why::BadDescriptor)
            }
            Err((lease, desc, _)) => {
                self.bounce(t, Msg::from_parts(lease, desc), ErrorCode::Unreachable, Why::Unreachable)
            }
        }
    }
}

/// Attaches to host-shimd once per tenant, retrying with backoff until it
/// answers or `stop` is set.
pub fn attach_all(cfg: &Cluster, socket: &std::path::Path, stop: &AtomicBool) -> Option<Vec<Function>> {
    let mut delay = Duration::from_millis(20);
    let mut warned = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let r: Result<Vec<Function>, _> = cfg.tenants.iter().map(|t| Function::attach_agent(socket, &t.name)).collect();
        match r {
            Ok(links) => return Some(links),
            Err(e) => {
                if !warned {
                    log::info!("waiting for host-shimd at {}: {e}", socket.display());
                    warned = true;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Engine, ForPeer, QUEUE_LIMIT, Sends, Settings, Why};
    use crate::hostlink::NullLink;
    use crate::metrics::Metrics;
    use std::sync::Arc;
    use std::time::Instant;

    /// An engine on n0 of a cluster of `nodes` nodes, function `f{i}` on
    /// node `n{i}`, tenant `t`'s uplink a [`NullLink`] handing out calls
    /// from f0 to f1. No peer ever comes up.
    fn lone_engine(nodes: usize) -> Engine<fabric::NullTransport, NullLink> {
        lone_engine_with(nodes, "")
    }

    /// [`lone_engine`] with more of the cluster file (`[[function]]`s after
    /// the `f{i}`).
    fn lone_engine_with(nodes: usize, more: &str) -> Engine<fabric::NullTransport, NullLink> {
        lone_engine_of(nodes, "", more)
    }

    /// [`lone_engine_with`] with more fields of tenant `t`.
    fn lone_engine_of(nodes: usize, tenant: &str, more: &str) -> Engine<fabric::NullTransport, NullLink> {
        engine_on(&cluster(nodes, tenant, more), 0, QUEUE_LIMIT + 500)
    }

    /// The cluster file of [`lone_engine_of`].
    fn cluster(nodes: usize, tenant: &str, more: &str) -> Arc<config::Cluster> {
        let dir = std::env::temp_dir().join(format!("dne-engine-lone-{}", std::process::id()));
        let mut text = nodes_text(nodes, &dir);
        text += &format!(
            "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 1024\nbuffers = 8192\nrecv_quota = 16\n{tenant}\n"
        );
        for i in 0..nodes {
            text += &format!("[[function]]\nname = \"f{i}\"\ntenant = \"t\"\nnode = \"n{i}\"\n\n");
        }
        text += more;
        Arc::new(config::Cluster::parse(&text).unwrap())
    }

    /// The `[[node]]`s `n0`.. of a cluster file, each on a port of its
    /// own, their runtime directories under `dir`.
    fn nodes_text(nodes: usize, dir: &std::path::Path) -> String {
        let mut text = String::new();
        for i in 0..nodes {
            let addr = dne_tests::free_port();
            let rt = dir.join(format!("n{i}"));
            text += &format!("[[node]]\nname = \"n{i}\"\naddress = \"{addr}\"\nruntime_dir = \"{}\"\n\n", rt.display());
        }
        text
    }

    /// Node `node`'s engine of `cfg` over the null fabric, taking `batch`
    /// descriptors per pass from `links` (one per tenant).
    fn null_fabric_engine<H: crate::hostlink::HostLink>(
        cfg: &Arc<config::Cluster>,
        node: u16,
        batch: usize,
        links: Vec<H>,
    ) -> Engine<fabric::NullTransport, H> {
        let null = |_: &fabric::EndpointConfig, _| Ok(fabric::NullTransport::new());
        engine_over(cfg, node, batch, links, null)
    }

    /// An engine on node `node` of `cfg` over `links`, its fabric made by
    /// `make`, taking at most `batch` messages from a link per step.
    fn engine_over<T: fabric::Transport, H: crate::hostlink::HostLink>(
        cfg: &Arc<config::Cluster>,
        node: u16,
        batch: usize,
        links: Vec<H>,
        make: fabric::cluster::MakeTransport<T>,
    ) -> Engine<T, H> {
        let set = Settings { node, idle_sleep_after: None, epoch: Instant::now(), batch, core: 0 };
        let metrics = Arc::new(Metrics::new(cfg, &format!("n{node}")));
        Engine::new(cfg.clone(), set, links, metrics, make).unwrap()
    }

    /// Node `node`'s engine of `cfg` over the null fabric, tenant `t`'s
    /// link a [`NullLink`] with `stock` calls from f0 to f1.
    fn engine_on(cfg: &Arc<config::Cluster>, node: u16, stock: usize) -> Engine<fabric::NullTransport, NullLink> {
        let g = cfg.pool_geometry(0).unwrap();
        let link = NullLink::new(g, 0, 0, 1, 64, stock).unwrap();
        null_fabric_engine(cfg, node, 32, vec![link])
    }

    /// The send queues an engine reserves at start stay bounded however
    /// many tenants and nodes the cluster has: each (tenant, peer) queue
    /// reserves its share of [`SEND_RESERVE`] (256 messages at most), and
    /// grows only if a burst needs it. Before, every one reserved 256
    /// messages (about 88 bytes each): 32 tenants on 64 nodes took 46 MB,
    /// and 1000 tenants on 100 nodes would take 2.2 GB of the DPU's memory
    /// before a message moved.
    #[test]
    fn the_send_queues_reserved_at_start_are_bounded() {
        let (tenants, nodes): (usize, usize) = (32, 64);
        let dir = std::env::temp_dir().join(format!("dne-engine-reserve-{}", std::process::id()));
        let mut text = nodes_text(nodes, &dir);
        for t in 0..tenants {
            text +=
                &format!("[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 256\nrecv_quota = 2\n\n");
            text += &format!("[[function]]\nname = \"f{t}\"\ntenant = \"t{t}\"\nnode = \"n0\"\n\n");
        }
        let cfg = Arc::new(config::Cluster::parse(&text).unwrap());
        let links = (0..tenants)
            .map(|t| NullLink::new(cfg.pool_geometry(t as u16).unwrap(), t as u16, t as u16, t as u16, 64, 0).unwrap())
            .collect();
        let e = null_fabric_engine(&cfg, 0, 32, links);
        let reserved: usize = e.tenants.iter().flat_map(|t| &t.sends.by_peer).map(|q| q.capacity()).sum();
        assert!(reserved <= super::SEND_RESERVE + tenants * nodes, "{reserved} messages reserved");
        // A small cluster still reserves 256 per queue (no allocation on
        // the data path of the engine benchmark's cluster).
        let small = lone_engine(2);
        assert!(small.tenants[0].sends.by_peer[1].capacity() >= 256);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A cluster of `nodes` nodes and `tenants` tenants with `per_tenant`
    /// functions each: tenant `t`'s function `f{t}-{k}` on node
    /// `n{(t + k) % nodes}`, every third also on the node after it. Its
    /// nodes' runtime directories are under `dir`.
    fn large_cluster(tenants: usize, per_tenant: usize, nodes: usize, dir: &std::path::Path) -> Arc<config::Cluster> {
        let mut text = nodes_text(nodes, dir);
        for t in 0..tenants {
            text +=
                &format!("[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 64\nrecv_quota = 2\n\n");
        }
        for t in 0..tenants {
            for k in 0..per_tenant {
                // Every third function on two nodes (its calls wait in a
                // queue of their own).
                let (a, b) = ((t + k) % nodes, (t + k + 1) % nodes);
                let on = if k % 3 == 0 { format!("nodes = [\"n{a}\", \"n{b}\"]") } else { format!("node = \"n{a}\"") };
                text += &format!("[[function]]\nname = \"f{t}-{k}\"\ntenant = \"t{t}\"\n{on}\n\n");
            }
        }
        Arc::new(config::Cluster::parse(&text).unwrap())
    }

    /// The control pass (every millisecond) publishes the per-function
    /// counters of the functions that received messages since the last
    /// pass, and every 100 ms the ring depths of the functions that run
    /// on this node, not every function of the cluster: on a node of a
    /// cluster of 1000 tenants with 30 functions each on 10 nodes it
    /// visits the two functions that received messages, and at a status
    /// tick the 4000 that run here. The counters published are those of
    /// the messages delivered, each counted once.
    #[test]
    fn the_control_pass_visits_the_functions_that_moved_or_run_here() {
        let (tenants, per_tenant, nodes): (usize, usize, usize) = (1000, 30, 10);
        let dir = std::env::temp_dir().join(format!("dne-engine-control-pass-{}", std::process::id()));
        let cfg = large_cluster(tenants, per_tenant, nodes, &dir);
        let here = cfg.functions.iter().filter(|f| cfg.function_nodes(f).contains(&0)).count();
        assert_eq!(here, 4000);
        // The last tenant's f999-1 (on n0) calls f999-3 (on n2 and n3);
        // tenant 0's f0-0 is on n0 and n1.
        let last = tenants - 1;
        let (src, dst) = ((last * per_tenant + 1) as u16, (last * per_tenant + 3) as u16);
        let first = 0u16;
        let links = (0..tenants)
            .map(|t| {
                let (src, dst, stock) = match t {
                    0 => (first, first, 2),
                    t if t == last => (src, dst, 7),
                    _ => (0, 0, 0),
                };
                NullLink::new(cfg.pool_geometry(t as u16).unwrap(), t as u16, src, dst, 64, stock).unwrap()
            })
            .collect();
        let mut e = null_fabric_engine(&cfg, 0, 4, links);
        let start = Instant::now();
        // The first pass is a status tick.
        e.control(start);
        assert_eq!(e.fn_visits, here, "function entries visited by a status pass");
        // Four calls taken from each uplink: the last tenant's are queued
        // for f999-3's nodes, tenant 0's (f0-0 calling itself) delivered
        // here. Then three calls from n1 delivered to f999-1, two to f0-0.
        e.step(start);
        let call = |tenant: u16, to: u16, k: u32| wire::Descriptor {
            tenant,
            dst_fn: to,
            src_fn: to,
            origin: wire::desc::NO_NODE,
            request: k,
            ..wire::Descriptor::default()
        };
        for (t, f, n) in [(last, src, 3), (0, first, 2)] {
            for k in 0..n {
                *e.link(t).template() = call(t as u16, f, k);
                let m = crate::hostlink::HostLink::take(e.link(t)).unwrap();
                e.deliver(t, m, Some(1));
            }
        }
        assert_eq!((e.link(last).delivered, e.link(0).delivered), (3, 6));
        e.fn_visits = 0;
        e.control(start);
        assert_eq!(e.fn_visits, 2, "function entries visited by a pass after deliveries to two functions");
        let m = e.metrics.clone();
        let fm =
            |f: u16| (m.functions[usize::from(f)].delivered.get(), m.functions[usize::from(f)].delivered_bytes.get());
        assert_eq!((fm(src), fm(first)), ((3, 3 * 64), (6, 6 * 64)));
        let total: u64 = m.functions.iter().map(|f| f.delivered.get()).sum();
        assert_eq!(total, 9);
        assert_eq!((m.tenants[last].uplink_msgs.get(), m.tenants[0].uplink_msgs.get()), (4, 4));
        assert_eq!(m.tenants[last].queue_depth.get(), 4);
        // Nothing moved: nothing visited, nothing counted again.
        e.fn_visits = 0;
        e.control(start);
        assert_eq!(e.fn_visits, 0, "function entries visited by a pass with nothing delivered");
        assert_eq!((fm(src), fm(first)), ((3, 3 * 64), (6, 6 * 64)));
        // The next status tick.
        e.fn_visits = 0;
        e.control(start + std::time::Duration::from_millis(100));
        assert_eq!(e.fn_visits, here, "function entries visited by the next status pass");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Node n0's engine over the null fabric of a [`large_cluster`] with
    /// one function a tenant, each tenant's link an idle [`NullLink`].
    fn idle_engine_of_large_cluster(
        tenants: usize,
        nodes: usize,
        dir: &std::path::Path,
    ) -> Engine<fabric::NullTransport, NullLink> {
        let cfg = large_cluster(tenants, 1, nodes, dir);
        let links = (0..tenants as u16)
            .map(|t| NullLink::new(cfg.pool_geometry(t).unwrap(), t, 0, 0, 64, 0).unwrap())
            .collect();
        null_fabric_engine(&cfg, 0, 4, links)
    }

    /// An idle control pass (every millisecond) looks at no tenant
    /// connection for failures: the port reports each connection that was
    /// up and failed ([`fabric::PortEvent::Down`]), and the engine looks
    /// at that one. Before, every pass looked at every tenant's
    /// connection to every node, to find the few that failed: 10000 on a
    /// node of a cluster of 1000 tenants on 10 nodes.
    #[test]
    fn an_idle_control_pass_looks_at_no_connection_for_failures() {
        let (tenants, nodes): (usize, usize) = (1000, 10);
        let dir = std::env::temp_dir().join(format!("dne-engine-idle-pass-{}", std::process::id()));
        let mut e = idle_engine_of_large_cluster(tenants, nodes, &dir);
        let start = Instant::now();
        e.control(start);
        e.conn_looks = 0;
        e.control(start);
        let looks = e.conn_looks;
        assert_eq!(looks, 0, "{looks} connections looked at for failures by an idle control pass, want 0");
        // A failure the port reports: that connection is looked at.
        e.handle(&mut vec![fabric::PortEvent::Down { tenant: 7, peer: 3 }], start);
        assert_eq!(e.conn_looks, 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The `credits` gauge (the sends each tenant's peers allow it, a sum
    /// over its connections to every node) is published at the status
    /// ticks (every 100 ms), like the functions' ring depths, not at every
    /// control pass (every millisecond). Before, every pass looked at every
    /// tenant's connection to every node for it: 10000 on a node of a
    /// cluster of 1000 tenants on 10 nodes.
    #[test]
    fn only_a_status_pass_looks_at_every_connections_credits() {
        let (tenants, nodes): (usize, usize) = (1000, 10);
        let dir = std::env::temp_dir().join(format!("dne-engine-credit-looks-{}", std::process::id()));
        let mut e = idle_engine_of_large_cluster(tenants, nodes, &dir);
        let start = Instant::now();
        // The first pass is a status tick.
        e.control(start);
        assert_eq!(e.credit_looks, tenants * nodes, "connections whose credits a status pass looked at");
        e.credit_looks = 0;
        e.control(start + std::time::Duration::from_millis(1));
        let looks = e.credit_looks;
        assert_eq!(looks, 0, "{looks} connections' credits looked at by a control pass between status ticks, want 0");
        e.control(start + std::time::Duration::from_millis(100));
        assert_eq!(e.credit_looks, tenants * nodes, "at the next status tick");
        let _ = std::fs::remove_dir_all(dir);
        // With a connection up, the gauge has its credits.
        let (mut e, _peer) = connected_engine_with("");
        e.control(Instant::now() + std::time::Duration::from_millis(100));
        let credits = e.port.credits(0, 1);
        assert!(credits > 0);
        assert_eq!(e.metrics.tenants[0].credits.get(), i64::from(credits));
    }

    /// An engine keeps, per tenant, queues and delivery order for that
    /// tenant's own functions only (a function belongs to one tenant), so
    /// what it sets up grows with tenants + functions, not with their
    /// product. Before, every tenant had a queue (an empty `VecDeque`, 32
    /// bytes) and a backlog counter for every function of the cluster:
    /// 1000 tenants with 30 functions each took 30 million queues (960 MB)
    /// and 30 million counters (120 MB).
    #[test]
    fn per_tenant_state_grows_with_the_tenants_own_functions() {
        let (tenants, per_tenant, nodes): (usize, usize, usize) = (1000, 30, 10);
        let dir = std::env::temp_dir().join(format!("dne-engine-per-tenant-{}", std::process::id()));
        let cfg = large_cluster(tenants, per_tenant, nodes, &dir);
        let functions = tenants * per_tenant;
        assert_eq!(cfg.functions.len(), functions);
        // The last tenant's f999-1 (on n0) calls f999-3 (on n2 and n3)
        // four times (one pass takes four), then three more calls come.
        let last = tenants - 1;
        let (src, dst) = ((last * per_tenant + 1) as u16, (last * per_tenant + 3) as u16);
        let links = (0..tenants)
            .map(|t| {
                let (src, dst, stock) = if t == last { (src, dst, 7) } else { (0, 0, 0) };
                NullLink::new(cfg.pool_geometry(t as u16).unwrap(), t as u16, src, dst, 64, stock).unwrap()
            })
            .collect();
        let mut e = null_fabric_engine(&cfg, 0, 4, links);
        let queues: usize = e.tenants.iter().map(|t| t.sends.by_peer.len()).sum();
        assert!(queues <= tenants * nodes + functions, "{queues} send queues");
        let counters: usize = e.tenants.iter().map(|t| t.backlog.functions()).sum();
        assert!(counters <= functions, "{counters} backlog counters");
        // The calls wait in the queue of f999-3, its tenant's function 3.
        e.step(Instant::now());
        let key = nodes as u16 + 3;
        assert_eq!(e.tenants[last].sends.queued_for(key), 4);
        assert_eq!(e.spread_fn(last, key), Some(usize::from(dst)));
        // Calls from n1 to f999-1 (on n0), whose ring is full, then has
        // room: the third waits behind the first two.
        let call = |k: u32| wire::Descriptor {
            tenant: last as u16,
            dst_fn: src,
            src_fn: dst,
            origin: wire::desc::NO_NODE,
            request: k,
            ..wire::Descriptor::default()
        };
        e.link(last).full = true;
        for k in 0..3 {
            if k == 2 {
                e.link(last).full = false;
            }
            *e.link(last).template() = call(k);
            let m = crate::hostlink::HostLink::take(e.link(last)).unwrap();
            e.deliver(last, m, Some(1));
        }
        assert_eq!((e.tenants[last].backlog.len(), e.link(last).delivered), (3, 0), "behind the others");
        assert_eq!(e.redeliver(), 3);
        assert_eq!((e.link(last).reordered, e.link(last).last_request), (0, Some(2)));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A call's queue key for a function on several nodes is the number
    /// of fabric nodes plus the function's key among its tenant's
    /// functions, which fits a u16 unless one tenant has nearly 65535
    /// functions (the cluster file is refused, and the engine would refuse
    /// to start, with the reason).
    /// Before, it was the number of fabric nodes plus the function's
    /// cluster id: with 3 nodes, a call to function 65533 overflowed (a
    /// panic in a debug build; in a release build key 0, this node's own
    /// queue).
    #[test]
    fn queue_keys_of_functions_on_several_nodes_fit_a_u16() {
        let dir = std::env::temp_dir().join(format!("dne-engine-keys-{}", std::process::id()));
        let text = |tenants: usize| {
            let mut text = nodes_text(3, &dir);
            for t in 0..tenants {
                text += &format!(
                    "[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 64\nrecv_quota = 2\n\n"
                );
            }
            let functions = usize::from(u16::MAX) - 1;
            for f in 0..functions {
                let on = if f % 2 == 0 { "node = \"n0\"" } else { "nodes = [\"n1\", \"n2\"]" };
                let t = f * tenants / functions;
                text += &format!("[[function]]\nname = \"f{f}\"\ntenant = \"t{t}\"\n{on}\n\n");
            }
            config::Cluster::parse(&text).map(Arc::new)
        };
        let link = |cfg: &config::Cluster, t: u16, src: u16, dst: u16, stock| {
            NullLink::new(cfg.pool_geometry(t).unwrap(), t, src, dst, 64, stock).unwrap()
        };
        // Two tenants: t1 has functions 32767 to 65533, its f65532 on n0
        // calls its f65533 on n1 and n2.
        let cfg = text(2).unwrap();
        let (src, dst) = (u16::MAX - 3, u16::MAX - 2);
        assert_eq!(cfg.functions[usize::from(dst)].tenant, "t1");
        let links = vec![link(&cfg, 0, 0, 0, 0), link(&cfg, 1, src, dst, 2)];
        let mut e = null_fabric_engine(&cfg, 0, 32, links);
        e.step(Instant::now());
        assert_eq!(e.tenants[1].sends.len(), 2);
        assert_eq!(e.tenants[1].sends.queued_for(0), 0, "nothing queued for this node");
        let key = e.tenants[1].sends.active[0];
        assert_eq!(e.spread_fn(1, key), Some(usize::from(dst)));
        // One tenant with every function: its keys do not fit, and the
        // cluster file is refused (the engine would refuse it at start).
        let Err(err) = text(1) else { panic!("one tenant with 65534 functions and 3 nodes parsed") };
        assert!(err.to_string().contains("65534 functions and 3 nodes and ingresses"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// n1's engine, serving its end of the fabric connections on a thread
    /// of its own until dropped (connection set-up waits for the peer).
    struct Peer {
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// [`lone_engine_with`] on two nodes whose connection to n1 is up
    /// (n1's engine, whose link sends nothing, runs until the [`Peer`] is
    /// dropped). Its uplink is not read: its messages are the test's.
    fn connected_engine_with(more: &str) -> (Engine<fabric::NullTransport, NullLink>, Peer) {
        let cfg = cluster(2, "", more);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n1 = engine_on(&cfg, 1, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n1.control(Instant::now());
                    n1.step(Instant::now());
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        let peer = Peer { stop, thread: Some(thread) };
        let mut e = engine_on(&cfg, 0, QUEUE_LIMIT + 500);
        e.set.batch = 0;
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !e.port.is_up(0, 1) {
            assert!(Instant::now() < deadline, "watchdog: the connection to n1 did not come up in 10 s");
            e.control(Instant::now());
            e.complete(Instant::now());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        (e, peer)
    }

    /// The tenant's `node_queue` (default 1024).
    fn node_queue<T: fabric::Transport, H: crate::hostlink::HostLink>(e: &Engine<T, H>) -> usize {
        e.cfg.tenants[0].node_queue as usize
    }

    /// A node that takes nothing holds at most the tenant's `node_queue` of
    /// its messages (the default, and one set in the cluster file); the
    /// ones beyond go back to their sender as `Overloaded`, and the uplink
    /// keeps being read.
    #[test]
    fn one_peer_holds_a_bounded_share_of_the_send_queue() {
        for (mut e, want) in [(lone_engine(2), 1024), (lone_engine_of(2, "node_queue = 96", ""), 96)] {
            assert_eq!(node_queue(&e), want);
            let steps = want / 32 + 10;
            for _ in 0..steps {
                e.step(Instant::now());
            }
            assert_eq!(e.tenants[0].sends.len(), want, "n1's messages wait (for up to 2 s)");
            assert_eq!(e.link(0).taken, steps as u64 * 32, "the uplink is read on");
            assert_eq!(e.metrics.tenants[0].drops(Why::Overloaded), 10 * 32, "the rest went back");
        }
    }

    /// An error for a caller on this node is delivered here even when the
    /// call it answers was marked ELSEWHERE (its function runs here and on
    /// another node).
    #[test]
    fn an_error_marked_elsewhere_is_delivered_here() {
        let both = "[[function]]\nname = \"both\"\ntenant = \"t\"\nnodes = [\"n0\", \"n1\"]\n";
        let mut e = lone_engine_with(2, both);
        let flags = wire::DescFlags::ERROR | wire::DescFlags::ELSEWHERE;
        *e.link(0).template() = wire::Descriptor { flags, dst_fn: 2, ..wire::Descriptor::default() };
        for _ in 0..4 {
            e.step(Instant::now());
        }
        let (taken, delivered) = (e.link(0).taken, e.link(0).delivered);
        assert!(taken > 0);
        assert_eq!(delivered, taken, "delivered to `both` here");
        assert_eq!(e.tenants[0].sends.len(), 0, "nothing waits to go to n1");
    }

    /// Functions beyond lone_engine's: `g` on n1 and n2, `both` on n0 and
    /// n2 (ids 3 and 4 of a three-node engine).
    const G_BOTH: &str = "[[function]]\nname = \"g\"\ntenant = \"t\"\nnodes = [\"n1\", \"n2\"]\n\n\
                          [[function]]\nname = \"both\"\ntenant = \"t\"\nnodes = [\"n0\", \"n2\"]\n";

    /// A three-node [`lone_engine_with`] ([`G_BOTH`]) holding the calls to
    /// `g` (on n1 and n2) its uplink gave at `now`, made to have waited
    /// (for credits, say) since `since`; its uplink gives no more. Returns
    /// the engine and how many calls wait.
    fn calls_to_g_waiting_since(now: Instant, since: Instant) -> (Engine<fabric::NullTransport, NullLink>, usize) {
        let mut e = lone_engine_with(3, G_BOTH);
        e.link(0).template().dst_fn = 3; // g, on n1 and n2
        e.step(now);
        let queued = e.tenants[0].sends.len();
        assert!(queued > 0);
        e.tenants[0].sends.by_peer.iter_mut().flatten().for_each(|o| o.since = since);
        e.link(0).template().dst_fn = 0; // nothing more for g
        (e, queued)
    }

    /// A message from the engine's uplink with descriptor `d` (buffer and
    /// length its own).
    fn message(e: &mut Engine<fabric::NullTransport, NullLink>, d: wire::Descriptor) -> host_shim::Msg {
        *e.link(0).template() = d;
        crate::hostlink::HostLink::take(e.link(0)).unwrap()
    }

    /// What waits to go to node `peer`: (flags, status) of each message.
    fn waiting(e: &Engine<fabric::NullTransport, NullLink>, peer: u16) -> Vec<(u16, u8)> {
        e.tenants[0].sends.by_peer[usize::from(peer)]
            .iter()
            .map(|o| (o.msg.desc().flags, o.msg.desc().status))
            .collect()
    }

    /// A local function whose ring stays full costs one delivery attempt
    /// per pass over the backlog, not one per message waiting for it (a
    /// wedged function's backlog grows to its pool's size, and every pass
    /// of the engine retried it all, for every tenant's cost), and its
    /// messages reach it in order once it takes them, new ones behind the
    /// waiting ones.
    #[test]
    fn a_full_function_costs_one_try_per_pass_and_keeps_its_order() {
        use wire::{Descriptor, desc::NO_NODE};
        let mut e = lone_engine(2);
        let call = |k: u32| Descriptor { dst_fn: 0, src_fn: 1, origin: NO_NODE, request: k, ..Descriptor::default() };
        e.link(0).full = true;
        for k in 0..1000 {
            let m = message(&mut e, call(k));
            e.deliver(0, m, Some(1));
        }
        assert_eq!(e.link(0).refused, 1, "one try, then behind it");
        assert_eq!(e.redeliver(), 0);
        assert_eq!(e.link(0).refused, 2, "one try per pass");
        e.link(0).full = false;
        let m = message(&mut e, call(1000));
        e.deliver(0, m, Some(1));
        assert_eq!(e.link(0).delivered, 0, "a new message waits behind the others");
        assert_eq!(e.redeliver(), 1001);
        assert_eq!(e.link(0).delivered, 1001);
        assert_eq!((e.link(0).reordered, e.link(0).last_request), (0, Some(1000)));
    }

    /// A call of a function on n0 that reached a node of `g` without a live
    /// instance comes back to n0 marked ELSEWHERE: n0 sends it to the other
    /// node of `g`, not the one it came back from. Anything else for a
    /// function that does not run here is dropped.
    #[test]
    fn a_call_back_at_its_callers_node_goes_to_another_node_of_its_function() {
        use wire::{DescFlags, Descriptor, desc::NO_NODE};
        let mut e = lone_engine_with(3, G_BOTH);
        let back = Descriptor { dst_fn: 3, flags: DescFlags::ELSEWHERE, origin: NO_NODE, ..Descriptor::default() };
        for (from, to) in [(1, 2), (2, 1)] {
            let m = message(&mut e, back);
            e.deliver(0, m, Some(from));
            assert_eq!(waiting(&e, to), [(DescFlags::ELSEWHERE, 0)], "back from n{from}");
        }
        assert!(waiting(&e, 1).len() + waiting(&e, 2).len() == 2, "nothing else queued");
        for d in [Descriptor { flags: 0, ..back }, Descriptor { origin: 1, ..back }] {
            let m = message(&mut e, d);
            e.deliver(0, m, Some(1));
        }
        assert_eq!(e.metrics.tenants[0].drops(Why::UnknownFunction), 2, "not sent on, and not from a function");
        assert_eq!(e.tenants[0].sends.len(), 2);
    }

    /// Calls back at their caller's node (here) on their way to another
    /// node of their function wait for that node like any call: at most the
    /// tenant's `node_queue` of them; beyond, they go back to their callers
    /// here as `Overloaded`. (`g` on n1 and n2; the calls came back from n1,
    /// n2 takes nothing.)
    #[test]
    fn calls_back_at_their_callers_node_are_held_to_the_share_of_the_node_they_go_to() {
        use wire::{DescFlags, Descriptor, desc::NO_NODE};
        let mut e = lone_engine_of(3, "node_queue = 96", G_BOTH);
        let back =
            Descriptor { dst_fn: 3, src_fn: 0, flags: DescFlags::ELSEWHERE, origin: NO_NODE, ..Descriptor::default() };
        for _ in 0..96 + 10 {
            let m = message(&mut e, back);
            e.deliver(0, m, Some(1));
        }
        assert_eq!(waiting(&e, 2).len(), 96, "n2's share");
        assert_eq!(e.metrics.tenants[0].drops(Why::Overloaded), 10, "the rest went back");
        assert_eq!(e.link(0).delivered, 10, "to f0, their caller here");
    }

    /// A call `both` (on n0 and n2) finds no live instance of on n0: from a
    /// function on n1 it goes back to n1 marked ELSEWHERE; from an ingress
    /// it goes to n2; from a function on n2 (the other node of `both`) it
    /// has nowhere else to go, and marked ELSEWHERE already it may go
    /// nowhere: both go back as `PeerDied` (here, with no link up, the
    /// error is dropped and counted).
    #[test]
    fn a_call_without_a_live_instance_here_goes_on_once() {
        use wire::{DescFlags, Descriptor, desc::NO_NODE};
        let mut e = lone_engine_with(3, G_BOTH);
        let call = Descriptor { dst_fn: 4, src_fn: 1, origin: NO_NODE, ..Descriptor::default() };
        let m = message(&mut e, call);
        e.undeliverable(0, m, Some(1));
        assert_eq!(waiting(&e, 1), [(DescFlags::ELSEWHERE, 0)], "back to the caller's node");
        assert_eq!(e.metrics.tenants[0].elsewhere.get(), 1);
        let m = message(&mut e, Descriptor { origin: 1, ..call });
        e.undeliverable(0, m, Some(1));
        assert_eq!(e.tenants[0].sends.len(), 2, "an ingress's call waits for n2 (in the queue of `both`)");
        assert_eq!(e.metrics.tenants[0].elsewhere.get(), 2);
        for (d, from) in [(call, 2), (Descriptor { flags: DescFlags::ELSEWHERE, ..call }, 1)] {
            let m = message(&mut e, d);
            e.undeliverable(0, m, Some(from));
        }
        assert_eq!(e.metrics.tenants[0].drops(Why::NoInstance), 2, "both went back as errors");
        assert_eq!(e.tenants[0].sends.len(), 2);
        assert_eq!(e.metrics.tenants[0].elsewhere.get(), 2);
    }

    /// A call whose instance here dies between the engine's look-up of its
    /// ring and the push, host-shimd taking its buffers back (the link
    /// hands back no message), is answered all the same: an error in a
    /// new, empty buffer of the pool goes back to its caller's node, or to
    /// the ingress that sent the request, with the call's request id.
    #[test]
    fn a_call_lost_with_its_dying_instance_is_answered_over_the_fabric() {
        use wire::{DescFlags, Descriptor, ErrorCode, desc::NO_NODE};
        let (mut e, _n1) = connected_engine_with("");
        e.link(0).gone = Some(0);
        let call = Descriptor { dst_fn: 0, src_fn: 1, origin: NO_NODE, request: 7, ..Descriptor::default() };
        for d in [call, Descriptor { origin: 1, request: 8, ..call }] {
            let m = message(&mut e, d);
            e.deliver(0, m, Some(1));
        }
        let answers: Vec<_> = e.tenants[0].sends.by_peer[1]
            .iter()
            .map(|o| (o.msg.desc().flags, o.msg.desc().status, o.msg.desc().request, o.msg.desc().dst_fn, o.msg.len()))
            .collect();
        let died = ErrorCode::PeerDied as u8;
        assert_eq!(
            answers,
            [(DescFlags::ERROR, died, 7, 1, 0), (DescFlags::ERROR | DescFlags::REPLY, died, 8, 0, 0)],
            "to f1 on n1, and to the ingress n1"
        );
        assert_eq!(e.metrics.tenants[0].drops(Why::NoInstance), 2);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while e.tally[0].tx_msgs < 2 {
            assert!(Instant::now() < deadline, "watchdog: the errors were not sent in 10 s");
            e.step(Instant::now());
        }
        assert!(e.tenants[0].sends.is_empty());
    }

    /// The same for a caller on this node (`both`, on n0 and n2, dies under
    /// a call of f0's that came through the agent): the error is delivered
    /// to f0.
    #[test]
    fn a_call_lost_with_its_dying_instance_is_answered_here() {
        use wire::{DescFlags, Descriptor, ErrorCode, desc::NO_NODE};
        let mut e = lone_engine_with(3, G_BOTH);
        e.link(0).gone = Some(4);
        let call = Descriptor { dst_fn: 4, src_fn: 0, origin: NO_NODE, request: 9, ..Descriptor::default() };
        let m = message(&mut e, call);
        e.deliver(0, m, None);
        let d = e.link(0).last_error.expect("an error delivered");
        assert_eq!(
            (d.flags, d.status, d.request, d.dst_fn, d.len),
            (DescFlags::ERROR, ErrorCode::PeerDied as u8, 9, 0, 0)
        );
        assert_eq!(e.link(0).delivered, 1);
        assert!(e.tenants[0].sends.is_empty());
    }

    /// With no buffer of the pool to carry the error, a call lost that way
    /// is counted as `Unanswered` (its caller waits for its timeout); an
    /// error lost that way (its caller died) is not answered.
    #[test]
    fn a_call_lost_with_its_dying_instance_and_no_buffer_for_the_error_is_counted() {
        use crate::hostlink::HostLink;
        use wire::{DescFlags, Descriptor, desc::NO_NODE};
        let mut e = lone_engine(2);
        e.link(0).gone = Some(0);
        let mut held = Vec::new();
        while let Some(l) = e.link(0).alloc_buffer() {
            held.push(l);
        }
        let call = Descriptor { dst_fn: 0, src_fn: 1, origin: NO_NODE, request: 7, ..Descriptor::default() };
        for d in [call, Descriptor { flags: DescFlags::ERROR, status: 3, ..call }] {
            let m = message(&mut e, d);
            e.deliver(0, m, Some(1));
        }
        assert_eq!(e.metrics.tenants[0].drops(Why::Unanswered), 1);
        assert_eq!(e.metrics.tenants[0].drops(Why::NoInstance), 1, "the error");
        for l in held {
            e.link(0).free(host_shim::Msg::from_parts(l, Descriptor::default()));
        }
    }

    /// DPU mode, host-shimd's bridge and the agent over the emulated comch:
    /// a call from f1 on n1 (f1 also runs here) that the engine hands to the bridge for f0,
    /// whose instance dies as the bridge pushes it into its ring
    /// (host-shimd takes the call's buffers back), is answered: f1 on n1
    /// gets `PeerDied` with the call's request id, as in the emulated path
    /// ([`a_call_lost_with_its_dying_instance_is_answered_over_the_fabric`]).
    #[test]
    fn in_dpu_mode_a_call_lost_with_its_dying_instance_is_answered_over_the_fabric() {
        use crate::hostlink::HostLink;
        use host_shim::Msg;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        use wire::{DescFlags, Descriptor, ErrorCode, desc::NO_NODE};
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("dne-engine-dpu-lost-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut text = String::new();
        for i in 0..2 {
            let dpu = if i == 0 { format!("mode = \"dpu\"\ncomch = \"dne-lost-{pid}\"\n") } else { String::new() };
            text += &format!(
                "[[node]]\nname = \"n{i}\"\naddress = \"{}\"\nruntime_dir = \"{}\"\n{dpu}\n",
                dne_tests::free_port(),
                dir.join(format!("n{i}")).display()
            );
        }
        text += "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 1024\nbuffers = 256\nrecv_quota = 16\n\n";
        // f1, the caller, runs on n0 too: the answer must go to the node the
        // call came from, not to f1's instance here.
        text += "[[function]]\nname = \"f0\"\ntenant = \"t\"\nnode = \"n0\"\n\n";
        text += "[[function]]\nname = \"f1\"\ntenant = \"t\"\nnodes = [\"n0\", \"n1\"]\n\n";
        let cfg = Arc::new(config::Cluster::parse(&text).unwrap());
        let socket = host_shim::daemon::socket_path(&dir.join("n0"));
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = Duration::from_secs(20);
        let threads = {
            let (c0, c1, s0, s1, s2, sock) =
                (cfg.clone(), cfg.clone(), stop.clone(), stop.clone(), stop.clone(), socket.clone());
            [
                // n0's host-shimd.
                std::thread::spawn(move || {
                    let mut d = host_shim::daemon::Shimd::new((*c0).clone(), "n0").expect("host-shimd");
                    while !s0.load(Ordering::Relaxed) {
                        d.poll_once(None, Duration::from_millis(5)).expect("host-shimd round");
                    }
                }),
                // Its bridge, every delivery to f0 lost as f0's instance dies.
                std::thread::spawn(move || {
                    let deadline = Instant::now() + watchdog;
                    let mut b = loop {
                        let shared = host_shim::bridge::SharedStats::default();
                        match host_shim::bridge::Bridge::new(c1.clone(), 0, &sock, shared) {
                            Ok(b) => break b,
                            Err(e) if Instant::now() < deadline => log::debug!("bridge not attached yet: {e}"),
                            Err(e) => panic!("watchdog: the bridge did not attach: {e}"),
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    };
                    b.lose_deliveries_to(Some(0));
                    b.run(&s1);
                }),
                // n1's engine (its end of the fabric connection).
                std::thread::spawn({
                    let cfg = cfg.clone();
                    move || {
                        let mut n1 = engine_on(&cfg, 1, 0);
                        while !s2.load(Ordering::Relaxed) {
                            n1.control(Instant::now());
                            n1.step(Instant::now());
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }),
            ]
        };
        let _stop = StopAll(stop.clone(), Some(threads));
        let links = crate::comchlink::attach(&cfg, 0, &stop).expect("the host link").expect("attached");
        let mut e = null_fabric_engine(&cfg, 0, 32, links);
        let deadline = Instant::now() + watchdog;
        while !e.port.is_up(0, 1) || e.link(0).free_buffers() < 4 {
            assert!(Instant::now() < deadline, "watchdog: no connection to n1, or no receive buffers lent");
            e.control(Instant::now());
            e.step(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }

        // A call from f1 on n1 lands in a receive buffer: its header in the
        // buffer's headroom (in host memory, written through f0's attach),
        // and the engine delivers it as a receive does.
        let f0 = host_shim::Function::attach(&socket, "t", "f0").expect("attach f0");
        let lease = e.link(0).alloc_buffer().expect("a receive buffer");
        let call = Descriptor {
            dst_fn: 0,
            src_fn: 1,
            origin: NO_NODE,
            request: 7,
            buf: lease.head(),
            len: lease.len(),
            ..Descriptor::default()
        };
        let h = wire::fabric::FabricHeader::new(wire::fabric::MsgKind::Data, call, 0, 1, lease.len());
        let pool = f0.pool();
        let at = pool.buf_offset(lease.head()).unwrap() + u64::from(wire::fabric::HEADER_OFFSET);
        pool.region().copy_in(at, zerocopy::IntoBytes::as_bytes(&h)).unwrap();
        e.deliver(0, Msg::from_parts(lease, call), Some(1));

        // The engine takes what the host link brings (the bridge's report,
        // then the error it re-stamped) and routes it; nothing is sent yet.
        let deadline = Instant::now() + watchdog;
        while e.tenants[0].sends.by_peer[1].is_empty() {
            assert!(Instant::now() < deadline, "watchdog: nothing queued for n1 (f1 got no answer to its call)");
            e.uplink(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
        let answers: Vec<_> = e.tenants[0].sends.by_peer[1]
            .iter()
            .map(|o| (o.msg.desc().flags, o.msg.desc().status, o.msg.desc().request, o.msg.desc().dst_fn, o.msg.len()))
            .collect();
        assert_eq!(answers, [(DescFlags::ERROR, ErrorCode::PeerDied as u8, 7, 1, 0)], "to f1 on n1");
        assert_eq!(e.metrics.tenants[0].drops(Why::NoInstance), 1);
        // (A watchdog of its own, and the control pass too: under qemu the
        // waits above can take most of the first.)
        let deadline = Instant::now() + watchdog;
        while !e.tenants[0].sends.is_empty() {
            assert!(Instant::now() < deadline, "watchdog: the error was not sent");
            e.control(Instant::now());
            e.step(Instant::now());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the threads of a test and joins them when dropped.
    struct StopAll(Arc<std::sync::atomic::AtomicBool>, Option<[std::thread::JoinHandle<()>; 3]>);

    impl Drop for StopAll {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in self.1.take().into_iter().flatten() {
                let _ = t.join();
            }
        }
    }

    /// A call on its way back to its caller's node that cannot get there
    /// (the node goes down) is dropped and counted: an error about it
    /// could go only there, not to an instance of its caller here (`cf`
    /// runs on n0 and n1; its call came from n1).
    #[test]
    fn a_call_that_cannot_go_back_to_its_callers_node_is_dropped() {
        use wire::{Descriptor, desc::NO_NODE};
        let cf = "\n[[function]]\nname = \"cf\"\ntenant = \"t\"\nnodes = [\"n0\", \"n1\"]\n";
        let mut e = lone_engine_with(3, &format!("{G_BOTH}{cf}"));
        let call = Descriptor { dst_fn: 4, src_fn: 5, origin: NO_NODE, ..Descriptor::default() };
        let m = message(&mut e, call);
        e.undeliverable(0, m, Some(1));
        assert_eq!(waiting(&e, 1).len(), 1, "back to n1");
        let delivered = e.link(0).delivered;
        e.peer_down(1, Instant::now());
        assert_eq!(e.link(0).delivered, delivered, "no error for n0's cf");
        assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), 1);
        assert_eq!((e.tenants[0].sends.len(), e.backs), (0, 0));
    }

    /// Calls to a function on several nodes wait for a link for
    /// `UNREACHABLE_AFTER` from the later of their queueing and the last
    /// of those nodes' links going down. Before, a call that had waited
    /// that long for credits went back as `Unreachable` the moment the
    /// links blipped. Calls queued while no link was ever up still go back
    /// after that long.
    #[test]
    fn calls_that_waited_for_credits_are_not_bounced_the_moment_the_links_go_down() {
        let long_ago = Instant::now() - 2 * super::UNREACHABLE_AFTER;
        for blip in [true, false] {
            let (mut e, queued) = calls_to_g_waiting_since(Instant::now(), long_ago);
            if blip {
                e.peer_down(1, Instant::now());
                e.peer_down(2, Instant::now());
            }
            e.step(Instant::now());
            let bounced = e.metrics.tenants[0].drops(Why::Unreachable);
            if blip {
                assert_eq!(bounced, 0, "the links just went down");
                assert_eq!(e.tenants[0].sends.len(), queued);
            } else {
                assert_eq!(bounced, queued as u64, "no link for that long");
            }
        }
    }

    /// A flapping link (down again less than `UNREACHABLE_AFTER` after it
    /// came up, or down again without the tenant's connection having come
    /// up) does not start the calls' wait for it anew: calls to a function
    /// on several nodes whose links have been down that long go back as
    /// `Unreachable` at the next pass with all of them down. A link that
    /// stayed up that long does (the wait for a blip, as above). Before,
    /// every flap started the wait anew: a link flapping faster than that
    /// held the calls (a function's caller without a timeout for ever).
    #[test]
    fn a_flapping_link_does_not_hold_calls_for_ever() {
        use fabric::PortEvent::Up;
        let ua = super::UNREACHABLE_AFTER;
        let long_ago = Instant::now() - 2 * ua;
        for (flap, bounced) in [("up briefly", true), ("never up", true), ("up long", false)] {
            let (mut e, queued) = calls_to_g_waiting_since(Instant::now(), long_ago);
            for peer in [1, 2] {
                // Down since long ago ...
                e.peer_down(peer, long_ago);
                // ... and now up (at once, or for as long as the calls
                // waited) and down again.
                match flap {
                    "up briefly" => e.handle(&mut vec![Up { tenant: 0, peer }], Instant::now()),
                    "up long" => e.handle(&mut vec![Up { tenant: 0, peer }], long_ago),
                    _ => {}
                }
                e.peer_down(peer, Instant::now());
            }
            e.step(Instant::now());
            let want = if bounced { queued as u64 } else { 0 };
            assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), want, "{flap}");
        }
    }

    /// Calls that waited long for credits are not bounced either in the
    /// moment between their nodes' connections failing (the port says they
    /// are not up) and the `PeerDown` that follows (the mesh resets the
    /// link when one of its connections fails, a few milliseconds later):
    /// the engine starts the outage when it sees the connections gone, at
    /// that `PeerDown` or at its next control pass (where the port reports
    /// the failures: `PortEvent::Down`), whichever comes first,
    /// and the calls wait `UNREACHABLE_AFTER` from then. Before, they were
    /// bounced as `Unreachable` at the first pass in that moment (their
    /// nodes' links had never been seen down, so they had waited for one
    /// since their queueing), but given the wait when the `PeerDown` came
    /// first.
    #[test]
    fn calls_are_not_bounced_the_moment_their_connections_fail() {
        use fabric::PortEvent::{Down, Up};
        let long_ago = Instant::now() - 2 * super::UNREACHABLE_AFTER;
        for noticed in ["at the control pass", "long ago"] {
            let (mut e, queued) = calls_to_g_waiting_since(Instant::now(), long_ago);
            // The connections were up (since long ago, while the calls
            // waited for credits); now they are not (they failed), and no
            // PeerDown came yet.
            e.handle(&mut vec![Up { tenant: 0, peer: 1 }, Up { tenant: 0, peer: 2 }], long_ago);
            e.step(Instant::now());
            assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), 0, "bounced as the connections failed");
            assert_eq!(e.tenants[0].sends.len(), queued);
            match noticed {
                "at the control pass" => {
                    // What the port's control reports of the failures.
                    let at = Instant::now();
                    e.handle(&mut vec![Down { tenant: 0, peer: 1 }, Down { tenant: 0, peer: 2 }], at);
                    e.step(Instant::now());
                    assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), 0, "the outage starts now");
                    assert_eq!(e.went_down[0][1..], [Some(at), Some(at)]);
                    // The PeerDowns that follow are in the same outage.
                    e.peer_down(1, Instant::now());
                    e.peer_down(2, Instant::now());
                    e.step(Instant::now());
                    assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), 0, "after the PeerDowns");
                    assert_eq!(e.went_down[0][1..], [Some(at), Some(at)], "a new outage at the PeerDowns");
                }
                _ => {
                    // Seen gone that long ago: they have waited enough.
                    e.handle(&mut vec![Down { tenant: 0, peer: 1 }, Down { tenant: 0, peer: 2 }], long_ago);
                    e.step(Instant::now());
                    assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), queued as u64);
                }
            }
        }
    }

    /// The case a review asked about: a tenant's connection fails (the mesh
    /// then resets the whole link: a `PeerDown`, a new outage when the
    /// connection had been up `UNREACHABLE_AFTER`), comes back, and goes
    /// down again less than that after: a flap, in the outage that began
    /// at the failure. Calls that waited long for credits before it got
    /// `UNREACHABLE_AFTER` from the failure (not from the second down):
    /// they wait on when the failure was more recent, and go back at once
    /// when it was longer ago, the brief time up included. (A connection
    /// never comes back without that `PeerDown`: only a new epoch of the
    /// link opens one, and it closes the old epoch's first.)
    #[test]
    fn a_link_that_fails_comes_back_and_goes_down_again_is_one_outage() {
        use fabric::PortEvent::Up;
        let ua = super::UNREACHABLE_AFTER;
        let now = Instant::now();
        let long_ago = now - 2 * ua;
        for (failed, bounced) in [(now - ua * 3 / 4, false), (now - ua * 5 / 4, true)] {
            let (mut e, queued) = calls_to_g_waiting_since(now, long_ago);
            for peer in [1, 2] {
                e.handle(&mut vec![Up { tenant: 0, peer }], long_ago);
                e.peer_down(peer, failed);
                e.handle(&mut vec![Up { tenant: 0, peer }], now - ua / 2);
                e.peer_down(peer, now);
            }
            e.step(Instant::now());
            let want = if bounced { queued as u64 } else { 0 };
            assert_eq!(e.metrics.tenants[0].drops(Why::Unreachable), want, "failed {:?} ago", now - failed);
        }
    }

    /// The same with two tenants, whose connections to the nodes come back
    /// one after the other: tenant t's coming up does not end tenant u's
    /// wait. Before, a node's link counted as back for every tenant at the
    /// first tenant's connection, and u's calls that had waited that long
    /// for credits went back as `Unreachable` just before u's connections
    /// came up.
    #[test]
    fn one_tenants_connections_coming_back_do_not_end_anothers_wait() {
        let dir = std::env::temp_dir().join(format!("dne-engine-two-{}", std::process::id()));
        let mut text = nodes_text(3, &dir);
        for t in ["t", "u"] {
            text +=
                &format!("[[tenant]]\nname = \"{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 256\nrecv_quota = 16\n\n");
            text += &format!("[[function]]\nname = \"{t}0\"\ntenant = \"{t}\"\nnode = \"n0\"\n\n");
            text += &format!("[[function]]\nname = \"{t}g\"\ntenant = \"{t}\"\nnodes = [\"n1\", \"n2\"]\n\n");
        }
        let cfg = Arc::new(config::Cluster::parse(&text).unwrap());
        // Tenant u's calls from u0 (function 2) to ug (3, on n1 and n2).
        let links = (0..2u16)
            .map(|t| NullLink::new(cfg.pool_geometry(t).unwrap(), t, 2 * t, 2 * t + 1, 64, 64).unwrap())
            .collect();
        let mut e: Engine<fabric::NullTransport, NullLink> = null_fabric_engine(&cfg, 0, 8, links);
        e.link(0).template().dst_fn = 0; // t's calls stay here
        e.step(Instant::now());
        let queued = e.tenants[1].sends.len();
        assert!(queued > 0 && e.tenants[0].sends.is_empty());
        // They have waited (for credits, say) that long; then the links blip.
        let long_ago = Instant::now() - 2 * super::UNREACHABLE_AFTER;
        e.tenants[1].sends.by_peer.iter_mut().flatten().for_each(|o| o.since = long_ago);
        e.link(1).template().dst_fn = 2; // nothing more for ug
        e.peer_down(1, Instant::now());
        e.peer_down(2, Instant::now());
        // Tenant t's connections to n1 and n2 are up again; u's not yet.
        let mut up = vec![fabric::PortEvent::Up { tenant: 0, peer: 1 }, fabric::PortEvent::Up { tenant: 0, peer: 2 }];
        e.handle(&mut up, Instant::now());
        e.step(Instant::now());
        assert_eq!(e.metrics.tenants[1].drops(Why::Unreachable), 0, "u's links just went down");
        assert_eq!(e.tenants[1].sends.len(), queued);
    }

    /// An engine of the emulated DOCA fabric (RDMA over TCP) on node `node`
    /// of `cfg`, over `links`, taking nothing from them until its batch is
    /// set.
    fn doca_engine(
        cfg: &Arc<config::Cluster>,
        node: u16,
        links: Vec<NullLink>,
    ) -> Engine<fabric::DocaTransport, NullLink> {
        engine_over(cfg, node, 0, links, fabric::cluster::doca_transport)
    }

    /// One control pass and one step of each engine, in turn.
    fn turn(engines: &mut [&mut Engine<fabric::DocaTransport, NullLink>]) {
        for e in engines.iter_mut() {
            let now = Instant::now();
            e.control(now);
            e.step(now);
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }

    /// Turns `engines` until `done` holds of them; a watchdog of 30 s.
    fn turn_until(
        engines: &mut [&mut Engine<fabric::DocaTransport, NullLink>],
        what: &str,
        mut done: impl FnMut(&[&mut Engine<fabric::DocaTransport, NullLink>]) -> bool,
    ) {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while !done(engines) {
            if Instant::now() >= deadline {
                let state: Vec<_> =
                    engines.iter().map(|e| (e.port.peers_up(), e.conns_up(), &e.downs, &e.peer_downs)).collect();
                panic!("watchdog: {what} not within 30 s; (peers up, connections up, Downs, PeerDowns): {state:?}");
            }
            turn(engines);
        }
    }

    /// A real failure of a connection with calls on it, driven through the
    /// fabric port into the engine. Three nodes' engines over the emulated
    /// DOCA fabric (RDMA over TCP), turned by this thread: n0 calls tenant
    /// t's `t1` on n1 and tenant u's `u2` on n2 (64 calls of each in
    /// circulation: a call whose send completed, or that came back as an
    /// error, frees its buffers for the next). n1 stops polling: calls n0
    /// sent with the credits it had wait on the wire, not placed, and the
    /// next ones wait in n0's queue for credits. Then n1's backend fails
    /// t's connection to n0: n0 sees it go, by its backend (a reset) or,
    /// when the mesh's reset of the link by n1 reaches n0 first, by the
    /// link's `PeerDown` (both orders are driven). Then:
    /// (1) n0's port reports `Down` for (t, n1) once in the first order,
    /// at the next control pass, where the engine starts the outage
    /// (`conn_lost`), and none in the second (a connection closed with its
    /// link has none of its own); the link to n1 goes down once, nothing
    /// to n2 does (u's connection to n1 may fail before the reset closes
    /// it); (2) every call t0 made is answered once: its send completed,
    /// and n1 delivered it, or it came back to t0 as an error, `PeerDied`
    /// for those on the wire and `Unreachable` for those queued (at the
    /// `PeerDown`), nothing else; n1 delivered no more than the calls sent
    /// and those that failed (a placement whose acknowledgement was lost);
    /// (3) u's calls to n2 flow all along, none refused; (4) the link comes
    /// back, t's calls reach n1 again, and every pool of every node ends
    /// with the free buffers it had before the traffic.
    #[test]
    fn a_connection_that_fails_with_calls_on_it_answers_each_call_once_and_comes_back() {
        for backend_first in [true, false] {
            fail_with_calls_on_it(backend_first);
        }
    }

    /// The scenario of the test above; `backend_first`: n0's backend
    /// reports the failure before n0's mesh has the link's reset by n1
    /// (else the other way round).
    fn fail_with_calls_on_it(backend_first: bool) {
        const STOCK: usize = 64;
        let dir = std::env::temp_dir().join(format!("dne-engine-fail-{}", std::process::id()));
        let mut text = nodes_text(3, &dir);
        for t in ["t", "u"] {
            text +=
                &format!("[[tenant]]\nname = \"{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 256\nrecv_quota = 16\n\n");
            for n in 0..3 {
                text += &format!("[[function]]\nname = \"{t}{n}\"\ntenant = \"{t}\"\nnode = \"n{n}\"\n\n");
            }
        }
        let cfg = Arc::new(config::Cluster::parse(&text).unwrap());
        // n0: t0 (0) calls t1 (1, on n1), u0 (3) calls u2 (5, on n2). The
        // others send nothing.
        let links = |node: u16| -> Vec<NullLink> {
            let calls = [(0, 1), (3, 5)];
            (0..2u16)
                .map(|t| {
                    let (src, dst) = calls[usize::from(t)];
                    let stock = if node == 0 { STOCK } else { 0 };
                    NullLink::new(cfg.pool_geometry(t).unwrap(), t, src, dst, 64, stock).unwrap()
                })
                .collect()
        };
        let (mut a, mut b, mut c) =
            (doca_engine(&cfg, 0, links(0)), doca_engine(&cfg, 1, links(1)), doca_engine(&cfg, 2, links(2)));
        // Every connection up, its receives posted (8 a connection).
        let settled = |e: &Engine<fabric::DocaTransport, NullLink>| {
            e.conns_up() == 4 && (0..2).all(|t| e.port.recvs_posted(t) == 16)
        };
        turn_until(&mut [&mut a, &mut b, &mut c], "every connection up", |es| es.iter().all(|e| settled(e)));
        let free = |e: &Engine<fabric::DocaTransport, NullLink>| -> Vec<u32> {
            (0..2).map(|t| crate::hostlink::HostLink::free_buffers(&e.port.bufs(t).0)).collect()
        };
        let before = [free(&a), free(&b), free(&c)];

        // Calls flow, until n0 has credits on its connection of t to n1.
        a.set.batch = 2;
        turn_until(&mut [&mut a, &mut b, &mut c], "calls delivered on n1 and n2", |es| {
            es[1].port.bufs(0).0.delivered >= 32 && es[2].port.bufs(1).0.delivered >= 32 && es[0].port.credits(0, 1) > 0
        });
        // n1 stops polling: t's calls to it wait on the wire (sent with the
        // credits n0 had, not placed by n1) and at n0 (for credits).
        let unplaced = |a: &Engine<fabric::DocaTransport, NullLink>, b: &Engine<fabric::DocaTransport, NullLink>| {
            let sent = a.metrics.tenants[0].tx_msgs.get() + a.tally[0].tx_msgs;
            let on_wire = a.wire[1].bytes / (64 + fabric::HEADER_LEN as u64);
            (sent + on_wire).saturating_sub(b.port.bufs(0).0.delivered)
        };
        turn_until(&mut [&mut a, &mut c], "calls waiting for n1", |es| {
            unplaced(es[0], &b) > 0 && es[0].tenants[0].sends.queued_for(1) >= 8
        });
        let (unplaced, queued) = (unplaced(&a, &b), a.tenants[0].sends.queued_for(1) as u64);
        // n1's backend fails t's connection to n0 (in n1's next poll).
        assert!(b.port.abort(0, 0), "n1 has a connection of t to n0");
        turn(&mut [&mut b]);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        if backend_first {
            // n0's backend reports it (n0's poll) before n0's mesh has the
            // link's reset (n0's control).
            while a.port.is_up(0, 1) {
                assert!(Instant::now() < deadline, "watchdog: n0's backend did not see the failure in 30 s");
                a.step(Instant::now());
            }
            // The next control pass reports it, and the engine starts the
            // outage there (whether the PeerDown of the link's reset is in
            // the same pass or a later one).
            let at = Instant::now();
            a.control(at);
            assert_eq!(a.downs, [(0, 1)], "the control pass after the failure");
            assert_eq!(a.went_down[0][1], Some(at), "the outage of t's connection to n1 starts at the Down");
        } else {
            // n0's mesh has the reset of the link by n1 first: the
            // connection is closed with its link.
            while !a.peer_downs.contains(&1) {
                assert!(Instant::now() < deadline, "watchdog: no PeerDown of n1 at n0 in 30 s");
                a.control(Instant::now());
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        let u_at_down = c.port.bufs(1).0.delivered;
        turn_until(&mut [&mut a, &mut b, &mut c], "t's connection to n1 back", |es| {
            es[0].peer_downs.contains(&1) && es[0].port.is_up(0, 1)
        });
        let u_at_up = c.port.bufs(1).0.delivered;
        let t_at_up = b.port.bufs(0).0.delivered;
        turn_until(&mut [&mut a, &mut b, &mut c], "t's calls reaching n1 again", |es| {
            es[1].port.bufs(0).0.delivered >= t_at_up + 32
        });
        // The calls stop; everything in circulation comes back.
        a.set.batch = 0;
        turn_until(&mut [&mut a, &mut b, &mut c], "every call answered", |es| {
            es[0].port.in_flight() == 0
                && (0..2).all(|t| es[0].tenants[t].sends.is_empty() && es[0].port.bufs(t as u16).0.in_stock() == STOCK)
                && es.iter().all(|e| settled(e))
        });
        for _ in 0..10 {
            turn(&mut [&mut a, &mut b, &mut c]);
        }

        // (1) The port reported the failure once: a Down, unless the
        // link's reset came first; only n1's link went down, once.
        let downs = a.downs.iter().filter(|&&d| d == (0, 1)).count();
        assert_eq!(downs, usize::from(backend_first), "Downs: {:?}", a.downs);
        assert!(a.downs.iter().all(|&(_, peer)| peer == 1), "Downs: {:?}", a.downs);
        assert_eq!(a.peer_downs, [1], "PeerDowns");
        // (2) Every call of t answered once: sent, or back to t0 as an error.
        let (m, link) = (&a.metrics.tenants[0], &a.port.bufs(0).0);
        let (sent, died, unreachable) = (m.tx_msgs.get(), m.drops(Why::PeerDied), m.drops(Why::Unreachable));
        let dropped: u64 = Why::ALL.iter().map(|&w| m.drops(w)).sum();
        assert_eq!(dropped, died + unreachable, "t's calls came back only as PeerDied or Unreachable");
        assert_eq!(link.taken, sent + died + unreachable, "t: {sent} sent, {died} + {unreachable} came back");
        assert_eq!(link.delivered, died + unreachable, "every error reached t0");
        assert!(died >= unplaced, "{unplaced} calls were on the wire, not placed, at the failure; {died} failed");
        assert!(died + unreachable >= unplaced + queued, "{queued} calls waited at n0 for n1: {unreachable} came back");
        let got = b.port.bufs(0).0.delivered;
        assert!((sent..=sent + died).contains(&got), "n1 delivered {got} of t's calls, {sent} sent, {died} failed");
        // (3) Tenant u's calls to n2 flowed all along, none refused.
        let (m, link) = (&a.metrics.tenants[1], &a.port.bufs(1).0);
        assert_eq!(Why::ALL.iter().map(|&w| m.drops(w)).sum::<u64>(), 0);
        assert_eq!((m.tx_msgs.get(), c.port.bufs(1).0.delivered), (link.taken, link.taken));
        assert!(u_at_up > u_at_down, "u's calls to n2 stopped while t's connection to n1 was down");
        // (4) Back: every connection up (u's to n1 too, reset with the
        // link), t's calls reached n1 again (above), and every pool has
        // the free buffers it had before the traffic.
        assert!(a.port.is_up(1, 1) && a.port.is_up(0, 1));
        assert_eq!([free(&a), free(&b), free(&c)], before, "free buffers of each node's pools, t and u");
        drop((a, b, c));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Replies wait for their node beyond that share (an error in their
    /// place would wait in the same queue).
    #[test]
    fn replies_are_not_refused_for_the_share_of_their_node() {
        let mut e = lone_engine(2);
        *e.link(0).template() =
            wire::Descriptor { flags: wire::DescFlags::REPLY, origin: 1, ..wire::Descriptor::default() };
        let steps = node_queue(&e) / 32 + 10;
        for _ in 0..steps {
            e.step(Instant::now());
        }
        assert_eq!(e.tenants[0].sends.len(), steps * 32, "every reply waits for n1");
        assert_eq!(e.metrics.tenants[0].drops(Why::Overloaded), 0);
    }

    /// A tenant whose send queue is full takes nothing from its uplink, but
    /// its link still gets worked every pass (in DPU mode: comch read, so
    /// receive buffers keep coming back from the host).
    #[test]
    fn a_full_send_queue_still_works_the_host_link() {
        // Four nodes that take nothing, a share of the queue each.
        let mut e = lone_engine(5);
        for f in 1..5 {
            e.link(0).template().dst_fn = f;
            for _ in 0..node_queue(&e) / 32 {
                e.step(Instant::now());
            }
        }
        assert_eq!(e.tenants[0].sends.len(), QUEUE_LIMIT, "the peers' messages wait (for up to 2 s)");
        let (taken, progressed) = (e.link(0).taken, e.link(0).progressed);
        for _ in 0..100 {
            e.step(Instant::now());
        }
        assert_eq!(e.link(0).taken, taken, "a full queue takes nothing");
        assert!(e.link(0).progressed >= progressed + 100, "the link is worked every pass");
    }

    impl ForPeer for (u16, u32) {
        fn peer(&self) -> u16 {
            self.0
        }
    }

    /// Takes what `ready` lets go, in the engine's order, until nothing can.
    fn drain(s: &mut Sends<(u16, u32)>, ready: impl Fn(&(u16, u32)) -> bool) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while let Some(i) = s.pick(&ready) {
            assert_eq!(s.head(i), s.by_peer[usize::from(s.active[i])].front());
            out.push(s.take(i).unwrap());
        }
        out
    }

    #[test]
    fn a_blocked_peer_holds_back_only_its_own_messages() {
        let mut s = Sends::new(3, 0, 256);
        for k in 0..4 {
            s.push((1, k)); // peer 1 first: it would be the head of one FIFO
        }
        s.push((2, 10));
        s.push((0, 20));
        s.push((2, 11));
        assert_eq!(s.len(), 7);
        // Peer 1 has no credits: the others go, each in its own order.
        let went = drain(&mut s, |m| m.0 != 1);
        assert_eq!(went, [(2, 10), (0, 20), (2, 11)]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.head(0), Some(&(1, 0)), "what waits is at the front while none can go");
        // Credits back: peer 1's messages go in order.
        assert_eq!(drain(&mut s, |_| true), [(1, 0), (1, 1), (1, 2), (1, 3)]);
        assert!(s.is_empty() && s.active.is_empty());
    }

    #[test]
    fn peers_with_credits_take_turns_and_a_peer_can_be_emptied_at_once() {
        let mut s = Sends::new(3, 0, 256);
        for k in 0..3 {
            s.push((0, k));
            s.push((1, 10 + k));
        }
        s.push((2, 20));
        assert_eq!(drain(&mut s, |_| true), [(0, 0), (1, 10), (2, 20), (0, 1), (1, 11), (0, 2), (1, 12)]);
        for k in 0..3 {
            s.push((1, k));
            s.push((2, 10 + k));
        }
        let gone: Vec<_> = s.take_peer(1).into_iter().collect();
        assert_eq!(gone, [(1, 0), (1, 1), (1, 2)]);
        assert_eq!(s.len(), 3);
        assert_eq!(drain(&mut s, |m| m.0 == 1), []);
        assert_eq!(drain(&mut s, |_| true), [(2, 10), (2, 11), (2, 12)]);
        assert!(s.is_empty() && s.active.is_empty());
    }

    /// A process of the tenant that rewrites the owner words of buffers the
    /// agent holds makes every free of them fail: the failures are counted
    /// by reason in `/metrics` (`free_failed`) and in the tenant's part of
    /// `/status`, and logged as a summary at most once a second, not once
    /// per message.
    #[test]
    fn frees_that_fail_are_counted() {
        use crate::hostlink::HostLink;
        use host_shim::Msg;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        use wire::{Descriptor, Owner};
        let dir = std::env::temp_dir().join(format!("dne-engine-free-failed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut text = nodes_text(1, &dir);
        text += "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 1024\nbuffers = 256\nrecv_quota = 16\n\n";
        text += "[[function]]\nname = \"f0\"\ntenant = \"t\"\nnode = \"n0\"\n\n";
        let cfg = Arc::new(config::Cluster::parse(&text).unwrap());
        let socket = host_shim::daemon::socket_path(&dir.join("n0"));
        let stop = Arc::new(AtomicBool::new(false));
        struct Join(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);
        impl Drop for Join {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
                if let Some(t) = self.1.take() {
                    let _ = t.join();
                }
            }
        }
        let shimd = std::thread::spawn({
            let (cfg, stop) = (cfg.clone(), stop.clone());
            move || {
                let mut d = host_shim::daemon::Shimd::new((*cfg).clone(), "n0").expect("host-shimd");
                while !stop.load(Ordering::Relaxed) {
                    d.poll_once(None, Duration::from_millis(5)).expect("host-shimd round");
                }
            }
        });
        let _join = Join(stop.clone(), Some(shimd));
        let links = super::attach_all(&cfg, &socket, &stop).expect("attached");
        let mut e = null_fabric_engine(&cfg, 0, 32, links);
        let f0 = host_shim::Function::attach(&socket, "t", "f0").expect("attach f0");
        let rogue = Owner::Held(f0.info().slot);
        const FAILS: u64 = 100;
        for _ in 0..FAILS {
            // f0 moves the owner word of a buffer the agent holds to
            // itself; the agent's free of it fails.
            let lease = e.link(0).alloc_buffer().expect("a buffer");
            let stolen = f0.pool().take_back(lease.head(), lease.len(), lease.holder(), rogue).expect("rewritten");
            e.free_msg(0, Msg::from_parts(lease, Descriptor::default()));
            f0.pool().free(stolen).expect("f0 frees it");
        }
        e.control(Instant::now());
        let text = e.metrics.encode();
        let line =
            text.lines().find(|l| l.starts_with("dne_agent_free_failed_total{") && l.contains("reason=\"not_owner\""));
        assert_eq!(line.and_then(|l| l.rsplit(' ').next()), Some(FAILS.to_string().as_str()), "in /metrics:\n{text}");
        let status = e.status_part();
        assert!(status.tenants[0].1.contains(&format!("\"free_failed\":{FAILS}")), "{}", status.tenants[0].1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
