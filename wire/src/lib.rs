//! `wire`: every byte layout of DNE that crosses a process boundary, the PCIe
//! link or the network, in one place.
//!
//! Contract:
//! * every layout is a `#[repr(C)]` type deriving zerocopy's `FromBytes`,
//!   `IntoBytes`, `KnownLayout` and `Immutable`, with a `const` size assertion;
//! * layouts hold offsets and indices, never virtual addresses;
//! * shared segments start with a magic and a version, control frames and
//!   fabric headers carry theirs;
//! * decoding untrusted bytes returns a typed error and never panics (checked by
//!   proptest here and by the `cargo fuzz` targets in `fuzz/`);
//! * integers are native little-endian: every machine DNE runs on (x86_64 host,
//!   aarch64 BlueField) is little-endian, and a big-endian build is refused at
//!   compile time rather than silently misreading the peer.
//!
//! Modules:
//! * [`desc`]: the descriptor that names a message in a tenant pool, and its
//!   validation against a pool's geometry;
//! * [`segment`]: pool and ring segment layouts in shared memory;
//! * [`fabric`]: the header at the front of every fabric send and the 32-bit
//!   immediate;
//! * [`ctrl`]: control frames between functions, host-shimd, agents and the
//!   ingress;
//! * [`name`]: fixed-size names carried by control frames;
//! * [`layout`]: a fingerprint of all of the above, exchanged at connect time so
//!   that two builds with different layouts refuse to talk.
#![forbid(unsafe_code)]

const _: () =
    assert!(cfg!(target_endian = "little"), "DNE wire layouts are little-endian; big-endian targets are not supported");

pub mod ctrl;
pub mod desc;
pub mod fabric;
pub mod http;
pub mod layout;
pub mod mesh;
pub mod name;
pub mod segment;

pub use ctrl::{CtrlDecodeError, CtrlEncodeError, CtrlFrame, CtrlMsg};
pub use desc::{DescFlags, Descriptor, DescriptorError, ErrorCode, PoolGeometry};
pub use fabric::{FabricDecodeError, FabricHeader, Immediate, MsgKind};
pub use layout::LAYOUT_HASH;
pub use name::{Name, NameError};
pub use segment::{BufMeta, Owner, PoolHeader, RingHeader, RingSlot, SegmentError};
