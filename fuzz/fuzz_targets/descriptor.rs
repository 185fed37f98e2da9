//! Descriptors from a misbehaving peer, checked against an arbitrary pool:
//! validation never panics, and what it accepts stays inside the pool.
//!
//! Input: a descriptor, then the pool's buf_size, buf_count and max_chain
//! (u32 each, a missing one is 1), tenant (u16, the descriptor's when
//! missing) and headroom (u32, 64 when missing; taken modulo buf_size,
//! which keeps it within what a geometry allows). The tenant comes right
//! after the words every valid pool needs, so a short input reaches the
//! tenant check with either tenant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::{Descriptor, DescriptorError, PoolGeometry};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Ok((d, rest)) = Descriptor::read_from_prefix(data) else { return };
    let word = |i: usize| rest.get(i * 4..i * 4 + 4).map_or(1, |b| u32::from_le_bytes(b.try_into().unwrap()));
    let (buf_size, buf_count, max_chain) = (word(0), word(1), word(2));
    let tenant = rest.get(12..14).map_or(d.tenant, |b| u16::from_le_bytes(b.try_into().unwrap()));
    let headroom = rest.get(14..18).map_or(64, |b| u32::from_le_bytes(b.try_into().unwrap()));
    let headroom = headroom.checked_rem(buf_size).unwrap_or(0);
    let Ok(pool) = PoolGeometry::new(tenant, buf_size, buf_count, headroom, max_chain) else { return };
    match d.validate(&pool) {
        Ok(n) => {
            assert_eq!(d.tenant, pool.tenant());
            assert!(d.buf < pool.buf_count());
            assert!(n >= 1 && n <= pool.max_chain());
            assert!(u64::from(n) * u64::from(pool.payload_cap()) >= u64::from(d.len));
        }
        Err(DescriptorError::TenantMismatch { got, want }) => {
            assert_eq!((got, want), (d.tenant, pool.tenant()));
            assert_ne!(got, want);
        }
        Err(_) => {}
    }
    let _ = d.error_code();
});
