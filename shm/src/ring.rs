//! Descriptor rings: a bounded multi-producer, single-consumer queue of
//! [`Descriptor`]s in shared memory (one per function instance: its inbound
//! ring, into which any function of the tenant and the agent push directly),
//! with batch push and pop, a sleep flag for the doorbell, and a closed flag
//! its creator sets when the consumer dies or when the creator itself stops
//! (then pushes fail, and the consumer's wait ends once the ring is empty).
//!
//! The algorithm is Dmitry Vyukov's bounded queue: every slot carries a lap
//! sequence number; a producer claims positions by advancing the shared tail
//! with a CAS after seeing the slot free for its lap, writes the descriptor,
//! then publishes the slot by storing `pos + 1` into its sequence. The
//! consumer takes slots in order while their sequence says "written for this
//! lap" and frees them for the next lap by storing `pos + capacity`.
//!
//! Robustness: the capacity is read once from the header when the ring is
//! opened and every slot index is masked with it, so no cursor or sequence
//! value written by a peer can make anyone access memory outside the ring.
//! Garbage in a slot is caught by the receiver's descriptor validation
//! (`Pool::accept`). A corrupted tail can at worst make the ring look full
//! or empty, which [`Ring::pending`] reports. The published head is
//! trusted by a single push (it avoids reading the slot line the consumer
//! spins on): a peer of the tenant that moves the head forward can make
//! producers overwrite descriptors not yet consumed (those messages are
//! lost) and leave the ring stalled. That stays inside the tenant, its
//! security domain; it never makes anyone access memory outside the ring.
//!
//! Doorbells: before sleeping the consumer sets the sleep flag, then checks
//! the ring once more; a producer, after publishing, checks the flag and
//! rings the doorbell only if it was set (and clears it, so one wake-up is
//! sent per sleep). Both sides put a `SeqCst` fence between their store and
//! their load, so one of them always sees the other (no lost wake-up).

use crate::sync::{AtomicU32, AtomicU64, fence};
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use wire::Descriptor;
use wire::segment::{RING_ABANDONED, RING_CONSUMER_GONE};

/// The shared cells of a ring. `slot < capacity()` for the slot accessors.
pub(crate) trait RingCells {
    /// Slots; a power of two, read once from the creator's header.
    fn capacity(&self) -> u32;
    /// Producers' tail.
    fn tail(&self) -> &AtomicU64;
    /// Consumer's head (published for producers' batch sizing).
    fn head(&self) -> &AtomicU64;
    /// This producer's last look at `head` (process-local, not shared: a
    /// lower bound of the real head, since the head only moves forward).
    fn head_seen(&self) -> &AtomicU64;
    /// Non-zero while the consumer sleeps on its doorbell.
    fn sleeping(&self) -> &AtomicU32;
    /// Non-zero once the ring is closed ([`wire::segment::RING_CONSUMER_GONE`]
    /// or [`wire::segment::RING_ABANDONED`]).
    fn closed(&self) -> &AtomicU32;
    /// Sequence of a slot.
    fn seq(&self, slot: u32) -> &AtomicU32;
    /// Writes the descriptor of a slot the caller claimed.
    fn write_desc(&self, slot: u32, d: &Descriptor);
    /// Reads the descriptor of a slot the caller may consume.
    fn read_desc(&self, slot: u32) -> Descriptor;
}

/// A push that could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingPushError {
    /// No free slot: the consumer is behind (back-pressure, retry later).
    #[error("ring full")]
    Full,
    /// The shared cursors contradict the slot sequences (a peer corrupted
    /// the ring): nothing was pushed.
    #[error("ring corrupted: tail and slot sequences disagree")]
    Corrupted,
    /// The consumer is gone (its function died): nothing was pushed, or
    /// the ring was closed while the push published (see
    /// [`Abandoned`](Self::Abandoned)).
    #[error("ring closed: the consumer is gone")]
    Closed,
    /// The ring's creator stopped (host-shimd exited cleanly): nothing
    /// pushed into any of its rings would be delivered. Nothing was
    /// pushed, or the flag was set while the push published: then what it
    /// published may be taken by nobody (or by a consumer still
    /// receiving), and the caller takes back the buffers nobody took.
    #[error("ring abandoned: host-shimd, which made it, stopped")]
    Abandoned,
}

/// Result of a successful push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Descriptors pushed (the first `count` of the batch).
    pub count: usize,
    /// The consumer was asleep: ring its doorbell.
    pub wake: bool,
}

fn slot_of(c: &impl RingCells, pos: u64) -> u32 {
    (pos & u64::from(c.capacity() - 1)) as u32
}

/// Whether slot `pos` is free for the lap of position `pos`.
fn free_for(c: &impl RingCells, pos: u64) -> bool {
    // Acquire: pairs with the consumer's Release store that freed the slot,
    // so its read of the old descriptor happens before our overwrite.
    c.seq(slot_of(c, pos)).load(Acquire) == pos as u32
}

/// Whether the consumer's head says slot `pos` is free for its lap (the
/// consumer has consumed `pos - cap`: its head, published after it freed
/// the slots before it, was at least this far when read). For a single
/// push, so it does not read the slot's sequence, a line the consumer may be
/// spinning on: it trusts this process's last look at the head, and looks
/// at the head again (once a lap) only when that is not enough.
fn lap_free_by_head(c: &impl RingCells, pos: u64, cap: u64) -> bool {
    // Acquire: pairs with the Release store below, made after an Acquire
    // load of the head (another thread of this process may have made it),
    // so the consumer's reads of the old descriptor happen before our write.
    if pos.wrapping_sub(c.head_seen().load(Acquire)) < cap {
        return true;
    }
    // Acquire: pairs with the consumer's Release publish of the head after
    // it read the descriptors it consumed.
    let head = c.head().load(Acquire);
    c.head_seen().store(head, Release);
    pos.wrapping_sub(head) < cap
}

/// The error for a ring whose closed flag is `closed` (non-zero).
fn closed_error(closed: u32) -> RingPushError {
    if closed == RING_ABANDONED { RingPushError::Abandoned } else { RingPushError::Closed }
}

/// Pushes up to `descs.len()` descriptors, in order; returns how many went
/// in (at least one) and whether to wake the consumer. Fails when the ring
/// is closed, before it pushes or once it has published (see
/// [`RingPushError::Abandoned`]).
pub(crate) fn push(c: &impl RingCells, descs: &[Descriptor]) -> Result<Pushed, RingPushError> {
    // Acquire: pairs with the Release store of `close` and `abandon`.
    match c.closed().load(Acquire) {
        0 => {}
        closed => return Err(closed_error(closed)),
    }
    if descs.is_empty() {
        return Ok(Pushed { count: 0, wake: false });
    }
    let cap = u64::from(c.capacity());
    let mut pos = c.tail().load(Relaxed);
    let want = descs.len() as u64;
    let n = loop {
        // A batch is sized from the consumer's published head (a hint; not
        // read for a single descriptor, so a one-at-a-time producer never
        // pulls the consumer's cache line) and checked on the last slot of
        // the batch: the consumer frees slots in order, so if the last one
        // is free for this lap, all before it are.
        let batch = if want > 1 {
            let head = c.head().load(Acquire);
            let room = cap.saturating_sub(pos.wrapping_sub(head)).min(want);
            if room > 1 && free_for(c, pos + room - 1) { room } else { 0 }
        } else {
            0
        };
        let n = if batch > 0 {
            batch
        } else if want == 1 && lap_free_by_head(c, pos, cap) {
            1
        } else {
            // One read of the slot's sequence decides (reading it twice let
            // a slot freed in between look like corruption).
            // Acquire: pairs with the consumer's Release store that freed
            // the slot, so its read of the old descriptor happens before
            // our overwrite.
            let seq = c.seq(slot_of(c, pos)).load(Acquire);
            match seq.wrapping_sub(pos as u32) as i32 {
                0 => 1,
                // Behind our lap: the consumer has not freed it yet.
                d if d < 0 => return Err(RingPushError::Full),
                // Ahead: another producer took `pos`, so the tail has moved
                // on (its CAS happened before the publish we just
                // acquired). A slot ahead of an unmoved tail cannot happen
                // in a healthy ring.
                _ => {
                    let cur = c.tail().load(Relaxed);
                    if cur == pos {
                        return Err(RingPushError::Corrupted);
                    }
                    pos = cur;
                    crate::sync::spin_hint();
                    continue;
                }
            }
        };
        // Relaxed is enough on the tail: slot ownership is handed over by
        // the sequence numbers, not by the tail.
        match c.tail().compare_exchange_weak(pos, pos + n, Relaxed, Relaxed) {
            Ok(_) => break n,
            Err(cur) => pos = cur,
        }
    };
    for k in 0..n {
        let slot = slot_of(c, pos + k);
        c.write_desc(slot, &descs[k as usize]);
        // Release: publishes the descriptor written just above to the
        // consumer's Acquire load of the sequence.
        c.seq(slot).store((pos + k + 1) as u32, Release);
    }
    // SeqCst fence between publishing and reading the closed and sleep
    // flags; pairs with the fence in `prepare_sleep` (no lost wake-up),
    // with the consumer's after it sees the ring closed (see below) and
    // with the one in `close` (host-shimd's snapshot after it).
    fence(SeqCst);
    // The ring may have been closed since the check above, and its
    // consumer may have stopped reading before it could see what was just
    // published. Relaxed, ordered by the fence above, which pairs with the
    // fence `Consumer::closed_wait` makes after it sees the flag and before
    // each of its last looks at the ring: either this load sees the flag
    // (the caller takes back what nobody took), or those looks see what
    // was published (and, through the tail, a slot before it that another
    // push claimed and has yet to publish, which they wait for). The sleep flag is left alone: host-shimd rings the
    // doorbell of a ring it abandons, and a closed ring's consumer is gone.
    match c.closed().load(Relaxed) {
        0 => {}
        closed => return Err(closed_error(closed)),
    }
    let wake = c.sleeping().load(Relaxed) != 0 && c.sleeping().swap(0, Relaxed) != 0;
    Ok(Pushed { count: n as usize, wake })
}

/// Pops up to `out.len()` ready descriptors in order, from position `*head`
/// (the consumer's private cursor); returns how many.
pub(crate) fn pop(c: &impl RingCells, head: &mut u64, out: &mut [Descriptor]) -> usize {
    let n = peek(c, *head, out);
    commit(c, head, n);
    n
}

/// Reads up to `out.len()` ready descriptors in order from position `head`
/// without consuming them; returns how many. [`commit`] consumes them.
pub(crate) fn peek(c: &impl RingCells, head: u64, out: &mut [Descriptor]) -> usize {
    let mut n = 0;
    while n < out.len() {
        let pos = head + n as u64;
        let slot = slot_of(c, pos);
        // Acquire: pairs with the producer's Release publish.
        if c.seq(slot).load(Acquire) != (pos + 1) as u32 {
            break;
        }
        out[n] = c.read_desc(slot);
        n += 1;
    }
    n
}

/// Consumes the `n` descriptors from `*head` that [`peek`] read: frees
/// their slots for the producers and publishes the new head.
pub(crate) fn commit(c: &impl RingCells, head: &mut u64, n: usize) {
    let cap = u64::from(c.capacity());
    for k in 0..n as u64 {
        let pos = *head + k;
        // Release: our read of the descriptor happens before a producer of
        // the next lap (Acquire in `free_for`) overwrites it.
        c.seq(slot_of(c, pos)).store((pos + cap) as u32, Release);
    }
    if n > 0 {
        *head += n as u64;
        // Release: pairs with the producers' Acquire load of the head hint.
        c.head().store(*head, Release);
    }
}

/// The published head, moved past the slots already consumed, and
/// published so: a consumer killed inside [`commit`], between freeing its
/// slots for the next lap and publishing the head, left a head at a slot
/// that will never read as written for its lap (the next consumer of a
/// ring that outlives its consumer, the agent's uplink, would wait there
/// forever, and the producers fill the lap and find it full). At most one
/// lap.
#[cfg(not(loom))] // host-shimd's repairs, not modelled
pub(crate) fn recover_head(c: &impl RingCells) -> u64 {
    // Acquire: pairs with the consumer's Release publish of the head.
    let published = c.head().load(Acquire);
    let mut head = published;
    for _ in 0..c.capacity() {
        // Acquire: pairs with the consumer's Release free (and a next
        // lap's producer's publish), as in `peek`.
        let lap = c.seq(slot_of(c, head)).load(Acquire).wrapping_sub(head as u32);
        // Freed for the next lap, or already written for it: consumed.
        if lap != c.capacity() && lap != c.capacity() + 1 {
            break;
        }
        head += 1;
    }
    if head != published {
        // Release: as `commit`'s publish.
        c.head().store(head, Release);
    }
    head
}

/// Positions between the published head and the tail that a producer
/// claimed (the tail moved past them) but has not published: a producer
/// killed between its claim and its publish leaves such a hole, at which
/// the consumer would wait forever.
#[cfg(not(loom))] // host-shimd's repairs, not modelled
pub(crate) fn unpublished(c: &impl RingCells) -> Vec<u64> {
    // Acquire on each sequence: pairs with the consumer's Release free.
    claimed(c).filter(|&pos| c.seq(slot_of(c, pos)).load(Acquire) == pos as u32).collect()
}

/// The positions producers have claimed and the consumer has not
/// consumed: from the published head to the tail, at most one lap (a
/// corrupted cursor cannot make a walk longer).
fn claimed(c: &impl RingCells) -> std::ops::Range<u64> {
    // Acquire: pairs with the consumer's Release publish of the head.
    let head = c.head().load(Acquire);
    let tail = c.tail().load(Relaxed);
    head..head.wrapping_add(tail.wrapping_sub(head).min(u64::from(c.capacity())))
}

/// The descriptors published between the head and the producers' tail,
/// in order, skipping slots claimed and not yet published (at most one
/// lap). A slot consumed and reused while this walks yields the newer
/// descriptor: it may name more than is waiting, never less.
pub(crate) fn published(c: &impl RingCells) -> Vec<Descriptor> {
    claimed(c)
        .filter_map(|pos| {
            let slot = slot_of(c, pos);
            // Acquire: pairs with the producer's Release publish.
            (c.seq(slot).load(Acquire) == (pos + 1) as u32).then(|| c.read_desc(slot))
        })
        .collect()
}

/// Marks the consumer gone (see `Ring::close`).
pub(crate) fn close(c: &impl RingCells) {
    // Release: pairs with the Acquire check at the start of `push`.
    c.closed().store(RING_CONSUMER_GONE, Release);
    // SeqCst fence between closing and any later look at the ring (the
    // snapshot host-shimd takes at a death, `published`); pairs with the
    // fence in `push` between its publish and its second look at the flag:
    // either that look sees the close (its sender takes its message back),
    // or the later looks here see what it published. Without it the two
    // could both miss (a store then a load of other locations may be
    // reordered), and a push its sender counts as done was in no snapshot.
    fence(SeqCst);
}

/// Publishes `void` at position `pos` if that slot is still claimed and
/// unpublished; returns whether it did.
#[cfg(not(loom))] // host-shimd's repairs, not modelled
pub(crate) fn fill_void(c: &impl RingCells, pos: u64, void: &Descriptor) -> bool {
    let slot = slot_of(c, pos);
    if c.seq(slot).load(Acquire) != pos as u32 {
        return false;
    }
    c.write_desc(slot, void);
    // Release: publishes the descriptor, as a producer's publish does.
    c.seq(slot).compare_exchange(pos as u32, (pos + 1) as u32, Release, Relaxed).is_ok()
}

/// Whether the slot at `head` is ready to pop.
pub(crate) fn ready(c: &impl RingCells, head: u64) -> bool {
    c.seq(slot_of(c, head)).load(Acquire) == (head + 1) as u32
}

/// Announces that the consumer is about to sleep; returns `false` (and
/// clears the flag) when work arrived meanwhile, so it must not sleep.
pub(crate) fn prepare_sleep(c: &impl RingCells, head: u64) -> bool {
    c.sleeping().store(1, Relaxed);
    // SeqCst fence between setting the flag and checking the ring; pairs
    // with the fence in `push`.
    fence(SeqCst);
    if ready(c, head) {
        c.sleeping().store(0, Relaxed);
        return false;
    }
    true
}

/// The consumer is awake again.
#[cfg_attr(loom, allow(dead_code))] // used by `Consumer`, which loom builds leave out
pub(crate) fn end_sleep(c: &impl RingCells) {
    c.sleeping().store(0, Relaxed);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::cells::Cells;
    use super::*;
    use std::sync::Arc;

    fn d(request: u32) -> Descriptor {
        Descriptor { request, ..Default::default() }
    }

    #[test]
    fn fifo_batches_full_and_wrap() {
        let c = Cells::new(4);
        let mut head = 0;
        let mut out = [Descriptor::default(); 8];
        assert_eq!(pop(&c, &mut head, &mut out), 0);
        assert_eq!(push(&c, &[d(1), d(2), d(3)]).unwrap().count, 3);
        assert_eq!(push(&c, &[d(4), d(5)]).unwrap().count, 1);
        assert_eq!(push(&c, &[d(6)]), Err(RingPushError::Full));
        assert_eq!(pop(&c, &mut head, &mut out[..2]), 2);
        assert_eq!((out[0].request, out[1].request), (1, 2));
        // Wraps around the end of the slot array.
        assert_eq!(push(&c, &[d(5), d(6), d(7)]).unwrap().count, 2);
        let n = pop(&c, &mut head, &mut out);
        let got: Vec<u32> = out[..n].iter().map(|d| d.request).collect();
        assert_eq!(got, [3, 4, 5, 6]);
    }

    /// The closed flag says why: an abandoned ring (its creator stopped)
    /// is told apart from a consumer gone, and any other non-zero value
    /// counts as a consumer gone.
    #[test]
    fn a_closed_ring_says_whether_it_was_abandoned() {
        let c = Cells::new(4);
        c.closed.store(wire::segment::RING_ABANDONED, Relaxed);
        assert_eq!(push(&c, &[d(1)]), Err(RingPushError::Abandoned));
        c.closed.store(wire::segment::RING_CONSUMER_GONE, Relaxed);
        assert_eq!(push(&c, &[d(1)]), Err(RingPushError::Closed));
        c.closed.store(7, Relaxed);
        assert_eq!(push(&c, &[d(1)]), Err(RingPushError::Closed));
        c.closed.store(0, Relaxed);
        assert_eq!(push(&c, &[d(1)]).map(|p| p.count), Ok(1));
    }

    /// Cells whose ring gets closed with `how` while a push writes its
    /// descriptors: after the push's first look at the flag, before it
    /// publishes (as when host-shimd stops just then).
    struct ClosedWhilePushing {
        cells: Cells,
        how: u32,
    }

    impl RingCells for ClosedWhilePushing {
        fn capacity(&self) -> u32 {
            self.cells.capacity()
        }
        fn tail(&self) -> &AtomicU64 {
            self.cells.tail()
        }
        fn head(&self) -> &AtomicU64 {
            self.cells.head()
        }
        fn head_seen(&self) -> &AtomicU64 {
            self.cells.head_seen()
        }
        fn sleeping(&self) -> &AtomicU32 {
            self.cells.sleeping()
        }
        fn closed(&self) -> &AtomicU32 {
            self.cells.closed()
        }
        fn seq(&self, slot: u32) -> &AtomicU32 {
            self.cells.seq(slot)
        }
        fn write_desc(&self, slot: u32, d: &Descriptor) {
            self.cells.write_desc(slot, d);
            self.cells.closed.store(self.how, Relaxed);
        }
        fn read_desc(&self, slot: u32) -> Descriptor {
            self.cells.read_desc(slot)
        }
    }

    /// A push that publishes into a ring closed after its first look at
    /// the flag fails as one that found it closed (`Abandoned`, `Closed`),
    /// so its caller takes back what nobody took, and leaves the sleep
    /// flag alone (host-shimd rings the doorbell of a ring it abandons).
    /// Before, it returned `Ok`: what it published could be left in a
    /// ring its consumer had already stopped reading, without a word.
    #[test]
    fn a_push_into_a_ring_closed_meanwhile_says_so() {
        for (how, e) in [
            (wire::segment::RING_ABANDONED, RingPushError::Abandoned),
            (wire::segment::RING_CONSUMER_GONE, RingPushError::Closed),
        ] {
            for batch in [&[d(1)][..], &[d(1), d(2), d(3)]] {
                let c = ClosedWhilePushing { cells: Cells::new(4), how };
                c.cells.sleeping.store(1, Relaxed);
                assert_eq!(push(&c, batch), Err(e), "{how} {}", batch.len());
                assert_eq!(c.cells.sleeping.load(Relaxed), 1);
            }
        }
    }

    #[test]
    fn wake_only_a_sleeper_and_only_once() {
        let c = Cells::new(8);
        let mut head = 0;
        assert!(!push(&c, &[d(1)]).unwrap().wake);
        // Work is pending: the consumer must not go to sleep.
        assert!(!prepare_sleep(&c, head));
        let mut out = [Descriptor::default(); 8];
        pop(&c, &mut head, &mut out);
        assert!(prepare_sleep(&c, head));
        assert!(push(&c, &[d(2)]).unwrap().wake);
        assert!(!push(&c, &[d(3)]).unwrap().wake);
        end_sleep(&c);
    }

    #[test]
    fn a_claimed_unpublished_slot_is_found_and_voided_once() {
        let c = Cells::new(4);
        let mut head = 0;
        let mut out = [Descriptor::default(); 4];
        push(&c, &[d(1)]).unwrap();
        pop(&c, &mut head, &mut out);
        // A producer claims position 1 and dies; another pushes behind it.
        c.tail.store(2, Relaxed);
        push(&c, &[d(3)]).unwrap();
        assert_eq!(unpublished(&c), [1]);
        let behind: Vec<u32> = published(&c).iter().map(|x| x.request).collect();
        assert_eq!(behind, [3], "what waits behind the hole is seen");
        assert_eq!(pop(&c, &mut head, &mut out), 0, "the hole blocks the consumer");
        let void = Descriptor::void(0);
        assert!(fill_void(&c, 1, &void));
        assert!(!fill_void(&c, 1, &void), "published once");
        assert!(!fill_void(&c, 2, &void), "a published slot is left alone");
        assert!(unpublished(&c).is_empty());
        assert_eq!(published(&c).len(), 2);
        assert_eq!(pop(&c, &mut head, &mut out), 2);
        assert_eq!((out[0], out[1].request), (void, 3));
        assert!(published(&c).is_empty());
        // Consumed slots are not holes either.
        assert!(unpublished(&c).is_empty());
        assert!(!fill_void(&c, 1, &void));
    }

    #[test]
    fn corrupted_cursors_make_it_look_full_or_empty_not_crash() {
        let c = Cells::new(4);
        let mut head = 0;
        c.tail.store(u64::MAX - 1, Relaxed);
        assert_eq!(push(&c, &[d(1)]), Err(RingPushError::Corrupted));
        c.tail.store(2, Relaxed);
        c.seq[2].store(u32::MAX, Relaxed); // behind its lap
        // The head says the lap is free: a single push trusts it and
        // overwrites the lying sequence.
        assert_eq!(push(&c, &[d(1)]).map(|p| p.count), Ok(1));
        // Once the head says the lap may not be free, the sequence decides:
        // behind its lap looks full.
        c.tail.store(6, Relaxed);
        c.seq[2].store(u32::MAX, Relaxed);
        assert_eq!(push(&c, &[d(1)]), Err(RingPushError::Full));
        c.tail.store(2, Relaxed);
        c.seq[0].store(1, Relaxed); // a lying sequence: slot 0 "written"
        let mut out = [Descriptor::default(); 4];
        assert_eq!(pop(&c, &mut head, &mut out), 1); // garbage, caught by validation upstream
    }

    #[test]
    fn producers_threads_lose_and_duplicate_nothing() {
        let c = Arc::new(Cells::new(64));
        let per = 50_000u32;
        let producers: Vec<_> = (0..3u32)
            .map(|p| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut i = 0;
                    while i < per {
                        let batch: Vec<Descriptor> = (i..(i + 5).min(per))
                            .map(|k| Descriptor { src_fn: p as u16, request: k, ..Default::default() })
                            .collect();
                        match push(&*c, &batch) {
                            Ok(r) => i += r.count as u32,
                            Err(RingPushError::Full) => std::thread::yield_now(),
                            Err(e) => panic!("healthy ring reported {e}"),
                        }
                    }
                })
            })
            .collect();
        let mut next = [0u32; 3];
        let mut head = 0;
        let mut out = [Descriptor::default(); 16];
        while next.iter().sum::<u32>() < 3 * per {
            let n = pop(&*c, &mut head, &mut out);
            for d in &out[..n] {
                assert_eq!(d.request, next[d.src_fn as usize], "order per producer");
                next[d.src_fn as usize] += 1;
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(pop(&*c, &mut head, &mut out), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::model;
    use loom::sync::Arc;

    use super::cells::Cells;

    /// Two producers push concurrently with the consumer popping, on a
    /// ring that has already wrapped once (slots on their second lap):
    /// every descriptor arrives exactly once, in order per producer, and
    /// loom finds no data race on the slots. (Bounded: no retry loops, so
    /// the model stays finite.)
    #[test]
    fn two_producers_one_consumer() {
        model(|| {
            let c = Arc::new(Cells::new(2));
            let mut head = 0;
            let mut out = [Descriptor::default(); 2];
            // First lap, single-threaded: fill and drain.
            push(&*c, &[Descriptor::default(), Descriptor::default()]).unwrap();
            assert_eq!(pop(&*c, &mut head, &mut out), 2);
            let ps: Vec<_> = (0..2u16)
                .map(|p| {
                    let c = c.clone();
                    loom::thread::spawn(move || {
                        let d = Descriptor { src_fn: p, request: 7, ..Default::default() };
                        assert_eq!(push(&*c, &[d]).unwrap().count, 1);
                    })
                })
                .collect();
            let mut got = pop(&*c, &mut head, &mut out[..1]);
            let first = out[0];
            for p in ps {
                p.join().unwrap();
            }
            let mut rest = [Descriptor::default(); 2];
            let more = pop(&*c, &mut head, &mut rest);
            got += more;
            assert_eq!(got, 2);
            let mut srcs: Vec<u16> = rest[..more].iter().map(|d| d.src_fn).collect();
            if got - more == 1 {
                srcs.push(first.src_fn);
            }
            srcs.sort_unstable();
            assert_eq!(srcs, [0, 1]);
        });
    }

    /// A producer pushing into a full ring while the consumer frees a slot
    /// sees "full" or succeeds, never "corrupted" (a slot freed between
    /// two reads of its sequence once looked like corruption).
    #[test]
    fn full_ring_racing_a_pop_is_never_corrupted() {
        model(|| {
            let c = Arc::new(Cells::new(2));
            push(&*c, &[Descriptor::default(), Descriptor::default()]).unwrap();
            let p = {
                let c = c.clone();
                loom::thread::spawn(move || push(&*c, &[Descriptor::default()]))
            };
            let mut head = 0;
            let mut out = [Descriptor::default(); 1];
            assert_eq!(pop(&*c, &mut head, &mut out), 1);
            let r = p.join().unwrap();
            assert!(matches!(r, Ok(_) | Err(RingPushError::Full)), "{r:?}");
        });
    }

    /// The sleep handshake: a consumer that decides to sleep is always
    /// woken by a producer that publishes meanwhile.
    #[test]
    fn no_lost_wakeup() {
        model(|| {
            let c = Arc::new(Cells::new(2));
            let p = {
                let c = c.clone();
                loom::thread::spawn(move || push(&*c, &[Descriptor::default()]).unwrap().wake)
            };
            let slept = prepare_sleep(&*c, 0);
            let woke = p.join().unwrap();
            // If the consumer went to sleep, the producer must ring.
            if slept {
                assert!(woke);
            }
        });
    }

    /// host-shimd at a function's death: it closes the ring, then takes a
    /// snapshot of what waits in it (the calls it answers later). A push
    /// racing the close either fails (its sender takes its message back)
    /// or is in the snapshot: never both missed, or a call its sender
    /// counts as delivered would be in no snapshot, its buffers freed
    /// with the dead function's, and its caller never answered.
    #[test]
    fn a_push_the_close_does_not_stop_is_in_the_snapshot_after_it() {
        model(|| {
            let c = Arc::new(Cells::new(2));
            let p = {
                let c = c.clone();
                loom::thread::spawn(move || push(&*c, &[Descriptor { request: 7, ..Default::default() }]).is_ok())
            };
            close(&*c);
            let seen = published(&*c).iter().any(|d| d.request == 7);
            let pushed = p.join().unwrap();
            assert!(seen || !pushed, "the push succeeded and the snapshot after the close missed it");
        });
    }
}

/// Ring cells in ordinary memory, for the unit tests and (with
/// `--cfg loom`, through `crate::sync`) the loom models.
#[cfg(test)]
mod cells {
    use super::*;
    use crate::sync::UnsafeCell;

    pub(crate) struct Cells {
        pub(crate) tail: AtomicU64,
        pub(crate) head: AtomicU64,
        head_seen: AtomicU64,
        pub(crate) sleeping: AtomicU32,
        pub(crate) closed: AtomicU32,
        pub(crate) seq: Vec<AtomicU32>,
        desc: Vec<UnsafeCell<Descriptor>>,
    }
    // SAFETY: each descriptor cell is written only by the producer that
    // claimed its slot and read only by the consumer after the Release/
    // Acquire handshake on `seq` (the algorithm under test; loom checks it).
    unsafe impl Sync for Cells {}
    // SAFETY: as above; the cells own plain data.
    unsafe impl Send for Cells {}

    impl Cells {
        pub(crate) fn new(cap: u32) -> Self {
            Cells {
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
                head_seen: AtomicU64::new(0),
                sleeping: AtomicU32::new(0),
                closed: AtomicU32::new(0),
                seq: (0..cap).map(AtomicU32::new).collect(),
                desc: (0..cap).map(|_| UnsafeCell::new(Descriptor::default())).collect(),
            }
        }
    }

    impl RingCells for Cells {
        fn capacity(&self) -> u32 {
            self.seq.len() as u32
        }
        fn tail(&self) -> &AtomicU64 {
            &self.tail
        }
        fn head(&self) -> &AtomicU64 {
            &self.head
        }
        fn head_seen(&self) -> &AtomicU64 {
            &self.head_seen
        }
        fn sleeping(&self) -> &AtomicU32 {
            &self.sleeping
        }
        fn closed(&self) -> &AtomicU32 {
            &self.closed
        }
        fn seq(&self, slot: u32) -> &AtomicU32 {
            &self.seq[slot as usize]
        }
        fn write_desc(&self, slot: u32, d: &Descriptor) {
            // SAFETY: the caller claimed `slot` (see `Sync` above).
            self.desc[slot as usize].with_mut(|p| unsafe { *p = *d });
        }
        fn read_desc(&self, slot: u32) -> Descriptor {
            // SAFETY: the slot was published to the consumer (see `Sync`).
            self.desc[slot as usize].with(|p| unsafe { *p })
        }
    }
}

#[cfg(not(loom))]
pub use segment::{CLAIMED_WAIT, Consumer, Doorbell, Ring, RingOpenError, Wait};

#[cfg(not(loom))]
mod segment {
    use super::{Pushed, RingCells, RingPushError};
    use crate::region::{AccessError, PagePolicy, Region, RegionError};
    use core::mem::offset_of;
    use core::ptr::NonNull;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::sync::atomic::{AtomicU32, AtomicU64};
    use std::time::{Duration, Instant};
    use wire::Descriptor;
    use wire::segment::{
        RING_ABANDONED, RING_CONSUMER_OFFSET, RING_PRODUCER_OFFSET, RING_SLOT_DESC_OFFSET, RingCursor, RingHeader,
        RingLayout, RingSlot, SegmentError,
    };

    /// A ring could not be created or opened.
    #[derive(Debug, thiserror::Error)]
    pub enum RingOpenError {
        /// Mapping failed.
        #[error(transparent)]
        Region(#[from] RegionError),
        /// The segment is not a usable ring of this version.
        #[error("ring segment: {0}")]
        Segment(#[from] SegmentError),
        /// The header could not be read.
        #[error("ring segment: {0}")]
        Access(#[from] AccessError),
    }

    /// A descriptor ring mapped into this process. Any process of the
    /// tenant (and the agent) may push; one [`Consumer`] pops.
    #[derive(Debug)]
    pub struct Ring {
        region: Region,
        layout: RingLayout,
        header: RingHeader,
        ptrs: Ptrs,
        /// This process's last look at the consumer's head (see `push`).
        head_seen: std::sync::atomic::AtomicU64,
    }

    /// Addresses of the shared fields, resolved and checked once at open
    /// so the hot path does no bounds arithmetic. They point into
    /// `Ring::region`, which lives as long as the `Ring`.
    #[derive(Debug)]
    struct Ptrs {
        tail: NonNull<AtomicU64>,
        head: NonNull<AtomicU64>,
        sleeping: NonNull<AtomicU32>,
        closed: NonNull<AtomicU32>,
        slots: NonNull<u8>,
        mask: u32,
    }

    // SAFETY: the pointers target the shared mapping owned by the same
    // `Ring`; they are only used for atomics and volatile copies, which any
    // thread may perform.
    unsafe impl Send for Ptrs {}
    // SAFETY: as above.
    unsafe impl Sync for Ptrs {}

    impl Ptrs {
        /// Resolves every address through the checked accessors of
        /// `Region` (bounds and alignment), once.
        fn resolve(region: &Region, layout: &RingLayout) -> Result<Self, AccessError> {
            let at64 = |off: u64| region.atomic_u64(off).map(NonNull::from);
            let at32 = |off: u64| region.atomic_u32(off).map(NonNull::from);
            let prod = |f: usize| RING_PRODUCER_OFFSET + f as u64;
            // The whole slot array must be inside the mapping: check its
            // last byte, and the 4-alignment of slot 0 (slots are 32 B).
            let last = layout.slot_offset(u64::from(layout.capacity - 1)) + size_of::<RingSlot>() as u64 - 1;
            region.read::<u8>(last)?;
            let slot0 = region.atomic_u32(layout.slot_offset(0))?;
            Ok(Self {
                tail: at64(prod(offset_of!(RingCursor, pos)))?,
                head: at64(RING_CONSUMER_OFFSET + offset_of!(RingCursor, pos) as u64)?,
                // The sleep and closed flags are read on every push: they
                // live on the producers' line, not beside the head that the
                // consumer writes on every pop.
                sleeping: at32(prod(offset_of!(RingCursor, sleeping)))?,
                closed: at32(prod(offset_of!(RingCursor, closed)))?,
                slots: NonNull::from(slot0).cast(),
                mask: layout.capacity - 1,
            })
        }

        fn slot(&self, slot: u32) -> NonNull<u8> {
            // The mask keeps the index inside the checked slot array.
            let i = (slot & self.mask) as usize;
            // SAFETY: `i < capacity`, and slots 0..capacity lie inside the
            // mapping (checked in `resolve`).
            unsafe { self.slots.add(i * size_of::<RingSlot>()) }
        }

        fn desc(&self, slot: u32) -> *mut Descriptor {
            // SAFETY: `RING_SLOT_DESC_OFFSET` + 28 <= 32 bytes of the slot,
            // which lies inside the checked array (`slot`); the offset is 4
            // and slots are 32-byte multiples from a 4-aligned start, so the
            // descriptor (align 4) is aligned.
            unsafe { self.slot(slot).add(RING_SLOT_DESC_OFFSET) }.cast::<Descriptor>().as_ptr()
        }
    }

    impl Ring {
        /// Creates an empty ring of `capacity` slots consumed by function
        /// `owner_fn` in attach slot `owner_slot`.
        pub fn create(
            name: &str,
            capacity: u32,
            tenant: u16,
            owner_fn: u16,
            owner_slot: u32,
        ) -> Result<Self, RingOpenError> {
            let layout = RingLayout::new(capacity)?;
            let len = usize::try_from(layout.total_len).map_err(|_| RegionError::Invalid("ring too large"))?;
            let region = Region::create(name, len, PagePolicy::Normal)?;
            let header = RingHeader::new(&layout, tenant, owner_fn, owner_slot);
            region.write(0, header)?;
            let ptrs = Ptrs::resolve(&region, &layout)?;
            let ring = Self { region, layout, header, ptrs, head_seen: Default::default() };
            for slot in 0..capacity {
                // Slot k starts free for lap 0 (sequence k).
                ring.seq(slot).store(slot, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(ring)
        }

        /// Maps a ring received from its creator; the header is read once
        /// and checked, and only this local copy is used afterwards.
        pub fn open(fd: OwnedFd) -> Result<Self, RingOpenError> {
            let region = Region::open(fd)?;
            let header: RingHeader = region.read(0)?;
            let layout = header.check(region.len() as u64)?;
            let ptrs = Ptrs::resolve(&region, &layout)?;
            // Zero: the first push looks at the real head.
            Ok(Self { region, layout, header, ptrs, head_seen: Default::default() })
        }

        /// The header as read at open.
        pub fn header(&self) -> &RingHeader {
            &self.header
        }

        /// The ring's memfd (to pass to another process).
        pub fn fd(&self) -> BorrowedFd<'_> {
            self.region.fd()
        }

        /// Pushes a batch (see [`Pushed`]); ring the consumer's doorbell
        /// when `wake` is set.
        pub fn push(&self, descs: &[Descriptor]) -> Result<Pushed, RingPushError> {
            super::push(self, descs)
        }

        /// Descriptors pushed but not yet popped (from the shared cursors;
        /// a value above the capacity means a peer corrupted them).
        pub fn pending(&self) -> u64 {
            use std::sync::atomic::Ordering::Relaxed;
            self.tail().load(Relaxed).wrapping_sub(self.head().load(Relaxed))
        }

        /// Positions claimed by a producer and not published (see
        /// [`Ring::fill_void`]): for the ring's creator, after a producer
        /// died.
        pub fn unpublished(&self) -> Vec<u64> {
            super::unpublished(self)
        }

        /// Publishes a void descriptor at position `pos` if it is still
        /// claimed and unpublished, so the consumer drops it (counted as
        /// `void`) and moves on; returns whether it did. For host-shimd,
        /// a grace period after a producer died, on the positions
        /// [`unpublished`](Self::unpublished) gave at its death: a live
        /// producer publishes within nanoseconds of its claim.
        pub fn fill_void(&self, pos: u64) -> bool {
            super::fill_void(self, pos, &Descriptor::void(self.header.tenant))
        }

        /// The descriptors published and not yet consumed, in order (a
        /// snapshot, without consuming them; at most one lap), including
        /// those behind a slot claimed and never published, which the
        /// consumer cannot reach yet.
        pub fn waiting(&self) -> Vec<Descriptor> {
            super::published(self)
        }

        /// Marks the consumer gone: every later push fails with
        /// [`RingPushError::Closed`] (host-shimd, when the function dies).
        /// A push racing it either fails or is seen by every look at the
        /// ring after it ([`waiting`](Self::waiting)).
        pub fn close(&self) {
            super::close(self)
        }

        /// Marks the ring abandoned by its creator: every later push fails
        /// with [`RingPushError::Abandoned`], and the consumer's waits end
        /// once it is empty ([`Wait::Closed`]; ring its doorbell too, for a
        /// consumer asleep). For host-shimd when it stops cleanly: nothing
        /// pushed from now on would be delivered. A push already past its
        /// first check of the flag publishes, then sees the flag and fails
        /// as well, unless the consumer's wait, which looks at the ring
        /// again after it sees the flag (see [`CLAIMED_WAIT`]), takes what
        /// it published.
        pub fn abandon(&self) {
            // Release: pairs with the Acquire check at the start of `push`
            // and the consumer's in `Consumer::wait_with`.
            self.closed().store(RING_ABANDONED, std::sync::atomic::Ordering::Release);
        }

        /// Whether the ring is closed: its consumer gone, or the ring
        /// abandoned.
        pub fn is_closed(&self) -> bool {
            self.closed().load(std::sync::atomic::Ordering::Acquire) != 0
        }

        /// Whether the ring's creator abandoned it ([`Ring::abandon`]).
        pub fn is_abandoned(&self) -> bool {
            self.closed().load(std::sync::atomic::Ordering::Acquire) == RING_ABANDONED
        }

        /// For the ring's creator while no consumer is attached (host-shimd
        /// after the agent died): looks at the first `window` ready
        /// descriptors from the published head and consumes them up to and
        /// including the last one `taken` says the dead consumer had
        /// already taken (it peeks, takes and only then commits, so what it
        /// took is a prefix). Returns how many were consumed.
        pub fn skip_taken(&self, window: usize, mut taken: impl FnMut(&Descriptor) -> bool) -> usize {
            let mut head = super::recover_head(self);
            let mut n = 0;
            let mut d = [Descriptor::default(); 1];
            for k in 0..window {
                if super::peek(self, head + k as u64, &mut d) == 0 {
                    break;
                }
                if taken(&d[0]) {
                    n = k + 1;
                }
            }
            super::commit(self, &mut head, n);
            n
        }

        /// Turns this mapping into the ring's single consumer.
        pub fn into_consumer(self) -> Consumer {
            let head = super::recover_head(&self);
            Consumer { ring: self, head }
        }
    }

    impl RingCells for Ring {
        fn capacity(&self) -> u32 {
            self.layout.capacity
        }
        fn tail(&self) -> &AtomicU64 {
            // SAFETY: checked at open (`Ptrs::resolve`); lives with `self`.
            unsafe { self.ptrs.tail.as_ref() }
        }
        fn head(&self) -> &AtomicU64 {
            // SAFETY: checked at open (`Ptrs::resolve`); lives with `self`.
            unsafe { self.ptrs.head.as_ref() }
        }
        fn head_seen(&self) -> &AtomicU64 {
            &self.head_seen
        }
        fn sleeping(&self) -> &AtomicU32 {
            // SAFETY: checked at open (`Ptrs::resolve`); lives with `self`.
            unsafe { self.ptrs.sleeping.as_ref() }
        }
        fn closed(&self) -> &AtomicU32 {
            // SAFETY: checked at open (`Ptrs::resolve`); lives with `self`.
            unsafe { self.ptrs.closed.as_ref() }
        }
        fn seq(&self, slot: u32) -> &AtomicU32 {
            // SAFETY: `Ptrs::slot` stays inside the checked slot array; the
            // sequence is the slot's first, 4-aligned field.
            unsafe { self.ptrs.slot(slot).cast::<AtomicU32>().as_ref() }
        }
        fn write_desc(&self, slot: u32, d: &Descriptor) {
            let p = self.ptrs.desc(slot);
            // SAFETY: inside the checked slot array and 4-aligned
            // (`Ptrs::desc`); the slot was claimed by the caller.
            unsafe { p.write_volatile(*d) };
        }
        fn read_desc(&self, slot: u32) -> Descriptor {
            let p = self.ptrs.desc(slot);
            // SAFETY: as in `write_desc`; any bytes are a valid `Descriptor`
            // (`FromBytes`), whatever a peer wrote.
            unsafe { p.read_volatile() }
        }
    }

    /// The single consumer of a ring.
    #[derive(Debug)]
    pub struct Consumer {
        ring: Ring,
        head: u64,
    }

    impl Consumer {
        /// The ring (producers' side, header).
        pub fn ring(&self) -> &Ring {
            &self.ring
        }

        /// Pops up to `out.len()` descriptors; never blocks.
        pub fn pop(&mut self, out: &mut [Descriptor]) -> usize {
            super::pop(&self.ring, &mut self.head, out)
        }

        /// Reads up to `out.len()` descriptors without consuming them;
        /// [`commit`](Self::commit) consumes them. A consumer that dies in
        /// between leaves them in the ring.
        pub fn peek(&self, out: &mut [Descriptor]) -> usize {
            super::peek(&self.ring, self.head, out)
        }

        /// Consumes the first `n` descriptors (at most what [`peek`](Self::peek)
        /// returned).
        pub fn commit(&mut self, n: usize) {
            super::commit(&self.ring, &mut self.head, n);
        }

        /// Announces that the consumer is about to sleep on its doorbell
        /// (producers then ring it); `false`: something arrived meanwhile,
        /// do not sleep. For a consumer that sleeps on several fds at once;
        /// [`end_sleep`](Self::end_sleep) after waking.
        pub fn prepare_sleep(&self) -> bool {
            super::prepare_sleep(&self.ring, self.head)
        }

        /// The consumer is awake again (producers stop ringing).
        pub fn end_sleep(&self) {
            super::end_sleep(&self.ring);
        }

        /// Pops, spinning for up to `spin`, then sleeping on `bell` until
        /// something arrives or `timeout` passes (`None`: no limit).
        /// Returns how many descriptors were popped (0 on timeout, or when
        /// the ring is empty and closed: see [`Wait::Closed`]).
        pub fn pop_wait(
            &mut self,
            out: &mut [Descriptor],
            bell: &Doorbell,
            spin: Duration,
            timeout: Option<Duration>,
        ) -> std::io::Result<usize> {
            Ok(match self.wait_with(bell, None, spin, timeout, |c| c.pop(out))? {
                Woke::Got(n) => n,
                // Nothing is watched: a hang-up cannot end this wait.
                Woke::TimedOut | Woke::HungUp | Woke::Closed => 0,
            })
        }

        /// Waits as [`pop_wait`](Self::pop_wait) does until a descriptor is
        /// ready to pop, and pops nothing: for a consumer that takes what
        /// arrives with [`peek`](Self::peek) and [`commit`](Self::commit),
        /// so that nothing it has not dealt with leaves the ring.
        ///
        /// While it sleeps it also watches `hangup` (when given) and ends
        /// with [`Wait::HungUp`] once that fd reports a hang-up or an error:
        /// a function watches its control connection, whose other end is
        /// the process that gave it the ring. Only the sleep looks at it
        /// (the spin polls the ring alone), and only after the sleep flag
        /// is set and the ring seen empty, so descriptors that arrived
        /// before the hang-up are reported first.
        ///
        /// It ends with [`Wait::Closed`] once the ring is empty and marked
        /// closed ([`Ring::abandon`], [`Ring::close`]): that flag is looked
        /// at while it spins too (every 64 polls, with the clock), and
        /// before each sleep. Empty: nothing ready, and no slot claimed by
        /// a push and not yet published (waited for up to
        /// [`CLAIMED_WAIT`]).
        pub fn wait_ready(
            &mut self,
            bell: &Doorbell,
            hangup: Option<BorrowedFd<'_>>,
            spin: Duration,
            timeout: Option<Duration>,
        ) -> std::io::Result<Wait> {
            Ok(match self.wait_with(bell, hangup, spin, timeout, |c| usize::from(super::ready(&c.ring, c.head)))? {
                Woke::Got(_) => Wait::Ready,
                Woke::TimedOut => Wait::TimedOut,
                Woke::HungUp => Wait::HungUp,
                Woke::Closed => Wait::Closed,
            })
        }

        /// The wait of `pop_wait` and `wait_ready`: `poll` until it returns
        /// non-zero, spinning, then sleeping on `bell` (and on `hangup`),
        /// or until the ring is found closed after an empty poll.
        fn wait_with(
            &mut self,
            bell: &Doorbell,
            hangup: Option<BorrowedFd<'_>>,
            spin: Duration,
            timeout: Option<Duration>,
            mut poll: impl FnMut(&mut Self) -> usize,
        ) -> std::io::Result<Woke> {
            let start = Instant::now();
            // A timeout beyond what an `Instant` holds (`Duration::MAX`)
            // is no limit.
            let deadline = timeout.and_then(|t| start.checked_add(t));
            loop {
                // Spin phase: poll the ring, looking at the clock and
                // yielding the core every 64 polls; it ends at once after
                // the first sleep.
                let mut polls = 0u32;
                loop {
                    let n = poll(self);
                    if n > 0 {
                        return Ok(Woke::Got(n));
                    }
                    polls = polls.wrapping_add(1);
                    if polls.is_multiple_of(64) {
                        // The producers' line, read once per 64 empty
                        // polls: a ring closed while its consumer spins
                        // ends the wait (nothing more can be pushed).
                        if self.ring.is_closed() {
                            return Ok(self.closed_wait(deadline, &mut poll));
                        }
                        let now = Instant::now();
                        if now.duration_since(start) >= spin || deadline.is_some_and(|d| now >= d) {
                            break;
                        }
                        // The producer may be waiting for this core (more
                        // runnable processes than cores): let it run. With a
                        // spare core this returns at once and the phase is a
                        // pure spin.
                        std::thread::yield_now();
                    }
                    std::hint::spin_loop();
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Ok(Woke::TimedOut);
                }
                if !super::prepare_sleep(&self.ring, self.head) {
                    continue;
                }
                // The flag is set and the ring was empty after it: a push
                // from now on rings `bell`, so sleeping cannot miss it.
                let r = bell.wait_watching(deadline.map(|d| d.saturating_duration_since(now)), hangup);
                super::end_sleep(&self.ring);
                // Rung or hung up at once: the bell first, so what arrived
                // is taken; the hang-up stays and ends the next sleep.
                if r? == Bell::HungUp {
                    return Ok(Woke::HungUp);
                }
            }
        }
    }

    impl Consumer {
        /// The end of a wait that found the ring closed after an empty
        /// poll: polls once more, and, while positions producers claimed
        /// are not all consumed, again until they are published (for up to
        /// [`CLAIMED_WAIT`], or `deadline`), without sleeping.
        ///
        /// Each look is a SeqCst fence, then the poll and a load of the
        /// tail: the fence pairs with the one in `push` after it publishes.
        /// A push that published before the flag was set, and then found
        /// the flag clear (so it returned `Ok`), is seen by these loads: its
        /// slot once it is ready, its claim in the tail. Its slot is ready
        /// to take once every position before it is published too, which
        /// a push that claimed one of them does shortly (it then sees the
        /// flag and fails, but what it published stays in the ring). A push
        /// not seen here sees the flag and fails. The sleep flag is not
        /// set: a push into a closed ring rings no doorbell.
        fn closed_wait(&mut self, deadline: Option<Instant>, poll: &mut impl FnMut(&mut Self) -> usize) -> Woke {
            let until = Instant::now() + CLAIMED_WAIT;
            loop {
                crate::sync::fence(core::sync::atomic::Ordering::SeqCst);
                let n = poll(self);
                if n > 0 {
                    return Woke::Got(n);
                }
                // Relaxed: ordered by the fence above (see the doc).
                if self.ring.tail().load(core::sync::atomic::Ordering::Relaxed) == self.head {
                    return Woke::Closed;
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Woke::TimedOut;
                }
                if now >= until {
                    return Woke::Closed;
                }
                std::thread::yield_now();
            }
        }
    }

    /// How [`Consumer::wait_ready`] ended.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Wait {
        /// A descriptor is ready to take.
        Ready,
        /// The timeout passed first.
        TimedOut,
        /// The ring was empty and the watched fd reported a hang-up.
        HungUp,
        /// The ring was empty and is closed: its creator abandoned it
        /// (host-shimd stopped cleanly) or marked its consumer gone.
        /// Nothing more can be pushed into it.
        Closed,
    }

    /// Longest a wait that found its ring closed waits for positions
    /// producers claimed before the flag was set to be published (see
    /// `Consumer::wait_with`): a producer between its claim and its publish
    /// is at most a preemption away; one killed there never publishes.
    pub const CLAIMED_WAIT: Duration = Duration::from_secs(1);

    /// How `Consumer::wait_with` ended.
    #[derive(Debug)]
    enum Woke {
        /// `poll` returned this (non-zero).
        Got(usize),
        TimedOut,
        HungUp,
        Closed,
    }

    /// How a sleep on a doorbell ended.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Bell {
        Rung,
        /// Timed out or interrupted by a signal.
        Quiet,
        /// The watched fd hung up (and the bell was not rung).
        HungUp,
    }

    /// An eventfd that wakes a sleeping consumer.
    #[derive(Debug)]
    pub struct Doorbell(OwnedFd);

    impl Doorbell {
        /// A new doorbell (non-blocking, close-on-exec).
        pub fn new() -> std::io::Result<Self> {
            use nix::sys::eventfd::{EfdFlags, EventFd};
            let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
            Ok(Self(fd.into()))
        }

        /// A doorbell received from another process. A fd that is not an
        /// eventfd makes `ring` and `wait` fail with an error.
        pub fn from_fd(fd: OwnedFd) -> Self {
            Self(fd)
        }

        /// The eventfd (to pass to another process).
        pub fn fd(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }

        /// Wakes the consumer.
        pub fn ring(&self) -> std::io::Result<()> {
            match nix::unistd::write(&self.0, &1u64.to_ne_bytes()) {
                // The counter is saturated: the consumer is awake anyway.
                Ok(_) | Err(nix::Error::EAGAIN) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }

        /// Forgets rings so far (never blocks); returns whether it had been
        /// rung.
        pub fn drain(&self) -> std::io::Result<bool> {
            let mut buf = [0u8; 8];
            match nix::unistd::read(&self.0, &mut buf) {
                Ok(_) => Ok(true),
                Err(nix::Error::EAGAIN) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }

        /// Waits until rung or `timeout` passes; returns whether it was rung.
        pub fn wait(&self, timeout: Option<Duration>) -> std::io::Result<bool> {
            Ok(self.wait_watching(timeout, None)? == Bell::Rung)
        }

        /// Waits until rung, `timeout` passes, or `hangup` (when given)
        /// reports a hang-up or an error. `hangup` is polled for no event,
        /// so data waiting on it (a late answer on a control connection)
        /// does not end the wait; `POLLHUP` and `POLLERR` are reported
        /// whatever is asked.
        fn wait_watching(&self, timeout: Option<Duration>, hangup: Option<BorrowedFd<'_>>) -> std::io::Result<Bell> {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let t = match timeout {
                None => PollTimeout::NONE,
                Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
            };
            let bell = PollFd::new(self.0.as_fd(), PollFlags::POLLIN);
            let mut both;
            let mut one;
            let fds: &mut [PollFd<'_>] = match hangup {
                Some(h) => {
                    both = [bell, PollFd::new(h, PollFlags::empty())];
                    &mut both
                }
                None => {
                    one = [bell];
                    &mut one
                }
            };
            match poll(fds, t) {
                Ok(0) | Err(nix::Error::EINTR) => Ok(Bell::Quiet),
                Ok(_) => {
                    let rung = fds[0].revents().is_some_and(|r| !r.is_empty());
                    let hung = fds
                        .get(1)
                        .and_then(PollFd::revents)
                        .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
                    if !rung {
                        return Ok(if hung { Bell::HungUp } else { Bell::Quiet });
                    }
                    let mut buf = [0u8; 8];
                    match nix::unistd::read(&self.0, &mut buf) {
                        Ok(_) => Ok(Bell::Rung),
                        Err(nix::Error::EAGAIN) => Ok(if hung { Bell::HungUp } else { Bell::Quiet }),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e.into()),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn d(request: u32) -> Descriptor {
            Descriptor { request, ..Default::default() }
        }

        #[test]
        fn two_mappings_push_and_pop() {
            let ring = Ring::create("dne-ring-test", 8, 1, 2, 3).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            assert_eq!(prod.header().owner_fn, 2);
            let mut cons = ring.into_consumer();
            assert_eq!(prod.push(&[d(1), d(2)]).unwrap().count, 2);
            assert_eq!(prod.pending(), 2);
            let mut out = [Descriptor::default(); 4];
            assert_eq!(cons.pop(&mut out), 2);
            assert_eq!((out[0].request, out[1].request), (1, 2));
            cons.ring().close();
            assert!(prod.is_closed());
            assert_eq!(prod.push(&[d(3)]), Err(RingPushError::Closed));
        }

        #[test]
        fn peeked_descriptors_stay_until_committed_and_a_dead_consumers_taken_prefix_is_skipped() {
            let ring = Ring::create("dne-ring-peek", 8, 1, 2, 3).unwrap();
            let owner = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let mut cons = ring.into_consumer();
            owner.push(&[d(1), d(2), d(3), d(4)]).unwrap();
            let mut out = [Descriptor::default(); 3];
            assert_eq!(cons.peek(&mut out), 3);
            assert_eq!(owner.pending(), 4, "peeking consumes nothing");
            cons.commit(1);
            assert_eq!(owner.pending(), 3);
            // The consumer "dies" having taken 2 and 3 but before commit.
            drop(cons);
            let skipped = owner.skip_taken(8, |x| x.request == 2 || x.request == 3);
            assert_eq!(skipped, 2);
            assert_eq!(owner.pending(), 1);
            // A new consumer starts at 4; the slots are free for producers.
            let mut next = Ring::open(owner.fd().try_clone_to_owned().unwrap()).unwrap().into_consumer();
            assert_eq!(owner.push(&[d(5), d(6), d(7), d(8), d(9), d(10), d(11)]).unwrap().count, 7);
            let mut all = [Descriptor::default(); 8];
            assert_eq!(next.pop(&mut all), 8);
            let got: Vec<u32> = all.iter().map(|x| x.request).collect();
            assert_eq!(got, [4, 5, 6, 7, 8, 9, 10, 11]);
            // Nothing taken: nothing skipped.
            owner.push(&[d(12)]).unwrap();
            assert_eq!(owner.skip_taken(8, |_| false), 0);
            assert_eq!(owner.pending(), 1);
        }

        #[test]
        fn open_refuses_a_bad_segment() {
            let r = Region::create("dne-not-a-ring", 4096, PagePolicy::Normal).unwrap();
            let e = Ring::open(r.fd().try_clone_to_owned().unwrap()).unwrap_err();
            assert!(matches!(e, RingOpenError::Segment(SegmentError::BadMagic { .. })), "{e}");
        }

        #[test]
        fn sleeping_consumer_is_woken_by_the_doorbell() {
            let ring = Ring::create("dne-ring-wake", 8, 1, 2, 3).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let bell2 = Doorbell::from_fd(bell.fd().try_clone_to_owned().unwrap());
            let mut cons = ring.into_consumer();
            let t = std::thread::spawn(move || {
                let mut out = [Descriptor::default(); 4];
                let n = cons.pop_wait(&mut out, &bell, Duration::ZERO, Some(Duration::from_secs(60))).unwrap();
                (n, out[0].request)
            });
            // Push until the consumer is asleep, so the doorbell path runs.
            while prod.pending() == 0 {
                std::thread::sleep(Duration::from_millis(20));
                let r = prod.push(&[d(9)]).unwrap();
                if r.wake {
                    bell2.ring().unwrap();
                }
            }
            assert_eq!(t.join().unwrap(), (1, 9));
        }

        /// A ring that outlives its consumer (the agent's uplink): a
        /// consumer killed inside `commit`, after freeing a slot for the
        /// next lap and before publishing the head, does not stall it for
        /// host-shimd's repair and the next consumer. Before, the next
        /// consumer waited at the freed slot for ever and the producers
        /// found the ring full once they had filled the lap.
        #[test]
        fn a_consumer_killed_inside_commit_does_not_stall_the_ring() {
            use super::super::RingCells;
            let ring = Ring::create("dne-ring-commit", 8, 1, 2, 3).unwrap();
            let owner = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let cons = ring.into_consumer();
            owner.push(&[d(1), d(2)]).unwrap();
            let mut out = [Descriptor::default(); 2];
            assert_eq!(cons.peek(&mut out), 2);
            // `commit(2)` cut short: slot 0 freed for the next lap, the
            // head not published.
            cons.ring().seq(0).store(8, std::sync::atomic::Ordering::Release);
            drop(cons);
            // host-shimd after the death (the dead consumer had taken both).
            assert_eq!(owner.skip_taken(32, |_| true), 1, "the one not freed yet");
            let mut next = Ring::open(owner.fd().try_clone_to_owned().unwrap()).unwrap().into_consumer();
            for k in 0..8 {
                owner.push(&[d(10 + k)]).unwrap_or_else(|e| panic!("push {k}: {e}"));
            }
            let mut all = [Descriptor::default(); 8];
            assert_eq!(next.pop(&mut all), 8, "the next consumer takes a whole lap");
            assert_eq!(all[0], d(10));
        }

        /// A sleeping `wait_ready` ends with `HungUp` when the watched fd's
        /// peer closes, but only once the ring is empty: what was pushed
        /// before is reported first. Data waiting on the watched fd does
        /// not end the wait. Before, the watched fd did not exist and the
        /// wait slept until its timeout.
        #[test]
        fn a_sleeping_wait_ends_when_the_watched_fd_hangs_up() {
            use std::io::Write;
            let ring = Ring::create("dne-ring-hangup", 8, 1, 2, 3).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let watch = Some(theirs.as_fd());
            let short = Some(Duration::from_millis(20));
            ours.write_all(b"an answer nobody reads yet").unwrap();
            assert_eq!(cons.wait_ready(&bell, watch, Duration::ZERO, short).unwrap(), Wait::TimedOut);
            prod.push(&[d(1)]).unwrap();
            drop(ours);
            let long = Some(Duration::from_secs(60));
            assert_eq!(cons.wait_ready(&bell, watch, Duration::ZERO, long).unwrap(), Wait::Ready);
            let mut out = [Descriptor::default(); 1];
            assert_eq!(cons.pop(&mut out), 1);
            // (The 60 s timeout is the watchdog: on a miss this is `TimedOut`.)
            assert_eq!(cons.wait_ready(&bell, watch, Duration::ZERO, long).unwrap(), Wait::HungUp);
            assert_eq!(cons.wait_ready(&bell, None, Duration::ZERO, short).unwrap(), Wait::TimedOut, "nothing watched");
        }

        /// A ring its creator abandoned refuses pushes with `Abandoned`,
        /// and its consumer's wait ends with `Closed` once it has taken
        /// what was pushed before, also a wait that only spins (it never
        /// sleeps, so no doorbell or hang-up can end it), and a `pop_wait`
        /// returns 0. Before, there was no way to tell it apart from a
        /// consumer gone, and a spinning wait ran to its timeout.
        #[test]
        fn an_abandoned_ring_refuses_pushes_and_ends_a_spinning_wait() {
            let ring = Ring::create("dne-ring-abandon", 8, 1, 2, 3).unwrap();
            let creator = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            prod.push(&[d(1)]).unwrap();
            creator.abandon();
            assert!(prod.is_closed() && prod.is_abandoned());
            assert_eq!(prod.push(&[d(2)]), Err(RingPushError::Abandoned));
            // (The 60 s timeout is the watchdog: on a miss this is `TimedOut`.)
            let long = Some(Duration::from_secs(60));
            assert_eq!(cons.wait_ready(&bell, None, Duration::MAX, long).unwrap(), Wait::Ready, "what came before");
            let mut out = [Descriptor::default(); 2];
            assert_eq!(cons.pop(&mut out), 1);
            assert_eq!(cons.wait_ready(&bell, None, Duration::MAX, long).unwrap(), Wait::Closed, "spinning");
            assert_eq!(cons.wait_ready(&bell, None, Duration::ZERO, long).unwrap(), Wait::Closed, "sleeping");
            assert_eq!(cons.pop_wait(&mut out, &bell, Duration::MAX, long).unwrap(), 0);
            // A consumer marked gone is not an abandoned ring.
            let other = Ring::create("dne-ring-gone", 8, 1, 2, 3).unwrap();
            other.close();
            assert!(other.is_closed() && !other.is_abandoned());
            assert_eq!(other.push(&[d(3)]), Err(RingPushError::Closed));
        }

        /// A descriptor published after the consumer's last empty poll and
        /// before it sees the ring closed is still handed to it: the wait
        /// looks at the ring once more after it sees the flag. (Its
        /// producer's push saw the flag still clear after publishing, and
        /// returned `Ok`.) Before, the wait ended with `Closed` and the
        /// descriptor stayed in a ring nobody would read again.
        #[test]
        fn a_descriptor_published_just_before_the_ring_was_seen_closed_is_taken() {
            let ring = Ring::create("dne-ring-late", 8, 1, 2, 3).unwrap();
            let creator = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            let long = Some(Duration::from_secs(60));
            let mut polls = 0;
            let woke = cons
                .wait_with(&bell, None, Duration::MAX, long, |c| {
                    let n = usize::from(super::super::ready(&c.ring, c.head));
                    polls += 1;
                    // The wait looks at the flag every 64 empty polls:
                    // between this one and that look, the push and then
                    // the creator's stop.
                    if polls == 64 {
                        assert_eq!(prod.push(&[d(1)]).map(|p| p.count), Ok(1));
                        creator.abandon();
                    }
                    n
                })
                .unwrap();
            assert!(matches!(woke, Woke::Got(1)), "{woke:?}");
            let mut out = [Descriptor::default(); 2];
            assert_eq!(cons.pop(&mut out), 1);
            assert_eq!(cons.wait_ready(&bell, None, Duration::MAX, long).unwrap(), Wait::Closed);
        }

        /// Two producers: the first claims position 0 and has not published
        /// it yet when the second publishes position 1 and, finding the
        /// flag still clear, returns `Ok`; then the ring is abandoned. The
        /// consumer cannot take position 1 before position 0, so a wait
        /// that sees the ring closed waits for the claimed position to be
        /// published (the first producer's push then sees the flag and
        /// fails, but what it published is in the ring) and hands both
        /// over. Before, its last look found position 0 not ready and the
        /// wait ended `Closed`: the second producer's message, pushed with
        /// `Ok`, was left in a ring nobody would read.
        #[test]
        fn a_descriptor_published_behind_a_claimed_slot_as_the_ring_closes_is_taken() {
            let ring = Ring::create("dne-ring-late2", 8, 1, 2, 3).unwrap();
            let creator = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            let long = Some(Duration::from_secs(60));
            let mut polls = 0;
            let woke = cons
                .wait_with(&bell, None, Duration::MAX, long, |c| {
                    let n = usize::from(super::super::ready(&c.ring, c.head));
                    polls += 1;
                    if polls == 64 {
                        // The first producer's claim of position 0 (its
                        // tail move), then the second producer's push.
                        creator.tail().fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        assert_eq!(prod.push(&[d(2)]).map(|p| p.count), Ok(1));
                        creator.abandon();
                    }
                    if polls == 100 {
                        // The first producer publishes position 0.
                        assert!(super::super::fill_void(&creator, 0, &d(1)));
                    }
                    n
                })
                .unwrap();
            assert!(matches!(woke, Woke::Got(1)), "{woke:?} after {polls} polls");
            let mut out = [Descriptor::default(); 4];
            assert_eq!(cons.pop(&mut out), 2);
            assert_eq!((out[0].request, out[1].request), (1, 2));
            assert_eq!(cons.wait_ready(&bell, None, Duration::MAX, long).unwrap(), Wait::Closed);
        }

        /// A position claimed and never published (its producer was killed
        /// between its claim and its publish) does not hold a wait that
        /// sees the ring closed for ever: it ends `Closed` once
        /// [`CLAIMED_WAIT`] has passed, with no timeout of its own.
        #[test]
        fn a_claimed_slot_never_published_ends_the_closed_wait_after_a_bound() {
            let ring = Ring::create("dne-ring-hole", 8, 1, 2, 3).unwrap();
            let creator = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            creator.tail().fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            creator.abandon();
            let t = Instant::now();
            assert_eq!(cons.wait_ready(&bell, None, Duration::from_micros(1), None).unwrap(), Wait::Closed);
            assert!(t.elapsed() >= CLAIMED_WAIT, "ended after {:?}", t.elapsed());
        }

        /// A consumer asleep on its doorbell when the ring is abandoned
        /// wakes at the creator's ring of the doorbell and ends with
        /// `Closed`, with no hang-up to watch.
        #[test]
        fn a_sleeping_wait_ends_when_the_ring_is_abandoned_and_its_bell_rung() {
            let ring = Ring::create("dne-ring-abandon-sleep", 8, 1, 2, 3).unwrap();
            let creator = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let creators_bell = Doorbell::from_fd(bell.fd().try_clone_to_owned().unwrap());
            let mut cons = ring.into_consumer();
            let t = std::thread::spawn(move || {
                cons.wait_ready(&bell, None, Duration::ZERO, Some(Duration::from_secs(60))).unwrap()
            });
            std::thread::sleep(Duration::from_millis(20));
            creator.abandon();
            creators_bell.ring().unwrap();
            assert_eq!(t.join().unwrap(), Wait::Closed);
        }

        #[test]
        fn pop_wait_times_out_empty() {
            let ring = Ring::create("dne-ring-timeout", 8, 1, 2, 3).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            let mut out = [Descriptor::default(); 1];
            let n = cons.pop_wait(&mut out, &bell, Duration::from_micros(10), Some(Duration::from_millis(20))).unwrap();
            assert_eq!(n, 0);
        }

        /// A timeout no `Instant` can hold is no limit. Before, adding it
        /// to the clock panicked.
        #[test]
        fn a_timeout_of_duration_max_waits_without_a_limit() {
            let ring = Ring::create("dne-ring-max", 8, 1, 2, 3).unwrap();
            let prod = Ring::open(ring.fd().try_clone_to_owned().unwrap()).unwrap();
            let bell = Doorbell::new().unwrap();
            let mut cons = ring.into_consumer();
            let mut out = [Descriptor::default(); 1];
            prod.push(&[d(7)]).unwrap();
            let n = cons.pop_wait(&mut out, &bell, Duration::ZERO, Some(Duration::MAX)).unwrap();
            assert_eq!((n, out[0].request), (1, 7));
            prod.push(&[d(8)]).unwrap();
            assert_eq!(cons.wait_ready(&bell, None, Duration::ZERO, Some(Duration::MAX)).unwrap(), Wait::Ready);
        }
    }
}
