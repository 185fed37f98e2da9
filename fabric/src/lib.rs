//! `fabric`: the two-sided RDMA transport of DNE. The agent and the ingress
//! move payloads between nodes only through it.
//!
//! Contract (checked by `tests/conformance.rs` against every backend built):
//! * explicit connections, one per (tenant, peer): [`Endpoint::open`] gives
//!   an out-of-band blob, [`Endpoint::connect`] takes the peer's; each
//!   connection has its own queue pair / DOCA RDMA context, so its receives
//!   and its credits are its own (DESIGN.md section 5);
//! * [`Endpoint::post_send`] sends `len` bytes at `offset` of a registered
//!   region with a 32-bit immediate ([`wire::Immediate`]) and a caller
//!   token; [`Endpoint::post_recv`] posts a receive buffer with a token;
//!   [`Endpoint::poll`] takes completions in batches and never blocks;
//! * messages arrive in order per connection, each in one posted receive of
//!   the receiver's own choosing (two-sided: the receiver decides where data
//!   lands, so it can hand it to a function without a copy); a chain of
//!   buffers is one send per buffer, in order, and the receiver is told
//!   each fragment's place in its chain ([`check::Frag`]);
//! * receiver-advertised credits: a sender never posts more data sends than
//!   the peer has granted; beyond that, sends wait in a queue of fixed
//!   capacity (never dropped; a full queue is an explicit
//!   [`WorkPostError::QueueFull`]);
//! * every outstanding operation of a connection that fails (peer gone,
//!   closed, protocol violation) completes with a typed
//!   [`CompletionError`]; a peer that sends garbage fails its connection,
//!   never the process;
//! * no allocation per message: every table is sized at setup
//!   ([`EndpointConfig`]), except in an endpoint whose connections' tables
//!   of one kind would hold over 2^18 entries together: there one reserves
//!   only a share of its tables when it opens, and a table grows, doubling,
//!   up to its size when a burst needs more (an allocation on the data
//!   path, a few times per connection at most).
//!
//! Credits (why not `wire::ctrl::Credits` frames): a credit update is a
//! zero-length send whose 32-bit immediate is the receiver's cumulative
//! grant ([`credit`]). Data sends always carry bytes (at least a
//! [`wire::FabricHeader`]), so the length tells the two apart. A control
//! frame would have to land in, and be read from, a receive buffer; on the
//! DPU the receive buffers are host memory the agent imported and must not
//! read, and the frame would cost a buffer and a copy. A zero-length send
//! writes no memory, needs no buffer of its own (the endpoint re-posts the
//! receive it consumed at once), and its cumulative value makes lost or
//! reordered updates harmless. The user's immediate stays a full 32 bits.
//!
//! Modules: [`check`] (what a receiver checks on every message; fuzzed),
//! [`credit`] (credit accounting), [`endpoint`] (the engine-facing
//! endpoint over any [`Transport`]), [`doca_backend`] (DOCA RDMA through the
//! `doca` crate, SDK or emulated), `verbs_backend` (rdma-core ibverbs
//! through `sideway` 0.4, behind the feature `verbs`: RC queue pairs for
//! host mode on RoCE/InfiniBand NICs whose provider has `ibv_wr_*`, or
//! SoftRoCE) and [`verbs_blob`]
//! (its connection blob, always built so it can be fuzzed).
//!
//! Unsafe code: none, except in `verbs_backend` (registering raw pool
//! memory, posting receives and polling the CQ through the C API).
#![cfg_attr(not(feature = "verbs"), forbid(unsafe_code))]
#![cfg_attr(feature = "verbs", deny(unsafe_code))]

pub mod check;
pub mod cluster;
pub mod credit;
pub mod doca_backend;
pub mod endpoint;
pub mod imported;
pub mod mesh;
pub mod null;
pub mod port;
#[cfg(feature = "verbs")]
#[allow(unsafe_code)]
pub mod verbs_backend;
pub mod verbs_blob;

use std::sync::Arc;

pub use check::{Frag, HEADER_LEN, RecvCheckError};
pub use doca_backend::DocaTransport;
pub use endpoint::{Endpoint, EndpointConfig};
pub use imported::ImportedPool;
pub use mesh::{Mesh, MeshConfig, MeshEvent};
pub use null::NullTransport;
pub use port::{Buffers, PoolView, Port, PortError, PortEvent, PortSizes, PortTenant};
#[cfg(feature = "verbs")]
pub use verbs_backend::{VerbsConfig, VerbsSetupError, VerbsTransport};
pub use wire::fabric::{FabricHeader, HEADROOM, Immediate, MsgKind};

/// A registered memory region of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub(crate) u32);

impl RegionId {
    /// The region of index `i` (for backends driven without an endpoint).
    pub fn new(i: u32) -> Self {
        Self(i)
    }

    /// Index of the region in its endpoint.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// A connection of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub(crate) u32);

impl ConnId {
    /// The connection of index `i` (for backends driven without an
    /// endpoint).
    pub fn new(i: u32) -> Self {
        Self(i)
    }

    /// Index of the connection in its endpoint.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Memory to register.
#[derive(Debug)]
pub enum Memory<'a> {
    /// A local shared-memory region (a tenant pool this process created or
    /// opened from a passed fd); the endpoint may read received headers in
    /// it.
    Local(Arc<shm::Region>),
    /// Memory another process exported to this one (the host's tenant pool
    /// on the DPU: a DOCA mmap PCI export). It can be sent from and received
    /// into, never read by this process.
    Export(&'a [u8]),
}

/// Who a connection is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnSpec {
    /// Tenant whose pool the connection's buffers belong to.
    pub tenant: u16,
    /// Peer node.
    pub peer: u32,
}

/// One send: `len` bytes at `offset` of `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWr {
    /// Source region.
    pub region: RegionId,
    /// Offset of the first byte in the region.
    pub offset: u64,
    /// Bytes to send (at least 1).
    pub len: u32,
    /// The immediate ([`wire::Immediate`]: known kind, reserved bits zero).
    pub imm: u32,
    /// Returned in the completion.
    pub token: u64,
}

/// One receive: up to `len` bytes land at `offset` of `region`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWr {
    /// Destination region.
    pub region: RegionId,
    /// Offset in the region.
    pub offset: u64,
    /// Capacity in bytes.
    pub len: u32,
    /// Returned in the completion.
    pub token: u64,
}

/// Why an operation or a connection failed. Small and `Copy`: carried by
/// completions and counted, never logged per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompletionError {
    /// The peer vanished (reset, EOF, retries exhausted).
    #[error("peer gone")]
    PeerGone,
    /// The connection was closed by this side (or the endpoint stopped).
    #[error("connection closed")]
    Closed,
    /// The peer aborted the connection (it failed it on its side).
    #[error("connection aborted by the peer")]
    Aborted,
    /// A message larger than the receive it landed in (fails the
    /// connection).
    #[error("message larger than the receive buffer")]
    TooBig,
    /// The peer broke the fabric protocol (garbage); the connection failed.
    #[error("protocol violation: {0}")]
    Protocol(#[from] RecvCheckError),
    /// Another transport error (the backend's code).
    #[error("transport error {0}")]
    Transport(i32),
    /// The message's buffers do not walk to its length (a process sharing
    /// the pool rewrote a link of its chain): nothing was sent.
    #[error("the message's chain does not match its length")]
    BadChain,
}

/// A completion, taken with [`Endpoint::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The connection is up in both directions.
    Connected(ConnId),
    /// The connection failed; every outstanding operation on it completes
    /// with an error too.
    ConnFailed {
        /// The connection.
        conn: ConnId,
        /// Why.
        error: CompletionError,
    },
    /// A send completed: the peer placed it (`Ok`), or it failed.
    Sent {
        /// The connection.
        conn: ConnId,
        /// The caller's token.
        token: u64,
        /// Outcome.
        result: Result<(), CompletionError>,
    },
    /// A receive completed.
    Received {
        /// The connection.
        conn: ConnId,
        /// The caller's token.
        token: u64,
        /// What landed, or why nothing did.
        result: Result<Received, CompletionError>,
    },
}

/// A message that landed in a posted receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes written at the start of the receive buffer.
    pub len: u32,
    /// The sender's immediate.
    pub imm: u32,
    /// Place of this message in its chain.
    pub frag: Frag,
}

impl Completion {
    /// A blank value to size completion arrays with.
    pub const EMPTY: Completion = Completion::Connected(ConnId(u32::MAX));
}

/// A region could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegionRegisterError {
    /// The endpoint's region table is full.
    #[error("region table full")]
    Full,
    /// The export blob is malformed or names memory that is gone.
    #[error("bad export: {0}")]
    BadExport(&'static str),
    /// This backend cannot register this kind of memory.
    #[error("not supported by this backend: {0}")]
    Unsupported(&'static str),
    /// The backend refused (its code).
    #[error("backend refused the registration (code {0})")]
    Transport(i32),
}

/// A connection could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnSetupError {
    /// The endpoint's connection table is full.
    #[error("connection table full")]
    Full,
    /// Unknown connection.
    #[error("unknown connection")]
    Unknown,
    /// The peer's blob is malformed.
    #[error("malformed peer blob")]
    BadBlob,
    /// The connection is not in a state that allows this.
    #[error("connection in the wrong state")]
    State,
    /// The backend did not get ready in time.
    #[error("backend did not start in time")]
    Timeout,
    /// The backend refused (its code).
    #[error("backend error (code {0})")]
    Transport(i32),
}

/// A send or receive could not be posted. Small and `Copy`: the hot path
/// counts these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkPostError {
    /// Unknown connection.
    #[error("unknown connection")]
    UnknownConn,
    /// Unknown region.
    #[error("unknown region")]
    UnknownRegion,
    /// Offset and length leave the region.
    #[error("range outside the region")]
    OutOfRange,
    /// A send of zero bytes (zero-length sends carry credits).
    #[error("empty send")]
    Empty,
    /// Larger than the endpoint's largest message.
    #[error("larger than the largest message")]
    TooBig,
    /// The immediate is not a fabric immediate.
    #[error("bad immediate {0:#010x}")]
    BadImmediate(u32),
    /// The connection's send queue is full (backpressure).
    #[error("send queue full")]
    QueueFull,
    /// The connection already has its maximum of receives posted.
    #[error("receive queue full")]
    RecvFull,
    /// The connection failed.
    #[error("connection failed: {0}")]
    Failed(CompletionError),
}

/// What a backend reports, taken by the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawCompletion {
    /// Up in both directions.
    Connected(ConnId),
    /// Failed.
    ConnFailed(ConnId, CompletionError),
    /// A send completed.
    Sent {
        /// Connection.
        conn: ConnId,
        /// The endpoint's tag.
        user_data: u64,
        /// Outcome.
        result: Result<(), CompletionError>,
    },
    /// A receive completed.
    Recv {
        /// Connection.
        conn: ConnId,
        /// The endpoint's tag.
        user_data: u64,
        /// Bytes written.
        len: u32,
        /// The immediate, when the send had one.
        imm: Option<u32>,
        /// Outcome.
        result: Result<(), CompletionError>,
    },
}

impl RawCompletion {
    /// A blank value to size arrays with.
    pub const EMPTY: RawCompletion = RawCompletion::Connected(ConnId(u32::MAX));
}

/// A backend could not take a work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawPostError {
    /// Its task pool is full now; retry after completions are taken.
    Busy,
    /// The connection cannot take work.
    Conn(CompletionError),
    /// The request is invalid for the backend (range, size).
    Invalid,
}

/// Sizes of one connection, fixed when it is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnDepth {
    /// Sends in flight (one is kept for credit messages).
    pub sends: u32,
    /// Receives posted.
    pub recvs: u32,
    /// Largest message.
    pub max_msg: u32,
}

/// A two-sided RDMA backend: the raw operations, with no credits. Its
/// completions on one connection come in posting order. Implemented by
/// [`DocaTransport`] and, with the feature `verbs`, `VerbsTransport`; the
/// [`Endpoint`] adds credits, queues and receive checks on top.
pub trait Transport {
    /// Name of the backend, for logs and test output.
    fn name(&self) -> &'static str;
    /// Registers memory.
    fn register(&mut self, id: RegionId, mem: Memory<'_>) -> Result<(), RegionRegisterError>;
    /// Size of a registered region.
    fn region_len(&self, id: RegionId) -> Option<u64>;
    /// Opens connection `id` and returns its blob for the peer.
    fn open(&mut self, id: ConnId, depth: ConnDepth) -> Result<Vec<u8>, ConnSetupError>;
    /// Connects `id` to the peer described by `blob`; `Connected` follows.
    fn connect(&mut self, id: ConnId, blob: &[u8]) -> Result<(), ConnSetupError>;
    /// Posts a send of `len` bytes at `offset` of `region` (`None`: a
    /// zero-length send).
    fn send(
        &mut self,
        conn: ConnId,
        src: Option<(RegionId, u64, u32)>,
        imm: Option<u32>,
        user_data: u64,
    ) -> Result<(), RawPostError>;
    /// Posts a receive.
    fn recv(&mut self, conn: ConnId, dst: (RegionId, u64, u32), user_data: u64) -> Result<(), RawPostError>;
    /// Makes progress and takes up to `out.len()` completions; never blocks.
    fn poll(&mut self, out: &mut [RawCompletion]) -> usize;
    /// Fails the connection on purpose: every outstanding operation
    /// completes with an error, and the peer sees the connection go.
    fn abort(&mut self, conn: ConnId);
    /// An fd that turns readable when the transport has something new to
    /// report (a completion, a connection event), for a caller that sleeps
    /// when idle; `None`: the backend has none, so callers nap instead.
    /// Protocol: [`clear_notification`](Self::clear_notification), poll
    /// once more, and only then sleep on the fd; the fd fires only after a
    /// `clear_notification` (which arms it, as DOCA requires before every
    /// wait), once.
    fn notification_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Forgets what the notification fd reported so far, takes in what is
    /// pending (DOCA: progress until nothing is left) and arms the fd for
    /// one wake-up.
    fn clear_notification(&mut self) {}
}
