//! The floor (one shared cache line) and DNE's own hand-off: a descriptor
//! naming pool buffers, pushed into the peer's inbound ring, with the
//! buffers' owners moved by `Pool::hand_over` and `Pool::accept`.

use super::proc::{Cmd, Peer, PeerCtx, Watchdog};
use super::{BUSY, RAW, SLEEP, Side};
use anyhow::{Result, anyhow, bail};
use shm::ring::{Consumer, Doorbell, Ring, RingPushError};
use shm::{LocalCache, PagePolicy, Pool, Region};
use std::hint::black_box;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::time::{Duration, Instant};
use wire::desc::{NO_NODE, NO_ROUTE};
use wire::{Descriptor, Owner, PoolGeometry};

const TENANT: u16 = 7;
/// Pool slots of the pinger (A, the parent) and the ponger (B, the peer).
const SLOT_A: u16 = 1;
const SLOT_B: u16 = 2;
/// Function ids of A and B.
const FN_A: u16 = 10;
const FN_B: u16 = 11;
/// Inbound ring capacity of each side.
const RING_CAP: u32 = 256;
/// Descriptors per push and per pop in the throughput test.
pub(crate) const BATCH: usize = 32;
/// Payload bytes per descriptor in the throughput test with ownership.
pub(crate) const TPUT_LEN: u32 = 64;
/// Buffers kept in each side's allocation cache (`Tput::Cached`).
const CACHE: usize = 2 * BATCH;
const OWNED: &str = "own";
const CACHED: &str = "cached";

/// What travels in the throughput test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tput {
    /// Descriptors only (the ring's own cost).
    Raw,
    /// alloc + hand_over + push -> pop + accept + free, on the shared free
    /// list.
    Owned,
    /// The same through per-process caches (`alloc_cached` / `free_cached`,
    /// as host-shim's function library does).
    Cached,
}

impl Tput {
    fn mode(self) -> &'static str {
        match self {
            Tput::Raw => RAW,
            Tput::Owned => OWNED,
            Tput::Cached => CACHED,
        }
    }
}

/// How a pool splits its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Geometry {
    /// 8 buffers of 1 MiB + 64 B headroom: every size is one buffer.
    OneBuffer,
    /// 1024 buffers of 16 KiB (16320 B payload): 1 MiB is a 65-buffer chain.
    Chain16K,
}

impl Geometry {
    fn pool(self) -> Result<PoolGeometry> {
        let h = wire::fabric::HEADROOM;
        Ok(match self {
            Geometry::OneBuffer => PoolGeometry::new(TENANT, (1 << 20) + h, 8, h, 1)?,
            Geometry::Chain16K => PoolGeometry::new(TENANT, 16384, 1024, h, 128)?,
        })
    }

    /// For the report.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Geometry::OneBuffer => "8 x (1 MiB + 64 B) buffers, every size one buffer",
            Geometry::Chain16K => "1024 x 16 KiB buffers (16320 B payload), 1 MiB = 65-buffer chain",
        }
    }
}

fn desc(src_fn: u16, dst_fn: u16, buf: u32, len: u32, request: u32) -> Descriptor {
    Descriptor {
        tenant: TENANT,
        flags: 0,
        src_fn,
        dst_fn,
        route: NO_ROUTE,
        hop: 0,
        status: 0,
        origin: NO_NODE,
        reserved: 0,
        request,
        buf,
        len,
    }
}

// ---------------------------------------------------------------- floor

/// Where the floors' lines sit in their shared page: the one line of the
/// floor proper, and for the two-line floors a line per direction and the
/// line of the owner word the receiver moves. 128 B apart, so that no two
/// are fetched together by an adjacent-line prefetcher.
const LINE_ONE: u64 = 0;
const LINE_REQ: u64 = 128;
const LINE_REPLY: u64 = 256;
const LINE_OWNER: u64 = 384;
/// The owner word's values: the pinger's and the ponger's.
const OWNER_PING: u64 = 1;
const OWNER_PONG: u64 = 2;

/// The floors, pinger side: one `AtomicU64` bounced in a shared mapping
/// (the floor proper), or a line per direction with nothing else ([`TWO`])
/// or with a compare-and-swap of an owner word on a third line by each
/// receiver ([`TWO_CAS`]): the least any design with a ring per receiver
/// moves, without and with a receive-time owner move.
///
/// [`TWO`]: super::TWO
/// [`TWO_CAS`]: super::TWO_CAS
#[derive(Debug)]
pub(crate) struct FloorSide {
    region: Region,
    next: u64,
    next_two: u64,
}

/// Creates the shared lines and starts their ponger.
pub(crate) fn floor_endpoint() -> Result<(Peer, FloorSide)> {
    let region = Region::create("dne-bench-floor", 4096, PagePolicy::Normal)?;
    region.atomic_u64(LINE_OWNER)?.store(OWNER_PING, Relaxed);
    let peer = Peer::spawn("floor", &[region.fd()], &[])?;
    Ok((peer, FloorSide { region, next: 0, next_two: 0 }))
}

/// A receiver's owner move on the two-line floor with CAS: from the
/// sender's value to its own; anything else is a bug of the benchmark.
fn floor_owner_move(owner: &AtomicU64, from: u64, to: u64) -> Result<()> {
    // AcqRel/Acquire: the orderings `Pool::accept` uses.
    owner
        .compare_exchange(from, to, AcqRel, Acquire)
        .map(|_| ())
        .map_err(|v| anyhow!("floor: owner word {v}, expected {from}"))
}

impl Side for FloorSide {
    fn round_trips(&mut self, _size: usize, n: u64, mode: &str) -> Result<Duration> {
        let mut wd = Watchdog::new();
        if mode == super::TWO || mode == super::TWO_CAS {
            let (req, reply) = (self.region.atomic_u64(LINE_REQ)?, self.region.atomic_u64(LINE_REPLY)?);
            let owner = self.region.atomic_u64(LINE_OWNER)?;
            let cas = mode == super::TWO_CAS;
            let t = Instant::now();
            for _ in 0..n {
                let v = self.next_two + 1;
                // Release/Acquire as in the one-line floor.
                req.store(v, Release);
                while reply.load(Acquire) != v {
                    wd.poll(true)?;
                }
                if cas {
                    floor_owner_move(owner, OWNER_PONG, OWNER_PING)?;
                }
                self.next_two = v;
            }
            return Ok(t.elapsed());
        }
        let line = self.region.atomic_u64(LINE_ONE)?;
        let hint = mode != super::HOT;
        let t = Instant::now();
        for _ in 0..n {
            let v = self.next;
            // Release/Acquire pair with the ponger's Acquire load and
            // Release store: the same hand-off any message needs.
            line.store(v + 1, Release);
            while line.load(Acquire) != v + 2 {
                wd.poll(hint)?;
            }
            self.next = v + 2;
        }
        Ok(t.elapsed())
    }
}

/// The floors, ponger side.
pub(crate) fn floor_peer(mut ctx: PeerCtx) -> Result<()> {
    let region = Region::open(ctx.fd(0)?)?;
    let line = region.atomic_u64(LINE_ONE)?;
    let (req, reply, owner) =
        (region.atomic_u64(LINE_REQ)?, region.atomic_u64(LINE_REPLY)?, region.atomic_u64(LINE_OWNER)?);
    ctx.say("ready")?;
    let (mut last, mut last_two) = (0u64, 0u64);
    while let Some(cmd) = ctx.next_cmd()? {
        let mut wd = Watchdog::new();
        if cmd.mode == super::TWO || cmd.mode == super::TWO_CAS {
            let cas = cmd.mode == super::TWO_CAS;
            for _ in 0..cmd.n {
                // Acquire: pairs with the pinger's Release store.
                while req.load(Acquire) == last_two {
                    wd.poll(true)?;
                }
                last_two += 1;
                if cas {
                    floor_owner_move(owner, OWNER_PING, OWNER_PONG)?;
                }
                // Release: pairs with the pinger's Acquire load.
                reply.store(last_two, Release);
            }
            ctx.say("done")?;
            continue;
        }
        let hint = cmd.mode != super::HOT;
        for _ in 0..cmd.n {
            let v = loop {
                // Acquire: pairs with the pinger's Release store.
                let v = line.load(Acquire);
                if v != last {
                    break v;
                }
                wd.poll(hint)?;
            };
            // Release: pairs with the pinger's Acquire load.
            line.store(v + 1, Release);
            last = v + 1;
        }
        ctx.say("done")?;
    }
    Ok(())
}

// ---------------------------------------------------------------- ours

/// One side's view of a pool and of both inbound rings.
#[derive(Debug)]
struct Ends {
    pool: Pool,
    /// The peer's inbound ring (we produce into it).
    to_peer: Ring,
    /// Our inbound ring.
    inbox: Consumer,
    /// Our doorbell (we sleep on it).
    bell: Doorbell,
    /// The peer's doorbell (we ring it when `Pushed::wake`).
    peer_bell: Doorbell,
    me: (u16, u16),
    peer: (u16, u16),
    /// `Corrupted` push results that a retry got past.
    spurious: u64,
}

impl Ends {
    /// Pushes all of `d`, retrying while the ring is full. Also retries on
    /// `Corrupted`, which `shm::ring::push` can report spuriously when the
    /// consumer frees the slot between its two loads of the slot sequence
    /// (a full ring only); those are counted in `self.spurious`.
    #[inline]
    fn push(&mut self, d: &[Descriptor], wd: &mut Watchdog) -> Result<()> {
        let mut off = 0;
        while off < d.len() {
            match self.to_peer.push(&d[off..]) {
                Ok(p) => {
                    off += p.count;
                    if p.wake {
                        self.peer_bell.ring()?;
                    }
                }
                Err(RingPushError::Full) => wd.tick()?,
                Err(RingPushError::Corrupted) => {
                    self.spurious += 1;
                    wd.tick()?;
                }
                Err(e) => bail!("push: {e}"),
            }
        }
        Ok(())
    }

    /// Receives at least one descriptor: busy-polling, or sleeping on our
    /// doorbell right away (no spin) so the wake-up path is what is timed.
    #[inline]
    fn recv(&mut self, out: &mut [Descriptor], sleep: bool, wd: &mut Watchdog) -> Result<usize> {
        if sleep {
            let n = self.inbox.pop_wait(out, &self.bell, Duration::ZERO, Some(wd.remaining()))?;
            if n == 0 {
                bail!("watchdog: nothing arrived while sleeping");
            }
            return Ok(n);
        }
        loop {
            let n = self.inbox.pop(out);
            if n > 0 {
                return Ok(n);
            }
            wd.tick()?;
        }
    }

    fn accept(&self, d: &Descriptor) -> Result<shm::Lease> {
        self.pool.accept(d, self.me.0).map_err(|e| anyhow!("accept: {e}"))
    }

    fn hand_to_peer(&self, lease: shm::Lease) -> Result<(u32, u32)> {
        self.pool.hand_over(lease, Owner::Function(self.peer.0)).map_err(|(_, e)| anyhow!("hand_over: {e}"))
    }

    fn desc_to_peer(&self, buf: u32, len: u32, request: u32) -> Descriptor {
        desc(self.me.1, self.peer.1, buf, len, request)
    }
}

/// DNE's hand-off, pinger side.
#[derive(Debug)]
pub(crate) struct OursSide {
    ends: Ends,
}

/// Creates a pool, both rings and both doorbells, and starts the ponger.
pub(crate) fn ours_endpoint(geometry: Geometry) -> Result<(Peer, OursSide)> {
    let tag = std::process::id();
    let pool = Pool::create(&format!("dne-bench-pool-{tag}"), geometry.pool()?, PagePolicy::Auto)?;
    let ring_a = Ring::create("dne-bench-ring-a", RING_CAP, TENANT, FN_A, u32::from(SLOT_A))?;
    let ring_b = Ring::create("dne-bench-ring-b", RING_CAP, TENANT, FN_B, u32::from(SLOT_B))?;
    let (bell_a, bell_b) = (Doorbell::new()?, Doorbell::new()?);
    // The peer's order: pool, its ring, our ring, its bell, our bell.
    let fds = [pool.region().fd(), ring_b.fd(), ring_a.fd(), bell_b.fd(), bell_a.fd()];
    let peer = Peer::spawn("ours", &fds, &[])?;
    let ends = Ends {
        pool,
        to_peer: ring_b,
        inbox: ring_a.into_consumer(),
        bell: bell_a,
        peer_bell: bell_b,
        me: (SLOT_A, FN_A),
        peer: (SLOT_B, FN_B),
        spurious: 0,
    };
    Ok((peer, OursSide { ends }))
}

impl OursSide {
    /// What backs the pool (for the report).
    pub(crate) fn backing(&self) -> shm::Backing {
        self.ends.pool.backing()
    }

    /// One-way throughput: the peer pushes `n` descriptors in batches of
    /// [`BATCH`]; we pop in batches. Unless `Tput::Raw`, each descriptor
    /// names a buffer the peer allocated and handed over, which we accept
    /// and free. Returns descriptors per second, timed from the first pop to
    /// the last, and the spurious `Corrupted` pushes the producer retried.
    pub(crate) fn throughput(&mut self, peer: &mut Peer, n: u64, how: Tput) -> Result<(f64, u64)> {
        peer.send(&format!("tput 0 {n} {}", how.mode()))?;
        let e = &mut self.ends;
        let mut cache = LocalCache::new(Owner::Held(e.me.0), CACHE);
        let mut out = [Descriptor::default(); BATCH];
        let mut wd = Watchdog::new();
        let (mut got, mut first) = (0u64, 0u64);
        let mut t0 = None;
        while got < n {
            let k = e.inbox.pop(&mut out);
            if k == 0 {
                wd.tick()?;
                continue;
            }
            if t0.is_none() {
                t0 = Some(Instant::now());
                first = k as u64;
            }
            match how {
                Tput::Raw => {
                    black_box(&out[..k]);
                }
                Tput::Owned => {
                    for d in &out[..k] {
                        let lease = e.accept(d)?;
                        e.pool.free(lease).map_err(|e| anyhow!("free: {e}"))?;
                    }
                }
                Tput::Cached => {
                    for d in &out[..k] {
                        let lease = e.accept(d)?;
                        e.pool.free_cached(&mut cache, lease).map_err(|e| anyhow!("free: {e}"))?;
                    }
                }
            }
            got += k as u64;
        }
        let el = t0.map_or(Duration::ZERO, |t| t.elapsed());
        e.pool.drain_cache(&mut cache);
        let spurious: u64 = peer.expect("done")?.trim().parse().unwrap_or(0);
        Ok(((got - first) as f64 / el.as_secs_f64(), spurious))
    }
}

impl Side for OursSide {
    fn round_trips(&mut self, size: usize, n: u64, mode: &str) -> Result<Duration> {
        let e = &mut self.ends;
        let len = u32::try_from(size)?;
        let mut lease = e.pool.alloc(len, Owner::Held(SLOT_A)).map_err(|e| anyhow!("alloc: {e}"))?;
        // The payload is written once, up front, and never again.
        for k in 0..lease.frags() {
            if let Some(b) = e.pool.frag_mut(&mut lease, k) {
                b.fill(0x5A);
            }
        }
        let mut out = [Descriptor::default(); 1];
        let mut wd = Watchdog::new();
        let t = Instant::now();
        for i in 0..n {
            if mode == RAW {
                // Ring only: the descriptor goes around, ownership stays.
                e.push(&[e.desc_to_peer(lease.head(), lease.len(), i as u32)], &mut wd)?;
                e.recv(&mut out, false, &mut wd)?;
                black_box(&out);
            } else {
                let (head, len) = e.hand_to_peer(lease)?;
                e.push(&[e.desc_to_peer(head, len, i as u32)], &mut wd)?;
                e.recv(&mut out, mode == SLEEP, &mut wd)?;
                lease = e.accept(&out[0])?;
            }
        }
        let el = t.elapsed();
        e.pool.free(lease).map_err(|e| anyhow!("free: {e}"))?;
        Ok(el)
    }
}

/// DNE's hand-off, ponger side (and the producer of the throughput test).
pub(crate) fn ours_peer(mut ctx: PeerCtx) -> Result<()> {
    let pool = Pool::open(ctx.fd(0)?)?;
    let inbox = Ring::open(ctx.fd(1)?)?.into_consumer();
    let to_peer = Ring::open(ctx.fd(2)?)?;
    let bell = Doorbell::from_fd(ctx.fd(3)?);
    let peer_bell = Doorbell::from_fd(ctx.fd(4)?);
    let mut e = Ends { pool, to_peer, inbox, bell, peer_bell, me: (SLOT_B, FN_B), peer: (SLOT_A, FN_A), spurious: 0 };
    ctx.say("ready")?;
    while let Some(cmd) = ctx.next_cmd()? {
        match (cmd.verb.as_str(), cmd.mode.as_str()) {
            ("run", BUSY | SLEEP | RAW) => pong(&mut e, &cmd)?,
            ("tput", RAW | OWNED | CACHED) => produce(&mut e, &cmd)?,
            _ => bail!("ours: bad command {cmd:?}"),
        }
        ctx.say(&format!("done {}", e.spurious))?;
        e.spurious = 0;
    }
    Ok(())
}

fn pong(e: &mut Ends, cmd: &Cmd) -> Result<()> {
    let mut out = [Descriptor::default(); 1];
    let mut wd = Watchdog::new();
    let sleep = cmd.mode == SLEEP;
    for _ in 0..cmd.n {
        e.recv(&mut out, sleep, &mut wd)?;
        let d = out[0];
        if cmd.mode == RAW {
            e.push(&[e.desc_to_peer(d.buf, d.len, d.request)], &mut wd)?;
        } else {
            // Payload already written: accepting and handing back is all.
            let lease = e.accept(&d)?;
            let (head, len) = e.hand_to_peer(lease)?;
            e.push(&[e.desc_to_peer(head, len, d.request)], &mut wd)?;
        }
    }
    Ok(())
}

fn produce(e: &mut Ends, cmd: &Cmd) -> Result<()> {
    let owned = cmd.mode != RAW;
    let mut cache = (cmd.mode == CACHED).then(|| LocalCache::new(Owner::Held(e.me.0), CACHE));
    let mut wd = Watchdog::new();
    let mut batch = [e.desc_to_peer(0, TPUT_LEN, 0); BATCH];
    let mut sent = 0u64;
    while sent < cmd.n {
        let k = (cmd.n - sent).min(BATCH as u64) as usize;
        if owned {
            for (j, d) in batch[..k].iter_mut().enumerate() {
                let lease = loop {
                    let got = match cache.as_mut() {
                        Some(c) => e.pool.alloc_cached(c, TPUT_LEN),
                        None => e.pool.alloc(TPUT_LEN, Owner::Held(e.me.0)),
                    };
                    match got {
                        Ok(l) => break l,
                        Err(shm::AllocError::Exhausted) => wd.tick()?,
                        Err(err) => bail!("alloc: {err}"),
                    }
                };
                let (head, len) = e.hand_to_peer(lease)?;
                *d = e.desc_to_peer(head, len, (sent + j as u64) as u32);
            }
        }
        e.push(&batch[..k], &mut wd)?;
        sent += k as u64;
    }
    if let Some(c) = cache.as_mut() {
        e.pool.drain_cache(c);
    }
    Ok(())
}

// ---------------------------------------------------------------- idle

/// Starts an attached function that waits for work that never comes.
pub(crate) fn idle_peer_spawn(side: &OursSide) -> Result<(Peer, Ring, Doorbell)> {
    let ring = Ring::create("dne-bench-ring-idle", RING_CAP, TENANT, FN_B + 1, u32::from(SLOT_B) + 1)?;
    let bell = Doorbell::new()?;
    let peer = Peer::spawn("idle", &[side.ends.pool.region().fd(), ring.fd(), bell.fd()], &[])?;
    Ok((peer, ring, bell))
}

/// The idle function: attaches (maps the pool, opens its ring) and waits in
/// `pop_wait` (spin 50 us, then sleep on its doorbell, no timeout).
pub(crate) fn idle_peer(mut ctx: PeerCtx) -> Result<()> {
    let pool = Pool::open(ctx.fd(0)?)?;
    let mut inbox = Ring::open(ctx.fd(1)?)?.into_consumer();
    let bell = Doorbell::from_fd(ctx.fd(2)?);
    black_box(pool.geometry());
    ctx.say("ready")?;
    let mut out = [Descriptor::default(); BATCH];
    loop {
        let n = inbox.pop_wait(&mut out, &bell, Duration::from_micros(50), None)?;
        black_box(&out[..n]);
    }
}

/// CPU time used so far by process `pid`, every thread of it, in
/// nanoseconds: the process's CPU-time clock (`clock_getcpuclockid`).
pub(crate) fn cpu_ns(pid: u32) -> Result<u64> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    let clock = nix::time::clock_getcpuclockid(pid)?;
    let t = nix::time::clock_gettime(clock)?;
    Ok(u64::try_from(t.tv_sec())? * 1_000_000_000 + u64::try_from(t.tv_nsec())?)
}

// ---------------------------------------------------------------- local

/// Nanoseconds per operation of DNE's hand-off pieces in one process (no
/// cache line moves between cores): what the instructions cost by
/// themselves. Rows: (label, stats).
pub(crate) fn local_costs(rounds: usize, iters: u64) -> Result<Vec<(&'static str, crate::harness::Stats)>> {
    let pool = Pool::create("dne-bench-local", Geometry::Chain16K.pool()?, PagePolicy::Normal)?;
    let ring = Ring::create("dne-bench-local-ring", RING_CAP, TENANT, FN_B, u32::from(SLOT_B))?;
    let prod = Ring::open(ring.fd().try_clone_to_owned()?)?;
    let mut cons = ring.into_consumer();
    // A line of its own (in the pool's region every line is in use: the
    // header, the buffer table, the hints, the buffers).
    let line = shm::Region::create("dne-bench-local-line", 4096, PagePolicy::Normal)?;
    let mut lease = Some(pool.alloc(64, Owner::Held(SLOT_A)).map_err(|e| anyhow!("alloc: {e}"))?);
    let mut err: Option<anyhow::Error> = None;
    let mut out = [Descriptor::default(); 1];
    let mut store_load = || {
        // The floor's two operations, through the same checked accessor.
        if let Ok(a) = line.atomic_u64(0) {
            a.store(black_box(a.load(Acquire)) + 1, Release);
        }
    };
    let mut push_pop = || {
        if prod.push(&[desc(FN_A, FN_B, 0, 64, 0)]).is_err() || cons.pop(&mut out) != 1 {
            err.get_or_insert_with(|| anyhow!("local push/pop failed"));
        }
        black_box(&out);
    };
    let mut hand_accept = || {
        // Two hand-offs (A -> B -> A) per call; reported per hand-off below.
        let Some(l) = lease.take() else { return };
        let step = |l: shm::Lease, to: u16| -> Option<shm::Lease> {
            let (head, len) = pool.hand_over(l, Owner::Function(to)).ok()?;
            pool.accept(&desc(FN_A, FN_B, head, len, 0), to).ok()
        };
        lease = step(l, SLOT_B).and_then(|l| step(l, SLOT_A));
    };
    let mut accessor = || {
        black_box(line.atomic_u32(black_box(128)).is_ok());
    };
    let stats = crate::harness::interleaved(
        rounds,
        iters,
        &mut [
            ("store+load", &mut store_load),
            ("push 1 + pop 1", &mut push_pop),
            ("hand_over+accept x2", &mut hand_accept),
            ("accessor", &mut accessor),
        ],
    );
    if let Some(e) = err {
        return Err(e);
    }
    let Some(l) = lease else { bail!("local hand-off failed") };
    pool.free(l).map_err(|e| anyhow!("free: {e}"))?;
    let half =
        |s: crate::harness::Stats| crate::harness::Stats { min: s.min / 2.0, median: s.median / 2.0, max: s.max / 2.0 };
    Ok(vec![
        ("atomic store + load (the floor's work per hop)", stats[0]),
        ("ring push 1 + pop 1 (per hop)", stats[1]),
        ("hand_over + accept, 1 buffer (per hop)", half(stats[2])),
        ("Region::atomic_u32 accessor (bounds + alignment check)", stats[3]),
    ])
}

#[cfg(test)]
mod tests {
    use super::cpu_ns;
    use std::time::{Duration, Instant};

    fn process_cpu_ns() -> u64 {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap();
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    }

    /// A thread other than the main one that burns 100 ms shows in
    /// `cpu_ns`. Before, it read the main thread's schedstat only.
    #[test]
    fn cpu_ns_counts_every_thread_of_the_process() {
        let pid = std::process::id();
        let (a0, p0) = (cpu_ns(pid).unwrap(), process_cpu_ns());
        std::thread::spawn(|| {
            let end = Instant::now() + Duration::from_millis(100);
            while Instant::now() < end {
                std::hint::spin_loop();
            }
        })
        .join()
        .unwrap();
        let (a1, p1) = (cpu_ns(pid).unwrap(), process_cpu_ns());
        let (got, want) = (a1 - a0, p1 - p0);
        assert!(got * 10 >= want * 8, "cpu_ns saw {got} ns of the process's {want} ns");
    }
}
