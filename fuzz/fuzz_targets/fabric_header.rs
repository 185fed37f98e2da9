//! Bytes of one received fabric send: decoding never panics, and an
//! accepted header describes exactly the bytes received. The same bytes as
//! the header of a message that landed in memory its receiver could not
//! read (host-shimd's check for the DPU agent): never a panic, and an
//! accepted header agrees with what the agent saw.
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
    let frags = usize::from(imm[0]);
    let len = u32::from_le_bytes(*imm) >> 8;
    if let Ok(d) = FabricHeader::check_landed(msg, i.dst_fn(), frags, len) {
        assert_eq!((d.dst_fn, d.len), (i.dst_fn(), len));
        assert!(d.validate_fields().is_ok());
    }
});
