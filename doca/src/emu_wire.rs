//! Byte layouts of the emulated backend: the frames of emulated RDMA over
//! TCP, the RDMA connection blob, the mmap export blob, and the packets of
//! emulated comch and its fast path.
//!
//! These mimic hardware formats (RoCE packets, DOCA's opaque export blobs),
//! so they live with the emulation rather than in `wire`, which holds DNE's
//! own layouts. Every byte here may come from a misbehaving or garbage peer:
//! decoding checks every field and returns a typed error; it never panics
//! (fuzzed by `fuzz/fuzz_targets/emu_wire.rs`).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Largest payload of one emulated RDMA send (1 GiB, as DOCA's cap).
pub const MAX_RDMA_MSG: u32 = 1 << 30;

const FRAME_MAGIC: u32 = 0x5245_4e44; // "DNER" little endian
const FRAME_VERSION: u8 = 1;

/// Frame kinds.
const KIND_HELLO: u8 = 1;
const KIND_SEND: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_ERROR: u8 = 4;

const FLAG_IMM: u8 = 1;

/// The fixed header of every frame on an emulated RDMA stream.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FrameHeader {
    magic: U32,
    version: u8,
    kind: u8,
    flags: u8,
    reserved: u8,
    seq: U32,
    len: U32,
    imm: U32,
    reserved2: U32,
    token: U64,
}

/// Bytes of a [`FrameHeader`].
pub const FRAME_LEN: usize = 32;
const _: () = assert!(size_of::<FrameHeader>() == FRAME_LEN);

/// A decoded frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of a stream: names the connection (the token of the
    /// acceptor's exported connection).
    Hello {
        /// Connection token.
        token: u64,
    },
    /// A two-sided send; `len` payload bytes follow.
    Send {
        /// Sequence number on this stream, from 1.
        seq: u32,
        /// Payload bytes that follow the header.
        len: u32,
        /// Immediate value.
        imm: Option<u32>,
    },
    /// Cumulative acknowledgement: every send up to `seq` was placed in a
    /// posted receive (sent back on the same stream, reverse direction).
    Ack {
        /// Last sequence placed.
        seq: u32,
    },
    /// The receiver failed the connection because of send `seq`.
    Error {
        /// The send at fault.
        seq: u32,
        /// The DOCA error code.
        code: i32,
    },
}

/// A frame header that is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameDecodeError {
    /// Fewer than [`FRAME_LEN`] bytes.
    #[error("short frame header ({0} bytes)")]
    Short(usize),
    /// Wrong magic.
    #[error("bad frame magic {0:#x}")]
    Magic(u32),
    /// Another version of the emulation.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// Unknown kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A field that must be zero (or a flag this kind has not) is set.
    #[error("frame field {0} is invalid")]
    Field(&'static str),
    /// A send larger than [`MAX_RDMA_MSG`].
    #[error("send of {0} bytes above the cap")]
    TooLong(u32),
}

impl Frame {
    /// Encodes the frame header.
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut h = FrameHeader { magic: FRAME_MAGIC.into(), version: FRAME_VERSION, ..Default::default() };
        match *self {
            Frame::Hello { token } => {
                h.kind = KIND_HELLO;
                h.token = token.into();
            }
            Frame::Send { seq, len, imm } => {
                h.kind = KIND_SEND;
                h.seq = seq.into();
                h.len = len.into();
                if let Some(imm) = imm {
                    h.flags = FLAG_IMM;
                    h.imm = imm.into();
                }
            }
            Frame::Ack { seq } => {
                h.kind = KIND_ACK;
                h.seq = seq.into();
            }
            Frame::Error { seq, code } => {
                h.kind = KIND_ERROR;
                h.seq = seq.into();
                h.len = U32::new(code as u32);
            }
        }
        let mut out = [0u8; FRAME_LEN];
        out.copy_from_slice(h.as_bytes());
        out
    }

    /// Decodes and checks a frame header.
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameDecodeError> {
        let (h, _) = FrameHeader::read_from_prefix(bytes).map_err(|_| FrameDecodeError::Short(bytes.len()))?;
        if h.magic.get() != FRAME_MAGIC {
            return Err(FrameDecodeError::Magic(h.magic.get()));
        }
        if h.version != FRAME_VERSION {
            return Err(FrameDecodeError::Version(h.version));
        }
        if h.reserved != 0 || h.reserved2.get() != 0 {
            return Err(FrameDecodeError::Field("reserved"));
        }
        let zero = |v: bool, f: &'static str| if v { Ok(()) } else { Err(FrameDecodeError::Field(f)) };
        match h.kind {
            KIND_HELLO => {
                zero(h.flags == 0 && h.seq.get() == 0 && h.len.get() == 0 && h.imm.get() == 0, "hello fields")?;
                zero(h.token.get() != 0, "token")?;
                Ok(Frame::Hello { token: h.token.get() })
            }
            KIND_SEND => {
                zero(h.flags & !FLAG_IMM == 0, "flags")?;
                zero(h.token.get() == 0, "token")?;
                zero(h.seq.get() != 0, "seq")?;
                if h.len.get() > MAX_RDMA_MSG {
                    return Err(FrameDecodeError::TooLong(h.len.get()));
                }
                let imm = if h.flags & FLAG_IMM != 0 {
                    Some(h.imm.get())
                } else {
                    zero(h.imm.get() == 0, "imm")?;
                    None
                };
                Ok(Frame::Send { seq: h.seq.get(), len: h.len.get(), imm })
            }
            KIND_ACK => {
                zero(h.flags == 0 && h.len.get() == 0 && h.imm.get() == 0 && h.token.get() == 0, "ack fields")?;
                Ok(Frame::Ack { seq: h.seq.get() })
            }
            KIND_ERROR => {
                zero(h.flags == 0 && h.imm.get() == 0 && h.token.get() == 0, "error fields")?;
                zero(h.len.get() != 0, "error code")?;
                Ok(Frame::Error { seq: h.seq.get(), code: h.len.get() as i32 })
            }
            k => Err(FrameDecodeError::Kind(k)),
        }
    }
}

/// An export or connection blob that is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlobDecodeError {
    /// Wrong length.
    #[error("blob of {got} bytes, expected {want}")]
    Length {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Wrong magic (not a blob of this kind).
    #[error("bad blob magic")]
    Magic,
    /// Another version of the emulation.
    #[error("unsupported blob version {0}")]
    Version(u16),
    /// A field out of range.
    #[error("blob field {0} is invalid")]
    Field(&'static str),
}

const CONN_MAGIC: [u8; 8] = *b"DNERDMA\0";
const MMAP_MAGIC: [u8; 8] = *b"DNEMMAP\0";
const BLOB_VERSION: u16 = 1;

#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ConnBlobRaw {
    magic: [u8; 8],
    version: U16,
    family: u8,
    reserved: u8,
    port: U16,
    reserved2: U16,
    addr: [u8; 16],
    token: U64,
    max_send: U32,
    reserved3: U32,
}

/// Bytes of an RDMA connection blob.
pub const CONN_BLOB_LEN: usize = 48;
const _: () = assert!(size_of::<ConnBlobRaw>() == CONN_BLOB_LEN);

/// What `Rdma::export` hands out for the peer's `Rdma::connect`: where
/// the exporting context listens and which connection it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnBlob {
    /// Listening address of the exporting context.
    pub addr: std::net::SocketAddr,
    /// The exported connection's token (nonzero).
    pub token: u64,
    /// The exporter's largest send.
    pub max_send: u32,
}

impl ConnBlob {
    /// Encodes the blob.
    pub fn encode(&self) -> [u8; CONN_BLOB_LEN] {
        let mut r = ConnBlobRaw {
            magic: CONN_MAGIC,
            version: BLOB_VERSION.into(),
            port: self.addr.port().into(),
            token: self.token.into(),
            max_send: self.max_send.into(),
            ..Default::default()
        };
        match self.addr.ip() {
            std::net::IpAddr::V4(a) => {
                r.family = 4;
                r.addr[..4].copy_from_slice(&a.octets());
            }
            std::net::IpAddr::V6(a) => {
                r.family = 6;
                r.addr = a.octets();
            }
        }
        let mut out = [0u8; CONN_BLOB_LEN];
        out.copy_from_slice(r.as_bytes());
        out
    }

    /// Decodes and checks a blob.
    pub fn decode(bytes: &[u8]) -> Result<ConnBlob, BlobDecodeError> {
        let r = ConnBlobRaw::read_from_bytes(bytes)
            .map_err(|_| BlobDecodeError::Length { got: bytes.len(), want: CONN_BLOB_LEN })?;
        if r.magic != CONN_MAGIC {
            return Err(BlobDecodeError::Magic);
        }
        if r.version.get() != BLOB_VERSION {
            return Err(BlobDecodeError::Version(r.version.get()));
        }
        if r.reserved != 0 || r.reserved2.get() != 0 || r.reserved3.get() != 0 {
            return Err(BlobDecodeError::Field("reserved"));
        }
        let ip = match r.family {
            4 => {
                if r.addr[4..].iter().any(|b| *b != 0) {
                    return Err(BlobDecodeError::Field("addr"));
                }
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(r.addr[0], r.addr[1], r.addr[2], r.addr[3]))
            }
            6 => std::net::IpAddr::V6(std::net::Ipv6Addr::from(r.addr)),
            _ => return Err(BlobDecodeError::Field("family")),
        };
        if r.port.get() == 0 {
            return Err(BlobDecodeError::Field("port"));
        }
        if r.token.get() == 0 {
            return Err(BlobDecodeError::Field("token"));
        }
        if r.max_send.get() == 0 || r.max_send.get() > MAX_RDMA_MSG {
            return Err(BlobDecodeError::Field("max_send"));
        }
        Ok(ConnBlob {
            addr: std::net::SocketAddr::new(ip, r.port.get()),
            token: r.token.get(),
            max_send: r.max_send.get(),
        })
    }
}

#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct MmapBlobRaw {
    magic: [u8; 8],
    version: U16,
    kind: u8,
    reserved: u8,
    access: U32,
    pid: U32,
    fd: U32,
    st_dev: U64,
    st_ino: U64,
    offset: U64,
    len: U64,
}

/// Bytes of an mmap export blob.
pub const MMAP_BLOB_LEN: usize = 56;
const _: () = assert!(size_of::<MmapBlobRaw>() == MMAP_BLOB_LEN);

/// Which export made a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportKind {
    /// `export_pci`: for the DPU (or host) on the other side of PCIe.
    Pci,
    /// `export_rdma`: for a remote RDMA peer.
    Rdma,
}

/// What the emulated `export_pci`/`export_rdma` hand out: the exporter's
/// memfd as `/proc/<pid>/fd/<fd>` (opening it shares the very pages, and it
/// works from another network namespace of the same host), checked against
/// the file's identity (`st_dev`, `st_ino`) so a reused fd number is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapBlob {
    /// Which export.
    pub kind: ExportKind,
    /// Access rights granted to the importer (`Access` bits).
    pub access: u32,
    /// Exporter's process id.
    pub pid: u32,
    /// The memfd's number in the exporter.
    pub fd: u32,
    /// The memfd's device number.
    pub st_dev: u64,
    /// The memfd's inode number.
    pub st_ino: u64,
    /// Start of the exported range in the file.
    pub offset: u64,
    /// Bytes exported (nonzero).
    pub len: u64,
}

impl MmapBlob {
    /// Encodes the blob.
    pub fn encode(&self) -> [u8; MMAP_BLOB_LEN] {
        let r = MmapBlobRaw {
            magic: MMAP_MAGIC,
            version: BLOB_VERSION.into(),
            kind: match self.kind {
                ExportKind::Pci => 1,
                ExportKind::Rdma => 2,
            },
            reserved: 0,
            access: self.access.into(),
            pid: self.pid.into(),
            fd: self.fd.into(),
            st_dev: self.st_dev.into(),
            st_ino: self.st_ino.into(),
            offset: self.offset.into(),
            len: self.len.into(),
        };
        let mut out = [0u8; MMAP_BLOB_LEN];
        out.copy_from_slice(r.as_bytes());
        out
    }

    /// Decodes and checks a blob.
    pub fn decode(bytes: &[u8]) -> Result<MmapBlob, BlobDecodeError> {
        let r = MmapBlobRaw::read_from_bytes(bytes)
            .map_err(|_| BlobDecodeError::Length { got: bytes.len(), want: MMAP_BLOB_LEN })?;
        if r.magic != MMAP_MAGIC {
            return Err(BlobDecodeError::Magic);
        }
        if r.version.get() != BLOB_VERSION {
            return Err(BlobDecodeError::Version(r.version.get()));
        }
        if r.reserved != 0 {
            return Err(BlobDecodeError::Field("reserved"));
        }
        let kind = match r.kind {
            1 => ExportKind::Pci,
            2 => ExportKind::Rdma,
            _ => return Err(BlobDecodeError::Field("kind")),
        };
        if crate::Access::from_bits(r.access.get()).is_none() {
            return Err(BlobDecodeError::Field("access"));
        }
        if r.pid.get() == 0 || r.pid.get() > i32::MAX as u32 {
            return Err(BlobDecodeError::Field("pid"));
        }
        if r.fd.get() > i32::MAX as u32 {
            return Err(BlobDecodeError::Field("fd"));
        }
        if r.len.get() == 0 || r.offset.get().checked_add(r.len.get()).is_none_or(|e| e > i64::MAX as u64) {
            return Err(BlobDecodeError::Field("range"));
        }
        Ok(MmapBlob {
            kind,
            access: r.access.get(),
            pid: r.pid.get(),
            fd: r.fd.get(),
            st_dev: r.st_dev.get(),
            st_ino: r.st_ino.get(),
            offset: r.offset.get(),
            len: r.len.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Hello { token: 7 },
            Frame::Send { seq: 1, len: 0, imm: None },
            Frame::Send { seq: 9, len: 4096, imm: Some(0xdead_beef) },
            Frame::Ack { seq: 3 },
            Frame::Error { seq: 2, code: 27 },
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        assert_eq!(Frame::decode(&[0; 3]), Err(FrameDecodeError::Short(3)));
        assert!(matches!(Frame::decode(&[0; FRAME_LEN]), Err(FrameDecodeError::Magic(0))));
        let mut bad = Frame::Send { seq: 1, len: 8, imm: None }.encode();
        bad[5] = 77;
        assert_eq!(Frame::decode(&bad), Err(FrameDecodeError::Kind(77)));
        let big = Frame::Send { seq: 1, len: MAX_RDMA_MSG + 1, imm: None }.encode();
        assert_eq!(Frame::decode(&big), Err(FrameDecodeError::TooLong(MAX_RDMA_MSG + 1)));
    }

    #[test]
    fn blobs_round_trip() {
        let c = ConnBlob { addr: "10.1.2.3:4567".parse().unwrap(), token: 99, max_send: 4096 };
        assert_eq!(ConnBlob::decode(&c.encode()), Ok(c));
        let c6 = ConnBlob { addr: "[::1]:80".parse().unwrap(), token: 1, max_send: 1 };
        assert_eq!(ConnBlob::decode(&c6.encode()), Ok(c6));
        assert_eq!(ConnBlob::decode(&[1, 2]), Err(BlobDecodeError::Length { got: 2, want: CONN_BLOB_LEN }));
        let m =
            MmapBlob { kind: ExportKind::Pci, access: 0x21, pid: 5, fd: 3, st_dev: 1, st_ino: 2, offset: 0, len: 4096 };
        assert_eq!(MmapBlob::decode(&m.encode()), Ok(m));
        assert_eq!(MmapBlob::decode(&c.encode()), Err(BlobDecodeError::Length { got: 48, want: 56 }));
        let mut bad = m.encode();
        bad[0] = b'X';
        assert_eq!(MmapBlob::decode(&bad), Err(BlobDecodeError::Magic));
    }

    proptest! {
        #[test]
        fn garbage_never_panics_and_accepted_frames_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(f) = Frame::decode(&bytes) {
                prop_assert_eq!(Frame::decode(&f.encode()), Ok(f));
            }
            if let Ok(b) = ConnBlob::decode(&bytes) {
                prop_assert_eq!(&b.encode()[..], &bytes[..]);
            }
            if let Ok(b) = MmapBlob::decode(&bytes) {
                prop_assert_eq!(&b.encode()[..], &bytes[..]);
            }
        }
    }
}

/// Kind byte of an emulated comch packet: a user message.
pub const COMCH_MSG: u8 = 0;
/// Kind byte of an emulated comch packet: a fast-path consumer started.
pub const COMCH_CONSUMER_UP: u8 = 1;
/// Kind byte of an emulated comch packet: a fast-path consumer stopped.
pub const COMCH_CONSUMER_DOWN: u8 = 2;
/// The longest comch control packet.
pub const COMCH_CTRL_LEN: usize = 13;

/// A packet of an emulated comch connection after the client's hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComchPacket<'a> {
    /// A user message (never empty).
    Msg(&'a [u8]),
    /// The sender started fast-path consumer `id`, listening on the socket
    /// named by `token`.
    ConsumerUp {
        /// The consumer's id.
        id: u32,
        /// Names its socket.
        token: u64,
    },
    /// The sender's consumer `id` stopped.
    ConsumerDown {
        /// The consumer's id.
        id: u32,
    },
}

/// An emulated comch packet that is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ComchPacketError {
    /// A message with no bytes, or no kind byte at all.
    #[error("empty comch packet")]
    Empty,
    /// Unknown kind byte.
    #[error("unknown comch packet kind {0}")]
    Kind(u8),
    /// A control packet of the wrong length.
    #[error("comch control packet of kind {kind} with {len} bytes")]
    Length {
        /// Its kind.
        kind: u8,
        /// Its length.
        len: usize,
    },
}

impl<'a> ComchPacket<'a> {
    /// Decodes a whole packet.
    pub fn decode(b: &'a [u8]) -> Result<ComchPacket<'a>, ComchPacketError> {
        let (&kind, rest) = b.split_first().ok_or(ComchPacketError::Empty)?;
        let u32_at = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        match (kind, rest.len()) {
            (COMCH_MSG, 0) => Err(ComchPacketError::Empty),
            (COMCH_MSG, _) => Ok(ComchPacket::Msg(rest)),
            (COMCH_CONSUMER_UP, 12) => {
                let token = u64::from(u32_at(4)) | u64::from(u32_at(8)) << 32;
                Ok(ComchPacket::ConsumerUp { id: u32_at(0), token })
            }
            (COMCH_CONSUMER_DOWN, 4) => Ok(ComchPacket::ConsumerDown { id: u32_at(0) }),
            (COMCH_CONSUMER_UP | COMCH_CONSUMER_DOWN, len) => Err(ComchPacketError::Length { kind, len: len + 1 }),
            (kind, _) => Err(ComchPacketError::Kind(kind)),
        }
    }

    /// Encodes a control packet into `out`; its length (`None` for a
    /// message, which is written in place by its sender).
    pub fn encode_ctrl(&self, out: &mut [u8; COMCH_CTRL_LEN]) -> Option<usize> {
        match *self {
            ComchPacket::Msg(_) => None,
            ComchPacket::ConsumerUp { id, token } => {
                out[0] = COMCH_CONSUMER_UP;
                out[1..5].copy_from_slice(&id.to_le_bytes());
                out[5..13].copy_from_slice(&token.to_le_bytes());
                Some(13)
            }
            ComchPacket::ConsumerDown { id } => {
                out[0] = COMCH_CONSUMER_DOWN;
                out[1..5].copy_from_slice(&id.to_le_bytes());
                Some(5)
            }
        }
    }
}

/// Kind byte of a fast-path packet, producer to consumer: data.
pub const FAST_PATH_DATA: u8 = 0;
/// Kind byte of a fast-path packet, producer to consumer: the producer was
/// refused with `AGAIN` and asks for credits.
pub const FAST_PATH_WANT: u8 = 1;
/// Kind byte of a fast-path packet, producer to consumer: unspent credits
/// given back (u32 LE), in answer to a revoke.
pub const FAST_PATH_RETURN: u8 = 2;
/// Kind byte of a fast-path credit packet, consumer to producer: credits
/// granted (u32 LE), one per receive posted for the producer.
pub const FAST_PATH_GRANT: u8 = 0;
/// Kind byte of a fast-path credit packet, consumer to producer: give back
/// every unspent credit (another producer is waiting for one).
pub const FAST_PATH_REVOKE: u8 = 1;
/// Bytes before the immediate in a fast-path data packet: the kind byte,
/// the producer id (u32 LE) and the immediate's length (u8).
pub const FAST_PATH_HDR: usize = 6;
/// Most immediate bytes in a fast-path data packet.
pub const FAST_PATH_MAX_IMM: usize = 32;
/// The longest fast-path packet that is not data, either way.
pub const FAST_PATH_CTRL_LEN: usize = 5;

/// A fast-path packet, producer to consumer: data
/// (`[0][producer id u32 LE][imm length u8][imm][payload]`), a request
/// for credits (`[1]`) or credits given back (`[2][count u32 LE]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPathPacket<'a> {
    /// Data for the oldest receive posted for the producer.
    Data {
        /// The producer's id.
        producer: u32,
        /// Its immediate bytes (at most [`FAST_PATH_MAX_IMM`]).
        imm: &'a [u8],
        /// The payload.
        payload: &'a [u8],
    },
    /// The producer has no credit and wants one.
    Want,
    /// The producer gives back this many unspent credits.
    Return(u32),
}

/// A fast-path packet that is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FastPathDecodeError {
    /// Shorter than its header, or than its header says.
    #[error("short fast-path packet ({0} bytes)")]
    Short(usize),
    /// An immediate longer than [`FAST_PATH_MAX_IMM`].
    #[error("fast-path immediate of {0} bytes")]
    Imm(usize),
    /// Unknown kind byte.
    #[error("unknown fast-path packet kind {0}")]
    Kind(u8),
    /// A control packet of the wrong length.
    #[error("fast-path packet of kind {kind} with {len} bytes")]
    Length {
        /// Its kind.
        kind: u8,
        /// Its length.
        len: usize,
    },
}

impl<'a> FastPathPacket<'a> {
    /// Decodes a whole packet.
    pub fn decode(b: &'a [u8]) -> Result<FastPathPacket<'a>, FastPathDecodeError> {
        let (&kind, rest) = b.split_first().ok_or(FastPathDecodeError::Short(0))?;
        match kind {
            FAST_PATH_DATA => {
                if b.len() < FAST_PATH_HDR {
                    return Err(FastPathDecodeError::Short(b.len()));
                }
                let imm_len = usize::from(b[5]);
                if imm_len > FAST_PATH_MAX_IMM {
                    return Err(FastPathDecodeError::Imm(imm_len));
                }
                let rest = &b[FAST_PATH_HDR..];
                if rest.len() < imm_len {
                    return Err(FastPathDecodeError::Short(b.len()));
                }
                let (imm, payload) = rest.split_at(imm_len);
                Ok(FastPathPacket::Data { producer: u32::from_le_bytes([b[1], b[2], b[3], b[4]]), imm, payload })
            }
            FAST_PATH_WANT if rest.is_empty() => Ok(FastPathPacket::Want),
            FAST_PATH_RETURN => match <[u8; 4]>::try_from(rest) {
                Ok(n) => Ok(FastPathPacket::Return(u32::from_le_bytes(n))),
                Err(_) => Err(FastPathDecodeError::Length { kind, len: b.len() }),
            },
            FAST_PATH_WANT => Err(FastPathDecodeError::Length { kind, len: b.len() }),
            kind => Err(FastPathDecodeError::Kind(kind)),
        }
    }

    /// Writes a data packet's header and immediate into `out`; the payload
    /// follows at the returned offset. `None` when the immediate is too
    /// long or `out` too short.
    pub fn encode_head(producer: u32, imm: &[u8], out: &mut [u8]) -> Option<usize> {
        let end = FAST_PATH_HDR + imm.len();
        if imm.len() > FAST_PATH_MAX_IMM || out.len() < end {
            return None;
        }
        out[0] = FAST_PATH_DATA;
        out[1..5].copy_from_slice(&producer.to_le_bytes());
        out[5] = imm.len() as u8;
        out[FAST_PATH_HDR..end].copy_from_slice(imm);
        Some(end)
    }

    /// Encodes a packet that is not data into `out`; its length (`None`
    /// for data, which is written in place by [`Self::encode_head`]).
    pub fn encode_ctrl(&self, out: &mut [u8; FAST_PATH_CTRL_LEN]) -> Option<usize> {
        match *self {
            FastPathPacket::Data { .. } => None,
            FastPathPacket::Want => {
                out[0] = FAST_PATH_WANT;
                Some(1)
            }
            FastPathPacket::Return(n) => {
                out[0] = FAST_PATH_RETURN;
                out[1..5].copy_from_slice(&n.to_le_bytes());
                Some(5)
            }
        }
    }
}

/// A fast-path credit packet, consumer to producer: credits granted
/// (`[0][count u32 LE]`) or revoked (`[1]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPathCredit {
    /// This many receives were newly posted for the producer.
    Grant(u32),
    /// Give back every unspent credit.
    Revoke,
}

impl FastPathCredit {
    /// Decodes a whole packet.
    pub fn decode(b: &[u8]) -> Result<FastPathCredit, FastPathDecodeError> {
        let (&kind, rest) = b.split_first().ok_or(FastPathDecodeError::Short(0))?;
        match kind {
            FAST_PATH_GRANT => match <[u8; 4]>::try_from(rest) {
                Ok(n) => Ok(FastPathCredit::Grant(u32::from_le_bytes(n))),
                Err(_) => Err(FastPathDecodeError::Length { kind, len: b.len() }),
            },
            FAST_PATH_REVOKE if rest.is_empty() => Ok(FastPathCredit::Revoke),
            FAST_PATH_REVOKE => Err(FastPathDecodeError::Length { kind, len: b.len() }),
            kind => Err(FastPathDecodeError::Kind(kind)),
        }
    }

    /// Encodes the packet into `out`; its length.
    pub fn encode(&self, out: &mut [u8; FAST_PATH_CTRL_LEN]) -> usize {
        match *self {
            FastPathCredit::Grant(n) => {
                out[0] = FAST_PATH_GRANT;
                out[1..5].copy_from_slice(&n.to_le_bytes());
                5
            }
            FastPathCredit::Revoke => {
                out[0] = FAST_PATH_REVOKE;
                1
            }
        }
    }
}

#[cfg(test)]
mod comch_packet_tests {
    use super::*;

    #[test]
    fn comch_and_fast_path_packets_decode_what_they_encode_and_refuse_the_rest() {
        let mut out = [0u8; COMCH_CTRL_LEN];
        for p in [ComchPacket::ConsumerUp { id: 7, token: u64::MAX - 3 }, ComchPacket::ConsumerDown { id: 9 }] {
            let n = p.encode_ctrl(&mut out).unwrap();
            assert_eq!(ComchPacket::decode(&out[..n]), Ok(p));
        }
        assert_eq!(ComchPacket::decode(&[COMCH_MSG, 1, 2]), Ok(ComchPacket::Msg(&[1, 2])));
        assert_eq!(ComchPacket::decode(&[]), Err(ComchPacketError::Empty));
        assert_eq!(ComchPacket::decode(&[COMCH_MSG]), Err(ComchPacketError::Empty));
        assert_eq!(ComchPacket::decode(&[9, 1]), Err(ComchPacketError::Kind(9)));
        assert_eq!(
            ComchPacket::decode(&[COMCH_CONSUMER_DOWN, 1, 2, 3]),
            Err(ComchPacketError::Length { kind: COMCH_CONSUMER_DOWN, len: 4 })
        );
        let mut b = vec![0u8; 64];
        let at = FastPathPacket::encode_head(5, b"imm", &mut b).unwrap();
        b.truncate(at + 2);
        b[at..].copy_from_slice(b"pl");
        assert_eq!(FastPathPacket::decode(&b), Ok(FastPathPacket::Data { producer: 5, imm: b"imm", payload: b"pl" }));
        assert_eq!(FastPathPacket::decode(&b[..5]), Err(FastPathDecodeError::Short(5)));
        assert_eq!(FastPathPacket::decode(&[]), Err(FastPathDecodeError::Short(0)));
        assert_eq!(FastPathPacket::decode(&[0, 0, 0, 0, 0, 33]), Err(FastPathDecodeError::Imm(33)));
        assert_eq!(FastPathPacket::decode(&[0, 0, 0, 0, 0, 3, 1]), Err(FastPathDecodeError::Short(7)));
        assert_eq!(FastPathPacket::encode_head(1, &[0; 33], &mut b), None);
        let mut out = [0u8; FAST_PATH_CTRL_LEN];
        for p in [FastPathPacket::Want, FastPathPacket::Return(7)] {
            let n = p.encode_ctrl(&mut out).unwrap();
            assert_eq!(FastPathPacket::decode(&out[..n]), Ok(p));
        }
        assert_eq!(FastPathPacket::decode(&[FAST_PATH_WANT, 0]), Err(FastPathDecodeError::Length { kind: 1, len: 2 }));
        assert_eq!(
            FastPathPacket::decode(&[FAST_PATH_RETURN, 1]),
            Err(FastPathDecodeError::Length { kind: 2, len: 2 })
        );
        assert_eq!(FastPathPacket::decode(&[9]), Err(FastPathDecodeError::Kind(9)));
        for c in [FastPathCredit::Grant(3), FastPathCredit::Revoke] {
            let n = c.encode(&mut out);
            assert_eq!(FastPathCredit::decode(&out[..n]), Ok(c));
        }
        assert_eq!(
            FastPathCredit::decode(&[FAST_PATH_GRANT, 1, 0, 0]),
            Err(FastPathDecodeError::Length { kind: 0, len: 4 })
        );
        assert_eq!(
            FastPathCredit::decode(&[FAST_PATH_GRANT, 1, 0, 0, 0, 0]),
            Err(FastPathDecodeError::Length { kind: 0, len: 6 })
        );
        assert_eq!(
            FastPathCredit::decode(&[FAST_PATH_REVOKE, 0]),
            Err(FastPathDecodeError::Length { kind: 1, len: 2 })
        );
        assert_eq!(FastPathCredit::decode(&[2]), Err(FastPathDecodeError::Kind(2)));
        assert_eq!(FastPathCredit::decode(&[]), Err(FastPathDecodeError::Short(0)));
    }
}
