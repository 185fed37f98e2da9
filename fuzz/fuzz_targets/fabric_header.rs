//! Bytes of one received fabric send: decoding never panics, and an
//! accepted header describes exactly the bytes received.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::{FabricHeader, Immediate};

fuzz_target!(|data: &[u8]| {
    let Some((imm, msg)) = data.split_first_chunk::<4>() else { return };
    if let Ok((h, payload)) = FabricHeader::decode(msg) {
        assert_eq!(h.frag_len as usize, payload.len());
        assert!(h.frag_index < h.frag_count);
        let _ = h.check_immediate(u32::from_le_bytes(*imm));
    }
    let i = Immediate(u32::from_le_bytes(*imm));
    let _ = (i.kind(), i.dst_fn(), i.is_first(), i.is_last());
});
