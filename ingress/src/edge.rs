//! [`Edge`]: the fabric side of the cluster's edge (the ingress). The edge
//! is a fabric node of its own (an `[[ingress]]` of the cluster file) with
//! its own pool per tenant; a request written into that pool is sent over
//! the fabric, with no copy, to a node of its route's first function (its
//! nodes in turn, skipping those whose connection is down), and the chain's
//! reply comes back into the same pool, matched by request id.
//!
//! One driver owns the fabric [`Port`]: a thread of its own
//! ([`Edge::start`]) or a task of the HTTP server's tokio runtime
//! ([`Edge::spawn`], what the ingress runs: the requests, the fabric and the
//! replies then meet on the runtime's workers with no thread hand-off, which
//! on a machine with few cores saves two context switches per request).
//! Callers on any thread (the HTTP server's tasks) hand it requests through
//! a channel and get the reply through a oneshot.
//!
//! A request is bound to a node when it is sent, not when it arrives: it
//! waits in its route's queue until a node of the route's first function
//! has credits for its tenant, and goes to the next such node in turn. So
//! a node that stops taking requests (stopped, overloaded: it returns no
//! credits) holds only what it already took, and the rest go to the
//! function's other nodes; a route whose nodes all lack credits holds back
//! only its own requests. Backpressure is explicit: the tenant's queued
//! requests are bounded (the ingress's `tenant_queue`, and `route_queue`
//! for one route, in the cluster file), and a full queue is an immediate
//! [`EdgeError::Busy`] (the HTTP side answers 503), never unbounded
//! buffering, and a request that waited the ingress's `credit_wait_ms` for
//! credits is refused unsent ([`EdgeError::NoCredit`], 503 too); on a
//! route whose `timeout_ms` is not well beyond that, a little before the
//! route's timeout, so that the client still gets the 503 and not a 504. A queued
//! request whose caller gave up is dropped unsent, and one whose function
//! has no node up fails at once. A request a node took fails as
//! `PeerDied` when that node goes down (it may have run), and so does one
//! whose send failed after it left (the node may have placed it); one
//! whose send was refused before it left is `Unreachable`.
//!
//! Buffers are never lost with a caller: a reply travels as a [`PoolLease`],
//! which frees itself if the caller is gone before it reads it, and a
//! stopping edge frees every request it still holds.

use crate::pool::{INGRESS_SLOT, PoolLease, Pools, TenantPool};
use crate::upstream::{Upstream, UpstreamError, UpstreamFuture};
use config::Cluster;
use fabric::{Buffers, CompletionError, DocaTransport, PoolView, Port, PortEvent};
use shm::pool::Lease;
use shm::ring::Doorbell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use wire::{DescFlags, Descriptor, ErrorCode, Owner};

/// How long an idle edge thread keeps polling (yielding between polls)
/// before it sleeps on the fabric and the callers' doorbell.
const IDLE_SPIN: Duration = Duration::from_micros(50);
/// Requests waiting for replies at which the first prune of callers that
/// gave up happens (see `Worker::prune_at`).
const PRUNE_AT: usize = 4096;

/// Why a request got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EdgeError {
    /// The tenant's queue toward the cluster is full (backpressure).
    #[error("the tenant's queue is full")]
    Busy,
    /// The request waited its route's whole credit wait for a node of
    /// the first function to grant credits, and was not sent.
    #[error("no node of the function granted credits in time")]
    NoCredit,
    /// None of the first function's nodes is connected.
    #[error("the function's node is unreachable")]
    Unreachable,
    /// The route is unknown, has no usable first function, or is not the
    /// tenant's.
    #[error("bad route")]
    BadRoute,
    /// The cluster answered with an error descriptor.
    #[error("the chain failed: {0}")]
    Failed(ErrorCode),
    /// The edge stopped.
    #[error("the edge stopped")]
    Stopped,
}

/// The reply: the chain's message in the tenant's edge pool.
pub type Reply = Result<(PoolLease, Descriptor), EdgeError>;

/// One tenant pool of the edge, as the port's buffer source.
#[derive(Debug)]
pub struct EdgeBufs(pub Arc<TenantPool>);

impl Buffers for EdgeBufs {
    fn view(&self) -> PoolView<'_> {
        PoolView::Local(self.0.pool())
    }
    fn alloc_one(&mut self) -> Option<Lease> {
        let p = self.0.pool();
        p.alloc(p.geometry().payload_cap(), Owner::Held(INGRESS_SLOT)).ok()
    }
    fn free(&mut self, lease: Lease) {
        self.0.release(lease);
    }
}

#[derive(Debug)]
struct Call {
    tenant: u16,
    route: u16,
    request: u32,
    lease: Lease,
    reply: oneshot::Sender<Reply>,
    /// When the caller handed it over (its credit wait runs from here).
    since: Instant,
}

/// What the edge dropped with no request waiting for it (see
/// [`Upstream::dropped`]).
#[derive(Debug, Default)]
struct Drops {
    /// A reply or error for a request no one waits for any more (its caller
    /// gave up: timed out, disconnected) or never sent.
    late: AtomicU64,
    /// A message that is not a reply, or names a waiting request of
    /// another tenant or route.
    stray: AtomicU64,
    /// A node broke the fabric protocol (the connection is dropped).
    protocol: AtomicU64,
    /// A receive could not be posted again: the tenant's pool was empty.
    no_buffer: AtomicU64,
    /// A message from a node stopped arriving mid-chain and was dropped
    /// (`fabric::port::CHAIN_STALL`).
    stalled_chain: AtomicU64,
}

/// The edge's fabric side (see the module docs).
#[derive(Debug)]
pub struct Edge {
    pools: Pools,
    drops: Arc<Drops>,
    calls: Sender<Call>,
    wake: Arc<Wake>,
    conns_up: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Edge {
    /// Starts the edge of ingress `ingress` (its index in the cluster
    /// file) over the ingress's `pools` (one per tenant; the edge's buffers
    /// are held as [`INGRESS_SLOT`]).
    pub fn start(cfg: Arc<Cluster>, ingress: usize, pools: Pools) -> anyhow::Result<Self> {
        let (mut edge, mut worker) = Self::new(&cfg, ingress, pools, false)?;
        let flag = edge.stop.clone();
        edge.thread = Some(std::thread::Builder::new().name("edge".into()).spawn(move || worker.run(&flag))?);
        Ok(edge)
    }

    /// Like [`start`](Self::start), but the edge runs as a task of the
    /// current tokio runtime (call it inside one): it polls the fabric
    /// while it has work, then awaits the fabric's notification fd, a
    /// caller's call, or its next control tick.
    pub fn spawn(cfg: Arc<Cluster>, ingress: usize, pools: Pools) -> anyhow::Result<Self> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| anyhow::anyhow!("Edge::spawn needs a tokio runtime: {e}"))?;
        let (edge, worker) = Self::new(&cfg, ingress, pools, true)?;
        handle.spawn(worker.drive(edge.stop.clone()));
        Ok(edge)
    }

    fn new(cfg: &Cluster, ingress: usize, pools: Pools, task: bool) -> anyhow::Result<(Self, Worker)> {
        let me = cfg.ingress_node_id(ingress).ok_or_else(|| anyhow::anyhow!("no ingress {ingress} in the config"))?;
        let g = &cfg.ingresses[ingress];
        let (tenant_queue, route_queue) = (g.tenant_queue as usize, g.route_queue as usize);
        let flights = cfg.tenants.len() * tenant_queue;
        let port = fabric::cluster::open_port(cfg, me, pools.iter().cloned().map(EdgeBufs).collect(), flights)?;
        let (calls, rx) = channel();
        let wake = Arc::new(Wake {
            sleeping: AtomicBool::new(false),
            bell: Doorbell::new()?,
            notify: tokio::sync::Notify::new(),
            task,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let conns_up = Arc::new(AtomicUsize::new(0));
        let drops = Arc::new(Drops::default());
        let worker = Worker {
            first: cfg
                .routes
                .iter()
                .map(|r| {
                    let f = r.chain.first().and_then(|n| cfg.function_id(n))?;
                    let nodes = cfg.function_nodes(&cfg.functions[usize::from(f)]);
                    (!nodes.is_empty()).then_some(First { f, nodes, next: 0 })
                })
                .collect(),
            queues: SendQueues::new(
                cfg.tenants.len(),
                // (Every route's tenant is one of the cluster's: checked
                // when the config was loaded.)
                &cfg.routes.iter().map(|r| cfg.tenant_id(&r.tenant).unwrap_or(u16::MAX)).collect::<Vec<_>>(),
                tenant_queue,
                route_queue,
            ),
            order: Vec::with_capacity(cfg.routes.len()),
            credit_wait: cfg
                .routes
                .iter()
                .map(|r| {
                    let timeout = Duration::from_millis(u64::from(r.timeout_ms));
                    route_credit_wait(Duration::from_millis(u64::from(g.credit_wait_ms)), timeout)
                })
                .collect(),
            waiting: HashMap::with_capacity(PRUNE_AT),
            prune_at: PRUNE_AT,
            me,
            port,
            rx,
            wake: wake.clone(),
            conns_up: conns_up.clone(),
            events: Vec::with_capacity(256),
            drops: drops.clone(),
            #[cfg(test)]
            reserves_set: 0,
        };
        Ok((Self { pools, drops, calls, wake, conns_up, stop, thread: None }, worker))
    }

    /// Tenant `t`'s pool.
    pub fn pool(&self, t: u16) -> Option<&Arc<TenantPool>> {
        self.pools.get(t)
    }

    /// Tenant connections that are up (every worker node times every
    /// tenant when the cluster is whole).
    pub fn conns_up(&self) -> usize {
        self.conns_up.load(Ordering::Relaxed)
    }

    /// Sends the request in `lease` (tenant `tenant`'s pool, held as
    /// [`INGRESS_SLOT`]) down route `route`; the reply comes through the
    /// returned receiver. Never blocks.
    pub fn call(&self, tenant: u16, route: u16, request: u32, lease: Lease) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.calls.send(Call { tenant, route, request, lease, reply: tx, since: Instant::now() }) {
            let c = e.0;
            if let Some(p) = self.pools.get(c.tenant) {
                p.release(c.lease);
            }
            let _ = c.reply.send(Err(EdgeError::Stopped));
        } else {
            self.wake.wake();
        }
        rx
    }
}

/// The edge as the ingress's [`Upstream`]: requests over the fabric.
impl Upstream for Edge {
    fn call(&self, route: u16, tenant: u16, msg: PoolLease, request: u32) -> UpstreamFuture {
        let rx = Edge::call(self, tenant, route, request, msg.into_lease());
        Box::pin(async move {
            match rx.await {
                Ok(Ok((reply, _))) => Ok(reply),
                Ok(Err(EdgeError::Busy)) => Err(UpstreamError::QueueFull),
                Ok(Err(EdgeError::NoCredit)) => Err(UpstreamError::NoCredit),
                // The server answers each code (503 for a lack of room
                // in the cluster, 504 for a hop's timeout, else 502).
                Ok(Err(EdgeError::Failed(code))) => Err(UpstreamError::FunctionError(code)),
                Ok(Err(EdgeError::Unreachable | EdgeError::BadRoute | EdgeError::Stopped)) | Err(_) => {
                    Err(UpstreamError::Unreachable)
                }
            }
        })
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        let d = &self.drops;
        [
            ("late", &d.late),
            ("stray", &d.stray),
            ("protocol", &d.protocol),
            ("no_buffer", &d.no_buffer),
            ("stalled_chain", &d.stalled_chain),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A sleeping task driver looks at the flag now (a thread within
        // its 1 ms control tick).
        self.wake.notify.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How the edge's driver is woken when it sleeps: callers wake it only
/// when it announced a sleep, by its doorbell (a thread) or its `Notify`
/// (a task).
#[derive(Debug)]
struct Wake {
    sleeping: AtomicBool,
    bell: Doorbell,
    notify: tokio::sync::Notify,
    task: bool,
}

impl Wake {
    /// After queueing a call: rings the bell if the edge thread sleeps.
    fn wake(&self) {
        // SeqCst: pairs with the worker's store of `sleeping` and its
        // look at the queue (either it sees the call, or we see it sleep).
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            if self.task {
                self.notify.notify_one();
            } else if let Err(e) = self.bell.ring() {
                log::warn!("edge: doorbell: {e}");
            }
        }
    }
}

struct Waiting {
    tenant: u16,
    route: u16,
    peer: u16,
    reply: oneshot::Sender<Reply>,
}

/// How long a request of a route whose timeout is `timeout` may wait for
/// credits: the ingress's `credit_wait`, but no longer than the route's
/// timeout less a margin (a fifth of it, at least 2 ms, at most 100 ms,
/// and never over half the timeout). The HTTP side answers a request
/// refused for want of credits 503 with `Retry-After`, and one past the
/// route's timeout 504 without; the margin lets the refusal reach it first
/// (the wait starts when the request is handed to the edge, just before the
/// route's timeout starts; an idle edge looks at its queues every
/// millisecond, so a margin under 2 ms could lose the race).
fn route_credit_wait(credit_wait: Duration, timeout: Duration) -> Duration {
    let least = Duration::from_millis(2).min(timeout / 2);
    let margin = (timeout / 5).clamp(least, Duration::from_millis(100));
    credit_wait.min(timeout - margin)
}

/// The completion of the send of request `tag`. A failed one ends the
/// request's wait as `Failed(PeerDied)` (502): the send had left, and the
/// node may have placed the request, and run it, before the failure was
/// seen, so this is the answer to the node dying with it, not an
/// invitation to retry (503). (A send `Port::send` refused at once never
/// left: that one is `Unreachable`.) A successful one changes nothing: the
/// request waits for its reply.
fn send_completed(waiting: &mut HashMap<u32, Waiting>, tag: u64, result: Result<(), CompletionError>) {
    if result.is_err()
        && let Some(w) = waiting.remove(&(tag as u32))
    {
        let _ = w.reply.send(Err(EdgeError::Failed(ErrorCode::PeerDied)));
    }
}

/// Why [`SendQueues::push`] refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueueRefusal {
    /// The tenant's queued calls reach `tenant_queue`, or the route's
    /// reach `route_queue`.
    Full,
    /// The tenant does not own the route (or either is unknown).
    NotOwner,
}

/// The calls waiting to be sent: a FIFO per route (each route is one
/// tenant's; see the module docs: a request is bound to a node when it is
/// sent), bounded per tenant and per route. [`order`](Self::order) lists,
/// once a turn, the queues to serve: tenant by tenant in increasing id,
/// and within a tenant its routes in increasing id from the turn's
/// starting route round (the start moves on by one route every turn, so
/// routes whose nodes are shared take their credits in turn).
///
/// What it holds at start grows with tenants plus routes, and a turn
/// looks only at the tenants and routes that hold calls (or held some
/// since the last turn): a cluster of many tenants and routes costs an
/// idle edge nothing per turn.
#[derive(Debug)]
struct SendQueues<C> {
    /// Each route's tenant, indexed by route.
    owner: Vec<u16>,
    /// Each route's calls, oldest first, indexed by route.
    by_route: Vec<VecDeque<C>>,
    /// Calls over all its routes, per tenant (bounded by `tenant_queue`).
    len: Vec<usize>,
    tenant_queue: usize,
    route_queue: usize,
    /// The tenants that hold calls, in increasing id, and those that held
    /// some since the last turn (which drops them). Room for every tenant
    /// is reserved at start.
    busy: Vec<u16>,
    /// Per tenant, its routes that hold calls, in increasing id, and those
    /// that held some since the last turn (likewise). Room for each of the
    /// tenant's routes is reserved at start.
    busy_routes: Vec<Vec<u16>>,
    /// The route each tenant's sending starts at this turn.
    rotate: usize,
    /// Per-route queues looked at by `order`.
    #[cfg(test)]
    visits: usize,
}

impl<C> SendQueues<C> {
    /// Queues for `tenants` tenants and the routes whose tenants are
    /// `owners` (indexed by route; a route of no known tenant takes no
    /// calls).
    fn new(tenants: usize, owners: &[u16], tenant_queue: usize, route_queue: usize) -> Self {
        let mut owned = vec![0usize; tenants];
        for &t in owners {
            if let Some(n) = owned.get_mut(usize::from(t)) {
                *n += 1;
            }
        }
        Self {
            owner: owners.to_vec(),
            by_route: owners.iter().map(|_| VecDeque::new()).collect(),
            len: vec![0; tenants],
            tenant_queue,
            route_queue,
            busy: Vec::with_capacity(tenants),
            busy_routes: owned.into_iter().map(Vec::with_capacity).collect(),
            rotate: 0,
            #[cfg(test)]
            visits: 0,
        }
    }

    /// Tenants known to the queues.
    fn tenants(&self) -> usize {
        self.len.len()
    }

    /// Whether route `route` is tenant `tenant`'s.
    fn owns(&self, tenant: u16, route: u16) -> bool {
        usize::from(tenant) < self.len.len() && self.owner.get(usize::from(route)) == Some(&tenant)
    }

    /// Queues `c`, tenant `tenant`'s call for route `route`, last of that
    /// route's calls; gives it back if refused.
    fn push(&mut self, tenant: u16, route: u16, c: C) -> Result<(), (C, QueueRefusal)> {
        if !self.owns(tenant, route) {
            return Err((c, QueueRefusal::NotOwner));
        }
        let (t, r) = (usize::from(tenant), usize::from(route));
        let q = &mut self.by_route[r];
        if self.len[t] >= self.tenant_queue || q.len() >= self.route_queue {
            return Err((c, QueueRefusal::Full));
        }
        // (A route or tenant may still be listed from before the last
        // turn: listed once. Neither list outgrows what was reserved: each
        // holds distinct routes of the tenant, distinct tenants.)
        if q.is_empty()
            && let Err(i) = self.busy_routes[t].binary_search(&route)
        {
            self.busy_routes[t].insert(i, route);
        }
        if self.len[t] == 0
            && let Err(i) = self.busy.binary_search(&tenant)
        {
            self.busy.insert(i, tenant);
        }
        q.push_back(c);
        self.len[t] += 1;
        Ok(())
    }

    /// Tenant `tenant`'s next call for route `route`.
    fn front(&self, tenant: u16, route: u16) -> Option<&C> {
        self.owns(tenant, route).then(|| self.by_route[usize::from(route)].front()).flatten()
    }

    /// Tenant `tenant`'s next call for route `route`, taken off the queue.
    /// (The route stays listed until the next turn.)
    fn pop(&mut self, tenant: u16, route: u16) -> Option<C> {
        if !self.owns(tenant, route) {
            return None;
        }
        let c = self.by_route[usize::from(route)].pop_front()?;
        self.len[usize::from(tenant)] -= 1;
        Some(c)
    }

    /// Any waiting call, taken off the queue (for emptying the queues; the
    /// lists are emptied from their ends as they go).
    fn pop_any(&mut self) -> Option<(u16, C)> {
        loop {
            let &tenant = self.busy.last()?;
            let t = usize::from(tenant);
            let Some(&r) = self.busy_routes[t].last() else {
                self.busy.pop();
                continue;
            };
            match self.by_route[usize::from(r)].pop_front() {
                Some(c) => {
                    self.len[t] -= 1;
                    return Some((tenant, c));
                }
                None => {
                    self.busy_routes[t].pop();
                }
            }
        }
    }

    /// Starts a turn: `out` becomes the (tenant, route) queues that hold
    /// calls, in the order they are to be served this turn. Routes and
    /// tenants that no longer hold calls leave the lists.
    fn order(&mut self, out: &mut Vec<(u16, u16)>) {
        out.clear();
        self.rotate = self.rotate.wrapping_add(1);
        let start = self.rotate % self.by_route.len().max(1);
        #[cfg(test)]
        {
            // The retain below looks at each listed route's queue once.
            self.visits += self.busy.iter().map(|&t| self.busy_routes[usize::from(t)].len()).sum::<usize>();
        }
        let Self { by_route, busy, busy_routes, .. } = self;
        busy.retain(|&t| {
            let rs = &mut busy_routes[usize::from(t)];
            rs.retain(|&r| !by_route[usize::from(r)].is_empty());
            let k = rs.partition_point(|&r| usize::from(r) < start);
            out.extend(rs[k..].iter().chain(&rs[..k]).map(|&r| (t, r)));
            !rs.is_empty()
        });
    }

    /// Bytes the queues hold reserved (their calls' buffers included).
    #[cfg(test)]
    fn reserved_bytes(&self) -> usize {
        use std::mem::size_of;
        let deques: usize = self.by_route.iter().map(|q| q.capacity() * size_of::<C>()).sum();
        let lists: usize = self.busy_routes.iter().map(|l| l.capacity() * size_of::<u16>()).sum();
        self.owner.capacity() * size_of::<u16>()
            + self.by_route.capacity() * size_of::<VecDeque<C>>()
            + deques
            + self.len.capacity() * size_of::<usize>()
            + self.busy.capacity() * size_of::<u16>()
            + self.busy_routes.capacity() * size_of::<Vec<u16>>()
            + lists
    }
}

/// A route's first function and the nodes it runs on.
struct First {
    f: u16,
    nodes: Vec<u16>,
    /// Where the next request starts looking (round robin).
    next: usize,
}

struct Worker {
    /// First function and its nodes, per route.
    first: Vec<Option<First>>,
    /// Requests waiting for credits (bounded by the ingress's
    /// `tenant_queue` and `route_queue`).
    queues: SendQueues<Call>,
    /// The queues to serve this turn, in order (see [`SendQueues::order`]).
    order: Vec<(u16, u16)>,
    /// How long a request may wait for credits before it is refused
    /// unsent, per route (see [`route_credit_wait`]).
    credit_wait: Vec<Duration>,
    waiting: HashMap<u32, Waiting>,
    /// Size of `waiting` at which entries whose callers gave up are pruned
    /// next: twice what a prune left (at least [`PRUNE_AT`]), so that many
    /// requests really waiting are not scanned on every pass.
    prune_at: usize,
    me: u16,
    port: Port<DocaTransport, EdgeBufs>,
    rx: Receiver<Call>,
    wake: Arc<Wake>,
    conns_up: Arc<AtomicUsize>,
    events: Vec<PortEvent>,
    drops: Arc<Drops>,
    /// Tenants whose receive reserve turns set (what a test measures an
    /// idle turn by).
    #[cfg(test)]
    reserves_set: usize,
}

impl Worker {
    /// One turn of the driver: the control tick when it is due, then the
    /// callers' calls, the queued sends and the fabric. Returns the work
    /// done, `None` once the edge is stopped.
    fn turn(&mut self, now: Instant, next_control: &mut Instant, stop: &AtomicBool) -> Option<usize> {
        if now >= *next_control {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let mut ev = std::mem::take(&mut self.events);
            self.port.control(&mut ev);
            self.handle(&mut ev);
            self.events = ev;
            self.conns_up.store(self.port.conns_up(), Ordering::Relaxed);
            *next_control = now + Duration::from_millis(1);
        }
        let work = self.take_calls() + self.send_queued(now) + self.poll_fabric();
        // What the receives still need is kept from requests (see
        // `TenantPool`): updated after every poll, which may have taken
        // posted receives (a landed reply) without a buffer to re-post.
        // Only the tenants whose need changed are looked at: a turn with
        // nothing changed costs nothing here, however many tenants and
        // connections there are.
        while let Some(t) = self.port.next_deficit_change() {
            self.port.bufs(t).0.set_recv_reserve(self.port.recv_deficit(t));
            #[cfg(test)]
            {
                self.reserves_set += 1;
            }
        }
        Some(work)
    }

    /// The driver as a task (see [`Edge::spawn`]).
    async fn drive(mut self, stop: Arc<AtomicBool>) {
        use tokio::io::Interest;
        use tokio::io::unix::AsyncFd;
        // A dup of the notification fd, owned here: nothing can close or
        // replace it while tokio watches it, which is what the deprecated
        // (safe) constructor cannot check in general and `register_*`
        // (unsafe, forbidden in this crate) asks its caller to promise.
        #[allow(deprecated)]
        let watch = |fd| AsyncFd::with_interest(fd, Interest::READABLE);
        let fabric = self.port.notification_fd().map(|fd| fd.try_clone_to_owned()).and_then(|fd| {
            fd.and_then(watch)
                .map_err(|e| log::warn!("edge: cannot watch the fabric's notification fd ({e}); napping instead"))
                .ok()
        });
        let mut next_control = Instant::now();
        let mut idle_since = Instant::now();
        loop {
            let now = Instant::now();
            let Some(work) = self.turn(now, &mut next_control, &stop) else { break };
            if work > 0 {
                idle_since = now;
                // Let the HTTP tasks of this worker run between turns.
                tokio::task::yield_now().await;
                continue;
            }
            if now.duration_since(idle_since) <= IDLE_SPIN {
                // Give the core to another process first (the functions and
                // the agent may share it), then this worker's other tasks.
                std::thread::yield_now();
                tokio::task::yield_now().await;
                continue;
            }
            let until = tokio::time::Instant::from_std(next_control);
            let Some(fabric) = &fabric else {
                tokio::time::sleep(Duration::from_micros(50)).await;
                continue;
            };
            if self.begin_sleep() {
                tokio::select! {
                    () = self.wake.notify.notified() => {}
                    r = fabric.readable() => {
                        if let Ok(mut ready) = r {
                            ready.clear_ready();
                        }
                    }
                    () = tokio::time::sleep_until(until) => {}
                }
            }
            self.wake.sleeping.store(false, Ordering::SeqCst);
        }
        self.finish();
    }

    fn run(&mut self, stop: &AtomicBool) {
        let mut next_control = Instant::now();
        let mut idle_since = Instant::now();
        loop {
            let now = Instant::now();
            let Some(work) = self.turn(now, &mut next_control, stop) else { break };
            if work > 0 {
                idle_since = now;
            } else if now.duration_since(idle_since) > IDLE_SPIN {
                self.sleep(next_control.saturating_duration_since(now));
            } else {
                // The edge shares the cores with the HTTP workers: an empty
                // poll gives the core to whoever is runnable.
                std::thread::yield_now();
            }
        }
        self.finish();
    }

    /// Whoever still waits learns that the edge stopped; the requests it
    /// still holds (queued, or not yet taken from the channel) are freed.
    fn finish(&mut self) {
        for (_, w) in self.waiting.drain() {
            let _ = w.reply.send(Err(EdgeError::Stopped));
        }
        while let Some((_, c)) = self.queues.pop_any() {
            self.fail(c, EdgeError::Stopped);
        }
        while let Ok(c) = self.rx.try_recv() {
            if usize::from(c.tenant) < self.queues.tenants() {
                self.fail(c, EdgeError::Stopped);
            } else {
                let _ = c.reply.send(Err(EdgeError::Stopped));
            }
        }
    }

    fn poll_fabric(&mut self) -> usize {
        let mut ev = std::mem::take(&mut self.events);
        let n = self.port.poll(&mut ev);
        self.handle(&mut ev);
        self.events = ev;
        n
    }

    /// Gets ready to sleep on the fabric's notification fd: clears it, polls
    /// once more (what happened before the clear is found now), tells the
    /// callers a sleep is coming, then looks at their calls once more.
    /// `false`: work turned up, do not sleep. Either way the caller clears
    /// `sleeping` afterwards.
    fn begin_sleep(&mut self) -> bool {
        self.port.clear_notification();
        if self.poll_fabric() > 0 {
            return false;
        }
        // SeqCst: see `Wake::wake`.
        self.wake.sleeping.store(true, Ordering::SeqCst);
        self.take_calls() == 0
    }

    /// Sleeps up to `max` on the fabric's notification fd and the callers'
    /// doorbell.
    fn sleep(&mut self, max: Duration) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        if self.port.notification_fd().is_none() {
            std::thread::sleep(max.min(Duration::from_micros(50)));
            return;
        }
        if self.begin_sleep() {
            let mut fds = [PollFd::from_borrowed_fd(self.wake.bell.fd(), PollFlags::IN)];
            let fabric = self.port.notification_fd().map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN));
            let ts = Timespec { tv_sec: max.as_secs() as i64, tv_nsec: i64::from(max.subsec_nanos()) };
            let r = match fabric {
                Some(f) => poll(&mut [fds[0].clone(), f], Some(&ts)),
                None => poll(&mut fds, Some(&ts)),
            };
            if let Err(e) = r
                && e != rustix::io::Errno::INTR
            {
                log::warn!("edge: sleeping: {e}");
            }
        }
        self.wake.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = self.wake.bell.drain() {
            log::warn!("edge: doorbell: {e}");
        }
    }

    fn fail(&mut self, c: Call, e: EdgeError) {
        self.port.bufs_mut(c.tenant).free(c.lease);
        let _ = c.reply.send(Err(e));
    }

    fn take_calls(&mut self) -> usize {
        let mut n = 0;
        while n < 64 {
            let c = match self.rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            };
            n += 1;
            if usize::from(c.tenant) >= self.queues.tenants() {
                let _ = c.reply.send(Err(EdgeError::BadRoute));
                continue;
            }
            let Some(Some(first)) = self.first.get(usize::from(c.route)) else {
                self.fail(c, EdgeError::BadRoute);
                continue;
            };
            if !self.port.any_up(c.tenant, &first.nodes) {
                self.fail(c, EdgeError::Unreachable);
            } else if let Err((c, why)) = self.queues.push(c.tenant, c.route, c) {
                self.fail(c, if why == QueueRefusal::Full { EdgeError::Busy } else { EdgeError::BadRoute });
            }
        }
        n
    }

    fn send_queued(&mut self, now: Instant) -> usize {
        let mut order = std::mem::take(&mut self.order);
        self.queues.order(&mut order);
        let n = order.iter().map(|&(t, r)| self.send_route(t, r, now)).sum();
        self.order = order;
        n
    }

    /// Sends tenant `t`'s requests queued for route `r`, each to the next
    /// node of the route's first function that has credits, until none
    /// has; drops, unsent, those whose caller gave up (timed out), fails
    /// those whose function has no node up, and refuses those that waited
    /// their whole credit wait.
    fn send_route(&mut self, tenant: u16, route: u16, now: Instant) -> usize {
        let mut n = 0;
        let r = usize::from(route);
        // (Every queued request's route has a first function: checked when
        // it was queued.)
        while let Some(c) = self.queues.front(tenant, route)
            && let Some(Some(first)) = self.first.get_mut(r)
        {
            let gone = c.reply.is_closed();
            let node = if gone {
                Err(None)
            } else {
                match self.port.next_can_send(tenant, &first.nodes, &mut first.next) {
                    Some(node) => Ok(node),
                    // Every node whose link is up is out of credits: wait,
                    // for as long as its credit wait allows.
                    None if self.port.any_up(tenant, &first.nodes) => {
                        if now.saturating_duration_since(c.since) < self.credit_wait[r] {
                            break;
                        }
                        Err(Some(EdgeError::NoCredit))
                    }
                    None => Err(Some(EdgeError::Unreachable)),
                }
            };
            let f = first.f;
            let Some(c) = self.queues.pop(tenant, route) else { break };
            let node = match node {
                Ok(node) => node,
                Err(None) => {
                    self.port.bufs_mut(tenant).free(c.lease);
                    continue;
                }
                Err(Some(e)) => {
                    self.fail(c, e);
                    continue;
                }
            };
            let desc = Descriptor {
                tenant: c.tenant,
                flags: 0,
                src_fn: u16::MAX,
                dst_fn: f,
                route: c.route,
                hop: 0,
                status: 0,
                origin: self.me,
                reserved: 0,
                request: c.request,
                buf: c.lease.head(),
                len: c.lease.len(),
            };
            match self.port.send(c.tenant, node, c.lease, desc, u64::from(c.request)) {
                Ok(()) => {
                    n += 1;
                    self.waiting
                        .insert(c.request, Waiting { tenant: c.tenant, route: c.route, peer: node, reply: c.reply });
                }
                Err((lease, _, _)) => {
                    self.port.bufs_mut(c.tenant).free(lease);
                    let _ = c.reply.send(Err(EdgeError::Unreachable));
                }
            }
        }
        n
    }

    fn handle(&mut self, events: &mut Vec<PortEvent>) {
        for e in events.drain(..) {
            match e {
                PortEvent::Sent { tenant, lease, tag, result, .. } => {
                    // The request's buffers are free once placed.
                    self.port.bufs_mut(tenant).free(lease);
                    send_completed(&mut self.waiting, tag, result);
                }
                PortEvent::Received { tenant, lease, desc, .. } => {
                    let reply = if desc.flags & DescFlags::REPLY == 0 {
                        None
                    } else if desc.flags & DescFlags::ERROR != 0 {
                        Some(Err(EdgeError::Failed(ErrorCode::from_u8(desc.status).unwrap_or(ErrorCode::BadRoute))))
                    } else {
                        Some(Ok(()))
                    };
                    // Only a reply of the request's own tenant and route
                    // ends its wait (another tenant's message naming the
                    // same id does not, nor one for another route).
                    let ours = reply.is_some()
                        && self.waiting.get(&desc.request).is_some_and(|w| w.tenant == tenant && w.route == desc.route);
                    let w = if ours { self.waiting.remove(&desc.request) } else { None };
                    match (w, reply) {
                        (Some(w), Some(r)) => {
                            let r = match r {
                                // Adopted before it is sent: if the caller is
                                // gone (now, or before it reads the reply),
                                // dropping it frees the buffers.
                                Ok(()) => Ok((self.port.bufs(tenant).0.adopt(lease), desc)),
                                Err(e) => {
                                    self.port.bufs_mut(tenant).free(lease);
                                    Err(e)
                                }
                            };
                            if w.reply.send(r).is_err() {
                                // Its caller gave up (timed out, left).
                                self.drops.late.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // (`w` is `Some` only with a reply: see `ours`.)
                        (_, reply) => {
                            // Late (the caller gave up), unknown, another
                            // tenant's or route's, or not a reply: dropped,
                            // counted.
                            let d = &self.drops;
                            let why = if reply.is_none() || self.waiting.contains_key(&desc.request) {
                                &d.stray
                            } else {
                                &d.late
                            };
                            why.fetch_add(1, Ordering::Relaxed);
                            log::debug!("edge: dropping a message for request {} (no one waits)", desc.request);
                            self.port.bufs_mut(tenant).free(lease);
                        }
                    }
                }
                PortEvent::PeerDown { peer } => {
                    // The node took these requests and may have run them:
                    // the same answer as a function dying with a request
                    // (502), not an invitation to retry (503).
                    let gone: Vec<u32> = self.waiting.iter().filter(|(_, w)| w.peer == peer).map(|(&r, _)| r).collect();
                    for r in gone {
                        if let Some(w) = self.waiting.remove(&r) {
                            let _ = w.reply.send(Err(EdgeError::Failed(ErrorCode::PeerDied)));
                        }
                    }
                }
                PortEvent::Up { tenant, peer } => log::info!("edge: tenant {tenant} connected to node {peer}"),
                // The port logged the failure; the mesh resets the link,
                // and the requests sent there are answered at its PeerDown.
                PortEvent::Down { .. } => {}
                PortEvent::Protocol { tenant, peer } => {
                    self.drops.protocol.fetch_add(1, Ordering::Relaxed);
                    log::warn!("edge: node {peer} broke the fabric protocol (tenant {tenant})")
                }
                PortEvent::ChainStalled { tenant, peer } => {
                    self.drops.stalled_chain.fetch_add(1, Ordering::Relaxed);
                    log::warn!("edge: a reply from node {peer} stalled mid-chain and was dropped (tenant {tenant})")
                }
                PortEvent::NoBuffer { tenant } => {
                    self.drops.no_buffer.fetch_add(1, Ordering::Relaxed);
                    log::debug!("edge: tenant {tenant}'s pool is empty")
                }
            }
        }
        // Callers that gave up leave their entries: prune closed ones now
        // and then (cheap: only when the map has grown since the last).
        if self.waiting.len() > self.prune_at {
            self.waiting.retain(|_, w| !w.reply.is_closed());
            self.prune_at = (2 * self.waiting.len()).max(PRUNE_AT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(tag: u32) -> (HashMap<u32, Waiting>, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let w = Waiting { tenant: 0, route: 0, peer: 1, reply };
        (HashMap::from([(tag, w)]), rx)
    }

    /// Tenant 0 owns routes 1, 3 and 5, tenant 1 routes 0 and 4, tenant 2
    /// route 2; `tenant_queue` 4, `route_queue` 2.
    fn six_routes() -> SendQueues<u32> {
        SendQueues::new(3, &[1, 0, 2, 0, 1, 0], 4, 2)
    }

    /// The queues are served tenant by tenant in increasing id, each
    /// tenant's routes in increasing id from a start that moves on by one
    /// route every turn (wrapping round); calls leave a route's queue in
    /// the order they came.
    #[test]
    fn waiting_calls_are_served_by_tenant_then_from_a_rotating_route() {
        let mut q = six_routes();
        for (t, r, c) in [(0, 5, 50), (0, 3, 30), (0, 1, 10), (0, 1, 11), (1, 4, 40), (1, 0, 0), (2, 2, 20)] {
            q.push(t, r, c).unwrap();
        }
        let mut out = Vec::new();
        let turns: Vec<Vec<(u16, u16)>> = (0..7)
            .map(|_| {
                q.order(&mut out);
                out.clone()
            })
            .collect();
        let t0 = |rs: [u16; 3]| rs.map(|r| (0, r));
        let t1 = |rs: [u16; 2]| rs.map(|r| (1, r));
        let expect = |a: [(u16, u16); 3], b: [(u16, u16); 2]| [&a[..], &b[..], &[(2, 2)]].concat();
        assert_eq!(
            turns,
            [
                expect(t0([1, 3, 5]), t1([4, 0])), // starting at route 1
                expect(t0([3, 5, 1]), t1([4, 0])), // 2
                expect(t0([3, 5, 1]), t1([4, 0])), // 3
                expect(t0([5, 1, 3]), t1([4, 0])), // 4
                expect(t0([5, 1, 3]), t1([0, 4])), // 5
                expect(t0([1, 3, 5]), t1([0, 4])), // 0
                expect(t0([1, 3, 5]), t1([4, 0])), // 1 again
            ]
        );
        assert_eq!(q.front(0, 1), Some(&10));
        assert_eq!((q.pop(0, 1), q.pop(0, 1), q.pop(0, 1)), (Some(10), Some(11), None));
        // Emptied queues are not served; the rest keep their order.
        assert_eq!(q.pop(2, 2), Some(20));
        q.order(&mut out);
        assert_eq!(out, [(0, 3), (0, 5), (1, 4), (1, 0)]);
        let mut left: Vec<_> = std::iter::from_fn(|| q.pop_any()).collect();
        left.sort_unstable();
        assert_eq!(left, [(0, 30), (0, 50), (1, 0), (1, 40)]);
        q.order(&mut out);
        assert!(out.is_empty());
    }

    /// A tenant queues at most `tenant_queue` calls, a route at most
    /// `route_queue`; a call taken off makes room again.
    #[test]
    fn the_queues_are_bounded_per_tenant_and_per_route() {
        let mut q = six_routes();
        q.push(0, 1, 1).unwrap();
        q.push(0, 1, 2).unwrap();
        assert_eq!(q.push(0, 1, 3), Err((3, QueueRefusal::Full)), "route_queue");
        q.push(0, 3, 4).unwrap();
        q.push(0, 5, 5).unwrap();
        assert_eq!(q.push(0, 3, 6), Err((6, QueueRefusal::Full)), "tenant_queue");
        // Another tenant's room is its own.
        q.push(1, 0, 7).unwrap();
        assert_eq!(q.pop(0, 3), Some(4));
        q.push(0, 3, 6).unwrap();
        // Unknown tenants and routes are refused, not a panic.
        assert_eq!(q.push(3, 0, 8), Err((8, QueueRefusal::NotOwner)));
        assert_eq!(q.push(0, 6, 9), Err((9, QueueRefusal::NotOwner)));
        assert_eq!(q.front(3, 0), None);
        assert_eq!(q.pop(0, 6), None);
    }

    /// `tenants` tenants owning `routes` routes, route `r` tenant
    /// `r % tenants`'s; `tenant_queue` 1024, `route_queue` 64.
    fn many(tenants: usize, routes: usize) -> SendQueues<u32> {
        let owners: Vec<u16> = (0..routes).map(|r| (r % tenants) as u16).collect();
        SendQueues::new(tenants, &owners, 1024, 64)
    }

    /// What the queues reserve at start grows with tenants plus routes,
    /// not with tenants times routes (1000 tenants and 30000 routes once
    /// took 30 million queues, about 1 GB).
    #[test]
    fn the_queues_reserve_memory_linear_in_tenants_and_routes() {
        // (The small case first: it fails fast where the large one would
        // take the gigabyte.)
        for (tenants, routes) in [(100, 3000), (1000, 30_000)] {
            let q = many(tenants, routes);
            let bound = 64 * (tenants + routes);
            assert!(
                q.reserved_bytes() <= bound,
                "{tenants} tenants, {routes} routes: {} bytes reserved, over {bound}",
                q.reserved_bytes()
            );
        }
    }

    /// A turn looks only at the queues of routes that hold calls (or held
    /// some since the last turn), not at every tenant's every route.
    #[test]
    fn a_turn_looks_only_at_routes_with_waiting_calls() {
        for (tenants, routes) in [(100, 3000), (1000, 30_000)] {
            let mut q = many(tenants, routes);
            let mut out = Vec::new();
            q.order(&mut out);
            assert_eq!((q.visits, out.len()), (0, 0), "{tenants}x{routes}: a turn with no call waiting");
            // Two calls of tenant 7 and one of tenant 3.
            for (t, r) in [(7, 7 + tenants), (7, 7), (3, 3 + 2 * tenants)] {
                q.push(t as u16, r as u16, 0).unwrap();
            }
            q.visits = 0;
            q.order(&mut out);
            assert_eq!(out.len(), 3);
            assert!(q.visits <= 3, "{tenants}x{routes}: {} queues looked at for 3 calls", q.visits);
            while q.pop_any().is_some() {}
            q.order(&mut out);
            q.visits = 0;
            q.order(&mut out);
            assert_eq!((q.visits, out.len()), (0, 0), "{tenants}x{routes}: once the calls are gone");
        }
    }

    /// A call of a tenant for a route of another tenant is refused (the
    /// route's function belongs to its own tenant).
    #[test]
    fn a_call_for_another_tenants_route_is_refused() {
        let mut q = six_routes();
        assert_eq!(q.push(1, 1, 1), Err((1, QueueRefusal::NotOwner)));
        assert_eq!(q.push(0, 2, 2), Err((2, QueueRefusal::NotOwner)));
        q.push(0, 1, 3).unwrap();
        assert_eq!(q.front(1, 1), None);
    }

    /// A send that failed after it left may have been placed and run: its
    /// request ends as `PeerDied` (502), not `Unreachable` (503, retry).
    #[test]
    fn the_credit_wait_ends_before_the_routes_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(route_credit_wait(ms(1000), ms(5000)), ms(1000));
        assert_eq!(route_credit_wait(ms(1000), ms(1000)), ms(900));
        assert_eq!(route_credit_wait(ms(1000), ms(300)), ms(240));
        assert_eq!(route_credit_wait(ms(1000), ms(5)), ms(3));
        assert_eq!(route_credit_wait(ms(1000), ms(20)), ms(16));
        assert_eq!(route_credit_wait(ms(1000), ms(1)), Duration::from_micros(500));
    }

    #[test]
    fn a_failed_send_completion_ends_its_request_as_peer_died() {
        for e in [CompletionError::PeerGone, CompletionError::Closed, CompletionError::Aborted] {
            let (mut map, mut rx) = waiting(7);
            send_completed(&mut map, 7, Err(e));
            assert!(map.is_empty(), "{e:?}: the request still waits");
            assert_eq!(rx.try_recv().unwrap().err(), Some(EdgeError::Failed(ErrorCode::PeerDied)), "{e:?}");
        }
        // A successful send: the request waits for its reply.
        let (mut map, mut rx) = waiting(7);
        send_completed(&mut map, 7, Ok(()));
        assert!(map.contains_key(&7));
        assert!(rx.try_recv().is_err());
    }

    /// A cluster of one agent node and `tenants` tenants, with one
    /// ingress; every fabric address a free loopback port (two distinct
    /// ones: both are held until both are known).
    fn idle_cluster(tenants: usize) -> Cluster {
        let held: Vec<std::net::TcpListener> =
            (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let [node, edge] = [0, 1].map(|k| held[k].local_addr().unwrap());
        drop(held);
        let mut text = format!("[[node]]\nname = \"n\"\naddress = \"{node}\"\nruntime_dir = \"/tmp/dne-edge-test\"\n");
        for t in 0..tenants {
            text += &format!(
                "[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 64\nrecv_quota = 4\nmax_chain = 8\n"
            );
        }
        text += &format!(
            "[[ingress]]\nname = \"edge\"\naddress = \"{edge}\"\nhttp = \"127.0.0.1:0\"\n\
             runtime_dir = \"/tmp/dne-edge-test/edge\"\nbuffers = 256\n"
        );
        Cluster::parse(&text).unwrap()
    }

    /// A turn of the driver with nothing changed sets no tenant's receive
    /// reserve: its cost does not grow with the tenants (nor, through the
    /// port's queries, with the connections). Before, every turn set every
    /// tenant's, from a query that looked at every connection.
    #[test]
    fn an_idle_turn_sets_no_receive_reserve() {
        let tenants = 20;
        let cfg = idle_cluster(tenants);
        let pools = Pools::create(&cfg, "edge-test", 256, shm::PagePolicy::Normal).unwrap();
        let (_edge, mut w) = Edge::new(&cfg, 0, pools, false).unwrap();
        let stop = AtomicBool::new(false);
        let mut next_control = Instant::now();
        w.turn(Instant::now(), &mut next_control, &stop).unwrap();
        assert_eq!(w.reserves_set, tenants, "the first turn sets every tenant's");
        w.reserves_set = 0;
        for _ in 0..10 {
            w.turn(Instant::now(), &mut next_control, &stop).unwrap();
        }
        assert_eq!(w.reserves_set, 0, "tenants' reserves set by 10 idle turns");
    }
}
