//! Control frames from any peer: decoding never panics, and an accepted
//! frame re-encodes to exactly the bytes it was decoded from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::CtrlFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = CtrlFrame::decode(data) {
        assert!(used <= data.len());
        let mut out = vec![0u8; used];
        assert_eq!(frame.encode(&mut out), Ok(used));
        assert_eq!(&out[..], &data[..used]);
    }
});
