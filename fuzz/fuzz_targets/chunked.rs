//! Property: a byte stream fed in arbitrary chunks to a reader that buffers,
//! runs `check` and then `decode`, yields the same frames and the same final
//! error as decoding the whole stream at once. The input's first byte says how
//! many chunk-size bytes follow; the rest is the stream
//! (see `tern_fuzz::split_chunked_input`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{chunks, read_chunked, read_whole, split_chunked_input, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = split_chunked_input(data);
    let whole = read_whole(stream, MAX_FRAME);
    let chunked = read_chunked(chunks(sizes, stream), MAX_FRAME);
    assert_eq!(chunked, whole, "chunk sizes {sizes:?}");
});
