//! The Kafka listener's decoding of hostile bytes: a request frame (its
//! header, then its body at the version the header names, through the
//! `kafka-protocol` crate), and a produce request's record batches (CRC,
//! counts checked before anything is allocated for them, decompression
//! bounded). Neither may panic, hang, or allocate past what the bytes and
//! the bounds allow.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let bytes = Bytes::copy_from_slice(rest);
    if which & 1 == 0 {
        let _ = bida::kafka::decode_request(bytes);
    } else if let Ok(batches) = bida::kafka::records::decode_batches(bytes) {
        for b in &batches {
            assert!(b.records.len() <= bida::kafka::records::RECORDS_PER_BATCH_MAX as usize);
        }
    }
});
