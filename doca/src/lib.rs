//! `doca`: the safe Rust API over the DOCA objects DNE uses (devices, mmap
//! export and import, buffers, the progress engine, comch, RDMA contexts and
//! tasks), with two backends behind one API:
//!
//! * `sdk` (feature `sdk`): over `doca-sys`, for BlueField and ConnectX
//!   machines with the DOCA SDK installed;
//! * `emu` (the default): a software implementation that keeps DOCA's rules
//!   (asynchronous start/stop through the progress engine, fixed task pools,
//!   imported memory that the importer cannot dereference, strict teardown
//!   order), so everything above it runs and is tested on any Linux machine.
//!
//! Contract so far: [`BACKEND`] names the backend this build uses. The object
//! API is being built in its own issue (doca-sys and doca).
#![forbid(unsafe_code)]

/// The DOCA backend compiled into this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The installed NVIDIA DOCA SDK.
    Sdk,
    /// The software emulation.
    Emu,
}

impl Backend {
    /// Lowercase name, as shown in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sdk => "sdk",
            Backend::Emu => "emu",
        }
    }
}

/// The backend of this build: `sdk` with the `sdk` feature, `emu` otherwise.
pub const BACKEND: Backend = if cfg!(feature = "sdk") { Backend::Sdk } else { Backend::Emu };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_follows_the_feature() {
        assert_eq!(BACKEND.as_str(), if cfg!(feature = "sdk") { "sdk" } else { "emu" });
    }
}
