//! What a receiver checks on every received fabric message before it hands
//! the message on: the immediate, the chain order and, when the receiver
//! can read the landing buffer, the [`FabricHeader`].
//!
//! This is the only code that interprets what a peer put on the wire, so it
//! is a pure function over bytes (fuzzed by `fuzz/fuzz_targets/fabric_recv.rs`):
//! anything a garbage or hostile peer sends is a [`RecvCheckError`], never a
//! panic, and the endpoint fails the connection on it.

use wire::fabric::{FabricDecodeError, FabricHeader, Immediate};

/// Bytes of a [`FabricHeader`].
pub const HEADER_LEN: usize = size_of::<FabricHeader>();

/// A received message that breaks the fabric protocol. Small and `Copy`:
/// it travels in completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvCheckError {
    /// A data send without an immediate (every fabric send carries one).
    #[error("message of {0} bytes without an immediate")]
    NoImmediate(u32),
    /// The immediate has an unknown kind or reserved bits set.
    #[error("bad immediate {0:#010x}")]
    BadImmediate(u32),
    /// A fragment out of chain order (a middle or last fragment with no
    /// chain open, or a first fragment while one is open).
    #[error("fragment out of chain order (immediate {imm:#010x}, chain open: {open})")]
    ChainOrder {
        /// The immediate.
        imm: u32,
        /// Whether a chain was open.
        open: bool,
    },
    /// A chain longer than the receiver accepts.
    #[error("chain longer than {0} fragments")]
    ChainTooLong(u16),
    /// The header in the landed bytes is malformed or disagrees with the
    /// immediate.
    #[error("fabric header: {0}")]
    Header(#[from] FabricDecodeError),
    /// More data messages than this side granted credits for (they took
    /// the receive kept for credit messages).
    #[error("data beyond the credits granted")]
    CreditOverrun,
    /// The header's fragment index is not the next one of the chain.
    #[error("fragment {got}, expected {want}")]
    FragIndex {
        /// Index in the header.
        got: u16,
        /// Next index of the open chain.
        want: u16,
    },
}

/// Position of a received fragment in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frag {
    /// Index in the chain (0 for the first).
    pub index: u16,
    /// The chain ends with this fragment.
    pub last: bool,
}

/// Chain state of one connection's receive direction (messages arrive in
/// order per connection, so one open chain at most).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainState {
    open: bool,
    next: u16,
    /// `frag_count` of the open chain, when a header was read.
    count: Option<u16>,
}

impl ChainState {
    /// Whether a chain is open (its last fragment not yet received).
    pub fn is_open(&self) -> bool {
        self.open
    }
}

/// Checks one received data message: `imm` and `len` from the completion,
/// `header` the first [`HEADER_LEN`] landed bytes when the receiver can
/// read them (`None` for memory it imported and may not read), `max_chain`
/// the longest chain accepted. Advances `chain` only on success.
pub fn check_recv(
    imm: Option<u32>,
    len: u32,
    header: Option<&[u8; HEADER_LEN]>,
    chain: &mut ChainState,
    max_chain: u16,
) -> Result<Frag, RecvCheckError> {
    let imm = imm.ok_or(RecvCheckError::NoImmediate(len))?;
    let i = Immediate(imm);
    if i.kind().is_none() {
        return Err(RecvCheckError::BadImmediate(imm));
    }
    if i.is_first() == chain.open {
        return Err(RecvCheckError::ChainOrder { imm, open: chain.open });
    }
    let index = if chain.open { chain.next } else { 0 };
    if index >= max_chain || (!i.is_last() && index + 1 >= max_chain) {
        return Err(RecvCheckError::ChainTooLong(max_chain));
    }
    let mut count = chain.count;
    if header.is_none() && (len as usize) < HEADER_LEN {
        // Unread, but a data message starts with its header all the same.
        return Err(FabricDecodeError::Short(len as usize).into());
    }
    if let Some(bytes) = header {
        let h = decode_header(bytes, len)?;
        h.check_immediate(imm)?;
        if h.frag_index != index {
            return Err(RecvCheckError::FragIndex { got: h.frag_index, want: index });
        }
        if count.is_some_and(|c| c != h.frag_count) {
            return Err(FabricDecodeError::Fragment { index: h.frag_index, count: h.frag_count }.into());
        }
        count = Some(h.frag_count);
    }
    let last = i.is_last();
    *chain = if last { ChainState::default() } else { ChainState { open: true, next: index + 1, count } };
    Ok(Frag { index, last })
}

/// [`FabricHeader::decode`] for a message of `len` bytes of which only the
/// header was copied out: the payload-length checks are done on `len`.
fn decode_header(bytes: &[u8; HEADER_LEN], len: u32) -> Result<FabricHeader, FabricDecodeError> {
    let received = (len as usize).checked_sub(HEADER_LEN).ok_or(FabricDecodeError::Short(len as usize))?;
    // Decode the header alone (as a message with no payload), then check the
    // announced length against what the completion reports.
    let mut copy = *bytes;
    let announced = u32::from_le_bytes([copy[8], copy[9], copy[10], copy[11]]);
    copy[8..12].copy_from_slice(&0u32.to_le_bytes());
    let (mut h, _) = FabricHeader::decode(&copy)?;
    h.frag_len = announced;
    if announced as usize != received {
        return Err(FabricDecodeError::Length { announced, received });
    }
    if announced > h.desc.len {
        return Err(FabricDecodeError::ChainLength { frag_len: announced, total: h.desc.len });
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::Descriptor;
    use wire::fabric::MsgKind;
    use zerocopy::IntoBytes;

    fn hdr(index: u16, count: u16, frag_len: u32, total: u32) -> [u8; HEADER_LEN] {
        let d = Descriptor { tenant: 1, dst_fn: 9, len: total, ..Default::default() };
        let h = FabricHeader::new(MsgKind::Data, d, index, count, frag_len);
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(h.as_bytes());
        out
    }

    fn imm(first: bool, last: bool) -> Option<u32> {
        Some(Immediate::new(MsgKind::Data as u8, 9, first, last).0)
    }

    #[test]
    fn chain_of_three_with_headers() {
        let mut c = ChainState::default();
        let f = check_recv(imm(true, false), 50, Some(&hdr(0, 3, 10, 30)), &mut c, 8).unwrap();
        assert_eq!(f, Frag { index: 0, last: false });
        assert!(c.is_open());
        check_recv(imm(false, false), 50, Some(&hdr(1, 3, 10, 30)), &mut c, 8).unwrap();
        let f = check_recv(imm(false, true), 50, Some(&hdr(2, 3, 10, 30)), &mut c, 8).unwrap();
        assert_eq!(f, Frag { index: 2, last: true });
        assert!(!c.is_open());
    }

    #[test]
    fn garbage_is_typed() {
        let mut c = ChainState::default();
        assert_eq!(check_recv(None, 5, None, &mut c, 8), Err(RecvCheckError::NoImmediate(5)));
        assert_eq!(check_recv(Some(u32::MAX), 5, None, &mut c, 8), Err(RecvCheckError::BadImmediate(u32::MAX)));
        assert!(matches!(check_recv(imm(false, true), 5, None, &mut c, 8), Err(RecvCheckError::ChainOrder { .. })));
        let short = check_recv(imm(true, true), 10, Some(&hdr(0, 1, 10, 10)), &mut c, 8);
        assert_eq!(short, Err(RecvCheckError::Header(FabricDecodeError::Short(10))));
        let lying = check_recv(imm(true, true), 60, Some(&hdr(0, 1, 10, 10)), &mut c, 8);
        assert_eq!(lying, Err(RecvCheckError::Header(FabricDecodeError::Length { announced: 10, received: 20 })));
        let mut junk = [0xAB; HEADER_LEN];
        junk[0] = 0;
        assert!(matches!(check_recv(imm(true, true), 60, Some(&junk), &mut c, 8), Err(RecvCheckError::Header(_))));
        // Wrong index in the header.
        let wrong = check_recv(imm(true, false), 50, Some(&hdr(1, 3, 10, 30)), &mut c, 8);
        assert!(matches!(wrong, Err(RecvCheckError::Header(_)) | Err(RecvCheckError::FragIndex { .. })));
        assert!(!c.is_open(), "failed checks leave the state as it was");
    }

    #[test]
    fn chain_length_is_bounded() {
        let mut c = ChainState::default();
        let n = HEADER_LEN as u32;
        check_recv(imm(true, false), n, None, &mut c, 2).unwrap();
        assert_eq!(check_recv(imm(false, false), n, None, &mut c, 2), Err(RecvCheckError::ChainTooLong(2)));
        check_recv(imm(false, true), n, None, &mut c, 2).unwrap();
    }

    /// Memory the receiver may not read (imported) still holds a header
    /// before the payload: a shorter message is refused.
    #[test]
    fn an_unread_message_shorter_than_a_header_is_refused() {
        let mut c = ChainState::default();
        let short = check_recv(imm(true, true), HEADER_LEN as u32 - 1, None, &mut c, 8);
        assert_eq!(short, Err(RecvCheckError::Header(FabricDecodeError::Short(HEADER_LEN - 1))));
        assert!(!c.is_open());
        check_recv(imm(true, true), HEADER_LEN as u32, None, &mut c, 8).unwrap();
    }
}
