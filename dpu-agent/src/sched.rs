//! The send scheduler (DESIGN.md section 5): byte-based weighted deficit
//! round robin over the tenants with backlog, work-conserving, with an
//! optional token-bucket rate cap per tenant.
//!
//! Each round visits every tenant once. A tenant with a message ready gets
//! `quantum * weight` bytes of credit and sends messages while its deficit
//! covers the head message; what is left carries over while it stays
//! backlogged (so a message larger than one quantum goes out after a few
//! rounds) and is forgotten when its queue empties (an idle tenant saves
//! nothing up). Over time each backlogged tenant's share of the bytes equals
//! its weight's share, whatever its message sizes. A tenant that is blocked
//! (no credits from the peer, or its rate cap) is skipped without being
//! charged, and its deficit is capped, so it cannot burst unfairly later.
//!
//! Classic DRR, resumable: a tenant's turn ends when its deficit no
//! longer covers its head message (or it empties, or it is blocked on its
//! own credits); when the path all tenants share has no room, the round
//! stops mid-turn and the next call resumes that very turn. So when the
//! shared path (the NIC) is the bottleneck, the scheduler, not the order
//! of arrival, decides how it is divided.
//!
//! The scheduler holds no messages: [`Drr::round`] asks the caller about
//! queue heads through [`Backlog`].

use std::time::Instant;

/// Bytes of credit per round for weight 1.
pub const QUANTUM: u64 = 16 * 1024;

/// What the scheduler needs to know about the tenants' queues.
pub trait Backlog {
    /// Bytes of tenant `t`'s head message, `None` when its queue is empty.
    fn head(&self, t: usize) -> Option<u64>;
    /// Bytes of the message of `t` that can be posted now as far as `t`
    /// alone is concerned (its peer granted credits, its connection has
    /// room), which [`send`](Self::send) would post; `None` when none can.
    /// A tenant that has none is skipped; the others go on. (A tenant with
    /// a queue per peer brings such a message to its head here.)
    fn ready(&mut self, t: usize) -> Option<u64>;
    /// Whether the path all tenants share has room for another message
    /// (the sends in flight stay within the node's budget). When it has
    /// none, the round stops and resumes later with the same tenant and
    /// what is left of its turn, so the shared bottleneck is divided by
    /// weight and bytes, not by who happened to come first.
    fn room(&self) -> bool {
        true
    }
    /// Posts the head message of `t`.
    fn send(&mut self, t: usize);
}

/// A token bucket: `rate` bytes per second, bursts of up to `burst` bytes.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(bytes_per_sec: u64, burst: u64, now: Instant) -> Self {
        Self { rate: bytes_per_sec as f64, burst: burst as f64, tokens: burst as f64, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Whether a message may go now (the bucket is not in debt). A message
    /// larger than the bucket still goes once the bucket is full, and puts
    /// it in debt.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// Charges `bytes`.
    pub fn take(&mut self, bytes: u64) {
        self.tokens -= bytes as f64;
    }
}

#[derive(Clone, Debug)]
struct Slot {
    weight: u64,
    deficit: u64,
    cap: Option<Bucket>,
}

/// The weighted deficit round robin.
#[derive(Clone, Debug)]
pub struct Drr {
    slots: Vec<Slot>,
    quantum: u64,
    /// Tenant whose turn it is.
    current: usize,
    /// Whether `current` already got its quantum for this turn (its turn
    /// was interrupted by the shared path running out of room).
    granted: bool,
}

impl Drr {
    /// A scheduler over tenants of the given weights (>= 1) and optional
    /// rate caps in bytes per second.
    pub fn new(tenants: &[(u32, Option<u64>)], quantum: u64, now: Instant) -> Self {
        let slots = tenants
            .iter()
            .map(|&(w, cap)| Slot {
                weight: u64::from(w.max(1)),
                deficit: 0,
                // Burst: 10 ms worth of the cap, at least one quantum.
                cap: cap.map(|r| Bucket::new(r, (r / 100).max(quantum), now)),
            })
            .collect();
        Self { slots, quantum: quantum.max(1), current: 0, granted: false }
    }

    fn next_turn(&mut self) {
        self.granted = false;
        self.current = (self.current + 1) % self.slots.len().max(1);
    }

    /// Up to one turn of every tenant, starting with the tenant whose turn
    /// it is; returns how many messages were sent. A turn sends at most
    /// about `quantum * weight` bytes plus one message (bounded: no tenant
    /// waits more than one round). Stops early, mid-turn, when the shared
    /// path has no room ([`Backlog::room`]).
    pub fn round(&mut self, q: &mut impl Backlog, now: Instant) -> usize {
        let n = self.slots.len();
        let mut sent = 0;
        for _ in 0..n {
            if !q.room() {
                return sent;
            }
            let t = self.current;
            let quantum = self.quantum * self.slots[t].weight;
            if q.head(t).is_none() {
                // Idle: it saves nothing up.
                self.slots[t].deficit = 0;
                self.next_turn();
                continue;
            }
            let capped_ready = |s: &mut Slot| s.cap.as_mut().is_none_or(|b| b.ready(now));
            let Some(mut head) = q.ready(t).filter(|_| capped_ready(&mut self.slots[t])) else {
                // Blocked on its own: keep what it has, but no more than
                // one turn's worth, and take nothing.
                let s = &mut self.slots[t];
                s.deficit = s.deficit.min(quantum);
                self.next_turn();
                continue;
            };
            if !self.granted {
                let s = &mut self.slots[t];
                s.deficit = s.deficit.saturating_add(quantum).min(quantum.saturating_add(head).max(2 * quantum));
                self.granted = true;
            }
            loop {
                if head > self.slots[t].deficit {
                    break;
                }
                if !q.room() {
                    // The turn resumes here.
                    return sent;
                }
                let s = &mut self.slots[t];
                s.deficit -= head;
                if let Some(b) = s.cap.as_mut() {
                    b.take(head);
                }
                q.send(t);
                sent += 1;
                if q.head(t).is_none() {
                    self.slots[t].deficit = 0;
                    break;
                }
                match q.ready(t).filter(|_| capped_ready(&mut self.slots[t])) {
                    Some(h) => head = h,
                    None => break,
                }
            }
            self.next_turn();
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::time::Duration;

    /// Queues of message sizes; `blocked` tenants cannot send; at most
    /// `window` messages (all tenants) may be in flight on the shared path
    /// (`flight`; the test completes them).
    struct Queues {
        q: Vec<VecDeque<u64>>,
        sent: Vec<u64>,
        blocked: Vec<bool>,
        window: usize,
        flight: usize,
    }

    impl Backlog for Queues {
        fn head(&self, t: usize) -> Option<u64> {
            self.q[t].front().copied()
        }
        fn ready(&mut self, t: usize) -> Option<u64> {
            if self.blocked[t] { None } else { self.head(t) }
        }
        fn room(&self) -> bool {
            self.flight < self.window
        }
        fn send(&mut self, t: usize) {
            let b = self.q[t].pop_front().unwrap();
            self.sent[t] += b;
            self.flight += 1;
        }
    }

    fn queues(sizes: &[Vec<u64>]) -> Queues {
        Queues {
            q: sizes.iter().map(|s| s.iter().copied().collect()).collect(),
            sent: vec![0; sizes.len()],
            blocked: vec![false; sizes.len()],
            window: usize::MAX,
            flight: 0,
        }
    }

    #[test]
    fn a_shared_bottleneck_one_message_wide_is_still_divided_by_weight_and_bytes() {
        // One message in flight at a time on the shared path (the link
        // frees one slot, the scheduler fills it): 64 B messages of weight
        // 6 against 16 KiB ones of weight 1 and mixed ones of weight 2.
        let now = Instant::now();
        let mut d = Drr::new(&[(6, None), (1, None), (2, None)], QUANTUM, now);
        let mixed: Vec<u64> = (0..200_000u64).map(|i| 64 + (i * 7919) % 16_320).collect();
        let mut q = queues(&[vec![64; 2_000_000], vec![16_384; 20_000], mixed]);
        q.window = 1;
        for _ in 0..200_000 {
            d.round(&mut q, now);
            q.flight = 0; // the link sent it
        }
        assert!(q.q.iter().all(|x| !x.is_empty()), "all stayed backlogged");
        let total: u64 = q.sent.iter().sum();
        for (t, w) in [(0, 6.0), (1, 1.0), (2, 2.0)] {
            let share = q.sent[t] as f64 / total as f64;
            assert!((share - w / 9.0).abs() < 0.01, "tenant {t}: share {share}, weight share {}", w / 9.0);
        }
    }

    #[test]
    fn backlogged_tenants_share_bytes_by_weight_whatever_their_sizes() {
        // Tenant 0 (weight 3) sends 64 B messages, tenant 1 (weight 1)
        // sends 60 KiB ones: bytes still split 3:1.
        let now = Instant::now();
        let mut d = Drr::new(&[(3, None), (1, None)], QUANTUM, now);
        let mut q = queues(&[vec![64; 200_000], vec![60 * 1024; 2_000]]);
        for _ in 0..200 {
            d.round(&mut q, now);
        }
        assert!(!q.q[0].is_empty() && !q.q[1].is_empty(), "both stayed backlogged");
        let share = q.sent[0] as f64 / (q.sent[0] + q.sent[1]) as f64;
        assert!((share - 0.75).abs() < 0.02, "share of weight 3 of 4: {share}");
    }

    #[test]
    fn work_conserving_and_idle_tenants_save_nothing() {
        let now = Instant::now();
        let mut d = Drr::new(&[(1, None), (8, None)], QUANTUM, now);
        let mut q = queues(&[vec![1000; 10_000], vec![]]);
        for _ in 0..10 {
            d.round(&mut q, now);
        }
        // Tenant 1 is idle: tenant 0 gets everything, a quantum a round.
        assert!(q.sent[0] >= 10 * (QUANTUM - 1000));
        // Tenant 1 wakes up with a burst: it gets its weight's share from
        // now on, not a saved-up monopoly.
        q.q[1].extend(std::iter::repeat_n(1000, 10_000));
        let before = q.sent.clone();
        d.round(&mut q, now);
        let got1 = q.sent[1] - before[1];
        assert!(got1 <= 8 * QUANTUM + 1000, "one round's worth at most: {got1}");
    }

    #[test]
    fn blocked_tenants_are_skipped_and_do_not_block_others() {
        let now = Instant::now();
        let mut d = Drr::new(&[(1, None), (1, None)], QUANTUM, now);
        let mut q = queues(&[vec![100; 1000], vec![100; 1000]]);
        q.blocked[0] = true;
        for _ in 0..5 {
            d.round(&mut q, now);
        }
        assert_eq!(q.sent[0], 0);
        assert!(q.sent[1] > 0);
        q.blocked[0] = false;
        let before = q.sent[0];
        d.round(&mut q, now);
        assert!(q.sent[0] - before <= 2 * QUANTUM, "no burst after being blocked");
    }

    #[test]
    fn a_message_larger_than_a_quantum_goes_out_after_a_few_rounds() {
        let now = Instant::now();
        let mut d = Drr::new(&[(1, None)], QUANTUM, now);
        let mut q = queues(&[vec![5 * QUANTUM]]);
        let mut rounds = 0;
        while q.sent[0] == 0 {
            d.round(&mut q, now);
            rounds += 1;
            assert!(rounds <= 5);
        }
    }

    #[test]
    fn rate_caps_bound_bytes_per_second() {
        let t0 = Instant::now();
        // 1 MB/s cap; bucket burst 16 KiB (one quantum).
        let mut d = Drr::new(&[(1, Some(1_000_000)), (1, None)], QUANTUM, t0);
        let mut q = queues(&[vec![1000; 100_000], vec![1000; 100_000]]);
        // Simulated 100 ms in 1 ms steps.
        for ms in 0..100 {
            d.round(&mut q, t0 + Duration::from_millis(ms));
        }
        // 100 ms at 1 MB/s = 100 kB, plus the initial burst and one message.
        assert!(q.sent[0] <= 100_000 + QUANTUM + 1000, "capped tenant sent {}", q.sent[0]);
        assert!(q.sent[0] >= 80_000, "capped tenant still gets its rate: {}", q.sent[0]);
        assert!(q.sent[1] > q.sent[0], "the uncapped tenant takes the rest");
    }

    proptest! {
        #[test]
        fn shares_follow_weights(
            w0 in 1u32..10, w1 in 1u32..10,
            s0 in 1u64..70_000, s1 in 1u64..70_000,
        ) {
            let now = Instant::now();
            let mut d = Drr::new(&[(w0, None), (w1, None)], QUANTUM, now);
            let n0 = (4000 * QUANTUM / s0) as usize + 10;
            let n1 = (4000 * QUANTUM / s1) as usize + 10;
            let mut q = queues(&[vec![s0; n0], vec![s1; n1]]);
            for _ in 0..300 {
                d.round(&mut q, now);
            }
            let want = f64::from(w0) / f64::from(w0 + w1);
            let got = q.sent[0] as f64 / (q.sent[0] + q.sent[1]) as f64;
            prop_assert!((got - want).abs() < 0.05, "weights {}:{} sizes {}:{} share {} want {}", w0, w1, s0, s1, got, want);
        }
    }
}
