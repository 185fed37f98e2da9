//! The seam between the HTTP edge and the cluster: [`Upstream`].
//!
//! The edge turns a request into an envelope in a lease of the tenant's
//! ingress pool and calls [`Upstream::call`]; the upstream carries it to the
//! route's first function and resolves to the chain's reply, a lease of the
//! same pool holding a response envelope, or to an [`UpstreamError`].
//!
//! Two implementations:
//! * [`crate::edge::Edge`], the fabric upstream: sends the lease's buffers
//!   over the fabric to the node of the chain's first function, and
//!   completes the call when the reply with the same request id lands in a
//!   receive buffer of the same pool;
//! * [`InProcess`] (here): runs the chain's functions on worker threads of
//!   the ingress process, over the same pool buffers, passing ownership
//!   from hop to hop exactly as descriptors do (hand over, accept). The
//!   ingress tests and the `ingress` benchmark use it.
//!
//! Contract of every upstream:
//! * it owns the request lease from the call on, and frees it (dropping the
//!   [`PoolLease`]) on every error;
//! * waiting for credits or queue room is bounded; when they stay exhausted
//!   it resolves to [`UpstreamError::NoCredit`] / [`UpstreamError::QueueFull`];
//! * the returned future may be dropped at any time (timeout, client gone):
//!   a reply arriving afterwards is freed by the upstream, never leaked.

use crate::pool::{INGRESS_SLOT, LeaseFrags, PoolLease, TenantPool};
use config::Cluster;
use dne_functions::{HopError, Next, Transform, handle_envelope};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wire::desc::NO_NODE;
use wire::{Descriptor, ErrorCode, Owner};

/// Why a call produced no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The tenant's fabric credits stayed exhausted (edge: 503).
    #[error("no fabric credit for the tenant")]
    NoCredit,
    /// The tenant's send queue stayed full (edge: 503).
    #[error("tenant queue full")]
    QueueFull,
    /// No reply in time (edge: 504).
    #[error("no reply in time")]
    Timeout,
    /// A function of the chain replied with an error descriptor (edge: 502).
    #[error("function failed: {0}")]
    FunctionError(ErrorCode),
    /// The chain's first function cannot be reached (edge: 503).
    #[error("chain unreachable")]
    Unreachable,
}

impl UpstreamError {
    /// A short, stable, lowercase name (metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NoCredit => "no_credit",
            Self::QueueFull => "queue_full",
            Self::Timeout => "timeout",
            Self::FunctionError(_) => "function_error",
            Self::Unreachable => "unreachable",
        }
    }
}

/// The reply of one call.
pub type UpstreamFuture = Pin<Box<dyn Future<Output = Result<PoolLease, UpstreamError>> + Send + 'static>>;

/// Carries requests into the cluster and brings their replies back.
pub trait Upstream: Send + Sync + 'static {
    /// Sends the request envelope in `msg` (a lease of tenant `tenant`'s
    /// ingress pool) down route `route`, tagged with `request`, and
    /// resolves to the reply: a lease of the same pool holding a response
    /// envelope. See the module docs for the contract.
    fn call(&self, route: u16, tenant: u16, msg: PoolLease, request: u32) -> UpstreamFuture;

    /// Messages from the cluster the upstream dropped because no request
    /// waited for them (a late reply, say), by reason: counts since it
    /// started (the metrics show them).
    fn dropped(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// What an in-process function does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Apply a transform to the body in place (the last hop replies 200).
    Transform(Transform),
    /// Reply with an error descriptor carrying this code.
    Fail(ErrorCode),
    /// Take this long (service time), then transform.
    Slow(Duration, Transform),
}

/// Settings of [`InProcess`].
#[derive(Clone, Copy, Debug)]
pub struct InProcessConfig {
    /// Worker threads running chains.
    pub workers: usize,
    /// Requests queued per tenant at most.
    pub queue_depth: usize,
    /// How long a call waits for queue room before [`UpstreamError::QueueFull`].
    pub queue_wait: Duration,
}

impl Default for InProcessConfig {
    fn default() -> Self {
        Self { workers: 2, queue_depth: 1024, queue_wait: Duration::from_millis(100) }
    }
}

/// An in-process function could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    /// A function of a route has no behavior.
    #[error("function \"{0}\": no in-process behavior (name a transform for it)")]
    NoBehavior(String),
    /// A worker thread could not be started.
    #[error("starting a worker: {0}")]
    Spawn(#[from] std::io::Error),
}

struct Job {
    route: u16,
    msg: PoolLease,
    request: u32,
    reply: tokio::sync::oneshot::Sender<Result<PoolLease, UpstreamError>>,
}

struct Queues {
    per_tenant: Vec<VecDeque<Job>>,
    next: usize,
    stop: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    work: Condvar,
    room: tokio::sync::Notify,
    /// Per route: (function id, behavior) per hop.
    chains: Vec<Vec<(u16, Behavior)>>,
    cfg: InProcessConfig,
}

/// The in-process stand-in for the cluster (see the module docs).
pub struct InProcess {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl core::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InProcess").field("cfg", &self.shared.cfg).finish_non_exhaustive()
    }
}

impl InProcess {
    /// Starts the workers. `behavior` names what each function of a route
    /// does (by function name); a function without one is an error.
    pub fn new(
        cluster: &Cluster,
        cfg: InProcessConfig,
        behavior: impl Fn(&str) -> Option<Behavior>,
    ) -> Result<Self, InProcessError> {
        let mut chains = Vec::with_capacity(cluster.routes.len());
        for r in &cluster.routes {
            let mut hops = Vec::with_capacity(r.chain.len());
            for name in &r.chain {
                let id = cluster.function_id(name).ok_or_else(|| InProcessError::NoBehavior(name.clone()))?;
                let b = behavior(name).ok_or_else(|| InProcessError::NoBehavior(name.clone()))?;
                hops.push((id, b));
            }
            chains.push(hops);
        }
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues {
                per_tenant: (0..cluster.tenants.len()).map(|_| VecDeque::new()).collect(),
                next: 0,
                stop: false,
            }),
            work: Condvar::new(),
            room: tokio::sync::Notify::new(),
            chains,
            cfg,
        });
        let mut threads = Vec::new();
        for i in 0..cfg.workers.max(1) {
            let s = shared.clone();
            threads.push(std::thread::Builder::new().name(format!("ingress-fn-{i}")).spawn(move || worker(&s))?);
        }
        Ok(Self { shared, threads })
    }

    /// Behaviors by function name: a function called like a transform
    /// (`upper`, `rot13`, ...) applies it; others are looked up in `extra`.
    pub fn by_name<'a>(extra: &'a [(String, Behavior)]) -> impl Fn(&str) -> Option<Behavior> + 'a {
        move |name| {
            extra
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
                .or_else(|| Transform::from_name(name).ok().map(Behavior::Transform))
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shared.queues.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("an in-process worker panicked");
            }
        }
    }
}

impl Upstream for InProcess {
    fn call(&self, route: u16, tenant: u16, msg: PoolLease, request: u32) -> UpstreamFuture {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut job = Job { route, msg, request, reply: tx };
        if usize::from(route) >= self.shared.chains.len() || msg_tenant(&job) != tenant {
            return Box::pin(async { Err(UpstreamError::Unreachable) });
        }
        // Fast path: room in the queue now.
        match push(&self.shared, tenant, job) {
            Ok(()) => return Box::pin(async move { rx.await.unwrap_or(Err(UpstreamError::Unreachable)) }),
            Err(j) => job = j,
        }
        let shared = self.shared.clone();
        Box::pin(async move {
            let deadline = Instant::now() + shared.cfg.queue_wait;
            let mut job = job;
            loop {
                let room = shared.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                match push(&shared, tenant, job) {
                    Ok(()) => break,
                    Err(j) => job = j,
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || tokio::time::timeout(left, room).await.is_err() {
                    // `job` (and its lease) is dropped: the buffers go back.
                    return Err(UpstreamError::QueueFull);
                }
            }
            rx.await.unwrap_or(Err(UpstreamError::Unreachable))
        })
    }
}

fn msg_tenant(job: &Job) -> u16 {
    job.msg.pool().tenant()
}

/// Queues `job` for tenant `tenant` if its queue has room.
fn push(s: &Shared, tenant: u16, job: Job) -> Result<(), Job> {
    let mut q = s.queues.lock().unwrap_or_else(|e| e.into_inner());
    let stop = q.stop;
    let Some(queue) = q.per_tenant.get_mut(usize::from(tenant)) else { return Err(job) };
    if queue.len() >= s.cfg.queue_depth || stop {
        return Err(job);
    }
    queue.push_back(job);
    drop(q);
    s.work.notify_one();
    Ok(())
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queues.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if q.stop {
                    return;
                }
                // Round robin over tenants with work.
                let n = q.per_tenant.len();
                let start = q.next;
                let found = (0..n).map(|i| (start + i) % n).find(|&t| !q.per_tenant[t].is_empty());
                if let Some(t) = found {
                    q.next = (t + 1) % n;
                    break q.per_tenant[t].pop_front();
                }
                q = s.work.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        s.room.notify_waiters();
        let Some(job) = job else { continue };
        let Job { route, msg, request, reply } = job;
        let out = run_chain(s, route, msg, request);
        // A dropped receiver (timeout, client gone) drops the reply here,
        // which frees its buffers.
        let _ = reply.send(out);
    }
}

/// Runs route `route`'s functions over `msg`, passing the buffers from hop
/// to hop as descriptors do: hand over to the next function's slot, which
/// accepts (validating the descriptor against the pool) before touching
/// the payload. The last hop replies to the ingress's slot.
fn run_chain(s: &Shared, route: u16, msg: PoolLease, request: u32) -> Result<PoolLease, UpstreamError> {
    let chain = &s.chains[usize::from(route)];
    let tp = msg.pool().clone();
    let pool = tp.pool();
    let tenant = tp.tenant();
    let mut lease = msg.into_lease();
    let mut src = u16::MAX;
    let n = chain.len();
    for (hop, &(fid, behavior)) in chain.iter().enumerate() {
        // Function ids are below u16::MAX - 1 (config), so they never
        // collide with the ingress's slot.
        let desc = Descriptor {
            tenant,
            src_fn: src,
            dst_fn: fid,
            route,
            hop: hop as u8,
            origin: NO_NODE,
            request,
            ..Default::default()
        };
        lease = move_to(&tp, lease, desc, fid).map_err(|e| {
            log::error!("in-process hop {hop} of route {route}: {e}");
            UpstreamError::Unreachable
        })?;
        let transform = match behavior {
            Behavior::Transform(t) => Ok(t),
            Behavior::Fail(code) => Err(code),
            Behavior::Slow(d, t) => {
                std::thread::sleep(d);
                Ok(t)
            }
        };
        let result = transform.map_err(UpstreamError::FunctionError).and_then(|t| {
            let mut frags = LeaseFrags::new(pool, &mut lease);
            let last = hop + 1 == n;
            let ct = if last {
                wire::http::decode(&frags).ok().and_then(|e| e.header("content-type").map(<[u8]>::to_vec))
            } else {
                None
            };
            let ct = ct.unwrap_or_else(|| b"application/octet-stream".to_vec());
            let hs: [(&[u8], &[u8]); 1] = [(b"content-type", &ct)];
            let next = if last { Next::Reply { status: 200, headers: &hs } } else { Next::Forward };
            handle_envelope(&mut frags, t, next).map(|_| ()).map_err(|e: HopError| {
                log::debug!("function {fid}: {e}");
                UpstreamError::FunctionError(ErrorCode::FunctionFailed)
            })
        });
        if let Err(e) = result {
            tp.release(lease);
            return Err(e);
        }
        src = fid;
    }
    let desc = Descriptor {
        tenant,
        src_fn: src,
        dst_fn: u16::MAX,
        route,
        hop: n as u8,
        origin: NO_NODE,
        request,
        flags: wire::DescFlags::REPLY,
        ..Default::default()
    };
    let lease = move_to(&tp, lease, desc, INGRESS_SLOT).map_err(|e| {
        log::error!("in-process reply of route {route}: {e}");
        UpstreamError::Unreachable
    })?;
    Ok(tp.adopt(lease))
}

/// Hands `lease` over to `slot` and accepts it there, as a descriptor
/// send and receive do.
fn move_to(tp: &TenantPool, lease: shm::Lease, desc: Descriptor, slot: u16) -> Result<shm::Lease, String> {
    let pool = tp.pool();
    let (head, len) = match pool.hand_over(lease, Owner::Function(slot)) {
        Ok(x) => x,
        Err((lease, e)) => {
            tp.release(lease);
            return Err(format!("hand over: {e}"));
        }
    };
    let desc = Descriptor { buf: head, len, ..desc };
    pool.accept(&desc, slot).map_err(|e| {
        // Take the buffers back from the handed-over state and free them.
        match pool.take_back(head, len, Owner::Function(slot), Owner::Held(slot)) {
            Ok(l) => tp.release(l),
            Err(e2) => log::error!("in-process: buffers of chain {head} stuck: {e2}"),
        }
        format!("accept: {e}")
    })
}
