//! Tenant pools: one shared region per tenant, split into fixed-size
//! buffers, with the allocator and per-buffer owners of [`crate::alloc`].
//!
//! A process holds a buffer through a [`Lease`], which exists only after the
//! buffer's recorded owner moved to [`Owner::Held`] for this process's slot
//! (allocation, or [`Pool::accept`] of a received descriptor). A lease is
//! not `Clone`, and the owner transition happens once per hand-off, so a
//! process never holds two leases of one buffer, even when a peer sends the
//! same descriptor twice. Payload bytes of a leased buffer are handed out as
//! plain slices: this is the zero-copy access functions need. Other
//! processes of the same tenant map the same bytes; the tenant is the
//! security domain (DESIGN.md section 2), and no other tenant maps the pool.

use crate::alloc::{self, AllocError, FreeError, PoolCells};
use crate::region::{AccessError, Backing, PagePolicy, Region, RegionError};
use crate::sync::{AtomicU32, AtomicU64};
use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::os::fd::OwnedFd;
use wire::desc::frag_len;
use wire::segment::{BufMeta, NIL, PoolHeader, PoolLayout};
use wire::{Descriptor, DescriptorError, Owner, PoolGeometry, SegmentError};

/// A pool could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolOpenError {
    /// Mapping failed.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The segment is not a usable pool of this version.
    #[error("pool segment: {0}")]
    Segment(#[from] SegmentError),
    /// The header could not be read.
    #[error("pool segment: {0}")]
    Access(#[from] AccessError),
}

/// Data could not be copied into a lease ([`Pool::write`]). Nothing was
/// changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The data does not fit the lease's buffers (`TooLong`).
    #[error(transparent)]
    Len(#[from] DescriptorError),
    /// The lease is of another pool (see [`Pool::owns`]): its indices name
    /// other buffers in this one.
    #[error("the lease is of another pool")]
    ForeignLease,
}

/// One-buffer leases could not be linked into a message ([`Pool::join`]).
/// Nothing was changed: the parts and the pool's links are as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The length does not add up: longer than the pool's largest message,
    /// or needing another number of buffers than there are parts (then
    /// `max` is the parts' payload).
    #[error(transparent)]
    Len(#[from] DescriptorError),
    /// A part is a lease of another pool (see [`Pool::owns`]): its index
    /// names another buffer in this one.
    #[error("a part is a lease of another pool")]
    ForeignLease,
    /// The parts are not all held as the first one is: a chain has one
    /// holder.
    #[error("the parts have different holders")]
    MixedHolders,
    /// A part holds a chain of several buffers (or none), not one buffer.
    #[error("a part is not one buffer")]
    NotOneBuffer,
}

/// A received descriptor that cannot be accepted. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The descriptor fails validation against this pool.
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// A chain link read from the pool points outside it.
    #[error("chain link {0} outside the pool")]
    BadLink(u32),
    /// A buffer of the chain is not owned by the receiver (not handed over,
    /// already leased, or freed).
    #[error("buffer {index} has owner {owner:#x}, not the receiver")]
    NotOwner {
        /// Buffer index.
        index: u32,
        /// Recorded owner (raw).
        owner: u32,
    },
}

impl AcceptError {
    /// A short, stable, lowercase name (used as a metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Descriptor(e) => e.as_str(),
            Self::BadLink(_) => "bad_link",
            Self::NotOwner { .. } => "not_owner",
        }
    }
}

/// Which pool segment buffers are in, as a number this process gives the
/// device and inode of the file that backs the pool, read once when the
/// pool is created or opened. Every mapping of one segment in this process
/// has the same (a lease moves between the attaches of a tenant's pool),
/// and two segments that exist at the same time never do. Pools give out
/// the same buffer indices and holders, so a lease names buffers only
/// together with this. A number, not the device and inode themselves, so
/// that a [`Lease`] stays 20 bytes: leases fill the agent's send queues.
/// The numbers are this process's own; they mean nothing in another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolId(u32);

impl PoolId {
    /// No pool's: the pool of a lease made by [`Lease::by_index`], which no
    /// [`Pool`] takes.
    pub const NONE: Self = Self(0);

    fn of(region: &Region) -> Result<Self, RegionError> {
        use std::collections::HashMap;
        use std::sync::{Mutex, PoisonError};
        /// The files pools of this process were backed by, to their ids
        /// (one entry per segment ever mapped here: a few per process).
        static IDS: Mutex<Option<HashMap<(u64, u64), u32>>> = Mutex::new(None);
        let st = nix::sys::stat::fstat(region.fd()).map_err(|err| RegionError::Sys { call: "fstat", err })?;
        let mut ids = IDS.lock().unwrap_or_else(PoisonError::into_inner);
        let ids = ids.get_or_insert_with(HashMap::new);
        let file = (st.st_dev, st.st_ino);
        if let Some(&id) = ids.get(&file) {
            return Ok(Self(id));
        }
        let next = u32::try_from(ids.len() + 1)
            .map_err(|_| RegionError::Sys { call: "pool id (2^32 pools mapped)", err: nix::Error::EMFILE })?;
        ids.insert(file, next);
        Ok(Self(next))
    }
}

// Leases fill the agent's send queues and the fabric's: kept small.
const _: () = assert!(size_of::<Lease>() == 20);

/// A message (chain of buffers) held by this process.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a lease holds pool buffers: send or free it"]
pub struct Lease {
    head: u32,
    len: u32,
    frags: u32,
    holder: Owner,
    /// The pool its buffers are in: every [`Pool`] method that takes a
    /// lease refuses one of another pool, whose indices name other buffers.
    pool: PoolId,
}

impl Lease {
    /// A lease named by indices only, for a holder that keeps its chains
    /// outside the pool's memory because it cannot read that memory (the
    /// agent on the DPU over an imported pool; see `fabric::ImportedPool`).
    /// The caller vouches for the indices; the pool's own owner table and
    /// chain links are the exporter's business. Its pool is
    /// [`PoolId::NONE`]: no [`Pool`] takes it.
    pub fn by_index(head: u32, len: u32, frags: u32, holder: Owner) -> Self {
        Self { head, len, frags, holder, pool: PoolId::NONE }
    }

    /// Index of the first buffer.
    pub fn head(&self) -> u32 {
        self.head
    }
    /// Payload bytes in the whole chain.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Buffers in the chain.
    pub fn frags(&self) -> u32 {
        self.frags
    }
    /// The owner value this lease holds the buffers as.
    pub fn holder(&self) -> Owner {
        self.holder
    }
    /// The pool its buffers are in (see [`Pool::owns`]).
    pub fn pool(&self) -> PoolId {
        self.pool
    }
}

/// A per-process stash of free buffers (see [`Pool::alloc_cached`]). Its
/// capacity is fixed at creation; it never allocates afterwards. The
/// buffers it holds are one pool's: while it holds any, another pool
/// passes it by (allocates and frees without it).
#[derive(Debug)]
pub struct LocalCache {
    holder: Owner,
    idx: Vec<u32>,
    cap: usize,
    /// The pool of the buffers in `idx`.
    pool: PoolId,
}

impl LocalCache {
    /// A cache of up to `cap` buffers, held as `holder`.
    pub fn new(holder: Owner, cap: usize) -> Self {
        Self { holder, idx: Vec::with_capacity(cap.max(1) * 2), cap, pool: PoolId::NONE }
    }

    /// Buffers currently cached.
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }
}

/// A tenant pool mapped into this process.
#[derive(Debug)]
pub struct Pool {
    region: Region,
    layout: PoolLayout,
    ptrs: Ptrs,
    /// The segment's identity, stamped on every lease made here.
    id: PoolId,
    /// Where this process looks for a free buffer first (see
    /// [`crate::alloc`]); not shared.
    cursor: AtomicU32,
}

/// Addresses of the allocator's shared fields, resolved and checked once at
/// open so the hot path does no bounds arithmetic. They point into
/// `Pool::region`, which lives as long as the `Pool`.
#[derive(Debug)]
struct Ptrs {
    avail: NonNull<AtomicU64>,
    meta: NonNull<u8>,
    count: u32,
    words: u32,
}

// SAFETY: the pointers target the shared mapping owned by the same `Pool`
// and are only used for atomics, which any thread may perform.
unsafe impl Send for Ptrs {}
// SAFETY: as above.
unsafe impl Sync for Ptrs {}

impl Ptrs {
    /// Resolves every address through the checked accessors of `Region`.
    fn resolve(region: &Region, layout: &PoolLayout) -> Result<Self, AccessError> {
        let count = layout.geometry.buf_count();
        let words = layout.avail_words();
        // The whole metadata table and the hints must be inside the
        // mapping: check the last field of the last entry and the last
        // word, and the alignment of the first of each.
        let last = layout.meta_offset(count - 1).map_or(u64::MAX, |o| o + offset_of!(BufMeta, next_chain) as u64);
        region.atomic_u32(last)?;
        let first = region.atomic_u32(layout.meta_offset(0).unwrap_or(u64::MAX))?;
        region.atomic_u64(layout.avail_offset + u64::from(words - 1) * 8)?;
        Ok(Self {
            avail: NonNull::from(region.atomic_u64(layout.avail_offset)?),
            meta: NonNull::from(first).cast(),
            count,
            words,
        })
    }

    fn meta(&self, i: u32, field: usize) -> &AtomicU32 {
        // Callers check `i < count` (the `PoolCells` contract); a violation
        // is a bug in this crate, never peer input, and must not touch
        // memory outside the table.
        assert!(i < self.count, "buffer index {i} outside the pool");
        // SAFETY: `i < count` (asserted) and the table of `count` 16-byte
        // entries lies inside the mapping (checked in `resolve`), so the
        // address stays inside it.
        let p = unsafe { self.meta.add(i as usize * size_of::<BufMeta>() + field) };
        // SAFETY: `field` is the offset of a u32 field of `BufMeta` and the
        // table is 4-aligned (checked in `resolve`); lives with `self`.
        unsafe { p.cast::<AtomicU32>().as_ref() }
    }

    fn avail(&self, w: u32) -> &AtomicU64 {
        // As for `meta`: a violation is a bug in this crate.
        assert!(w < self.words, "hint word {w} outside the pool");
        // SAFETY: `w < words` (asserted) and the `words` 8-aligned u64s
        // from `avail` lie inside the mapping (checked in `resolve`), so the
        // address stays inside it.
        let p = unsafe { self.avail.add(w as usize) };
        // SAFETY: an aligned u64 of the mapping (as above); lives with
        // `self`.
        unsafe { p.as_ref() }
    }
}

impl Pool {
    /// Creates and initializes a pool (host-shimd). All buffers start free.
    pub fn create(name: &str, geometry: PoolGeometry, policy: PagePolicy) -> Result<Self, PoolOpenError> {
        let layout = PoolLayout::new(geometry);
        let len = usize::try_from(layout.total_len).map_err(|_| RegionError::Invalid("pool too large"))?;
        let region = Region::create(name, len, policy)?;
        let flags = if region.backing() == Backing::HugeTlb { PoolHeader::FLAG_HUGETLB } else { 0 };
        region.write(0, PoolHeader::new(&layout, flags))?;
        let ptrs = Ptrs::resolve(&region, &layout)?;
        let id = PoolId::of(&region)?;
        let pool = Self { cursor: first_cursor(&layout), region, layout, ptrs, id };
        alloc::init(&pool);
        Ok(pool)
    }

    /// Maps a pool received from its creator and checks its header.
    pub fn open(fd: OwnedFd) -> Result<Self, PoolOpenError> {
        let region = Region::open(fd)?;
        let header: PoolHeader = region.read(0)?;
        let layout = header.check(region.len() as u64)?;
        let ptrs = Ptrs::resolve(&region, &layout)?;
        let id = PoolId::of(&region)?;
        Ok(Self { cursor: first_cursor(&layout), region, layout, ptrs, id })
    }

    /// The pool's geometry.
    pub fn geometry(&self) -> PoolGeometry {
        self.layout.geometry
    }

    /// Which segment this is: the same for every mapping of it.
    pub fn id(&self) -> PoolId {
        self.id
    }

    /// Whether `lease`'s buffers are in this pool. Every method that takes
    /// a lease refuses one of another pool (whose buffer indices name
    /// other buffers here): [`FreeError::ForeignLease`] from
    /// [`free`](Self::free), [`free_cached`](Self::free_cached) and
    /// [`hand_over`](Self::hand_over), [`WriteError::ForeignLease`] from
    /// [`write`](Self::write) and [`set_len`](Self::set_len),
    /// [`JoinError::ForeignLease`] from [`join`](Self::join), no fragments from
    /// [`frag`](Self::frag) and [`chain`](Self::chain). `free` drops the
    /// lease it refuses (its buffers stay held in their own pool until
    /// their holder is reclaimed): a caller that may mix pools asks this
    /// first.
    pub fn owns(&self, lease: &Lease) -> bool {
        lease.pool == self.id
    }

    /// The shared region (for passing its fd, or registering it with a NIC).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// What backs the pool.
    pub fn backing(&self) -> Backing {
        self.region.backing()
    }

    /// Free buffers, counted from their owner words (one read per buffer;
    /// exact when nobody takes or frees meanwhile). For status, metrics and
    /// checks; a hot path wants [`Pool::free_hint`].
    pub fn free_buffers(&self) -> u32 {
        alloc::free_count(self)
    }

    /// An estimate of the free buffers from the free hints (one read per 64
    /// buffers): exact when nobody takes or frees meanwhile, except after a
    /// process died while freeing, until [`Pool::repair`].
    pub fn free_hint(&self) -> u32 {
        alloc::hinted(self)
    }

    /// Sets the free hint of every free buffer that lacks one: host-shimd,
    /// after a process died (it may have been between freeing a buffer and
    /// setting its hint, which would hide the buffer from takers). Safe at
    /// any time. Returns how many hints it set (which may include buffers a
    /// live process was about to hint).
    pub fn repair(&self) -> u32 {
        alloc::repair(self)
    }

    /// Recorded owner of buffer `index`.
    pub fn owner(&self, index: u32) -> Result<Owner, FreeError> {
        if index >= self.count() {
            return Err(FreeError::OutOfRange(index));
        }
        Owner::from_raw(PoolCells::owner(self, index).load(Acquire))
            .map_err(|_| FreeError::NotOwner { index, owner: PoolCells::owner(self, index).load(Relaxed) })
    }

    /// Allocates a chain for `len` payload bytes, held as `holder`.
    /// `Exhausted` when one search of the pool found too few free buffers
    /// (a buffer another process frees during the search may be missed;
    /// the next call finds it).
    pub fn alloc(&self, len: u32, holder: Owner) -> Result<Lease, AllocError> {
        let g = self.layout.geometry;
        if u64::from(len) > g.max_len() {
            return Err(AllocError::Exhausted);
        }
        let frags = g.frags_for(len);
        let head = alloc::pop_chain(self, frags, holder)?;
        Ok(Lease { head, len, frags, holder, pool: self.id })
    }

    /// Allocates like [`Pool::alloc`], taking buffers from this process's
    /// `cache` first and refilling it from the shared pool in batches,
    /// so steady-state allocation touches no shared cache line.
    pub fn alloc_cached(&self, cache: &mut LocalCache, len: u32) -> Result<Lease, AllocError> {
        if !self.takes(cache) {
            return self.alloc(len, cache.holder);
        }
        let g = self.layout.geometry;
        if u64::from(len) > g.max_len() {
            return Err(AllocError::Exhausted);
        }
        let frags = g.frags_for(len);
        if (cache.idx.len() as u32) < frags {
            let want = cache.cap.max(frags as usize) - cache.idx.len();
            let idx = &mut cache.idx;
            alloc::pop_n(self, want as u32, cache.holder, &mut |i| idx.push(i));
            if (cache.idx.len() as u32) < frags {
                // Too few: the cache keeps what it holds when full, the
                // rest goes back (a caller retrying a large request would
                // otherwise hoard every buffer anyone frees).
                while cache.idx.len() > cache.cap {
                    let Some(i) = cache.idx.pop() else { break };
                    if let Err(e) = alloc::push(self, i, Some(cache.holder)) {
                        log::warn!("giving back a buffer of a failed allocation: {e}");
                    }
                }
                return Err(AllocError::Exhausted);
            }
        }
        let mut head = NIL;
        for _ in 0..frags {
            let i = cache.idx.pop().ok_or(AllocError::Exhausted)?;
            self.next_chain(i).store(head, Relaxed);
            head = i;
        }
        Ok(Lease { head, len, frags, holder: cache.holder, pool: self.id })
    }

    /// Frees like [`Pool::free`], keeping buffers in `cache` while it has
    /// room (they stay recorded as held by this process, so host-shimd
    /// reclaims them if it dies).
    pub fn free_cached(&self, cache: &mut LocalCache, lease: Lease) -> Result<u32, FreeError> {
        if !self.owns(&lease) {
            return Err(FreeError::ForeignLease);
        }
        if lease.holder != cache.holder || !self.takes(cache) {
            return self.free(lease);
        }
        let mut n = 0;
        let mut i = lease.head;
        // A link a peer rewrote must not lead to a buffer already in the
        // cache (this chain's, in a loop, or one cached before: both are
        // recorded as ours), or it would be cached twice, for two later
        // leases. (Freed to the pool, a second visit fails the owner
        // check.) The head is the lease's own, not read from the pool.
        for k in 0..lease.frags {
            if i >= self.count() || (k > 0 && cache.idx.contains(&i)) {
                return Err(FreeError::BadLink(i));
            }
            let next = if k + 1 < lease.frags { self.next_chain(i).load(Relaxed) } else { NIL };
            let owner = PoolCells::owner(self, i).load(Acquire);
            if owner != cache.holder.to_raw() {
                return Err(FreeError::NotOwner { index: i, owner });
            }
            if cache.idx.len() < cache.cap {
                cache.idx.push(i);
            } else {
                alloc::push(self, i, Some(cache.holder))?;
            }
            n += 1;
            i = next;
        }
        Ok(n)
    }

    /// Whether `cache` may be used with this pool: it holds this pool's
    /// buffers, or none (then it becomes this pool's).
    #[inline]
    fn takes(&self, cache: &mut LocalCache) -> bool {
        if cache.pool != self.id && cache.idx.is_empty() {
            cache.pool = self.id;
        }
        cache.pool == self.id
    }

    /// Returns every cached buffer to the shared pool (a cache of another
    /// pool's buffers is left as it is, with a warning).
    pub fn drain_cache(&self, cache: &mut LocalCache) {
        if !self.takes(cache) {
            log::warn!("draining an allocation cache into a pool whose buffers it does not hold: refused");
            return;
        }
        for i in cache.idx.drain(..) {
            if let Err(e) = alloc::push(self, i, Some(cache.holder)) {
                log::warn!("draining allocation cache: {e}");
            }
        }
    }

    /// Returns a lease's buffers to the pool. A lease of another pool is
    /// refused ([`FreeError::ForeignLease`]) and dropped (see
    /// [`owns`](Self::owns)).
    pub fn free(&self, lease: Lease) -> Result<u32, FreeError> {
        if !self.owns(&lease) {
            return Err(FreeError::ForeignLease);
        }
        alloc::push_chain(self, lease.head, lease.frags, Some(lease.holder))
    }

    /// Sets the payload length of a lease, within the buffers it holds. A
    /// lease of another pool is refused ([`WriteError::ForeignLease`]) and
    /// a length that needs another number of buffers too
    /// ([`WriteError::Len`]); either way the lease is unchanged.
    pub fn set_len(&self, lease: &mut Lease, len: u32) -> Result<(), WriteError> {
        if !self.owns(lease) {
            return Err(WriteError::ForeignLease);
        }
        let g = self.layout.geometry;
        if g.frags_for(len) != lease.frags {
            let max = u64::from(lease.frags) * u64::from(g.payload_cap());
            return Err(DescriptorError::TooLong { len, max }.into());
        }
        lease.len = len;
        Ok(())
    }

    /// Accepts a received descriptor addressed to `me`: validates it against
    /// this pool, walks its chain with every link bounds-checked, and moves
    /// each buffer from `Function(me)` (handed over) to `Held(me)`. On any
    /// failure the buffers already moved are moved back and nothing is
    /// leased.
    pub fn accept(&self, desc: &Descriptor, me: u16) -> Result<Lease, AcceptError> {
        let frags = desc.validate(&self.layout.geometry)?;
        self.transfer(desc.buf, desc.len, frags, Owner::Function(me), Owner::Held(me))
    }

    /// Takes back a chain this process handed over to `from` but whose
    /// descriptor could not be delivered (ring full or closed), if nobody
    /// took it meanwhile (host-shimd's reclaim of a dead receiver does).
    pub fn take_back(&self, head: u32, len: u32, from: Owner, holder: Owner) -> Result<Lease, AcceptError> {
        let g = self.layout.geometry;
        if u64::from(len) > g.max_len() {
            return Err(DescriptorError::TooLong { len, max: g.max_len() }.into());
        }
        self.transfer(head, len, g.frags_for(len), from, holder)
    }

    /// Moves every buffer of the chain at `head` from `from` to `to`, all or
    /// nothing, with every link bounds-checked.
    fn transfer(&self, head: u32, len: u32, frags: u32, from: Owner, to: Owner) -> Result<Lease, AcceptError> {
        match self.move_owners(head, frags, from, to) {
            Ok(()) => Ok(Lease { head, len, frags, holder: to, pool: self.id }),
            Err(MoveFail::BadLink(i)) => Err(AcceptError::BadLink(i)),
            Err(MoveFail::NotOwner { index, owner }) => Err(AcceptError::NotOwner { index, owner }),
        }
    }

    /// Hands a lease over to `to` (the destination function's slot, or the
    /// agent): every buffer's owner moves from the lease's holder to `to`.
    /// Returns the chain head and length for the descriptor. The payload
    /// writes made through the lease are published by this call. A lease
    /// of another pool comes back with [`FreeError::ForeignLease`].
    pub fn hand_over(&self, lease: Lease, to: Owner) -> Result<(u32, u32), (Lease, FreeError)> {
        if !self.owns(&lease) {
            return Err((lease, FreeError::ForeignLease));
        }
        match self.move_owners(lease.head, lease.frags, lease.holder, to) {
            Ok(()) => Ok((lease.head, lease.len)),
            Err(MoveFail::BadLink(i)) => Err((lease, FreeError::BadLink(i))),
            Err(MoveFail::NotOwner { index, owner }) => Err((lease, FreeError::NotOwner { index, owner })),
        }
    }

    /// The owner move of [`transfer`](Self::transfer) (accept, take-back)
    /// and [`hand_over`](Self::hand_over): every buffer of the chain at
    /// `head` from `from` to `to`, all or nothing. The links live in shared
    /// memory, where a peer may rewrite one at any time, so every index is
    /// checked as it is reached; each link is read only after its buffer
    /// moved (after the Acquire below), never before.
    fn move_owners(&self, head: u32, frags: u32, from: Owner, to: Owner) -> Result<(), MoveFail> {
        let mut i = head;
        for k in 0..frags {
            let moved = if i >= self.count() {
                Err(MoveFail::BadLink(i))
            } else {
                // AcqRel: the Release half publishes the payload written
                // through a lease being handed over; the Acquire half makes
                // the previous holder's writes (payload, links) visible.
                PoolCells::owner(self, i)
                    .compare_exchange(from.to_raw(), to.to_raw(), AcqRel, Acquire)
                    .map(|_| ())
                    .map_err(|owner| MoveFail::NotOwner { index: i, owner })
            };
            if let Err(e) = moved {
                // Give back what we moved, each only if it is still `to`'s:
                // meanwhile `to` may have died and its buffers been freed
                // (and taken by someone else), which a plain store would
                // overwrite, leaving a buffer with two holders.
                for j in self.walk(head, k) {
                    let _ = PoolCells::owner(self, j).compare_exchange(to.to_raw(), from.to_raw(), AcqRel, Relaxed);
                }
                return Err(e);
            }
            if k + 1 < frags {
                i = self.next_chain(i).load(Relaxed);
            }
        }
        Ok(())
    }

    /// The first `frags` buffers of the chain at `head`, stopping early at
    /// a link out of range (links live in shared memory, where a
    /// misbehaving peer of the tenant can rewrite them).
    fn walk(&self, head: u32, frags: u32) -> impl Iterator<Item = u32> + '_ {
        let mut i = head;
        (0..frags).map_while(move |k| {
            let cur = i;
            if cur >= self.count() {
                return None;
            }
            if k + 1 < frags {
                i = self.next_chain(cur).load(Relaxed);
            }
            Some(cur)
        })
    }

    /// Indices of the buffers of a lease, in chain order. The links live in
    /// shared memory, where a misbehaving peer of the tenant can rewrite
    /// them: the walk stops early at a link out of range (then the lease's
    /// later fragments read as absent), never indexing outside the pool.
    /// A lease of another pool has none here.
    pub fn chain(&self, lease: &Lease) -> impl Iterator<Item = u32> + '_ {
        let frags = if self.owns(lease) { lease.frags } else { 0 };
        self.walk(lease.head, frags)
    }

    fn frag_range(&self, lease: &Lease, k: u32) -> Option<(u64, usize)> {
        if k >= lease.frags {
            return None;
        }
        let index = self.chain(lease).nth(k as usize)?;
        let g = self.layout.geometry;
        let off = self.layout.buf_offset(index)? + u64::from(g.headroom());
        Some((off, frag_len(lease.len, g.payload_cap(), k) as usize))
    }

    /// Payload bytes of fragment `k` of a lease (zero copy); `None` past
    /// the end, at a link out of range, or for a lease of another pool.
    pub fn frag(&self, lease: &Lease, k: u32) -> Option<&[u8]> {
        let (off, len) = self.frag_range(lease, k)?;
        // SAFETY: the lease proves this process holds the buffer (its owner
        // moved to `Held` for us exactly once, and `Lease` is not `Clone`;
        // a lease of another pool has no range here, `chain` checks),
        // so no `&mut` to these bytes exists here while `lease` is borrowed;
        // peers of the tenant do not write buffers they do not own (module
        // docs). The range was bounds-checked by `buf_offset` and `at`.
        unsafe { self.region.bytes_mut(off, len) }.ok().map(|s| &*s)
    }

    /// Mutable payload bytes of fragment `k` of a lease (zero copy).
    pub fn frag_mut<'a>(&'a self, lease: &'a mut Lease, k: u32) -> Option<&'a mut [u8]> {
        let (off, len) = self.frag_range(lease, k)?;
        // SAFETY: as in `frag`, and `&mut Lease` makes this the only borrow
        // of the buffer's bytes in this process.
        unsafe { self.region.bytes_mut(off, len) }.ok()
    }

    /// Copies `data` into the lease's payload (across fragments). A lease
    /// of another pool is refused ([`WriteError::ForeignLease`]) and data
    /// that does not fit its buffers too ([`WriteError::Len`]); either way
    /// nothing is changed.
    pub fn write(&self, lease: &mut Lease, data: &[u8]) -> Result<(), WriteError> {
        // First: it refuses a lease of another pool, before any byte moves.
        self.set_len(lease, u32::try_from(data.len()).unwrap_or(u32::MAX))?;
        let cap = self.layout.geometry.payload_cap() as usize;
        for (k, chunk) in data.chunks(cap).enumerate() {
            if let Some(dst) = self.frag_mut(lease, k as u32) {
                dst.copy_from_slice(chunk);
            }
        }
        Ok(())
    }

    /// Copies the lease's payload out (for tests and diagnostics; functions
    /// use [`Pool::frag`]).
    pub fn read_to_vec(&self, lease: &Lease) -> Vec<u8> {
        let mut v = Vec::with_capacity(lease.len as usize);
        for k in 0..lease.frags {
            v.extend_from_slice(self.frag(lease, k).unwrap_or(&[]));
        }
        v
    }

    /// Frees every buffer owned by the function in
    /// `slot` (handed over to it or held by it). For host-shimd, after the
    /// function died. Returns how many buffers were reclaimed.
    pub fn reclaim(&self, slot: u16) -> u32 {
        self.reclaim_owners(&[Owner::Function(slot), Owner::Held(slot)])
    }

    /// Frees only the buffers `slot` held (leased), not
    /// those handed to it and still waiting in its ring: for the agent's
    /// slot, whose uplink ring outlives an agent restart, so a restarted
    /// agent still forwards what functions sent meanwhile.
    pub fn reclaim_held(&self, slot: u16) -> u32 {
        self.reclaim_owners(&[Owner::Held(slot)])
    }

    fn reclaim_owners(&self, owners: &[Owner]) -> u32 {
        let mut n = 0;
        for i in 0..self.count() {
            let raw = PoolCells::owner(self, i).load(Acquire);
            for &o in owners {
                if raw == o.to_raw() && alloc::push(self, i, Some(o)).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Buffers recorded as owned by `owner` (a full scan).
    pub fn owned_by(&self, owner: Owner) -> Vec<u32> {
        let raw = owner.to_raw();
        (0..self.count()).filter(|&i| PoolCells::owner(self, i).load(Acquire) == raw).collect()
    }

    /// Indices of the chain a descriptor names (at most its length's worth
    /// of buffers, stopping at a link out of range), without taking it.
    pub fn chain_of(&self, desc: &Descriptor) -> Vec<u32> {
        let Ok(frags) = desc.validate(&self.layout.geometry) else { return Vec::new() };
        self.walk(desc.buf, frags).collect()
    }

    /// Frees buffer `index` if it is still recorded as `owner`'s (host-shimd,
    /// for a buffer handed to `owner` by a process that died before
    /// delivering its descriptor); returns whether it did. A compare-and-
    /// swap: if `owner` accepts it at the same moment, exactly one wins.
    pub fn free_orphan(&self, index: u32, owner: Owner) -> bool {
        alloc::push(self, index, Some(owner)).is_ok()
    }

    /// Region offset of buffer `index`'s first byte (its headroom), for
    /// registering sends and receives with the fabric.
    pub fn buf_offset(&self, index: u32) -> Option<u64> {
        self.layout.buf_offset(index)
    }

    /// Links one-buffer leases, in order, into one chain carrying `len`
    /// payload bytes (a message that arrived over the fabric one buffer per
    /// fragment). `parts` is drained on success and untouched on error:
    /// [`JoinError::Len`] for a length longer than the pool's `max_chain`
    /// allows (its receiver would refuse the descriptor and be left holding
    /// it) or that needs another number of buffers than the parts; the
    /// first part that is of another pool, holds other than one buffer, or
    /// has another holder than the first part, is reported as such (a part
    /// of another pool before the rest).
    pub fn join(&self, parts: &mut Vec<Lease>, len: u32) -> Result<Lease, JoinError> {
        let g = self.layout.geometry;
        if u64::from(len) > g.max_len() {
            return Err(DescriptorError::TooLong { len, max: g.max_len() }.into());
        }
        let frags = g.frags_for(len);
        let first = parts.first().map(|l| (l.head, l.holder));
        for l in parts.iter() {
            if !self.owns(l) {
                return Err(JoinError::ForeignLease);
            }
            if l.frags != 1 {
                return Err(JoinError::NotOneBuffer);
            }
            if Some(l.holder) != first.map(|f| f.1) {
                return Err(JoinError::MixedHolders);
            }
        }
        let Some((head, holder)) = first.filter(|_| frags as usize == parts.len()) else {
            let max = parts.len() as u64 * u64::from(g.payload_cap());
            return Err(DescriptorError::TooLong { len, max }.into());
        };
        for w in parts.windows(2) {
            self.next_chain(w[0].head).store(w[1].head, Relaxed);
        }
        if let Some(last) = parts.last() {
            self.next_chain(last.head).store(NIL, Relaxed);
        }
        parts.clear();
        Ok(Lease { head, len, frags, holder, pool: self.id })
    }

    /// Buffers whose recorded owner satisfies `f` (a full scan; for
    /// diagnostics and tests).
    pub fn count_owned(&self, f: impl Fn(Owner) -> bool) -> u32 {
        (0..self.count()).filter(|&i| self.owner(i).is_ok_and(&f)).count() as u32
    }
}

impl PoolCells for Pool {
    fn count(&self) -> u32 {
        self.ptrs.count
    }
    fn avail(&self, w: u32) -> &AtomicU64 {
        self.ptrs.avail(w)
    }
    fn next_chain(&self, i: u32) -> &AtomicU32 {
        self.ptrs.meta(i, offset_of!(BufMeta, next_chain))
    }
    fn owner(&self, i: u32) -> &AtomicU32 {
        self.ptrs.meta(i, offset_of!(BufMeta, owner))
    }
    fn cursor(&self) -> &AtomicU32 {
        &self.cursor
    }
    fn salt(&self) -> u32 {
        std::process::id() ^ THREAD_SALT.with(|s| *s)
    }
    fn words(&self) -> u32 {
        self.ptrs.words
    }
}

std::thread_local! {
    /// A number of this thread (see [`PoolCells::salt`]).
    static THREAD_SALT: u32 = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::thread::current().id().hash(&mut h);
        h.finish() as u32
    };
}

/// Where a process starts looking for free buffers: spread by process id,
/// so processes mostly take from different hint words.
fn first_cursor(layout: &PoolLayout) -> AtomicU32 {
    let words = layout.avail_words().max(1);
    AtomicU32::new(std::process::id().wrapping_mul(0x9e37_79b9) % words)
}

/// Why [`Pool::move_owners`] moved nothing.
enum MoveFail {
    /// A link out of range.
    BadLink(u32),
    /// A buffer not recorded as the expected owner's.
    NotOwner { index: u32, owner: u32 },
}

const _: () = assert!(NIL == u32::MAX);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(bufs: u32) -> Pool {
        Pool::create("dne-pool-test", PoolGeometry::new(4, 256, bufs, 64, 8).unwrap(), PagePolicy::Normal).unwrap()
    }

    const A: u16 = 1;
    const B: u16 = 2;

    #[test]
    fn join_links_single_buffers_into_one_chain() {
        let p = pool(16);
        let cap = p.geometry().payload_cap();
        let mut parts: Vec<Lease> = (0..3).map(|_| p.alloc(cap, Owner::Held(A)).unwrap()).collect();
        let heads: Vec<u32> = parts.iter().map(Lease::head).collect();
        let mut bad = vec![p.alloc(cap, Owner::Held(A)).unwrap()];
        assert!(p.join(&mut bad, 2 * cap).is_err(), "two fragments' length needs two buffers");
        assert_eq!(bad.len(), 1);
        let chain = p.join(&mut parts, 2 * cap + 5).unwrap();
        assert!(parts.is_empty());
        assert_eq!(p.chain(&chain).collect::<Vec<_>>(), heads);
        assert_eq!(chain.frags(), 3);
        let before = p.free_buffers();
        p.free(chain).unwrap();
        p.free(bad.pop().unwrap()).unwrap();
        assert_eq!(p.free_buffers(), before + 4);
    }

    #[test]
    fn join_refuses_a_chain_longer_than_max_chain() {
        let p = pool(16);
        let cap = p.geometry().payload_cap();
        let max = p.geometry().max_chain();
        let mut parts: Vec<Lease> = (0..=max).map(|_| p.alloc(cap, Owner::Held(A)).unwrap()).collect();
        let len = max * cap + 1;
        assert!(matches!(p.join(&mut parts, len), Err(JoinError::Len(DescriptorError::TooLong { .. }))));
        assert_eq!(parts.len() as u32, max + 1, "untouched");
        parts.pop().map(|l| p.free(l).unwrap());
        assert!(p.join(&mut parts, max * cap).is_ok(), "max_chain buffers are a message");
    }

    /// A cached allocation too large for what is free gives back what its
    /// refill took beyond the cache's size: before, it kept them all, and
    /// a caller retrying took every buffer anyone freed.
    #[test]
    fn a_failed_cached_allocation_does_not_hoard_the_pool() {
        let p = pool(16);
        let others: Vec<Lease> = (0..10).map(|_| p.alloc(10, Owner::Held(B)).unwrap()).collect();
        let mut c = LocalCache::new(Owner::Held(A), 2);
        let eight = 8 * p.geometry().payload_cap();
        assert_eq!(p.alloc_cached(&mut c, eight).unwrap_err(), AllocError::Exhausted);
        assert_eq!((c.len(), p.free_buffers()), (2, 4), "the cache keeps its size, the rest is free");
        assert!(p.alloc(10, Owner::Held(3)).is_ok());
        for l in others {
            p.free(l).unwrap();
        }
        p.drain_cache(&mut c);
    }

    /// A chain whose link a peer rewrote (into a loop, or to a buffer
    /// already cached) is not cached twice (two leases of one buffer would
    /// follow).
    #[test]
    fn free_cached_never_caches_a_buffer_twice() {
        let p = pool(16);
        let mut c = LocalCache::new(Owner::Held(A), 8);
        let l = p.alloc_cached(&mut c, 300).unwrap();
        assert_eq!(l.frags(), 2);
        p.next_chain(l.head()).store(l.head(), Relaxed);
        assert!(matches!(p.free_cached(&mut c, l), Err(FreeError::BadLink(_))));
        let l = p.alloc_cached(&mut c, 300).unwrap();
        let cached = *c.idx.first().expect("a buffer in the cache");
        p.next_chain(l.head()).store(cached, Relaxed);
        assert!(matches!(p.free_cached(&mut c, l), Err(FreeError::BadLink(_))));
        let mut heads: Vec<u32> = std::iter::from_fn(|| p.alloc_cached(&mut c, 10).ok()).map(|l| l.head()).collect();
        let n = heads.len();
        heads.sort_unstable();
        heads.dedup();
        assert_eq!(heads.len(), n, "one buffer leased twice");
    }

    /// Two pools give out the same buffer indices: a lease of one freed,
    /// handed over or cached into the other named that other pool's buffer
    /// of the same index, which another lease still held, and the next
    /// allocation gave it out a second time. Its payload was that buffer's
    /// too.
    #[test]
    fn a_lease_of_another_pool_is_refused_and_changes_nothing() {
        // Pool `b` and `a` lease of pool `a` whose head is the index of
        // `ours`, a buffer of `b` held as `Held(A)`.
        let two = || {
            let (a, b) = (pool(16), pool(16));
            let theirs = a.alloc(10, Owner::Held(A)).unwrap();
            let ours = b.alloc(10, Owner::Held(A)).unwrap();
            assert_eq!(theirs.head(), ours.head(), "both pools start at the same buffer");
            (a, b, theirs, ours)
        };
        let (a, b, theirs, ours) = two();
        assert!(b.frag(&theirs, 0).is_none(), "b gave out the bytes of its buffer {}", ours.head());
        assert_eq!(b.free(theirs), Err(FreeError::ForeignLease), "b freed a's lease");
        assert_eq!(b.owner(ours.head()), Ok(Owner::Held(A)), "b's leased buffer was freed");
        let again: Vec<u32> = std::iter::from_fn(|| b.alloc(10, Owner::Held(B)).ok()).map(|l| l.head()).collect();
        assert!(!again.contains(&ours.head()), "b's leased buffer allocated twice");
        // Every mapping of one segment is the same pool.
        let b2 = Pool::open(b.region().fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(b2.id(), b.id());
        assert_ne!(b.id(), a.id());
        assert_eq!(b2.free(ours), Ok(1));

        let (a, b, theirs, ours) = two();
        let Err((back, FreeError::ForeignLease)) = b.hand_over(theirs, Owner::Function(B)) else {
            panic!("b handed a's lease over")
        };
        assert_eq!(b.owner(ours.head()), Ok(Owner::Held(A)), "b's leased buffer was handed over");
        assert_eq!(back.head(), ours.head(), "the lease comes back");
        assert_eq!(a.hand_over(back, Owner::Function(B)), Ok((ours.head(), 10)), "still a's lease");

        let (_a, b, theirs, ours) = two();
        let mut c = LocalCache::new(Owner::Held(A), 4);
        assert_eq!(b.free_cached(&mut c, theirs), Err(FreeError::ForeignLease), "b cached a's lease");
        let l = b.alloc_cached(&mut c, 10).unwrap();
        assert_ne!(l.head(), ours.head(), "b's leased buffer allocated twice");
    }

    /// Joining or writing a lease of another pool wrote this pool's links
    /// or nothing at all, and said it had done the job.
    #[test]
    fn join_and_write_refuse_a_lease_of_another_pool() {
        let (a, b) = (pool(16), pool(16));
        let cap = b.geometry().payload_cap();
        let ours: Vec<Lease> = (0..2).map(|_| b.alloc(cap, Owner::Held(A)).unwrap()).collect();
        let links: Vec<u32> = ours.iter().map(|l| b.next_chain(l.head()).load(Relaxed)).collect();
        let mut parts: Vec<Lease> = (0..2).map(|_| a.alloc(cap, Owner::Held(A)).unwrap()).collect();
        assert_eq!(b.join(&mut parts, 2 * cap), Err(JoinError::ForeignLease), "b joined a's leases");
        assert_eq!(parts.len(), 2, "untouched");
        let now: Vec<u32> = ours.iter().map(|l| b.next_chain(l.head()).load(Relaxed)).collect();
        assert_eq!(now, links, "b's links of buffers leased elsewhere were rewritten");
        let mut theirs = parts.pop().unwrap();
        let r = b.write(&mut theirs, b"abc");
        assert_eq!(r, Err(WriteError::ForeignLease), "b's refusal said the data was too long");
        assert_eq!(r.unwrap_err().to_string(), "the lease is of another pool");
        assert_eq!(theirs.len(), cap, "untouched");
        a.write(&mut theirs, b"abc").unwrap();
        assert_eq!(a.read_to_vec(&theirs), b"abc", "its own pool takes it");
    }

    /// `join` said `TooLong` (with a maximum of parts x payload) for a
    /// part of another pool, parts of different holders and a part of
    /// several buffers: a caller could not tell a length that does not
    /// add up from parts that are not this pool's one-buffer leases of one
    /// holder. Each refusal leaves the parts and the pool's links as they
    /// were.
    #[test]
    fn join_says_why_it_refuses_parts() {
        let (a, b) = (pool(16), pool(16));
        let cap = b.geometry().payload_cap();
        let links =
            |parts: &[Lease]| -> Vec<u32> { parts.iter().map(|l| b.next_chain(l.head()).load(Relaxed)).collect() };
        let refused = |parts: &mut Vec<Lease>, len: u32| {
            let (n, before) = (parts.len(), links(parts));
            let e = b.join(parts, len).unwrap_err();
            assert_eq!((parts.len(), links(parts)), (n, before), "parts or links changed by a refusal");
            e
        };
        let ours = b.alloc(cap, Owner::Held(A)).unwrap();
        let theirs = a.alloc(cap, Owner::Held(A)).unwrap();
        let mut parts = vec![ours, theirs];
        let e = refused(&mut parts, 2 * cap);
        assert_eq!((e, e.to_string().as_str()), (JoinError::ForeignLease, "a part is a lease of another pool"));
        let theirs = parts.pop().unwrap();
        a.free(theirs).unwrap();
        parts.push(b.alloc(cap, Owner::Held(B)).unwrap());
        assert_eq!(refused(&mut parts, 2 * cap), JoinError::MixedHolders);
        b.free(parts.pop().unwrap()).unwrap();
        parts.push(b.alloc(2 * cap, Owner::Held(A)).unwrap());
        assert_eq!(refused(&mut parts, 2 * cap), JoinError::NotOneBuffer);
        b.free(parts.pop().unwrap()).unwrap();
        parts.push(b.alloc(cap, Owner::Held(A)).unwrap());
        let too_long = DescriptorError::TooLong { len: 3 * cap, max: u64::from(2 * cap) };
        assert_eq!(refused(&mut parts, 3 * cap), JoinError::Len(too_long), "the length does not add up");
        assert_eq!(b.join(&mut parts, 2 * cap).map(|l| l.frags()), Ok(2), "the same parts add up to their length");
    }

    /// `set_len` of a lease of another pool set its length and said `Ok`
    /// (the length was checked against this pool's geometry, not that of
    /// the pool that holds the buffers).
    #[test]
    fn set_len_refuses_a_lease_of_another_pool() {
        let (a, b) = (pool(16), pool(16));
        let cap = b.geometry().payload_cap();
        let mut theirs = a.alloc(cap, Owner::Held(A)).unwrap();
        assert_eq!(b.set_len(&mut theirs, 3), Err(WriteError::ForeignLease), "b set the length of a's lease");
        assert_eq!(theirs.len(), cap, "untouched");
        a.set_len(&mut theirs, 3).unwrap();
        assert_eq!(theirs.len(), 3, "its own pool takes it");
    }

    #[test]
    fn reclaim_held_keeps_handed_over_buffers() {
        let p = pool(16);
        let held = p.alloc(10, Owner::Held(A)).unwrap();
        let sent = p.alloc(10, Owner::Held(B)).unwrap();
        let (head, _) = p.hand_over(sent, Owner::Function(A)).unwrap();
        assert_eq!(p.reclaim_held(A), 1);
        assert_eq!(p.owner(head), Ok(Owner::Function(A)));
        assert_eq!(p.owner(held.head()), Ok(Owner::Free));
        let _reclaimed_by_the_pool = held;
    }

    #[test]
    fn alloc_write_hand_over_accept_read_free() {
        let p = pool(16);
        let mut l = p.alloc(500, Owner::Held(A)).unwrap();
        assert_eq!(l.frags(), 3); // 192 payload bytes per buffer
        let data: Vec<u8> = (0..500u32).map(|i| i as u8).collect();
        p.write(&mut l, &data).unwrap();
        let (head, len) = p.hand_over(l, Owner::Function(B)).unwrap();
        let d = Descriptor { tenant: 4, buf: head, len, ..Default::default() };

        // A second process maps the same pool and receives.
        let q = Pool::open(p.region().fd().try_clone_to_owned().unwrap()).unwrap();
        let got = q.accept(&d, B).unwrap();
        assert_eq!(q.read_to_vec(&got), data);
        // The same descriptor again (a peer replaying it) is refused.
        assert!(matches!(q.accept(&d, B), Err(AcceptError::NotOwner { .. })));
        assert_eq!(p.free_buffers(), 13);
        assert_eq!(q.free(got), Ok(3));
        assert_eq!(p.free_buffers(), 16);
    }

    #[test]
    fn accept_rejects_what_is_not_ours_and_changes_nothing() {
        let p = pool(16);
        let l = p.alloc(10, Owner::Held(A)).unwrap();
        let head = l.head();
        let d = Descriptor { tenant: 4, buf: head, len: 10, ..Default::default() };
        // Not handed over to B yet.
        assert!(matches!(p.accept(&d, B), Err(AcceptError::NotOwner { .. })));
        assert_eq!(p.owner(head), Ok(Owner::Held(A)));
        // Other tenant, index out of range, too long.
        let e = |d: Descriptor| p.accept(&d, B).unwrap_err();
        assert!(matches!(
            e(Descriptor { tenant: 5, ..d }),
            AcceptError::Descriptor(DescriptorError::TenantMismatch { .. })
        ));
        assert!(matches!(
            e(Descriptor { buf: 16, ..d }),
            AcceptError::Descriptor(DescriptorError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            e(Descriptor { len: 192 * 8 + 1, ..d }),
            AcceptError::Descriptor(DescriptorError::TooLong { .. })
        ));
        p.free(l).unwrap();
    }

    #[test]
    fn partial_accept_is_rolled_back() {
        let p = pool(16);
        let l = p.alloc(400, Owner::Held(A)).unwrap(); // 3 buffers
        let chain: Vec<u32> = p.chain(&l).collect();
        let (head, len) = p.hand_over(l, Owner::Function(B)).unwrap();
        // A rogue peer steals the last buffer back.
        PoolCells::owner(&p, chain[2]).store(Owner::Held(A).to_raw(), Relaxed);
        let d = Descriptor { tenant: 4, buf: head, len, ..Default::default() };
        assert_eq!(p.accept(&d, B), Err(AcceptError::NotOwner { index: chain[2], owner: Owner::Held(A).to_raw() }));
        assert_eq!(p.owner(chain[0]), Ok(Owner::Function(B)));
        assert_eq!(p.owner(chain[1]), Ok(Owner::Function(B)));
    }

    #[test]
    fn links_rewritten_after_accept_never_index_outside_the_pool() {
        let p = pool(16);
        let l = p.alloc(400, Owner::Held(A)).unwrap(); // 3 buffers
        let chain: Vec<u32> = p.chain(&l).collect();
        let (head, len) = p.hand_over(l, Owner::Function(B)).unwrap();
        let d = Descriptor { tenant: 4, buf: head, len, ..Default::default() };
        let mut held = p.accept(&d, B).unwrap();
        // The sender still maps the pool and points the second link away.
        p.next_chain(chain[1]).store(0xFFFF_FFF0, Relaxed);
        assert_eq!(p.chain(&held).collect::<Vec<_>>(), chain[..2]);
        assert!(p.frag(&held, 1).is_some());
        assert!(p.frag(&held, 2).is_none());
        assert!(p.frag_mut(&mut held, 2).is_none());
        assert_eq!(p.read_to_vec(&held).len(), 2 * p.geometry().payload_cap() as usize);
        // Handing it on fails at the bad link and moves nothing.
        let (held, e) = p.hand_over(held, Owner::Function(A)).unwrap_err();
        assert_eq!(e, FreeError::BadLink(0xFFFF_FFF0));
        assert_eq!(p.owner(chain[0]), Ok(Owner::Held(B)));
        assert_eq!(p.owner(chain[1]), Ok(Owner::Held(B)));
        // Freeing returns what the chain still reaches, then says why it
        // stopped.
        let before = p.free_buffers();
        assert_eq!(p.free(held), Err(FreeError::BadLink(0xFFFF_FFF0)));
        assert_eq!(p.free_buffers(), before + 2);
        // An accept whose rollback meets a rewritten link stops there.
        let l = p.alloc(400, Owner::Held(A)).unwrap();
        let chain: Vec<u32> = p.chain(&l).collect();
        let (head, len) = p.hand_over(l, Owner::Function(B)).unwrap();
        p.next_chain(chain[0]).store(0xFFFF_FFF0, Relaxed);
        let d = Descriptor { tenant: 4, buf: head, len, ..Default::default() };
        assert_eq!(p.accept(&d, B), Err(AcceptError::BadLink(0xFFFF_FFF0)));
        assert_eq!(p.owner(chain[0]), Ok(Owner::Function(B)));
    }

    #[test]
    fn orphans_are_found_named_and_freed_only_while_still_handed_over() {
        let p = pool(16);
        let l = p.alloc(400, Owner::Held(A)).unwrap(); // 3 buffers
        let chain: Vec<u32> = p.chain(&l).collect();
        let (head, len) = p.hand_over(l, Owner::Function(B)).unwrap();
        let mut handed = p.owned_by(Owner::Function(B));
        handed.sort_unstable();
        let mut sorted = chain.clone();
        sorted.sort_unstable();
        assert_eq!(handed, sorted);
        let d = Descriptor { tenant: 4, buf: head, len, ..Default::default() };
        assert_eq!(p.chain_of(&d), chain);
        assert!(p.chain_of(&Descriptor { buf: 99, ..d }).is_empty(), "an invalid descriptor names nothing");
        // The receiver takes the chain: it is no orphan any more.
        let held = p.accept(&d, B).unwrap();
        assert!(!p.free_orphan(chain[0], Owner::Function(B)));
        p.free(held).unwrap();
        // A chain nobody took is freed buffer by buffer.
        let l = p.alloc(10, Owner::Held(A)).unwrap();
        let (head, _) = p.hand_over(l, Owner::Function(B)).unwrap();
        let before = p.free_buffers();
        assert!(p.free_orphan(head, Owner::Function(B)));
        assert!(!p.free_orphan(head, Owner::Function(B)));
        assert_eq!(p.free_buffers(), before + 1);
    }

    #[test]
    fn reclaim_returns_everything_a_dead_function_owned() {
        let p = pool(32);
        let held: Vec<Lease> = (0..5).map(|_| p.alloc(300, Owner::Held(A)).unwrap()).collect();
        let other = p.alloc(10, Owner::Held(B)).unwrap();
        // Two of A's messages were handed to A by others (in its ring).
        let x = p.alloc(10, Owner::Held(B)).unwrap();
        p.hand_over(x, Owner::Function(A)).unwrap();
        let _reclaimed_by_the_pool = held; // A "dies" holding its leases
        assert_eq!(p.free_buffers(), 32 - 10 - 1 - 1);
        assert_eq!(p.reclaim(A), 11);
        assert_eq!(p.free_buffers(), 31);
        assert_eq!(p.count_owned(|o| o.slot() == Some(A)), 0);
        p.free(other).unwrap();
        assert_eq!(p.free_buffers(), 32);
    }

    #[test]
    fn cached_alloc_and_free_stay_local_and_drain_back() {
        let p = pool(32);
        let mut c = LocalCache::new(Owner::Held(A), 8);
        let l = p.alloc_cached(&mut c, 500).unwrap(); // 3 buffers
        assert_eq!(p.free_buffers(), 32 - 8);
        assert_eq!(c.len(), 5);
        let data = vec![7u8; 500];
        let mut l = l;
        p.write(&mut l, &data).unwrap();
        assert_eq!(p.read_to_vec(&l), data);
        assert_eq!(p.free_cached(&mut c, l), Ok(3));
        assert_eq!(c.len(), 8);
        // Steady state: no shared pool traffic.
        for _ in 0..100 {
            let l = p.alloc_cached(&mut c, 100).unwrap();
            p.free_cached(&mut c, l).unwrap();
        }
        assert_eq!(p.free_buffers(), 24);
        // A dead holder's cached buffers are reclaimed like held ones.
        assert_eq!(p.reclaim(A), 8);
        let mut c2 = LocalCache::new(Owner::Held(B), 4);
        let l = p.alloc_cached(&mut c2, 10).unwrap();
        p.free_cached(&mut c2, l).unwrap();
        p.drain_cache(&mut c2);
        assert_eq!(p.free_buffers(), 32);
    }

    /// A cache holds buffer numbers of the pool that filled it. Used with
    /// another pool, it gave those numbers out as that pool's buffers,
    /// one of which another lease held there, and drained them into it.
    #[test]
    fn a_cache_is_used_only_with_the_pool_whose_buffers_it_holds() {
        let (a, b) = (pool(16), pool(16));
        let ours = b.alloc(10, Owner::Held(A)).unwrap();
        let mut c = LocalCache::new(Owner::Held(A), 4);
        let l = a.alloc_cached(&mut c, 10).unwrap();
        a.free_cached(&mut c, l).unwrap();
        assert!(c.idx.contains(&ours.head()), "a's cache holds the number of b's leased buffer");
        let cached = c.len();
        // b allocates, frees and drains past a's cache and leaves it be.
        let l = b.alloc_cached(&mut c, 10).unwrap();
        assert_ne!(l.head(), ours.head(), "b's leased buffer allocated twice");
        assert_eq!(b.free_cached(&mut c, l), Ok(1));
        b.drain_cache(&mut c);
        assert_eq!(c.len(), cached, "a's buffers stay in the cache");
        assert_eq!(b.owner(ours.head()), Ok(Owner::Held(A)), "b's leased buffer was freed");
        assert_eq!(b.free_buffers(), 15);
        // Drained into its own pool, the cache serves any pool.
        a.drain_cache(&mut c);
        assert_eq!(a.free_buffers(), 16);
        let l = b.alloc_cached(&mut c, 10).unwrap();
        assert_ne!(l.head(), ours.head());
        b.free_cached(&mut c, l).unwrap();
        b.drain_cache(&mut c);
        assert_eq!(b.free(ours), Ok(1));
        assert_eq!(b.free_buffers(), 16);
    }

    #[test]
    fn open_refuses_a_bad_segment() {
        let r = Region::create("dne-not-a-pool", 8192, PagePolicy::Normal).unwrap();
        let e = Pool::open(r.fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(matches!(e, PoolOpenError::Segment(SegmentError::BadMagic { .. })), "{e}");
    }

    proptest! {
        #[test]
        fn random_descriptors_never_escape_or_steal(buf in any::<u32>(), len in any::<u32>(), tenant in 3u16..6, flags in 0u16..4) {
            let p = pool(8);
            let l = p.alloc(100, Owner::Held(A)).unwrap();
            let d = Descriptor { tenant, buf, len, flags, ..Default::default() };
            if let Ok(got) = p.accept(&d, B) {
                // Only possible for buffers handed to B: none were.
                prop_assert!(false, "accepted {:?}", got);
            }
            prop_assert_eq!(p.owner(l.head()), Ok(Owner::Held(A)));
            prop_assert_eq!(p.free(l), Ok(1));
            prop_assert_eq!(p.free_buffers(), 8);
        }
    }
}
