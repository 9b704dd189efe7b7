//! The JSON mapping's encoders (every frame that carries a payload): any
//! payload bytes encode without a panic, and the frame decodes back to the
//! same bytes (the `data` / `text` / `data_b64` rule is lossless).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use switchboard_proto::json::{decode_server_frame, encode_message_frame, encode_server_frame};
use switchboard_proto::{Envelope, HistoryResult, Member, PresenceMembers, ServerFrame, server_frame};

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let e = Envelope { channel: "c".into(), payload: payload.clone(), ..Default::default() };
    let message = decode_server_frame(&encode_message_frame(&e)).expect("a message frame decodes");
    assert_eq!(message.frame, Some(server_frame::Frame::Message(e.clone())));
    let frames = [
        ServerFrame {
            req: 1,
            frame: Some(server_frame::Frame::History(HistoryResult {
                channel: "c".into(),
                messages: vec![e],
                ..Default::default()
            })),
        },
        ServerFrame {
            req: 2,
            frame: Some(server_frame::Frame::Presence(PresenceMembers {
                channel: "c".into(),
                members: vec![Member { client_id: "m".into(), data: payload, ..Default::default() }],
            })),
        },
    ];
    for f in frames {
        let text = encode_server_frame(&f);
        assert_eq!(decode_server_frame(&text).expect("a frame decodes"), f);
    }
});
