//! Fixed-size names (tenants, functions, components) inside control frames.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Longest name, in bytes.
pub const NAME_MAX: usize = 32;

/// A name of 1 to 32 bytes from `[A-Za-z0-9._-]`, NUL-padded.
///
/// Any 32 bytes can be read as a `Name` (it is `FromBytes`); [`Name::as_str`]
/// validates before anyone looks at the characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Name([u8; NAME_MAX]);
const _: () = assert!(size_of::<Name>() == 32);

/// A name that cannot be carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Names have 1 to 32 bytes.
    #[error("name must have 1 to {NAME_MAX} bytes, has {0}")]
    Length(usize),
    /// Only `[A-Za-z0-9._-]` is allowed.
    #[error("name has a byte {byte:#04x} outside [A-Za-z0-9._-] at offset {at}")]
    Char {
        /// The offending byte.
        byte: u8,
        /// Its offset.
        at: usize,
    },
    /// Bytes after the terminating NUL must all be NUL.
    #[error("name has bytes after its terminating NUL")]
    Trailing,
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

impl Name {
    /// Builds a name, checking length and characters.
    pub fn new(s: &str) -> Result<Self, NameError> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > NAME_MAX {
            return Err(NameError::Length(b.len()));
        }
        if let Some(at) = b.iter().position(|&c| !allowed(c)) {
            return Err(NameError::Char { byte: b[at], at });
        }
        let mut out = [0u8; NAME_MAX];
        out[..b.len()].copy_from_slice(b);
        Ok(Self(out))
    }

    /// The name as text, after checking that the bytes form a valid name.
    pub fn as_str(&self) -> Result<&str, NameError> {
        let len = self.0.iter().position(|&c| c == 0).unwrap_or(NAME_MAX);
        if len == 0 {
            return Err(NameError::Length(0));
        }
        if self.0[len..].iter().any(|&c| c != 0) {
            return Err(NameError::Trailing);
        }
        let b = &self.0[..len];
        if let Some(at) = b.iter().position(|&c| !allowed(c)) {
            return Err(NameError::Char { byte: b[at], at });
        }
        // Every byte is ASCII, checked just above.
        core::str::from_utf8(b).map_err(|e| NameError::Char { byte: b[e.valid_up_to()], at: e.valid_up_to() })
    }
}

impl core::fmt::Debug for Name {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.as_str() {
            Ok(s) => write!(f, "Name({s:?})"),
            Err(e) => write!(f, "Name(<invalid: {e}>)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_and_bad_names() {
        assert_eq!(Name::new("tenant-a.fn_1").unwrap().as_str(), Ok("tenant-a.fn_1"));
        assert_eq!(Name::new(""), Err(NameError::Length(0)));
        assert_eq!(Name::new(&"x".repeat(33)), Err(NameError::Length(33)));
        assert_eq!(Name::new("a b"), Err(NameError::Char { byte: b' ', at: 1 }));
        assert_eq!(Name::new(&"y".repeat(32)).unwrap().as_str().unwrap().len(), 32);
        let mut raw = [0u8; 32];
        raw[0] = b'a';
        raw[5] = b'b';
        assert_eq!(Name::read_from_bytes(&raw[..]).unwrap().as_str(), Err(NameError::Trailing));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::array::uniform32(any::<u8>())) {
            let n = Name::read_from_bytes(&raw[..]).unwrap();
            if let Ok(s) = n.as_str() {
                prop_assert_eq!(Name::new(s).unwrap(), n);
            }
        }

        #[test]
        fn valid_names_round_trip(s in "[A-Za-z0-9._-]{1,32}") {
            let n = Name::new(&s).unwrap();
            prop_assert_eq!(n.as_str().unwrap(), s.as_str());
        }
    }
}
