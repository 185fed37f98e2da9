//! A fingerprint of every layout in this crate.
//!
//! [`LAYOUT_HASH`] folds the size, alignment and field offsets of every shared
//! type, the magics and the versions into one number at compile time. Each
//! component sends it in its `Hello`; a peer built from other layouts (an old
//! agent image on the DPU, a host library of another release) is refused at
//! connect time instead of misreading memory. [`layout_table`] lists the same
//! facts for humans (`dpu-agent layout`), so an x86 host build and an aarch64
//! DPU build can be compared line by line.

use crate::ctrl::{self, CtrlHeader};
use crate::desc::Descriptor;
use crate::fabric::{self, FabricHeader};
use crate::http::{self, EnvelopeHeader};
use crate::mesh;
use crate::segment::{self, BufMeta, PoolHeader, RingCursor, RingHeader, RingSlot};
use core::mem::{align_of, offset_of, size_of};

/// One row of the layout table: a type (or constant) and its numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutRow {
    /// Type or constant name.
    pub name: &'static str,
    /// Size in bytes (or the constant's value).
    pub size: u64,
    /// Alignment in bytes (0 for constants).
    pub align: u64,
    /// Offsets of the fields that peers rely on.
    pub offsets: &'static [(&'static str, u64)],
}

macro_rules! ty {
    ($t:ty $(, $f:ident)*) => {
        LayoutRow {
            name: stringify!($t),
            size: size_of::<$t>() as u64,
            align: align_of::<$t>() as u64,
            offsets: &[$((stringify!($f), offset_of!($t, $f) as u64)),*],
        }
    };
}

macro_rules! konst {
    ($c:path) => {
        LayoutRow { name: stringify!($c), size: $c as u64, align: 0, offsets: &[] }
    };
}

const ROWS: &[LayoutRow] = &[
    ty!(Descriptor, tenant, flags, src_fn, dst_fn, route, hop, status, origin, reserved, request, buf, len),
    ty!(PoolHeader, magic, version, flags, tenant, buf_size, buf_count, headroom, max_chain, data_offset, total_len),
    ty!(BufMeta, owner, next_chain),
    ty!(RingHeader, magic, version, slot_size, capacity, tenant, owner_fn, owner_slot),
    ty!(RingCursor, pos, sleeping, closed),
    ty!(RingSlot, seq, desc),
    ty!(FabricHeader, magic, version, kind, frag_index, frag_count, frag_len, desc),
    ty!(CtrlHeader, magic, version, kind, len, seq),
    ty!(ctrl::Hello, role, node, pid, layout_hash, name),
    ty!(ctrl::Attach, tenant, function, instance, pid),
    ty!(
        ctrl::AttachOk,
        tenant,
        function,
        instance,
        slot,
        buf_size,
        buf_count,
        headroom,
        max_chain,
        ring_capacity,
        pool_len,
        ring_len
    ),
    ty!(ctrl::RegisterFunction, tenant, function, instance, slot, node, ring_capacity),
    ty!(ctrl::FunctionExit, tenant, function, instance, slot, reclaimed),
    ty!(ctrl::PoolExport, tenant, flags, buf_size, buf_count, headroom, max_chain, pool_len, blob_len),
    ty!(ctrl::LendRecv, tenant, count),
    ty!(ctrl::Credits, tenant, peer_node, granted),
    ty!(ctrl::CtrlError, code, about_kind, about_seq, tenant, function),
    ty!(ctrl::Ack, about_kind, about_seq),
    ty!(ctrl::Lookup, function),
    ty!(ctrl::Peer, function, instance, slot, node, ring_capacity),
    ty!(ctrl::MessageHdr, desc, flags, count),
    ty!(mesh::MeshHeader, magic, version, kind, len),
    ty!(mesh::MeshHello, node, pid, layout_hash, name),
    ty!(mesh::MeshConn, tenant, blob_len),
    ty!(EnvelopeHeader, magic, version, kind, code, header_count, path_len, headers_len, pad_len, body_len),
    konst!(segment::POOL_MAGIC),
    konst!(segment::RING_MAGIC),
    konst!(segment::SEGMENT_VERSION),
    konst!(segment::POOL_META_OFFSET),
    konst!(segment::POOL_DATA_ALIGN),
    konst!(segment::RING_PRODUCER_OFFSET),
    konst!(segment::RING_CONSUMER_OFFSET),
    konst!(segment::RING_SLOTS_OFFSET),
    konst!(fabric::FABRIC_MAGIC),
    konst!(fabric::FABRIC_VERSION),
    konst!(fabric::HEADROOM),
    konst!(ctrl::CTRL_MAGIC),
    konst!(mesh::MESH_MAGIC),
    konst!(mesh::MESH_VERSION),
    konst!(ctrl::CTRL_VERSION),
    konst!(ctrl::MAX_EXPORT_BLOB),
    konst!(ctrl::MAX_LEND),
    konst!(ctrl::COMCH_MSG_MAX),
    konst!(ctrl::MAX_MESSAGE_CHAIN),
    konst!(http::ENVELOPE_MAGIC),
    konst!(http::ENVELOPE_VERSION),
    konst!(http::REPLY_HEAD_ROOM),
];

/// Every layout fact that peers rely on, in a fixed order.
pub fn layout_table() -> &'static [LayoutRow] {
    ROWS
}

const fn fnv(mut h: u64, v: u64) -> u64 {
    let bytes = v.to_le_bytes();
    let mut i = 0;
    while i < 8 {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
        i += 1;
    }
    h
}

const fn fnv_str(mut h: u64, s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
        i += 1;
    }
    h
}

const fn hash_rows(rows: &[LayoutRow]) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325;
    let mut r = 0;
    while r < rows.len() {
        let row = &rows[r];
        h = fnv_str(h, row.name);
        h = fnv(h, row.size);
        h = fnv(h, row.align);
        let mut f = 0;
        while f < row.offsets.len() {
            h = fnv_str(h, row.offsets[f].0);
            h = fnv(h, row.offsets[f].1);
            f += 1;
        }
        r += 1;
    }
    h
}

/// Fingerprint of every layout in this crate (see the module docs).
pub const LAYOUT_HASH: u64 = hash_rows(ROWS);

/// Writes the layout table as text, one row per line, ending with the hash.
pub fn write_layout_table(out: &mut impl core::fmt::Write) -> core::fmt::Result {
    for row in ROWS {
        if row.align == 0 {
            writeln!(out, "{:<24} value={:#x}", row.name, row.size)?;
        } else {
            write!(out, "{:<24} size={:<3} align={}", row.name, row.size, row.align)?;
            for (f, off) in row.offsets {
                write!(out, " {f}@{off}")?;
            }
            writeln!(out)?;
        }
    }
    writeln!(out, "layout_hash={LAYOUT_HASH:#018x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_every_row_once_and_ends_with_the_hash() {
        let mut s = String::new();
        write_layout_table(&mut s).unwrap();
        assert_eq!(s.lines().count(), ROWS.len() + 1);
        assert!(s.ends_with(&format!("layout_hash={LAYOUT_HASH:#018x}\n")));
        let mut names: Vec<_> = ROWS.iter().map(|r| r.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ROWS.len());
    }

    #[test]
    fn hash_depends_on_every_number() {
        let base = hash_rows(ROWS);
        let mut changed = ROWS.to_vec();
        changed[0].size += 1;
        assert_ne!(hash_rows(&changed), base);
        let mut changed = ROWS.to_vec();
        changed.swap(0, 1);
        assert_ne!(hash_rows(&changed), base);
    }
}
