//! Fuzzes the wire decoder: any byte stream must give messages or an error, never a panic, a
//! hang or an allocation beyond one frame. Decoded messages must re-encode to frames that decode
//! to the same message.
//!
//! Run: `cargo +nightly fuzz run frame_decoder` (from the repository root).

#![no_main]

use blksync::protocol::Msg;
use blksync::protocol::frame::read_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut buf = Vec::new();
    while let Ok(Some(kind)) = read_frame(&mut input, &mut buf) {
        if let Ok(msg) = Msg::decode(kind, &buf[1..]) {
            let frame = msg.encode();
            let mut again = Vec::new();
            let kind = read_frame(&mut &frame[..], &mut again).expect("re-read").expect("a frame");
            assert_eq!(Msg::decode(kind, &again[1..]).expect("re-decode"), msg);
        }
    }
});
