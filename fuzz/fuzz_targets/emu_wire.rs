//! Bytes from a garbage or hostile peer of the emulated DOCA backend: RDMA
//! frame headers, RDMA connection blobs and mmap export blobs. Decoding
//! never panics, and whatever it accepts encodes back to the same bytes.
#![no_main]

use doca::emu_wire::{ConnBlob, FRAME_LEN, Frame, MmapBlob};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(&f.encode()[..], &data[..FRAME_LEN]);
        assert_eq!(Frame::decode(&f.encode()), Ok(f));
    }
    if let Ok(b) = ConnBlob::decode(data) {
        assert_eq!(&b.encode()[..], data);
    }
    if let Ok(b) = MmapBlob::decode(data) {
        assert_eq!(&b.encode()[..], data);
    }
});
