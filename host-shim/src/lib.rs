//! `host-shim`: the thin host side of DNE.
//!
//! * The library functions link (Rust API here, C ABI alongside): attach to a
//!   tenant pool, allocate a buffer, write the payload in place, send a
//!   [`wire::Descriptor`] to a named function, receive, free. Intra-node hops
//!   go function to function through shared-memory rings (`shm`).
//! * `host-shimd`, the per-host daemon: creates the tenant pools, exports them
//!   to the DPU, keeps the function registry, hands pool and ring descriptors
//!   to functions, and reclaims the buffers of a function that dies.
//!
//! Both are being built in their own issue (intra-node data path).
#![forbid(unsafe_code)]
