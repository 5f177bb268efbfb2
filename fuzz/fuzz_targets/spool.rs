//! A spool segment as the disk may hold it after a crash or a bad sector: records read one after
//! another with their checks (length, checksum, sequence), and each record that passes turned
//! into its log row, as a flusher does after a restart.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidebus::backend::spool::segment::RecordReader;
use sidebus::bus::publish::record_of;

fuzz_target!(|data: &[u8]| {
    let mut reader = RecordReader::new(std::io::Cursor::new(data), 1);
    while let Ok(Ok(Some(record))) = reader.next_record() {
        let _ = record_of(&record);
    }
});
