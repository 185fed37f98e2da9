//! The ingress's own pools: one per tenant, created by the ingress (the
//! fabric side registers them with its endpoint), holding requests on their
//! way into the cluster and replies on their way out.
//!
//! Every buffer the ingress holds is inside a [`PoolLease`], which frees it
//! when dropped, so a request abandoned anywhere (client gone, timeout,
//! error) returns its buffers; waiters for buffers are woken on every free.

use config::Cluster;
use shm::{AllocError, Lease, PagePolicy, Pool, PoolOpenError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};
use wire::Owner;
use wire::http::{Frags, FragsMut};
use wire::segment::AGENT_SLOT;

/// The slot the ingress holds its buffers as in its own pools. The ingress
/// plays the agent's part for them (it owns their fabric endpoint), so it
/// uses the agent's slot; no function attaches to these pools.
pub const INGRESS_SLOT: u16 = AGENT_SLOT;

/// One tenant's pool in the ingress.
///
/// Requests and replies share it: the fabric side keeps receives posted in
/// it for the replies, the HTTP side allocates requests from it. Requests
/// never take the buffers the fabric side still needs to re-post its
/// receives ([`set_recv_reserve`](Self::set_recv_reserve)): otherwise,
/// under overload, queued requests (waiting for the cluster's credits)
/// could hold every buffer, no reply could land, and nothing would move
/// until the requests timed out.
#[derive(Debug)]
pub struct TenantPool {
    tenant: u16,
    pool: Pool,
    freed: tokio::sync::Notify,
    recv_reserve: AtomicU32,
}

/// The pools of every tenant, indexed by tenant id.
#[derive(Debug, Clone)]
pub struct Pools(Vec<Arc<TenantPool>>);

/// A pool could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PoolsError {
    /// The geometry from the config is unusable for the ingress's pool.
    #[error("tenant[{tenant}]: pool of {buffers} buffers of {buf_size} B: {err}")]
    Geometry {
        /// Tenant id.
        tenant: u16,
        /// Buffers asked for.
        buffers: u32,
        /// Buffer size.
        buf_size: u32,
        /// Why.
        err: wire::desc::GeometryError,
    },
    /// Creating the shared region failed.
    /// The pools need more memory than the machine has available (a
    /// populated mapping beyond it gets the process killed, silently).
    #[error(
        "the pools need {} MiB; this machine has {} MiB available (MemAvailable and free huge pages): \
         lower the ingress's buffers or the tenants' buf_size", need >> 20, have >> 20
    )]
    Memory {
        /// Bytes the pools need.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    #[error("tenant[{tenant}]: creating the pool: {err}")]
    Create {
        /// Tenant id.
        tenant: u16,
        /// Why.
        err: PoolOpenError,
    },
}

impl Pools {
    /// Creates one pool per tenant of `cluster`: the tenant's buffer size,
    /// `buffers` buffers (the ingress's `buffers`), chains up to the
    /// tenant's `max_chain` (at most the pool). The memfd names carry the
    /// ingress's name so an operator can tell them apart.
    pub fn create(cluster: &Cluster, ingress: &str, buffers: u32, policy: PagePolicy) -> Result<Self, PoolsError> {
        let need: u64 = cluster.tenants.iter().map(|t| u64::from(t.buf_size) * u64::from(buffers)).sum();
        if let Some(have) = shm::memory_available()
            && need > have
        {
            return Err(PoolsError::Memory { need, have });
        }
        let mut v = Vec::with_capacity(cluster.tenants.len());
        for (i, t) in cluster.tenants.iter().enumerate() {
            let tenant = i as u16;
            let g = Cluster::ingress_pool_geometry(t, tenant, buffers).map_err(|err| PoolsError::Geometry {
                tenant,
                buffers,
                buf_size: t.buf_size,
                err,
            })?;
            let pool = Pool::create(&format!("dne-ingress-{ingress}-{}", t.name), g, policy)
                .map_err(|err| PoolsError::Create { tenant, err })?;
            v.push(Arc::new(TenantPool {
                tenant,
                pool,
                freed: tokio::sync::Notify::new(),
                recv_reserve: AtomicU32::new(0),
            }));
        }
        Ok(Self(v))
    }

    /// The pool of tenant `id`.
    pub fn get(&self, id: u16) -> Option<&Arc<TenantPool>> {
        self.0.get(usize::from(id))
    }

    /// Every pool, by tenant id.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<TenantPool>> {
        self.0.iter()
    }
}

impl TenantPool {
    /// Tenant id.
    pub fn tenant(&self) -> u16 {
        self.tenant
    }

    /// The shared pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Free buffers (see [`Pool::free_buffers`]).
    pub fn free_buffers(&self) -> u32 {
        self.pool.free_buffers()
    }

    /// Buffers in the pool.
    pub fn capacity(&self) -> u32 {
        self.pool.geometry().buf_count()
    }

    /// Sets how many free buffers requests must leave to the fabric side
    /// (the receives it wants posted and has not posted yet).
    pub fn set_recv_reserve(&self, n: u32) {
        self.recv_reserve.store(n, Relaxed);
    }

    /// Free buffers requests must leave to the fabric side.
    pub fn recv_reserve(&self) -> u32 {
        self.recv_reserve.load(Relaxed)
    }

    /// Allocates a chain for `len` bytes now for a request, or fails
    /// (`Exhausted` also when only the fabric side's reserve is left).
    pub fn try_alloc(self: &Arc<Self>, len: u32) -> Result<PoolLease, AllocError> {
        let need = self.pool.geometry().frags_for(len);
        if self.pool.free_hint() < need.saturating_add(self.recv_reserve()) {
            return Err(AllocError::Exhausted);
        }
        let lease = self.pool.alloc(len, Owner::Held(INGRESS_SLOT))?;
        Ok(PoolLease { pool: self.clone(), lease: Some(lease) })
    }

    /// Allocates a chain for `len` bytes, waiting up to `wait` for buffers
    /// to be freed (bounded: never queues unboundedly).
    pub async fn alloc_wait(self: &Arc<Self>, len: u32, wait: Duration) -> Result<PoolLease, AllocError> {
        let deadline = Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the attempt, so a free in between wakes us.
            freed.as_mut().enable();
            match self.try_alloc(len) {
                Ok(l) => return Ok(l),
                Err(AllocError::Exhausted) => {}
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, freed).await.is_err() {
                return self.try_alloc(len);
            }
        }
    }

    /// Takes responsibility for a lease of this pool held as
    /// [`INGRESS_SLOT`] (an upstream's reply).
    pub fn adopt(self: &Arc<Self>, lease: Lease) -> PoolLease {
        debug_assert_eq!(lease.holder(), Owner::Held(INGRESS_SLOT));
        PoolLease { pool: self.clone(), lease: Some(lease) }
    }

    /// Frees a lease of this pool (whoever holds it) and wakes waiters.
    pub(crate) fn release(&self, lease: Lease) {
        if let Err(e) = self.pool.free(lease) {
            log::error!("tenant {}: freeing a lease: {e}", self.tenant);
        }
        self.freed.notify_waiters();
    }
}

/// Buffers of an ingress pool held by the ingress; freed on drop.
#[derive(Debug)]
pub struct PoolLease {
    pool: Arc<TenantPool>,
    // `Some` until taken by `into_lease` or dropped.
    lease: Option<Lease>,
}

impl PoolLease {
    /// The pool the buffers belong to.
    pub fn pool(&self) -> &Arc<TenantPool> {
        &self.pool
    }

    /// The lease (head, length, buffers).
    pub fn lease(&self) -> &Lease {
        // Only `into_lease` and `drop` take it, both consuming `self`.
        self.lease.as_ref().expect("lease present until consumed")
    }

    /// Bytes of the message.
    pub fn len(&self) -> u32 {
        self.lease().len()
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives up the guard: the caller now owns the buffers (to hand them
    /// over, or free them) and must give them back or free them.
    pub fn into_lease(mut self) -> Lease {
        self.lease.take().expect("lease present until consumed")
    }

    /// The message's fragments, writable.
    pub fn frags_mut(&mut self) -> LeaseFrags<'_> {
        let lease = self.lease.as_mut().expect("lease present until consumed");
        LeaseFrags { pool: self.pool.pool(), lease }
    }

    /// The message's fragments, read-only.
    pub fn frags(&self) -> LeaseView<'_> {
        LeaseView { pool: self.pool.pool(), lease: self.lease() }
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            self.pool.release(l);
        }
    }
}

/// Read-only fragments of a lease.
#[derive(Debug)]
pub struct LeaseView<'a> {
    pool: &'a Pool,
    lease: &'a Lease,
}

impl<'a> LeaseView<'a> {
    /// Fragments of `lease` in `pool`.
    pub fn new(pool: &'a Pool, lease: &'a Lease) -> Self {
        Self { pool, lease }
    }
}

impl Frags for LeaseView<'_> {
    fn frag_count(&self) -> u32 {
        self.lease.frags()
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        self.pool.frag(self.lease, k)
    }
    fn total_len(&self) -> u64 {
        u64::from(self.lease.len())
    }
}

/// Writable fragments of a lease.
#[derive(Debug)]
pub struct LeaseFrags<'a> {
    pool: &'a Pool,
    lease: &'a mut Lease,
}

impl<'a> LeaseFrags<'a> {
    /// Fragments of `lease` in `pool`.
    pub fn new(pool: &'a Pool, lease: &'a mut Lease) -> Self {
        Self { pool, lease }
    }
}

impl Frags for LeaseFrags<'_> {
    fn frag_count(&self) -> u32 {
        self.lease.frags()
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        self.pool.frag(self.lease, k)
    }
    fn total_len(&self) -> u64 {
        u64::from(self.lease.len())
    }
}

impl FragsMut for LeaseFrags<'_> {
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]> {
        self.pool.frag_mut(self.lease, k)
    }
}

/// A message being written while its length is not known yet (a request
/// body streaming in): one buffer is taken at a time, as the bytes arrive,
/// and the buffers are linked into one chain at the end. Every byte is
/// written once, straight into its final place.
#[derive(Debug)]
pub struct MsgBuilder {
    pool: Arc<TenantPool>,
    parts: Vec<PoolLease>,
    cap: u64,
    max: u64,
    /// How long this message has waited for buffers so far, over all its
    /// [`reserve`](Self::reserve) calls.
    waited: Duration,
}

/// Why a message could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The message exceeds the longest chain of the pool.
    #[error("message of {0} bytes exceeds the pool's longest chain")]
    TooLarge(u64),
    /// No buffer was freed in time.
    #[error("pool exhausted")]
    Exhausted,
}

impl MsgBuilder {
    /// An empty message in `pool`.
    pub fn new(pool: Arc<TenantPool>) -> Self {
        let g = pool.pool().geometry();
        let cap = u64::from(g.payload_cap());
        Self { parts: Vec::with_capacity(4), cap, max: g.max_len(), pool, waited: Duration::ZERO }
    }

    /// The largest message the pool can carry.
    pub fn max_len(&self) -> u64 {
        self.max
    }

    /// Makes room for `len` bytes. The message waits for buffers up to
    /// `wait` in all, over all its calls (not per buffer: a large body would
    /// otherwise wait that long for each of its buffers, holding those it
    /// has). Only the time spent waiting for buffers counts, not the time
    /// between calls: a body arriving slowly, reserved frame by frame,
    /// still gets its wait when the pool is short.
    pub async fn reserve(&mut self, len: u64, wait: Duration) -> Result<(), BuildError> {
        if len > self.max {
            return Err(BuildError::TooLarge(len));
        }
        while (self.parts.len() as u64) * self.cap < len {
            // One buffer at a time: `cap` fits a u32 (it is a payload cap).
            let left = wait.saturating_sub(self.waited);
            let start = Instant::now();
            let got = self.pool.alloc_wait(self.cap as u32, left).await;
            self.waited += start.elapsed();
            self.parts.push(got.map_err(|_| BuildError::Exhausted)?);
        }
        Ok(())
    }

    /// Writes `data` at message offset `off` (room must be reserved).
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<(), BuildError> {
        let have = self.parts.len() as u64 * self.cap;
        if off + data.len() as u64 > have {
            return Err(BuildError::TooLarge(off + data.len() as u64));
        }
        wire::http::write_at(&mut BuilderFrags(self), off, data).map_err(|_| BuildError::TooLarge(have))
    }

    /// The reserved buffers as fragments (each a whole buffer).
    pub fn frags_mut(&mut self) -> impl FragsMut + '_ {
        BuilderFrags(self)
    }

    /// Links the buffers into one message of `len` bytes; buffers beyond
    /// what `len` needs are freed.
    pub fn finish(mut self, len: u32) -> Result<PoolLease, BuildError> {
        let need = wire::desc::frags_for(len, self.cap as u32) as usize;
        if need > self.parts.len() {
            return Err(BuildError::TooLarge(u64::from(len)));
        }
        self.parts.truncate(need);
        let mut raw: Vec<Lease> = self.parts.drain(..).map(PoolLease::into_lease).collect();
        match self.pool.pool().join(&mut raw, len) {
            Ok(l) => Ok(self.pool.adopt(l)),
            Err(_) => {
                // Not reachable with `need` parts of one buffer each; give
                // the buffers back rather than leak them.
                for l in raw {
                    self.pool.release(l);
                }
                Err(BuildError::TooLarge(u64::from(len)))
            }
        }
    }
}

struct BuilderFrags<'a>(&'a mut MsgBuilder);

impl Frags for BuilderFrags<'_> {
    fn frag_count(&self) -> u32 {
        self.0.parts.len() as u32
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        let p = self.0.parts.get(k as usize)?;
        p.pool.pool().frag(p.lease(), 0)
    }
}

impl FragsMut for BuilderFrags<'_> {
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]> {
        let p = self.0.parts.get_mut(k as usize)?;
        let lease = p.lease.as_mut()?;
        p.pool.pool.frag_mut(lease, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(buffers: u32) -> Pools {
        let c = Cluster::parse(
            "[[node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"/tmp/x\"\n\
             [[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 256\nbuffers = 64\nrecv_quota = 1\nmax_chain = 8\n",
        )
        .unwrap();
        Pools::create(&c, "test", buffers, PagePolicy::Normal).unwrap()
    }

    #[tokio::test]
    async fn builder_writes_across_buffers_and_frees_extras() {
        let p = pools(16).get(0).unwrap().clone();
        let mut b = MsgBuilder::new(p.clone());
        assert_eq!(b.max_len(), 192 * 8);
        b.reserve(500, Duration::ZERO).await.unwrap();
        let data: Vec<u8> = (0..500u32).map(|i| i as u8).collect();
        b.write(0, &data[..100]).unwrap();
        b.write(100, &data[100..]).unwrap();
        assert_eq!(b.write(500, &[0; 100]), Err(BuildError::TooLarge(600)));
        b.reserve(700, Duration::ZERO).await.unwrap();
        assert_eq!(p.free_buffers(), 12);
        let l = b.finish(500).unwrap();
        assert_eq!(p.free_buffers(), 13, "the fourth buffer went back");
        assert_eq!(p.pool().read_to_vec(l.lease()), data);
        drop(l);
        assert_eq!(p.free_buffers(), 16);
        let mut b = MsgBuilder::new(p.clone());
        assert_eq!(b.reserve(192 * 8 + 1, Duration::ZERO).await, Err(BuildError::TooLarge(192 * 8 + 1)));
    }

    #[tokio::test]
    async fn waiting_for_buffers_is_bounded_and_woken_by_frees() {
        let p = pools(2).get(0).unwrap().clone();
        let a = p.try_alloc(1).unwrap();
        let b = p.try_alloc(1).unwrap();
        let t = Instant::now();
        assert!(p.alloc_wait(1, Duration::from_millis(50)).await.is_err());
        assert!(t.elapsed() >= Duration::from_millis(50));
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.alloc_wait(1, Duration::from_secs(10)).await.map(|l| l.len()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(1));
        drop(b);
        assert_eq!(p.free_buffers(), 2);
    }

    /// A message's wait for buffers is bounded as a whole: buffers freed
    /// one at a time, each well within the wait, do not let it wait the
    /// wait again for each of them.
    #[tokio::test]
    async fn a_message_waits_for_its_buffers_once_not_once_per_buffer() {
        let p = pools(16).get(0).unwrap().clone();
        let mut held: Vec<PoolLease> = (0..16).map(|_| p.try_alloc(1).unwrap()).collect();
        let freer = tokio::spawn(async move {
            while let Some(l) = held.pop() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(l);
            }
        });
        let mut b = MsgBuilder::new(p.clone());
        // Eight buffers, one freed every 20 ms, a wait of 50 ms: before, each
        // buffer waited up to 50 ms anew and the message got all eight.
        let r = b.reserve(192 * 8, Duration::from_millis(50)).await;
        assert_eq!(r, Err(BuildError::Exhausted));
        drop(b);
        freer.await.unwrap();
        assert_eq!(p.free_buffers(), 16);
    }

    #[tokio::test]
    async fn requests_leave_the_receive_reserve_alone() {
        let p = pools(4).get(0).unwrap().clone();
        p.set_recv_reserve(3);
        let a = p.try_alloc(1).unwrap();
        assert_eq!(p.try_alloc(1).err(), Some(AllocError::Exhausted), "3 free, all reserved");
        assert!(p.alloc_wait(1, Duration::from_millis(20)).await.is_err());
        // The fabric side's own allocations are not held back.
        let r = p.pool().alloc(1, Owner::Held(INGRESS_SLOT)).unwrap();
        p.set_recv_reserve(0);
        let b = p.try_alloc(1).unwrap();
        drop((a, b));
        p.pool().free(r).unwrap();
        assert_eq!(p.free_buffers(), 4);
    }
}
