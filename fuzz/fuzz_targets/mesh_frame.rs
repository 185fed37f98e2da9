//! Mesh control frames from any fabric peer: decoding never panics, and an
//! accepted frame re-encodes to exactly the bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::mesh::MeshMsg;

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, used)) = MeshMsg::decode(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        assert!(msg.encode(&mut out).is_ok());
        assert_eq!(&out[..], &data[..used]);
    }
});
