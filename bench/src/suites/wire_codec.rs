//! `wire`: what checking untrusted bytes costs on the hot path, next to
//! merely copying the same bytes (the floor: any receiver must at least read
//! them once).

use crate::harness::{Opts, Report, Suite, Table, fmt_num, interleaved};
use std::hint::black_box;
use wire::ctrl::{BufList, CtrlMsg, LendRecv};
use wire::{CtrlFrame, Descriptor, FabricHeader, MsgKind, PoolGeometry};
use zerocopy::{FromBytes, IntoBytes};

/// The suite.
pub const SUITE: Suite = Suite {
    name: "wire",
    about: "decode+validate cost of descriptors, fabric headers, control frames vs a plain copy",
    run,
};

fn run(opts: &Opts) -> anyhow::Result<Report> {
    let (rounds, iters) = if opts.quick { (7, 200_000) } else { (21, 2_000_000) };
    let geom = PoolGeometry::new(1, 16384, 65536, 64, 64)?;
    let desc = Descriptor { tenant: 1, dst_fn: 3, buf: 1234, len: 40_000, ..Default::default() };
    let desc_bytes = desc.as_bytes().to_vec();
    let mut fabric_msg = FabricHeader::new(MsgKind::Data, desc, 0, 3, 64).as_bytes().to_vec();
    fabric_msg.extend_from_slice(&[0x5A; 64]);
    let bufs: Vec<u32> = (0..64).collect();
    let lend = CtrlFrame {
        seq: 1,
        msg: CtrlMsg::LendRecv(LendRecv { tenant: 1, reserved: 0, count: 64 }, BufList::from_indices(&bufs)),
    };
    let mut ctrl_bytes = vec![0u8; lend.encoded_len()];
    lend.encode(&mut ctrl_bytes)?;

    let mut copy = || {
        let mut out = [0u8; 28];
        out.copy_from_slice(black_box(&desc_bytes[..]));
        black_box(out);
    };
    let mut validate = || {
        let d = Descriptor::read_from_bytes(black_box(&desc_bytes[..])).expect("28 bytes");
        black_box(d.validate(black_box(&geom)).expect("valid"));
    };
    let mut fabric = || {
        black_box(FabricHeader::decode(black_box(&fabric_msg[..])).expect("valid"));
    };
    let mut ctrl = || {
        let (f, _) = CtrlFrame::decode(black_box(&ctrl_bytes[..])).expect("valid");
        if let CtrlMsg::LendRecv(_, list) = f.msg {
            black_box(list.iter().fold(0u32, |a, b| a ^ b));
        }
    };
    let names =
        ["copy 28 B (floor)", "descriptor read+validate", "fabric header decode", "ctrl LendRecv(64) decode+walk"];
    let stats = interleaved(
        rounds,
        iters,
        &mut [(names[0], &mut copy), (names[1], &mut validate), (names[2], &mut fabric), (names[3], &mut ctrl)],
    );
    let floor = stats[0].median;
    let mut t = Table::new(
        format!("wire codec, ns per message, median of {rounds} rounds x {iters}"),
        &["operation", "min", "median", "max", "x floor"],
    );
    for (name, s) in names.iter().zip(&stats) {
        t.row(vec![(*name).into(), fmt_num(s.min), fmt_num(s.median), fmt_num(s.max), fmt_num(s.median / floor)]);
    }
    let mut r = Report { tables: vec![t], ..Default::default() };
    r.put("copy_ns", floor);
    r.put("desc_validate_ns", stats[1].median);
    r.put("fabric_decode_ns", stats[2].median);
    r.put("ctrl_lend64_ns", stats[3].median);
    r.put("desc_validate_x_copy", stats[1].median / floor);
    Ok(r)
}
