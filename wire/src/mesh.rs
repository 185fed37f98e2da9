//! The mesh control protocol: what fabric nodes (agents and ingresses) say
//! to each other over their out-of-band TCP control connection to set up
//! fabric connections. Payloads never travel here.
//!
//! A stream of frames, each a [`MeshHeader`] and `len` bytes of body:
//!
//! * [`MeshKind::Hello`]: first frame each way; who speaks ([`MeshHello`]:
//!   fabric node id, layout hash). A wrong layout hash or an unexpected node
//!   id ends the connection.
//! * [`MeshKind::Conn`]: the blob of one fabric connection for one tenant
//!   ([`MeshConn`] and `blob_len` bytes); the receiver connects its own
//!   connection of that tenant to it.
//!
//! Every decoder returns a typed error naming the field; a frame not yet
//! complete in the buffer is [`MeshDecodeError::Incomplete`], so a stream
//! reader waits for more bytes instead of failing.

use crate::Name;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `"DNEM"`, little-endian.
pub const MESH_MAGIC: u32 = u32::from_le_bytes(*b"DNEM");
/// Version of this protocol.
pub const MESH_VERSION: u16 = 1;
/// Longest connection blob accepted.
pub const MAX_MESH_BLOB: usize = 4096;
/// Longest frame (header and body).
pub const MAX_MESH_FRAME: usize = size_of::<MeshHeader>() + size_of::<MeshConn>() + MAX_MESH_BLOB;

/// Frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MeshHeader {
    /// [`MESH_MAGIC`].
    pub magic: u32,
    /// [`MESH_VERSION`].
    pub version: u16,
    /// [`MeshKind`].
    pub kind: u16,
    /// Body bytes after the header.
    pub len: u32,
    /// Must be zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<MeshHeader>() == 16);

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MeshKind {
    /// [`MeshHello`].
    Hello = 1,
    /// [`MeshConn`] and its blob.
    Conn = 2,
}

/// Body of [`MeshKind::Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MeshHello {
    /// Fabric node id of the speaker (config order: nodes, then ingresses).
    pub node: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Process id of the speaker (to tell a restart in logs).
    pub pid: u32,
    /// The speaker's [`crate::LAYOUT_HASH`].
    pub layout_hash: u64,
    /// The speaker's node name.
    pub name: Name,
}
const _: () = assert!(size_of::<MeshHello>() == 48);

/// Body of [`MeshKind::Conn`]; `blob_len` bytes of blob follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MeshConn {
    /// Tenant of the connection.
    pub tenant: u16,
    /// Must be zero.
    pub reserved: u16,
    /// Bytes of blob that follow.
    pub blob_len: u32,
}
const _: () = assert!(size_of::<MeshConn>() == 8);

/// A decoded frame (the blob borrowed from the input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshMsg<'a> {
    /// Hello.
    Hello(MeshHello),
    /// A connection blob.
    Conn(MeshConn, &'a [u8]),
}

/// A frame that cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeshDecodeError {
    /// Not all of the frame is in the buffer yet (`need` bytes in all).
    #[error("incomplete frame: {need} bytes needed")]
    Incomplete {
        /// Bytes the whole frame needs.
        need: usize,
    },
    /// Bad magic.
    #[error("bad mesh magic {0:#010x}")]
    Magic(u32),
    /// Another protocol version.
    #[error("mesh version {0}, this build speaks {MESH_VERSION}")]
    Version(u16),
    /// Unknown kind.
    #[error("unknown mesh frame kind {0}")]
    Kind(u16),
    /// A field holds a value that is not allowed.
    #[error("mesh frame field {0} is invalid")]
    Field(&'static str),
}

impl MeshMsg<'_> {
    /// Bytes of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        size_of::<MeshHeader>()
            + match self {
                MeshMsg::Hello(_) => size_of::<MeshHello>(),
                MeshMsg::Conn(_, blob) => size_of::<MeshConn>() + blob.len(),
            }
    }

    /// Appends the encoded frame to `out`. A blob longer than
    /// [`MAX_MESH_BLOB`] is refused.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MeshDecodeError> {
        let (kind, body_len) = match self {
            MeshMsg::Hello(_) => (MeshKind::Hello, size_of::<MeshHello>()),
            MeshMsg::Conn(_, blob) if blob.len() > MAX_MESH_BLOB => return Err(MeshDecodeError::Field("blob_len")),
            MeshMsg::Conn(_, blob) => (MeshKind::Conn, size_of::<MeshConn>() + blob.len()),
        };
        let h = MeshHeader {
            magic: MESH_MAGIC,
            version: MESH_VERSION,
            kind: kind as u16,
            len: body_len as u32,
            reserved: 0,
        };
        out.extend_from_slice(h.as_bytes());
        match self {
            MeshMsg::Hello(hello) => out.extend_from_slice(hello.as_bytes()),
            MeshMsg::Conn(c, blob) => {
                let c = MeshConn { blob_len: blob.len() as u32, ..*c };
                out.extend_from_slice(c.as_bytes());
                out.extend_from_slice(blob);
            }
        }
        Ok(())
    }

    /// Decodes the frame at the start of `buf`; returns it and the bytes it
    /// took.
    pub fn decode(buf: &[u8]) -> Result<(MeshMsg<'_>, usize), MeshDecodeError> {
        let hl = size_of::<MeshHeader>();
        let Ok((h, rest)) = MeshHeader::read_from_prefix(buf) else {
            return Err(MeshDecodeError::Incomplete { need: hl });
        };
        if h.magic != MESH_MAGIC {
            return Err(MeshDecodeError::Magic(h.magic));
        }
        if h.version != MESH_VERSION {
            return Err(MeshDecodeError::Version(h.version));
        }
        if h.reserved != 0 {
            return Err(MeshDecodeError::Field("reserved"));
        }
        let len = h.len as usize;
        if len > MAX_MESH_FRAME - hl {
            return Err(MeshDecodeError::Field("len"));
        }
        let Some(body) = rest.get(..len) else {
            return Err(MeshDecodeError::Incomplete { need: hl + len });
        };
        let msg = match h.kind {
            k if k == MeshKind::Hello as u16 => {
                let hello = MeshHello::read_from_bytes(body).map_err(|_| MeshDecodeError::Field("len"))?;
                if hello.reserved != 0 {
                    return Err(MeshDecodeError::Field("hello.reserved"));
                }
                if hello.name.as_str().is_err() {
                    return Err(MeshDecodeError::Field("hello.name"));
                }
                MeshMsg::Hello(hello)
            }
            k if k == MeshKind::Conn as u16 => {
                let (c, blob) = MeshConn::read_from_prefix(body).map_err(|_| MeshDecodeError::Field("len"))?;
                if c.reserved != 0 {
                    return Err(MeshDecodeError::Field("conn.reserved"));
                }
                if c.blob_len as usize != blob.len() {
                    return Err(MeshDecodeError::Field("conn.blob_len"));
                }
                MeshMsg::Conn(c, blob)
            }
            k => return Err(MeshDecodeError::Kind(k)),
        };
        Ok((msg, hl + len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> MeshHello {
        MeshHello { node: 3, reserved: 0, pid: 77, layout_hash: crate::LAYOUT_HASH, name: Name::new("node-b").unwrap() }
    }

    #[test]
    fn frames_round_trip_and_stream() {
        let mut out = Vec::new();
        MeshMsg::Hello(hello()).encode(&mut out).unwrap();
        let blob = [7u8; 100];
        MeshMsg::Conn(MeshConn { tenant: 2, reserved: 0, blob_len: 0 }, &blob).encode(&mut out).unwrap();
        let (m, n) = MeshMsg::decode(&out).unwrap();
        assert_eq!(m, MeshMsg::Hello(hello()));
        assert_eq!(n, MeshMsg::Hello(hello()).encoded_len());
        let (m, k) = MeshMsg::decode(&out[n..]).unwrap();
        assert_eq!(m, MeshMsg::Conn(MeshConn { tenant: 2, reserved: 0, blob_len: 100 }, &blob));
        assert_eq!(n + k, out.len());
        // Every strict prefix is incomplete, never an error or a panic.
        for cut in 0..n {
            assert!(matches!(MeshMsg::decode(&out[..cut]), Err(MeshDecodeError::Incomplete { .. })));
        }
    }

    #[test]
    fn bad_frames_are_typed() {
        let mut out = Vec::new();
        MeshMsg::Hello(hello()).encode(&mut out).unwrap();
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert!(matches!(MeshMsg::decode(&bad), Err(MeshDecodeError::Magic(_))));
        let mut bad = out.clone();
        bad[6] = 9;
        assert_eq!(MeshMsg::decode(&bad), Err(MeshDecodeError::Kind(9)));
        let mut bad = out.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(MeshMsg::decode(&bad), Err(MeshDecodeError::Field("len")));
        let too_big = vec![0u8; MAX_MESH_BLOB + 1];
        let c = MeshConn { tenant: 0, reserved: 0, blob_len: 0 };
        assert!(MeshMsg::Conn(c, &too_big).encode(&mut Vec::new()).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = MeshMsg::decode(&bytes);
        }

        #[test]
        fn conn_frames_round_trip(tenant in any::<u16>(), blob in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            MeshMsg::Conn(MeshConn { tenant, reserved: 0, blob_len: 0 }, &blob).encode(&mut out).unwrap();
            let (m, n) = MeshMsg::decode(&out).unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(m, MeshMsg::Conn(MeshConn { tenant, reserved: 0, blob_len: blob.len() as u32 }, &blob[..]));
        }
    }
}
