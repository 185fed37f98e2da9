//! [`DocaError`]: DOCA's `doca_error_t` as an integer newtype.
//!
//! The numeric values are DOCA's own, so a code reported by the SDK backend
//! and a code produced by the emulated backend mean the same thing, and a
//! code this crate does not name (a later SDK) is still carried faithfully.
//!
//! Values: `enum doca_error` in DOCA's `doca_error.h`, as published in the
//! DOCA API reference (doxygen `doca__error_8h.html`, mirrored in the public
//! repository `stolyarchuk/doca-docs`) and in the Apache-2.0 DOCA mock header
//! of NVIDIA's NIXL test suite (`test/unit/plugins/.../doca_error.h`); found
//! with the project's code search. The names below are ours, the numbers are
//! DOCA's ABI.

use core::fmt;

/// A DOCA status code other than success: a small `Copy` value, cheap to
/// return and count on the data path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{} ({})", self.name(), self.description())]
pub struct DocaError(i32);

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $val:literal, $descr:literal;)*) => {
        impl DocaError {
            $($(#[$doc])* pub const $name: DocaError = DocaError($val);)*

            /// DOCA's name for the code (`"DOCA_ERROR_AGAIN"`), or
            /// `"DOCA_ERROR_<unnamed>"` for a code this crate does not know.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($val => concat!("DOCA_ERROR_", stringify!($name)),)*
                    _ => "DOCA_ERROR_<unnamed>",
                }
            }

            /// A short description of the code.
            pub fn description(self) -> &'static str {
                match self.0 {
                    $($val => $descr,)*
                    _ => "unknown DOCA status code",
                }
            }
        }
    };
}

codes! {
    /// Unknown error.
    UNKNOWN = 1, "unknown error";
    /// Operation not permitted (access rights, device not added to the mmap).
    NOT_PERMITTED = 2, "operation not permitted";
    /// Resource already in use.
    IN_USE = 3, "resource in use";
    /// Operation not supported.
    NOT_SUPPORTED = 4, "operation not supported";
    /// Resource temporarily unavailable: try again.
    AGAIN = 5, "resource temporarily unavailable, try again";
    /// Invalid argument.
    INVALID_VALUE = 6, "invalid value";
    /// Allocation failed; also a fixed task pool or buffer inventory that is
    /// exhausted.
    NO_MEMORY = 7, "no memory (pool exhausted)";
    /// Initialization failed.
    INITIALIZATION = 8, "initialization failure";
    /// Timed out.
    TIME_OUT = 9, "timed out";
    /// Shut down in progress or completed (tasks flushed by a stop).
    SHUTDOWN = 10, "shut down";
    /// Connection reset by the peer.
    CONNECTION_RESET = 11, "connection reset by peer";
    /// Connection aborted.
    CONNECTION_ABORTED = 12, "connection aborted";
    /// Connection in progress.
    CONNECTION_INPROGRESS = 13, "connection in progress";
    /// Not connected.
    NOT_CONNECTED = 14, "not connected";
    /// A required lock could not be taken.
    NO_LOCK = 15, "unable to acquire lock";
    /// Not found.
    NOT_FOUND = 16, "not found";
    /// Input/output failed.
    IO_FAILED = 17, "input/output failed";
    /// The object is in the wrong state for the call.
    BAD_STATE = 18, "bad state";
    /// Unsupported version.
    UNSUPPORTED_VERSION = 19, "unsupported version";
    /// An operating system call failed.
    OPERATING_SYSTEM = 20, "operating system call failed";
    /// The driver failed.
    DRIVER = 21, "driver failure";
    /// Unexpected situation.
    UNEXPECTED = 22, "unexpected";
    /// Already exists.
    ALREADY_EXIST = 23, "already exists";
    /// Full.
    FULL = 24, "full";
    /// Empty.
    EMPTY = 25, "empty";
    /// In progress (asynchronous start/stop has begun).
    IN_PROGRESS = 26, "in progress";
    /// Too big (message above the capped size, send above the posted
    /// receive buffer).
    TOO_BIG = 27, "too big";
    /// Authentication failed.
    AUTHENTICATION = 28, "authentication failure";
    /// Bad configuration.
    BAD_CONFIG = 29, "bad configuration";
    /// Skipped.
    SKIPPED = 30, "skipped";
    /// The device hit a fatal error.
    DEVICE_FATAL_ERROR = 31, "device fatal error";
}

impl DocaError {
    /// The raw `doca_error_t` value. `DOCA_SUCCESS` (0) is never a
    /// `DocaError`: see [`DocaError::from_code`].
    pub const fn code(self) -> i32 {
        self.0
    }

    /// `Ok(())` for `DOCA_SUCCESS` (0), the error otherwise; a code this
    /// crate does not name is kept as is.
    pub const fn from_code(code: i32) -> Result<(), DocaError> {
        if code == 0 { Ok(()) } else { Err(DocaError(code)) }
    }

    /// The error for a code that is known not to be success (wire values
    /// decoded by the emulated backend); 0 becomes [`DocaError::UNKNOWN`].
    pub const fn from_nonzero(code: i32) -> DocaError {
        if code == 0 { DocaError::UNKNOWN } else { DocaError(code) }
    }
}

impl fmt::Debug for DocaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocaError({} = {})", self.name(), self.0)
    }
}

/// An operating system error seen by the emulated backend, logged and
/// mapped to DOCA's code for it.
#[cfg_attr(feature = "sdk", allow(dead_code))]
pub(crate) fn os(call: &'static str, err: impl fmt::Display) -> DocaError {
    log::warn!("{call} failed: {err}");
    DocaError::OPERATING_SYSTEM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_doca_abi_values() {
        assert_eq!(DocaError::AGAIN.code(), 5);
        assert_eq!(DocaError::NOT_CONNECTED.code(), 14);
        assert_eq!(DocaError::BAD_STATE.code(), 18);
        assert_eq!(DocaError::TOO_BIG.code(), 27);
        assert_eq!(DocaError::from_code(0), Ok(()));
        assert_eq!(DocaError::from_code(7), Err(DocaError::NO_MEMORY));
        assert_eq!(DocaError::NO_MEMORY.name(), "DOCA_ERROR_NO_MEMORY");
        let later = DocaError::from_nonzero(99);
        assert_eq!(later.code(), 99);
        assert_eq!(later.name(), "DOCA_ERROR_<unnamed>");
        assert_eq!(DocaError::from_nonzero(0), DocaError::UNKNOWN);
        assert!(DocaError::TOO_BIG.to_string().contains("too big"));
    }
}
