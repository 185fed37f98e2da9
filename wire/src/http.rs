//! The HTTP envelope: how a request that entered the cluster at the ingress,
//! and the reply a chain produces, sit in a message (a chain of pool
//! buffers).
//!
//! The ingress terminates HTTP once; functions never parse HTTP. They receive
//! this binary envelope, laid out over the payload areas of the message's
//! buffers (the first [`crate::fabric::HEADROOM`] bytes of each buffer belong
//! to the fabric header and are never part of it):
//!
//! ```text
//! offset 0        EnvelopeHeader (24 bytes, little-endian)
//! 24              path (request: origin-form path and query; response: none)
//! 24+path         header block: header_count x [name_len u16][value_len u16][name][value]
//! ..              pad_len bytes of padding (content undefined)
//! body_offset     body_len bytes of body
//! ```
//!
//! The padding lets a function turn a request into a reply *in place*: the
//! reply's head is written at offset 0 and padded up to where the body
//! already lies, so the body is never moved. The ingress reserves
//! [`REPLY_HEAD_ROOM`] bytes in front of every request body for that.
//!
//! The envelope spans fragments: the head may straddle a buffer boundary,
//! the body almost always does. [`Frags`] / [`FragsMut`] abstract the
//! fragments (a pool lease's buffers, or plain byte vectors in tests and the
//! fuzzer), so the encoder writes in place and the decoder reads in place.
//!
//! The decoder treats the bytes as untrusted (a function of the tenant wrote
//! them): every count and length is checked against limits and against the
//! message length, every name and value against the HTTP grammar, and any
//! failure is an [`EnvelopeError`] naming the field. It never panics.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic in the first two bytes of every envelope ("HE").
pub const ENVELOPE_MAGIC: u16 = 0x4548;
/// Version of the envelope layout.
pub const ENVELOPE_VERSION: u8 = 1;
/// Bytes of the fixed header.
pub const ENVELOPE_HEADER_LEN: u32 = size_of::<EnvelopeHeader>() as u32;
/// Longest path (with query) an envelope carries.
pub const MAX_PATH: u32 = 8192;
/// Most headers an envelope carries.
pub const MAX_HEADERS: u16 = 64;
/// Largest header block in bytes.
pub const MAX_HEADER_BYTES: u32 = 16384;
/// Body offset the ingress guarantees at least, so that a reply head of up
/// to this many bytes can be written in place in front of the body.
pub const REPLY_HEAD_ROOM: u32 = 256;

/// The fixed header at offset 0 of every envelope, 24 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct EnvelopeHeader {
    /// [`ENVELOPE_MAGIC`].
    pub magic: u16,
    /// [`ENVELOPE_VERSION`].
    pub version: u8,
    /// [`EnvelopeKind`].
    pub kind: u8,
    /// Request: [`Method`] code. Response: HTTP status (100..=599).
    pub code: u16,
    /// Entries in the header block.
    pub header_count: u16,
    /// Bytes of the path (0 in a response).
    pub path_len: u32,
    /// Bytes of the header block.
    pub headers_len: u32,
    /// Bytes of padding between the header block and the body.
    pub pad_len: u32,
    /// Bytes of the body.
    pub body_len: u32,
}
const _: () = assert!(size_of::<EnvelopeHeader>() == 24);
const _: () = assert!(align_of::<EnvelopeHeader>() == 4);
const _: () = assert!(ENVELOPE_HEADER_LEN + MAX_PATH + MAX_HEADER_BYTES < u32::MAX / 2);

/// Request or response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EnvelopeKind {
    /// A client's request, travelling down the chain.
    Request = 1,
    /// The reply the chain's last function sends back.
    Response = 2,
}

impl EnvelopeKind {
    /// Decodes a kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Request),
            2 => Some(Self::Response),
            _ => None,
        }
    }
}

/// Request methods the envelope carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Method {
    /// GET
    Get = 1,
    /// HEAD
    Head = 2,
    /// POST
    Post = 3,
    /// PUT
    Put = 4,
    /// DELETE
    Delete = 5,
    /// PATCH
    Patch = 6,
    /// OPTIONS
    Options = 7,
}

impl Method {
    /// Every method, in code order.
    pub const ALL: [Method; 7] =
        [Self::Get, Self::Head, Self::Post, Self::Put, Self::Delete, Self::Patch, Self::Options];

    /// Decodes a method code.
    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| *m as u16 == v)
    }

    /// The method's name as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Patch => "PATCH",
            Self::Options => "OPTIONS",
        }
    }

    /// Looks a method up by its wire name (case-sensitive, as HTTP is).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.as_str() == name)
    }
}

/// What a head carries besides its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start<'a> {
    /// A request line.
    Request {
        /// Method.
        method: Method,
        /// Origin-form path and query (starts with `/`).
        path: &'a [u8],
    },
    /// A status line.
    Response {
        /// HTTP status, 100..=599.
        status: u16,
    },
}

/// An envelope head to encode.
#[derive(Clone, Copy, Debug)]
pub struct HeadSpec<'a> {
    /// Request or status line.
    pub start: Start<'a>,
    /// Header names and values, in order.
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

impl HeadSpec<'_> {
    /// Bytes of the head (fixed header, path, header block), before any
    /// padding. Checks the same limits as the encoder.
    pub fn len(&self) -> Result<u32, EnvelopeError> {
        let path = match self.start {
            Start::Request { path, .. } => check_path(path)?,
            Start::Response { status } => {
                check_status(status)?;
                0
            }
        };
        Ok(ENVELOPE_HEADER_LEN + path + self.headers_len()?)
    }

    /// Always false: a head has at least its fixed header.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn headers_len(&self) -> Result<u32, EnvelopeError> {
        if self.headers.len() > usize::from(MAX_HEADERS) {
            return Err(EnvelopeError::HeaderCount(self.headers.len().min(usize::from(u16::MAX)) as u16));
        }
        let mut n: u32 = 0;
        for (i, (name, value)) in self.headers.iter().enumerate() {
            check_name(i as u16, name)?;
            check_value(i as u16, value)?;
            // Each is at most u16::MAX (checked), so no overflow below the cap.
            n = n.saturating_add(4 + name.len() as u32 + value.len() as u32);
            if n > MAX_HEADER_BYTES {
                return Err(EnvelopeError::HeadersLen(n));
            }
        }
        Ok(n)
    }
}

/// A decoded envelope head; the body stays in the fragments, at
/// [`Envelope::body_offset`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Request or response.
    pub kind: EnvelopeKind,
    /// Request method (requests only).
    pub method: Option<Method>,
    /// Response status (responses only).
    pub status: Option<u16>,
    /// Path and query (requests only; empty in responses).
    pub path: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of the head before the padding.
    pub head_len: u32,
    /// Offset of the body in the message.
    pub body_offset: u32,
    /// Bytes of the body.
    pub body_len: u32,
}

impl Envelope {
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v.as_slice())
    }

    /// The head as a spec, for re-encoding.
    pub fn spec<'a>(&'a self, headers: &'a mut Vec<(&'a [u8], &'a [u8])>) -> HeadSpec<'a> {
        headers.extend(self.headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let start = match (self.kind, self.method, self.status) {
            (EnvelopeKind::Request, Some(method), _) => Start::Request { method, path: &self.path },
            (_, _, status) => Start::Response { status: status.unwrap_or(500) },
        };
        HeadSpec { start, headers }
    }
}

/// An envelope that cannot be encoded or must be rejected, naming the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The message is shorter than the fixed header.
    #[error("envelope header: message of {0} bytes is shorter than {ENVELOPE_HEADER_LEN}")]
    Short(u64),
    /// Not an envelope.
    #[error("envelope magic: {0:#06x}")]
    Magic(u16),
    /// Another layout version.
    #[error("envelope version: {0}, this build speaks {ENVELOPE_VERSION}")]
    Version(u8),
    /// Unknown kind.
    #[error("envelope kind: unknown value {0}")]
    Kind(u8),
    /// Unknown method code in a request.
    #[error("envelope method: unknown code {0}")]
    Method(u16),
    /// Status outside 100..=599 in a response.
    #[error("envelope status: {0} outside 100..=599")]
    Status(u16),
    /// Path too long, empty or not starting with `/` in a request, or
    /// present in a response.
    #[error("envelope path_len: {0} bytes not allowed here (requests: 1..={MAX_PATH}, responses: 0)")]
    PathLen(u32),
    /// A path byte that HTTP does not allow in a request target.
    #[error("envelope path: byte {byte:#04x} at offset {offset} not allowed")]
    PathByte {
        /// Offset in the path.
        offset: u32,
        /// The byte.
        byte: u8,
    },
    /// Too many headers.
    #[error("envelope header_count: {0} exceeds {MAX_HEADERS}")]
    HeaderCount(u16),
    /// Header block too long.
    #[error("envelope headers_len: {0} exceeds {MAX_HEADER_BYTES}")]
    HeadersLen(u32),
    /// A header entry runs past the header block.
    #[error("envelope headers[{0}]: entry runs past the header block")]
    HeaderTruncated(u16),
    /// A header name that is empty or not an HTTP token.
    #[error("envelope headers[{0}].name: empty or not an HTTP token")]
    HeaderName(u16),
    /// A header value with a control character.
    #[error("envelope headers[{0}].value: control character not allowed")]
    HeaderValue(u16),
    /// The header block has bytes after its last entry.
    #[error("envelope headers_len: {0} bytes after the last entry")]
    HeaderTrailing(u32),
    /// The lengths do not add up to the message length, or the body would
    /// start at 4 GiB or later (body offsets are `u32`).
    #[error("envelope lengths: head {head} + pad {pad} + body {body} != message {message}, or head + pad >= 4 GiB")]
    Length {
        /// Head bytes.
        head: u32,
        /// Padding bytes.
        pad: u32,
        /// Body bytes.
        body: u32,
        /// Message bytes.
        message: u64,
    },
    /// The fragments are too short for what is being written.
    #[error("envelope: {need} bytes do not fit the message of {have} bytes")]
    NoRoom {
        /// Bytes needed.
        need: u64,
        /// Bytes the fragments hold.
        have: u64,
    },
}

/// Read access to a message's fragments, in chain order. Fragment lengths
/// may differ; the message is their concatenation.
pub trait Frags {
    /// Number of fragments.
    fn frag_count(&self) -> u32;
    /// Bytes of fragment `k`; `None` past the end.
    fn frag(&self, k: u32) -> Option<&[u8]>;

    /// Bytes in the whole message.
    fn total_len(&self) -> u64 {
        (0..self.frag_count()).map(|k| self.frag(k).map_or(0, |f| f.len() as u64)).sum()
    }
}

/// Write access to a message's fragments.
pub trait FragsMut: Frags {
    /// Mutable bytes of fragment `k`; `None` past the end.
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]>;
}

impl<T: AsRef<[u8]>> Frags for [T] {
    fn frag_count(&self) -> u32 {
        u32::try_from(self.len()).unwrap_or(u32::MAX)
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        self.get(k as usize).map(AsRef::as_ref)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> FragsMut for [T] {
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]> {
        self.get_mut(k as usize).map(AsMut::as_mut)
    }
}

impl<T: AsRef<[u8]>, const N: usize> Frags for [T; N] {
    fn frag_count(&self) -> u32 {
        self.as_slice().frag_count()
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        self.as_slice().frag(k)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>, const N: usize> FragsMut for [T; N] {
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]> {
        self.as_mut_slice().frag_mut(k)
    }
}

impl<T: AsRef<[u8]>> Frags for Vec<T> {
    fn frag_count(&self) -> u32 {
        self.as_slice().frag_count()
    }
    fn frag(&self, k: u32) -> Option<&[u8]> {
        self.as_slice().frag(k)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> FragsMut for Vec<T> {
    fn frag_mut(&mut self, k: u32) -> Option<&mut [u8]> {
        self.as_mut_slice().frag_mut(k)
    }
}

/// Calls `f(fragment, start, end)` for every fragment piece covering the
/// message bytes `off..off + len`, in order. Returns the bytes covered (less
/// than `len` when the message is shorter).
pub fn for_each_piece<F: Frags + ?Sized>(frags: &F, off: u64, len: u64, mut f: impl FnMut(&[u8])) -> u64 {
    let (mut base, end, mut done) = (0u64, off.saturating_add(len), 0u64);
    for k in 0..frags.frag_count() {
        let Some(frag) = frags.frag(k) else { break };
        let (lo, hi) = (base, base + frag.len() as u64);
        base = hi;
        if hi <= off {
            continue;
        }
        if lo >= end {
            break;
        }
        let s = off.max(lo) - lo;
        let e = end.min(hi) - lo;
        f(&frag[s as usize..e as usize]);
        done += e - s;
    }
    done
}

/// Like [`for_each_piece`], with mutable pieces.
pub fn for_each_piece_mut<F: FragsMut + ?Sized>(
    frags: &mut F,
    off: u64,
    len: u64,
    mut f: impl FnMut(&mut [u8]),
) -> u64 {
    let (mut base, end, mut done) = (0u64, off.saturating_add(len), 0u64);
    for k in 0..frags.frag_count() {
        let Some(frag) = frags.frag_mut(k) else { break };
        let (lo, hi) = (base, base + frag.len() as u64);
        base = hi;
        if hi <= off {
            continue;
        }
        if lo >= end {
            break;
        }
        let s = off.max(lo) - lo;
        let e = end.min(hi) - lo;
        f(&mut frag[s as usize..e as usize]);
        done += e - s;
    }
    done
}

/// Copies message bytes `off..off + out.len()` into `out`.
pub fn read_at<F: Frags + ?Sized>(frags: &F, off: u64, out: &mut [u8]) -> Result<(), EnvelopeError> {
    let mut at = 0usize;
    let want = out.len() as u64;
    let got = for_each_piece(frags, off, want, |p| {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    });
    if got == want { Ok(()) } else { Err(EnvelopeError::NoRoom { need: off + want, have: frags.total_len() }) }
}

/// Copies `data` into message bytes `off..off + data.len()`.
pub fn write_at<F: FragsMut + ?Sized>(frags: &mut F, off: u64, data: &[u8]) -> Result<(), EnvelopeError> {
    let have = frags.total_len();
    let need = off.saturating_add(data.len() as u64);
    if need > have {
        return Err(EnvelopeError::NoRoom { need, have });
    }
    let mut at = 0usize;
    for_each_piece_mut(frags, off, data.len() as u64, |p| {
        let n = p.len();
        p.copy_from_slice(&data[at..at + n]);
        at += n;
    });
    Ok(())
}

/// Writes `spec` at offset 0 of the message, followed by `pad_len` bytes of
/// padding (left as they are), announcing `body_len` body bytes. The caller
/// writes (or has written) the body at the returned offset. The fragments
/// must hold at least the head and padding; the body's bytes are not
/// touched.
pub fn encode_head<F: FragsMut + ?Sized>(
    frags: &mut F,
    spec: &HeadSpec<'_>,
    pad_len: u32,
    body_len: u32,
) -> Result<u32, EnvelopeError> {
    let head = spec.len()?;
    let body_offset = head.checked_add(pad_len).ok_or(EnvelopeError::NoRoom { need: u64::MAX, have: 0 })?;
    let have = frags.total_len();
    if u64::from(body_offset) + u64::from(body_len) > have {
        return Err(EnvelopeError::NoRoom { need: u64::from(body_offset) + u64::from(body_len), have });
    }
    let (kind, code, path): (_, u16, &[u8]) = match spec.start {
        Start::Request { method, path } => (EnvelopeKind::Request, method as u16, path),
        Start::Response { status } => (EnvelopeKind::Response, status, &[]),
    };
    let h = EnvelopeHeader {
        magic: ENVELOPE_MAGIC,
        version: ENVELOPE_VERSION,
        kind: kind as u8,
        code,
        header_count: spec.headers.len() as u16,
        path_len: path.len() as u32,
        headers_len: head - ENVELOPE_HEADER_LEN - path.len() as u32,
        pad_len,
        body_len,
    };
    let mut off = 0u64;
    write_at(frags, off, h.as_bytes())?;
    off += u64::from(ENVELOPE_HEADER_LEN);
    write_at(frags, off, path)?;
    off += path.len() as u64;
    for (name, value) in spec.headers {
        let mut lens = [0u8; 4];
        lens[..2].copy_from_slice(&(name.len() as u16).to_le_bytes());
        lens[2..].copy_from_slice(&(value.len() as u16).to_le_bytes());
        write_at(frags, off, &lens)?;
        write_at(frags, off + 4, name)?;
        write_at(frags, off + 4 + name.len() as u64, value)?;
        off += 4 + name.len() as u64 + value.len() as u64;
    }
    Ok(body_offset)
}

/// Decodes and checks the envelope of a whole message.
pub fn decode<F: Frags + ?Sized>(frags: &F) -> Result<Envelope, EnvelopeError> {
    let message = frags.total_len();
    let mut hb = [0u8; ENVELOPE_HEADER_LEN as usize];
    read_at(frags, 0, &mut hb).map_err(|_| EnvelopeError::Short(message))?;
    let h = EnvelopeHeader::read_from_bytes(&hb).map_err(|_| EnvelopeError::Short(message))?;
    if h.magic != ENVELOPE_MAGIC {
        return Err(EnvelopeError::Magic(h.magic));
    }
    if h.version != ENVELOPE_VERSION {
        return Err(EnvelopeError::Version(h.version));
    }
    let kind = EnvelopeKind::from_u8(h.kind).ok_or(EnvelopeError::Kind(h.kind))?;
    let (method, status) = match kind {
        EnvelopeKind::Request => (Some(Method::from_u16(h.code).ok_or(EnvelopeError::Method(h.code))?), None),
        EnvelopeKind::Response => {
            check_status(h.code)?;
            if h.path_len != 0 {
                return Err(EnvelopeError::PathLen(h.path_len));
            }
            (None, Some(h.code))
        }
    };
    if kind == EnvelopeKind::Request && (h.path_len == 0 || h.path_len > MAX_PATH) {
        return Err(EnvelopeError::PathLen(h.path_len));
    }
    if h.header_count > MAX_HEADERS {
        return Err(EnvelopeError::HeaderCount(h.header_count));
    }
    if h.headers_len > MAX_HEADER_BYTES {
        return Err(EnvelopeError::HeadersLen(h.headers_len));
    }
    // Bounded above: every term is below 2^32 and there are four.
    let head = ENVELOPE_HEADER_LEN + h.path_len + h.headers_len;
    let total = u64::from(head) + u64::from(h.pad_len) + u64::from(h.body_len);
    let length = EnvelopeError::Length { head, pad: h.pad_len, body: h.body_len, message };
    if total != message {
        return Err(length);
    }
    // The message length alone does not bound the padding (it is a u64), so
    // the body offset is checked against the u32 it is returned in.
    let body_offset = head.checked_add(h.pad_len).ok_or(length)?;
    let mut path = vec![0u8; h.path_len as usize];
    read_at(frags, u64::from(ENVELOPE_HEADER_LEN), &mut path)?;
    if kind == EnvelopeKind::Request {
        check_path(&path)?;
    }
    let mut block = vec![0u8; h.headers_len as usize];
    read_at(frags, u64::from(ENVELOPE_HEADER_LEN + h.path_len), &mut block)?;
    let mut headers = Vec::with_capacity(usize::from(h.header_count));
    let mut rest: &[u8] = &block;
    for i in 0..h.header_count {
        let Some((lens, after)) = rest.split_first_chunk::<4>() else {
            return Err(EnvelopeError::HeaderTruncated(i));
        };
        let nl = usize::from(u16::from_le_bytes([lens[0], lens[1]]));
        let vl = usize::from(u16::from_le_bytes([lens[2], lens[3]]));
        if after.len() < nl + vl {
            return Err(EnvelopeError::HeaderTruncated(i));
        }
        let (name, after) = after.split_at(nl);
        let (value, after) = after.split_at(vl);
        check_name(i, name)?;
        check_value(i, value)?;
        headers.push((name.to_vec(), value.to_vec()));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(EnvelopeError::HeaderTrailing(rest.len() as u32));
    }
    Ok(Envelope { kind, method, status, path, headers, head_len: head, body_offset, body_len: h.body_len })
}

fn check_status(status: u16) -> Result<(), EnvelopeError> {
    if (100..=599).contains(&status) { Ok(()) } else { Err(EnvelopeError::Status(status)) }
}

fn check_path(path: &[u8]) -> Result<u32, EnvelopeError> {
    let len = u32::try_from(path.len()).unwrap_or(u32::MAX);
    if path.is_empty() || len > MAX_PATH {
        return Err(EnvelopeError::PathLen(len));
    }
    for (i, &b) in path.iter().enumerate() {
        // Request targets are visible ASCII (RFC 9112 section 3.2); the
        // first byte is `/` (origin form).
        let ok = if i == 0 { b == b'/' } else { b.is_ascii_graphic() };
        if !ok {
            return Err(EnvelopeError::PathByte { offset: i as u32, byte: b });
        }
    }
    Ok(len)
}

/// Whether `b` is an HTTP token character (RFC 9110 section 5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_name(i: u16, name: &[u8]) -> Result<(), EnvelopeError> {
    if name.is_empty() || name.len() > usize::from(u16::MAX) || !name.iter().all(|&b| is_tchar(b)) {
        return Err(EnvelopeError::HeaderName(i));
    }
    Ok(())
}

fn check_value(i: u16, value: &[u8]) -> Result<(), EnvelopeError> {
    // Field values: visible ASCII, space, tab and obs-text (RFC 9110 5.5).
    let ok =
        value.len() <= usize::from(u16::MAX) && value.iter().all(|&b| b == b'\t' || b == b' ' || b > 0x20 && b != 0x7F);
    if ok { Ok(()) } else { Err(EnvelopeError::HeaderValue(i)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fragments of `cap` bytes holding `len` bytes, like a pool chain.
    fn chain(len: u64, cap: usize) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        let mut left = len as usize;
        while left > 0 || v.is_empty() {
            let n = left.min(cap);
            v.push(vec![0xEE; n]);
            left -= n;
        }
        v
    }

    fn request<'a>(path: &'a [u8], headers: &'a [(&'a [u8], &'a [u8])]) -> HeadSpec<'a> {
        HeadSpec { start: Start::Request { method: Method::Post, path }, headers }
    }

    fn build(spec: &HeadSpec<'_>, pad: u32, body: &[u8], cap: usize) -> Vec<Vec<u8>> {
        let head = spec.len().unwrap();
        let mut f = chain(u64::from(head + pad) + body.len() as u64, cap);
        let off = encode_head(&mut f, spec, pad, body.len() as u32).unwrap();
        write_at(&mut f, u64::from(off), body).unwrap();
        f
    }

    #[test]
    fn request_round_trips_across_small_fragments() {
        let hs: &[(&[u8], &[u8])] = &[(b"content-type", b"text/plain"), (b"x-a", b"")];
        let spec = request(b"/acme/upper?x=1", hs);
        let body: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let f = build(&spec, 7, &body, 13);
        let e = decode(&f).unwrap();
        assert_eq!(e.kind, EnvelopeKind::Request);
        assert_eq!(e.method, Some(Method::Post));
        assert_eq!(e.path, b"/acme/upper?x=1");
        assert_eq!(e.header("Content-Type"), Some(&b"text/plain"[..]));
        assert_eq!(e.header("x-a"), Some(&b""[..]));
        assert_eq!(e.body_offset, e.head_len + 7);
        let mut got = vec![0u8; e.body_len as usize];
        read_at(&f, u64::from(e.body_offset), &mut got).unwrap();
        assert_eq!(got, body);
    }

    #[test]
    fn each_bad_field_is_named() {
        let spec = request(b"/p", &[(b"h", b"v")]);
        let good = build(&spec, 0, b"body", 1 << 10);
        let flat = good.concat();
        let at = |off: usize, bytes: &[u8]| {
            let mut m = flat.clone();
            m[off..off + bytes.len()].copy_from_slice(bytes);
            decode(&[m]).unwrap_err()
        };
        assert_eq!(decode(&[&flat[..10]]), Err(EnvelopeError::Short(10)));
        assert_eq!(at(0, &[1, 2]), EnvelopeError::Magic(0x0201));
        assert_eq!(at(2, &[9]), EnvelopeError::Version(9));
        assert_eq!(at(3, &[7]), EnvelopeError::Kind(7));
        assert_eq!(at(4, &[99, 0]), EnvelopeError::Method(99));
        assert_eq!(at(6, &[99, 0]), EnvelopeError::HeaderCount(99));
        assert_eq!(at(6, &[2, 0]), EnvelopeError::HeaderTruncated(1));
        assert_eq!(at(6, &[0, 0]), EnvelopeError::HeaderTrailing(6));
        assert_eq!(at(8, &[0, 0, 0, 0]), EnvelopeError::PathLen(0));
        assert_eq!(at(24, b"x"), EnvelopeError::PathByte { offset: 0, byte: b'x' });
        assert_eq!(at(25, b" "), EnvelopeError::PathByte { offset: 1, byte: b' ' });
        assert_eq!(at(12, &[0xFF, 0xFF, 0, 0]), EnvelopeError::HeadersLen(0xFFFF));
        assert_eq!(at(26 + 4, b" "), EnvelopeError::HeaderName(0));
        assert_eq!(at(26 + 5, b"\n"), EnvelopeError::HeaderValue(0));
        assert_eq!(at(26, &[9, 0]), EnvelopeError::HeaderTruncated(0));
        assert!(matches!(at(20, &[5, 0, 0, 0]), EnvelopeError::Length { body: 5, message: 36, .. }));
        // A response with a path, or a status out of range.
        let mut r = flat.clone();
        r[3] = EnvelopeKind::Response as u8;
        r[4..6].copy_from_slice(&200u16.to_le_bytes());
        assert_eq!(decode(&[r.clone()]), Err(EnvelopeError::PathLen(2)));
        r[4..6].copy_from_slice(&600u16.to_le_bytes());
        assert_eq!(decode(&[r]), Err(EnvelopeError::Status(600)));
    }

    /// A message of more than 4 GiB whose head and padding add up past
    /// `u32::MAX`: the body offset cannot be represented, so the decoder
    /// refuses it with a typed error (it used to overflow). The fragments
    /// repeat one zero buffer, so nothing of that size is allocated.
    #[test]
    fn body_offset_past_u32_is_refused() {
        struct Huge {
            head: Vec<u8>,
            zeros: Vec<u8>,
            count: u32,
            last: usize,
        }
        impl Frags for Huge {
            fn frag_count(&self) -> u32 {
                self.count + 2
            }
            fn frag(&self, k: u32) -> Option<&[u8]> {
                match k {
                    0 => Some(&self.head),
                    k if k <= self.count => Some(&self.zeros),
                    k if k == self.count + 1 => Some(&self.zeros[..self.last]),
                    _ => None,
                }
            }
        }
        let h = EnvelopeHeader {
            magic: ENVELOPE_MAGIC,
            version: ENVELOPE_VERSION,
            kind: EnvelopeKind::Request as u8,
            code: Method::Get as u16,
            header_count: 0,
            path_len: 1,
            headers_len: 0,
            pad_len: u32::MAX,
            body_len: 3,
        };
        let mut head = h.as_bytes().to_vec();
        head.push(b'/');
        // The message holds head + pad + body bytes, so only the body
        // offset (head + pad = 2^32 + 24) is out of range.
        let message = 25 + u64::from(u32::MAX) + 3;
        let zeros = vec![0u8; 1 << 20];
        let rest = message - 25;
        let f = Huge { head, count: (rest >> 20) as u32, last: (rest & ((1 << 20) - 1)) as usize, zeros };
        assert_eq!(f.total_len(), message);
        assert_eq!(decode(&f), Err(EnvelopeError::Length { head: 25, pad: u32::MAX, body: 3, message }));
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut f = chain(100, 100);
        let e = |spec: HeadSpec<'_>, f: &mut Vec<Vec<u8>>| encode_head(f, &spec, 0, 0).unwrap_err();
        assert_eq!(e(request(b"", &[]), &mut f), EnvelopeError::PathLen(0));
        assert_eq!(e(request(b"/a b", &[]), &mut f), EnvelopeError::PathByte { offset: 2, byte: b' ' });
        assert_eq!(e(request(b"/", &[(b"a:b", b"")]), &mut f), EnvelopeError::HeaderName(0));
        assert_eq!(e(request(b"/", &[(b"a", b"x\r\n")]), &mut f), EnvelopeError::HeaderValue(0));
        assert_eq!(
            e(HeadSpec { start: Start::Response { status: 99 }, headers: &[] }, &mut f),
            EnvelopeError::Status(99)
        );
        let long = vec![b'a'; 200];
        assert!(matches!(
            e(request(&long, &[]), &mut f),
            EnvelopeError::PathByte { .. } | EnvelopeError::NoRoom { .. }
        ));
        let mut p = long.clone();
        p[0] = b'/';
        assert_eq!(e(request(&p, &[]), &mut f), EnvelopeError::NoRoom { need: 224, have: 100 });
        let many: Vec<(&[u8], &[u8])> = vec![(b"a", b"b"); 65];
        assert_eq!(e(request(b"/", &many), &mut f), EnvelopeError::HeaderCount(65));
    }

    #[test]
    fn reply_written_in_place_keeps_the_body_where_it_is() {
        let hs: &[(&[u8], &[u8])] = &[(b"user-agent", b"test")];
        let spec = request(b"/x", hs);
        let pad = REPLY_HEAD_ROOM - spec.len().unwrap();
        let mut f = build(&spec, pad, b"hello world", 64);
        let req = decode(&f).unwrap();
        let reply = HeadSpec { start: Start::Response { status: 201 }, headers: &[(b"content-type", b"text/plain")] };
        let rlen = reply.len().unwrap();
        let off = encode_head(&mut f, &reply, req.body_offset - rlen, req.body_len).unwrap();
        assert_eq!(off, req.body_offset);
        let r = decode(&f).unwrap();
        assert_eq!((r.kind, r.status, r.body_offset, r.body_len), (EnvelopeKind::Response, Some(201), off, 11));
        let mut body = vec![0; 11];
        read_at(&f, u64::from(off), &mut body).unwrap();
        assert_eq!(body, b"hello world");
    }

    fn token() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(b"abcXYZ019-_!~".to_vec()), 1..20)
    }
    fn value() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(prop_oneof![Just(b' '), Just(b'\t'), 0x21u8..=0x7E, 0x80u8..=0xFF], 0..40)
    }

    proptest! {
        #[test]
        fn round_trip(
            req in any::<bool>(),
            code in 100u16..600,
            method in 0usize..7,
            path in proptest::collection::vec(0x21u8..0x7F, 0..100),
            headers in proptest::collection::vec((token(), value()), 0..10),
            pad in 0u32..300,
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            cap in 1usize..5000,
        ) {
            let mut p = path.clone();
            p.insert(0, b'/');
            let hs: Vec<(&[u8], &[u8])> = headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            let start = if req { Start::Request { method: Method::ALL[method], path: &p } } else { Start::Response { status: code } };
            let spec = HeadSpec { start, headers: &hs };
            let f = build(&spec, pad, &body, cap);
            let e = decode(&f).unwrap();
            let mut again = Vec::new();
            let spec2 = e.spec(&mut again);
            prop_assert_eq!(spec2.len().unwrap(), spec.len().unwrap());
            prop_assert_eq!(format!("{:?}", spec2.start), format!("{:?}", spec.start));
            prop_assert_eq!(spec2.headers, &hs[..]);
            prop_assert_eq!(e.body_len as usize, body.len());
            let mut got = vec![0u8; body.len()];
            read_at(&f, u64::from(e.body_offset), &mut got).unwrap();
            prop_assert_eq!(got, body);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            cap in 1usize..64,
            magic in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if magic && bytes.len() >= 4 {
                bytes[..2].copy_from_slice(&ENVELOPE_MAGIC.to_le_bytes());
                bytes[2] = ENVELOPE_VERSION;
                bytes[3] %= 3;
            }
            let frags: Vec<&[u8]> = bytes.chunks(cap).collect();
            if let Ok(e) = decode(&frags) {
                prop_assert_eq!(u64::from(e.body_offset) + u64::from(e.body_len), bytes.len() as u64);
                prop_assert!(e.head_len <= e.body_offset);
            }
        }
    }
}
