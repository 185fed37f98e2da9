//! The host link of `mode = "dpu"` (DESIGN.md sections 1 and 3): what
//! host-shimd's bridge ([`crate::bridge`]) and the agent on the DPU
//! (`dpu-agent`'s `comchlink`) exchange over DOCA comch, and the batching
//! both sides use.
//!
//! Protocol: control frames ([`wire::ctrl`]), several per comch message.
//! * host -> agent: [`CtrlMsg::PoolExport`] once per tenant when the
//!   connection comes up (the DOCA mmap PCI export of the tenant pool);
//!   [`CtrlMsg::Message`] for every message a function sent to another node
//!   (the host wrote the fabric headers; the buffers are now the agent's:
//!   `Owner::Agent` in the pool); [`CtrlMsg::LendRecv`]: buffers to post
//!   receives with.
//! * agent -> host: [`CtrlMsg::Ack`] of the `PoolExport` kind once it has
//!   imported every pool (the host hands it no message and lends it no
//!   buffer before: an agent that cannot take the exports, of another
//!   version or with another cluster file, is given nothing to strand);
//!   [`CtrlMsg::WantBufs`]; [`CtrlMsg::Message`] to deliver
//!   to a local function (`FROM_FABRIC`: the host completes the descriptor
//!   from the header; `RESTAMP`: write the headers again and send it back);
//!   [`CtrlMsg::ReturnBufs`].
//! * host -> agent, added later: [`CtrlMsg::Lost`], a message the agent
//!   handed over whose instance died as the host delivered it (its
//!   buffers went back to the pool): the agent answers a call `PeerDied`.
//!   The protocol version did not change for it. The host sends each
//!   `Lost` alone in its comch message ([`Outbox::push_alone`]), so an
//!   agent of an earlier build, which cannot decode it, refuses that frame
//!   only (and the call's caller waits for its timeout, as before); a
//!   host of an earlier build never sends it.
//!
//! Every buffer the agent holds is `Owner::Agent` in the host's pool, and
//! the host takes a buffer back only if it is: an agent that names a buffer
//! it does not hold is refused, and when the connection goes away the host
//! frees every buffer still recorded as the agent's, after a grace
//! ([`crate::bridge::AGENT_GONE_GRACE`]: the agent may be alive, its
//! receives still posted in them, until it notices), and does not let an
//! agent of a later connection take them back meanwhile.

use std::collections::VecDeque;
use wire::ctrl::{CtrlDecodeError, CtrlFrame, CtrlMsg};

/// The comch server name of a node's agent ([`config::Node::comch_name`]).
pub fn server_name(node: &config::Node) -> String {
    node.comch_name()
}

/// Frames to send, packed into comch messages of at most `max` bytes.
/// Sends that the context refuses for lack of send tasks
/// (`DocaError::NO_MEMORY`) stay queued here (a copy, made only then) and
/// go first at the next [`flush`](Self::flush).
#[derive(Debug)]
pub struct Outbox {
    buf: Vec<u8>,
    len: usize,
    waiting: VecDeque<Vec<u8>>,
    seq: u32,
}

impl Outbox {
    /// An outbox for comch messages of up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: vec![0; max], len: 0, waiting: VecDeque::new(), seq: 0 }
    }

    /// Whether nothing waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.waiting.is_empty()
    }

    /// Adds a frame; sends the current message first when the frame does
    /// not fit. `Err` only when the connection is gone.
    pub fn push(
        &mut self,
        msg: CtrlMsg<'_>,
        send: &mut impl FnMut(&[u8]) -> Result<(), doca::DocaError>,
    ) -> Result<(), doca::DocaError> {
        let f = CtrlFrame { seq: self.seq, msg };
        self.seq = self.seq.wrapping_add(1);
        if f.encoded_len() > self.buf.len() - self.len {
            self.flush(send)?;
            if self.len > 0 {
                self.waiting.push_back(self.buf[..self.len].to_vec());
                self.len = 0;
            }
        }
        match f.encode(&mut self.buf[self.len..]) {
            Ok(n) => self.len += n,
            // A frame larger than a comch message: a caller bug, never the
            // peer's doing.
            Err(e) => log::error!("host link: a {:?} frame does not fit a comch message: {e}", msg.kind()),
        }
        Ok(())
    }

    /// Adds a frame that travels alone in its comch message (a kind a peer
    /// of an earlier build may not decode: [`each_frame`] stops at the
    /// first frame it cannot decode, and the frames after it in the same
    /// message would be lost with it). `Err` only when the connection is
    /// gone.
    pub fn push_alone(
        &mut self,
        msg: CtrlMsg<'_>,
        send: &mut impl FnMut(&[u8]) -> Result<(), doca::DocaError>,
    ) -> Result<(), doca::DocaError> {
        self.seal(send)?;
        self.push(msg, send)?;
        self.seal(send)
    }

    /// Closes the message being filled: sent now if the context takes it,
    /// else queued as it is. `Err` only when the connection is gone.
    fn seal(&mut self, send: &mut impl FnMut(&[u8]) -> Result<(), doca::DocaError>) -> Result<(), doca::DocaError> {
        self.flush(send)?;
        if self.len > 0 {
            self.waiting.push_back(self.buf[..self.len].to_vec());
            self.len = 0;
        }
        Ok(())
    }

    /// Sends what is queued, oldest first, until the context has no send
    /// task free. `Err` only when the connection is gone.
    pub fn flush(
        &mut self,
        send: &mut impl FnMut(&[u8]) -> Result<(), doca::DocaError>,
    ) -> Result<(), doca::DocaError> {
        while let Some(m) = self.waiting.front() {
            match send(m) {
                Ok(()) => {
                    self.waiting.pop_front();
                }
                Err(doca::DocaError::NO_MEMORY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.len > 0 {
            match send(&self.buf[..self.len]) {
                Ok(()) => self.len = 0,
                Err(doca::DocaError::NO_MEMORY) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Forgets everything queued (the connection went away).
    pub fn clear(&mut self) {
        self.len = 0;
        self.waiting.clear();
    }
}

/// Calls `f` with each frame of one comch message; stops at the first
/// frame that does not decode and returns its error (the rest of that
/// message is not trusted).
pub fn each_frame(msg: &[u8], mut f: impl FnMut(CtrlMsg<'_>)) -> Result<(), CtrlDecodeError> {
    let mut at = 0;
    while at < msg.len() {
        let (frame, used) = CtrlFrame::decode(&msg[at..])?;
        f(frame.msg);
        at += used;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::ctrl::{BufList, LendRecv};

    fn lend(tenant: u16, bufs: &[u32]) -> CtrlMsg<'_> {
        CtrlMsg::LendRecv(LendRecv { tenant, reserved: 0, count: bufs.len() as u32 }, BufList::from_indices(bufs))
    }

    #[test]
    fn frames_are_packed_split_at_the_cap_and_kept_while_the_context_is_busy() {
        let mut ob = Outbox::new(100);
        let mut sent: Vec<Vec<u8>> = Vec::new();
        // The context has no send task free: everything stays queued.
        let mut busy = |_: &[u8]| Err(doca::DocaError::NO_MEMORY);
        // Each frame is 16 + 8 + 4k bytes: 40 for four indices.
        for t in 0..5u16 {
            ob.push(lend(t, &[1, 2, 3, 4]), &mut busy).unwrap();
        }
        assert!(!ob.is_empty());
        let mut send = |m: &[u8]| {
            sent.push(m.to_vec());
            Ok(())
        };
        ob.flush(&mut send).unwrap();
        assert!(ob.is_empty());
        assert!(sent.iter().all(|m| m.len() <= 100));
        let mut tenants = Vec::new();
        for m in &sent {
            each_frame(m, |f| {
                if let CtrlMsg::LendRecv(b, list) = f {
                    assert_eq!(list.iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
                    tenants.push(b.tenant);
                }
            })
            .unwrap();
        }
        assert_eq!(tenants, [0, 1, 2, 3, 4], "every frame, in order");
    }

    /// A frame pushed alone has a comch message of its own, whether the
    /// context takes it at once or it waits for a send task.
    #[test]
    fn a_frame_pushed_alone_travels_in_a_message_of_its_own() {
        let lost = CtrlMsg::Lost(wire::ctrl::Lost { desc: wire::Descriptor::default(), reserved: 0 });
        for busy in [false, true] {
            let mut ob = Outbox::new(1000);
            let mut sent: Vec<Vec<u8>> = Vec::new();
            let mut send = |m: &[u8]| {
                if busy {
                    return Err(doca::DocaError::NO_MEMORY);
                }
                sent.push(m.to_vec());
                Ok(())
            };
            ob.push(lend(0, &[1]), &mut send).unwrap();
            ob.push_alone(lost, &mut send).unwrap();
            ob.push(lend(1, &[2]), &mut send).unwrap();
            let mut ok = |m: &[u8]| {
                sent.push(m.to_vec());
                Ok(())
            };
            ob.flush(&mut ok).unwrap();
            let kinds: Vec<Vec<_>> = sent
                .iter()
                .map(|m| {
                    let mut k = Vec::new();
                    each_frame(m, |f| k.push(f.kind())).unwrap();
                    k
                })
                .collect();
            use wire::ctrl::CtrlKind::{LendRecv, Lost};
            assert_eq!(kinds, [vec![LendRecv], vec![Lost], vec![LendRecv]], "busy: {busy}");
        }
    }

    #[test]
    fn a_gone_connection_is_an_error_and_garbage_stops_the_message() {
        let mut ob = Outbox::new(100);
        let mut gone = |_: &[u8]| Err(doca::DocaError::NOT_CONNECTED);
        ob.push(lend(0, &[1]), &mut gone).unwrap();
        assert_eq!(ob.flush(&mut gone), Err(doca::DocaError::NOT_CONNECTED));
        let mut ok = |_: &[u8]| Ok(());
        ob.clear();
        assert!(ob.is_empty());
        ob.flush(&mut ok).unwrap();
        let mut seen = 0;
        assert!(each_frame(&[0xde, 0xad, 0xbe, 0xef], |_| seen += 1).is_err());
        assert_eq!(seen, 0);
    }
}
