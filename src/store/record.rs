//! Value layouts of the `inbox` and `dedup` column families, and [`Item`], the
//! one in-memory form of a queued delivery (the same bytes are written to
//! RocksDB and handed to the recipient's mailbox: no second copy).
//!
//! ```text
//! item (inbox value), kind = 1 (MSG):
//!   kind:u8 time:u64 expire_at:u64 id:u64 type:u32 flags:u32
//!   flen:u8 from  glen:u8 group  payload (rest of the value)
//! item, kind = 2 (STATUS about a message this user sent):
//!   kind:u8 time:u64 expire_at:u64 id:u64 status:u8
//!   tlen:u8 to  glen:u8 group  mlen:u8 member
//! item, kind = 3 (REF: one member's share of a group send):
//!   kind:u8 time:u64 expire_at:u64 id:u64 flags:u32 msgno:u64
//!   flen:u8 from  glen:u8 group
//!   (the MSG record itself, payload included, is stored once under `msgno`)
//! item, kind = 4 (REF sharing its group send's expiry entry): as kind 3
//!   (kind 3 REFs, written by earlier versions, each have an expiry entry of their own)
//! members of a group send (messages cf, `msgno 0x02`):
//!   prio:u8 (alen:u8 address seq:u64)*
//! references to a group send (messages cf, `msgno 0x01`):
//!   count:u32 [held:bitmap]
//!   count: the members whose share is still queued (a REF, or held in memory);
//!   held (absent in values of earlier versions, and once every bit is clear):
//!   bit i (byte i / 8, bit i % 8) set while member i of the member list has
//!   its share in memory only, with no REF in its inbox (`directory::User::shares`)
//! member receipt (dedup cf):
//!   seq:u64 state:u8 (0 queued, 1 delivered, 2 read)
//! dedup value:
//!   status:u8 flags:u32 priority:u8 seq:u64 time:u64 expire_at:u64 rlen:u8 recipient
//!   until:u64 (absent in records of earlier versions, which have an expiry entry)
//! ```
//!
//! `expire_at` is milliseconds since the Unix epoch; glen/mlen = 0 means absent.

use std::sync::Arc;

use crate::wire::StatusCode;

const KIND_MSG: u8 = 1;
const KIND_STATUS: u8 = 2;
const KIND_REF: u8 = 3;
const KIND_SHARED_REF: u8 = 4;

/// A queued delivery: a MSG or a STATUS for one recipient, with its SEQ.
#[derive(Debug)]
pub struct Item {
    /// The recipient's delivery sequence number; 0 for a live status (no SEQ).
    pub seq: u64,
    /// 0 (highest) … 15.
    pub priority: u8,
    /// Held in memory only (EXPIRY = 0 messages and their statuses): never in
    /// the store, forgotten on reconnect.
    pub ephemeral: bool,
    /// The encoded record (layout above): a MSG or a STATUS, never a REF. A
    /// group send's MSG record is one allocation shared by every member.
    pub record: Arc<[u8]>,
    /// For the stage histograms (`metrics::Stage`), on the monotonic clock
    /// (`clock::mono_us`): when its SEND was read (0: not timed, e.g. a
    /// status or an item read back from the store) ...
    pub born_us: u64,
    /// ... and when the commit thread put it in the recipient's mailbox.
    pub pushed_us: std::sync::atomic::AtomicU64,
    /// For a member's share of a group send (stored as a REF, `record` being
    /// the send's MSG): where the REF points.
    pub group_ref: Option<GroupRef>,
    /// Whether an ACK may settle the item without reading it back from the
    /// store. The commit thread sets it when it hands the item to a mailbox
    /// right after writing it: 1 + the user's count of settlements other
    /// than ACKs then (`directory::User::other_settles`). Only if that count
    /// has not moved since is the item certainly still stored when its ACK
    /// comes. 0 (items read from the store): read it back.
    pub settle_hint: std::sync::atomic::AtomicU64,
}

/// Where a member's REF points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupRef {
    /// Key of the shared MSG record in the `messages` cf.
    pub msgno: u64,
    /// See [`RefView::shared_expiry`].
    pub shared_expiry: bool,
    /// For a share held in memory only (no REF stored): the member's index
    /// in the send's member list, its bit in the `held` bitmap.
    pub held: Option<u32>,
}

/// A MSG as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgView<'a> {
    pub time: u64,
    pub expire_at: u64,
    pub id: u64,
    pub msg_type: u32,
    pub flags: u32,
    pub from: &'a str,
    pub group: Option<&'a str>,
    pub payload: &'a [u8],
}

/// A STATUS as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusView<'a> {
    pub time: u64,
    pub expire_at: u64,
    pub id: u64,
    pub status: StatusCode,
    pub to: &'a str,
    pub group: Option<&'a str>,
    pub member: Option<&'a str>,
}

/// A member's share of a group send, as stored in its inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefView<'a> {
    pub time: u64,
    pub expire_at: u64,
    pub id: u64,
    pub flags: u32,
    /// Key of the shared MSG record in the `messages` cf.
    pub msgno: u64,
    pub from: &'a str,
    pub group: &'a str,
    /// Whether its expiry entry is the group send's ([`EXPIRE_GROUP`]), one
    /// for every member, rather than one of its own.
    ///
    /// [`EXPIRE_GROUP`]: super::keys::EXPIRE_GROUP
    pub shared_expiry: bool,
}

/// A decoded item record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemView<'a> {
    Msg(MsgView<'a>),
    Status(StatusView<'a>),
    Ref(RefView<'a>),
}

impl ItemView<'_> {
    /// When the item expires (ms since the epoch).
    pub fn expire_at(&self) -> u64 {
        match self {
            ItemView::Msg(m) => m.expire_at,
            ItemView::Status(s) => s.expire_at,
            ItemView::Ref(r) => r.expire_at,
        }
    }
}

/// Encodes a REF record.
pub fn encode_ref(r: &RefView<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(39 + r.from.len() + r.group.len());
    out.push(if r.shared_expiry {
        KIND_SHARED_REF
    } else {
        KIND_REF
    });
    out.extend_from_slice(&r.time.to_be_bytes());
    out.extend_from_slice(&r.expire_at.to_be_bytes());
    out.extend_from_slice(&r.id.to_be_bytes());
    out.extend_from_slice(&r.flags.to_be_bytes());
    out.extend_from_slice(&r.msgno.to_be_bytes());
    push_str(&mut out, r.from);
    push_str(&mut out, r.group);
    out
}

/// The value under `msgno 0x01`: the count, then the `held` bitmap if any
/// bit is set.
pub fn encode_refs(count: u32, held: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + held.len());
    out.extend_from_slice(&count.to_be_bytes());
    if held.iter().any(|&b| b != 0) {
        out.extend_from_slice(held);
    }
    out
}

/// Decodes [`encode_refs`]: the count and the bitmap (empty if none).
pub fn decode_refs(value: &[u8]) -> Option<(u32, &[u8])> {
    let (count, held) = value.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*count), held))
}

/// Whether bit `i` of a `held` bitmap is set.
pub fn bit(bitmap: &[u8], i: u32) -> bool {
    let i = i as usize;
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Clears bit `i` of a `held` bitmap.
pub fn clear_bit(bitmap: &mut [u8], i: u32) {
    let i = i as usize;
    if let Some(b) = bitmap.get_mut(i / 8) {
        *b &= !(1 << (i % 8));
    }
}

/// Sets bit `i` of a `held` bitmap (which must be long enough).
pub fn set_bit(bitmap: &mut [u8], i: u32) {
    let i = i as usize;
    if let Some(b) = bitmap.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

/// Receipt state of one member for one group send: queued (written or not).
pub const RECEIPT_QUEUED: u8 = 0;
/// The member ACKed it.
pub const RECEIPT_DELIVERED: u8 = 1;
/// The member sent READ for it.
pub const RECEIPT_READ: u8 = 2;

/// Encodes a member receipt value.
pub fn encode_receipt(seq: u64, state: u8) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[..8].copy_from_slice(&seq.to_be_bytes());
    out[8] = state;
    out
}

/// Decodes a member receipt value: (seq, state).
pub fn decode_receipt(value: &[u8]) -> Option<(u64, u8)> {
    let mut c = Cursor(value);
    Some((c.u64()?, c.u8()?))
}

/// Encodes where a group send's REF items are: their priority, and each
/// member's address and SEQ.
pub fn encode_members<'a>(priority: u8, members: impl Iterator<Item = (&'a str, u64)>) -> Vec<u8> {
    let mut out = vec![priority];
    for (address, seq) in members {
        push_str(&mut out, address);
        out.extend_from_slice(&seq.to_be_bytes());
    }
    out
}

/// Decodes [`encode_members`]: the priority and the (address, SEQ) pairs.
pub fn decode_members(value: &[u8]) -> Option<(u8, Vec<(&str, u64)>)> {
    let mut c = Cursor(value);
    let priority = c.u8()?;
    let mut members = Vec::new();
    while !c.0.is_empty() {
        members.push((c.str()?, c.u64()?));
    }
    Some((priority, members))
}

impl Item {
    /// Member `i`'s share of group send `msgno` (whose MSG record is
    /// `record`), held in memory under (`priority`, `seq`).
    pub fn held(seq: u64, priority: u8, record: Arc<[u8]>, msgno: u64, i: u32) -> Item {
        Item {
            seq,
            priority,
            ephemeral: false,
            record,
            born_us: 0,
            pushed_us: Default::default(),
            group_ref: Some(GroupRef {
                msgno,
                shared_expiry: true,
                held: Some(i),
            }),
            settle_hint: Default::default(),
        }
    }

    /// Decodes the record; `None` only if the stored bytes are corrupt.
    pub fn view(&self) -> Option<ItemView<'_>> {
        decode_item(&self.record)
    }

    /// The item as the inbox stores it: the REF for a member's share of a
    /// group send, else the record itself.
    pub fn stored_view(&self) -> Option<ItemView<'_>> {
        match (self.view()?, self.group_ref) {
            (ItemView::Msg(m), Some(r)) => {
                Some(ItemView::Ref(m.group_ref(r.msgno, r.shared_expiry)?))
            }
            (view, _) => Some(view),
        }
    }
}

impl<'a> MsgView<'a> {
    /// The REF of a member's share of this group MSG, stored once under
    /// `msgno`; `None` if it is not a group MSG.
    pub fn group_ref(&self, msgno: u64, shared_expiry: bool) -> Option<RefView<'a>> {
        Some(RefView {
            time: self.time,
            expire_at: self.expire_at,
            id: self.id,
            flags: self.flags,
            msgno,
            from: self.from,
            group: self.group?,
            shared_expiry,
        })
    }
}

/// Encodes a MSG record.
pub fn encode_msg(m: &MsgView<'_>) -> Arc<[u8]> {
    let group = m.group.unwrap_or("");
    let mut out = Vec::with_capacity(35 + m.from.len() + group.len() + m.payload.len());
    out.push(KIND_MSG);
    out.extend_from_slice(&m.time.to_be_bytes());
    out.extend_from_slice(&m.expire_at.to_be_bytes());
    out.extend_from_slice(&m.id.to_be_bytes());
    out.extend_from_slice(&m.msg_type.to_be_bytes());
    out.extend_from_slice(&m.flags.to_be_bytes());
    push_str(&mut out, m.from);
    push_str(&mut out, group);
    out.extend_from_slice(m.payload);
    out.into()
}

/// Encodes a STATUS record.
pub fn encode_status(s: &StatusView<'_>) -> Arc<[u8]> {
    let group = s.group.unwrap_or("");
    let member = s.member.unwrap_or("");
    let mut out = Vec::with_capacity(29 + s.to.len() + group.len() + member.len());
    out.push(KIND_STATUS);
    out.extend_from_slice(&s.time.to_be_bytes());
    out.extend_from_slice(&s.expire_at.to_be_bytes());
    out.extend_from_slice(&s.id.to_be_bytes());
    out.push(s.status.0);
    push_str(&mut out, s.to);
    push_str(&mut out, group);
    push_str(&mut out, member);
    out.into()
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Addresses and group names are at most 255 bytes (validated on entry).
    let len = s.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&s.as_bytes()[..len]);
}

/// Reads fields off the front of a record, failing softly on short input.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
    fn str(&mut self) -> Option<&'a str> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?).ok()
    }
    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        self.str().map(|s| (!s.is_empty()).then_some(s))
    }
}

/// Decodes an item record.
pub fn decode_item(record: &[u8]) -> Option<ItemView<'_>> {
    let mut c = Cursor(record);
    let kind = c.u8()?;
    let time = c.u64()?;
    let expire_at = c.u64()?;
    let id = c.u64()?;
    match kind {
        KIND_MSG => Some(ItemView::Msg(MsgView {
            time,
            expire_at,
            id,
            msg_type: c.u32()?,
            flags: c.u32()?,
            from: c.str()?,
            group: c.opt_str()?,
            payload: c.0,
        })),
        KIND_REF | KIND_SHARED_REF => Some(ItemView::Ref(RefView {
            time,
            expire_at,
            id,
            flags: c.u32()?,
            msgno: c.u64()?,
            from: c.str()?,
            group: c.str()?,
            shared_expiry: kind == KIND_SHARED_REF,
        })),
        KIND_STATUS => Some(ItemView::Status(StatusView {
            time,
            expire_at,
            id,
            status: StatusCode(c.u8()?),
            to: c.str()?,
            group: c.opt_str()?,
            member: c.opt_str()?,
        })),
        _ => None,
    }
}

/// How long past its `until` a 1:1 send's record still SENT is kept (its
/// item not settled yet): a week. Only a server down for longer, or an
/// item whose recipient was removed without its queue, gets there.
pub const UNSETTLED_GRACE_MS: u64 = 7 * 24 * 3600 * 1000;

/// What the server remembers of an accepted SEND, keyed by (sender, ID): to
/// answer a duplicate with the latest status, and to route receipts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    /// The latest status: SENT while queued, then DELIVERED, READ, EXPIRED or DELETED.
    pub status: StatusCode,
    /// The SEND's FLAGS (which receipts the sender asked for).
    pub flags: u32,
    /// Where the item sits in the recipient's inbox.
    pub priority: u8,
    /// The recipient's SEQ for it.
    pub seq: u64,
    /// Server time of acceptance, ms.
    pub time: u64,
    /// When the queued item expires, ms.
    pub expire_at: u64,
    /// The recipient's address.
    pub recipient: String,
    /// When duplicate detection forgets the send, ms (never before the
    /// message's own expiry): from then on the record is gone once nothing
    /// needs it any more ([`Dedup::gone`]), and compaction drops it. 0:
    /// kept until its expiry entry deletes it (records of earlier
    /// versions, which did not store this).
    pub until: u64,
}

impl Dedup {
    /// Encodes the dedup value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(31 + self.recipient.len());
        out.push(self.status.0);
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.priority);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        out.extend_from_slice(&self.expire_at.to_be_bytes());
        push_str(&mut out, &self.recipient);
        if self.until != 0 {
            out.extend_from_slice(&self.until.to_be_bytes());
        }
        out
    }

    /// Whether the record is gone at `now_ms`: a look-up treats it as
    /// absent, and compaction drops it. That is once it is past `until`,
    /// unless it is a 1:1 send still SENT: then its item is still queued
    /// (the expiry sweep may be late, or the server was down), and the
    /// record stays to route the item's EXPIRED, DELIVERED or DELETED to
    /// the sender, for up to [`UNSETTLED_GRACE_MS`] more.
    pub fn gone(&self, now_ms: u64) -> bool {
        if self.until == 0 || self.until > now_ms {
            return false;
        }
        let settled = self.status != StatusCode::SENT || self.seq == 0;
        settled || self.until.saturating_add(UNSETTLED_GRACE_MS) <= now_ms
    }

    /// Decodes a dedup value; `None` if corrupt.
    pub fn decode(value: &[u8]) -> Option<Dedup> {
        let mut c = Cursor(value);
        Some(Dedup {
            status: StatusCode(c.u8()?),
            flags: c.u32()?,
            priority: c.u8()?,
            seq: c.u64()?,
            time: c.u64()?,
            expire_at: c.u64()?,
            recipient: c.str()?.to_owned(),
            until: if c.0.is_empty() { 0 } else { c.u64()? },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_round_trip() {
        let m = MsgView {
            time: 1,
            expire_at: 2,
            id: 3,
            msg_type: 4,
            flags: 5,
            from: "alice",
            group: None,
            payload: b"hello",
        };
        assert_eq!(decode_item(&encode_msg(&m)), Some(ItemView::Msg(m)));
        let g = MsgView {
            group: Some("team"),
            payload: b"",
            ..m
        };
        assert_eq!(decode_item(&encode_msg(&g)), Some(ItemView::Msg(g)));
    }

    #[test]
    fn status_round_trip() {
        let s = StatusView {
            time: 9,
            expire_at: 10,
            id: 11,
            status: StatusCode::DELIVERED,
            to: "bob",
            group: Some("g"),
            member: Some("carol"),
        };
        assert_eq!(decode_item(&encode_status(&s)), Some(ItemView::Status(s)));
        assert_eq!(decode_item(&[2, 0, 0]), None);
    }

    #[test]
    fn ref_and_receipt_round_trip() {
        let r = RefView {
            time: 1,
            expire_at: 2,
            id: 3,
            flags: 3,
            msgno: 1 << 41,
            from: "alice",
            group: "team",
            shared_expiry: false,
        };
        assert_eq!(decode_item(&encode_ref(&r)), Some(ItemView::Ref(r)));
        let shared = RefView {
            shared_expiry: true,
            ..r
        };
        assert_eq!(
            decode_item(&encode_ref(&shared)),
            Some(ItemView::Ref(shared))
        );
        assert_eq!(
            decode_receipt(&encode_receipt(9, RECEIPT_READ)),
            Some((9, RECEIPT_READ))
        );
    }

    #[test]
    fn members_round_trip() {
        let list = [("ann", 1u64 << 41), ("bob", 7)];
        let value = encode_members(3, list.iter().copied());
        assert_eq!(decode_members(&value), Some((3, list.to_vec())));
        assert_eq!(decode_members(&[3]), Some((3, vec![])));
        assert_eq!(decode_members(&value[..value.len() - 1]), None);
        assert_eq!(decode_members(&[]), None);
    }

    #[test]
    fn dedup_round_trip() {
        let d = Dedup {
            status: StatusCode::SENT,
            flags: 3,
            priority: 7,
            seq: 1 << 40,
            time: 5,
            expire_at: 6,
            recipient: "bob".into(),
            until: 0,
        };
        // A record without `until`, as earlier versions wrote them.
        assert_eq!(Dedup::decode(&d.encode()), Some(d.clone()));
        let d = Dedup { until: 9, ..d };
        assert_eq!(Dedup::decode(&d.encode()), Some(d.clone()));
        // A 1:1 send still SENT: its item may still be settled.
        assert!(!d.gone(9) && !d.gone(9 + UNSETTLED_GRACE_MS - 1));
        assert!(d.gone(9 + UNSETTLED_GRACE_MS));
        let delivered = Dedup {
            status: StatusCode::DELIVERED,
            ..d.clone()
        };
        assert!(!delivered.gone(8) && delivered.gone(9));
        let group = Dedup {
            seq: 0,
            ..d.clone()
        };
        assert!(!group.gone(8) && group.gone(9));
        assert!(!Dedup {
            until: 0,
            ..delivered
        }
        .gone(u64::MAX));
    }
}
