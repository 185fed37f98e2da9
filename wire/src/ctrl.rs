//! Control frames between functions, host-shimd, agents and the ingress.
//!
//! A frame is a [`CtrlHeader`] followed by `len` bytes: the fixed body of its
//! kind, then for two kinds a variable tail (the DOCA export blob of a
//! [`PoolExport`], the buffer indices of a [`LendRecv`]). Frames travel over
//! Unix sockets (function <-> host-shimd, host-shimd <-> agent in host mode),
//! comch (host <-> DPU) and as fabric `Control` messages (agent <-> agent,
//! agent <-> ingress). Encoding writes into a caller's buffer and never
//! allocates; decoding borrows from the input.
//!
//! [`CtrlFrame::decode`] checks everything a receiver needs before acting on a
//! frame: magic, version, kind, exact length, reserved fields, names, pool
//! geometry, ring capacity, tail sizes and enum values; it names the bad field.

use crate::desc::{ErrorCode, PoolGeometry};
use crate::name::{Name, NameError};
use crate::segment::RingLayout;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic of every control frame ("DNEC").
pub const CTRL_MAGIC: u32 = u32::from_le_bytes(*b"DNEC");
/// Version of the control protocol.
pub const CTRL_VERSION: u16 = 1;
/// Largest comch message (DOCA's on a BlueField, and the emulation's):
/// frames between host-shimd's bridge and the agent are packed into such
/// messages, so every frame they exchange must fit one.
pub const COMCH_MSG_MAX: usize = 4080;
/// Most buffer indices one [`LendRecv`] or [`CtrlMsg::ReturnBufs`] may
/// carry (and so buffers one [`CtrlMsg::WantBufs`] may ask for): as many
/// as fit one comch message, 1014.
pub const MAX_LEND: usize = (COMCH_MSG_MAX - size_of::<CtrlHeader>() - size_of::<LendRecv>()) / 4;
/// Longest chain one [`CtrlMsg::Message`] may name: as many indices as fit
/// one comch message after its header, 1008. A tenant of a cluster with a
/// node in DPU mode may not have longer chains (`max_chain`).
pub const MAX_MESSAGE_CHAIN: usize = (COMCH_MSG_MAX - size_of::<CtrlHeader>() - size_of::<MessageHdr>()) / 4;
/// Largest DOCA export blob a [`PoolExport`] may carry: what fits one
/// comch message after its header, 4024 bytes (a [`PoolExport`] travels
/// only from host-shimd's bridge to the agent, over comch).
pub const MAX_EXPORT_BLOB: usize = COMCH_MSG_MAX - size_of::<CtrlHeader>() - size_of::<PoolExport>();
/// Largest frame, header included.
pub const CTRL_MAX_FRAME: usize = size_of::<CtrlHeader>() + size_of::<PoolExport>() + MAX_EXPORT_BLOB;
const _: () = assert!(CTRL_MAX_FRAME >= size_of::<CtrlHeader>() + size_of::<LendRecv>() + 4 * MAX_LEND);
const _: () = assert!(CTRL_MAX_FRAME >= size_of::<CtrlHeader>() + size_of::<MessageHdr>() + 4 * MAX_MESSAGE_CHAIN);

/// Header of every control frame, 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CtrlHeader {
    /// [`CTRL_MAGIC`].
    pub magic: u32,
    /// [`CTRL_VERSION`].
    pub version: u16,
    /// [`CtrlKind`].
    pub kind: u16,
    /// Bytes after the header (body and tail).
    pub len: u32,
    /// Sender's sequence number; echoed by [`Ack`] and [`CtrlError`].
    pub seq: u32,
}
const _: () = assert!(size_of::<CtrlHeader>() == 16);

/// Kinds of control frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CtrlKind {
    /// First frame on every connection: who is speaking, which layouts.
    Hello = 1,
    /// Function -> host-shimd: attach me to my tenant's pool.
    Attach = 2,
    /// Host-shimd -> function: attached (pool and ring fds follow out of band).
    AttachOk = 3,
    /// Host-shimd -> agent: a function instance is reachable on this node.
    RegisterFunction = 4,
    /// Host-shimd -> agent: a function instance is gone.
    FunctionExit = 5,
    /// Host-shimd -> agent: a tenant pool, with its DOCA export blob.
    PoolExport = 6,
    /// Host-shimd -> agent: buffers the agent may post as receives.
    LendRecv = 7,
    /// Agent -> peer agent or ingress: receive credits granted for a tenant.
    Credits = 8,
    /// A request failed.
    Error = 9,
    /// A request succeeded.
    Ack = 10,
    /// Function -> host-shimd: where are the instances of this function?
    Lookup = 11,
    /// Host-shimd -> function: one instance (its ring and doorbell fds
    /// follow out of band); a run of these ends with an `Ack`.
    Peer = 12,
    /// A function message crossing the host link (comch, DPU mode), either
    /// way: its descriptor and its chain's buffer indices.
    Message = 13,
    /// Agent -> host-shimd (DPU mode): buffers the agent gives back.
    ReturnBufs = 14,
    /// Agent -> host-shimd (DPU mode): lend me this many receive buffers.
    WantBufs = 15,
    /// Host-shimd -> agent (DPU mode): a message the agent handed over was
    /// lost as it was delivered (see [`Lost`]).
    Lost = 16,
}

impl CtrlKind {
    /// Every kind.
    pub const ALL: [CtrlKind; 16] = [
        Self::Hello,
        Self::Attach,
        Self::AttachOk,
        Self::RegisterFunction,
        Self::FunctionExit,
        Self::PoolExport,
        Self::LendRecv,
        Self::Credits,
        Self::Error,
        Self::Ack,
        Self::Lookup,
        Self::Peer,
        Self::Message,
        Self::ReturnBufs,
        Self::WantBufs,
        Self::Lost,
    ];

    /// Decodes a kind.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u16 == v)
    }
}

/// Which component speaks on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// A function process linked against host-shim.
    Function = 1,
    /// The per-host daemon.
    Shimd = 2,
    /// The DPU (or host-mode) agent.
    Agent = 3,
    /// The cluster ingress.
    Ingress = 4,
}

impl Role {
    /// Decodes a role byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        [Self::Function, Self::Shimd, Self::Agent, Self::Ingress].into_iter().find(|r| *r as u8 == v)
    }
}

/// Body of [`CtrlKind::Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Hello {
    /// [`Role`].
    pub role: u8,
    /// Must be zero.
    pub reserved: u8,
    /// Node id of the speaker.
    pub node: u16,
    /// Process id of the speaker.
    pub pid: u32,
    /// The speaker's [`crate::LAYOUT_HASH`]; a mismatch ends the connection.
    pub layout_hash: u64,
    /// Component name (node name, function name).
    pub name: Name,
}
const _: () = assert!(size_of::<Hello>() == 48);

/// Body of [`CtrlKind::Attach`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Attach {
    /// Tenant the function claims to belong to.
    pub tenant: Name,
    /// Function name.
    pub function: Name,
    /// Instance number requested.
    pub instance: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Process id of the function.
    pub pid: u32,
}
const _: () = assert!(size_of::<Attach>() == 72);

/// Body of [`CtrlKind::AttachOk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct AttachOk {
    /// Tenant id.
    pub tenant: u16,
    /// Function id.
    pub function: u16,
    /// Instance number granted.
    pub instance: u16,
    /// Attach slot (the function's [`crate::Owner::Function`] value).
    pub slot: u16,
    /// Pool buffer size.
    pub buf_size: u32,
    /// Pool buffer count.
    pub buf_count: u32,
    /// Pool headroom.
    pub headroom: u32,
    /// Longest chain.
    pub max_chain: u32,
    /// Slots of the function's inbound ring.
    pub ring_capacity: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Bytes of the pool mapping.
    pub pool_len: u64,
    /// Bytes of the ring mapping.
    pub ring_len: u64,
}
const _: () = assert!(size_of::<AttachOk>() == 48);

/// Body of [`CtrlKind::RegisterFunction`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RegisterFunction {
    /// Tenant id.
    pub tenant: u16,
    /// Function id.
    pub function: u16,
    /// Instance number.
    pub instance: u16,
    /// Attach slot.
    pub slot: u16,
    /// Node the instance runs on.
    pub node: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Slots of the instance's inbound ring.
    pub ring_capacity: u32,
}
const _: () = assert!(size_of::<RegisterFunction>() == 16);

/// Body of [`CtrlKind::FunctionExit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FunctionExit {
    /// Tenant id.
    pub tenant: u16,
    /// Function id.
    pub function: u16,
    /// Instance number.
    pub instance: u16,
    /// Attach slot.
    pub slot: u16,
    /// Buffers freed.
    pub reclaimed: u32,
    /// Must be zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<FunctionExit>() == 16);

/// Body of [`CtrlKind::PoolExport`]; followed by `blob_len` bytes of DOCA
/// export blob (or, on the emulated backend, its equivalent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PoolExport {
    /// Tenant id.
    pub tenant: u16,
    /// Must be zero.
    pub reserved: u16,
    /// [`crate::PoolHeader`] flags.
    pub flags: u32,
    /// Buffer size.
    pub buf_size: u32,
    /// Buffer count.
    pub buf_count: u32,
    /// Headroom.
    pub headroom: u32,
    /// Longest chain.
    pub max_chain: u32,
    /// Bytes of the pool mapping.
    pub pool_len: u64,
    /// Bytes of blob after the body.
    pub blob_len: u32,
    /// Must be zero.
    pub reserved2: u32,
}
const _: () = assert!(size_of::<PoolExport>() == 40);

impl PoolExport {
    /// The body exporting a pool of geometry `g` (its tenant included),
    /// `pool_len` bytes mapped, with an export blob of `blob_len` bytes.
    pub fn new(g: PoolGeometry, pool_len: u64, blob_len: u32) -> Self {
        Self {
            tenant: g.tenant(),
            reserved: 0,
            flags: 0,
            buf_size: g.buf_size(),
            buf_count: g.buf_count(),
            headroom: g.headroom(),
            max_chain: g.max_chain(),
            pool_len,
            blob_len,
            reserved2: 0,
        }
    }

    /// The pool's geometry, checked.
    pub fn geometry(&self) -> Result<PoolGeometry, crate::desc::GeometryError> {
        PoolGeometry::new(self.tenant, self.buf_size, self.buf_count, self.headroom, self.max_chain)
    }
}

/// Body of [`CtrlKind::LendRecv`]; followed by `count` little-endian u32
/// buffer indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LendRecv {
    /// Tenant id.
    pub tenant: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Indices that follow.
    pub count: u32,
}
const _: () = assert!(size_of::<LendRecv>() == 8);

/// Body of [`CtrlKind::Credits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Credits {
    /// Tenant id.
    pub tenant: u16,
    /// Node the credits are granted to.
    pub peer_node: u16,
    /// Additional sends the receiver has posted receives for.
    pub granted: u32,
}
const _: () = assert!(size_of::<Credits>() == 8);

/// Body of [`CtrlKind::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CtrlError {
    /// [`ErrorCode`].
    pub code: u8,
    /// Must be zero.
    pub reserved: u8,
    /// Kind of the frame that failed (0 if none).
    pub about_kind: u16,
    /// Sequence number of the frame that failed.
    pub about_seq: u32,
    /// Tenant concerned (or `u16::MAX`).
    pub tenant: u16,
    /// Function concerned (or `u16::MAX`).
    pub function: u16,
    /// Must be zero.
    pub reserved2: u32,
}
const _: () = assert!(size_of::<CtrlError>() == 16);

/// Body of [`CtrlKind::Ack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Ack {
    /// Kind of the frame acknowledged.
    pub about_kind: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Sequence number of the frame acknowledged.
    pub about_seq: u32,
}
const _: () = assert!(size_of::<Ack>() == 8);

/// The function name that stands for the node's agent: the agent attaches
/// under it (one attach per tenant), and a function looks it up to reach the
/// agent's uplink ring (replies to the ingress). Function names in the
/// cluster file cannot start with `.`.
pub const AGENT_NAME: &str = ".agent";

/// Body of [`CtrlKind::Lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Lookup {
    /// Function name.
    pub function: Name,
}
const _: () = assert!(size_of::<Lookup>() == 32);

/// Body of [`CtrlKind::Peer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Peer {
    /// Function id.
    pub function: u16,
    /// Instance number.
    pub instance: u16,
    /// Attach slot of the instance (its buffer owner value).
    pub slot: u16,
    /// Node the instance runs on.
    pub node: u16,
    /// Slots of its inbound ring.
    pub ring_capacity: u32,
    /// [`Peer::STANDIN`] or zero.
    pub flags: u16,
    /// Must be zero.
    pub reserved: u16,
}
const _: () = assert!(size_of::<Peer>() == 16);

impl Peer {
    /// The function runs on this node but has no live instance here: the
    /// peer is the agent's uplink, standing in until an instance attaches.
    /// The sender marks what it sends through it
    /// [`DescFlags::ELSEWHERE`](crate::DescFlags::ELSEWHERE) (the agent
    /// takes it to another node of the function) and asks again after a
    /// short while, to find a local instance that came back.
    pub const STANDIN: u16 = 1 << 0;
}

/// Body of [`CtrlKind::Message`]; followed by `count` little-endian u32
/// buffer indices, the message's chain in order (`desc.buf` is the first).
///
/// Host to agent: a function sent `desc`; host-shimd wrote the fabric
/// header into every buffer's headroom. Agent to host: deliver to a local
/// function; with [`MessageHdr::FROM_FABRIC`] the descriptor is what the
/// agent learned without reading host memory (tenant, destination from the
/// immediate, length) and host-shimd takes the rest from the header in the
/// first buffer; with [`MessageHdr::RESTAMP`] the agent changed `desc`
/// (an error travelling back over the fabric): host-shimd writes the
/// headers again and hands the message back. Host to agent with
/// [`MessageHdr::RETURNED`]: a message the agent delivered that found no
/// live instance here (a call, or an error whose caller is gone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MessageHdr {
    /// The message.
    pub desc: crate::Descriptor,
    /// `FROM_FABRIC`, `RESTAMP`, `RETURNED`.
    pub flags: u16,
    /// Indices that follow (the chain's length).
    pub count: u16,
}
const _: () = assert!(size_of::<MessageHdr>() == 32);

impl MessageHdr {
    /// The message arrived over the fabric; read its header.
    pub const FROM_FABRIC: u16 = 1 << 0;
    /// Write the fabric headers again and send it back.
    pub const RESTAMP: u16 = 1 << 1;
    /// Host to agent: a message the agent handed over for a local
    /// function that no live instance of it took, handed back with its
    /// descriptor as its header has it; the agent decides what becomes of
    /// it (a call goes to another node of the function, the caller's node,
    /// or back as an error; an error, whose caller is gone, is dropped and
    /// counted).
    pub const RETURNED: u16 = 1 << 2;
    /// Every defined bit.
    pub const FLAGS_ALL: u16 = Self::FROM_FABRIC | Self::RESTAMP | Self::RETURNED;
}

/// Body of [`CtrlKind::Lost`], host-shimd's bridge to the agent (DPU
/// mode): a message the agent handed over for a local function was lost
/// as it was delivered. Its instance died as the bridge pushed it, and
/// host-shimd took its buffers back: nothing of it is left but `desc`, its
/// descriptor as the bridge delivered it, `desc.buf` the first buffer of
/// the chain the agent named (the agent's key for where it came from). The
/// agent answers a call `PeerDied` as for any call lost that way, in a
/// buffer of its own; an error or a reply is dropped (its caller is gone).
///
/// Added after the first DPU-mode release, without a new
/// [`CTRL_VERSION`]: the bridge sends each `Lost` frame alone in its comch
/// message, so that an agent of an earlier build, whose decoder does not
/// know the kind, refuses only that frame (and counts it as a bad frame);
/// its caller then waits for its timeout, as it did before. An agent never
/// receives it from a bridge of an earlier build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Lost {
    /// The lost message's descriptor.
    pub desc: crate::Descriptor,
    /// Must be zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<Lost>() == 32);

/// Buffer indices carried by a [`LendRecv`], borrowed from the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufList<'a>(&'a [u8]);

impl<'a> BufList<'a> {
    /// Borrows a slice of indices for encoding.
    pub fn from_indices(indices: &'a [u32]) -> Self {
        Self(indices.as_bytes())
    }
    /// Number of indices.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The indices, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + Clone + 'a {
        self.0.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
    fn bytes(&self) -> &'a [u8] {
        self.0
    }
}

/// A decoded control message, borrowing its tail from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlMsg<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Attach`].
    Attach(Attach),
    /// See [`AttachOk`].
    AttachOk(AttachOk),
    /// See [`RegisterFunction`].
    RegisterFunction(RegisterFunction),
    /// See [`FunctionExit`].
    FunctionExit(FunctionExit),
    /// See [`PoolExport`]; the export blob.
    PoolExport(PoolExport, &'a [u8]),
    /// See [`LendRecv`]; the lent buffers.
    LendRecv(LendRecv, BufList<'a>),
    /// See [`Credits`].
    Credits(Credits),
    /// See [`CtrlError`].
    Error(CtrlError),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Lookup`].
    Lookup(Lookup),
    /// See [`Peer`].
    Peer(Peer),
    /// See [`MessageHdr`]; the chain.
    Message(MessageHdr, BufList<'a>),
    /// Buffers given back (same body as [`LendRecv`]).
    ReturnBufs(LendRecv, BufList<'a>),
    /// Receive buffers wanted: `count` more (a [`LendRecv`] body, no tail).
    WantBufs(LendRecv),
    /// See [`Lost`].
    Lost(Lost),
}

impl CtrlMsg<'_> {
    /// The frame kind of this message.
    pub fn kind(&self) -> CtrlKind {
        match self {
            Self::Hello(_) => CtrlKind::Hello,
            Self::Attach(_) => CtrlKind::Attach,
            Self::AttachOk(_) => CtrlKind::AttachOk,
            Self::RegisterFunction(_) => CtrlKind::RegisterFunction,
            Self::FunctionExit(_) => CtrlKind::FunctionExit,
            Self::PoolExport(..) => CtrlKind::PoolExport,
            Self::LendRecv(..) => CtrlKind::LendRecv,
            Self::Credits(_) => CtrlKind::Credits,
            Self::Error(_) => CtrlKind::Error,
            Self::Ack(_) => CtrlKind::Ack,
            Self::Lookup(_) => CtrlKind::Lookup,
            Self::Peer(_) => CtrlKind::Peer,
            Self::Message(..) => CtrlKind::Message,
            Self::ReturnBufs(..) => CtrlKind::ReturnBufs,
            Self::WantBufs(_) => CtrlKind::WantBufs,
            Self::Lost(_) => CtrlKind::Lost,
        }
    }

    fn parts(&self) -> (&[u8], &[u8]) {
        match self {
            Self::Hello(b) => (b.as_bytes(), &[]),
            Self::Attach(b) => (b.as_bytes(), &[]),
            Self::AttachOk(b) => (b.as_bytes(), &[]),
            Self::RegisterFunction(b) => (b.as_bytes(), &[]),
            Self::FunctionExit(b) => (b.as_bytes(), &[]),
            Self::PoolExport(b, blob) => (b.as_bytes(), blob),
            Self::LendRecv(b, list) => (b.as_bytes(), list.bytes()),
            Self::Credits(b) => (b.as_bytes(), &[]),
            Self::Error(b) => (b.as_bytes(), &[]),
            Self::Ack(b) => (b.as_bytes(), &[]),
            Self::Lookup(b) => (b.as_bytes(), &[]),
            Self::Peer(b) => (b.as_bytes(), &[]),
            Self::Message(b, list) => (b.as_bytes(), list.bytes()),
            Self::ReturnBufs(b, list) => (b.as_bytes(), list.bytes()),
            Self::WantBufs(b) => (b.as_bytes(), &[]),
            Self::Lost(b) => (b.as_bytes(), &[]),
        }
    }
}

/// One control frame: a sequence number and a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlFrame<'a> {
    /// Sender's sequence number.
    pub seq: u32,
    /// The message.
    pub msg: CtrlMsg<'a>,
}

/// A control frame that cannot be accepted. Names what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtrlDecodeError {
    /// More bytes are needed: the frame is `need` bytes long (or at least a
    /// header). A stream reader waits for them; a datagram reader rejects.
    #[error("truncated control frame: need {need} bytes")]
    Truncated {
        /// Bytes the whole frame needs.
        need: usize,
    },
    /// Not a control frame.
    #[error("bad control magic {0:#010x}")]
    BadMagic(u32),
    /// Another protocol version.
    #[error("control protocol version {0}, this build speaks {CTRL_VERSION}")]
    Version(u16),
    /// Unknown kind.
    #[error("unknown control frame kind {0}")]
    UnknownKind(u16),
    /// Longer than any frame may be.
    #[error("control frame announces {0} bytes, more than the maximum")]
    TooLong(u32),
    /// The length does not match the kind's body and tail.
    #[error("{kind:?} frame has {len} bytes after the header, expected {want}")]
    Length {
        /// Frame kind.
        kind: CtrlKind,
        /// Bytes present.
        len: u32,
        /// Bytes expected.
        want: usize,
    },
    /// A field holds a value the kind does not allow.
    #[error("{kind:?} frame: invalid field `{field}`")]
    Field {
        /// Frame kind.
        kind: CtrlKind,
        /// Field name.
        field: &'static str,
    },
    /// A name field is not a valid name.
    #[error("{kind:?} frame: field `{field}`: {err}")]
    Name {
        /// Frame kind.
        kind: CtrlKind,
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        err: NameError,
    },
}

/// A frame that cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtrlEncodeError {
    /// The output buffer is too small.
    #[error("output buffer too small: need {need} bytes")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
    },
    /// The tail is longer than the protocol allows, or disagrees with the
    /// body's count.
    #[error("{kind:?} tail of {len} bytes does not match its body or exceeds the maximum")]
    Tail {
        /// Frame kind.
        kind: CtrlKind,
        /// Tail bytes.
        len: usize,
    },
}

impl<'a> CtrlFrame<'a> {
    /// Bytes this frame occupies when encoded.
    pub fn encoded_len(&self) -> usize {
        let (body, tail) = self.msg.parts();
        size_of::<CtrlHeader>() + body.len() + tail.len()
    }

    /// Encodes the frame into `out`; returns the bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, CtrlEncodeError> {
        let kind = self.msg.kind();
        let (body, tail) = self.msg.parts();
        let tail_ok = match self.msg {
            CtrlMsg::PoolExport(b, blob) => blob.len() <= MAX_EXPORT_BLOB && b.blob_len as usize == blob.len(),
            CtrlMsg::LendRecv(b, list) | CtrlMsg::ReturnBufs(b, list) => {
                list.len() <= MAX_LEND && b.count as usize == list.len()
            }
            CtrlMsg::Message(b, list) => list.len() <= MAX_MESSAGE_CHAIN && b.count as usize == list.len(),
            _ => true,
        };
        if !tail_ok {
            return Err(CtrlEncodeError::Tail { kind, len: tail.len() });
        }
        let need = self.encoded_len();
        let out = out.get_mut(..need).ok_or(CtrlEncodeError::BufferTooSmall { need })?;
        let len =
            u32::try_from(body.len() + tail.len()).map_err(|_| CtrlEncodeError::Tail { kind, len: tail.len() })?;
        let header = CtrlHeader { magic: CTRL_MAGIC, version: CTRL_VERSION, kind: kind as u16, len, seq: self.seq };
        let (h, rest) = out.split_at_mut(size_of::<CtrlHeader>());
        h.copy_from_slice(header.as_bytes());
        let (b, t) = rest.split_at_mut(body.len());
        b.copy_from_slice(body);
        t.copy_from_slice(tail);
        Ok(need)
    }

    /// Decodes and checks one frame at the front of `buf`; returns it and the
    /// bytes it occupied.
    pub fn decode(buf: &'a [u8]) -> Result<(Self, usize), CtrlDecodeError> {
        let hlen = size_of::<CtrlHeader>();
        let (h, rest) = CtrlHeader::read_from_prefix(buf).map_err(|_| CtrlDecodeError::Truncated { need: hlen })?;
        if h.magic != CTRL_MAGIC {
            return Err(CtrlDecodeError::BadMagic(h.magic));
        }
        if h.version != CTRL_VERSION {
            return Err(CtrlDecodeError::Version(h.version));
        }
        let kind = CtrlKind::from_u16(h.kind).ok_or(CtrlDecodeError::UnknownKind(h.kind))?;
        if h.len as usize > CTRL_MAX_FRAME - hlen {
            return Err(CtrlDecodeError::TooLong(h.len));
        }
        let total = hlen + h.len as usize;
        let payload = rest.get(..h.len as usize).ok_or(CtrlDecodeError::Truncated { need: total })?;
        let msg = decode_msg(kind, payload)?;
        Ok((Self { seq: h.seq, msg }, total))
    }
}

fn body<T: FromBytes>(kind: CtrlKind, payload: &[u8], exact: bool) -> Result<(T, &[u8]), CtrlDecodeError> {
    let len = payload.len() as u32;
    let want = size_of::<T>();
    let (b, tail) = T::read_from_prefix(payload).map_err(|_| CtrlDecodeError::Length { kind, len, want })?;
    if exact && !tail.is_empty() {
        return Err(CtrlDecodeError::Length { kind, len, want });
    }
    Ok((b, tail))
}

fn buf_list(
    kind: CtrlKind,
    len: usize,
    body: usize,
    tail: &[u8],
    count: usize,
) -> Result<BufList<'_>, CtrlDecodeError> {
    if tail.len() != count * 4 {
        return Err(CtrlDecodeError::Length { kind, len: len as u32, want: body + count * 4 });
    }
    Ok(BufList(tail))
}

fn field(kind: CtrlKind, field: &'static str, ok: bool) -> Result<(), CtrlDecodeError> {
    if ok { Ok(()) } else { Err(CtrlDecodeError::Field { kind, field }) }
}

fn name(kind: CtrlKind, field: &'static str, n: &Name) -> Result<(), CtrlDecodeError> {
    n.as_str().map(|_| ()).map_err(|err| CtrlDecodeError::Name { kind, field, err })
}

fn decode_msg(kind: CtrlKind, p: &[u8]) -> Result<CtrlMsg<'_>, CtrlDecodeError> {
    let msg = match kind {
        CtrlKind::Hello => {
            let (b, _) = body::<Hello>(kind, p, true)?;
            field(kind, "role", Role::from_u8(b.role).is_some())?;
            field(kind, "reserved", b.reserved == 0)?;
            name(kind, "name", &b.name)?;
            CtrlMsg::Hello(b)
        }
        CtrlKind::Attach => {
            let (b, _) = body::<Attach>(kind, p, true)?;
            name(kind, "tenant", &b.tenant)?;
            name(kind, "function", &b.function)?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::Attach(b)
        }
        CtrlKind::AttachOk => {
            let (b, _) = body::<AttachOk>(kind, p, true)?;
            let geometry = PoolGeometry::new(b.tenant, b.buf_size, b.buf_count, b.headroom, b.max_chain);
            field(kind, "geometry", geometry.is_ok())?;
            field(kind, "ring_capacity", RingLayout::new(b.ring_capacity).is_ok())?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::AttachOk(b)
        }
        CtrlKind::RegisterFunction => {
            let (b, _) = body::<RegisterFunction>(kind, p, true)?;
            field(kind, "ring_capacity", RingLayout::new(b.ring_capacity).is_ok())?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::RegisterFunction(b)
        }
        CtrlKind::FunctionExit => {
            let (b, _) = body::<FunctionExit>(kind, p, true)?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::FunctionExit(b)
        }
        CtrlKind::PoolExport => {
            let (b, blob) = body::<PoolExport>(kind, p, false)?;
            field(kind, "geometry", b.geometry().is_ok())?;
            field(kind, "flags", b.flags & !crate::PoolHeader::FLAGS_ALL == 0)?;
            field(kind, "reserved", b.reserved == 0 && b.reserved2 == 0)?;
            field(kind, "blob_len", b.blob_len as usize == blob.len() && !blob.is_empty())?;
            CtrlMsg::PoolExport(b, blob)
        }
        CtrlKind::LendRecv | CtrlKind::ReturnBufs => {
            let (b, tail) = body::<LendRecv>(kind, p, false)?;
            field(kind, "reserved", b.reserved == 0)?;
            field(kind, "count", b.count >= 1 && b.count as usize <= MAX_LEND)?;
            let list = buf_list(kind, p.len(), size_of::<LendRecv>(), tail, b.count as usize)?;
            if kind == CtrlKind::LendRecv { CtrlMsg::LendRecv(b, list) } else { CtrlMsg::ReturnBufs(b, list) }
        }
        CtrlKind::WantBufs => {
            let (b, _) = body::<LendRecv>(kind, p, true)?;
            field(kind, "reserved", b.reserved == 0)?;
            field(kind, "count", b.count >= 1 && b.count as usize <= MAX_LEND)?;
            CtrlMsg::WantBufs(b)
        }
        CtrlKind::Message => {
            let (b, tail) = body::<MessageHdr>(kind, p, false)?;
            field(kind, "desc", b.desc.validate_fields().is_ok())?;
            field(kind, "flags", b.flags & !MessageHdr::FLAGS_ALL == 0)?;
            field(kind, "count", b.count >= 1 && usize::from(b.count) <= MAX_MESSAGE_CHAIN)?;
            let list = buf_list(kind, p.len(), size_of::<MessageHdr>(), tail, usize::from(b.count))?;
            field(kind, "desc.buf", list.iter().next() == Some(b.desc.buf))?;
            CtrlMsg::Message(b, list)
        }
        CtrlKind::Lost => {
            let (b, _) = body::<Lost>(kind, p, true)?;
            field(kind, "desc", b.desc.validate_fields().is_ok())?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::Lost(b)
        }
        CtrlKind::Credits => CtrlMsg::Credits(body::<Credits>(kind, p, true)?.0),
        CtrlKind::Error => {
            let (b, _) = body::<CtrlError>(kind, p, true)?;
            field(kind, "code", ErrorCode::from_u8(b.code).is_some())?;
            field(kind, "about_kind", b.about_kind == 0 || CtrlKind::from_u16(b.about_kind).is_some())?;
            field(kind, "reserved", b.reserved == 0 && b.reserved2 == 0)?;
            CtrlMsg::Error(b)
        }
        CtrlKind::Ack => {
            let (b, _) = body::<Ack>(kind, p, true)?;
            field(kind, "about_kind", CtrlKind::from_u16(b.about_kind).is_some())?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::Ack(b)
        }
        CtrlKind::Lookup => {
            let (b, _) = body::<Lookup>(kind, p, true)?;
            name(kind, "function", &b.function)?;
            CtrlMsg::Lookup(b)
        }
        CtrlKind::Peer => {
            let (b, _) = body::<Peer>(kind, p, true)?;
            field(kind, "ring_capacity", RingLayout::new(b.ring_capacity).is_ok())?;
            field(kind, "flags", b.flags & !Peer::STANDIN == 0)?;
            field(kind, "reserved", b.reserved == 0)?;
            CtrlMsg::Peer(b)
        }
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn samples<'a>(blob: &'a [u8], bufs: &'a [u32]) -> Vec<CtrlMsg<'a>> {
        vec![
            CtrlMsg::Hello(Hello {
                role: Role::Agent as u8,
                reserved: 0,
                node: 1,
                pid: 42,
                layout_hash: crate::LAYOUT_HASH,
                name: n("node-a"),
            }),
            CtrlMsg::Attach(Attach { tenant: n("acme"), function: n("resize"), instance: 2, reserved: 0, pid: 7 }),
            CtrlMsg::AttachOk(AttachOk {
                tenant: 1,
                function: 2,
                instance: 0,
                slot: 3,
                buf_size: 16384,
                buf_count: 4096,
                headroom: 64,
                max_chain: 64,
                ring_capacity: 1024,
                reserved: 0,
                pool_len: 1 << 26,
                ring_len: 32960,
            }),
            CtrlMsg::RegisterFunction(RegisterFunction {
                tenant: 1,
                function: 2,
                instance: 0,
                slot: 3,
                node: 0,
                reserved: 0,
                ring_capacity: 256,
            }),
            CtrlMsg::FunctionExit(FunctionExit {
                tenant: 1,
                function: 2,
                instance: 0,
                slot: 3,
                reclaimed: 17,
                reserved: 0,
            }),
            CtrlMsg::PoolExport(
                PoolExport {
                    tenant: 1,
                    reserved: 0,
                    flags: 1,
                    buf_size: 16384,
                    buf_count: 16,
                    headroom: 64,
                    max_chain: 16,
                    pool_len: 1 << 20,
                    blob_len: blob.len() as u32,
                    reserved2: 0,
                },
                blob,
            ),
            CtrlMsg::LendRecv(
                LendRecv { tenant: 1, reserved: 0, count: bufs.len() as u32 },
                BufList::from_indices(bufs),
            ),
            CtrlMsg::Credits(Credits { tenant: 1, peer_node: 2, granted: 64 }),
            CtrlMsg::Error(CtrlError {
                code: ErrorCode::TenantMismatch as u8,
                reserved: 0,
                about_kind: 2,
                about_seq: 9,
                tenant: 1,
                function: 5,
                reserved2: 0,
            }),
            CtrlMsg::Ack(Ack { about_kind: 6, reserved: 0, about_seq: 9 }),
            CtrlMsg::Lookup(Lookup { function: n("resize") }),
            CtrlMsg::Peer(Peer {
                function: 2,
                instance: 1,
                slot: 5,
                node: 0,
                ring_capacity: 1024,
                flags: 0,
                reserved: 0,
            }),
            CtrlMsg::Peer(Peer {
                function: 2,
                instance: 0,
                slot: 1,
                node: 1,
                ring_capacity: 4096,
                flags: Peer::STANDIN,
                reserved: 0,
            }),
            CtrlMsg::Message(
                MessageHdr {
                    desc: crate::Descriptor { tenant: 1, dst_fn: 3, buf: bufs[0], len: 100, ..Default::default() },
                    flags: MessageHdr::FROM_FABRIC,
                    count: bufs.len() as u16,
                },
                BufList::from_indices(bufs),
            ),
            CtrlMsg::ReturnBufs(
                LendRecv { tenant: 1, reserved: 0, count: bufs.len() as u32 },
                BufList::from_indices(bufs),
            ),
            CtrlMsg::WantBufs(LendRecv { tenant: 2, reserved: 0, count: 64 }),
            CtrlMsg::Lost(Lost {
                desc: crate::Descriptor { tenant: 1, dst_fn: 3, src_fn: 2, request: 7, buf: 5, ..Default::default() },
                reserved: 0,
            }),
        ]
    }

    #[test]
    fn a_message_frame_names_its_first_buffer_and_known_flags_only() {
        let bufs = [4u32, 9];
        let mut out = [0u8; 128];
        let desc = crate::Descriptor { tenant: 1, buf: 4, len: 20_000, ..Default::default() };
        let frame = |desc, flags| CtrlFrame {
            seq: 0,
            msg: CtrlMsg::Message(MessageHdr { desc, flags, count: 2 }, BufList::from_indices(&bufs)),
        };
        let len = frame(desc, 0).encode(&mut out).unwrap();
        assert!(CtrlFrame::decode(&out[..len]).is_ok());
        let len = frame(crate::Descriptor { buf: 9, ..desc }, 0).encode(&mut out).unwrap();
        assert_eq!(
            CtrlFrame::decode(&out[..len]),
            Err(CtrlDecodeError::Field { kind: CtrlKind::Message, field: "desc.buf" })
        );
        let len = frame(desc, 1 << 7).encode(&mut out).unwrap();
        assert_eq!(
            CtrlFrame::decode(&out[..len]),
            Err(CtrlDecodeError::Field { kind: CtrlKind::Message, field: "flags" })
        );
        let len = frame(crate::Descriptor { reserved: 1, ..desc }, 0).encode(&mut out).unwrap();
        assert_eq!(
            CtrlFrame::decode(&out[..len]),
            Err(CtrlDecodeError::Field { kind: CtrlKind::Message, field: "desc" })
        );
    }

    #[test]
    fn every_kind_round_trips() {
        let blob = [7u8; 300];
        let bufs = [1u32, 5, 9, 4000];
        let mut out = [0u8; CTRL_MAX_FRAME];
        for (i, msg) in samples(&blob, &bufs).into_iter().enumerate() {
            let f = CtrlFrame { seq: i as u32, msg };
            let len = f.encode(&mut out).unwrap();
            assert_eq!(len, f.encoded_len());
            assert_eq!(CtrlFrame::decode(&out[..len]), Ok((f, len)), "{:?}", msg.kind());
            // Every strict prefix asks for more bytes.
            for cut in [0, 1, 15, 16, len - 1] {
                assert!(matches!(CtrlFrame::decode(&out[..cut]), Err(CtrlDecodeError::Truncated { .. })));
            }
        }
        let list = BufList::from_indices(&bufs);
        assert_eq!(list.iter().collect::<Vec<_>>(), bufs);
    }

    #[test]
    fn bad_frames_name_the_problem() {
        let mut out = [0u8; 256];
        let hello = CtrlFrame { seq: 1, msg: samples(&[1], &[1])[0] };
        let len = hello.encode(&mut out).unwrap();
        let mut bad = out;
        bad[0] ^= 1;
        assert!(matches!(CtrlFrame::decode(&bad[..len]), Err(CtrlDecodeError::BadMagic(_))));
        let mut bad = out;
        bad[4] = 9;
        assert_eq!(CtrlFrame::decode(&bad[..len]), Err(CtrlDecodeError::Version(9)));
        let mut bad = out;
        bad[6] = 99;
        assert_eq!(CtrlFrame::decode(&bad[..len]), Err(CtrlDecodeError::UnknownKind(99)));
        let mut bad = out;
        bad[16] = 77; // role
        assert_eq!(
            CtrlFrame::decode(&bad[..len]),
            Err(CtrlDecodeError::Field { kind: CtrlKind::Hello, field: "role" })
        );
        let mut bad = out;
        bad[16 + 16] = b' '; // first byte of the name
        assert!(matches!(CtrlFrame::decode(&bad[..len]), Err(CtrlDecodeError::Name { field: "name", .. })));
        let mut bad = out;
        bad[8..12].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert_eq!(CtrlFrame::decode(&bad[..len]), Err(CtrlDecodeError::TooLong(1_000_000)));
        let mut bad = out;
        bad[8..12].copy_from_slice(&47u32.to_le_bytes());
        assert!(matches!(CtrlFrame::decode(&bad[..len - 1]), Err(CtrlDecodeError::Length { want: 48, .. })));
    }

    #[test]
    fn encode_refuses_inconsistent_tails() {
        let mut out = [0u8; 64];
        let bufs = [1u32, 2];
        let msg = CtrlMsg::LendRecv(LendRecv { tenant: 0, reserved: 0, count: 3 }, BufList::from_indices(&bufs));
        assert!(matches!(CtrlFrame { seq: 0, msg }.encode(&mut out), Err(CtrlEncodeError::Tail { .. })));
        let msg = CtrlMsg::Credits(Credits { tenant: 0, peer_node: 0, granted: 1 });
        assert_eq!(CtrlFrame { seq: 0, msg }.encode(&mut out[..20]), Err(CtrlEncodeError::BufferTooSmall { need: 24 }));
    }

    #[test]
    fn the_largest_lists_fit_one_comch_message() {
        let idx: Vec<u32> = (0..MAX_LEND as u32).collect();
        let lend = CtrlFrame {
            seq: 1,
            msg: CtrlMsg::LendRecv(
                LendRecv { tenant: 0, reserved: 0, count: MAX_LEND as u32 },
                BufList::from_indices(&idx),
            ),
        };
        assert!(lend.encoded_len() <= COMCH_MSG_MAX, "{}", lend.encoded_len());
        let chain = &idx[..MAX_MESSAGE_CHAIN];
        let desc = crate::Descriptor { buf: 0, ..Default::default() };
        let hdr = MessageHdr { desc, flags: 0, count: MAX_MESSAGE_CHAIN as u16 };
        let msg = CtrlFrame { seq: 2, msg: CtrlMsg::Message(hdr, BufList::from_indices(chain)) };
        assert!(msg.encoded_len() <= COMCH_MSG_MAX, "{}", msg.encoded_len());
        // One more index would not fit.
        assert!(lend.encoded_len() + 4 > COMCH_MSG_MAX && msg.encoded_len() + 4 > COMCH_MSG_MAX);
        // Nor would a longer export blob.
        let blob = vec![7u8; MAX_EXPORT_BLOB + 1];
        let g = PoolGeometry::new(0, 4096, 16, 64, 4).unwrap();
        let export = |n: usize| CtrlFrame {
            seq: 3,
            msg: CtrlMsg::PoolExport(PoolExport::new(g, 1 << 20, n as u32), &blob[..n]),
        };
        assert_eq!(export(MAX_EXPORT_BLOB).encoded_len(), COMCH_MSG_MAX);
        let mut out = vec![0u8; 2 * COMCH_MSG_MAX];
        assert!(export(MAX_EXPORT_BLOB + 1).encode(&mut out).is_err(), "a blob beyond one comch message");
    }

    proptest! {
        #[test]
        fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok((f, used)) = CtrlFrame::decode(&bytes) {
                prop_assert!(used <= bytes.len());
                let mut out = vec![0u8; used];
                prop_assert_eq!(f.encode(&mut out), Ok(used));
                prop_assert_eq!(&out[..], &bytes[..used]);
            }
        }

        #[test]
        fn decode_arbitrary_bodies_of_every_kind(kind in 1u16..=16, body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let h = CtrlHeader { magic: CTRL_MAGIC, version: CTRL_VERSION, kind, len: body.len() as u32, seq: 0 };
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let _ = CtrlFrame::decode(&bytes);
        }

        #[test]
        fn lend_lists_round_trip(bufs in proptest::collection::vec(any::<u32>(), 1..MAX_LEND), seq in any::<u32>()) {
            let msg = CtrlMsg::LendRecv(LendRecv { tenant: 3, reserved: 0, count: bufs.len() as u32 }, BufList::from_indices(&bufs));
            let f = CtrlFrame { seq, msg };
            let mut out = vec![0u8; CTRL_MAX_FRAME];
            let len = f.encode(&mut out).unwrap();
            let (back, used) = CtrlFrame::decode(&out[..len]).unwrap();
            prop_assert_eq!(used, len);
            match back.msg {
                CtrlMsg::LendRecv(_, list) => prop_assert_eq!(list.iter().collect::<Vec<_>>(), bufs),
                other => prop_assert!(false, "decoded {:?}", other),
            }
        }
    }
}
