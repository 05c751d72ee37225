//! Property: decoding arbitrary bytes never panics, and every frame that
//! decodes survives decode → encode → decode unchanged, in no more bytes than
//! it came in (see `tern_fuzz::decode_round_trip`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_fuzz::decode_round_trip(data, tern_fuzz::MAX_FRAME);
});
