//! Typed frames of protocol v1. Strings and payloads borrow from the frame
//! body they were decoded from, so decoding allocates nothing.
//!
//! Every field is an `Option`: the decoder reports what was on the wire and the
//! session applies the defaults and the rules (a SEND without FLAGS means
//! `DELIVERY_RECEIPT | READ_RECEIPT`, and so on).

use super::tags::{ErrorCode, Kind, StatusCode, Tag};

/// One frame, client → server or server → client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello<'a>),
    Send(Send<'a>),
    Ack(Ack<'a>),
    Read(Read<'a>),
    Ping(Ping),
    Bye,
    Welcome(Welcome<'a>),
    Status(Status<'a>),
    Msg(Msg<'a>),
    Error(Error<'a>),
    Pong(Pong),
}

impl Frame<'_> {
    /// The frame's kind byte.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello(_) => Kind::HELLO,
            Frame::Send(_) => Kind::SEND,
            Frame::Ack(_) => Kind::ACK,
            Frame::Read(_) => Kind::READ,
            Frame::Ping(_) => Kind::PING,
            Frame::Bye => Kind::BYE,
            Frame::Welcome(_) => Kind::WELCOME,
            Frame::Status(_) => Kind::STATUS,
            Frame::Msg(_) => Kind::MSG,
            Frame::Error(_) => Kind::ERROR,
            Frame::Pong(_) => Kind::PONG,
        }
    }
}

/// HELLO: VERSION, TOKEN, CLIENT?, KEEPALIVE?
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello<'a> {
    pub version: Option<u8>,
    pub token: Option<&'a str>,
    pub client: Option<&'a str>,
    pub keepalive: Option<u32>,
}

/// SEND: ID?, TO | GROUP, EXPIRY?, TYPE?, PRIORITY?, FLAGS?, PAYLOAD?
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Send<'a> {
    pub id: Option<u64>,
    pub to: Option<&'a str>,
    pub group: Option<&'a str>,
    pub expiry: Option<u32>,
    pub msg_type: Option<u32>,
    pub priority: Option<u8>,
    pub flags: Option<u32>,
    pub payload: Option<&'a [u8]>,
}

/// ACK: SEQ+ (the one repeatable field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack<'a> {
    pub seqs: Seqs<'a>,
}

/// READ: FROM, ID, GROUP?
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Read<'a> {
    pub from: Option<&'a str>,
    pub id: Option<u64>,
    pub group: Option<&'a str>,
}

/// PING: TIME?
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ping {
    pub time: Option<u64>,
}

/// PONG: TIME? (echoes the PING's)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pong {
    pub time: Option<u64>,
}

/// WELCOME: VERSION, ADDRESS, TIME, MAX_FRAME, KEEPALIVE
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Welcome<'a> {
    pub version: Option<u8>,
    pub address: Option<&'a str>,
    pub time: Option<u64>,
    pub max_frame: Option<u32>,
    pub keepalive: Option<u32>,
}

/// STATUS: SEQ?, ID, TO | GROUP, MEMBER?, STATUS, TIME
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status<'a> {
    pub seq: Option<u64>,
    pub id: Option<u64>,
    pub to: Option<&'a str>,
    pub group: Option<&'a str>,
    pub member: Option<&'a str>,
    pub status: Option<StatusCode>,
    pub time: Option<u64>,
}

/// MSG: SEQ, FROM, GROUP?, ID, TIME, TYPE, PRIORITY, FLAGS, PAYLOAD
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Msg<'a> {
    pub seq: Option<u64>,
    pub from: Option<&'a str>,
    pub group: Option<&'a str>,
    pub id: Option<u64>,
    pub time: Option<u64>,
    pub msg_type: Option<u32>,
    pub priority: Option<u8>,
    pub flags: Option<u32>,
    pub payload: Option<&'a [u8]>,
}

/// ERROR: CODE, REASON
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Error<'a> {
    pub code: Option<ErrorCode>,
    pub reason: Option<&'a str>,
}

/// The SEQ list of an ACK: either the raw (already validated) body it was
/// decoded from, iterated lazily without allocating, or a list built by a sender.
#[derive(Clone, Copy)]
pub enum Seqs<'a> {
    /// A validated ACK body; iteration picks its SEQ fields.
    Body(&'a [u8]),
    /// SEQs given by the caller, for encoding.
    List(&'a [u64]),
}

impl<'a> Seqs<'a> {
    /// The SEQs in wire order.
    pub fn iter(&self) -> SeqIter<'a> {
        match *self {
            Seqs::Body(body) => SeqIter::Body(body),
            Seqs::List(list) => SeqIter::List(list.iter()),
        }
    }

    /// How many SEQs there are.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether the ACK names no SEQ at all.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

impl PartialEq for Seqs<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Seqs<'_> {}

impl std::fmt::Debug for Seqs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over [`Seqs`].
pub enum SeqIter<'a> {
    Body(&'a [u8]),
    List(std::slice::Iter<'a, u64>),
}

impl Iterator for SeqIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        match self {
            SeqIter::List(it) => it.next().copied(),
            SeqIter::Body(rest) => loop {
                // The body was validated by `decode`, so a malformed field here
                // cannot happen; stop rather than panic if it somehow does.
                let (tag, value, tail) = super::codec::split_field(rest).ok()?;
                *rest = tail;
                if tag == Tag::SEQ {
                    return value.try_into().ok().map(u64::from_be_bytes);
                }
            },
        }
    }
}
