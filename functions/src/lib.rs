//! `dne-functions`: the sample functions of the demo, the tests and the
//! benchmarks, as pure in-place payload transforms.
//!
//! A DNE function receives a payload in a pool buffer and may rewrite it in
//! place before handing the same buffer on (zero copy), so every transform
//! here works on `&mut [u8]` and never allocates. The function processes that
//! link `host-shim` apply them by name, as configured per function.
#![forbid(unsafe_code)]

/// A payload transform, chosen by name in the cluster config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transform {
    /// Leaves the payload as it is.
    Echo,
    /// ASCII letters to upper case.
    Upper,
    /// ROT13 on ASCII letters (its own inverse).
    Rot13,
    /// Reverses the byte order.
    Reverse,
}

/// A transform name that is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown transform `{0}` (known: echo, upper, rot13, reverse)")]
pub struct UnknownTransform(pub String);

impl Transform {
    /// Every transform.
    pub const ALL: [Transform; 4] = [Self::Echo, Self::Upper, Self::Rot13, Self::Reverse];

    /// The transform's config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Upper => "upper",
            Self::Rot13 => "rot13",
            Self::Reverse => "reverse",
        }
    }

    /// Looks a transform up by config name.
    pub fn from_name(name: &str) -> Result<Self, UnknownTransform> {
        Self::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| UnknownTransform(name.to_owned()))
    }

    /// Applies the transform in place.
    pub fn apply(self, payload: &mut [u8]) {
        match self {
            Self::Echo => {}
            Self::Upper => payload.make_ascii_uppercase(),
            Self::Rot13 => payload.iter_mut().for_each(|b| *b = rot13(*b)),
            Self::Reverse => payload.reverse(),
        }
    }
}

fn rot13(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => (b - b'a' + 13) % 26 + b'a',
        b'A'..=b'Z' => (b - b'A' + 13) % 26 + b'A',
        _ => b,
    }
}

/// FNV-1a 64-bit checksum of a payload: what the aggregate function of the
/// fan-out chain reports, and what tests compare end to end.
pub fn checksum(payload: &[u8]) -> u64 {
    payload.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_do_what_they_say() {
        let run = |t: Transform, s: &str| {
            let mut v = s.as_bytes().to_vec();
            t.apply(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(run(Transform::Echo, "Hello, DNE!"), "Hello, DNE!");
        assert_eq!(run(Transform::Upper, "Hello, DNE!"), "HELLO, DNE!");
        assert_eq!(run(Transform::Rot13, "Hello, DNE!"), "Uryyb, QAR!");
        assert_eq!(run(Transform::Reverse, "Hello, DNE!"), "!END ,olleH");
        let mut v = b"round trip".to_vec();
        Transform::Rot13.apply(&mut v);
        Transform::Rot13.apply(&mut v);
        assert_eq!(v, b"round trip");
    }

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for t in Transform::ALL {
            assert_eq!(Transform::from_name(t.name()), Ok(t));
        }
        assert_eq!(Transform::from_name("nope"), Err(UnknownTransform("nope".into())));
    }

    #[test]
    fn checksum_is_fnv1a() {
        assert_eq!(checksum(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(checksum(b"a"), 0xAF63_DC4C_8601_EC8C);
    }
}
