//! Types shared by both backends: access flags, context states, task
//! configuration, identifiers and the events contexts report.

use crate::DocaError;
use core::ops::{BitOr, BitOrAssign};

/// Access rights of an mmap (DOCA's `doca_access_flag`, our own bit values;
/// the SDK backend maps each flag to the SDK's constant by name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access(u32);

impl Access {
    /// Local read only (DOCA's default).
    pub const LOCAL_READ_ONLY: Access = Access(0);
    /// Local read and write: a local mmap may be the target of a receive.
    pub const LOCAL_READ_WRITE: Access = Access(1);
    /// Remote RDMA read.
    pub const RDMA_READ: Access = Access(1 << 1);
    /// Remote RDMA write.
    pub const RDMA_WRITE: Access = Access(1 << 2);
    /// Remote RDMA atomics.
    pub const RDMA_ATOMIC: Access = Access(1 << 3);
    /// Read by the peer across PCIe (the DPU reading host memory).
    pub const PCI_READ_ONLY: Access = Access(1 << 4);
    /// Read and write by the peer across PCIe (the DPU's NIC writing
    /// received payloads into host memory).
    pub const PCI_READ_WRITE: Access = Access(1 << 5);

    const ALL: u32 = 0x3f;

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The flags from raw bits, or `None` when an unknown bit is set.
    pub const fn from_bits(bits: u32) -> Option<Access> {
        if bits & !Self::ALL == 0 { Some(Access(bits)) } else { None }
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether some flag of `other` is set in `self`.
    pub const fn intersects(self, other: Access) -> bool {
        self.0 & other.0 != 0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

impl BitOrAssign for Access {
    fn bitor_assign(&mut self, rhs: Access) {
        self.0 |= rhs.0;
    }
}

/// The state of a DOCA context (`doca_ctx_states`). `start` and `stop` only
/// ask for a transition; the transitions to `Running` and `Idle` happen
/// inside [`ProgressEngine::progress`](crate::ProgressEngine::progress).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtxState {
    /// Configurable; not started, or fully stopped.
    Idle,
    /// Start requested; completes in progress (comch client: when connected).
    Starting,
    /// Tasks may be submitted.
    Running,
    /// Stop requested (or a fatal error); outstanding tasks are flushed with
    /// errors, and the context becomes `Idle` once the user has taken every
    /// flushed completion.
    Stopping,
}

impl CtxState {
    /// The stop request of DOCA's context state machine: a `Starting` or
    /// `Running` context moves to `Stopping` (finished later, inside
    /// progress); any other state refuses with `BAD_STATE`.
    pub fn request_stop(&mut self) -> Result<(), crate::DocaError> {
        match self {
            CtxState::Running | CtxState::Starting => {
                *self = CtxState::Stopping;
                Ok(())
            }
            _ => Err(crate::DocaError::BAD_STATE),
        }
    }
}

/// Configuration of an RDMA context, fixed before start (DOCA task pools are
/// sized at configure time; running out is an explicit error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Send tasks (send and send-with-immediate share the pool).
    pub send_tasks: u32,
    /// Receive tasks.
    pub recv_tasks: u32,
    /// Connections the context may hold.
    pub max_connections: u32,
    /// Largest send, in bytes.
    pub max_send_size: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self { send_tasks: 256, recv_tasks: 256, max_connections: 4, max_send_size: 1 << 20 }
    }
}

impl RdmaConfig {
    pub(crate) fn validate(&self) -> Result<(), DocaError> {
        let ok = self.send_tasks > 0
            && self.recv_tasks > 0
            && self.max_connections > 0
            && self.max_connections <= 1024
            && self.max_send_size > 0
            && self.max_send_size <= crate::MAX_RDMA_MSG;
        if ok { Ok(()) } else { Err(DocaError::INVALID_VALUE) }
    }
}

/// Configuration of a comch server or client, fixed before start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ComchConfig {
    /// Largest message, at most [`COMCH_MAX_MSG_SIZE`](crate::COMCH_MAX_MSG_SIZE).
    pub max_msg_size: u32,
    /// Send tasks.
    pub send_tasks: u32,
    /// Received messages held until the user takes them; when full, the
    /// context stops reading (backpressure on the sender).
    pub recv_queue: u32,
    /// Clients a server accepts.
    pub max_clients: u32,
}

impl Default for ComchConfig {
    fn default() -> Self {
        Self { max_msg_size: crate::COMCH_MAX_MSG_SIZE, send_tasks: 64, recv_queue: 64, max_clients: 64 }
    }
}

impl ComchConfig {
    pub(crate) fn validate(&self) -> Result<(), DocaError> {
        let ok = self.max_msg_size > 0
            && self.max_msg_size <= crate::COMCH_MAX_MSG_SIZE
            && self.send_tasks > 0
            && self.recv_queue > 0
            && self.max_clients > 0
            && self.max_clients <= 4096;
        if ok { Ok(()) } else { Err(DocaError::INVALID_VALUE) }
    }
}

/// One connection of an RDMA context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RdmaConnId(pub(crate) u32);

impl RdmaConnId {
    /// Index of the connection inside its context.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// One connection of a comch server (a client has exactly one). It names
/// that connection only: a later client that takes its place in the
/// server gets another id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComchConnId(pub(crate) u32);

impl ComchConnId {
    /// Index of the connection's slot inside its context (reused by later
    /// connections).
    pub fn index(self) -> u32 {
        self.0 & 0xFFFF
    }
}

/// What an RDMA context reports, taken with `Rdma::poll_event`. A task's
/// pool slot is given back when its completion is taken.
#[derive(Debug)]
pub enum RdmaEvent {
    /// Both directions of the connection are up.
    Connected(RdmaConnId),
    /// The connection failed; its outstanding sends complete with errors.
    /// In the emulation also a connection not up 10 s after `connect`
    /// (`TIME_OUT`).
    ConnectionFailed(RdmaConnId, DocaError),
    /// A send completed: the peer placed it in a posted receive (`Ok`), or
    /// it failed.
    SendDone {
        /// Connection the send was posted on.
        conn: RdmaConnId,
        /// The submitter's tag.
        user_data: u64,
        /// The source buffer, handed back.
        buf: crate::Buf,
        /// Outcome.
        result: Result<(), DocaError>,
    },
    /// A receive completed: on success `buf.data_len()` bytes were written
    /// at the start of the buffer.
    Received {
        /// Connection the message came from (`None` for a flushed receive).
        conn: Option<RdmaConnId>,
        /// The submitter's tag.
        user_data: u64,
        /// The destination buffer, handed back.
        buf: crate::Buf,
        /// The sender's 32-bit immediate, when it sent one.
        imm: Option<u32>,
        /// Outcome.
        result: Result<(), DocaError>,
    },
}

/// What a comch context reports, taken with `poll_event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComchEvent {
    /// A client connected (server) / the client is connected (client).
    Connected(ComchConnId),
    /// The peer went away.
    Disconnected(ComchConnId),
    /// A message of `len` bytes arrived; its bytes are in the buffer given
    /// to `poll_event` (`truncated` when that buffer was too small).
    Message {
        /// Sender.
        conn: ComchConnId,
        /// Bytes of the message.
        len: u32,
        /// The caller's buffer was shorter than the message.
        truncated: bool,
    },
    /// A send completed.
    SendDone {
        /// Destination.
        conn: ComchConnId,
        /// The submitter's tag.
        user_data: u64,
        /// Outcome.
        result: Result<(), DocaError>,
    },
    /// The peer started a fast-path consumer on this connection: a
    /// [`ComchProducer`](crate::ComchProducer) on it may send to `id`.
    ConsumerUp {
        /// The connection.
        conn: ComchConnId,
        /// The consumer's id (unique per connection).
        id: u32,
    },
    /// The peer's consumer `id` went away.
    ConsumerDown {
        /// The connection.
        conn: ComchConnId,
        /// The consumer's id.
        id: u32,
    },
}

/// Largest payload of one fast-path (producer/consumer) send.
pub const COMCH_FAST_PATH_MAX: u32 = 64 << 10;

/// Most immediate bytes a fast-path send carries (DOCA's consumers take
/// what `doca_comch_consumer_cap_get_max_imm_data_len` allows; this API
/// asks for no more than this).
pub const COMCH_MAX_IMM: usize = 32;

/// The immediate bytes of a fast-path send (at most [`COMCH_MAX_IMM`]).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Imm {
    len: u8,
    bytes: [u8; COMCH_MAX_IMM],
}

impl Imm {
    /// Immediate bytes; `INVALID_VALUE` over [`COMCH_MAX_IMM`].
    pub fn new(b: &[u8]) -> Result<Imm, DocaError> {
        if b.len() > COMCH_MAX_IMM {
            return Err(DocaError::INVALID_VALUE);
        }
        let mut bytes = [0; COMCH_MAX_IMM];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Imm { len: b.len() as u8, bytes })
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl core::fmt::Debug for Imm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Imm({:02x?})", self.as_bytes())
    }
}

/// Configuration of a fast-path consumer or producer, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPathConfig {
    /// Receive tasks (consumer) or send tasks (producer).
    pub tasks: u32,
}

impl Default for FastPathConfig {
    fn default() -> Self {
        Self { tasks: 64 }
    }
}

impl FastPathConfig {
    pub(crate) fn validate(&self) -> Result<(), DocaError> {
        if self.tasks > 0 && self.tasks <= 4096 { Ok(()) } else { Err(DocaError::INVALID_VALUE) }
    }
}

/// What a fast-path consumer or producer reports, taken with `poll_event`.
/// A task's pool slot is given back when its completion is taken.
#[derive(Debug)]
pub enum FastPathEvent {
    /// A posted receive completed (consumer): on success a producer wrote
    /// `buf.data_len()` bytes at the start of the buffer.
    Received {
        /// The submitter's tag.
        user_data: u64,
        /// The buffer, handed back.
        buf: crate::Buf,
        /// The producer's immediate bytes.
        imm: Imm,
        /// The producer that wrote it (0 for a flushed receive).
        producer: u32,
        /// Outcome.
        result: Result<(), DocaError>,
    },
    /// A send completed (producer): the data went to the consumer. On a
    /// card DOCA has written it into the posted buffer; the emulation
    /// completes the send once it is in the consumer's socket, and a
    /// consumer that stops before placing it flushes the receive it was
    /// meant for with `SHUTDOWN`.
    SendDone {
        /// The submitter's tag.
        user_data: u64,
        /// The source buffer, handed back.
        buf: crate::Buf,
        /// Outcome.
        result: Result<(), DocaError>,
    },
}

/// A task could not be submitted: the error, and the buffer handed back.
#[derive(Debug, thiserror::Error)]
#[error("task submission failed: {error}")]
pub struct TaskSubmitError {
    /// Why (`NO_MEMORY`: the task pool is exhausted; `BAD_STATE`: the
    /// context is not running; `NOT_CONNECTED`: the connection failed).
    pub error: DocaError,
    /// The buffer the task would have used.
    pub buf: crate::Buf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags() {
        let a = Access::LOCAL_READ_WRITE | Access::PCI_READ_WRITE;
        assert!(a.contains(Access::PCI_READ_WRITE));
        assert!(!a.contains(Access::RDMA_WRITE));
        assert!(a.intersects(Access::RDMA_WRITE | Access::LOCAL_READ_WRITE));
        assert_eq!(Access::from_bits(a.bits()), Some(a));
        assert_eq!(Access::from_bits(1 << 9), None);
        assert!(RdmaConfig::default().validate().is_ok());
        assert!(RdmaConfig { send_tasks: 0, ..Default::default() }.validate().is_err());
        assert!(ComchConfig { max_msg_size: crate::COMCH_MAX_MSG_SIZE + 1, ..Default::default() }.validate().is_err());
    }
}
