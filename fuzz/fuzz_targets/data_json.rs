//! An event's `data` as the schema check sees it: MessagePack to JSON (refusing what JSON cannot
//! hold, nesting bounded), and JSON that converts back to MessagePack and again to the same JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidebus::bus::schema::{to_json, to_msgpack};

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = to_json(data) {
        let packed = to_msgpack(&json);
        assert_eq!(to_json(&packed).expect("our own MessagePack converts"), json);
    }
});
