//! Bytes from a garbage or hostile peer of the emulated DOCA backend: RDMA
//! frame headers, RDMA connection blobs, mmap export blobs, comch packets
//! and comch fast-path packets. Decoding never panics, and whatever it
//! accepts encodes back to the same bytes.
#![no_main]

use doca::emu_wire::{
    COMCH_CTRL_LEN, ComchPacket, ConnBlob, FAST_PATH_CTRL_LEN, FRAME_LEN, FastPathCredit, FastPathPacket, Frame,
    MmapBlob,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(&f.encode()[..], &data[..FRAME_LEN]);
        assert_eq!(Frame::decode(&f.encode()), Ok(f));
    }
    if let Ok(b) = ConnBlob::decode(data) {
        assert_eq!(&b.encode()[..], data);
    }
    if let Ok(b) = MmapBlob::decode(data) {
        assert_eq!(&b.encode()[..], data);
    }
    match ComchPacket::decode(data) {
        Ok(ComchPacket::Msg(m)) => assert_eq!(m, &data[1..]),
        Ok(p) => {
            let mut out = [0u8; COMCH_CTRL_LEN];
            let n = p.encode_ctrl(&mut out).expect("a control packet encodes");
            assert_eq!(&out[..n], data);
        }
        Err(_) => {}
    }
    match FastPathPacket::decode(data) {
        Ok(FastPathPacket::Data { producer, imm, payload }) => {
            let mut out = vec![0u8; data.len()];
            let at = FastPathPacket::encode_head(producer, imm, &mut out).expect("the head fits");
            out[at..].copy_from_slice(payload);
            assert_eq!(out, data);
        }
        Ok(p) => {
            let mut out = [0u8; FAST_PATH_CTRL_LEN];
            let n = p.encode_ctrl(&mut out).expect("a control packet encodes");
            assert_eq!(&out[..n], data);
        }
        Err(_) => {}
    }
    if let Ok(c) = FastPathCredit::decode(data) {
        let mut out = [0u8; FAST_PATH_CTRL_LEN];
        let n = c.encode(&mut out);
        assert_eq!(&out[..n], data);
    }
});
