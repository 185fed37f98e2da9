//! A process killed (SIGKILL) at any instruction of allocating or freeing
//! loses no buffer: after host-shimd's death path ([`Pool::reclaim`] of the
//! dead process's slot, then [`Pool::repair`]), every buffer of the pool can
//! be taken again.
//!
//! The child is a forked copy of the test process that allocates and frees
//! in a loop over the shared mapping until it is killed; the kill lands at
//! a different point of that loop each time.

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, fork};
use shm::{AllocError, PagePolicy, Pool};
use std::time::Duration;
use wire::desc::PoolGeometry;
use wire::segment::Owner;

const BUFFERS: u32 = 64;
const DYING: u16 = 1;
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

#[test]
fn a_process_killed_while_allocating_loses_no_buffer() {
    let geometry = PoolGeometry::new(4, 256, BUFFERS, 64, 8).unwrap();
    for round in 0..200u64 {
        let p = Pool::create("dne-crash-test", geometry, PagePolicy::Normal).unwrap();
        // SAFETY: the child only runs the loop below on memory mapped
        // before the fork (no allocation, no lock) and never returns.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => loop {
                // Single buffers and chains, freed in and out of order.
                let a = p.alloc(10, Owner::Held(DYING));
                let b = p.alloc(600, Owner::Held(DYING));
                if let Ok(a) = a {
                    let _ = p.free(a);
                }
                if let Ok(b) = b {
                    let _ = p.free(b);
                }
            },
            ForkResult::Parent { child } => {
                std::thread::sleep(Duration::from_micros(100 + round * 37 % 900));
                kill(child, Signal::SIGKILL).unwrap();
                waitpid(child, None).unwrap();
                // What host-shimd does when a process dies.
                p.reclaim(DYING);
                p.repair();
                assert_eq!(p.free_buffers(), BUFFERS, "round {round}: every buffer free");
                assert_eq!(take_all(&p), BUFFERS, "round {round}: every buffer can be taken again");
            }
        }
    }
}
