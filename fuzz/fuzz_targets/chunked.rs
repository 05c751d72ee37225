//! Property: a byte stream fed in arbitrary chunks to `tern::wire::Deframer`
//! yields the same frames and the same first error (or the same partial frame
//! left at the end) as `decode_frame` walking the whole stream, and the
//! deframer never buffers more than one frame. Checked with the server's
//! default `max_frame` and with a small one that inputs can exceed. The
//! input's first byte says how many chunk-size bytes follow; the rest is the
//! stream (see `tern_fuzz::split_chunked_input`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{
    chunks, read_chunked, read_whole, split_chunked_input, MAX_FRAME, SMALL_MAX_FRAME,
};

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = split_chunked_input(data);
    for max_frame in [MAX_FRAME, SMALL_MAX_FRAME] {
        let whole = read_whole(stream, max_frame);
        let chunked = read_chunked(chunks(sizes, stream), max_frame);
        assert_eq!(
            chunked, whole,
            "max_frame {max_frame}, chunk sizes {sizes:?}"
        );
    }
});
