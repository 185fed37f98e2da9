//! The host link: how the engine exchanges descriptors with the functions
//! of its host, one link per tenant (DESIGN.md sections 1 and 3).
//!
//! [`HostLink`] is what the engine needs of it; the engine never touches a
//! payload. Implementations:
//! * [`host_shim::Function`] attached as the agent (`host` and `emulated`
//!   modes): the tenant's uplink ring in host-shimd's shared memory, and
//!   the functions' inbound rings;
//! * [`crate::comchlink::DpuLink`] (`dpu` mode): DOCA comch to host-shimd's
//!   bridge, over the tenant pool imported from host-shimd's export, which
//!   the agent never reads;
//! * [`NullLink`]: messages made up in a private pool and deliveries
//!   dropped, so the `engine` benchmark measures the engine alone.

use host_shim::{Function, Msg, SendError};
use shm::pool::Lease;
use std::os::fd::BorrowedFd;
use wire::Descriptor;

/// The agent's link to one tenant's functions on its host.
pub trait HostLink {
    /// The tenant pool (registered with the fabric).
    fn view(&self) -> fabric::PoolView<'_>;
    /// Buffers free in the pool, as far as this side knows (for `/status`,
    /// read every 100 ms on the data-plane thread: a cheap estimate, exact
    /// while nobody allocates or frees).
    fn free_buffers(&self) -> u32;
    /// One whole buffer for a receive (`None`: the pool is exhausted).
    fn alloc_buffer(&mut self) -> Option<Lease>;
    /// One buffer holding an empty message, for an error descriptor about
    /// a message the engine no longer has (see [`deliver`](Self::deliver)
    /// and [`take_lost`](Self::take_lost)). `None`: none to be had (the
    /// pool is exhausted; over an imported pool, no receive buffer the
    /// host lent is left).
    fn alloc_empty(&mut self) -> Option<Lease>;
    /// The next descriptor a function sent to the agent, validated and
    /// accepted (now held by the agent), if any.
    fn take(&mut self) -> Option<Msg>;
    /// The next message this link delivered that its host handed back
    /// undelivered, no live instance having taken it (a link that learns
    /// that at once, from [`deliver`](Self::deliver), has none). Its
    /// descriptor is whole, as the message's header has it.
    fn take_returned(&mut self) -> Option<Msg> {
        None
    }
    /// The descriptor of the next message this link delivered that was
    /// lost in the delivery, its host having taken its buffers back (the
    /// instance died as it was handed over), when the host says so later
    /// (DPU mode; a link that learns it from [`deliver`](Self::deliver)
    /// has none). `buf` is the message's first buffer as the engine
    /// delivered it.
    fn take_lost(&mut self) -> Option<Descriptor> {
        None
    }
    /// Hands `msg` to function `to` (cluster function id `dst`, which is
    /// also `msg.desc().dst_fn`). On failure the message comes back in the
    /// error (a full ring: try again later), unless host-shimd took its
    /// buffers back (the instance died as it was handed over).
    fn deliver(&mut self, msg: Msg, dst: u16, to: &str) -> Result<(), SendError>;
    /// The engine changed `msg`'s descriptor (an error going back, a call
    /// marked to go to another node) and is
    /// about to send it over the fabric. A link whose pool the fabric port
    /// writes headers into gives it back at once (`Some`); a link over an
    /// imported pool takes it, has the host rewrite the headers, and hands
    /// it back later through [`take`](Self::take) (`None`).
    fn restamp(&mut self, msg: Msg) -> Option<Msg> {
        Some(msg)
    }
    /// Works the link without taking a message. The engine calls it when
    /// it cannot take one (the tenant's send queue is full), so whatever
    /// the link does on the side goes on meanwhile (over comch: finished
    /// sends, buffers lent and given back, noticing the host went away).
    fn progress(&mut self) {}
    /// Sends now whatever the link has queued for its host (the engine is
    /// stopping: nothing would send it later).
    fn flush_out(&mut self) {}
    /// Returns a message's buffers to the pool.
    fn free(&mut self, msg: Msg);
    /// Whether the host side (host-shimd) is still there.
    fn alive(&self) -> bool;
    /// Calls `f` with each reason descriptors from functions were rejected
    /// for, and how many so far.
    fn rejected(&self, f: &mut dyn FnMut(&'static str, u64));
    /// Calls `f` with each reason [`free`](Self::free) failed for, and how
    /// many times so far (a process sharing the pool rewrote an owner word
    /// or a chain link of buffers the agent held: they stay out of the
    /// pool until host-shimd reclaims them). A link whose frees cannot
    /// fail has none.
    fn free_failed(&self, _f: &mut dyn FnMut(&'static str, u64)) {}
    /// The engine is about to sleep: from now on a function that sends
    /// wakes [`wake_fd`](Self::wake_fd). `false`: something is already
    /// waiting, do not sleep. [`sleep_end`](Self::sleep_end) follows
    /// either way.
    fn sleep_begin(&mut self) -> bool;
    /// Awake again.
    fn sleep_end(&mut self);
    /// The fd that turns readable when a function sends while the engine
    /// sleeps (`None`: none; the engine naps instead).
    fn wake_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Messages waiting in the inbound rings of function `to`'s local
    /// instances, as far as this link knows them (`None`: it never
    /// delivered to `to`).
    fn queue_depth(&self, to: &str) -> Option<u64>;
}

impl HostLink for Function {
    fn view(&self) -> fabric::PoolView<'_> {
        fabric::PoolView::Local(Function::pool(self))
    }
    fn free_buffers(&self) -> u32 {
        // The free hints, one read per 64 buffers: counting owner words is
        // one read per buffer (measured 41 us for 65536 buffers, against
        // 3.4 us for the hints).
        Function::pool(self).free_hint()
    }
    fn alloc_buffer(&mut self) -> Option<Lease> {
        let cap = Function::pool(self).geometry().payload_cap();
        self.alloc(cap).ok().map(|m| m.into_parts().0)
    }
    fn alloc_empty(&mut self) -> Option<Lease> {
        self.alloc(0).ok().map(|m| m.into_parts().0)
    }
    fn take(&mut self) -> Option<Msg> {
        self.try_recv()
    }
    fn deliver(&mut self, msg: Msg, _dst: u16, to: &str) -> Result<(), SendError> {
        self.send(msg, to)
    }
    fn free(&mut self, msg: Msg) {
        // Counted by `Function::free` and reported through `free_failed`;
        // the engine logs a summary at most once a second. A process of
        // the tenant that rewrites owner words can make every free fail, at
        // message rate.
        if let Err(e) = Function::free(self, msg) {
            log::trace!("freeing a message: {e}");
        }
    }
    fn alive(&self) -> bool {
        self.shimd_alive()
    }
    fn rejected(&self, f: &mut dyn FnMut(&'static str, u64)) {
        for (reason, n) in Function::rejected(self) {
            f(reason, *n);
        }
    }
    fn free_failed(&self, f: &mut dyn FnMut(&'static str, u64)) {
        for (reason, n) in Function::free_failed(self) {
            f(reason, *n);
        }
    }
    fn sleep_begin(&mut self) -> bool {
        Function::sleep_begin(self)
    }
    fn sleep_end(&mut self) {
        Function::sleep_end(self);
    }
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.doorbell_fd())
    }
    fn queue_depth(&self, to: &str) -> Option<u64> {
        self.peer_queue_depth(to)
    }
}

/// A host link with no host: [`take`](HostLink::take) hands out messages
/// of a fixed size and destination from a private pool, as fast as the
/// engine takes them, and every delivered or freed message goes straight
/// back to the stock. Buffers are leased once, at creation; the link
/// itself does no shared-memory work per message, so what a benchmark
/// measures through it is the engine's own cost.
#[derive(Debug)]
pub struct NullLink {
    pool: shm::Pool,
    stock: Vec<Lease>,
    desc: Descriptor,
    /// Messages handed out so far.
    pub taken: u64,
    /// Messages delivered to (made-up) functions so far.
    pub delivered: u64,
    /// Calls of [`progress`](HostLink::progress) so far.
    pub progressed: u64,
    /// Deliveries fail with `Full` (a function that takes nothing), and
    /// are counted in `refused`.
    pub full: bool,
    /// Deliveries refused so far.
    pub refused: u64,
    /// Deliveries to this function fail as when its instance died between
    /// the look-up of its ring and the push, and host-shimd took the
    /// message's buffers back: they go back to the stock, and the error
    /// hands back no message ([`host_shim::SendErrorKind::NoInstance`]).
    pub gone: Option<u16>,
    /// The descriptor of the last error descriptor delivered.
    pub last_error: Option<Descriptor>,
    /// The request id of the last message delivered.
    pub last_request: Option<u32>,
    /// Messages delivered after one with a higher request id.
    pub reordered: u64,
}

impl NullLink {
    /// A link over a new private pool of `geometry`, handing out `stock`
    /// messages of `len` bytes from tenant `tenant`'s function `src` to
    /// function `dst` (buffers beyond the stock stay free for receives).
    pub fn new(
        geometry: wire::PoolGeometry,
        tenant: u16,
        src: u16,
        dst: u16,
        len: u32,
        stock: usize,
    ) -> anyhow::Result<Self> {
        let pool = shm::Pool::create("dne-null-link", geometry, shm::PagePolicy::Normal)?;
        let mut leases = Vec::with_capacity(stock);
        for _ in 0..stock {
            leases.push(pool.alloc(len, wire::Owner::Agent)?);
        }
        let desc = Descriptor { tenant, src_fn: src, dst_fn: dst, ..Descriptor::default() };
        Ok(Self {
            pool,
            stock: leases,
            desc,
            taken: 0,
            delivered: 0,
            progressed: 0,
            full: false,
            refused: 0,
            gone: None,
            last_error: None,
            last_request: None,
            reordered: 0,
        })
    }

    /// The descriptor of the messages handed out from now on (its buffer
    /// and length are the stock's).
    pub fn template(&mut self) -> &mut Descriptor {
        &mut self.desc
    }

    /// Messages in stock (not handed out).
    pub fn in_stock(&self) -> usize {
        self.stock.len()
    }
}

impl HostLink for NullLink {
    fn view(&self) -> fabric::PoolView<'_> {
        fabric::PoolView::Local(&self.pool)
    }
    fn free_buffers(&self) -> u32 {
        self.pool.free_hint()
    }
    fn alloc_buffer(&mut self) -> Option<Lease> {
        self.pool.alloc(self.pool.geometry().payload_cap(), wire::Owner::Agent).ok()
    }
    fn alloc_empty(&mut self) -> Option<Lease> {
        self.pool.alloc(0, wire::Owner::Agent).ok()
    }
    fn take(&mut self) -> Option<Msg> {
        let lease = self.stock.pop()?;
        self.taken += 1;
        let mut desc = self.desc;
        desc.buf = lease.head();
        desc.len = lease.len();
        Some(Msg::from_parts(lease, desc))
    }
    fn progress(&mut self) {
        self.progressed += 1;
    }
    fn deliver(&mut self, msg: Msg, dst: u16, _to: &str) -> Result<(), SendError> {
        if self.full {
            self.refused += 1;
            return Err(SendError { kind: host_shim::SendErrorKind::Full, msg: Some(msg) });
        }
        if self.gone == Some(dst) {
            self.free(msg);
            return Err(SendError { kind: host_shim::SendErrorKind::NoInstance, msg: None });
        }
        self.delivered += 1;
        if msg.desc().flags & wire::DescFlags::ERROR != 0 {
            self.last_error = Some(*msg.desc());
        }
        let r = msg.desc().request;
        self.reordered += u64::from(self.last_request.is_some_and(|l| l > r));
        self.last_request = Some(r);
        self.free(msg);
        Ok(())
    }
    fn free(&mut self, msg: Msg) {
        let (lease, _) = msg.into_parts();
        if self.stock.len() < self.stock.capacity() {
            self.stock.push(lease);
        } else if let Err(e) = self.pool.free(lease) {
            log::warn!("null link: freeing a buffer: {e}");
        }
    }
    fn alive(&self) -> bool {
        true
    }
    fn rejected(&self, _f: &mut dyn FnMut(&'static str, u64)) {}
    fn sleep_begin(&mut self) -> bool {
        self.stock.is_empty()
    }
    fn sleep_end(&mut self) {}
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn queue_depth(&self, _to: &str) -> Option<u64> {
        None
    }
}
