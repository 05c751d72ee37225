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

/// Bytes a SEND or MSG body carries beside its PAYLOAD, at most: every
/// other field at its largest (two 255-byte addresses, SEQ, ID, TIME, TYPE,
/// PRIORITY, FLAGS, EXPIRY) with its tag and length, and the PAYLOAD's own
/// tag and length (566 bytes for a MSG), rounded up. A server whose
/// `max_payload` + this fits in `max_frame` never writes, and never refuses,
/// a frame over `max_frame` because of a PAYLOAD it accepted.
pub const MAX_ENVELOPE: u32 = 1024;

/// Whether `s` is a valid address or group name: 1–255 bytes of ASCII
/// letters, digits and `._@+-`.
pub fn is_valid_address(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest SEND and MSG around a PAYLOAD stay within MAX_ENVELOPE.
    #[test]
    fn the_envelope_bounds_send_and_msg() {
        let long = "a".repeat(255);
        let payload = vec![0u8; 70_000];
        let msg = Frame::Msg(Msg {
            seq: Some(u64::MAX),
            from: Some(&long),
            group: Some(&long),
            id: Some(u64::MAX),
            time: Some(u64::MAX),
            msg_type: Some(u32::MAX),
            priority: Some(15),
            flags: Some(u32::MAX),
            payload: Some(&payload),
        });
        let send = Frame::Send(Send {
            id: Some(u64::MAX),
            to: Some(&long),
            group: Some(&long),
            expiry: Some(u32::MAX),
            msg_type: Some(u32::MAX),
            priority: Some(15),
            flags: Some(u32::MAX),
            payload: Some(&payload),
        });
        for frame in [msg, send] {
            let mut out = Vec::new();
            encode(&frame, &mut out).unwrap();
            let body = out.len() - HEADER_LEN;
            assert!(body <= payload.len() + MAX_ENVELOPE as usize, "{body}");
        }
    }
}
