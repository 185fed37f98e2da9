//! `alloc`: the shared-pool allocator alone (`shm::Pool::alloc` and
//! `free`, no per-process cache), in the pattern of a sender with messages
//! in flight: each step allocates a message and frees the oldest of the
//! last [`INFLIGHT`]. Nanoseconds per step (one allocation and one free),
//! for a pool of [`BUFFERS`] buffers of which a share is held for the
//! whole run, scattered over the pool (as long-lived buffers are: posted
//! receives, hoarded messages), by one process, and by two processes at
//! once (each maps the pool on its own, as functions do).

use super::intranode::proc::{Peer, PeerCtx};
use crate::harness::{Opts, Report, Stats, Suite, Table, fmt_num};
use anyhow::{Context, Result, bail};
use shm::{Lease, PagePolicy, Pool};
use std::collections::VecDeque;
use std::time::Instant;
use wire::PoolGeometry;
use wire::segment::Owner;

/// The suite.
pub const SUITE: Suite = Suite {
    name: "alloc",
    about: "shared-pool allocation and free: ns per step with messages in flight, by pool occupancy and processes",
    run,
};

/// Buffers in the pool.
pub const BUFFERS: u32 = 4096;
/// Messages each process keeps in flight.
pub const INFLIGHT: usize = 64;
const BUF_SIZE: u32 = 2048;
const HEADROOM: u32 = 64;
const HOLDER: u16 = 7;

fn geometry() -> Result<PoolGeometry> {
    PoolGeometry::new(1, BUF_SIZE, BUFFERS, HEADROOM, 16).context("pool geometry")
}

/// Holds `held` buffers spread over the pool (a fixed pseudo-random pick)
/// until the returned leases are dropped with the pool.
fn hold(pool: &Pool, held: u32) -> Result<Vec<Lease>> {
    let mut all = Vec::with_capacity(BUFFERS as usize);
    for _ in 0..BUFFERS {
        all.push(pool.alloc(1, Owner::Held(HOLDER)).context("filling the pool")?);
    }
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..all.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        all.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for l in all.drain(held as usize..) {
        pool.free(l).context("freeing")?;
    }
    Ok(all)
}

/// `steps` steps of: allocate `len` bytes, free the oldest beyond
/// [`INFLIGHT`]. Returns nanoseconds per step.
fn churn(pool: &Pool, owner: Owner, len: u32, steps: u64, q: &mut VecDeque<Lease>) -> Result<f64> {
    let t = Instant::now();
    for _ in 0..steps {
        let l = match pool.alloc(len, owner) {
            Ok(l) => l,
            Err(e) => bail!("allocation failed with {} in flight: {e}", q.len()),
        };
        q.push_back(l);
        if q.len() > INFLIGHT
            && let Some(old) = q.pop_front()
        {
            pool.free(old).context("free")?;
        }
    }
    Ok(t.elapsed().as_nanos() as f64 / steps as f64)
}

/// Peer role: the second process.
pub(crate) const ALLOC_ROLE: &str = "alloc";

/// One case: `rounds` timed rounds of `steps`, by `procs` processes (1 or
/// 2); the median of the rounds, ns per step of one process (with two,
/// the mean of theirs in each round).
fn case(held_pct: u32, len: u32, procs: u32, rounds: usize, steps: u64) -> Result<Stats> {
    let pool = Pool::create("dne-bench-alloc", geometry()?, PagePolicy::Normal)?;
    let _held = hold(&pool, BUFFERS * held_pct / 100)?;
    let mut peer = if procs > 1 { Some(Peer::spawn(ALLOC_ROLE, &[pool.region().fd()], &[])?) } else { None };
    let mut q = VecDeque::with_capacity(INFLIGHT + 1);
    // Warm up (and settle the in-flight queue).
    churn(&pool, Owner::Held(1), len, steps / 10, &mut q)?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let Some(peer) = peer.as_mut() else {
            samples.push(churn(&pool, Owner::Held(1), len, steps, &mut q)?);
            continue;
        };
        // Both start within a pipe write of each other; a round is
        // milliseconds long.
        peer.send(&format!("churn {len} {steps} -"))?;
        let mine = churn(&pool, Owner::Held(1), len, steps, &mut q)?;
        let theirs: f64 = peer.expect("done")?.trim().parse().context("peer's ns per step")?;
        samples.push((mine + theirs) / 2.0);
    }
    drop(peer);
    for l in q.drain(..) {
        pool.free(l)?;
    }
    Ok(Stats::of(&mut samples))
}

/// The second process of a two-process case: maps the pool it inherited,
/// and for each `churn LEN STEPS -` churns and replies `done NS`.
pub(crate) fn alloc_peer(mut ctx: PeerCtx) -> Result<()> {
    let pool = Pool::open(ctx.fd(0)?)?;
    let mut q = VecDeque::with_capacity(INFLIGHT + 1);
    ctx.say("ready")?;
    while let Some(cmd) = ctx.next_cmd()? {
        if cmd.verb != "churn" {
            bail!("unknown command {:?}", cmd.verb);
        }
        let len = u32::try_from(cmd.size).context("length")?;
        let ns = churn(&pool, Owner::Held(2), len, cmd.n, &mut q)?;
        ctx.say(&format!("done {ns}"))?;
    }
    for l in q.drain(..) {
        pool.free(l)?;
    }
    Ok(())
}

fn run(opts: &Opts) -> Result<Report> {
    let (rounds, steps) = if opts.quick { (3, 200_000) } else { (7, 1_000_000) };
    let one = BUF_SIZE - HEADROOM;
    let cases: [(&str, &str, u32, u32, u32); 7] = [
        ("1p_held0", "1 process, single buffers, nothing else held", 0, 1, 1),
        ("1p_held90", "1 process, single buffers, 90 % held", 90, 1, 1),
        ("1p_held98", "1 process, single buffers, 98 % held", 98, 1, 1),
        ("1p_chain8_held0", "1 process, 8-buffer chains, nothing else held", 0, 8 * one, 1),
        ("1p_chain8_held75", "1 process, 8-buffer chains, 75 % held", 75, 8 * one, 1),
        ("2p_held0", "2 processes, single buffers, nothing else held", 0, 1, 2),
        ("2p_held90", "2 processes, single buffers, 90 % held", 90, 1, 2),
    ];
    let mut t = Table::new(
        format!(
            "alloc: ns per step (allocate a message, free the oldest of {INFLIGHT} in flight), pool of {BUFFERS} buffers, median of {rounds} rounds of {steps}"
        ),
        &["case", "median ns", "min", "max"],
    );
    let mut report = Report::default();
    for (key, what, held, len, procs) in cases {
        let s = case(held, len, procs, rounds, steps).with_context(|| what.to_owned())?;
        t.row(vec![what.to_owned(), fmt_num(s.median), fmt_num(s.min), fmt_num(s.max)]);
        report.put(&format!("ns_{key}"), s.median);
    }
    report.tables = vec![t];
    Ok(report)
}
