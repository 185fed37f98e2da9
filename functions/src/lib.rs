//! `dne-functions`: the sample functions of the demo, the tests and the
//! benchmarks, as pure in-place payload transforms.
//!
//! A DNE function receives a payload in a pool buffer and may rewrite it in
//! place before handing the same buffer on (zero copy), so every transform
//! here works on `&mut [u8]` and never allocates. The function processes that
//! link `host-shim` apply them by name, as configured per function.
//!
//! Requests that entered at the ingress arrive as an HTTP envelope
//! ([`wire::http`]); [`handle_envelope`] reads it, transforms its body in
//! place and turns the message into the next hop's request or the chain's
//! reply, without moving the body ([`MsgFrags`] adapts a `host-shim`
//! message to the envelope's fragment access).
#![forbid(unsafe_code)]

pub mod serve;

use wire::http::{self, Envelope, EnvelopeError, EnvelopeKind, FragsMut, HeadSpec, Start};

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

impl Transform {
    /// Applies the transform in place to the message bytes `off..off + len`
    /// of a fragmented message (the bytes may straddle buffers). Returns the
    /// bytes transformed (fewer when the message is shorter).
    pub fn apply_frags<F: FragsMut + ?Sized>(self, frags: &mut F, off: u64, len: u64) -> u64 {
        let len = len.min(frags.total_len().saturating_sub(off));
        match self {
            // Byte-local transforms work fragment by fragment.
            Self::Echo | Self::Upper | Self::Rot13 => http::for_each_piece_mut(frags, off, len, |p| self.apply(p)),
            Self::Reverse => {
                // Swap blocks from both ends, each reversed: the whole range
                // ends up reversed without holding two fragments at once.
                let (mut lo, mut hi) = (off, off + len);
                let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
                while hi - lo > 1 {
                    let n = ((hi - lo) / 2).min(256) as usize;
                    let (a, b) = (&mut a[..n], &mut b[..n]);
                    // Inside the message (clamped above), so these succeed.
                    let ok = http::read_at(frags, lo, a).is_ok() && http::read_at(frags, hi - n as u64, b).is_ok();
                    if !ok {
                        break;
                    }
                    a.reverse();
                    b.reverse();
                    let ok = http::write_at(frags, lo, b).is_ok() && http::write_at(frags, hi - n as u64, a).is_ok();
                    if !ok {
                        break;
                    }
                    lo += n as u64;
                    hi -= n as u64;
                }
                len
            }
        }
    }
}

/// What a function does with a request envelope after transforming its body.
#[derive(Clone, Copy, Debug)]
pub enum Next<'a> {
    /// Pass the request on down the chain (head unchanged).
    Forward,
    /// Reply to the client: the message becomes a response envelope with
    /// this status and these headers, its body where it already is.
    Reply {
        /// HTTP status, 100..=599.
        status: u16,
        /// Response headers (`content-length` is the ingress's business).
        headers: &'a [(&'a [u8], &'a [u8])],
    },
}

/// A request envelope that a function cannot handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    /// The message is not a well-formed envelope.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The message is a response, not a request.
    #[error("the message is a response envelope, functions take requests")]
    NotARequest,
    /// The reply head does not fit in front of the body.
    #[error("reply head of {need} bytes does not fit the {room} bytes in front of the body")]
    HeadTooLarge {
        /// Bytes of the reply head.
        need: u32,
        /// Bytes in front of the body.
        room: u32,
    },
}

/// The function side of an HTTP request: decodes the request envelope of a
/// message, applies `transform` to its body in place, and then either
/// leaves the request as it is for the next function ([`Next::Forward`]) or
/// rewrites the head in place into a response ([`Next::Reply`]); the body
/// never moves and the message length never changes. Returns the request
/// as decoded. On error nothing was written.
pub fn handle_envelope<F: FragsMut + ?Sized>(
    frags: &mut F,
    transform: Transform,
    next: Next<'_>,
) -> Result<Envelope, HopError> {
    let req = http::decode(frags)?;
    if req.kind != EnvelopeKind::Request {
        return Err(HopError::NotARequest);
    }
    let reply = match next {
        Next::Forward => None,
        Next::Reply { status, headers } => {
            let spec = HeadSpec { start: Start::Response { status }, headers };
            let need = spec.len()?;
            if need > req.body_offset {
                return Err(HopError::HeadTooLarge { need, room: req.body_offset });
            }
            Some((spec, need))
        }
    };
    transform.apply_frags(frags, u64::from(req.body_offset), u64::from(req.body_len));
    if let Some((spec, need)) = reply {
        http::encode_head(frags, &spec, req.body_offset - need, req.body_len)?;
    }
    Ok(req)
}

/// A `host-shim` message seen as envelope fragments (its buffers' payload
/// areas, in chain order).
#[derive(Debug)]
pub struct MsgFrags<'a> {
    f: &'a host_shim::Function,
    msg: &'a mut host_shim::Msg,
}

impl<'a> MsgFrags<'a> {
    /// The fragments of `msg`, held by the attached function `f`.
    pub fn new(f: &'a host_shim::Function, msg: &'a mut host_shim::Msg) -> Self {
        Self { f, msg }
    }
}

impl http::Frags for MsgFrags<'_> {
    fn frag_count(&self) -> u32 {
        self.msg.frags()
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        (k < self.msg.frags()).then(|| self.f.payload(self.msg, k))
    }
}

impl FragsMut for MsgFrags<'_> {
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]> {
        (k < self.msg.frags()).then(|| self.f.payload_mut(self.msg, k))
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

    fn chained(data: &[u8], cap: usize) -> Vec<Vec<u8>> {
        data.chunks(cap).map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn fragmented_transforms_match_the_flat_ones() {
        let data: Vec<u8> = (0..2000u32).map(|i| b"aBz!Q"[i as usize % 5] ^ (i / 5) as u8 & 0x20).collect();
        for t in Transform::ALL {
            for cap in [1, 7, 64, 333, 5000] {
                for (off, len) in [(0u64, 2000u64), (3, 1990), (100, 1), (100, 0), (1999, 50)] {
                    let mut f = chained(&data, cap);
                    let n = t.apply_frags(&mut f, off, len);
                    let mut want = data.clone();
                    let end = (off + len).min(2000) as usize;
                    t.apply(&mut want[off as usize..end]);
                    assert_eq!(n, (end - off as usize) as u64);
                    assert_eq!(f.concat(), want, "{t:?} cap {cap} range {off}+{len}");
                }
            }
        }
    }

    fn request_envelope(body: &[u8], cap: usize) -> Vec<Vec<u8>> {
        let hs: &[(&[u8], &[u8])] = &[(b"content-type", b"text/plain")];
        let spec = HeadSpec { start: Start::Request { method: http::Method::Post, path: b"/a" }, headers: hs };
        let pad = http::REPLY_HEAD_ROOM - spec.len().unwrap();
        let total = http::REPLY_HEAD_ROOM as usize + body.len();
        let mut f = chained(&vec![0u8; total], cap);
        let off = http::encode_head(&mut f, &spec, pad, body.len() as u32).unwrap();
        http::write_at(&mut f, u64::from(off), body).unwrap();
        f
    }

    #[test]
    fn envelope_hops_forward_then_reply_in_place() {
        let mut f = request_envelope(b"hello, chain", 100);
        let before = f.iter().map(Vec::len).collect::<Vec<_>>();
        let req = handle_envelope(&mut f, Transform::Upper, Next::Forward).unwrap();
        assert_eq!(req.path, b"/a");
        let again = http::decode(&f).unwrap();
        assert_eq!(again.kind, EnvelopeKind::Request);
        let hs: &[(&[u8], &[u8])] = &[(b"content-type", b"text/plain"), (b"x-fn", b"rot13")];
        handle_envelope(&mut f, Transform::Rot13, Next::Reply { status: 200, headers: hs }).unwrap();
        let r = http::decode(&f).unwrap();
        assert_eq!((r.kind, r.status, r.body_offset), (EnvelopeKind::Response, Some(200), req.body_offset));
        assert_eq!(r.header("x-fn"), Some(&b"rot13"[..]));
        let mut body = vec![0; r.body_len as usize];
        http::read_at(&f, u64::from(r.body_offset), &mut body).unwrap();
        assert_eq!(body, b"URYYB, PUNVA");
        assert_eq!(f.iter().map(Vec::len).collect::<Vec<_>>(), before, "length unchanged");
        // A response is not a request; a too-large reply head changes nothing.
        assert_eq!(handle_envelope(&mut f, Transform::Echo, Next::Forward), Err(HopError::NotARequest));
        let mut f = request_envelope(b"x", 64);
        let snapshot = f.clone();
        let big = vec![b'v'; 300];
        let hs: &[(&[u8], &[u8])] = &[(b"x-big", &big)];
        let e = handle_envelope(&mut f, Transform::Upper, Next::Reply { status: 200, headers: hs });
        assert!(matches!(e, Err(HopError::HeadTooLarge { room: 256, .. })), "{e:?}");
        assert_eq!(f, snapshot);
        let mut junk = vec![vec![0u8; 30]];
        assert!(matches!(handle_envelope(&mut junk, Transform::Echo, Next::Forward), Err(HopError::Envelope(_))));
    }

    #[test]
    fn checksum_is_fnv1a() {
        assert_eq!(checksum(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(checksum(b"a"), 0xAF63_DC4C_8601_EC8C);
    }
}
