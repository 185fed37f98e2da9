//! Descriptors from a misbehaving peer, checked against an arbitrary pool:
//! validation never panics, and what it accepts stays inside the pool.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::{Descriptor, PoolGeometry};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Ok((d, rest)) = Descriptor::read_from_prefix(data) else { return };
    let word = |i: usize| rest.get(i * 4..i * 4 + 4).map_or(1, |b| u32::from_le_bytes(b.try_into().unwrap()));
    let Ok(pool) = PoolGeometry::new(d.tenant, word(0), word(1), 64, word(2)) else { return };
    if let Ok(n) = d.validate(&pool) {
        assert!(d.buf < pool.buf_count());
        assert!(n >= 1 && n <= pool.max_chain());
        assert!(u64::from(n) * u64::from(pool.payload_cap()) >= u64::from(d.len));
    }
    let _ = d.error_code();
});
