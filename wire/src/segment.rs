//! Shared-memory segment layouts: tenant pools and descriptor rings.
//!
//! Both segments start with a header (magic, version, geometry) written once
//! by the creator; every opener reads it by value and checks it with
//! [`PoolHeader::check`] / [`RingHeader::check`] against the length it really
//! mapped before computing any offset from it. The fields that change at run
//! time (per-buffer metadata, free hints, ring cursors) sit at the offsets
//! below and are accessed by `shm` through atomics only.
//!
//! Pool segment:
//!
//! ```text
//! 0                    PoolHeader (64 B)
//! POOL_META_OFFSET     BufMeta x buf_count (16 B each): owner, chain link
//! avail_offset         free hints: one bit per buffer, in u64 words,
//!                      64 B aligned (PoolLayout::avail_offset)
//! data_offset          buffers, buf_size each, 4 KiB aligned start
//! ```
//!
//! Ring segment:
//!
//! ```text
//! 0                    RingHeader (64 B)
//! RING_PRODUCER_OFFSET RingCursor: producers' tail, and the consumer's sleep
//!                      and closed flags (read on every push, written rarely)
//! RING_CONSUMER_OFFSET RingCursor: consumer's head (written on every pop)
//! RING_SLOTS_OFFSET    RingSlot x capacity (32 B each: sequence + descriptor)
//! ```

use crate::desc::{Descriptor, GeometryError, PoolGeometry};
use core::mem::offset_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic at offset 0 of a pool segment ("DNEPOOL\0").
pub const POOL_MAGIC: u64 = u64::from_le_bytes(*b"DNEPOOL\0");
/// Magic at offset 0 of a ring segment ("DNERING\0").
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"DNERING\0");
/// Version of both segment layouts; bumped on any change.
pub const SEGMENT_VERSION: u32 = 2;
/// Cache line size assumed by the layouts (x86_64 and Cortex-A72/A78).
pub const CACHE_LINE: usize = 64;
/// Alignment of the first buffer of a pool.
pub const POOL_DATA_ALIGN: u64 = 4096;
/// The nil buffer index (end of a chain).
pub const NIL: u32 = u32::MAX;

/// Pool segment header. Written once by host-shimd, read by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PoolHeader {
    /// [`POOL_MAGIC`].
    pub magic: u64,
    /// [`SEGMENT_VERSION`].
    pub version: u32,
    /// [`PoolHeader::FLAG_HUGETLB`] and friends.
    pub flags: u32,
    /// Tenant that owns the pool.
    pub tenant: u16,
    /// Must be zero.
    pub reserved0: u16,
    /// Bytes per buffer, headroom included.
    pub buf_size: u32,
    /// Buffers in the pool.
    pub buf_count: u32,
    /// Bytes reserved at the front of each buffer for the fabric header.
    pub headroom: u32,
    /// Longest chain one message may use.
    pub max_chain: u32,
    /// Must be zero.
    pub reserved1: u32,
    /// Offset of the first buffer.
    pub data_offset: u64,
    /// Bytes of the segment that the layout uses.
    pub total_len: u64,
}
const _: () = assert!(size_of::<PoolHeader>() == 56);

impl PoolHeader {
    /// The segment is backed by hugetlb pages.
    pub const FLAG_HUGETLB: u32 = 1 << 0;
    /// Every defined flag.
    pub const FLAGS_ALL: u32 = Self::FLAG_HUGETLB;

    /// The header describing `layout`.
    pub fn new(layout: &PoolLayout, flags: u32) -> Self {
        let g = layout.geometry;
        Self {
            magic: POOL_MAGIC,
            version: SEGMENT_VERSION,
            flags,
            tenant: g.tenant(),
            reserved0: 0,
            buf_size: g.buf_size(),
            buf_count: g.buf_count(),
            headroom: g.headroom(),
            max_chain: g.max_chain(),
            reserved1: 0,
            data_offset: layout.data_offset,
            total_len: layout.total_len,
        }
    }

    /// Checks a header read from a segment of `mapped_len` bytes and returns
    /// the layout it describes. Every derived offset is recomputed here, never
    /// taken from the segment on trust.
    pub fn check(&self, mapped_len: u64) -> Result<PoolLayout, SegmentError> {
        check_magic(self.magic, POOL_MAGIC, self.version)?;
        if self.flags & !Self::FLAGS_ALL != 0 || self.reserved0 != 0 || self.reserved1 != 0 {
            return Err(SegmentError::Reserved);
        }
        let g = PoolGeometry::new(self.tenant, self.buf_size, self.buf_count, self.headroom, self.max_chain)?;
        let layout = PoolLayout::new(g);
        if layout.data_offset != self.data_offset {
            return Err(SegmentError::Mismatch { field: "data_offset" });
        }
        if layout.total_len != self.total_len {
            return Err(SegmentError::Mismatch { field: "total_len" });
        }
        if layout.total_len > mapped_len {
            return Err(SegmentError::TooSmall { need: layout.total_len, have: mapped_len });
        }
        Ok(layout)
    }
}

/// Per-buffer metadata in the pool's buffer table. Accessed as atomics.
///
/// The owner word is the only record of whether a buffer is free: taking a
/// buffer and giving it back are each one compare-and-swap of it, so a
/// process that dies at any instruction leaves every buffer either free or
/// recorded as its own (which host-shimd reclaims). The free hints beside
/// the table only speed up the search for a free buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BufMeta {
    /// Current [`Owner`].
    pub owner: u32,
    /// Next buffer of the message chain, or [`NIL`].
    pub next_chain: u32,
    /// Unused (zero in a new pool; nobody reads it).
    pub reserved: [u32; 2],
}
const _: () = assert!(size_of::<BufMeta>() == 16);

/// Offset of the [`BufMeta`] table in a pool segment.
pub const POOL_META_OFFSET: u64 = 64;
const _: () = assert!(size_of::<PoolHeader>() as u64 <= POOL_META_OFFSET);

/// Offsets of a pool segment, derived from its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    /// The pool's geometry.
    pub geometry: PoolGeometry,
    /// Offset of the free hints: bit `i % 64` of u64 word `i / 64` is set
    /// when buffer `i` may be free.
    pub avail_offset: u64,
    /// Offset of the first buffer.
    pub data_offset: u64,
    /// Bytes used by the layout.
    pub total_len: u64,
}

impl PoolLayout {
    /// Lays out a pool. Cannot overflow: `buf_count < 2^32` and
    /// `buf_size < 2^32`, so every product fits in a u64.
    pub fn new(geometry: PoolGeometry) -> Self {
        let meta_end = POOL_META_OFFSET + u64::from(geometry.buf_count()) * size_of::<BufMeta>() as u64;
        let avail_offset = meta_end.next_multiple_of(CACHE_LINE as u64);
        let avail_end = avail_offset + u64::from(Self::avail_words_for(geometry.buf_count())) * 8;
        let data_offset = avail_end.next_multiple_of(POOL_DATA_ALIGN);
        let total_len = data_offset + u64::from(geometry.buf_count()) * u64::from(geometry.buf_size());
        Self { geometry, avail_offset, data_offset, total_len }
    }

    /// u64 words of free hints for `buf_count` buffers.
    pub const fn avail_words_for(buf_count: u32) -> u32 {
        buf_count.div_ceil(64)
    }

    /// u64 words of free hints of this pool.
    pub fn avail_words(&self) -> u32 {
        Self::avail_words_for(self.geometry.buf_count())
    }

    /// Offset of the metadata of buffer `index`, `None` outside the pool.
    pub fn meta_offset(&self, index: u32) -> Option<u64> {
        (index < self.geometry.buf_count()).then(|| POOL_META_OFFSET + u64::from(index) * size_of::<BufMeta>() as u64)
    }

    /// Offset of the first byte of buffer `index`, `None` outside the pool.
    pub fn buf_offset(&self, index: u32) -> Option<u64> {
        (index < self.geometry.buf_count())
            .then(|| self.data_offset + u64::from(index) * u64::from(self.geometry.buf_size()))
    }
}

/// Who holds a buffer, as recorded in [`BufMeta::owner`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// Free: any process of the tenant may take it.
    Free,
    /// Held by the agent (posted receive, queued or in-flight send).
    Agent,
    /// Held by host-shimd.
    Shimd,
    /// Owned by the function attached in this slot (in its inbound ring, or
    /// allocated but not yet leased by it).
    Function(u16),
    /// Owned by the function in this slot and leased to its code: a handle
    /// exists in that process. A second lease of the same buffer (a peer
    /// sending one buffer twice) is refused because the buffer is not in the
    /// `Function` state any more.
    Held(u16),
}

/// The attach slot of the node's agent in every tenant pool: buffers handed
/// to the agent (descriptors in its per-tenant uplink ring) are
/// `Function(AGENT_SLOT)`, buffers it holds (posted receives, sends in
/// flight) are `Held(AGENT_SLOT)`. host-shimd never gives it to a function.
pub const AGENT_SLOT: u16 = u16::MAX - 1;

const OWNER_FUNCTION_BASE: u32 = 0x1_0000;
const OWNER_HELD_BASE: u32 = 0x2_0000;

impl Owner {
    /// The slot of a function owner (`Function` or `Held`).
    pub fn slot(self) -> Option<u16> {
        match self {
            Owner::Function(s) | Owner::Held(s) => Some(s),
            _ => None,
        }
    }

    /// The raw value stored in shared memory.
    pub const fn to_raw(self) -> u32 {
        match self {
            Owner::Free => 0,
            Owner::Agent => 1,
            Owner::Shimd => 2,
            Owner::Function(slot) => OWNER_FUNCTION_BASE | slot as u32,
            Owner::Held(slot) => OWNER_HELD_BASE | slot as u32,
        }
    }

    /// Decodes a raw value read from shared memory.
    pub fn from_raw(raw: u32) -> Result<Self, SegmentError> {
        match raw {
            0 => Ok(Owner::Free),
            1 => Ok(Owner::Agent),
            2 => Ok(Owner::Shimd),
            r if r & !0xFFFF == OWNER_FUNCTION_BASE => Ok(Owner::Function((r & 0xFFFF) as u16)),
            r if r & !0xFFFF == OWNER_HELD_BASE => Ok(Owner::Held((r & 0xFFFF) as u16)),
            r => Err(SegmentError::BadOwner(r)),
        }
    }
}

/// Ring segment header. Written once by the ring's creator, read by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RingHeader {
    /// [`RING_MAGIC`].
    pub magic: u64,
    /// [`SEGMENT_VERSION`].
    pub version: u32,
    /// `size_of::<RingSlot>()`.
    pub slot_size: u32,
    /// Slots; a power of two.
    pub capacity: u32,
    /// Tenant whose descriptors the ring carries.
    pub tenant: u16,
    /// Function id of the consumer.
    pub owner_fn: u16,
    /// Attach slot of the consumer.
    pub owner_slot: u32,
    /// Must be zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<RingHeader>() == 32);

/// A ring cursor on its own cache line. Accessed as atomics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, align(64))]
pub struct RingCursor {
    /// Monotonic position (producers' tail or consumer's head).
    pub pos: u64,
    /// Producer cursor only: non-zero while the consumer sleeps on its
    /// doorbell and wants to be woken.
    pub sleeping: u32,
    /// Producer cursor only: non-zero once the ring is closed, and
    /// producers stop pushing: [`RING_CONSUMER_GONE`] (host-shimd, when the
    /// function dies) or [`RING_ABANDONED`] (host-shimd, when it stops
    /// cleanly); any other non-zero value counts as the first.
    pub closed: u32,
    /// Must be zero.
    pub reserved: [u8; 48],
}
const _: () = assert!(size_of::<RingCursor>() == CACHE_LINE);

/// [`RingCursor::closed`]: the ring's consumer is gone (it died, or
/// host-shimd dropped it); the tenant's other rings stay open.
pub const RING_CONSUMER_GONE: u32 = 1;
/// [`RingCursor::closed`]: the ring's creator stopped (host-shimd exited
/// cleanly), so nothing pushed into it would ever be delivered, whoever
/// still maps it.
pub const RING_ABANDONED: u32 = 2;

/// One ring slot: a lap sequence number (Vyukov bounded queue) and the
/// descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RingSlot {
    /// Sequence: equals the slot's position when free for that lap, position
    /// + 1 once written.
    pub seq: u32,
    /// The descriptor.
    pub desc: Descriptor,
}
const _: () = assert!(size_of::<RingSlot>() == 32);
/// Offset of the descriptor within a slot.
pub const RING_SLOT_DESC_OFFSET: usize = offset_of!(RingSlot, desc);

/// Offset of the producers' cursor in a ring segment.
pub const RING_PRODUCER_OFFSET: u64 = 64;
/// Offset of the consumer's cursor in a ring segment.
pub const RING_CONSUMER_OFFSET: u64 = RING_PRODUCER_OFFSET + CACHE_LINE as u64;
/// Offset of slot 0 in a ring segment.
pub const RING_SLOTS_OFFSET: u64 = RING_CONSUMER_OFFSET + CACHE_LINE as u64;
/// Largest ring.
pub const RING_MAX_CAPACITY: u32 = 1 << 20;
const _: () = assert!(size_of::<RingHeader>() as u64 <= RING_PRODUCER_OFFSET);

/// Offsets of a ring segment, derived from its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Slots (a power of two, at most [`RING_MAX_CAPACITY`]).
    pub capacity: u32,
    /// Bytes used by the layout.
    pub total_len: u64,
}

impl RingLayout {
    /// Lays out a ring of `capacity` slots.
    pub fn new(capacity: u32) -> Result<Self, SegmentError> {
        if !capacity.is_power_of_two() || !(2..=RING_MAX_CAPACITY).contains(&capacity) {
            return Err(SegmentError::Capacity(capacity));
        }
        let total_len = RING_SLOTS_OFFSET + u64::from(capacity) * size_of::<RingSlot>() as u64;
        Ok(Self { capacity, total_len })
    }

    /// Offset of the slot for position `pos` (always inside the ring).
    pub fn slot_offset(&self, pos: u64) -> u64 {
        RING_SLOTS_OFFSET + (pos & u64::from(self.capacity - 1)) * size_of::<RingSlot>() as u64
    }
}

impl RingHeader {
    /// The header of a ring with `layout` consumed by (`owner_fn`, `owner_slot`).
    pub fn new(layout: &RingLayout, tenant: u16, owner_fn: u16, owner_slot: u32) -> Self {
        Self {
            magic: RING_MAGIC,
            version: SEGMENT_VERSION,
            slot_size: size_of::<RingSlot>() as u32,
            capacity: layout.capacity,
            tenant,
            owner_fn,
            owner_slot,
            reserved: 0,
        }
    }

    /// Checks a header read from a segment of `mapped_len` bytes.
    pub fn check(&self, mapped_len: u64) -> Result<RingLayout, SegmentError> {
        check_magic(self.magic, RING_MAGIC, self.version)?;
        if self.reserved != 0 {
            return Err(SegmentError::Reserved);
        }
        if self.slot_size as usize != size_of::<RingSlot>() {
            return Err(SegmentError::Mismatch { field: "slot_size" });
        }
        let layout = RingLayout::new(self.capacity)?;
        if layout.total_len > mapped_len {
            return Err(SegmentError::TooSmall { need: layout.total_len, have: mapped_len });
        }
        Ok(layout)
    }
}

fn check_magic(found: u64, want: u64, version: u32) -> Result<(), SegmentError> {
    if found != want {
        return Err(SegmentError::BadMagic { found, want });
    }
    if version != SEGMENT_VERSION {
        return Err(SegmentError::Version { found: version, want: SEGMENT_VERSION });
    }
    Ok(())
}

/// A segment header that cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Not a segment of the expected kind.
    #[error("bad magic {found:#018x}, expected {want:#018x}")]
    BadMagic {
        /// Magic read.
        found: u64,
        /// Magic expected.
        want: u64,
    },
    /// Written by another version of DNE.
    #[error("segment version {found}, this build speaks {want}")]
    Version {
        /// Version read.
        found: u32,
        /// Version of this build.
        want: u32,
    },
    /// Reserved fields or flags are not zero.
    #[error("reserved fields or undefined flags are set")]
    Reserved,
    /// The pool geometry is unusable.
    #[error("pool geometry: {0}")]
    Geometry(#[from] GeometryError),
    /// A stored offset disagrees with the geometry.
    #[error("header field {field} disagrees with the geometry")]
    Mismatch {
        /// The field.
        field: &'static str,
    },
    /// The mapping is shorter than the layout.
    #[error("segment needs {need} bytes, mapping has {have}")]
    TooSmall {
        /// Bytes the layout needs.
        need: u64,
        /// Bytes mapped.
        have: u64,
    },
    /// A ring capacity that is not a power of two in 2..=2^20.
    #[error("ring capacity {0} is not a power of two in 2..={RING_MAX_CAPACITY}")]
    Capacity(u32),
    /// A buffer owner value that names nobody.
    #[error("invalid buffer owner value {0:#x}")]
    BadOwner(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> PoolLayout {
        PoolLayout::new(PoolGeometry::new(1, 16384, 1000, 64, 64).unwrap())
    }

    #[test]
    fn pool_layout_is_aligned_and_checked() {
        let l = layout();
        assert_eq!(l.data_offset % POOL_DATA_ALIGN, 0);
        assert!(l.data_offset >= POOL_META_OFFSET + 16 * 1000);
        // The hints (16 words for 1000 buffers) lie between the table and
        // the buffers, on their own cache lines.
        assert_eq!(l.avail_words(), 16);
        assert_eq!(l.avail_offset % CACHE_LINE as u64, 0);
        assert!(l.avail_offset >= POOL_META_OFFSET + 16 * 1000);
        assert!(l.data_offset >= l.avail_offset + 16 * 8);
        let h = PoolHeader::new(&l, 0);
        assert_eq!(h.check(l.total_len), Ok(l));
        assert_eq!(h.check(l.total_len - 1), Err(SegmentError::TooSmall { need: l.total_len, have: l.total_len - 1 }));
        assert_eq!(l.buf_offset(999), Some(l.data_offset + 999 * 16384));
        assert_eq!(l.buf_offset(1000), None);
        assert_eq!(l.meta_offset(1000), None);
    }

    #[test]
    fn pool_header_names_what_is_wrong() {
        let l = layout();
        let good = PoolHeader::new(&l, PoolHeader::FLAG_HUGETLB);
        let len = l.total_len;
        assert!(matches!(PoolHeader { magic: 1, ..good }.check(len), Err(SegmentError::BadMagic { .. })));
        assert_eq!(PoolHeader { version: 1, ..good }.check(len), Err(SegmentError::Version { found: 1, want: 2 }));
        assert_eq!(PoolHeader { flags: 8, ..good }.check(len), Err(SegmentError::Reserved));
        assert_eq!(
            PoolHeader { data_offset: 0, ..good }.check(len),
            Err(SegmentError::Mismatch { field: "data_offset" })
        );
        assert!(matches!(PoolHeader { buf_size: 100, ..good }.check(len), Err(SegmentError::Geometry(_))));
    }

    #[test]
    fn ring_layout_and_header() {
        let l = RingLayout::new(1024).unwrap();
        assert_eq!(l.total_len, RING_SLOTS_OFFSET + 1024 * 32);
        assert_eq!(l.slot_offset(1024 + 3), RING_SLOTS_OFFSET + 3 * 32);
        let h = RingHeader::new(&l, 2, 9, 4);
        assert_eq!(h.check(l.total_len), Ok(l));
        assert_eq!(RingHeader { capacity: 1000, ..h }.check(u64::MAX), Err(SegmentError::Capacity(1000)));
        assert_eq!(
            RingHeader { slot_size: 64, ..h }.check(u64::MAX),
            Err(SegmentError::Mismatch { field: "slot_size" })
        );
        assert!(RingLayout::new(1).is_err());
        assert!(RingLayout::new(RING_MAX_CAPACITY * 2).is_err());
    }

    #[test]
    fn owners_round_trip() {
        for o in [Owner::Free, Owner::Agent, Owner::Shimd, Owner::Function(0), Owner::Function(65535), Owner::Held(7)] {
            assert_eq!(Owner::from_raw(o.to_raw()), Ok(o));
        }
        assert_eq!(Owner::from_raw(3), Err(SegmentError::BadOwner(3)));
        assert_eq!(Owner::from_raw(0x3_0000), Err(SegmentError::BadOwner(0x3_0000)));
    }

    proptest! {
        #[test]
        fn any_pool_header_bytes_check_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), size_of::<PoolHeader>()),
            mapped in any::<u64>(),
        ) {
            let h = PoolHeader::read_from_bytes(&bytes).unwrap();
            if let Ok(l) = h.check(mapped) {
                prop_assert!(l.total_len <= mapped);
                let last = l.buf_offset(l.geometry.buf_count() - 1).unwrap();
                prop_assert!(last + u64::from(l.geometry.buf_size()) <= l.total_len);
            }
        }

        #[test]
        fn valid_pool_headers_round_trip(
            buf_size in (2u32..4096).prop_map(|k| k * 64),
            buf_count in 1u32..1_000_000,
            tenant in any::<u16>(),
        ) {
            let l = PoolLayout::new(PoolGeometry::new(tenant, buf_size, buf_count, 64, 1).unwrap());
            let h = PoolHeader::new(&l, 0);
            let back = PoolHeader::read_from_bytes(h.as_bytes()).unwrap();
            prop_assert_eq!(back.check(l.total_len), Ok(l));
        }

        #[test]
        fn any_ring_header_bytes_check_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), size_of::<RingHeader>()),
            mapped in any::<u64>(),
            pos in any::<u64>(),
        ) {
            let h = RingHeader::read_from_bytes(&bytes).unwrap();
            if let Ok(l) = h.check(mapped) {
                prop_assert!(l.slot_offset(pos) + 32 <= l.total_len);
                prop_assert!(l.total_len <= mapped);
            }
        }
    }
}
