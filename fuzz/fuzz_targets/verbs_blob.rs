//! Bytes a garbage or hostile peer can hand the `verbs` fabric backend as
//! its connection blob (they travel through the control plane). Decoding
//! never panics; whatever it accepts is a blob the backend can use (24-bit
//! QP number and PSN, a known path MTU, an address) and encodes back to
//! exactly the same bytes.
#![no_main]

use fabric::verbs_blob::{BLOB_LEN, VerbsBlob};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = VerbsBlob::decode(data) {
        assert_eq!(data.len(), BLOB_LEN);
        assert_eq!(&b.encode()[..], data, "one encoding per blob");
        assert!((2..1 << 24).contains(&b.qpn));
        assert!(b.psn < 1 << 24);
        assert!(b.lid != 0 || b.gid != [0; 16], "an addressable port");
        assert_eq!(VerbsBlob::decode(&b.encode()), Ok(b));
    }
});
