//! The HTTP/1.1 front door: any bytes a client sends before (or as) a
//! request head are classified without panicking — incomplete, hyper's, or
//! an SSE / long-poll request of the front door's, whose head lies within
//! the bytes read and whose query then parses or is refused as a stream
//! request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::edge::front::{Classified, MAX_HEAD, classify};
use switchboard_protocols::stream::{StreamLimits, StreamRequest};

fuzz_target!(|data: &[u8]| {
    match classify(data) {
        Classified::Partial => assert!(data.len() < MAX_HEAD, "a partial head under the limit"),
        Classified::Hyper => {}
        Classified::Ours { len, path, .. } => {
            assert!(len <= data.len(), "the head lies within the bytes read");
            let route = path.split('?').next().unwrap_or_default();
            assert!(route == "/v1/sse" || route == "/v1/poll", "only streams are the front door's: {path}");
            let query = path.split_once('?').map_or("", |(_, q)| q);
            let pairs: Vec<(String, String)> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let _ = StreamRequest::parse(&pairs, None, &StreamLimits::default());
        }
    }
});
