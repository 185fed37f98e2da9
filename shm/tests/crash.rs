//! A process killed (SIGKILL) at any instruction of allocating or freeing
//! loses no buffer: after host-shimd's death path ([`Pool::reclaim`] of the
//! dead process's slot, then [`Pool::repair`]), every buffer of the pool can
//! be taken again.
//!
//! The children are forked copies of the test process that allocate and
//! free in a loop over the shared mapping until they are killed, two at a
//! time (so they also lose races for buffers to each other, and can be
//! killed in the middle of one); the kills land at a different point of
//! that loop each time.

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, fork};
use shm::{AllocError, PagePolicy, Pool};
use std::time::Duration;
use wire::desc::PoolGeometry;
use wire::segment::Owner;

const BUFFERS: u32 = 64;
/// The slots of the two children.
const DYING: [u16; 2] = [1, 3];
const SURVIVOR: u16 = 2;

/// Takes every buffer the pool hands out as `SURVIVOR`; returns how many.
fn take_all(p: &Pool) -> u32 {
    let mut n = 0;
    while p.alloc(10, Owner::Held(SURVIVOR)).is_ok() {
        n += 1;
        assert!(n <= BUFFERS, "more buffers handed out than the pool has");
    }
    assert_eq!(p.alloc(10, Owner::Held(SURVIVOR)).err(), Some(AllocError::Exhausted));
    n
}

/// A child that allocates and frees as `slot` until it is killed.
fn churn(p: &Pool, slot: u16) -> ! {
    loop {
        // Single buffers and chains, freed in and out of order.
        let a = p.alloc(10, Owner::Held(slot));
        let b = p.alloc(600, Owner::Held(slot));
        if let Ok(a) = a {
            let _ = p.free(a);
        }
        if let Ok(b) = b {
            let _ = p.free(b);
        }
    }
}

#[test]
fn processes_killed_while_allocating_lose_no_buffer() {
    let geometry = PoolGeometry::new(4, 256, BUFFERS, 64, 8).unwrap();
    for round in 0..200u64 {
        let p = Pool::create("dne-crash-test", geometry, PagePolicy::Normal).unwrap();
        let mut children = Vec::new();
        for slot in DYING {
            // SAFETY: the child only runs `churn` on memory mapped before
            // the fork (no allocation, no lock) and never returns.
            match unsafe { fork() }.unwrap() {
                ForkResult::Child => churn(&p, slot),
                ForkResult::Parent { child } => children.push(child),
            }
        }
        std::thread::sleep(Duration::from_micros(100 + round * 37 % 900));
        for &child in &children {
            kill(child, Signal::SIGKILL).unwrap();
        }
        for child in children {
            waitpid(child, None).unwrap();
        }
        // What host-shimd does when a process dies.
        for slot in DYING {
            p.reclaim(slot);
        }
        p.repair();
        assert_eq!(p.free_buffers(), BUFFERS, "round {round}: every buffer free");
        assert_eq!(take_all(&p), BUFFERS, "round {round}: every buffer can be taken again");
    }
}
