//! The cross-process buffer allocator: a lock-free stack of free buffer
//! indices in shared memory (Treiber stack), with a 32-bit tag beside the head
//! index against ABA, and an owner recorded per buffer.
//!
//! The algorithm is written against [`PoolCells`] so the same code runs on a
//! pool segment ([`crate::Pool`]) and, under `--cfg loom`, on loom's model
//! atomics (see the loom tests at the end).
//!
//! Robustness against a misbehaving process of the same tenant: every index
//! read from shared memory is checked against the pool size before use; a
//! corrupted free list makes allocation fail with [`AllocError::Corrupted`],
//! never an out-of-bounds access. Freeing checks the recorded owner with a
//! compare-and-swap, so a double free or a free by a non-owner is refused
//! and cannot corrupt the list.

use crate::sync::{AtomicU32, AtomicU64};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use wire::segment::{NIL, Owner};

/// The shared cells the allocator works on. `i < count()` is guaranteed by
/// the caller for every per-buffer accessor.
pub(crate) trait PoolCells {
    /// Buffers in the pool.
    fn count(&self) -> u32;
    /// Free-list head: `tag << 32 | index`.
    fn head(&self) -> &AtomicU64;
    /// Buffers on the free list (advisory).
    fn free_count(&self) -> &AtomicU32;
    /// Free-list link of buffer `i`.
    fn next_free(&self, i: u32) -> &AtomicU32;
    /// Chain link of buffer `i`.
    fn next_chain(&self, i: u32) -> &AtomicU32;
    /// Owner of buffer `i`.
    fn owner(&self, i: u32) -> &AtomicU32;
}

/// No buffer could be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every buffer is in use.
    #[error("pool exhausted")]
    Exhausted,
    /// The shared free list holds an index outside the pool.
    #[error("free list corrupted: index {0} outside the pool")]
    Corrupted(u32),
}

/// A buffer could not be freed (nothing was changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    /// The index is outside the pool.
    #[error("buffer {0} is outside the pool")]
    OutOfRange(u32),
    /// The buffer is already free.
    #[error("buffer {0} is already free")]
    DoubleFree(u32),
    /// The buffer belongs to someone else.
    #[error("buffer {index} is owned by {owner:#x}, not by the caller")]
    NotOwner {
        /// Buffer index.
        index: u32,
        /// Recorded owner (raw).
        owner: u32,
    },
    /// A chain link points outside the pool.
    #[error("chain link {0} outside the pool")]
    BadLink(u32),
}

fn pack(tag: u32, index: u32) -> u64 {
    u64::from(tag) << 32 | u64::from(index)
}

fn unpack(h: u64) -> (u32, u32) {
    ((h >> 32) as u32, h as u32)
}

/// Links every buffer into the free list. Only for a pool no one else has
/// mapped yet.
pub(crate) fn init(c: &impl PoolCells) {
    let n = c.count();
    for i in 0..n {
        c.next_free(i).store(if i + 1 < n { i + 1 } else { NIL }, Relaxed);
        c.next_chain(i).store(NIL, Relaxed);
        c.owner(i).store(Owner::Free.to_raw(), Relaxed);
    }
    c.free_count().store(n, Relaxed);
    // Release: publishes the links written above to whoever maps the pool
    // after us and loads the head with Acquire (`pop`).
    c.head().store(pack(0, if n == 0 { NIL } else { 0 }), Release);
}

/// Pops one buffer and records `owner` as its owner.
pub(crate) fn pop(c: &impl PoolCells, owner: Owner) -> Result<u32, AllocError> {
    let n = c.count();
    // Acquire: pairs with the Release CAS in `push` (and `init`), so the
    // popped buffer's `next_free` written before it was pushed is visible.
    let mut h = c.head().load(Acquire);
    loop {
        let (tag, idx) = unpack(h);
        if idx == NIL {
            return Err(AllocError::Exhausted);
        }
        if idx >= n {
            return Err(AllocError::Corrupted(idx));
        }
        let next = c.next_free(idx).load(Relaxed);
        let new = pack(tag.wrapping_add(1), next);
        // AcqRel on success: Acquire as above for the next pop, Release so a
        // later pusher's view is ordered after our claim. The tag changes on
        // every successful operation, so a head that went A -> B -> A in
        // between fails this CAS (ABA).
        match c.head().compare_exchange_weak(h, new, AcqRel, Acquire) {
            Ok(_) => {
                // A link outside the pool (`next >= n`, not NIL) is now the
                // head; the next `pop` reports it as `Corrupted` without
                // following it.
                c.free_count().fetch_sub(1, Relaxed);
                c.next_chain(idx).store(NIL, Relaxed);
                // Release: the owner is read by host-shimd's reclaim scan
                // (Acquire) after this process dies.
                c.owner(idx).store(owner.to_raw(), Release);
                return Ok(idx);
            }
            Err(cur) => h = cur,
        }
    }
}

/// Frees buffer `i` if its recorded owner is `expected` (any owner when
/// `None`).
pub(crate) fn push(c: &impl PoolCells, i: u32, expected: Option<Owner>) -> Result<(), FreeError> {
    if i >= c.count() {
        return Err(FreeError::OutOfRange(i));
    }
    let free = Owner::Free.to_raw();
    // AcqRel: Acquire pairs with the owner store of whoever handed us the
    // buffer; Release orders our payload writes before the buffer can be
    // popped again.
    let prev = match expected {
        Some(o) => c.owner(i).compare_exchange(o.to_raw(), free, AcqRel, Acquire).unwrap_or_else(|cur| cur),
        None => c.owner(i).swap(free, AcqRel),
    };
    if prev == free {
        return Err(FreeError::DoubleFree(i));
    }
    if let Some(o) = expected
        && prev != o.to_raw()
    {
        return Err(FreeError::NotOwner { index: i, owner: prev });
    }
    let mut h = c.head().load(Relaxed);
    loop {
        let (tag, top) = unpack(h);
        c.next_free(i).store(top, Relaxed);
        // Release: publishes `next_free` (just above) to the popper, which
        // loads the head with Acquire.
        match c.head().compare_exchange_weak(h, pack(tag.wrapping_add(1), i), Release, Relaxed) {
            Ok(_) => break,
            Err(cur) => h = cur,
        }
    }
    c.free_count().fetch_add(1, Relaxed);
    Ok(())
}

/// Allocates `frags` buffers linked as a chain; returns the head. All or
/// nothing: on failure every buffer taken is returned.
#[cfg_attr(loom, allow(dead_code))] // used by `Pool`, which loom builds leave out
pub(crate) fn pop_chain(c: &impl PoolCells, frags: u32, owner: Owner) -> Result<u32, AllocError> {
    let mut head = NIL;
    for _ in 0..frags {
        match pop(c, owner) {
            Ok(i) => {
                c.next_chain(i).store(head, Relaxed);
                head = i;
            }
            Err(e) => {
                // Best effort: the buffers were just popped by us and are
                // linked through `next_chain`, so this cannot fail unless
                // another process corrupts them meanwhile.
                let _ = push_chain(c, head, frags, Some(owner));
                return Err(e);
            }
        }
    }
    Ok(head)
}

/// Frees up to `frags` buffers following the chain from `head`; returns how
/// many were freed. Stops at the end of the chain, a bad link, or a buffer
/// that fails [`push`] (whose error is returned after the others were freed).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn push_chain(c: &impl PoolCells, head: u32, frags: u32, expected: Option<Owner>) -> Result<u32, FreeError> {
    let mut i = head;
    let mut freed = 0;
    while freed < frags && i != NIL {
        if i >= c.count() {
            return Err(FreeError::BadLink(i));
        }
        // Read the link before freeing: afterwards the buffer may be reused.
        let next = c.next_chain(i).load(Relaxed);
        push(c, i, expected)?;
        freed += 1;
        i = next;
    }
    Ok(freed)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    use super::cells::Cells;

    const ME: Owner = Owner::Function(1);

    #[test]
    fn alloc_all_then_exhausted_then_free() {
        let c = Cells::new(4);
        let got: Vec<u32> = (0..4).map(|_| pop(&c, ME).unwrap()).collect();
        assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
        assert_eq!(c.free.load(Relaxed), 0);
        for &i in &got {
            assert_eq!(c.owner(i).load(Relaxed), ME.to_raw());
            push(&c, i, Some(ME)).unwrap();
        }
        assert_eq!(c.free.load(Relaxed), 4);
    }

    #[test]
    fn double_free_and_wrong_owner_are_refused_without_damage() {
        let c = Cells::new(2);
        let i = pop(&c, ME).unwrap();
        assert_eq!(push(&c, i, Some(Owner::Function(2))), Err(FreeError::NotOwner { index: i, owner: ME.to_raw() }));
        push(&c, i, Some(ME)).unwrap();
        assert_eq!(push(&c, i, Some(ME)), Err(FreeError::DoubleFree(i)));
        assert_eq!(push(&c, i, None), Err(FreeError::DoubleFree(i)));
        assert_eq!(push(&c, 9, None), Err(FreeError::OutOfRange(9)));
        // The list is intact: exactly two distinct buffers come out.
        let a = pop(&c, ME).unwrap();
        let b = pop(&c, ME).unwrap();
        assert_ne!(a, b);
        assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
    }

    #[test]
    fn corrupted_links_fail_allocation_not_memory() {
        let c = Cells::new(3);
        c.next_free(0).store(77, Relaxed);
        assert_eq!(pop(&c, ME), Ok(0));
        assert_eq!(pop(&c, ME), Err(AllocError::Corrupted(77)));
        c.head.store(pack(5, 1000), Relaxed);
        assert_eq!(pop(&c, ME), Err(AllocError::Corrupted(1000)));
    }

    #[test]
    fn chains_are_all_or_nothing() {
        let c = Cells::new(5);
        let h = pop_chain(&c, 3, ME).unwrap();
        assert_eq!(pop_chain(&c, 3, ME), Err(AllocError::Exhausted));
        assert_eq!(c.free.load(Relaxed), 2);
        assert_eq!(push_chain(&c, h, 3, Some(ME)), Ok(3));
        assert_eq!(c.free.load(Relaxed), 5);
    }

    #[test]
    fn threads_never_get_the_same_buffer() {
        let c = std::sync::Arc::new(Cells::new(64));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let me = Owner::Function(t);
                    for _ in 0..20_000 {
                        let a = pop(&*c, me).unwrap();
                        let b = pop(&*c, me).unwrap();
                        assert_ne!(a, b);
                        assert_eq!(c.owner(a).load(Relaxed), me.to_raw());
                        push(&*c, a, Some(me)).unwrap();
                        push(&*c, b, Some(me)).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(c.free.load(Relaxed), 64);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::model;
    use loom::sync::Arc;

    use super::cells::Cells;

    /// Two processes allocate and free concurrently, including the ABA
    /// pattern (pop A, pop B, push A while the other holds a stale head):
    /// no buffer is ever handed out twice and none is lost.
    #[test]
    fn concurrent_pop_push_is_exclusive_and_lossless() {
        model(|| {
            let c = Arc::new(Cells::new(3));
            let t: Vec<_> = (0..2u16)
                .map(|k| {
                    let c = c.clone();
                    loom::thread::spawn(move || {
                        let me = Owner::Function(k);
                        let a = pop(&*c, me).unwrap();
                        assert_eq!(c.owner(a).load(Relaxed), me.to_raw());
                        push(&*c, a, Some(me)).unwrap();
                        pop(&*c, me).unwrap()
                    })
                })
                .collect();
            let got: Vec<u32> = t.into_iter().map(|h| h.join().unwrap()).collect();
            assert_ne!(got[0], got[1]);
            let last = pop(&*c, Owner::Agent).unwrap();
            assert!(!got.contains(&last));
            assert_eq!(pop(&*c, Owner::Agent), Err(AllocError::Exhausted));
        });
    }
}

/// Allocator cells in ordinary memory, for the unit tests and (with
/// `--cfg loom`, through `crate::sync`) the loom models.
#[cfg(test)]
mod cells {
    use super::*;

    pub(crate) struct Cells {
        // Fields are pub(crate) for assertions in the tests.
        pub(crate) head: AtomicU64,
        pub(crate) free: AtomicU32,
        next_free: Vec<AtomicU32>,
        next_chain: Vec<AtomicU32>,
        owner: Vec<AtomicU32>,
    }

    impl Cells {
        pub(crate) fn new(n: u32) -> Self {
            let v = || (0..n).map(|_| AtomicU32::new(0)).collect();
            let c =
                Cells { head: AtomicU64::new(0), free: AtomicU32::new(0), next_free: v(), next_chain: v(), owner: v() };
            init(&c);
            c
        }
    }

    impl PoolCells for Cells {
        fn count(&self) -> u32 {
            self.owner.len() as u32
        }
        fn head(&self) -> &AtomicU64 {
            &self.head
        }
        fn free_count(&self) -> &AtomicU32 {
            &self.free
        }
        fn next_free(&self, i: u32) -> &AtomicU32 {
            &self.next_free[i as usize]
        }
        fn next_chain(&self, i: u32) -> &AtomicU32 {
            &self.next_chain[i as usize]
        }
        fn owner(&self, i: u32) -> &AtomicU32 {
            &self.owner[i as usize]
        }
    }
}
