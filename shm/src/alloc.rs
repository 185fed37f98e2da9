//! The cross-process buffer allocator. The owner word of each buffer
//! ([`wire::segment::BufMeta::owner`]) is the only record of whether it is
//! free: a process takes a free buffer with one compare-and-swap of that
//! word (free to itself) and gives it back with one (itself to free).
//! Beside the owner words, a bitmap of free hints (one bit per buffer, set
//! when the buffer may be free) lets a taker find a free buffer without
//! reading every owner word.
//!
//! **Crash safety.** Because one compare-and-swap both decides and records
//! who holds a buffer, a process killed at any instruction leaves each
//! buffer either free or recorded as its own; host-shimd returns the latter
//! with [`reclaim`](crate::Pool::reclaim). The hints are not a record: a
//! process killed between freeing a buffer and setting its hint leaves a
//! free buffer no taker looks at, until [`repair`](crate::Pool::repair) (host-shimd runs it after
//! every death) sets the hints of every free buffer again. (A free list
//! needs two writes per operation, the list and the owner, and a process
//! killed between them lost the buffer for good: a test that kills a
//! process in an allocation loop lost one in about half of the kills.)
//!
//! **ABA.** There is no list to corrupt and no head to reuse: a compare-and-
//! swap of an owner word that reads free is right whatever happened to the
//! buffer before.
//!
//! **A misbehaving process of the same tenant** can set or clear hints,
//! take free buffers, or write any owner word (the tenant is the trust
//! domain: it could write the buffers too); it cannot make a search reach
//! outside the pool or run without end: every index is checked against
//! the pool size, and a hint outside it is cleared. Hints it cleared hide
//! free buffers until a repair, which host-shimd also runs when its status
//! scan finds more free buffers than hints.
//!
//! **Search.** A taker starts at the hint word where it last found a buffer
//! (each process has its own cursor, so processes mostly work on different
//! words), takes the lowest hinted buffer whose owner word it can swap, and
//! moves on a word when none is left. A hint found stale (the buffer was
//! taken) is cleared. `Exhausted` means one pass over the hints found
//! nothing: a buffer freed behind the search during the pass may be missed
//! (the caller's next attempt finds it).
//!
//! The algorithm is written against `PoolCells` so the same code runs on a
//! pool segment ([`crate::Pool`]) and, under `--cfg loom`, on loom's model
//! atomics (see the loom tests at the end).

use crate::sync::{AtomicU32, AtomicU64};
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use wire::segment::{NIL, Owner};

/// The shared cells the allocator works on. `i < count()` is guaranteed by
/// the caller for every per-buffer accessor, `w < words()` for the hints.
pub(crate) trait PoolCells {
    /// Buffers in the pool.
    fn count(&self) -> u32;
    /// Free-hint word `w`: bit `b` stands for buffer `64 * w + b`.
    fn avail(&self, w: u32) -> &AtomicU64;
    /// Chain link of buffer `i`.
    fn next_chain(&self, i: u32) -> &AtomicU32;
    /// Owner of buffer `i`.
    fn owner(&self, i: u32) -> &AtomicU32;
    /// This process's search cursor (a hint word index; not shared).
    fn cursor(&self) -> &AtomicU32;
    /// A number that differs between processes and between the threads of
    /// one (where a search goes on from after losing a race).
    fn salt(&self) -> u32 {
        0
    }
    /// Hint words.
    fn words(&self) -> u32 {
        self.count().div_ceil(64)
    }
}

/// No buffer could be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// Every buffer is in use.
    #[error("pool exhausted")]
    Exhausted,
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
    /// The lease is of another pool (see [`crate::Pool::owns`]): its
    /// indices name other buffers in this one.
    #[error("the lease is of another pool")]
    ForeignLease,
}

impl FreeError {
    /// A short, stable, lowercase name (used as a metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::OutOfRange(_) => "out_of_range",
            Self::DoubleFree(_) => "double_free",
            Self::NotOwner { .. } => "not_owner",
            Self::BadLink(_) => "bad_link",
            Self::ForeignLease => "foreign_lease",
        }
    }
}

const FREE: u32 = Owner::Free.to_raw();

/// The bits of hint word `w` that stand for buffers of a pool of `n`.
fn in_pool(n: u32, w: u32) -> u64 {
    match n - 64 * w {
        64.. => u64::MAX,
        valid => (1 << valid) - 1,
    }
}

/// The hint word and bit of buffer `i`.
fn hint(i: u32) -> (u32, u64) {
    (i / 64, 1 << (i % 64))
}

/// Marks every buffer free. Only for a pool no one else has mapped yet.
pub(crate) fn init(c: &impl PoolCells) {
    let n = c.count();
    for i in 0..n {
        c.next_chain(i).store(NIL, Relaxed);
        c.owner(i).store(FREE, Relaxed);
    }
    for w in 0..c.words() {
        c.avail(w).store(in_pool(n, w), Relaxed);
    }
    // Whoever maps the pool afterwards gets the segment's fd from us over a
    // socket, which orders these stores before its first access.
}

/// Takes one free buffer and records `owner` as its owner.
#[inline]
pub(crate) fn pop(c: &impl PoolCells, owner: Owner) -> Result<u32, AllocError> {
    let mut got = NIL;
    match pop_n(c, 1, owner, &mut |i| got = i) {
        0 => Err(AllocError::Exhausted),
        _ => Ok(got),
    }
}

/// Takes up to `want` free buffers in one search of the pool, records
/// `owner` as their owner and hands each to `took`; returns how many. The
/// buffers taken from one hint word have their hints cleared together.
pub(crate) fn pop_n(c: &impl PoolCells, want: u32, owner: Owner, took: &mut impl FnMut(u32)) -> u32 {
    let words = c.words();
    let wrap = |w: u32| if w < words { w } else { w - words };
    let here = c.cursor().load(Relaxed);
    let here = if here < words { here } else { 0 };
    let (mut got, mut last) = (0, here);
    let (mut start, mut parted, mut k) = (here, false, 0);
    // From the cursor on, word by word.
    while k < words && got < want {
        let w = wrap(start + k);
        let (n, met) = take_from(c, w, owner, want - got, took);
        got += n;
        if n > 0 {
            last = w;
        } else if met && !parted {
            // Another process (or thread) took the buffers this search
            // wanted: search again, once, from a word that depends on the
            // searcher and where it met the other, so the two part instead
            // of moving on in step, each taking what the other wants.
            parted = true;
            (start, k) = ((w ^ c.salt()).wrapping_mul(0x9e37_79b9).rotate_right(13) % words, 0);
            continue;
        }
        k += 1;
    }
    // The cursor moves only when the search does (it is shared by the
    // process's threads).
    if last != here {
        c.cursor().store(last, Relaxed);
    }
    got
}

/// Takes up to `want` hinted buffers of hint word `w`; returns how many,
/// and whether it found hinted buffers others took first.
#[inline(always)]
fn take_from(c: &impl PoolCells, w: u32, owner: Owner, want: u32, took: &mut impl FnMut(u32)) -> (u32, bool) {
    let mut bits = c.avail(w).load(Relaxed);
    let (mut n, mut met, mut ours, mut stray) = (0, false, 0u64, 0u64);
    while bits != 0 && n < want {
        let b = bits.trailing_zeros();
        bits &= bits - 1;
        let (i, mask) = (64 * w + b, 1u64 << b);
        if i >= c.count() {
            // Only a misbehaving process sets a hint past the pool.
            stray |= mask;
        } else if claim(c, i, w, mask, owner) {
            ours |= mask;
            n += 1;
        } else {
            met = true;
        }
    }
    // The hints of what we took (ours now, so no one frees them before
    // this), together, and at once: a stale hint costs whoever reads it a
    // failed compare-and-swap.
    if ours | stray != 0 {
        c.avail(w).fetch_and(!(ours | stray), Relaxed);
    }
    while ours != 0 {
        took(64 * w + ours.trailing_zeros());
        ours &= ours - 1;
    }
    (n, met)
}

/// Tries to take buffer `i`, whose hint (`mask` in word `w`) was set.
#[inline(always)]
fn claim(c: &impl PoolCells, i: u32, w: u32, mask: u64, owner: Owner) -> bool {
    loop {
        // AcqRel on success: Acquire pairs with the Release of whoever
        // freed it (their payload writes are visible to us), Release so
        // host-shimd's reclaim scan (Acquire) sees the owner after we die.
        if c.owner(i).compare_exchange(FREE, owner.to_raw(), AcqRel, Relaxed).is_ok() {
            // (Its hint is cleared by the caller.)
            c.next_chain(i).store(NIL, Relaxed);
            return true;
        }
        // Taken by someone else: the hint is stale; clear it. The buffer
        // may have been freed again meanwhile, and its freer's hint cleared
        // by us: the Acquire of this clear pairs with the Release of that
        // freer's hint (which follows its owner write), so the load below
        // then sees the buffer free, and we try to take it ourselves.
        // Otherwise it is not free now, and its next free sets the hint
        // after our clear.
        c.avail(w).fetch_and(!mask, AcqRel);
        if c.owner(i).load(Acquire) != FREE {
            return false;
        }
    }
}

/// Frees buffer `i` if its recorded owner is `expected` (any owner when
/// `None`).
pub(crate) fn push(c: &impl PoolCells, i: u32, expected: Option<Owner>) -> Result<(), FreeError> {
    release(c, i, expected)?;
    // Release: pairs with a stale-hint clear (see `claim`).
    let (w, mask) = hint(i);
    c.avail(w).fetch_or(mask, Release);
    Ok(())
}

/// [`push`] without setting the hint: the caller sets it (with Release)
/// afterwards.
#[inline(always)]
fn release(c: &impl PoolCells, i: u32, expected: Option<Owner>) -> Result<(), FreeError> {
    if i >= c.count() {
        return Err(FreeError::OutOfRange(i));
    }
    // AcqRel: Acquire pairs with the owner store of whoever handed us the
    // buffer; Release orders our payload writes before the buffer can be
    // taken again.
    let prev = match expected {
        Some(o) => c.owner(i).compare_exchange(o.to_raw(), FREE, AcqRel, Acquire).unwrap_or_else(|cur| cur),
        None => c.owner(i).swap(FREE, AcqRel),
    };
    if prev == FREE {
        return Err(FreeError::DoubleFree(i));
    }
    if let Some(o) = expected
        && prev != o.to_raw()
    {
        return Err(FreeError::NotOwner { index: i, owner: prev });
    }
    Ok(())
}

/// Allocates `frags` buffers linked as a chain; returns the head. All or
/// nothing: on failure every buffer taken is returned.
#[cfg_attr(loom, allow(dead_code))] // used by `Pool`, which loom builds leave out
pub(crate) fn pop_chain(c: &impl PoolCells, frags: u32, owner: Owner) -> Result<u32, AllocError> {
    if frags == 1 {
        // The most frequent case, on the one-buffer path.
        return pop(c, owner);
    }
    let mut head = NIL;
    let got = pop_n(c, frags, owner, &mut |i| {
        c.next_chain(i).store(head, Relaxed);
        head = i;
    });
    if got < frags {
        // Best effort: the buffers were just taken by us and are linked
        // through `next_chain`, so this cannot fail unless another process
        // corrupts them meanwhile.
        let _ = push_chain(c, head, got, Some(owner));
        return Err(AllocError::Exhausted);
    }
    Ok(head)
}

/// Frees up to `frags` buffers following the chain from `head`; returns how
/// many were freed. Stops at the end of the chain, a bad link, or a buffer
/// that fails [`push`] (whose error is returned after the others were freed).
/// The hints of consecutive buffers in one hint word are set together.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn push_chain(c: &impl PoolCells, head: u32, frags: u32, expected: Option<Owner>) -> Result<u32, FreeError> {
    if frags == 1 && head != NIL {
        // As for `pop_chain`.
        if head >= c.count() {
            return Err(FreeError::BadLink(head));
        }
        return push(c, head, expected).map(|()| 1);
    }
    // Hints not yet set: (word, bits).
    let mut hints = (0, 0u64);
    let set = |(w, bits): (u32, u64)| {
        if bits != 0 {
            // Release: pairs with a stale-hint clear (see `claim`).
            c.avail(w).fetch_or(bits, Release);
        }
    };
    let mut i = head;
    let mut freed = 0;
    let r = loop {
        if freed == frags || i == NIL {
            break Ok(freed);
        }
        if i >= c.count() {
            break Err(FreeError::BadLink(i));
        }
        // Read the link before freeing: afterwards the buffer may be reused.
        let next = c.next_chain(i).load(Relaxed);
        if let Err(e) = release(c, i, expected) {
            break Err(e);
        }
        let (w, mask) = hint(i);
        if w != hints.0 {
            set(std::mem::replace(&mut hints, (w, 0)));
        }
        hints.1 |= mask;
        freed += 1;
        i = next;
    };
    set(hints);
    r
}

/// Sets the hint of every free buffer whose hint is clear; returns how many
/// it set. Safe at any time (a hint is only a hint); host-shimd runs it
/// after a death, for a buffer its process freed but had not yet hinted.
/// The count may include buffers a live process was about to hint.
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn repair(c: &impl PoolCells) -> u32 {
    let mut set = 0;
    for i in 0..c.count() {
        let (w, mask) = hint(i);
        if c.avail(w).load(Relaxed) & mask == 0
            && c.owner(i).load(Acquire) == FREE
            && c.avail(w).fetch_or(mask, Release) & mask == 0
        {
            set += 1;
        }
    }
    set
}

/// Free buffers, counted from the owner words (exact when nobody allocates
/// or frees meanwhile).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn free_count(c: &impl PoolCells) -> u32 {
    (0..c.count()).filter(|&i| c.owner(i).load(Relaxed) == FREE).count() as u32
}

/// Set free hints: a cheap estimate of the free buffers (a few more while
/// takers clear hints, fewer while freers set them or before a repair).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn hinted(c: &impl PoolCells) -> u32 {
    let n = c.count();
    (0..c.words()).map(|w| (c.avail(w).load(Relaxed) & in_pool(n, w)).count_ones()).sum()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    use super::cells::Cells;

    const ME: Owner = Owner::Function(1);

    #[test]
    fn alloc_all_then_exhausted_then_free() {
        for n in [1, 4, 63, 64, 65, 130] {
            let c = Cells::new(n);
            assert_eq!(hinted(&c), n);
            let mut got: Vec<u32> = (0..n).map(|_| pop(&c, ME).unwrap()).collect();
            assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
            assert_eq!((free_count(&c), hinted(&c)), (0, 0));
            got.sort_unstable();
            assert_eq!(got, (0..n).collect::<Vec<_>>(), "every buffer once");
            for &i in &got {
                assert_eq!(c.owner(i).load(Relaxed), ME.to_raw());
                push(&c, i, Some(ME)).unwrap();
            }
            assert_eq!((free_count(&c), hinted(&c)), (n, n));
        }
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
        // Intact: exactly two distinct buffers come out.
        let a = pop(&c, ME).unwrap();
        let b = pop(&c, ME).unwrap();
        assert_ne!(a, b);
        assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
    }

    /// Hints a misbehaving process writes can neither hand out a buffer
    /// that is not free nor reach outside the pool; clearing them hides
    /// free buffers only until a repair.
    #[test]
    fn forged_hints_never_hand_out_a_taken_buffer() {
        let c = Cells::new(3);
        let a = pop(&c, ME).unwrap();
        c.avail(0).store(u64::MAX, Relaxed); // every bit, 61 past the pool
        let mut got = vec![pop(&c, ME).unwrap(), pop(&c, ME).unwrap()];
        assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
        assert_eq!(c.avail(0).load(Relaxed), 0, "stale and out-of-pool hints were cleared");
        got.push(a);
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
        push(&c, a, Some(ME)).unwrap();
        c.avail(0).store(0, Relaxed); // hides the free buffer
        assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
        assert_eq!(repair(&c), 1);
        assert_eq!(pop(&c, ME), Ok(a));
    }

    /// A process killed between freeing a buffer (its owner word) and
    /// setting its hint: the buffer is free, and after a repair taken again.
    #[test]
    fn repair_brings_back_a_buffer_freed_without_its_hint() {
        let c = Cells::new(4);
        let got: Vec<u32> = (0..4).map(|_| pop(&c, ME).unwrap()).collect();
        c.owner(got[2]).store(FREE, Relaxed); // the first half of `push`
        assert_eq!((free_count(&c), hinted(&c)), (1, 0));
        assert_eq!(pop(&c, ME), Err(AllocError::Exhausted));
        assert_eq!(repair(&c), 1);
        assert_eq!(repair(&c), 0);
        assert_eq!(pop(&c, ME), Ok(got[2]));
    }

    #[test]
    fn chains_are_all_or_nothing() {
        let c = Cells::new(5);
        let h = pop_chain(&c, 3, ME).unwrap();
        assert_eq!(pop_chain(&c, 3, ME), Err(AllocError::Exhausted));
        assert_eq!(free_count(&c), 2);
        assert_eq!(push_chain(&c, h, 3, Some(ME)), Ok(3));
        assert_eq!(free_count(&c), 5);
    }

    /// One step of [`any_sequence_keeps_the_owner_words_the_record`].
    #[derive(Clone, Debug)]
    enum Op {
        /// Allocate a chain of `n` buffers as function `k`.
        Pop(u16, u32),
        /// Free the `i`-th held chain (modulo how many are held).
        Push(usize),
        /// Free a one-buffer chain as a process killed after the owner
        /// word, before the hint.
        DieInPush(usize),
        /// A misbehaving process writes a hint word.
        Forge(u32, u64),
        /// host-shimd's repair.
        Repair,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u16..3).prop_map(|k| Op::Pop(k, 1)),
            2 => (0u16..3, 2u32..12).prop_map(|(k, n)| Op::Pop(k, n)),
            4 => any::<usize>().prop_map(Op::Push),
            1 => any::<usize>().prop_map(Op::DieInPush),
            1 => (0u32..3, any::<u64>()).prop_map(|(w, v)| Op::Forge(w, v)),
            1 => Just(Op::Repair),
        ]
    }

    /// The buffers of the chain of `n` from `head`.
    fn chain(c: &Cells, head: u32, n: u32) -> Vec<u32> {
        let mut i = head;
        (0..n)
            .map(|_| {
                let b = i;
                i = c.next_chain(b).load(Relaxed);
                b
            })
            .collect()
    }

    fn allocs_and_frees() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0u16..3).prop_map(|k| Op::Pop(k, 1)),
            2 => (0u16..3, 2u32..40).prop_map(|(k, n)| Op::Pop(k, n)),
            4 => any::<usize>().prop_map(Op::Push),
        ]
    }

    proptest::proptest! {
        /// Whatever the sequence of allocations (single buffers and
        /// chains), frees, frees cut short and forged hints: a buffer is
        /// handed out only when free and to one holder at a time, the
        /// owner words count exactly the free buffers, an allocation fails
        /// only when too few free buffers are hinted, after a repair every
        /// free buffer is, and as long as no free was cut short and no hint
        /// forged, the hints are exactly the free buffers.
        #[test]
        fn any_sequence_keeps_the_owner_words_the_record(ops in proptest::collection::vec(op(), 1..200)) {
            sequence(ops)?;
        }

        /// Allocations and frees alone (chains up to 39 buffers, across
        /// hint words): after each, the hints are exactly the free buffers.
        #[test]
        fn allocations_and_frees_keep_the_hints_exact(ops in proptest::collection::vec(allocs_and_frees(), 1..200)) {
            sequence(ops)?;
        }
    }

    /// Runs `ops` on a pool of 130 buffers, checking as
    /// [`any_sequence_keeps_the_owner_words_the_record`] says.
    fn sequence(ops: Vec<Op>) -> Result<(), proptest::test_runner::TestCaseError> {
        const N: u32 = 130;
        let c = Cells::new(N);
        // (buffers of the chain, holder)
        let mut held: Vec<(Vec<u32>, Owner)> = Vec::new();
        let mut clean = true;
        let is_hinted = |c: &Cells, i: u32| {
            let (w, mask) = hint(i);
            c.avail(w).load(Relaxed) & mask != 0
        };
        let hinted_free = |c: &Cells| (0..N).filter(|&i| c.owner(i).load(Relaxed) == FREE && is_hinted(c, i)).count();
        for op in ops {
            match op {
                Op::Pop(k, n) => {
                    let me = Owner::Function(k);
                    let could = hinted_free(&c);
                    match pop_chain(&c, n, me) {
                        Ok(head) => {
                            let got = chain(&c, head, n);
                            for &i in &got {
                                proptest::prop_assert!(
                                    held.iter().all(|(b, _)| !b.contains(&i)),
                                    "{i} handed out twice"
                                );
                                proptest::prop_assert_eq!(got.iter().filter(|&&j| j == i).count(), 1);
                            }
                            held.push((got, me));
                        }
                        Err(AllocError::Exhausted) => {
                            proptest::prop_assert!(could < n as usize, "{could} hinted free buffers, {n} wanted")
                        }
                    }
                }
                Op::Push(k) if !held.is_empty() => {
                    let (b, o) = held.swap_remove(k % held.len());
                    proptest::prop_assert_eq!(push_chain(&c, b[0], b.len() as u32, Some(o)), Ok(b.len() as u32));
                }
                Op::DieInPush(k) if !held.is_empty() && held[k % held.len()].0.len() == 1 => {
                    let (b, _) = held.swap_remove(k % held.len());
                    c.owner(b[0]).store(FREE, Relaxed);
                    clean = false;
                }
                Op::Push(_) | Op::DieInPush(_) => {}
                Op::Forge(w, v) => {
                    c.avail(w).store(v, Relaxed);
                    clean = false;
                }
                Op::Repair => {
                    repair(&c);
                    let all_hinted = (0..N).all(|i| c.owner(i).load(Relaxed) != FREE || is_hinted(&c, i));
                    proptest::prop_assert!(all_hinted, "a free buffer without its hint after a repair");
                }
            }
            for (b, o) in &held {
                for &i in b {
                    proptest::prop_assert_eq!(c.owner(i).load(Relaxed), o.to_raw());
                }
            }
            let in_use: usize = held.iter().map(|(b, _)| b.len()).sum();
            proptest::prop_assert_eq!(free_count(&c), N - in_use as u32);
            if clean {
                let exact = (0..N).all(|i| (c.owner(i).load(Relaxed) == FREE) == is_hinted(&c, i));
                proptest::prop_assert!(exact, "hints other than the free buffers");
            }
        }
        Ok(())
    }

    /// Runs `body` on four threads at once (`t` = 0..4, each with its own
    /// search cursor) on a pool of 130 buffers; checks that afterwards
    /// every buffer is free and hinted, and returns what each returned.
    fn four_threads<R: Send + 'static>(body: fn(&cells::Cursor<'_>, &Cells, u32) -> R) -> Vec<R> {
        let c = std::sync::Arc::new(Cells::new(130));
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || body(&c.with_cursor(t * 2), &c, t))
            })
            .collect();
        let got = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!((free_count(&*c), hinted(&*c)), (130, 130));
        got
    }

    #[test]
    fn threads_never_get_the_same_buffer() {
        four_threads(|cells, c, t| {
            let me = Owner::Function(t as u16);
            for _ in 0..20_000 {
                let a = pop(cells, me).unwrap();
                let b = pop(cells, me).unwrap();
                assert_ne!(a, b);
                assert_eq!(c.owner(a).load(Relaxed), me.to_raw());
                push(cells, a, Some(me)).unwrap();
                push(cells, b, Some(me)).unwrap();
            }
        });
    }

    /// Threads taking and freeing chains of 1 to 30 buffers (across hint
    /// words) while the pool runs short: every buffer of a chain is the
    /// taker's alone until it frees it, and at the end the hints are
    /// exactly the free buffers.
    #[test]
    fn threads_taking_chains_never_share_a_buffer() {
        let exhausted: u32 = four_threads(|cells, c, t| {
            let me = Owner::Function(t as u16);
            let mut exhausted = 0;
            for k in 0..20_000u32 {
                let n = 1 + (k * 7 + t) % 30;
                let Ok(head) = pop_chain(cells, n, me) else {
                    exhausted += 1;
                    continue;
                };
                let mut i = head;
                for _ in 0..n {
                    assert_eq!(c.owner(i).load(Relaxed), me.to_raw(), "buffer {i} of a chain of {n}");
                    i = c.next_chain(i).load(Relaxed);
                }
                assert_eq!(push_chain(cells, head, n, Some(me)), Ok(n));
            }
            exhausted
        })
        .into_iter()
        .sum();
        assert!(exhausted < 4 * 20_000, "some chains were taken");
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::{UnsafeCell, model};
    use loom::sync::Arc;

    use super::cells::Cells;

    /// Runs `body` as two processes (`k` = 0 and 1) at once on a pool of
    /// `n` buffers, each buffer with a payload word loom checks for races;
    /// returns the pool and what each returned.
    fn two_processes<R: Send + 'static>(
        n: u32,
        body: fn(&Cells, &[UnsafeCell<u32>], u16) -> R,
    ) -> (Arc<Cells>, Vec<R>) {
        let c = Arc::new(Cells::new(n));
        let payload: Arc<Vec<UnsafeCell<u32>>> = Arc::new((0..n).map(|_| UnsafeCell::new(0)).collect());
        let t: Vec<_> = (0..2u16)
            .map(|k| {
                let (c, payload) = (c.clone(), payload.clone());
                loom::thread::spawn(move || body(&c, &payload, k))
            })
            .collect();
        let got = t.into_iter().map(|h| h.join().unwrap()).collect();
        (c, got)
    }

    /// Two processes take and free concurrently, including a stale hint
    /// (one frees a buffer while the other is between seeing its hint and
    /// swapping its owner word): no buffer is ever handed out twice, none
    /// is lost, every free buffer ends with its hint set, and what a holder
    /// wrote into a buffer is seen by the next (loom checks each payload
    /// access for a race).
    #[test]
    fn concurrent_pop_push_is_exclusive_and_lossless() {
        model(|| {
            let (c, got) = two_processes(3, |c, payload, k| {
                let me = Owner::Function(k);
                let a = pop(c, me).unwrap();
                assert_eq!(c.owner(a).load(Relaxed), me.to_raw());
                // SAFETY: buffer `a` is ours until the push.
                payload[a as usize].with_mut(|p| unsafe { *p = u32::from(k) + 1 });
                push(c, a, Some(me)).unwrap();
                let b = pop(c, me).unwrap();
                // SAFETY: buffer `b` is ours; its last holder's write must
                // be visible (and not race).
                let seen = payload[b as usize].with(|p| unsafe { *p });
                assert!(seen <= 2);
                b
            });
            assert_ne!(got[0], got[1]);
            assert_eq!(hinted(&*c), 1, "the one free buffer is hinted");
            let last = pop(&*c, Owner::Agent).unwrap();
            assert!(!got.contains(&last));
            assert_eq!(pop(&*c, Owner::Agent), Err(AllocError::Exhausted));
        });
    }

    /// Two processes take two-buffer chains from one hint word at once
    /// (the hints of what each took cleared together) and free them (the
    /// hints set together): the chains never share a buffer, and at the
    /// end every buffer is free and hinted.
    #[test]
    fn concurrent_chains_are_exclusive_and_hinted_again() {
        model(|| {
            let (c, _) = two_processes(4, |c, payload, k| {
                let me = Owner::Function(k);
                let head = pop_chain(c, 2, me).unwrap();
                let next = c.next_chain(head).load(Relaxed);
                for i in [head, next] {
                    assert_eq!(c.owner(i).load(Relaxed), me.to_raw());
                    // SAFETY: buffer `i` is ours until the free.
                    payload[i as usize].with_mut(|p| unsafe { *p = u32::from(k) + 1 });
                }
                assert_eq!(push_chain(c, head, 2, Some(me)), Ok(2));
            });
            assert_eq!((free_count(&*c), hinted(&*c)), (4, 4));
        });
    }

    /// One process takes the pool's only buffer and frees it while another
    /// sees its hint and races for it: the loser's stale-hint clear never
    /// hides the buffer once it is free again.
    #[test]
    fn a_stale_hint_clear_never_hides_a_freed_buffer() {
        model(|| {
            let c = Arc::new(Cells::new(1));
            let a = {
                let c = c.clone();
                loom::thread::spawn(move || {
                    if let Ok(i) = pop(&*c, Owner::Agent) {
                        push(&*c, i, Some(Owner::Agent)).unwrap();
                    }
                })
            };
            let b = {
                let c = c.clone();
                loom::thread::spawn(move || pop(&*c, Owner::Function(1)).ok())
            };
            a.join().unwrap();
            let took = b.join().unwrap();
            if took.is_some() {
                // The hint may still be set (B took the buffer between A's
                // owner write and A's hint): a stale hint, which the next
                // taker clears.
                assert_eq!(pop(&*c, Owner::Shimd), Err(AllocError::Exhausted));
                assert_eq!(hinted(&*c), 0);
            } else {
                assert_eq!(hinted(&*c), 1, "free, so hinted");
                assert_eq!(pop(&*c, Owner::Shimd), Ok(0));
            }
        });
    }
}

/// Allocator cells in ordinary memory, for the unit tests and (with
/// `--cfg loom`, through `crate::sync`) the loom models.
#[cfg(test)]
mod cells {
    use super::*;

    pub(crate) struct Cells {
        avail: Vec<AtomicU64>,
        next_chain: Vec<AtomicU32>,
        owner: Vec<AtomicU32>,
        cursor: AtomicU32,
    }

    impl Cells {
        pub(crate) fn new(n: u32) -> Self {
            let v = || (0..n).map(|_| AtomicU32::new(0)).collect();
            let c = Cells {
                avail: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                next_chain: v(),
                owner: v(),
                cursor: AtomicU32::new(0),
            };
            init(&c);
            c
        }

        /// The same cells as seen by another process (its own cursor).
        #[cfg(not(loom))]
        pub(crate) fn with_cursor(&self, w: u32) -> Cursor<'_> {
            Cursor(self, AtomicU32::new(w))
        }
    }

    impl PoolCells for Cells {
        fn count(&self) -> u32 {
            self.owner.len() as u32
        }
        fn avail(&self, w: u32) -> &AtomicU64 {
            &self.avail[w as usize]
        }
        fn next_chain(&self, i: u32) -> &AtomicU32 {
            &self.next_chain[i as usize]
        }
        fn owner(&self, i: u32) -> &AtomicU32 {
            &self.owner[i as usize]
        }
        fn cursor(&self) -> &AtomicU32 {
            &self.cursor
        }
    }

    #[cfg(not(loom))]
    pub(crate) struct Cursor<'a>(&'a Cells, AtomicU32);

    #[cfg(not(loom))]
    impl PoolCells for Cursor<'_> {
        fn count(&self) -> u32 {
            self.0.count()
        }
        fn avail(&self, w: u32) -> &AtomicU64 {
            self.0.avail(w)
        }
        fn next_chain(&self, i: u32) -> &AtomicU32 {
            self.0.next_chain(i)
        }
        fn owner(&self, i: u32) -> &AtomicU32 {
            self.0.owner(i)
        }
        fn cursor(&self) -> &AtomicU32 {
            &self.1
        }
    }
}
