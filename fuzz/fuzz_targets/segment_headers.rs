//! Pool and ring segment headers as a peer (or a corruption) left them:
//! checking never panics, and an accepted layout fits the mapping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::segment::{Owner, PoolHeader, RingHeader};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<8>() else { return };
    let mapped = u64::from_le_bytes(*len);
    if let Ok((h, rest)) = PoolHeader::read_from_prefix(rest) {
        if let Ok(l) = h.check(mapped) {
            let last = l.buf_offset(l.geometry.buf_count() - 1).unwrap();
            assert!(last + u64::from(l.geometry.buf_size()) <= l.total_len && l.total_len <= mapped);
        }
        if let Ok((r, rest)) = RingHeader::read_from_prefix(rest) {
            if let Ok(l) = r.check(mapped) {
                assert!(l.slot_offset(u64::MAX) + 32 <= l.total_len && l.total_len <= mapped);
            }
            if let Some(owner) = rest.first_chunk::<4>() {
                let _ = Owner::from_raw(u32::from_le_bytes(*owner));
            }
        }
    }
});
