//! What a garbage or hostile fabric peer can make a receiver see: a stream
//! of completions (immediate or none, length, landed header bytes or none)
//! on one connection. `fabric::check::check_recv` never panics, and what it
//! accepts is a well-formed chain.
#![no_main]

use fabric::check::{ChainState, HEADER_LEN, check_recv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut chain = ChainState::default();
    let mut next = 0u16;
    for rec in data.chunks(10 + HEADER_LEN) {
        if rec.len() < 10 {
            break;
        }
        let imm = (rec[0] & 1 == 1).then(|| u32::from_le_bytes([rec[1], rec[2], rec[3], rec[4]]));
        let len = u32::from_le_bytes([rec[5], rec[6], rec[7], rec[8]]);
        let mut hdr = [0u8; HEADER_LEN];
        let n = (rec.len() - 10).min(HEADER_LEN);
        hdr[..n].copy_from_slice(&rec[10..10 + n]);
        let header = (rec[9] & 1 == 1).then_some(&hdr);
        let before = chain;
        match check_recv(imm, len, header, &mut chain, 16) {
            Ok(f) => {
                assert_eq!(f.index, next, "fragments are numbered in order");
                assert!(f.index < 16);
                next = if f.last { 0 } else { f.index + 1 };
                assert_eq!(chain.is_open(), !f.last);
            }
            Err(_) => assert_eq!(chain, before, "a rejected message leaves the chain state alone"),
        }
    }
});
