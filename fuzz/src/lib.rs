//! The properties the wire codec is held to, written once and run twice: by the
//! libFuzzer targets in `fuzz_targets/` (nightly, coverage-guided) and by
//! `tests/wire_stress.rs` (stable, a fixed PRNG), which includes this file with
//! `#[path]`. It depends on `tern::wire` only.
//!
//! - [`decode_round_trip`]: decoding never panics, and every frame that decodes
//!   survives decode → encode → decode unchanged, in no more bytes.
//! - [`read_whole`] / [`read_chunked`]: a byte stream cut into arbitrary chunks
//!   and fed to `tern::wire::Deframer` (the production deframer, not a model)
//!   yields the same frames and the same first error as `decode_frame` walking
//!   the whole stream at once.
//! - [`seed_frames`] / [`seed_streams`]: the valid frames the fuzz corpora and
//!   the stress test's mutations start from.

use std::ops::ControlFlow;

use tern::wire::{
    check, decode_frame, encode, flags, Ack, CheckError, DeframeError, Deframer, ErrorCode, Frame,
    FrameError, Hello, Kind, Msg, Ping, Pong, Read, Send, Seqs, Status, StatusCode, Tag, Welcome,
    HEADER_LEN,
};

/// The `max_frame` the properties run with: the server's default, 1 MiB.
pub const MAX_FRAME: u32 = 1 << 20;

/// A limit the chunked property also runs with, so that inputs of a few KiB
/// reach `TooLarge` around real frames: the 200-byte-payload seeds are just
/// under it.
pub const SMALL_MAX_FRAME: u32 = 256;

/// Decodes frame after frame from the front of `data` and checks the round trip
/// of each one that decodes. A frame whose body is malformed is skipped (its
/// header already delimited it) so that one input reaches many frames; a header
/// that `check` refuses ends the walk. Returns how many frames decoded.
///
/// Panics if a decoded frame does not round-trip; never otherwise.
pub fn decode_round_trip(data: &[u8], max_frame: u32) -> usize {
    let mut rest = data;
    let mut scratch = Vec::new();
    let mut decoded = 0;
    while !rest.is_empty() {
        let total = match decode_frame(rest, max_frame) {
            Ok((frame, total)) => {
                assert!(
                    total <= rest.len(),
                    "frame of {total} bytes in {} buffered",
                    rest.len()
                );
                assert_round_trip(&frame, total, max_frame, &mut scratch);
                decoded += 1;
                total
            }
            Err(FrameError::Decode(_)) => match check(rest, max_frame) {
                Ok(total) => total,
                Err(e) => panic!("decode_frame failed in decode although check said {e:?}"),
            },
            Err(FrameError::Check(_)) => break,
        };
        rest = &rest[total..];
    }
    decoded
}

/// decode → encode → decode gives the same frame, the encoding is no longer
/// than the `raw_len` bytes the frame came from (unknown tags are dropped,
/// repeated fields collapse to the last), and it is canonical: encoding the
/// re-decoded frame gives the same bytes again.
fn assert_round_trip(frame: &Frame<'_>, raw_len: usize, max_frame: u32, out: &mut Vec<u8>) {
    out.clear();
    let written = match encode(frame, out) {
        Ok(n) => n,
        Err(e) => panic!("decoded frame does not encode ({e}): {frame:?}"),
    };
    assert_eq!(
        written,
        out.len(),
        "encode's count disagrees with its output"
    );
    assert!(
        written <= raw_len,
        "encoding grew from {raw_len} to {written} bytes: {frame:?}"
    );
    let again = match decode_frame(out, max_frame) {
        Ok((again, used)) => {
            assert_eq!(used, written, "re-decode used {used} of {written} bytes");
            again
        }
        Err(e) => panic!("encoding of {frame:?} does not decode: {e:?}\n{out:02x?}"),
    };
    assert_eq!(&again, frame, "decode → encode → decode changed the frame");
    let mut second = Vec::with_capacity(written);
    let _ = encode(&again, &mut second);
    assert_eq!(&second, out, "encoding is not canonical for {frame:?}");
}

/// What reading a byte stream gives, in order: the frames that decoded, then at
/// most one event that ends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A frame that decoded, as the bytes it encodes to. Frames are compared by
    /// their encoding because the deframer hands out a `Frame` and not its raw
    /// bytes; equal frames encode equally, and the `decode` target holds the
    /// encoding to decoding back to an equal frame.
    Frame(Vec<u8>),
    /// The first error; nothing after it is read.
    Error(DeframeError),
    /// The stream ended inside a frame, of which this many bytes had arrived.
    Partial(usize),
}

/// The reference reading: the whole stream is in memory, and `decode_frame`
/// walks it until the end or the first error. It shares no code with the
/// [`Deframer`] beyond `check` and `decode`.
pub fn read_whole(data: &[u8], max_frame: u32) -> Vec<Event> {
    let mut events = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        match decode_frame(rest, max_frame) {
            Ok((frame, total)) => {
                events.push(Event::Frame(encoded(&frame)));
                rest = &rest[total..];
            }
            Err(e) => {
                events.push(match e {
                    FrameError::Check(CheckError::Incomplete { .. }) => Event::Partial(rest.len()),
                    FrameError::Check(CheckError::TooLarge { len }) => {
                        Event::Error(DeframeError::TooLarge {
                            len,
                            max: max_frame,
                        })
                    }
                    FrameError::Check(CheckError::UnknownKind(kind)) => {
                        Event::Error(DeframeError::UnknownKind(kind))
                    }
                    FrameError::Decode(e) => Event::Error(DeframeError::Decode(Kind(rest[0]), e)),
                });
                break;
            }
        }
    }
    events
}

/// Reads the stream that `chunks` make up with `tern::wire::Deframer`, one
/// chunk at a time, as a connection does; must give what [`read_whole`] gives
/// for their concatenation.
///
/// Panics if the deframer ever holds more than one frame's worth of bytes, or
/// if after an error a later chunk yields a frame or a different error.
pub fn read_chunked<'c>(chunks: impl IntoIterator<Item = &'c [u8]>, max_frame: u32) -> Vec<Event> {
    let mut deframer = Deframer::new(max_frame);
    let mut events = Vec::new();
    let mut failed = None;
    for chunk in chunks {
        let fed = deframer.feed(chunk, |frame| {
            assert!(failed.is_none(), "a frame after the error {failed:?}");
            events.push(Event::Frame(encoded(&frame)));
            ControlFlow::Continue(())
        });
        match (fed, failed) {
            (Ok(_), None) => {}
            (Err(e), None) => failed = Some(e),
            (fed, Some(first)) => assert_eq!(fed, Err(first), "not poisoned by the first error"),
        }
        assert!(
            deframer.buffered() <= HEADER_LEN + max_frame as usize,
            "{} bytes buffered, max_frame {max_frame}",
            deframer.buffered()
        );
    }
    match failed {
        Some(e) => events.push(Event::Error(e)),
        None if deframer.buffered() > 0 => events.push(Event::Partial(deframer.buffered())),
        None => {}
    }
    events
}

/// Splits `stream` into chunks of the sizes `sizes` gives, cycled, each byte
/// meaning a size of 1 to 256. With no sizes, the stream is one chunk.
pub fn chunks<'s>(sizes: &'s [u8], mut stream: &'s [u8]) -> impl Iterator<Item = &'s [u8]> + 's {
    let mut next = 0;
    std::iter::from_fn(move || {
        if stream.is_empty() {
            return None;
        }
        let size = match sizes.get(next % sizes.len().max(1)) {
            Some(&s) => usize::from(s) + 1,
            None => stream.len(),
        };
        next += 1;
        let (chunk, tail) = stream.split_at(size.min(stream.len()));
        stream = tail;
        Some(chunk)
    })
}

/// Splits a `chunked` fuzz input into its chunk sizes and its stream: the first
/// byte `n` says how many size bytes follow (`n % 16 + 1`), the rest is the
/// stream.
pub fn split_chunked_input(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    rest.split_at((usize::from(n % 16) + 1).min(rest.len()))
}

/// A frame put together by hand, for what the encoder never writes (unknown
/// tags, repeated fields).
pub fn raw_frame(kind: Kind, fields: &[(Tag, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for &(tag, value) in fields {
        body.push(tag.0);
        let mut flen = value.len();
        while flen >= 0x80 {
            body.push((flen & 0x7f) as u8 | 0x80);
            flen >>= 7;
        }
        body.push(flen as u8);
        body.extend_from_slice(value);
    }
    let mut frame = vec![kind.0];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

fn encoded(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match encode(frame, &mut out) {
        Ok(_) => out,
        Err(e) => panic!("{frame:?} does not encode: {e}"),
    }
}

/// One valid frame of every kind and a few shapes worth starting from, each
/// with the name of its seed file in `fuzz/corpus/decode/`.
pub fn seed_frames() -> Vec<(&'static str, Vec<u8>)> {
    let payload_200 = [0x5au8; 200];
    vec![
        // The example of the spec, §6.
        (
            "hello-spec",
            encoded(&Frame::Hello(Hello {
                version: Some(1),
                token: Some("abc"),
                ..Default::default()
            })),
        ),
        (
            "hello-full",
            encoded(&Frame::Hello(Hello {
                version: Some(1),
                token: Some("s3cr3t-t0ken"),
                client: Some("tern-client/0.1"),
                keepalive: Some(30),
            })),
        ),
        (
            "send",
            encoded(&Frame::Send(Send {
                id: Some(42),
                to: Some("bob@example.org"),
                expiry: Some(3600),
                msg_type: Some(7),
                priority: Some(3),
                flags: Some(flags::DELIVERY_RECEIPT),
                payload: Some(b"hello, bob"),
                ..Default::default()
            })),
        ),
        (
            "send-group",
            encoded(&Frame::Send(Send {
                id: Some(43),
                group: Some("team.ops"),
                payload: Some(&payload_200),
                ..Default::default()
            })),
        ),
        (
            "ack-three",
            encoded(&Frame::Ack(Ack {
                seqs: Seqs::List(&[1 << 40, (1 << 40) + 1, u64::MAX]),
            })),
        ),
        (
            "read",
            encoded(&Frame::Read(Read {
                from: Some("alice"),
                id: Some(42),
                group: Some("team.ops"),
            })),
        ),
        (
            "ping",
            encoded(&Frame::Ping(Ping {
                time: Some(1_700_000_000_000),
            })),
        ),
        ("bye", encoded(&Frame::Bye)),
        (
            "welcome",
            encoded(&Frame::Welcome(Welcome {
                version: Some(1),
                address: Some("alice"),
                time: Some(1_700_000_000_000),
                max_frame: Some(MAX_FRAME),
                keepalive: Some(60),
            })),
        ),
        (
            "status-sent",
            encoded(&Frame::Status(Status {
                id: Some(42),
                to: Some("bob@example.org"),
                status: Some(StatusCode::SENT),
                time: Some(1_700_000_000_001),
                ..Default::default()
            })),
        ),
        (
            "status-delivered-group",
            encoded(&Frame::Status(Status {
                seq: Some((1 << 40) + 5),
                id: Some(43),
                group: Some("team.ops"),
                member: Some("carol"),
                status: Some(StatusCode::DELIVERED),
                time: Some(1_700_000_000_002),
                ..Default::default()
            })),
        ),
        (
            "msg",
            encoded(&Frame::Msg(Msg {
                seq: Some(1 << 40),
                from: Some("alice"),
                id: Some(42),
                time: Some(1_700_000_000_000),
                msg_type: Some(7),
                priority: Some(3),
                flags: Some(flags::DELIVERY_RECEIPT | flags::REDELIVERY),
                payload: Some(b"hello, bob"),
                ..Default::default()
            })),
        ),
        (
            "msg-group",
            encoded(&Frame::Msg(Msg {
                seq: Some((1 << 40) + 1),
                from: Some("alice"),
                group: Some("team.ops"),
                id: Some(43),
                time: Some(1_700_000_000_000),
                msg_type: Some(0),
                priority: Some(0),
                flags: Some(0),
                payload: Some(&payload_200),
            })),
        ),
        (
            "error",
            encoded(&Frame::Error(tern::wire::Error {
                code: Some(ErrorCode::REPLACED),
                reason: Some("logged in elsewhere"),
            })),
        ),
        ("pong-empty", encoded(&Frame::Pong(Pong { time: None }))),
        // What the encoder never writes: an unknown tag (skipped), a repeated
        // TO (the last wins) and a 2-byte varint length.
        (
            "send-unknown-repeated",
            raw_frame(
                Kind::SEND,
                &[
                    (Tag(0x7f), &[0xde, 0xad]),
                    (Tag::TO, b"a"),
                    (Tag::ID, &7u64.to_be_bytes()),
                    (Tag::TO, b"bob"),
                    (Tag::PAYLOAD, &payload_200),
                ],
            ),
        ),
        // ACK may carry fields besides SEQ; only the SEQs count.
        (
            "ack-mixed",
            raw_frame(
                Kind::ACK,
                &[
                    (Tag::SEQ, &9u64.to_be_bytes()),
                    (Tag::TIME, &1u64.to_be_bytes()),
                    (Tag(0x40), b""),
                    (Tag::SEQ, &8u64.to_be_bytes()),
                ],
            ),
        ),
    ]
}

/// Streams of several frames, each with the name of its seed file in
/// `fuzz/corpus/chunked/`, already in that target's input format (a count and
/// chunk sizes first, see [`split_chunked_input`]).
pub fn seed_streams() -> Vec<(&'static str, Vec<u8>)> {
    let frames = seed_frames();
    let all: Vec<u8> = frames.iter().flat_map(|(_, f)| f.iter().copied()).collect();
    let session: Vec<u8> = ["hello-spec", "send", "msg", "ack-three", "ping", "bye"]
        .iter()
        .flat_map(|name| {
            frames
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, f)| f.clone())
        })
        .flatten()
        .collect();
    let with = |sizes: &[u8], stream: &[u8]| {
        let mut input = vec![(sizes.len() - 1) as u8];
        input.extend_from_slice(sizes);
        input.extend_from_slice(stream);
        input
    };
    let mut cut = session.clone();
    cut.truncate(session.len() - 3);
    vec![
        // One byte at a time.
        ("session-bytewise", with(&[0], &session)),
        // Chunks of 1, 5, 4 and 256 bytes: headers split every way.
        ("session-mixed", with(&[0, 4, 3, 255], &session)),
        ("all-kinds-7", with(&[6], &all)),
        // The stream ends inside a frame: Incomplete.
        ("session-cut", with(&[2, 9], &cut)),
    ]
}
