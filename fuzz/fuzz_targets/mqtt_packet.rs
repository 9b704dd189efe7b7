//! The MQTT decode-and-translate path: bytes from the network are decoded as
//! MQTT 3.1.1 or 5 (the first byte picks the version, or none to decode a
//! CONNECT first), packet after packet, and every PUBLISH is translated into
//! the core's publish request. Nothing may panic; a decoder that asks for
//! more bytes must not consume any.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_protocols::mqtt::codec::{self, Packet, Version};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut version = match mode % 3 {
        0 => None,
        1 => Some(Version::V4),
        _ => Some(Version::V5),
    };
    let mut buf = BytesMut::from(rest);
    for _ in 0..64 {
        let before = buf.len();
        match codec::decode(&mut buf, version, 64 * 1024) {
            Ok(Some(packet)) => {
                if let Packet::Connect(c) = &packet {
                    version = Some(c.version);
                }
                if let Packet::Publish(p) = &packet {
                    let _ = switchboard_protocols::mqtt::translate_publish(&p.topic, p);
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "incomplete decode consumed bytes");
                break;
            }
            Err(_) => break,
        }
    }
});
