//! Deframing: a byte stream that arrives in chunks, cut into frames.
//!
//! A [`Deframer`] keeps only what has to outlive one chunk: the bytes of at
//! most one partial frame. A frame that lies whole in a fed chunk is decoded
//! straight from the caller's slice, so nothing is copied. Only a partial frame
//! at the end of a chunk is copied into the deframer. When the next chunk
//! arrives, the deframer appends just the bytes that complete that frame and
//! decodes it from its own buffer. The rest of the chunk is read in place again:
//!
//! ```text
//! chunk 1: [ a ][ b ][ c-        a, b decoded from chunk 1; "c-" copied
//! chunk 2: -c ][ d ][ e ][ f-    "-c" appended, c decoded from the copy;
//!                                d, e decoded from chunk 2; "f-" copied
//! ```
//!
//! The two phases of [`check`] and [`decode`] are kept. The 5-byte header is
//! checked as soon as it is there, so a body over `max_frame` or an unknown kind
//! is refused before any of the body is buffered. So the buffer never holds more
//! than one frame (`HEADER_LEN + max_frame` bytes). Once it is emptied, it gives
//! back any capacity over [`KEEP_CAPACITY`].
//!
//! The first error ends the stream: the deframer is then poisoned, and every
//! later call returns that error again. A server answers it with ERROR
//! ([`DeframeError::code`]) and closes the connection.
//!
//! There are two ways to call it, and one code path: [`Deframer::feed`] pushes
//! each frame of a chunk to a callback (an event loop), and
//! [`Deframer::next_frame`] pulls one frame at a time (a blocking client).
//! `feed` is a loop over `next_frame`.

use std::fmt;
use std::ops::ControlFlow;

use super::codec::{check, decode, CheckError, DecodeError, HEADER_LEN};
use super::frame::Frame;
use super::tags::{ErrorCode, Kind};

/// The buffer capacity kept for the next partial frame once the buffer is
/// empty: twice a 64 KiB socket read. Past this, the allocation is freed, so
/// one large frame does not pin its memory for the rest of the connection.
pub const KEEP_CAPACITY: usize = 2 * 64 * 1024;

/// Why a stream cannot be read any further. Every variant is a framing error,
/// and the peer is told so before the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeframeError {
    /// The header announces a body over `max`; none of the body was buffered.
    #[error("frame body of {len} bytes exceeds max_frame {max}")]
    TooLarge { len: u32, max: u32 },
    /// The kind byte names no frame of protocol v1. This is read from the header,
    /// before any of the body is buffered.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// The whole frame arrived, but its body does not decode.
    #[error("malformed {0} frame: {1}")]
    Decode(Kind, DecodeError),
}

impl DeframeError {
    /// The ERROR code to send before closing: `FRAME_TOO_LARGE` for an
    /// oversized body, `PROTOCOL_ERROR` otherwise.
    pub fn code(&self) -> ErrorCode {
        match self {
            DeframeError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            DeframeError::UnknownKind(_) | DeframeError::Decode(..) => ErrorCode::PROTOCOL_ERROR,
        }
    }
}

/// Cuts one connection's byte stream into frames; see the [module docs](self).
pub struct Deframer {
    /// The bytes of one partial frame, starting at its header. It is filled
    /// only up to the end of that frame, and only after `check` has accepted the
    /// header, so it never holds more than `HEADER_LEN + max_frame` bytes. Its
    /// capacity does not grow past the end of the frame either (see `hold`);
    /// between frames it keeps at most [`KEEP_CAPACITY`].
    held: Vec<u8>,
    /// `held` is a whole frame that `next_frame` already returned (the frame
    /// borrowed it, so it could not be cleared then). It is cleared on the
    /// next call.
    spent: bool,
    /// The largest body accepted, checked from the header.
    max_frame: u32,
    /// Whether the stream can still be read.
    state: State,
}

/// Whether the stream can still be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading frames.
    Open,
    /// A `feed` callback asked to stop, and the rest of that chunk was dropped.
    /// The position in the stream is lost, so input is now ignored.
    Stopped,
    /// The first error. Every later call returns it.
    Failed(DeframeError),
}

/// What `check` says about the front of a buffer, once refusals are errors.
enum Header {
    /// A whole frame of this many bytes, header included.
    Whole(usize),
    /// At least `needed` more bytes are required.
    Partial { needed: usize },
}

impl Deframer {
    /// A deframer at the start of a stream. It refuses bodies over `max_frame`.
    pub fn new(max_frame: u32) -> Self {
        Deframer {
            held: Vec::new(),
            spent: false,
            max_frame,
            state: State::Open,
        }
    }

    /// Feeds the next chunk of the stream and calls `on_frame` for each frame
    /// it completes, in stream order. Returns how many frames were handed to
    /// `on_frame`.
    ///
    /// When `on_frame` returns `ControlFlow::Break`, the rest of the chunk is
    /// dropped, because the caller is closing. Later feeds then yield nothing
    /// and return `Ok(0)`.
    ///
    /// On an error, the frames before it have already been handed to `on_frame`.
    /// A caller that must count them (metrics) counts in `on_frame`. The
    /// deframer is then poisoned: later calls return the same error at once.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_frame: impl FnMut(Frame<'_>) -> ControlFlow<()>,
    ) -> Result<usize, DeframeError> {
        let mut rest = chunk;
        let mut frames = 0;
        while let Some(frame) = self.next_frame(&mut rest)? {
            frames += 1;
            if on_frame(frame).is_break() {
                self.stop();
                break;
            }
        }
        Ok(frames)
    }

    /// Takes bytes from the front of `*chunk` until one frame is complete and
    /// returns that frame. `*chunk` is advanced past the bytes used. The frame
    /// borrows either `*chunk` (a frame that was whole in it) or the
    /// deframer (a frame that was completed from its buffer).
    ///
    /// `Ok(None)` means that all of `*chunk` was used up and no frame is
    /// complete. A partial frame is kept for the next call, or the chunk was
    /// dropped after a [`feed`](Self::feed) callback stopped the stream. Errors
    /// poison the deframer, as in `feed`.
    pub fn next_frame<'s, 'c: 's>(
        &'s mut self,
        chunk: &mut &'c [u8],
    ) -> Result<Option<Frame<'s>>, DeframeError> {
        if self.spent {
            self.spent = false;
            self.release();
        }
        match self.state {
            State::Open => {}
            State::Stopped => {
                *chunk = &[];
                return Ok(None);
            }
            State::Failed(e) => return Err(e),
        }
        if !self.held.is_empty() {
            return self.complete_held(chunk);
        }
        // The fast path: read from the caller's bytes in place.
        let bytes: &'c [u8] = chunk;
        match header(bytes, self.max_frame) {
            Ok(Header::Whole(total)) => {
                let (frame, rest) = bytes.split_at(total);
                *chunk = rest;
                decode_whole(frame, &mut self.state).map(Some)
            }
            Ok(Header::Partial { needed }) => {
                // If all 5 header bytes are here, `header` accepted them, so
                // this is at most one frame.
                self.hold(bytes, bytes.len() + needed);
                *chunk = &[];
                Ok(None)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Bytes of a partial frame held for the next chunk.
    pub fn buffered(&self) -> usize {
        if self.spent {
            0
        } else {
            self.held.len()
        }
    }

    /// Appends to `held` just the bytes that complete its frame (first the
    /// header, then, once `check` has accepted it, the body). Decodes the frame
    /// once it is whole.
    fn complete_held<'s>(
        &'s mut self,
        chunk: &mut &[u8],
    ) -> Result<Option<Frame<'s>>, DeframeError> {
        loop {
            match header(&self.held, self.max_frame) {
                Ok(Header::Whole(total)) => {
                    // Only `needed` bytes were ever appended, so `held` ends where
                    // the frame ends.
                    debug_assert_eq!(total, self.held.len(), "check overstated `needed`");
                    self.spent = true;
                    return decode_whole(&self.held, &mut self.state).map(Some);
                }
                Ok(Header::Partial { needed }) => {
                    if chunk.is_empty() {
                        return Ok(None);
                    }
                    let (head, tail) = chunk.split_at(needed.min(chunk.len()));
                    self.hold(head, self.held.len() + needed);
                    *chunk = tail;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Appends `bytes` to `held`. `end` is the length `held` will have once
    /// the frame (or, before its header is whole, the header) is complete.
    /// The capacity doubles as a `Vec`'s does, but it grows no further than
    /// `end`. So a frame of `max_frame` bytes does not leave a buffer of twice
    /// that size behind.
    fn hold(&mut self, bytes: &[u8], end: usize) {
        let len = self.held.len() + bytes.len();
        if len > self.held.capacity() {
            let capacity = (2 * self.held.capacity()).max(len).min(end);
            self.held.reserve_exact(capacity - self.held.len());
        }
        self.held.extend_from_slice(bytes);
    }

    /// Empties `held`, and frees it if it grew past [`KEEP_CAPACITY`].
    fn release(&mut self) {
        if self.held.capacity() > KEEP_CAPACITY {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
    }

    /// Poisons the stream with `e` and frees the buffer.
    fn fail(&mut self, e: DeframeError) -> DeframeError {
        self.state = State::Failed(e);
        self.held = Vec::new();
        self.spent = false;
        e
    }

    /// Stops reading for good (a callback asked to stop) and frees the buffer.
    fn stop(&mut self) {
        self.state = State::Stopped;
        self.held = Vec::new();
        self.spent = false;
    }
}

impl fmt::Debug for Deframer {
    /// The counts and the state. The bytes held are left out, because they
    /// may be a payload.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deframer")
            .field("buffered", &self.buffered())
            .field("max_frame", &self.max_frame)
            .field("state", &self.state)
            .finish()
    }
}

/// [`check`] on the front of `buf`. A refused header becomes an error.
fn header(buf: &[u8], max_frame: u32) -> Result<Header, DeframeError> {
    match check(buf, max_frame) {
        Ok(total) => Ok(Header::Whole(total)),
        Err(CheckError::Incomplete { needed }) => Ok(Header::Partial { needed }),
        Err(CheckError::TooLarge { len }) => Err(DeframeError::TooLarge {
            len,
            max: max_frame,
        }),
        Err(CheckError::UnknownKind(kind)) => Err(DeframeError::UnknownKind(kind)),
    }
}

/// Decodes `frame`, which is exactly one whole frame that `check` accepted.
/// If it is malformed, `state` is poisoned with the error. This takes `state`
/// rather than `&mut Deframer` so that the frame can go on borrowing `held`.
fn decode_whole<'b>(frame: &'b [u8], state: &mut State) -> Result<Frame<'b>, DeframeError> {
    let kind = Kind(frame[0]);
    decode(kind, &frame[HEADER_LEN..]).map_err(|e| {
        let e = DeframeError::Decode(kind, e);
        *state = State::Failed(e);
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_frame, encode, Ping, Send};

    /// The spec's example HELLO (`docs/protocol.md`): VERSION 1, TOKEN "abc".
    const HELLO: [u8; 13] = [
        0x01, 0, 0, 0, 8, 0x0e, 0x01, 0x01, 0x0d, 0x03, b'a', b'b', b'c',
    ];
    /// PING with TIME 7.
    const PING: [u8; 15] = [0x05, 0, 0, 0, 10, 0x0b, 0x08, 0, 0, 0, 0, 0, 0, 0, 7];
    /// BYE: a header and an empty body.
    const BYE: [u8; 5] = [0x06, 0, 0, 0, 0];
    /// SEND whose TO says 5 bytes when 1 is there (Truncated).
    const BAD_SEND: [u8; 8] = [0x02, 0, 0, 0, 3, 0x02, 0x05, b'a'];

    const MAX: u32 = 1 << 20;

    /// A frame as owned bytes (its encoding), so it can outlive the callback.
    /// Decoding is a function of the bytes, so equal frames give equal bytes.
    fn owned(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out).unwrap();
        out
    }

    fn send(id: u64, payload: &[u8]) -> Vec<u8> {
        owned(&Frame::Send(Send {
            id: Some(id),
            to: Some("bob"),
            payload: Some(payload),
            ..Default::default()
        }))
    }

    /// The frames of a stream of valid frames, by walking it with `decode_frame`.
    fn reference(mut stream: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while !stream.is_empty() {
            let (frame, total) = decode_frame(stream, MAX).unwrap();
            frames.push(owned(&frame));
            stream = &stream[total..];
        }
        frames
    }

    /// Feeds `chunks` in order and collects the frames.
    fn feed_all<'a>(
        d: &mut Deframer,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Vec<u8>>, DeframeError> {
        let mut frames = Vec::new();
        for chunk in chunks {
            d.feed(chunk, |f| {
                frames.push(owned(&f));
                ControlFlow::Continue(())
            })?;
            assert!(d.buffered() <= HEADER_LEN + d.max_frame as usize);
        }
        Ok(frames)
    }

    fn stream() -> Vec<u8> {
        [
            &HELLO[..],
            &send(1, b"hi"),
            &PING,
            &BYE,
            &send(2, &[9; 300]),
        ]
        .concat()
    }

    #[test]
    fn fixtures_decode_whole() {
        let mut d = Deframer::new(MAX);
        let mut frames = Vec::new();
        let all = [&HELLO[..], &PING, &BYE].concat();
        let n = d.feed(&all, |f| {
            frames.push(f.kind());
            if let Frame::Ping(p) = &f {
                assert_eq!(*p, Ping { time: Some(7) });
            }
            if let Frame::Hello(h) = &f {
                assert_eq!((h.version, h.token), (Some(1), Some("abc")));
            }
            ControlFlow::Continue(())
        });
        assert_eq!(n, Ok(3));
        assert_eq!(frames, [Kind::HELLO, Kind::PING, Kind::BYE]);
        assert_eq!(d.buffered(), 0);
        // An empty chunk is nothing.
        assert_eq!(d.feed(&[], |_| panic!("no frame")), Ok(0));
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        let mut header = vec![Kind::SEND.0];
        header.extend_from_slice(&1025u32.to_be_bytes());
        let mut d = Deframer::new(1024);
        // Byte by byte: nothing is refused before the header is whole, and
        // nothing of the body is ever asked for.
        for &b in &header[..4] {
            assert_eq!(d.feed(&[b], |_| panic!("no frame")), Ok(0));
        }
        assert_eq!(d.buffered(), 4);
        let e = d.feed(&header[4..], |_| panic!("no frame")).unwrap_err();
        assert_eq!(
            e,
            DeframeError::TooLarge {
                len: 1025,
                max: 1024
            }
        );
        assert_eq!(e.code(), ErrorCode::FRAME_TOO_LARGE);
        assert_eq!(
            e.to_string(),
            "frame body of 1025 bytes exceeds max_frame 1024"
        );
        assert_eq!(d.buffered(), 0);

        // In one chunk, with some of the body behind it: the same.
        let mut d = Deframer::new(1024);
        let mut chunk = header.clone();
        chunk.extend_from_slice(&[0; 100]);
        assert_eq!(d.feed(&chunk, |_| panic!("no frame")), Err(e));

        // At the limit exactly, the frame is read.
        let mut d = Deframer::new(10);
        assert_eq!(d.feed(&PING, |_| ControlFlow::Continue(())), Ok(1));
    }

    #[test]
    fn unknown_kind_is_refused_from_the_header_alone() {
        let mut d = Deframer::new(MAX);
        let e = d
            .feed(&[0x42, 0, 0, 0, 1], |_| panic!("no frame"))
            .unwrap_err();
        assert_eq!(e, DeframeError::UnknownKind(0x42));
        assert_eq!(e.code(), ErrorCode::PROTOCOL_ERROR);
        assert_eq!(e.to_string(), "unknown frame kind 0x42");
        // The kind byte alone is not enough: the length is checked with it.
        let mut d = Deframer::new(MAX);
        assert_eq!(d.feed(&[0x42], |_| panic!("no frame")), Ok(0));
    }

    #[test]
    fn a_malformed_body_is_an_error_with_its_kind() {
        let mut d = Deframer::new(MAX);
        let mut seen = 0;
        let chunk = [&PING[..], &BAD_SEND, &BYE].concat();
        let e = d
            .feed(&chunk, |_| {
                seen += 1;
                ControlFlow::Continue(())
            })
            .unwrap_err();
        // The PING before it was handed out; the BYE after it never is.
        assert_eq!(seen, 1);
        assert_eq!(e, DeframeError::Decode(Kind::SEND, DecodeError::Truncated));
        assert_eq!(e.code(), ErrorCode::PROTOCOL_ERROR);
        assert_eq!(
            e.to_string(),
            "malformed SEND frame: field runs past the end of the frame"
        );
    }

    #[test]
    fn poisoned_after_an_error() {
        for (bad, want) in [
            (
                &BAD_SEND[..],
                DeframeError::Decode(Kind::SEND, DecodeError::Truncated),
            ),
            (&[0x07, 0, 0, 0, 0][..], DeframeError::UnknownKind(0x07)),
            (
                &[0x02, 0, 0, 0, 9][..],
                DeframeError::TooLarge { len: 9, max: 8 },
            ),
        ] {
            // The error both in a chunk of its own and split off a held frame.
            for split in [0, 3] {
                let mut d = Deframer::new(8);
                assert_eq!(d.feed(&bad[..split], |_| panic!("no frame")), Ok(0));
                assert_eq!(d.feed(&bad[split..], |_| panic!("no frame")), Err(want));
                assert_eq!(d.feed(&BYE, |_| panic!("poisoned")), Err(want));
                assert_eq!(d.feed(&[], |_| panic!("poisoned")), Err(want));
                let mut rest = &BYE[..];
                assert_eq!(d.next_frame(&mut rest), Err(want));
                assert_eq!(d.buffered(), 0);
            }
        }
    }

    #[test]
    fn split_at_every_byte() {
        let stream = stream();
        let want = reference(&stream);
        for i in 0..=stream.len() {
            let mut d = Deframer::new(MAX);
            let got = feed_all(&mut d, [&stream[..i], &stream[i..]]).unwrap();
            assert_eq!(got, want, "split at {i}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let stream = stream();
        let mut d = Deframer::new(MAX);
        assert_eq!(
            feed_all(&mut d, stream.chunks(1)).unwrap(),
            reference(&stream)
        );
        assert_eq!(d.buffered(), 0);
        // A stream that ends inside a frame holds exactly what it has of it.
        let cut = &stream[..stream.len() - 7];
        let mut d = Deframer::new(MAX);
        feed_all(&mut d, cut.chunks(1)).unwrap();
        assert_eq!(d.buffered(), send(2, &[9; 300]).len() - 7);
    }

    #[test]
    fn a_held_frame_then_whole_frames_in_one_chunk() {
        let (a, b, c, e) = (
            send(1, b"aaaa"),
            send(2, b"bbbb"),
            send(3, b"cccc"),
            send(4, b"e"),
        );
        let mut d = Deframer::new(MAX);
        assert_eq!(d.feed(&a[..3], |_| panic!("not yet")), Ok(0));
        assert_eq!(d.held, a[..3]);
        // The rest of a, all of b and c, and the start of e.
        let chunk = [&a[3..], &b, &c, &e[..6]].concat();
        let range = chunk.as_ptr_range();
        let mut ids = Vec::new();
        let n = d.feed(&chunk, |f| {
            let Frame::Send(s) = f else {
                panic!("not a SEND")
            };
            // a was completed in the deframer's buffer; b and c are read in
            // place, from the caller's chunk.
            let in_chunk = range.contains(&s.payload.unwrap().as_ptr());
            ids.push((s.id.unwrap(), in_chunk));
            ControlFlow::Continue(())
        });
        assert_eq!(n, Ok(3));
        assert_eq!(ids, [(1, false), (2, true), (3, true)]);
        // Only e's start is held; a was dropped from the buffer.
        assert_eq!(d.held, e[..6]);
        assert_eq!(d.buffered(), 6);
    }

    #[test]
    fn completing_a_held_frame_appends_only_that_frame() {
        let (a, b) = (send(1, &[1; 100]), send(2, &[2; 100]));
        let mut d = Deframer::new(MAX);
        d.feed(&a[..2], |_| panic!("not yet")).unwrap();
        // Pull style: the chunk is consumed up to the end of a, no further.
        let chunk = [&a[2..], &b].concat();
        let mut rest = &chunk[..];
        let frame = d.next_frame(&mut rest).unwrap().unwrap();
        assert_eq!(owned(&frame), a);
        assert_eq!(rest, &b[..]);
        assert_eq!(d.held.len(), a.len());
        assert_eq!(d.buffered(), 0);
        let frame = d.next_frame(&mut rest).unwrap().unwrap();
        assert_eq!(owned(&frame), b);
        assert!(rest.is_empty());
        assert_eq!(d.next_frame(&mut rest), Ok(None));
        assert!(d.held.is_empty());
    }

    #[test]
    fn break_stops_the_stream() {
        let stream = stream();
        let mut d = Deframer::new(MAX);
        let mut kinds = Vec::new();
        let n = d.feed(&stream[..stream.len() - 3], |f| {
            kinds.push(f.kind());
            if f.kind() == Kind::SEND {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(n, Ok(2));
        assert_eq!(kinds, [Kind::HELLO, Kind::SEND]);
        // The rest of the chunk, and everything after, is dropped.
        assert_eq!(d.buffered(), 0);
        assert_eq!(
            d.feed(&stream[stream.len() - 3..], |_| panic!("stopped")),
            Ok(0)
        );
        assert_eq!(d.feed(&BYE, |_| panic!("stopped")), Ok(0));
        let mut rest = &BYE[..];
        assert_eq!(d.next_frame(&mut rest), Ok(None));
        assert!(rest.is_empty());
    }

    #[test]
    fn the_buffer_holds_at_most_one_frame_and_gives_memory_back() {
        let max = 1 << 20;
        let big = send(1, &vec![7; max as usize - 100]);
        assert!(big.len() <= HEADER_LEN + max as usize);
        let stream = [&big[..], &PING, &big, &BYE].concat();
        let mut d = Deframer::new(max);
        let mut frames = 0;
        for chunk in stream.chunks(1000) {
            d.feed(chunk, |_| {
                frames += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
            assert!(d.held.len() <= big.len());
            assert!(d.held.capacity() <= big.len(), "{}", d.held.capacity());
        }
        assert_eq!(frames, 4);
        // The last chunk ended with BYE, whole: the big buffer was freed.
        assert_eq!(d.buffered(), 0);
        assert!(d.held.capacity() <= KEEP_CAPACITY, "{}", d.held.capacity());

        // Small partial frames keep their allocation for reuse.
        let mut d = Deframer::new(max);
        d.feed(&PING[..4], |_| panic!("not yet")).unwrap();
        d.feed(&PING[4..], |_| ControlFlow::Continue(())).unwrap();
        assert!(d.held.is_empty() && d.held.capacity() > 0);
    }
}
