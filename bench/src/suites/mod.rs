//! The registered suites. Each later component adds its own here.

use crate::harness::Suite;

pub mod alloc;
pub mod engine;
pub mod fabric;
pub mod fairness;
pub mod httpload;
pub mod ingress;
pub mod intranode;
pub mod noise;
pub mod soak;
pub mod wire_codec;

/// Every suite, in the order `list` shows them.
pub const SUITES: &[Suite] = &[
    wire_codec::SUITE,
    intranode::SUITE,
    alloc::SUITE,
    fabric::SUITE,
    engine::SUITE,
    fairness::SUITE,
    ingress::SUITE,
    soak::SUITE,
    noise::SUITE,
];

/// Looks a suite up by name.
pub fn find(name: &str) -> Option<&'static Suite> {
    SUITES.iter().find(|s| s.name == name)
}
