//! WebTransport stream bytes (`/v1/wt`): fed to the length-delimited frame
//! splitter in arbitrary pieces, every whole frame decoded as a protobuf
//! `ClientFrame`. Never a panic; an incomplete frame consumes nothing; a
//! frame is never longer than the limit; splitting does not depend on how
//! the bytes were cut.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_protocols::wt::codec::{FrameError, split_frame};

/// A small limit, so oversize frames are reached too.
const MAX: usize = 4096;

/// Splits `data` arriving in pieces of `step` bytes: the frames, then how
/// the framing ended (`None`: cleanly, at a frame boundary or mid-frame).
fn frames(data: &[u8], step: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in data.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match split_frame(&mut buf, MAX) {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX);
                    let _ = switchboard_proto::decode_client_frame(&body);
                    out.push(body.to_vec());
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "an incomplete frame consumes nothing");
                    break;
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else { return };
    let whole = frames(rest, rest.len());
    let cut = frames(rest, usize::from(step));
    assert_eq!(whole, cut, "framing must not depend on how the bytes arrive");
});
