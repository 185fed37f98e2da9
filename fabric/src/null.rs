//! [`NullTransport`]: a fabric with no wire. Every send completes at once
//! (the payload goes nowhere) and the peer behind each connection is
//! ideal: it consumes what arrives instantly, re-posts its receive, and
//! grants the credits back by the same rule a real receiver follows (a
//! credit message when the new grant at least doubles what the sender has
//! left). Nothing ever arrives but those credit messages.
//!
//! It exists to measure what sits above the transport (the endpoint, the
//! port, the agent's engine) with the transport's cost taken out: the
//! `engine` benchmark runs the agent over it. No allocation per operation:
//! the completion queue and every table are sized when a connection opens.

use crate::{CompletionError, ConnDepth, ConnId, ConnSetupError, Memory, RawCompletion, RawPostError, RegionId};
use crate::{RegionRegisterError, Transport};
use std::collections::VecDeque;

/// Receives the ideal peer keeps back for our credit messages, as
/// [`crate::credit::RESERVE`].
const PEER_RESERVE: u32 = crate::credit::RESERVE;

#[derive(Debug)]
struct Conn {
    depth: ConnDepth,
    up: bool,
    /// Aborted: its failure was reported (once, as a real backend does,
    /// connected or not).
    aborted: bool,
    /// Our receives posted (their `user_data`), oldest first.
    recvs: VecDeque<u64>,
    /// Data sends we have posted (cumulative, mod 2^32).
    sent: u32,
    /// The peer's cumulative grant: its receives beyond its reserve, plus
    /// one for every message it consumed.
    grant: u32,
    /// The grant last sent to us.
    advertised: u32,
}

/// The wire-less transport; see the module docs.
#[derive(Debug, Default)]
pub struct NullTransport {
    regions: Vec<Option<u64>>,
    conns: Vec<Option<Conn>>,
    out: VecDeque<RawCompletion>,
}

impl NullTransport {
    /// A transport with nothing registered or open.
    pub fn new() -> Self {
        Self::default()
    }

    fn conn(&mut self, id: ConnId) -> Result<&mut Conn, RawPostError> {
        match self.conns.get_mut(id.0 as usize) {
            Some(Some(c)) if c.up => Ok(c),
            Some(Some(_)) => Err(RawPostError::Conn(CompletionError::Closed)),
            _ => Err(RawPostError::Invalid),
        }
    }

    fn in_range(&self, (region, offset, len): (RegionId, u64, u32)) -> bool {
        matches!(self.regions.get(region.0 as usize), Some(Some(n)) if offset.saturating_add(u64::from(len)) <= *n)
    }
}

impl Transport for NullTransport {
    fn name(&self) -> &'static str {
        "null"
    }

    fn register(&mut self, id: RegionId, mem: Memory<'_>) -> Result<(), RegionRegisterError> {
        let len = match mem {
            Memory::Local(region) => region.len() as u64,
            // An export blob names memory elsewhere; nothing is ever read.
            Memory::Export(_) => u64::MAX,
        };
        let i = id.0 as usize;
        if self.regions.len() <= i {
            self.regions.resize(i + 1, None);
        }
        self.regions[i] = Some(len);
        Ok(())
    }

    fn region_len(&self, id: RegionId) -> Option<u64> {
        self.regions.get(id.0 as usize).copied().flatten()
    }

    fn open(&mut self, id: ConnId, depth: ConnDepth) -> Result<Vec<u8>, ConnSetupError> {
        let i = id.0 as usize;
        if self.conns.len() <= i {
            self.conns.resize_with(i + 1, || None);
        }
        let grant = depth.recvs.saturating_sub(PEER_RESERVE);
        self.conns[i] = Some(Conn {
            depth,
            up: false,
            aborted: false,
            recvs: VecDeque::with_capacity(depth.recvs as usize + 1),
            sent: 0,
            grant,
            advertised: 0,
        });
        // Room for every operation the new connection can have outstanding.
        let more = (depth.sends + depth.recvs) as usize + 4;
        self.out.reserve(more);
        Ok(b"null".to_vec())
    }

    fn connect(&mut self, id: ConnId, _blob: &[u8]) -> Result<(), ConnSetupError> {
        match self.conns.get_mut(id.0 as usize) {
            Some(Some(c)) => {
                c.up = true;
                self.out.push_back(RawCompletion::Connected(id));
                Ok(())
            }
            _ => Err(ConnSetupError::Unknown),
        }
    }

    fn send(
        &mut self,
        conn: ConnId,
        src: Option<(RegionId, u64, u32)>,
        _imm: Option<u32>,
        user_data: u64,
    ) -> Result<(), RawPostError> {
        if let Some(s) = src
            && (!self.in_range(s) || s.2 > self.conn(conn)?.depth.max_msg)
        {
            return Err(RawPostError::Invalid);
        }
        let c = self.conn(conn)?;
        if src.is_some() {
            // A data message: the peer takes it and re-posts at once.
            c.sent = c.sent.wrapping_add(1);
            c.grant = c.grant.wrapping_add(1);
        }
        self.out.push_back(RawCompletion::Sent { conn, user_data, result: Ok(()) });
        Ok(())
    }

    fn recv(&mut self, conn: ConnId, dst: (RegionId, u64, u32), user_data: u64) -> Result<(), RawPostError> {
        if !self.in_range(dst) {
            return Err(RawPostError::Invalid);
        }
        let c = self.conn(conn)?;
        if c.recvs.len() >= c.depth.recvs as usize {
            return Err(RawPostError::Busy);
        }
        c.recvs.push_back(user_data);
        Ok(())
    }

    fn poll(&mut self, out: &mut [RawCompletion]) -> usize {
        // The ideal peer's credit messages, by the real receiver's rule.
        for (i, c) in self.conns.iter_mut().enumerate() {
            let Some(c) = c.as_mut().filter(|c| c.up) else { continue };
            let left = c.advertised.wrapping_sub(c.sent);
            let would = c.grant.wrapping_sub(c.sent);
            if c.grant != c.advertised
                && would >= left.saturating_mul(2)
                && let Some(ud) = c.recvs.pop_front()
            {
                c.advertised = c.grant;
                let conn = ConnId(i as u32);
                self.out.push_back(RawCompletion::Recv {
                    conn,
                    user_data: ud,
                    len: 0,
                    imm: Some(c.grant),
                    result: Ok(()),
                });
            }
        }
        let n = out.len().min(self.out.len());
        for (slot, c) in out.iter_mut().zip(self.out.drain(..n)) {
            *slot = c;
        }
        n
    }

    fn abort(&mut self, conn: ConnId) {
        let Some(Some(c)) = self.conns.get_mut(conn.0 as usize) else { return };
        if c.aborted {
            return;
        }
        c.aborted = true;
        c.up = false;
        self.out.push_back(RawCompletion::ConnFailed(conn, CompletionError::Closed));
        for ud in c.recvs.drain(..) {
            self.out.push_back(RawCompletion::Recv {
                conn,
                user_data: ud,
                len: 0,
                imm: None,
                result: Err(CompletionError::Closed),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Completion, Endpoint, EndpointConfig};

    fn cfg() -> EndpointConfig {
        EndpointConfig {
            max_conns: 4,
            max_regions: 2,
            send_window: 8,
            recv_depth: 8,
            send_queue: 64,
            max_msg: 4096,
            max_chain: 4,
            batch: 16,
        }
    }

    #[test]
    fn sends_complete_and_credits_keep_coming_back() {
        let mut ep = Endpoint::new(NullTransport::new(), cfg());
        let region = std::sync::Arc::new(shm::Region::create("null-test", 1 << 20, shm::PagePolicy::Normal).unwrap());
        let r = ep.register(Memory::Local(region)).unwrap();
        let (c, blob) = ep.open(crate::ConnSpec { tenant: 0, peer: 1 }).unwrap();
        ep.connect(c, &blob).unwrap();
        for k in 0..8u64 {
            ep.post_recv(c, crate::RecvWr { region: r, offset: 65536 + k * 4096, len: 4096, token: k }).unwrap();
        }
        let mut comps = vec![Completion::EMPTY; 64];
        let (mut up, mut sent) = (false, 0u32);
        // Far more sends than the peer's receive depth: only the credits it
        // grants back let them through.
        let mut posted = 0u32;
        for _ in 0..10_000 {
            if up && posted < 1000 && ep.credits(c) > 0 {
                let wr = crate::SendWr {
                    region: r,
                    offset: 0,
                    len: 64,
                    imm: wire::Immediate::new(wire::MsgKind::Data as u8, 1, true, true).0,
                    token: u64::from(posted),
                };
                ep.post_send(c, wr).unwrap();
                posted += 1;
            }
            let n = ep.poll(&mut comps);
            for comp in &comps[..n] {
                match comp {
                    Completion::Connected(_) => up = true,
                    Completion::Sent { result: Ok(()), .. } => sent += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(sent, 1000);
    }

    /// A closed connection's id is reused only once the backend has
    /// reported the close: a report that came after the reuse would fail
    /// the new connection that has its id (the backend's failure of the
    /// old one is queued when it is aborted).
    #[test]
    fn a_closed_connection_is_reused_only_after_its_failure_was_reported() {
        let mut ep = Endpoint::new(NullTransport::new(), cfg());
        let spec = crate::ConnSpec { tenant: 0, peer: 1 };
        let mut comps = vec![Completion::EMPTY; 64];
        let mut poll = |ep: &mut Endpoint<NullTransport>| {
            let n = ep.poll(&mut comps);
            comps[..n].to_vec()
        };
        let (c, blob) = ep.open(spec).unwrap();
        ep.connect(c, &blob).unwrap();
        assert_eq!(poll(&mut ep), [Completion::Connected(c)]);
        ep.close(c);
        let (other, _) = ep.open(spec).unwrap();
        assert_ne!(other, c, "the close is not reported yet: its id is not free");
        assert_eq!(poll(&mut ep), [Completion::ConnFailed { conn: c, error: CompletionError::Closed }]);
        ep.close(other);
        assert_eq!(poll(&mut ep), [Completion::ConnFailed { conn: other, error: CompletionError::Closed }]);
        let (again, blob) = ep.open(spec).unwrap();
        assert_eq!(again, c, "reported: reused");
        ep.connect(again, &blob).unwrap();
        assert_eq!(poll(&mut ep), [Completion::Connected(c)]);
        for _ in 0..10 {
            assert_eq!(poll(&mut ep), [], "nothing left over from the old connection");
        }
    }
}
