//! The connection blob of the `verbs` backend: what one end of an RC queue
//! pair tells the other out of band (through the control plane) so the two
//! can be connected: queue pair number, packet sequence number, LID, GID,
//! path MTU, and where the peer may aim its liveness probes.
//!
//! It is built without `sideway` (no feature needed), so the fuzz target
//! `fuzz/fuzz_targets/verbs_blob.rs` and the unit tests run anywhere. The
//! bytes come from another node: decoding checks every field and returns a
//! [`VerbsBlobError`], never panics, and only accepts the one encoding of
//! each blob (reserved fields zero), so an accepted blob re-encodes to the
//! same bytes.
//!
//! Layout (52 bytes, little endian): magic `"DNEV"`, version, path MTU
//! code (ibverbs `enum ibv_mtu`, 1..=5), a reserved byte, QP number
//! (24 bits), PSN (24 bits), LID, reserved u16, GID (16 bytes, network
//! order as ibverbs keeps it), probe region rkey, reserved u32, probe
//! region address.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `"DNEV"` read as a little-endian u32.
pub const BLOB_MAGIC: u32 = u32::from_le_bytes(*b"DNEV");
/// Version of the layout.
pub const BLOB_VERSION: u16 = 1;
/// Bytes of an encoded blob.
pub const BLOB_LEN: usize = 52;

/// Largest queue pair number and packet sequence number (24 bits).
const MAX_24: u32 = (1 << 24) - 1;

#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawBlob {
    magic: U32,
    version: U16,
    mtu: u8,
    reserved: u8,
    qpn: U32,
    psn: U32,
    lid: U16,
    reserved2: U16,
    gid: [u8; 16],
    probe_rkey: U32,
    reserved3: U32,
    probe_addr: U64,
}

const _: () = assert!(size_of::<RawBlob>() == BLOB_LEN);

/// Path MTU of an RC connection (the values of ibverbs' `enum ibv_mtu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PathMtu {
    /// 256 bytes.
    Mtu256 = 1,
    /// 512 bytes.
    Mtu512 = 2,
    /// 1024 bytes.
    Mtu1024 = 3,
    /// 2048 bytes.
    Mtu2048 = 4,
    /// 4096 bytes.
    Mtu4096 = 5,
}

impl PathMtu {
    /// The MTU of an `ibv_mtu` code, if it is one.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::Mtu256,
            2 => Self::Mtu512,
            3 => Self::Mtu1024,
            4 => Self::Mtu2048,
            5 => Self::Mtu4096,
            _ => return None,
        })
    }

    /// The `ibv_mtu` code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Bytes.
    pub fn bytes(self) -> u32 {
        128 << self.code()
    }
}

/// One end of an RC connection, as its peer needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VerbsBlob {
    /// Queue pair number (24 bits, at least 2: 0 and 1 are management QPs).
    pub qpn: u32,
    /// First packet sequence number this end sends (24 bits).
    pub psn: u32,
    /// LID of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// GID of the port (RoCE, or InfiniBand across subnets); all zero when
    /// the LID alone addresses the port.
    pub gid: [u8; 16],
    /// The largest path MTU this end's port supports now.
    pub mtu: PathMtu,
    /// Remote key of the small region liveness probes write to (zero
    /// bytes; the region holds nothing of the user's).
    pub probe_rkey: u32,
    /// Address of that region.
    pub probe_addr: u64,
}

/// A blob that is not valid. Small and `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerbsBlobError {
    /// Not [`BLOB_LEN`] bytes.
    #[error("verbs blob of {0} bytes (expected {BLOB_LEN})")]
    Length(usize),
    /// Wrong magic (not a verbs blob: maybe another backend's).
    #[error("bad verbs blob magic {0:#010x}")]
    Magic(u32),
    /// Another version of the layout.
    #[error("unsupported verbs blob version {0}")]
    Version(u16),
    /// Not an `ibv_mtu` code.
    #[error("bad path MTU code {0}")]
    Mtu(u8),
    /// Queue pair number out of range.
    #[error("bad queue pair number {0:#x}")]
    QpNum(u32),
    /// Packet sequence number wider than 24 bits.
    #[error("bad packet sequence number {0:#x}")]
    Psn(u32),
    /// Neither a LID nor a GID: the port cannot be addressed.
    #[error("blob names no address (LID and GID both zero)")]
    NoAddress,
    /// A reserved field is not zero.
    #[error("reserved field {0} is not zero")]
    Reserved(&'static str),
}

impl VerbsBlob {
    /// Encodes the blob.
    pub fn encode(&self) -> [u8; BLOB_LEN] {
        let raw = RawBlob {
            magic: BLOB_MAGIC.into(),
            version: BLOB_VERSION.into(),
            mtu: self.mtu.code(),
            reserved: 0,
            qpn: self.qpn.into(),
            psn: self.psn.into(),
            lid: self.lid.into(),
            reserved2: U16::ZERO,
            gid: self.gid,
            probe_rkey: self.probe_rkey.into(),
            reserved3: U32::ZERO,
            probe_addr: self.probe_addr.into(),
        };
        let mut out = [0u8; BLOB_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes and checks a blob received from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, VerbsBlobError> {
        if bytes.len() != BLOB_LEN {
            return Err(VerbsBlobError::Length(bytes.len()));
        }
        let raw = RawBlob::read_from_bytes(bytes).map_err(|_| VerbsBlobError::Length(bytes.len()))?;
        if raw.magic.get() != BLOB_MAGIC {
            return Err(VerbsBlobError::Magic(raw.magic.get()));
        }
        if raw.version.get() != BLOB_VERSION {
            return Err(VerbsBlobError::Version(raw.version.get()));
        }
        let mtu = PathMtu::from_code(u32::from(raw.mtu)).ok_or(VerbsBlobError::Mtu(raw.mtu))?;
        if raw.reserved != 0 {
            return Err(VerbsBlobError::Reserved("reserved"));
        }
        if raw.reserved2.get() != 0 {
            return Err(VerbsBlobError::Reserved("reserved2"));
        }
        if raw.reserved3.get() != 0 {
            return Err(VerbsBlobError::Reserved("reserved3"));
        }
        let qpn = raw.qpn.get();
        if !(2..=MAX_24).contains(&qpn) {
            return Err(VerbsBlobError::QpNum(qpn));
        }
        let psn = raw.psn.get();
        if psn > MAX_24 {
            return Err(VerbsBlobError::Psn(psn));
        }
        let lid = raw.lid.get();
        if lid == 0 && raw.gid == [0; 16] {
            return Err(VerbsBlobError::NoAddress);
        }
        Ok(Self {
            qpn,
            psn,
            lid,
            gid: raw.gid,
            mtu,
            probe_rkey: raw.probe_rkey.get(),
            probe_addr: raw.probe_addr.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VerbsBlob {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[192, 168, 7, 2]);
        VerbsBlob {
            qpn: 0x11,
            psn: 0xab_cdef,
            lid: 0,
            gid,
            mtu: PathMtu::Mtu1024,
            probe_rkey: 0x1234,
            probe_addr: 0x7f00_1000,
        }
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let bytes = b.encode();
        assert_eq!(&bytes[..4], b"DNEV");
        assert_eq!(VerbsBlob::decode(&bytes), Ok(b));
        let ib = VerbsBlob { lid: 7, gid: [0; 16], mtu: PathMtu::Mtu4096, ..b };
        assert_eq!(VerbsBlob::decode(&ib.encode()), Ok(ib));
        assert_eq!(PathMtu::Mtu4096.bytes(), 4096);
        assert_eq!(PathMtu::Mtu256.bytes(), 256);
    }

    #[test]
    fn every_bad_field_is_named() {
        let good = sample().encode();
        assert_eq!(VerbsBlob::decode(&good[..51]), Err(VerbsBlobError::Length(51)));
        assert_eq!(VerbsBlob::decode(&[good.as_slice(), &[0]].concat()), Err(VerbsBlobError::Length(53)));
        assert_eq!(VerbsBlob::decode(&[]), Err(VerbsBlobError::Length(0)));
        let with = |at: usize, v: &[u8]| {
            let mut b = good;
            b[at..at + v.len()].copy_from_slice(v);
            VerbsBlob::decode(&b)
        };
        assert!(matches!(with(0, b"DNER"), Err(VerbsBlobError::Magic(_))));
        assert_eq!(with(4, &[2, 0]), Err(VerbsBlobError::Version(2)));
        assert_eq!(with(6, &[0]), Err(VerbsBlobError::Mtu(0)));
        assert_eq!(with(6, &[6]), Err(VerbsBlobError::Mtu(6)));
        assert_eq!(with(7, &[1]), Err(VerbsBlobError::Reserved("reserved")));
        assert_eq!(with(8, &[1, 0, 0, 0]), Err(VerbsBlobError::QpNum(1)));
        assert_eq!(with(8, &[0, 0, 0, 1]), Err(VerbsBlobError::QpNum(1 << 24)));
        assert_eq!(with(12, &[0, 0, 0, 1]), Err(VerbsBlobError::Psn(1 << 24)));
        assert_eq!(with(18, &[0, 1]), Err(VerbsBlobError::Reserved("reserved2")));
        assert_eq!(with(20, &[0; 16]), Err(VerbsBlobError::NoAddress));
        assert_eq!(with(40, &[9, 0, 0, 0]), Err(VerbsBlobError::Reserved("reserved3")));
    }

    /// Any single corrupted byte gives either a typed error or a blob that
    /// re-encodes to exactly the bytes given (one encoding per blob).
    #[test]
    fn corruption_never_panics_and_encoding_is_canonical() {
        let good = sample().encode();
        for i in 0..BLOB_LEN {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = good;
                b[i] = v;
                if let Ok(blob) = VerbsBlob::decode(&b) {
                    assert_eq!(blob.encode(), b, "byte {i} = {v:#x}");
                }
            }
        }
    }
}
