//! Frames on the socket: a 4-byte big-endian unsigned length, then that many bytes of body.

use std::io;

use tokio_util::codec::{LengthDelimitedCodec, LengthDelimitedCodecError};

/// The codec for sidebus frames, refusing bodies over `max_frame_bytes` before reading them.
///
/// The limit is checked on the length header, so an oversized frame is never allocated.
pub fn codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().big_endian().length_field_length(4).max_frame_length(max_frame_bytes).new_codec()
}

/// True when `e` is the codec's "frame over the limit" error (rather than an I/O failure).
pub fn is_frame_too_large(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use tokio_util::codec::Decoder;

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        let mut c = codec(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_u8(0x80);
        let err = c.decode(&mut buf).unwrap_err();
        assert!(is_frame_too_large(&err));
        assert!(buf.capacity() < 1 << 20, "the declared size must not be allocated");
    }

    #[test]
    fn a_frame_at_the_limit_is_read() {
        let mut c = codec(4);
        let mut buf = BytesMut::new();
        buf.put_u32(4);
        buf.put_slice(b"\x80\x80\x80\x80");
        assert_eq!(c.decode(&mut buf).unwrap().unwrap().len(), 4);
    }
}
