//! What travels in one fabric (two-sided RDMA) send.
//!
//! Every pool buffer reserves [`HEADROOM`] bytes at its front. The sender (the
//! host shim for function messages, the ingress for requests, the agent for
//! its own control messages) writes a [`FabricHeader`] there, so one send
//! carries header and payload straight from the buffer, and the receiver's NIC
//! lands both in a receive buffer of the same layout: the payload is at the
//! same offset on both sides and is handed on without a copy. A chain of `n`
//! buffers travels as `n` sends on one connection, in order, each with its own
//! header (`frag_index` 0..n); only the payload bytes of each buffer are sent.
//!
//! The 32-bit immediate repeats the kind and destination function
//! ([`Immediate`]) so the receiver can dispatch from the completion alone, and
//! checks it against the header.

use crate::desc::Descriptor;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic in the first two bytes of every fabric header.
pub const FABRIC_MAGIC: u16 = 0xD7E1;
/// Version of the fabric header.
pub const FABRIC_VERSION: u8 = 1;
/// Bytes reserved at the front of every pool buffer for the fabric header.
pub const HEADROOM: u32 = 64;
/// Offset of the [`FabricHeader`] in a buffer: the last bytes of the
/// headroom, right before the payload, so header and payload leave (and
/// land) as one contiguous send.
pub const HEADER_OFFSET: u32 = HEADROOM - size_of::<FabricHeader>() as u32;

/// Kind of a fabric message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgKind {
    /// One fragment of a function message (request, reply or error).
    Data = 1,
    /// The payload is one control frame ([`crate::ctrl`]), e.g. credits.
    Control = 2,
}

impl MsgKind {
    /// Decodes a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Data),
            2 => Some(Self::Control),
            _ => None,
        }
    }
}

/// Header at the front of every fabric send, 40 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FabricHeader {
    /// [`FABRIC_MAGIC`].
    pub magic: u16,
    /// [`FABRIC_VERSION`].
    pub version: u8,
    /// [`MsgKind`].
    pub kind: u8,
    /// Index of this fragment in its chain.
    pub frag_index: u16,
    /// Fragments in the chain (at least 1).
    pub frag_count: u16,
    /// Payload bytes following the header in this send.
    pub frag_len: u32,
    /// The message's descriptor as the sender knows it. `desc.buf` is the
    /// sender's buffer index and means nothing to the receiver, which
    /// substitutes its own; `desc.len` is the length of the whole chain.
    pub desc: Descriptor,
}
const _: () = assert!(size_of::<FabricHeader>() == 40);
const _: () = assert!(size_of::<FabricHeader>() as u32 <= HEADROOM);

/// A fabric send that must be rejected (and its connection failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FabricDecodeError {
    /// Fewer bytes than a header.
    #[error("message of {0} bytes is shorter than the fabric header")]
    Short(usize),
    /// Not a DNE fabric message.
    #[error("bad fabric magic {0:#06x}")]
    BadMagic(u16),
    /// Another protocol version.
    #[error("fabric version {0}, this build speaks {FABRIC_VERSION}")]
    Version(u8),
    /// Unknown kind.
    #[error("unknown fabric message kind {0}")]
    Kind(u8),
    /// Fragment numbering is impossible.
    #[error("fragment {index} of {count}")]
    Fragment {
        /// Index.
        index: u16,
        /// Count.
        count: u16,
    },
    /// `frag_len` disagrees with the bytes received.
    #[error("header announces {announced} payload bytes, {received} received")]
    Length {
        /// Bytes announced by the header.
        announced: u32,
        /// Bytes after the header in the completion.
        received: usize,
    },
    /// The chain's total length cannot hold this fragment.
    #[error("fragment length {frag_len} exceeds the chain length {total}")]
    ChainLength {
        /// Fragment length.
        frag_len: u32,
        /// Chain length.
        total: u32,
    },
    /// The embedded descriptor has bad flags, status or reserved bits.
    #[error("embedded descriptor: {0}")]
    Descriptor(#[from] crate::DescriptorError),
    /// The immediate disagrees with the header.
    #[error("immediate {0:#010x} disagrees with the header")]
    Immediate(u32),
}

impl FabricHeader {
    /// The header of fragment `frag_index` of `frag_count`, carrying
    /// `frag_len` payload bytes of the message `desc`.
    pub fn new(kind: MsgKind, desc: Descriptor, frag_index: u16, frag_count: u16, frag_len: u32) -> Self {
        Self { magic: FABRIC_MAGIC, version: FABRIC_VERSION, kind: kind as u8, frag_index, frag_count, frag_len, desc }
    }

    /// Decodes and checks the bytes of one received send: `msg` starts at the
    /// front of the receive buffer and is as long as the completion reports.
    /// Returns the header and the payload bytes.
    pub fn decode(msg: &[u8]) -> Result<(FabricHeader, &[u8]), FabricDecodeError> {
        let (h, payload) = FabricHeader::read_from_prefix(msg).map_err(|_| FabricDecodeError::Short(msg.len()))?;
        if h.magic != FABRIC_MAGIC {
            return Err(FabricDecodeError::BadMagic(h.magic));
        }
        if h.version != FABRIC_VERSION {
            return Err(FabricDecodeError::Version(h.version));
        }
        if MsgKind::from_u8(h.kind).is_none() {
            return Err(FabricDecodeError::Kind(h.kind));
        }
        if h.frag_count == 0 || h.frag_index >= h.frag_count {
            return Err(FabricDecodeError::Fragment { index: h.frag_index, count: h.frag_count });
        }
        if h.frag_len as usize != payload.len() {
            return Err(FabricDecodeError::Length { announced: h.frag_len, received: payload.len() });
        }
        if h.frag_len > h.desc.len {
            return Err(FabricDecodeError::ChainLength { frag_len: h.frag_len, total: h.desc.len });
        }
        h.desc.validate_fields()?;
        Ok((h, payload))
    }

    /// Checks the header at the front of `bytes`, read from the first
    /// buffer of a message that landed in memory its receiver could not
    /// read (the DPU agent's import of a host pool): the agent saw only
    /// the immediate's destination `dst_fn`, the number of fragments
    /// `frags` and their total payload `len`; the header must agree with
    /// all three. Returns the descriptor it carries.
    pub fn check_landed(bytes: &[u8], dst_fn: u16, frags: usize, len: u32) -> Result<Descriptor, FabricDecodeError> {
        let (h, _) = FabricHeader::read_from_prefix(bytes).map_err(|_| FabricDecodeError::Short(bytes.len()))?;
        if h.magic != FABRIC_MAGIC {
            return Err(FabricDecodeError::BadMagic(h.magic));
        }
        if h.version != FABRIC_VERSION {
            return Err(FabricDecodeError::Version(h.version));
        }
        if h.kind != MsgKind::Data as u8 {
            return Err(FabricDecodeError::Kind(h.kind));
        }
        if h.frag_index != 0 || usize::from(h.frag_count) != frags {
            return Err(FabricDecodeError::Fragment { index: h.frag_index, count: h.frag_count });
        }
        if h.desc.len != len {
            return Err(FabricDecodeError::Length { announced: h.desc.len, received: len as usize });
        }
        if h.frag_len > h.desc.len {
            return Err(FabricDecodeError::ChainLength { frag_len: h.frag_len, total: h.desc.len });
        }
        if h.desc.dst_fn != dst_fn {
            return Err(FabricDecodeError::Immediate(Immediate::new(h.kind, dst_fn, true, frags == 1).0));
        }
        h.desc.validate_fields()?;
        Ok(h.desc)
    }

    /// Checks the completion's immediate against this header.
    pub fn check_immediate(&self, imm: u32) -> Result<(), FabricDecodeError> {
        let want =
            Immediate::new(self.kind, self.desc.dst_fn, self.frag_index == 0, self.frag_index + 1 == self.frag_count);
        if want.0 == imm { Ok(()) } else { Err(FabricDecodeError::Immediate(imm)) }
    }
}

/// The 32-bit immediate of a fabric send:
/// bits 0..16 destination function, 16..24 [`MsgKind`], bit 24 first
/// fragment, bit 25 last fragment, bits 26..32 zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Immediate(pub u32);

impl Immediate {
    /// Flag: first fragment of a chain.
    pub const FIRST: u32 = 1 << 24;
    /// Flag: last fragment of a chain.
    pub const LAST: u32 = 1 << 25;

    /// Encodes an immediate.
    pub fn new(kind: u8, dst_fn: u16, first: bool, last: bool) -> Self {
        let mut v = u32::from(dst_fn) | u32::from(kind) << 16;
        if first {
            v |= Self::FIRST;
        }
        if last {
            v |= Self::LAST;
        }
        Self(v)
    }

    /// Destination function.
    pub fn dst_fn(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// Message kind, if known and the reserved bits are clear.
    pub fn kind(self) -> Option<MsgKind> {
        if self.0 >> 26 != 0 {
            return None;
        }
        MsgKind::from_u8(((self.0 >> 16) & 0xFF) as u8)
    }

    /// First fragment of a chain.
    pub fn is_first(self) -> bool {
        self.0 & Self::FIRST != 0
    }

    /// Last fragment of a chain.
    pub fn is_last(self) -> bool {
        self.0 & Self::LAST != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_landed_header_must_agree_with_what_the_agent_saw() {
        let desc = Descriptor { tenant: 1, dst_fn: 4, src_fn: 2, request: 9, len: 20_000, ..Descriptor::default() };
        let h = FabricHeader::new(MsgKind::Data, desc, 0, 2, 16_000);
        let b = h.as_bytes();
        assert_eq!(FabricHeader::check_landed(b, 4, 2, 20_000), Ok(desc));
        assert!(matches!(FabricHeader::check_landed(b, 5, 2, 20_000), Err(FabricDecodeError::Immediate(_))));
        assert!(matches!(FabricHeader::check_landed(b, 4, 3, 20_000), Err(FabricDecodeError::Fragment { .. })));
        assert!(matches!(FabricHeader::check_landed(b, 4, 2, 19_999), Err(FabricDecodeError::Length { .. })));
        assert_eq!(FabricHeader::check_landed(&b[..10], 4, 2, 20_000), Err(FabricDecodeError::Short(10)));
        let second = FabricHeader::new(MsgKind::Data, desc, 1, 2, 4_000);
        assert!(matches!(
            FabricHeader::check_landed(second.as_bytes(), 4, 2, 20_000),
            Err(FabricDecodeError::Fragment { index: 1, .. })
        ));
        let bad = FabricHeader::new(MsgKind::Data, Descriptor { reserved: 3, ..desc }, 0, 2, 16_000);
        assert!(matches!(
            FabricHeader::check_landed(bad.as_bytes(), 4, 2, 20_000),
            Err(FabricDecodeError::Descriptor(_))
        ));
    }
    use proptest::prelude::*;

    fn msg(h: &FabricHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn desc(len: u32) -> Descriptor {
        Descriptor { tenant: 1, dst_fn: 7, len, ..Default::default() }
    }

    #[test]
    fn decode_good_and_bad() {
        let h = FabricHeader::new(MsgKind::Data, desc(5), 0, 1, 5);
        let m = msg(&h, b"hello");
        assert_eq!(FabricHeader::decode(&m), Ok((h, &b"hello"[..])));
        assert_eq!(h.check_immediate(Immediate::new(1, 7, true, true).0), Ok(()));
        assert!(h.check_immediate(Immediate::new(1, 8, true, true).0).is_err());

        assert_eq!(FabricHeader::decode(&m[..10]), Err(FabricDecodeError::Short(10)));
        assert_eq!(FabricHeader::decode(&m[..44]), Err(FabricDecodeError::Length { announced: 5, received: 4 }));
        let bad = |h: FabricHeader| FabricHeader::decode(&msg(&h, b"hello")).unwrap_err();
        assert_eq!(bad(FabricHeader { magic: 1, ..h }), FabricDecodeError::BadMagic(1));
        assert_eq!(bad(FabricHeader { version: 9, ..h }), FabricDecodeError::Version(9));
        assert_eq!(bad(FabricHeader { kind: 9, ..h }), FabricDecodeError::Kind(9));
        assert_eq!(bad(FabricHeader { frag_index: 1, ..h }), FabricDecodeError::Fragment { index: 1, count: 1 });
        assert_eq!(bad(FabricHeader { desc: desc(4), ..h }), FabricDecodeError::ChainLength { frag_len: 5, total: 4 });
        assert!(matches!(
            bad(FabricHeader { desc: Descriptor { flags: 0x100, ..desc(5) }, ..h }),
            FabricDecodeError::Descriptor(_)
        ));
    }

    #[test]
    fn immediate_fields() {
        let i = Immediate::new(MsgKind::Control as u8, 513, false, true);
        assert_eq!(i.dst_fn(), 513);
        assert_eq!(i.kind(), Some(MsgKind::Control));
        assert!(!i.is_first() && i.is_last());
        assert_eq!(Immediate(i.0 | 1 << 30).kind(), None);
        assert_eq!(Immediate(0x00FF_0000).kind(), None);
    }

    proptest! {
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((h, payload)) = FabricHeader::decode(&bytes) {
                prop_assert_eq!(h.frag_len as usize, payload.len());
                prop_assert!(h.frag_index < h.frag_count);
                prop_assert_eq!(payload.len() + 40, bytes.len());
            }
        }

        #[test]
        fn round_trip(dst in any::<u16>(), n in 1u16..100, len in 0usize..100, tenant in any::<u16>()) {
            let payload = vec![0xAB; len];
            let d = Descriptor { tenant, dst_fn: dst, len: len as u32 * 3, ..Default::default() };
            let h = FabricHeader::new(MsgKind::Data, d, n - 1, n, len as u32);
            let m = msg(&h, &payload);
            let (back, p) = FabricHeader::decode(&m).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(back.check_immediate(Immediate::new(1, dst, n == 1, true).0), Ok(()));
        }
    }
}
