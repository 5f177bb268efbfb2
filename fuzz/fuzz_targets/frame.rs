//! The socket's front door: bytes as a client sends them, cut into reads of any size, through
//! the frame codec (4-byte length, then the body; bodies over the limit refused from the
//! header) and each whole frame parsed as a request, as a connection does.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sidebus_protocol::request::RequestFrame;
use tokio_util::codec::Decoder;

/// A small limit, so that over-limit frames are found quickly.
const MAX_FRAME: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else { return };
    let read = usize::from(cut).max(1);
    let mut codec = sidebus_protocol::codec::codec(MAX_FRAME);
    let mut buf = BytesMut::new();
    for chunk in input.chunks(read) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME);
                    let _ = RequestFrame::parse(frame.freeze());
                }
                Ok(None) => break,
                // The connection answers frame_too_large and closes: nothing more to read.
                Err(e) => {
                    assert!(sidebus_protocol::codec::is_frame_too_large(&e));
                    return;
                }
            }
        }
    }
});
