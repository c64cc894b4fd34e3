//! The frame decoder on any input, fed the way a socket delivers it: in
//! pieces of arbitrary sizes. It must never panic, and:
//!
//! - a verdict, once given on a prefix, never changes as more bytes arrive
//!   (the broker acts on the first verdict: it closes on an error and
//!   waits for `body_len` more bytes on a header);
//! - it asks for more bytes only while the 20-byte header is incomplete;
//! - a header it accepts announces at most FRAME_BYTES_MAX, and the frame
//!   it describes encodes back to exactly the bytes received.
#![no_main]

use bida::protocol::{frame, FRAME_BYTES_MAX, FRAME_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 23) + 1;
    let mut at = 0; // where the current frame starts in `stream`
    let mut have = 0; // bytes of the stream received so far
    while have < stream.len() {
        have = (have + chunk).min(stream.len());
        loop {
            let buf = &stream[at..have];
            let whole = frame::decode_header(&stream[at..]);
            match frame::decode_header(buf) {
                Ok(None) => {
                    assert!(
                        buf.len() < FRAME_HEADER_LEN,
                        "more bytes asked for a whole header"
                    );
                    break;
                }
                Err(e) => {
                    // More bytes would not have changed the verdict.
                    assert_eq!(Err(e), whole);
                    return;
                }
                Ok(Some(h)) => {
                    assert_eq!(Ok(Some(h)), whole, "the verdict changed with more bytes");
                    assert!(FRAME_HEADER_LEN - 4 + h.body_len <= FRAME_BYTES_MAX);
                    let end = at + FRAME_HEADER_LEN + h.body_len;
                    if end > have {
                        break; // the body is still on its way
                    }
                    let body = &stream[at + FRAME_HEADER_LEN..end];
                    let again = frame::encode(h.opcode, h.flags, h.correlation_id, body);
                    assert_eq!(
                        &again[..],
                        &stream[at..end],
                        "decode then encode changed the frame"
                    );
                    at = end;
                }
            }
        }
    }
});
