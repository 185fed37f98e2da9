//! Receiver-advertised credits of one connection, both directions.
//!
//! Counters are cumulative and travel modulo 2^32, so a credit message is
//! idempotent (a later one supersedes an earlier one) and never needs an
//! acknowledgement of its own.
//!
//! * Receive side: `posted` counts the receives the user has posted; the
//!   first [`RESERVE`] of them are kept back for the peer's credit messages
//!   (which consume a receive like any send; the endpoint re-posts that
//!   receive at once), the rest are granted. `received` counts data
//!   messages placed. A credit message goes out when nothing else is in
//!   flight and the new grant at least doubles what the peer has left, so
//!   a streaming peer gets about two credit messages per window, and a peer
//!   with nothing left gets one at once.
//! * Send side: `granted` is the peer's latest cumulative grant, `sent`
//!   counts data sends posted; the difference is what may be posted.

/// Receives kept back from the grant, for incoming credit messages (at
/// most one is in flight per direction).
pub const RESERVE: u32 = 1;

/// Credit state of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credits {
    /// Receives kept back so far (up to [`RESERVE`]).
    reserved: u32,
    /// Cumulative grant: posted receives beyond the reserve.
    posted: u32,
    advertised: u32,
    received: u32,
    in_flight: bool,
    granted: u32,
    sent: u32,
}

impl Credits {
    /// The user posted a receive.
    pub fn on_post_recv(&mut self) {
        if self.reserved < RESERVE {
            self.reserved += 1;
        } else {
            self.posted = self.posted.wrapping_add(1);
        }
    }

    /// A data message was placed in one of our receives.
    pub fn on_data_received(&mut self) {
        self.received = self.received.wrapping_add(1);
    }

    /// The peer sent more data messages than it was granted: a protocol
    /// violation (the next would find no receive, or take the one kept
    /// for its credit messages, and the grant arithmetic would wrap).
    pub fn overrun(&self) -> bool {
        let over = self.received.wrapping_sub(self.advertised);
        over != 0 && over < 1 << 31
    }

    /// Our cumulative grant (receives available to the peer's data over
    /// the connection's life, modulo 2^32).
    pub fn grant(&self) -> u32 {
        self.posted
    }

    /// The grant to send now, if a credit message is due (see the module
    /// docs); [`commit_update`](Self::commit_update) once it is posted.
    pub fn pending_update(&self) -> Option<u32> {
        if self.in_flight {
            return None;
        }
        let grant = self.grant();
        let new = grant.wrapping_sub(self.advertised);
        if new == 0 || new > 1 << 31 {
            return None;
        }
        let left = self.advertised.wrapping_sub(self.received);
        (new >= left).then_some(grant)
    }

    /// The credit message carrying `grant` was posted.
    pub fn commit_update(&mut self, grant: u32) {
        self.in_flight = true;
        self.advertised = grant;
    }

    #[cfg(test)]
    fn take_update(&mut self) -> Option<u32> {
        let g = self.pending_update()?;
        self.commit_update(g);
        Some(g)
    }

    /// The credit message in flight completed (placed or failed).
    pub fn on_update_done(&mut self) {
        self.in_flight = false;
    }

    /// The peer advertised a cumulative grant.
    pub fn on_grant(&mut self, granted: u32) {
        // Only move forward (modulo 2^32): a stale grant changes nothing.
        if granted.wrapping_sub(self.granted) < 1 << 31 {
            self.granted = granted;
        }
    }

    /// Data sends we may post now.
    pub fn available(&self) -> u32 {
        let a = self.granted.wrapping_sub(self.sent);
        if a < 1 << 31 { a } else { 0 }
    }

    /// A data send was posted (uses one credit).
    pub fn on_send(&mut self) {
        self.sent = self.sent.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_beyond_the_grant_is_an_overrun() {
        let mut c = Credits::default();
        for _ in 0..5 {
            c.on_post_recv();
        }
        assert_eq!(c.take_update(), Some(4));
        for _ in 0..4 {
            c.on_data_received();
            assert!(!c.overrun());
        }
        c.on_data_received();
        assert!(c.overrun(), "a fifth message on a grant of four");
    }

    #[test]
    fn first_receive_is_reserved() {
        let mut c = Credits::default();
        assert_eq!(c.take_update(), None);
        c.on_post_recv();
        assert_eq!(c.grant(), 0);
        assert_eq!(c.take_update(), None);
        for _ in 0..63 {
            c.on_post_recv();
        }
        assert_eq!(c.take_update(), Some(63));
        assert_eq!(c.take_update(), None, "one in flight at a time");
        c.on_update_done();
        assert_eq!(c.take_update(), None, "nothing new");
    }

    #[test]
    fn updates_are_batched_but_never_starve() {
        let mut c = Credits::default();
        for _ in 0..64 {
            c.on_post_recv();
        }
        assert_eq!(c.take_update(), Some(63));
        c.on_update_done();
        // The peer uses 10 and we re-post them: it still has 53, no update.
        for _ in 0..10 {
            c.on_data_received();
            c.on_post_recv();
        }
        assert_eq!(c.take_update(), None);
        // It uses everything: with 0 left, any new receive goes out at once.
        for _ in 0..53 {
            c.on_data_received();
        }
        assert_eq!(c.take_update(), Some(73));
        c.on_update_done();
        c.on_post_recv();
        // 1 new vs 10 left: waits.
        assert_eq!(c.take_update(), None);
        for _ in 0..10 {
            c.on_data_received();
        }
        // 1 new vs 0 left: goes out.
        assert_eq!(c.take_update(), Some(74));
    }

    #[test]
    fn sender_side_and_wraparound() {
        let mut c = Credits { granted: u32::MAX - 1, sent: u32::MAX - 1, ..Default::default() };
        assert_eq!(c.available(), 0);
        c.on_grant(2);
        assert_eq!(c.available(), 4);
        c.on_grant(1); // stale
        assert_eq!(c.available(), 4);
        for _ in 0..4 {
            c.on_send();
        }
        assert_eq!(c.available(), 0);
    }
}
