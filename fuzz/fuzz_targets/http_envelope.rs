//! HTTP envelopes from any function of a tenant (the ingress decodes every
//! reply, functions decode every request): decoding a message split into
//! fragments of any size never panics, and an accepted envelope re-encodes
//! (head, padding, body) into a message that decodes to the same envelope
//! with the same body bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::http::{self, Frags};

fuzz_target!(|data: &[u8]| {
    let Some((&cap, msg)) = data.split_first() else { return };
    let cap = usize::from(cap % 64) + 1;
    let frags: Vec<&[u8]> = msg.chunks(cap).collect();
    let Ok(e) = http::decode(&frags) else { return };
    assert!(e.head_len <= e.body_offset);
    assert_eq!(u64::from(e.body_offset) + u64::from(e.body_len), frags.total_len());
    let mut body = vec![0u8; e.body_len as usize];
    http::read_at(&frags, u64::from(e.body_offset), &mut body).expect("body inside the message");
    // Re-encode into fragments of another size.
    let mut out: Vec<Vec<u8>> = msg.chunks(cap % 7 + 1).map(|c| vec![0u8; c.len()]).collect();
    if out.is_empty() {
        out.push(Vec::new());
    }
    let mut hs = Vec::new();
    let spec = e.spec(&mut hs);
    let off = http::encode_head(&mut out, &spec, e.body_offset - e.head_len, e.body_len).expect("re-encodes");
    assert_eq!(off, e.body_offset);
    http::write_at(&mut out, u64::from(off), &body).expect("body fits");
    let again = http::decode(&out).expect("re-encoded envelope decodes");
    assert_eq!(again, e);
    let mut body_again = vec![0u8; body.len()];
    http::read_at(&out, u64::from(again.body_offset), &mut body_again).expect("body inside the re-encoded message");
    assert_eq!(body_again, body, "the re-encoded message carries the same body bytes");
});
