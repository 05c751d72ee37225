//! Framing: the cheap header [`check`], the body [`decode`]r and the [`encode`]r.
//!
//! ```text
//! frame  = kind:u8  len:u32(BE)  body[len]          header is 5 bytes
//! body   = field*
//! field  = tag:u8  flen:varint  value[flen]
//! varint = unsigned LEB128, 1..4 bytes, minimal     so flen < 2^28
//! ints   = big-endian, flen exactly 1/2/4/8 for u8/u16/u32/u64
//! ```
//!
//! `check` looks at the 5-byte header only, so an oversized frame is refused
//! before one byte of its body is buffered. `decode` then walks the body with a
//! bounded [`Reader`]: each field is read through a sub-reader limited to its
//! `flen`, so nothing can read past the field or the body, and nothing is
//! allocated: strings and payloads borrow from the body.

use super::frame::*;
use super::tags::{ErrorCode, FieldType, Kind, StatusCode, Tag};

/// Bytes in a frame header: kind (1) and body length (4).
pub const HEADER_LEN: usize = 5;

/// The largest value a 4-byte varint can carry.
pub const VARINT_MAX: u32 = (1 << 28) - 1;

/// What the header says about the bytes buffered so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// Not a whole frame yet: at least `needed` more bytes are required.
    Incomplete { needed: usize },
    /// The header announces a body larger than the limit; the body must not be read.
    TooLarge { len: u32 },
    /// The kind byte names no frame of protocol v1.
    UnknownKind(u8),
}

/// Why a body is not a valid frame. All of these are framing errors
/// (ERROR `PROTOCOL_ERROR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("field runs past the end of the frame")]
    Truncated,
    #[error("varint longer than 4 bytes")]
    VarintTooLong,
    #[error("varint not minimally encoded")]
    VarintNotMinimal,
    #[error("field {tag:?} has length {flen}, expected {expected}")]
    BadWidth {
        tag: Tag,
        flen: usize,
        expected: usize,
    },
    #[error("field {0:?} is not UTF-8")]
    BadUtf8(Tag),
}

/// A frame that cannot be put on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("field of {0} bytes exceeds the varint limit")]
    FieldTooLarge(usize),
    #[error("frame body of {0} bytes exceeds u32")]
    FrameTooLarge(usize),
}

/// Reads the header at the start of `buf`. Returns the whole frame's length
/// (header + body) once it is all buffered.
pub fn check(buf: &[u8], max_frame: u32) -> Result<usize, CheckError> {
    if buf.len() < HEADER_LEN {
        return Err(CheckError::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    }
    let kind = Kind(buf[0]);
    if kind.name().is_none() {
        return Err(CheckError::UnknownKind(buf[0]));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len > max_frame {
        return Err(CheckError::TooLarge { len });
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Err(CheckError::Incomplete {
            needed: total - buf.len(),
        });
    }
    Ok(total)
}

/// A cursor over a byte slice that never reads past its end.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over all of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next `n` bytes, or `Truncated` if fewer remain.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A reader over the next `n` bytes; this reader moves past them.
    pub fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        self.take(n).map(Reader::new)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// A minimal unsigned LEB128 of 1 to 4 bytes.
    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i > 0 && byte == 0 {
                    return Err(DecodeError::VarintNotMinimal);
                }
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong)
    }

    /// The rest of the bytes, which must be exactly `N` long.
    fn exact<const N: usize>(self, tag: Tag) -> Result<[u8; N], DecodeError> {
        self.buf.try_into().map_err(|_| DecodeError::BadWidth {
            tag,
            flen: self.buf.len(),
            expected: N,
        })
    }
}

/// Splits the first field off a body: (tag, value, rest).
pub(crate) fn split_field(body: &[u8]) -> Result<(Tag, &[u8], &[u8]), DecodeError> {
    let mut r = Reader::new(body);
    let tag = Tag(r.u8()?);
    let flen = r.varint()? as usize;
    let value = r.take(flen)?;
    Ok((tag, value, r.buf))
}

/// A field value checked against its tag's type.
#[derive(Clone, Copy)]
enum Value<'a> {
    Int(u64),
    Str(&'a str),
    Bytes(&'a [u8]),
    /// A tag this version does not know: skipped.
    Unknown,
}

fn field_value(tag: Tag, value: &[u8]) -> Result<Value<'_>, DecodeError> {
    let r = Reader::new(value);
    Ok(match tag.field_type() {
        None => Value::Unknown,
        Some(FieldType::U8) => Value::Int(u64::from(r.exact::<1>(tag)?[0])),
        Some(FieldType::U16) => Value::Int(u64::from(u16::from_be_bytes(r.exact(tag)?))),
        Some(FieldType::U32) => Value::Int(u64::from(u32::from_be_bytes(r.exact(tag)?))),
        Some(FieldType::U64) => Value::Int(u64::from_be_bytes(r.exact(tag)?)),
        Some(FieldType::Str) => {
            Value::Str(std::str::from_utf8(value).map_err(|_| DecodeError::BadUtf8(tag))?)
        }
        Some(FieldType::Bytes) => Value::Bytes(value),
    })
}

/// Decodes one frame body of the given kind. Repeated fields: the last wins,
/// except SEQ in ACK, which accumulates. Unknown tags are skipped; known tags
/// are checked (width, UTF-8) whatever the frame kind.
pub fn decode(kind: Kind, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let mut frame = empty_frame(kind, body)?;
    let mut r = Reader::new(body);
    while !r.is_empty() {
        let tag = Tag(r.u8()?);
        let flen = r.varint()? as usize;
        let value = field_value(tag, r.take(flen)?)?;
        assign(&mut frame, tag, value);
    }
    Ok(frame)
}

/// Decodes a whole frame (header included) from the front of `buf`, which must
/// already have passed [`check`]. Returns the frame and its total length.
pub fn decode_frame(buf: &[u8], max_frame: u32) -> Result<(Frame<'_>, usize), FrameError> {
    let total = check(buf, max_frame)?;
    let frame = decode(Kind(buf[0]), &buf[HEADER_LEN..total])?;
    Ok((frame, total))
}

/// Either stage of reading a frame failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    Check(CheckError),
    Decode(DecodeError),
}

impl From<CheckError> for FrameError {
    fn from(e: CheckError) -> Self {
        FrameError::Check(e)
    }
}

impl From<DecodeError> for FrameError {
    fn from(e: DecodeError) -> Self {
        FrameError::Decode(e)
    }
}

fn empty_frame(kind: Kind, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    Ok(match kind {
        Kind::HELLO => Frame::Hello(Hello::default()),
        Kind::SEND => Frame::Send(Send::default()),
        Kind::ACK => Frame::Ack(Ack {
            seqs: Seqs::Body(body),
        }),
        Kind::READ => Frame::Read(Read::default()),
        Kind::PING => Frame::Ping(Ping::default()),
        Kind::BYE => Frame::Bye,
        Kind::WELCOME => Frame::Welcome(Welcome::default()),
        Kind::STATUS => Frame::Status(Status::default()),
        Kind::MSG => Frame::Msg(Msg::default()),
        Kind::ERROR => Frame::Error(Error::default()),
        Kind::PONG => Frame::Pong(Pong::default()),
        Kind(other) => return Err(DecodeError::UnknownKind(other)),
    })
}

/// Puts one checked field into the frame, if the frame has a slot for it.
/// Integer narrowing cannot fail: `field_value` checked the width.
fn assign<'a>(frame: &mut Frame<'a>, tag: Tag, value: Value<'a>) {
    let int = match value {
        Value::Int(v) => Some(v),
        _ => None,
    };
    let s = match value {
        Value::Str(s) => Some(s),
        _ => None,
    };
    let u8v = int.map(|v| v as u8);
    let u16v = int.map(|v| v as u16);
    let u32v = int.map(|v| v as u32);
    match frame {
        Frame::Hello(f) => match tag {
            Tag::VERSION => f.version = u8v,
            Tag::TOKEN => f.token = s,
            Tag::CLIENT => f.client = s,
            Tag::KEEPALIVE => f.keepalive = u32v,
            _ => {}
        },
        Frame::Send(f) => match tag {
            Tag::ID => f.id = int,
            Tag::TO => f.to = s,
            Tag::GROUP => f.group = s,
            Tag::EXPIRY => f.expiry = u32v,
            Tag::TYPE => f.msg_type = u32v,
            Tag::PRIORITY => f.priority = u8v,
            Tag::FLAGS => f.flags = u32v,
            Tag::PAYLOAD => {
                if let Value::Bytes(b) = value {
                    f.payload = Some(b)
                }
            }
            _ => {}
        },
        // SEQs are read lazily from the body by `Seqs::Body`.
        Frame::Ack(_) | Frame::Bye => {}
        Frame::Read(f) => match tag {
            Tag::FROM => f.from = s,
            Tag::ID => f.id = int,
            Tag::GROUP => f.group = s,
            _ => {}
        },
        Frame::Ping(f) => {
            if tag == Tag::TIME {
                f.time = int
            }
        }
        Frame::Pong(f) => {
            if tag == Tag::TIME {
                f.time = int
            }
        }
        Frame::Welcome(f) => match tag {
            Tag::VERSION => f.version = u8v,
            Tag::ADDRESS => f.address = s,
            Tag::TIME => f.time = int,
            Tag::MAX_FRAME => f.max_frame = u32v,
            Tag::KEEPALIVE => f.keepalive = u32v,
            _ => {}
        },
        Frame::Status(f) => match tag {
            Tag::SEQ => f.seq = int,
            Tag::ID => f.id = int,
            Tag::TO => f.to = s,
            Tag::GROUP => f.group = s,
            Tag::MEMBER => f.member = s,
            Tag::STATUS => f.status = u8v.map(StatusCode),
            Tag::TIME => f.time = int,
            _ => {}
        },
        Frame::Msg(f) => match tag {
            Tag::SEQ => f.seq = int,
            Tag::FROM => f.from = s,
            Tag::GROUP => f.group = s,
            Tag::ID => f.id = int,
            Tag::TIME => f.time = int,
            Tag::TYPE => f.msg_type = u32v,
            Tag::PRIORITY => f.priority = u8v,
            Tag::FLAGS => f.flags = u32v,
            Tag::PAYLOAD => {
                if let Value::Bytes(b) = value {
                    f.payload = Some(b)
                }
            }
            _ => {}
        },
        Frame::Error(f) => match tag {
            Tag::CODE => f.code = u16v.map(ErrorCode),
            Tag::REASON => f.reason = s,
            _ => {}
        },
    }
}

/// Appends fields to a frame under construction in an output buffer.
struct Writer<'o> {
    out: &'o mut Vec<u8>,
}

impl Writer<'_> {
    fn varint(&mut self, mut v: u32) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.out.push(byte);
                return;
            }
            self.out.push(byte | 0x80);
        }
    }

    fn field(&mut self, tag: Tag, value: &[u8]) -> Result<(), EncodeError> {
        let flen = u32::try_from(value.len())
            .ok()
            .filter(|&n| n <= VARINT_MAX)
            .ok_or(EncodeError::FieldTooLarge(value.len()))?;
        self.out.push(tag.0);
        self.varint(flen);
        self.out.extend_from_slice(value);
        Ok(())
    }

    fn u8(&mut self, tag: Tag, v: Option<u8>) {
        if let Some(v) = v {
            self.out.extend_from_slice(&[tag.0, 1, v]);
        }
    }

    fn u16(&mut self, tag: Tag, v: Option<u16>) {
        if let Some(v) = v {
            self.out.extend_from_slice(&[tag.0, 2]);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn u32(&mut self, tag: Tag, v: Option<u32>) {
        if let Some(v) = v {
            self.out.extend_from_slice(&[tag.0, 4]);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn u64(&mut self, tag: Tag, v: Option<u64>) {
        if let Some(v) = v {
            self.out.extend_from_slice(&[tag.0, 8]);
            self.out.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn bytes(&mut self, tag: Tag, v: Option<&[u8]>) -> Result<(), EncodeError> {
        match v {
            Some(v) => self.field(tag, v),
            None => Ok(()),
        }
    }

    fn str(&mut self, tag: Tag, v: Option<&str>) -> Result<(), EncodeError> {
        self.bytes(tag, v.map(str::as_bytes))
    }
}

/// Appends the encoded frame to `out`; returns the number of bytes written.
/// Fields are written in the order of the frame tables of the spec; absent
/// (`None`) fields are left out. On error `out` is left as it was.
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>) -> Result<usize, EncodeError> {
    let start = out.len();
    out.push(frame.kind().0);
    out.extend_from_slice(&[0; 4]);
    let result = encode_body(frame, &mut Writer { out });
    if let Err(e) = result {
        out.truncate(start);
        return Err(e);
    }
    let body = out.len() - start - HEADER_LEN;
    let Ok(len) = u32::try_from(body) else {
        out.truncate(start);
        return Err(EncodeError::FrameTooLarge(body));
    };
    out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(out.len() - start)
}

fn encode_body(frame: &Frame<'_>, w: &mut Writer<'_>) -> Result<(), EncodeError> {
    match frame {
        Frame::Hello(f) => {
            w.u8(Tag::VERSION, f.version);
            w.str(Tag::TOKEN, f.token)?;
            w.str(Tag::CLIENT, f.client)?;
            w.u32(Tag::KEEPALIVE, f.keepalive);
        }
        Frame::Send(f) => {
            w.u64(Tag::ID, f.id);
            w.str(Tag::TO, f.to)?;
            w.str(Tag::GROUP, f.group)?;
            w.u32(Tag::EXPIRY, f.expiry);
            w.u32(Tag::TYPE, f.msg_type);
            w.u8(Tag::PRIORITY, f.priority);
            w.u32(Tag::FLAGS, f.flags);
            w.bytes(Tag::PAYLOAD, f.payload)?;
        }
        Frame::Ack(f) => {
            for seq in f.seqs.iter() {
                w.u64(Tag::SEQ, Some(seq));
            }
        }
        Frame::Read(f) => {
            w.str(Tag::FROM, f.from)?;
            w.u64(Tag::ID, f.id);
            w.str(Tag::GROUP, f.group)?;
        }
        Frame::Ping(Ping { time }) | Frame::Pong(Pong { time }) => w.u64(Tag::TIME, *time),
        Frame::Bye => {}
        Frame::Welcome(f) => {
            w.u8(Tag::VERSION, f.version);
            w.str(Tag::ADDRESS, f.address)?;
            w.u64(Tag::TIME, f.time);
            w.u32(Tag::MAX_FRAME, f.max_frame);
            w.u32(Tag::KEEPALIVE, f.keepalive);
        }
        Frame::Status(f) => {
            w.u64(Tag::SEQ, f.seq);
            w.u64(Tag::ID, f.id);
            w.str(Tag::TO, f.to)?;
            w.str(Tag::GROUP, f.group)?;
            w.str(Tag::MEMBER, f.member)?;
            w.u8(Tag::STATUS, f.status.map(|s| s.0));
            w.u64(Tag::TIME, f.time);
        }
        Frame::Msg(f) => {
            w.u64(Tag::SEQ, f.seq);
            w.str(Tag::FROM, f.from)?;
            w.str(Tag::GROUP, f.group)?;
            w.u64(Tag::ID, f.id);
            w.u64(Tag::TIME, f.time);
            w.u32(Tag::TYPE, f.msg_type);
            w.u8(Tag::PRIORITY, f.priority);
            w.u32(Tag::FLAGS, f.flags);
            w.bytes(Tag::PAYLOAD, f.payload)?;
        }
        Frame::Error(f) => {
            w.u16(Tag::CODE, f.code.map(|c| c.0));
            w.str(Tag::REASON, f.reason)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out).unwrap();
        out
    }

    #[test]
    fn spec_example_hello() {
        let bytes = [
            0x01, 0, 0, 0, 8, 0x0e, 0x01, 0x01, 0x0d, 0x03, b'a', b'b', b'c',
        ];
        let hello = Frame::Hello(Hello {
            version: Some(1),
            token: Some("abc"),
            ..Default::default()
        });
        assert_eq!(enc(&hello), bytes);
        assert_eq!(decode_frame(&bytes, 1024), Ok((hello, bytes.len())));
    }

    #[test]
    fn check_reads_only_the_header() {
        assert_eq!(
            check(&[0x02, 0, 0], 10),
            Err(CheckError::Incomplete { needed: 2 })
        );
        // A body of 2 GiB is refused from the header alone.
        assert_eq!(
            check(&[0x02, 0x80, 0, 0, 0], 1 << 20),
            Err(CheckError::TooLarge { len: 0x8000_0000 })
        );
        assert_eq!(
            check(&[0x02, 0, 0, 0, 3, 1], 10),
            Err(CheckError::Incomplete { needed: 2 })
        );
        assert_eq!(check(&[0x02, 0, 0, 0, 0], 10), Ok(5));
        assert_eq!(
            check(&[0x42, 0, 0, 0, 0], 10),
            Err(CheckError::UnknownKind(0x42))
        );
    }

    #[test]
    fn varints_must_be_minimal_and_short() {
        assert_eq!(Reader::new(&[0x05]).varint(), Ok(5));
        assert_eq!(Reader::new(&[0x80, 0x01]).varint(), Ok(128));
        assert_eq!(
            Reader::new(&[0xff, 0xff, 0xff, 0x7f]).varint(),
            Ok(VARINT_MAX)
        );
        assert_eq!(
            Reader::new(&[0x80, 0x00]).varint(),
            Err(DecodeError::VarintNotMinimal)
        );
        assert_eq!(
            Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x01]).varint(),
            Err(DecodeError::VarintTooLong)
        );
        assert_eq!(Reader::new(&[0x80]).varint(), Err(DecodeError::Truncated));
    }

    #[test]
    fn framing_errors() {
        // flen past the end of the body
        assert_eq!(
            decode(Kind::SEND, &[0x02, 0x05, b'a']),
            Err(DecodeError::Truncated)
        );
        // integer of the wrong width
        assert_eq!(
            decode(Kind::SEND, &[0x01, 0x02, 0, 1]),
            Err(DecodeError::BadWidth {
                tag: Tag::ID,
                flen: 2,
                expected: 8
            })
        );
        // string that is not UTF-8
        assert_eq!(
            decode(Kind::SEND, &[0x02, 0x01, 0xff]),
            Err(DecodeError::BadUtf8(Tag::TO))
        );
        // unknown frame kind
        assert_eq!(decode(Kind(0x07), &[]), Err(DecodeError::UnknownKind(0x07)));
        // a known tag is checked even where the frame has no slot for it
        assert_eq!(
            decode(Kind::PING, &[0x0e, 0x02, 0, 1]),
            Err(DecodeError::BadWidth {
                tag: Tag::VERSION,
                flen: 2,
                expected: 1
            })
        );
    }

    #[test]
    fn unknown_tags_are_skipped_and_last_wins() {
        let body = [
            0x7f, 0x02, 0xde, 0xad, // unknown tag, skipped
            0x02, 0x01, b'a', // TO a
            0x02, 0x01, b'b', // TO b: last wins
        ];
        let Frame::Send(send) = decode(Kind::SEND, &body).unwrap() else {
            panic!("not a SEND")
        };
        assert_eq!(send.to, Some("b"));
    }

    #[test]
    fn ack_seqs_repeat() {
        let seqs = [1u64, 2, u64::MAX];
        let ack = Frame::Ack(Ack {
            seqs: Seqs::List(&seqs),
        });
        let bytes = enc(&ack);
        let (frame, _) = decode_frame(&bytes, 1024).unwrap();
        let Frame::Ack(decoded) = frame else {
            panic!("not an ACK")
        };
        assert_eq!(decoded.seqs.iter().collect::<Vec<_>>(), seqs);
        assert_eq!(frame, ack);
    }

    #[test]
    fn every_frame_round_trips() {
        let payload = vec![7u8; 70_000];
        let frames = [
            Frame::Hello(Hello {
                version: Some(1),
                token: Some("tok"),
                client: Some("test/1"),
                keepalive: Some(30),
            }),
            Frame::Send(Send {
                id: Some(9),
                to: Some("bob"),
                group: None,
                expiry: Some(60),
                msg_type: Some(3),
                priority: Some(15),
                flags: Some(1),
                payload: Some(&payload),
            }),
            Frame::Read(Read {
                from: Some("alice"),
                id: Some(1),
                group: Some("g"),
            }),
            Frame::Ping(Ping { time: Some(5) }),
            Frame::Bye,
            Frame::Welcome(Welcome {
                version: Some(1),
                address: Some("alice"),
                time: Some(1),
                max_frame: Some(1 << 20),
                keepalive: Some(60),
            }),
            Frame::Status(Status {
                seq: Some(4),
                id: Some(9),
                to: Some("bob"),
                group: None,
                member: Some("m"),
                status: Some(StatusCode::READ),
                time: Some(77),
            }),
            Frame::Msg(Msg {
                seq: Some(1),
                from: Some("alice"),
                group: None,
                id: Some(2),
                time: Some(3),
                msg_type: Some(0),
                priority: Some(0),
                flags: Some(0x103),
                payload: Some(b""),
            }),
            Frame::Error(Error {
                code: Some(ErrorCode::SHUTDOWN),
                reason: Some("bye"),
            }),
            Frame::Pong(Pong { time: None }),
        ];
        for frame in &frames {
            let bytes = enc(frame);
            assert_eq!(
                decode_frame(&bytes, 1 << 20),
                Ok((frame.clone(), bytes.len()))
            );
        }
    }
}
