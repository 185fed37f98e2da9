//! `dne-bench`: the benchmark harness of DNE.
//!
//! One binary, `cargo run --release -p dne-bench -- SUITE [--quick]`. Every
//! suite runs the systems it compares side by side in the same run, prints
//! one or more tables, and ends with one line
//! `RESULT key=value key=value ...` that scripts can parse. `--quick`
//! finishes in under a minute (smaller iteration counts, same comparisons).
//! Benchmarks report; they never assert.
//!
//! Modules:
//! * [`harness`]: tables, the RESULT line, timing helpers;
//! * [`alloc_count`]: the binary's allocator, counting per thread;
//! * [`stalls`]: how noisy the machine is (CPU stalls of a shared VM);
//! * [`suites`]: the registered suites.
// No unsafe, except items that opt in with a `// SAFETY:` comment: two in
// `suites::intranode` (taking an inherited descriptor, sending an iceoryx2
// sample whose payload was written earlier) and the counting allocator.
#![deny(unsafe_code)]

pub mod alloc_count;
pub mod harness;
pub mod stalls;
pub mod suites;
