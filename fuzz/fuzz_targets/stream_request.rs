//! SSE / long-poll requests: query pairs and cursors (`Last-Event-ID`) from
//! the network parse or are refused, never panic; a cursor that parses
//! encodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_protocols::cursor::Cursor;
use switchboard_protocols::stream::{StreamLimits, StreamRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Cursor::decode(text) {
        assert_eq!(Cursor::decode(&c.encode()).as_ref(), Ok(&c));
    }
    let (query, header) = text.split_once('\n').unwrap_or((text, ""));
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = StreamRequest::parse(&pairs, Some(header), &StreamLimits::default());
});
