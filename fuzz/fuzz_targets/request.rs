//! One frame body parsed as a request (every op and its fields); a request that parses is
//! encoded again and must parse to the same op and id, as a client's encoding of it would.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sidebus_protocol::request::RequestFrame;

fuzz_target!(|data: &[u8]| {
    match RequestFrame::parse(Bytes::copy_from_slice(data)) {
        Ok(parsed) => {
            let op = parsed.request.op();
            let again = RequestFrame::parse(Bytes::from(parsed.encode())).expect("a parsed request encodes to one that parses");
            assert_eq!(again.request.op(), op);
            assert_eq!(again.id, parsed.id);
        }
        Err(e) => {
            // Every refusal says why.
            assert!(!e.message.is_empty());
        }
    }
});
