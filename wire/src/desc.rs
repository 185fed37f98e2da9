//! The descriptor: how one function hands a message to another.
//!
//! A descriptor names a message by (tenant, first buffer index, total length)
//! in the tenant's pool. A message longer than one buffer's payload capacity is
//! a chain of buffers linked through the pool's buffer table (see
//! [`crate::segment::BufMeta`]); the descriptor carries only the head and the
//! total length, from which the number of buffers follows.
//!
//! A receiver never trusts a descriptor: [`Descriptor::validate`] checks every
//! field against the receiver's own [`PoolGeometry`] before any memory is
//! touched.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `route` value of a descriptor that is not travelling along a configured
/// function chain (a direct send).
pub const NO_ROUTE: u16 = u16::MAX;
/// `origin` value of a descriptor that expects no reply.
pub const NO_NODE: u16 = u16::MAX;
/// Longest chain a pool may allow: a fragment index is 16 bits on the
/// fabric.
pub const MAX_CHAIN: u32 = u16::MAX as u32;

/// A message hand-off, 28 bytes, written into descriptor rings, carried over
/// comch and embedded in every [`crate::FabricHeader`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Descriptor {
    /// Tenant whose pool holds the buffers.
    pub tenant: u16,
    /// [`DescFlags`] bits.
    pub flags: u16,
    /// Function id of the sender (cluster-wide, from the config).
    pub src_fn: u16,
    /// Function id of the destination.
    pub dst_fn: u16,
    /// Function chain (route) this message travels along, or [`NO_ROUTE`].
    pub route: u16,
    /// Index of `dst_fn` within the route.
    pub hop: u8,
    /// [`ErrorCode`] when [`DescFlags::ERROR`] is set, otherwise 0.
    pub status: u8,
    /// Node that waits for the final reply (the ingress), or [`NO_NODE`].
    pub origin: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Request id assigned by the origin; echoed by every hop.
    pub request: u32,
    /// Index of the first buffer of the chain in the tenant pool.
    pub buf: u32,
    /// Payload bytes in the whole chain.
    pub len: u32,
}
const _: () = assert!(size_of::<Descriptor>() == 28);
const _: () = assert!(align_of::<Descriptor>() == 4);

/// Descriptor flag bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescFlags;

impl DescFlags {
    /// The message reports a failure; `status` holds the [`ErrorCode`] and the
    /// payload (if any) is diagnostic text.
    pub const ERROR: u16 = 1 << 0;
    /// The message is the reply travelling back to `origin`.
    pub const REPLY: u16 = 1 << 1;
    /// The call found no live instance of its destination on a node, and
    /// is on its way to another node of the function: set by the sender's
    /// shim when the destination runs on the sender's node but has no live
    /// instance there (see [`Peer::STANDIN`](crate::ctrl::Peer::STANDIN)),
    /// or by the agent of the node it reached. From there a call of an
    /// ingress (`origin`) goes straight to another node of the function,
    /// and a call of a function goes back to its caller's node first (the
    /// node an error about it goes to), which sends it to another. A call
    /// so marked that finds no live instance again comes back as an
    /// error; a function that forwards it starts a new hop, and its shim
    /// clears the flag. The agent (in DPU mode host-shimd's bridge) also
    /// sets it on every call of a function on another node as it pushes
    /// it into a local instance's ring, and only there: a descriptor does
    /// not name its caller's node, and host-shimd, answering the calls in
    /// the ring of an instance that dies, sends a call so marked back
    /// through the agent (to the node it came from), not to a local
    /// instance of its caller. The receiving function may see it set; it
    /// means nothing there.
    pub const ELSEWHERE: u16 = 1 << 2;
    /// Every defined bit.
    pub const ALL: u16 = Self::ERROR | Self::REPLY | Self::ELSEWHERE;
}

/// Why a message failed, carried in [`Descriptor::status`] and in control
/// `Error` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// The destination function is not in the routing table.
    UnknownFunction = 1,
    /// The destination's node cannot be reached.
    Unreachable = 2,
    /// The destination function died with the message in flight.
    PeerDied = 3,
    /// The message was not answered in time.
    Timeout = 4,
    /// The tenant's queue or credits stayed exhausted.
    Overloaded = 5,
    /// A descriptor failed validation.
    BadDescriptor = 6,
    /// A descriptor or attach named another tenant's pool.
    TenantMismatch = 7,
    /// The message is larger than the receiver accepts.
    TooLarge = 8,
    /// No buffer could be allocated.
    PoolExhausted = 9,
    /// The function itself reported a failure.
    FunctionFailed = 10,
    /// The route or hop does not exist.
    BadRoute = 11,
    /// The peer speaks another protocol or layout version.
    VersionMismatch = 12,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 12] = [
        Self::UnknownFunction,
        Self::Unreachable,
        Self::PeerDied,
        Self::Timeout,
        Self::Overloaded,
        Self::BadDescriptor,
        Self::TenantMismatch,
        Self::TooLarge,
        Self::PoolExhausted,
        Self::FunctionFailed,
        Self::BadRoute,
        Self::VersionMismatch,
    ];

    /// Decodes a status byte; `None` for 0 and for unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| *c as u8 == v)
    }

    /// A short, stable, lowercase name (used as a metrics label).
    pub fn as_str(self) -> &'static str {
        // The names are ASCII: the conversion cannot fail.
        self.as_c_str().to_str().unwrap_or("")
    }

    /// [`as_str`](Self::as_str), NUL-terminated (for the C ABI).
    pub fn as_c_str(self) -> &'static core::ffi::CStr {
        match self {
            Self::UnknownFunction => c"unknown_function",
            Self::Unreachable => c"unreachable",
            Self::PeerDied => c"peer_died",
            Self::Timeout => c"timeout",
            Self::Overloaded => c"overloaded",
            Self::BadDescriptor => c"bad_descriptor",
            Self::TenantMismatch => c"tenant_mismatch",
            Self::TooLarge => c"too_large",
            Self::PoolExhausted => c"pool_exhausted",
            Self::FunctionFailed => c"function_failed",
            Self::BadRoute => c"bad_route",
            Self::VersionMismatch => c"version_mismatch",
        }
    }
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shape of one tenant pool, as the receiver knows it from its own
/// configuration (never from the peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    tenant: u16,
    buf_size: u32,
    buf_count: u32,
    headroom: u32,
    max_chain: u32,
}

/// A pool geometry that cannot describe a usable pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// Buffers must be a multiple of 64 bytes and hold at least one payload
    /// byte after the headroom.
    #[error("buffer size {buf_size} must be a multiple of 64 and larger than the headroom {headroom}")]
    BufSize {
        /// Configured buffer size.
        buf_size: u32,
        /// Headroom reserved at the front of each buffer.
        headroom: u32,
    },
    /// A pool needs at least one buffer and fewer than `u32::MAX` (the nil
    /// index).
    #[error("buffer count {0} must be in 1..{max}", max = u32::MAX)]
    BufCount(u32),
    /// A chain must be allowed at least one buffer and at most the pool,
    /// at most [`MAX_CHAIN`] (a fragment index is 16 bits on the fabric),
    /// and its payload must fit a descriptor's 32-bit length.
    #[error(
        "maximum chain length {0} must be in 1..=buffer count, at most {MAX_CHAIN}, \
         and its payload (chain x buffer payload) under 4 GiB"
    )]
    MaxChain(u32),
}

impl PoolGeometry {
    /// Builds and checks a geometry. `headroom` is reserved at the front of
    /// every buffer for the fabric header ([`crate::fabric::HEADROOM`]).
    pub fn new(
        tenant: u16,
        buf_size: u32,
        buf_count: u32,
        headroom: u32,
        max_chain: u32,
    ) -> Result<Self, GeometryError> {
        if !buf_size.is_multiple_of(64) || buf_size <= headroom {
            return Err(GeometryError::BufSize { buf_size, headroom });
        }
        if buf_count == 0 || buf_count == u32::MAX {
            return Err(GeometryError::BufCount(buf_count));
        }
        let payload = u64::from(buf_size - headroom) * u64::from(max_chain);
        if max_chain == 0 || max_chain > buf_count || max_chain > MAX_CHAIN || payload > u64::from(u32::MAX) {
            return Err(GeometryError::MaxChain(max_chain));
        }
        Ok(Self { tenant, buf_size, buf_count, headroom, max_chain })
    }

    /// Tenant that owns the pool.
    pub fn tenant(&self) -> u16 {
        self.tenant
    }
    /// Bytes per buffer, headroom included.
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }
    /// Buffers in the pool.
    pub fn buf_count(&self) -> u32 {
        self.buf_count
    }
    /// Bytes reserved at the front of each buffer.
    pub fn headroom(&self) -> u32 {
        self.headroom
    }
    /// Longest chain a message may use.
    pub fn max_chain(&self) -> u32 {
        self.max_chain
    }
    /// Payload bytes one buffer holds.
    pub fn payload_cap(&self) -> u32 {
        self.buf_size - self.headroom
    }
    /// Largest message (payload bytes) a descriptor may carry.
    pub fn max_len(&self) -> u64 {
        u64::from(self.payload_cap()) * u64::from(self.max_chain)
    }
    /// Buffers needed for a message of `len` payload bytes (at least one).
    pub fn frags_for(&self, len: u32) -> u32 {
        frags_for(len, self.payload_cap())
    }
}

/// Buffers needed for `len` payload bytes at `cap` bytes per buffer; an empty
/// message still occupies one buffer. `cap` must be non-zero.
pub fn frags_for(len: u32, cap: u32) -> u32 {
    debug_assert!(cap > 0);
    if len == 0 { 1 } else { len.div_ceil(cap) }
}

/// Payload bytes held by fragment `i` of a message of `len` bytes at `cap`
/// bytes per buffer (0 for an index past the end).
pub fn frag_len(len: u32, cap: u32, i: u32) -> u32 {
    let start = u64::from(i) * u64::from(cap);
    let rest = u64::from(len).saturating_sub(start);
    // The min with `cap` makes the value fit a u32.
    u32::try_from(rest.min(u64::from(cap))).unwrap_or(cap)
}

/// Why a descriptor was rejected. Small and `Copy`: rejections are counted on
/// the hot path, not logged per message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The descriptor names another tenant's pool.
    #[error("descriptor names tenant {got}, receiver pool belongs to tenant {want}")]
    TenantMismatch {
        /// Tenant in the descriptor.
        got: u16,
        /// Tenant of the receiver's pool.
        want: u16,
    },
    /// The head buffer index is outside the pool.
    #[error("buffer index {index} outside pool of {count} buffers")]
    IndexOutOfRange {
        /// Index in the descriptor.
        index: u32,
        /// Buffers in the pool.
        count: u32,
    },
    /// The length needs a longer chain than the pool allows.
    #[error("length {len} exceeds the largest message of {max} bytes")]
    TooLong {
        /// Length in the descriptor.
        len: u32,
        /// Largest allowed length.
        max: u64,
    },
    /// Undefined flag bits are set.
    #[error("undefined flag bits {0:#06x}")]
    UnknownFlags(u16),
    /// `status` is set without the error flag, or is not a known code.
    #[error("invalid status {status} for flags {flags:#06x}")]
    BadStatus {
        /// Status byte.
        status: u8,
        /// Flags word.
        flags: u16,
    },
    /// The reserved field is not zero.
    #[error("reserved field is {0:#06x}, must be zero")]
    Reserved(u16),
    /// A void: the slot a producer claimed in a ring and died before
    /// filling, published empty by host-shimd so the ring moves on.
    #[error("void descriptor (a producer died while pushing)")]
    Void,
}

/// The `reserved` value that marks a void descriptor (see
/// [`DescriptorError::Void`] and [`Descriptor::void`]).
pub const VOID_MARK: u16 = 0xFFFF;

impl DescriptorError {
    /// A short, stable, lowercase name (used as a metrics label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TenantMismatch { .. } => "tenant_mismatch",
            Self::IndexOutOfRange { .. } => "index_out_of_range",
            Self::TooLong { .. } => "too_long",
            Self::UnknownFlags(_) => "unknown_flags",
            Self::BadStatus { .. } => "bad_status",
            Self::Reserved(_) => "reserved",
            Self::Void => "void",
        }
    }
}

impl Descriptor {
    /// Whether this call, having found no live instance of its destination
    /// on the node it reached, may go on to another node of the function
    /// (marked [`DescFlags::ELSEWHERE`]): a call, not a reply or an error,
    /// not sent on for this reason before (so it goes at most once more).
    pub fn may_go_elsewhere(&self) -> bool {
        self.flags & (DescFlags::ERROR | DescFlags::REPLY | DescFlags::ELSEWHERE) == 0
    }

    /// A void descriptor of `tenant`: every receiver drops it, counted as
    /// [`DescriptorError::Void`].
    pub fn void(tenant: u16) -> Self {
        Self { tenant, reserved: VOID_MARK, ..Self::default() }
    }

    /// Whether the descriptor reports an error.
    pub fn is_error(&self) -> bool {
        self.flags & DescFlags::ERROR != 0
    }

    /// The error code, if this is an error descriptor with a known code.
    pub fn error_code(&self) -> Option<ErrorCode> {
        if self.is_error() { ErrorCode::from_u8(self.status) } else { None }
    }

    /// Checks the fields that do not depend on any pool: flags, status and the
    /// reserved field.
    pub fn validate_fields(&self) -> Result<(), DescriptorError> {
        if self.reserved == VOID_MARK {
            return Err(DescriptorError::Void);
        }
        if self.reserved != 0 {
            return Err(DescriptorError::Reserved(self.reserved));
        }
        if self.flags & !DescFlags::ALL != 0 {
            return Err(DescriptorError::UnknownFlags(self.flags & !DescFlags::ALL));
        }
        let status_ok = if self.is_error() { ErrorCode::from_u8(self.status).is_some() } else { self.status == 0 };
        if !status_ok {
            return Err(DescriptorError::BadStatus { status: self.status, flags: self.flags });
        }
        Ok(())
    }

    /// Checks every field against the receiver's own pool and returns the
    /// number of buffers in the chain. After `Ok(n)`: the tenant is the pool's,
    /// `buf < buf_count`, and `1 <= n <= max_chain`. Walking the chain links
    /// (which live in shared memory) must still bound each index and stop
    /// after `n` buffers.
    pub fn validate(&self, pool: &PoolGeometry) -> Result<u32, DescriptorError> {
        self.validate_fields()?;
        if self.tenant != pool.tenant {
            return Err(DescriptorError::TenantMismatch { got: self.tenant, want: pool.tenant });
        }
        if self.buf >= pool.buf_count {
            return Err(DescriptorError::IndexOutOfRange { index: self.buf, count: pool.buf_count });
        }
        if u64::from(self.len) > pool.max_len() {
            return Err(DescriptorError::TooLong { len: self.len, max: pool.max_len() });
        }
        Ok(pool.frags_for(self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::FromBytes;

    fn geom() -> PoolGeometry {
        PoolGeometry::new(3, 16384, 1024, 64, 128).unwrap()
    }

    fn good() -> Descriptor {
        Descriptor { tenant: 3, buf: 7, len: 100, route: NO_ROUTE, origin: NO_NODE, ..Default::default() }
    }

    #[test]
    fn only_a_call_not_sent_on_before_may_go_elsewhere() {
        for call in [Descriptor { origin: 2, ..good() }, good()] {
            assert!(call.may_go_elsewhere(), "from an ingress or a function: {call:?}");
            for f in [DescFlags::ERROR, DescFlags::REPLY, DescFlags::ELSEWHERE] {
                assert!(!Descriptor { flags: f, ..call }.may_go_elsewhere(), "flags {f:#x}");
            }
        }
    }

    #[test]
    fn valid_descriptor_passes() {
        assert_eq!(good().validate(&geom()), Ok(1));
        let d = Descriptor { len: 16320 * 2 + 1, ..good() };
        assert_eq!(d.validate(&geom()), Ok(3));
        let d = Descriptor { len: 0, ..good() };
        assert_eq!(d.validate(&geom()), Ok(1));
    }

    #[test]
    fn each_bad_field_is_named() {
        let g = geom();
        let e = |d: Descriptor| d.validate(&g).unwrap_err();
        assert_eq!(e(Descriptor { tenant: 4, ..good() }), DescriptorError::TenantMismatch { got: 4, want: 3 });
        assert_eq!(
            e(Descriptor { buf: 1024, ..good() }),
            DescriptorError::IndexOutOfRange { index: 1024, count: 1024 }
        );
        assert_eq!(
            e(Descriptor { len: 16320 * 128 + 1, ..good() }),
            DescriptorError::TooLong { len: 16320 * 128 + 1, max: 16320 * 128 }
        );
        assert_eq!(e(Descriptor { flags: 0x80, ..good() }), DescriptorError::UnknownFlags(0x80));
        assert_eq!(e(Descriptor { status: 1, ..good() }), DescriptorError::BadStatus { status: 1, flags: 0 });
        assert_eq!(
            e(Descriptor { flags: DescFlags::ERROR, status: 200, ..good() }),
            DescriptorError::BadStatus { status: 200, flags: 1 }
        );
        assert_eq!(e(Descriptor { reserved: 9, ..good() }), DescriptorError::Reserved(9));
        assert_eq!(e(Descriptor::void(good().tenant)), DescriptorError::Void);
    }

    #[test]
    fn error_descriptor_round_trips_its_code() {
        for code in ErrorCode::ALL {
            let d = Descriptor { flags: DescFlags::ERROR, status: code as u8, ..good() };
            assert_eq!(d.error_code(), Some(code));
            assert!(d.validate(&geom()).is_ok());
        }
        assert_eq!(ErrorCode::from_u8(0), None);
    }

    #[test]
    fn geometry_rejects_unusable_pools() {
        assert!(PoolGeometry::new(0, 100, 4, 64, 1).is_err());
        assert!(PoolGeometry::new(0, 64, 4, 64, 1).is_err());
        assert!(PoolGeometry::new(0, 128, 0, 64, 1).is_err());
        assert!(PoolGeometry::new(0, 128, 4, 64, 5).is_err());
        assert!(PoolGeometry::new(0, 128, 4, 64, 0).is_err());
        assert!(PoolGeometry::new(0, 128, 4, 64, 4).is_ok());
        // Longer than a 16-bit fragment index (the fabric panicked, then
        // answered "overloaded" for good).
        assert!(PoolGeometry::new(0, 128, 200_000, 64, MAX_CHAIN).is_ok());
        assert_eq!(PoolGeometry::new(0, 128, 200_000, 64, MAX_CHAIN + 1), Err(GeometryError::MaxChain(MAX_CHAIN + 1)));
        // A chain whose payload a descriptor's 32-bit length cannot give.
        assert!(PoolGeometry::new(0, 1 << 20, 8192, 64, 4096).is_ok());
        assert!(PoolGeometry::new(0, 1 << 20, 8192, 64, 4097).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 28)) {
            let d = Descriptor::read_from_bytes(&bytes).unwrap();
            prop_assert_eq!(d.as_bytes(), &bytes[..]);
        }

        #[test]
        fn validate_never_panics_and_ok_implies_bounds(
            bytes in proptest::collection::vec(any::<u8>(), 28),
            buf_size in (2u32..1024).prop_map(|k| k * 64),
            buf_count in 1u32..100_000,
            chain in 1u32..64,
        ) {
            let d = Descriptor::read_from_bytes(&bytes).unwrap();
            let g = PoolGeometry::new(d.tenant, buf_size, buf_count, 64, chain.min(buf_count)).unwrap();
            if let Ok(n) = d.validate(&g) {
                prop_assert!(d.buf < g.buf_count());
                prop_assert!(n >= 1 && n <= g.max_chain());
                prop_assert!(u64::from(n) * u64::from(g.payload_cap()) >= u64::from(d.len));
            }
        }

        #[test]
        fn fragments_cover_the_message_exactly(len in any::<u32>(), cap in 1u32..1_000_000) {
            let n = frags_for(len, cap);
            let total: u64 = (0..n.min(4096)).map(|i| u64::from(frag_len(len, cap, i))).sum();
            if n <= 4096 {
                prop_assert_eq!(total, u64::from(len));
                prop_assert!(n == 1 || frag_len(len, cap, n - 1) > 0);
            }
            prop_assert_eq!(frag_len(len, cap, n), 0);
        }
    }
}
