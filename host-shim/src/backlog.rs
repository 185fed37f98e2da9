//! Deliveries waiting for room in their function's inbound ring, for a
//! deliverer that takes messages from elsewhere (the agent, host-shimd's
//! bridge) and must not wait on a full ring.
//!
//! Each function gets its messages in order: a new delivery for a function
//! with deliveries waiting waits behind them ([`DeliveryBacklog::holds`]).
//! A pass over the backlog ([`DeliveryBacklog::begin_pass`],
//! [`DeliveryBacklog::next_to_try`]) tries a function's deliveries until
//! one finds its ring still full; the rest of that function's wait untried
//! until the next pass, so a wedged function costs one try per pass, not
//! one per message waiting for it.

use std::collections::VecDeque;

/// The waiting deliveries of one deliverer (see the module docs); `T` is
/// what it keeps per delivery (the message, and where it came from).
#[derive(Debug)]
pub struct DeliveryBacklog<T> {
    /// In arrival order, each with its function.
    queue: VecDeque<(u16, T)>,
    /// Per function: its deliveries in `queue` not handed out to be tried.
    waiting: Vec<u32>,
    /// Functions a try of this pass found full.
    full: Vec<u16>,
    /// Deliveries of this pass not looked at yet (the front of `queue`).
    left: usize,
}

impl<T> DeliveryBacklog<T> {
    /// An empty backlog for deliveries to `functions` functions (keys
    /// `0..functions`, as the deliverer numbers them: the agent and the
    /// bridge number each tenant's own functions; a delivery to another key
    /// is kept, never held back).
    pub fn new(functions: usize) -> Self {
        Self { queue: VecDeque::with_capacity(256), waiting: vec![0; functions], full: Vec::new(), left: 0 }
    }

    /// How many functions it keeps the order of (the `functions` it was
    /// made for).
    pub fn functions(&self) -> usize {
        self.waiting.len()
    }

    /// Deliveries waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether a new delivery to function `f` must wait behind the ones
    /// waiting for it.
    pub fn holds(&self, f: u16) -> bool {
        self.waiting.get(usize::from(f)).is_some_and(|&n| n > 0)
    }

    /// `item`, for function `f`, waits for room in its ring. `tried`: a try
    /// of the current pass found the ring full (`f`'s other deliveries are
    /// not tried again in this pass).
    pub fn wait(&mut self, f: u16, item: T, tried: bool) {
        if let Some(n) = self.waiting.get_mut(usize::from(f)) {
            *n += 1;
        }
        if tried {
            self.full.push(f);
        }
        self.queue.push_back((f, item));
    }

    /// Starts a pass over the deliveries waiting now.
    pub fn begin_pass(&mut self) {
        self.full.clear();
        self.left = self.queue.len();
    }

    /// The next delivery of this pass to try, in order, skipping (leaving
    /// in order) those of functions found full in it. A delivery that
    /// fails again goes back with [`wait`](Self::wait), `tried` set.
    pub fn next_to_try(&mut self) -> Option<T> {
        while self.left > 0 {
            self.left -= 1;
            let (f, item) = self.queue.pop_front()?;
            if self.full.contains(&f) {
                self.queue.push_back((f, item));
                continue;
            }
            if let Some(n) = self.waiting.get_mut(usize::from(f)) {
                *n = n.saturating_sub(1);
            }
            return Some(item);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Function 0's ring is full: one try per pass, its deliveries stay in
    /// order behind the first, function 1's go meanwhile, and a new one for
    /// 0 waits behind the others.
    #[test]
    fn a_full_function_is_tried_once_per_pass_and_keeps_its_order() {
        let mut b = DeliveryBacklog::new(2);
        for k in 0..3 {
            b.wait(0, k, false);
        }
        b.wait(1, 10, false);
        assert!(b.holds(0) && b.holds(1));
        b.begin_pass();
        let first = b.next_to_try().unwrap();
        assert_eq!(first, 0);
        b.wait(0, first, true);
        assert_eq!(b.next_to_try(), Some(10), "function 0's others are skipped");
        assert_eq!(b.next_to_try(), None);
        assert!(!b.holds(1));
        b.wait(0, 3, false);
        b.begin_pass();
        let tried: Vec<i32> = std::iter::from_fn(|| b.next_to_try()).collect();
        assert_eq!(tried, [0, 1, 2, 3], "in order once there is room");
        assert!(b.is_empty() && !b.holds(0));
    }
}
