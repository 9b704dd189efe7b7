//! JSON client frames (WebSocket `switchboard.v1.json`): any text decodes to a
//! frame or an error, never a panic; decoded frames re-encode losslessly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = switchboard_proto::json::decode_client_frame(text);
    // Server frames are decoded by clients (CLI, tests): same rule.
    let _ = switchboard_proto::json::decode_server_frame(text);
});
