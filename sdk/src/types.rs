//! The SDK's vocabulary: peers, directions, statuses, stored messages,
//! conversations, per-member statuses, drafts and paging.

use std::fmt;

use tern::wire::{flags, StatusCode};

/// Message TYPE of plain text (UTF-8 payload). The SDK gives TYPE no
/// meaning except [`TYPE_ATTACHMENT`]; apps use the rest as they like.
pub const TYPE_TEXT: u32 = 0;

/// Message TYPE of an attachment: the payload is the JSON of
/// [`crate::Attachment`] (see docs/sdk.md, "Attachment convention").
pub const TYPE_ATTACHMENT: u32 = 1;

/// Who a conversation is with: another user, or a group.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A 1:1 conversation with this user address.
    User(String),
    /// A group conversation.
    Group(String),
}

impl Peer {
    /// A 1:1 conversation with `address`.
    pub fn user(address: impl Into<String>) -> Peer {
        Peer::User(address.into())
    }

    /// A group conversation.
    pub fn group(name: impl Into<String>) -> Peer {
        Peer::Group(name.into())
    }

    /// The user address or group name.
    pub fn name(&self) -> &str {
        match self {
            Peer::User(s) | Peer::Group(s) => s,
        }
    }

    /// Whether this is a group.
    pub fn is_group(&self) -> bool {
        matches!(self, Peer::Group(_))
    }

    /// The `peer_kind` column: 0 = user, 1 = group.
    pub(crate) fn kind(&self) -> i64 {
        match self {
            Peer::User(_) => 0,
            Peer::Group(_) => 1,
        }
    }

    /// The inverse of ([`Peer::kind`], [`Peer::name`]).
    pub(crate) fn from_columns(kind: i64, name: String) -> Peer {
        if kind == 1 {
            Peer::Group(name)
        } else {
            Peer::User(name)
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::User(s) => write!(f, "{s}"),
            Peer::Group(s) => write!(f, "#{s}"),
        }
    }
}

/// Which way a stored message went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by this user (from this store's outbox).
    Outgoing,
    /// Received from someone else (or from this user's own address).
    Incoming,
}

/// Where a message stands. Outgoing messages move
/// `Uploading → Outbox → Sent → Delivered → Read`, or end in a failure;
/// incoming ones are `Received` until the app marks them read (`Read`).
/// Transitions only go forward (see [`Status::rank`]): a late or repeated
/// status never moves a message back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// An attachment is being uploaded; the message enters the outbox when
    /// the upload is done.
    Uploading,
    /// Queued locally, not yet accepted by the server.
    Outbox,
    /// The server stored it (fsync'd).
    Sent,
    /// The recipient's app stored and ACKed it (for a group: some member's).
    Delivered,
    /// The recipient read it; for an incoming message, the app marked it read.
    Read,
    /// Incoming and not yet marked read ("new").
    Received,
    /// A final failure; the code says which (INVALID_DEST, EXPIRED,
    /// TOO_LARGE, NOT_MEMBER, BAD_REQUEST, DELETED).
    Failed(StatusCode),
    /// The attachment could not be uploaded (the file is gone, unreadable,
    /// or the server refused it for good).
    UploadFailed,
}

impl Status {
    /// The `status` column.
    pub(crate) fn code(self) -> i64 {
        match self {
            Status::Outbox => 0,
            Status::Sent => 1,
            Status::Delivered => 2,
            Status::Read => 3,
            Status::Received => 16,
            Status::Uploading => 17,
            Status::UploadFailed => 128,
            Status::Failed(c) => i64::from(c.0),
        }
    }

    /// The inverse of [`Status::code`].
    pub(crate) fn from_code(code: i64) -> Status {
        match code {
            0 => Status::Outbox,
            1 => Status::Sent,
            2 => Status::Delivered,
            3 => Status::Read,
            16 => Status::Received,
            17 => Status::Uploading,
            128 => Status::UploadFailed,
            c => Status::Failed(StatusCode(u8::try_from(c).unwrap_or(0))),
        }
    }

    /// The local status a protocol status code leads to, if any: OVERLOADED
    /// (retry) and OFFLINE (real-time only) change nothing, and neither does
    /// a STATUS without a code (0). A progress code (below 64) this SDK does
    /// not know, a newer server's, counts as SENT: the server has the
    /// message (forward-only, it moves nothing back). Taken as failures,
    /// they ended the message, and 16 or 17 read back as RECEIVED or
    /// UPLOADING.
    pub(crate) fn from_wire(code: StatusCode) -> Option<Status> {
        match code {
            StatusCode::SENT => Some(Status::Sent),
            StatusCode::DELIVERED => Some(Status::Delivered),
            StatusCode::READ => Some(Status::Read),
            StatusCode::OVERLOADED | StatusCode::OFFLINE => None,
            StatusCode(0) => None,
            StatusCode(c) if c < 64 => Some(Status::Sent),
            c => Some(Status::Failed(c)),
        }
    }

    /// Order of the forward-only state machine: a status replaces another
    /// only if its rank is higher. Failures are final (highest).
    pub fn rank(self) -> u8 {
        match self {
            Status::Uploading | Status::Outbox | Status::Received => 0,
            Status::Sent => 1,
            Status::Delivered => 2,
            Status::Read => 3,
            Status::Failed(_) | Status::UploadFailed => 4,
        }
    }

    /// Whether the message will change no more (read, or failed).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Read | Status::Failed(_) | Status::UploadFailed
        )
    }
}

/// A message in the local store, either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Local id: the row's key, increasing in the order the store took
    /// messages in; the paging cursor of [`crate::Store::messages`].
    pub lid: i64,
    /// Sent or received.
    pub direction: Direction,
    /// The conversation: the other user (1:1) or the group.
    pub peer: Peer,
    /// The sender's address (incoming only; `None` for own messages).
    pub sender: Option<String>,
    /// The sender's 64-bit message id (never 0 for stored outgoing messages).
    pub id: u64,
    /// The delivery SEQ (incoming only).
    pub seq: Option<u64>,
    /// Application TYPE ([`TYPE_TEXT`], [`TYPE_ATTACHMENT`], or the app's).
    pub msg_type: u32,
    /// 0 (highest) … 15.
    pub priority: u8,
    /// EXPIRY asked for, seconds (outgoing; `None` = the server's default).
    pub expiry: Option<u32>,
    /// FLAGS: receipts asked for (outgoing), as delivered (incoming).
    pub flags: u32,
    /// Milliseconds since the epoch: when `send` queued it (outgoing), the
    /// server's TIME (incoming).
    pub time: u64,
    /// The payload.
    pub payload: Vec<u8>,
    /// Where it stands.
    pub status: Status,
    /// When the status last changed (ms since the epoch; the server's TIME
    /// for statuses it sent).
    pub status_time: u64,
}

impl Message {
    /// The payload as text, if it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The attachment this message carries, if it is one
    /// ([`TYPE_ATTACHMENT`] with a valid payload).
    pub fn attachment(&self) -> Option<crate::Attachment> {
        crate::Attachment::from_message(self)
    }

    /// Whether the sender asked for a READ receipt.
    pub fn wants_read_receipt(&self) -> bool {
        self.flags & flags::READ_RECEIPT != 0
    }
}

/// A conversation: one peer or group, its last message and unread count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// With whom.
    pub peer: Peer,
    /// The newest message, either way.
    pub last: Message,
    /// Incoming messages not yet marked read.
    pub unread: u64,
}

/// What one member of a group did with a group message this user sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's address.
    pub member: String,
    /// DELIVERED, READ, or a failure such as EXPIRED.
    pub status: Status,
    /// The server's TIME of that status.
    pub time: u64,
}

/// A message to send: built with [`Draft::text`] or [`Draft::new`], then
/// given to [`crate::Tern::send`] (stored, exactly once) or
/// [`crate::Tern::send_live`] (real-time or fire-and-forget, never stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    /// To whom.
    pub peer: Peer,
    /// The payload.
    pub payload: Vec<u8>,
    /// TYPE (default [`TYPE_TEXT`]).
    pub msg_type: u32,
    /// PRIORITY (default 0).
    pub priority: u8,
    /// EXPIRY seconds; `None` = the server's default. `Some(0)` is
    /// real-time: only [`crate::Tern::send_live`] takes it.
    pub expiry: Option<u32>,
    /// FLAGS; default DELIVERY_RECEIPT | READ_RECEIPT.
    pub flags: u32,
}

impl Draft {
    /// A message with an arbitrary payload.
    pub fn new(peer: Peer, payload: impl Into<Vec<u8>>) -> Draft {
        Draft {
            peer,
            payload: payload.into(),
            msg_type: TYPE_TEXT,
            priority: 0,
            expiry: None,
            flags: flags::SEND_DEFAULT,
        }
    }

    /// A text message.
    pub fn text(peer: Peer, text: &str) -> Draft {
        Draft::new(peer, text.as_bytes())
    }

    /// Sets TYPE.
    pub fn msg_type(mut self, t: u32) -> Draft {
        self.msg_type = t;
        self
    }

    /// Sets PRIORITY (0 highest … 15).
    pub fn priority(mut self, p: u8) -> Draft {
        self.priority = p;
        self
    }

    /// Sets EXPIRY, seconds.
    pub fn expiry(mut self, secs: u32) -> Draft {
        self.expiry = Some(secs);
        self
    }

    /// Which receipts to ask for.
    pub fn receipts(mut self, delivered: bool, read: bool) -> Draft {
        self.flags = if delivered {
            flags::DELIVERY_RECEIPT
        } else {
            0
        } | if read { flags::READ_RECEIPT } else { 0 };
        self
    }
}

/// A page of a conversation, newest first: up to `limit` messages older
/// than `before` (a [`Message::lid`]; `None` = from the newest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Only messages with a smaller local id.
    pub before: Option<i64>,
    /// At most this many.
    pub limit: u32,
}

impl Page {
    /// The newest `limit` messages.
    pub fn latest(limit: u32) -> Page {
        Page {
            before: None,
            limit,
        }
    }

    /// The page after (older than) `messages`, the page just read.
    pub fn next_after(self, messages: &[Message]) -> Option<Page> {
        let last = messages.last()?;
        Some(Page {
            before: Some(last.lid),
            limit: self.limit,
        })
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        let all = [
            Status::Uploading,
            Status::Outbox,
            Status::Sent,
            Status::Delivered,
            Status::Read,
            Status::Received,
            Status::UploadFailed,
            Status::Failed(StatusCode::EXPIRED),
            Status::Failed(StatusCode::INVALID_DEST),
        ];
        for s in all {
            assert_eq!(Status::from_code(s.code()), s);
        }
    }

    #[test]
    fn wire_statuses_map_forward_only() {
        assert_eq!(Status::from_wire(StatusCode::OVERLOADED), None);
        assert_eq!(Status::from_wire(StatusCode::OFFLINE), None);
        // A STATUS without a code; unknown progress codes.
        assert_eq!(Status::from_wire(StatusCode(0)), None);
        for c in [4, 16, 17, 63] {
            assert_eq!(Status::from_wire(StatusCode(c)), Some(Status::Sent), "{c}");
        }
        assert_eq!(
            Status::from_wire(StatusCode(72)),
            Some(Status::Failed(StatusCode(72)))
        );
        let order = [
            Status::Outbox,
            Status::Sent,
            Status::Delivered,
            Status::Read,
            Status::Failed(StatusCode::EXPIRED),
        ];
        for w in order.windows(2) {
            assert!(w[0].rank() < w[1].rank(), "{w:?}");
        }
    }
}
