//! Protocol v1 on the wire: the tag table, typed frames and the codec.
//!
//! No I/O, no clock, no storage: this module builds without the `server`
//! feature, so the fuzz targets and codec benchmarks compile in seconds.
//!
//! - [`tags`]: frame kinds, field tags, status and error codes, FLAGS bits.
//! - [`frame`]: typed frames that borrow from the buffer they came from.
//! - [`codec`]: `check` (header only), `decode`, `encode`.
//! - [`deframe`]: a byte stream arriving in chunks, cut into frames; whole
//!   frames are decoded in place from the chunk, only a partial one is copied.

pub mod codec;
pub mod deframe;
pub mod frame;
pub mod tags;

pub use codec::{
    check, decode, decode_frame, encode, CheckError, DecodeError, EncodeError, FrameError,
    HEADER_LEN,
};
pub use deframe::{DeframeError, Deframer};
pub use frame::*;
pub use tags::{flags, ErrorCode, Kind, StatusCode, Tag};

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;

/// Whether `s` is a valid address or group name: 1–255 bytes of ASCII
/// letters, digits and `._@+-`.
pub fn is_valid_address(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}
