//! SEND and group SEND: duplicate detection, SEQ assignment, the inbox
//! item(s), the expiry entries and the dedup record, in one request.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::pass::{Pass, Refs};
use super::{Accept, Completion, GroupSendRequest, ReplyTo, SendRequest};
use crate::directory::{held_cost, User};
use crate::mailbox::Answer;
use crate::store::keys::*;
use crate::store::record::{
    encode_members, encode_ref, encode_refs, set_bit, Dedup, GroupRef, Item, RefView,
    RECEIPT_QUEUED,
};
use crate::store::Result;
use crate::wire::{flags, StatusCode};

/// Group shares one user may hold in memory (`directory::User::shares`);
/// beyond it (a member online but not reading), its shares are stored as
/// REFs. Exceeded by what the batches in the pipeline hold for the user
/// (their completions have not counted them yet); [`HELD_MAX_BYTES`] bounds
/// those too.
pub const HELD_PER_USER: usize = 4096;
/// Memory for group shares held, all users together, bytes
/// (`directory::held_cost`: each share counted with its whole MSG record,
/// though a send's members share one), with the shares of batches not yet
/// completed (`Directory::held_pending`). Beyond it, shares are stored as
/// REFs.
pub const HELD_MAX_BYTES: usize = 64 << 20;
/// The largest group send whose shares may be held (its `held` bitmap is
/// read and written whole per batch that settles one: at most 1 KiB).
pub const HELD_MAX_MEMBERS: usize = 8192;

impl Pass<'_> {
    /// Records an accepted SEND for duplicate detection until its
    /// `record.until`. A record with member receipts (`receipts`) gets an
    /// expiry entry, whose sweep deletes the receipts with it; any other is
    /// dropped by compaction once it is past `until` (and a look-up treats
    /// it as gone from then on): no expiry entry to write, sweep and delete.
    fn remember(&mut self, key: Vec<u8>, record: Dedup, receipts: bool) -> Result<()> {
        if receipts {
            let entry = expiry_key(record.until, EXPIRE_DEDUP, &key);
            self.batch.put(CF_EXPIRY, &entry, &[])?;
        }
        self.put_dedup(key, record)
    }

    /// Duplicate detection for a SEND with `id` from `sender`: a repeat is
    /// answered with the latest status and gives `None`; a first SEND gives
    /// `Some(key)`, the dedup key to record (`None` inside for ID 0, which is
    /// never deduplicated).
    fn first_time(
        &mut self,
        sender: &User,
        id: u64,
        conn: &ReplyTo,
        to: &Arc<str>,
        group: bool,
    ) -> Result<Option<Option<Vec<u8>>>> {
        if id == 0 {
            return Ok(Some(None));
        }
        let key = dedup_key(&sender.address, id);
        let Some(d) = self.get_dedup(&key)? else {
            return Ok(Some(Some(key)));
        };
        self.cur_tally.deduplicated += 1;
        self.then(Completion::Reply {
            conn: conn.clone(),
            answer: Answer {
                id,
                to: to.clone(),
                group,
                status: Some(d.status),
            },
        });
        Ok(None)
    }

    /// A new message while the disk is below `min_free_space`: OVERLOADED
    /// (the sender retries with the same ID), nothing written. A repeat of a
    /// stored one was answered before this, from its dedup record.
    fn refused_for_space(&mut self, req: &Accept, to: &Arc<str>, group: bool) -> bool {
        if !self.store().space_low() {
            return false;
        }
        self.cur_tally.refused_space += 1;
        self.answer(req, to.clone(), group, StatusCode::OVERLOADED);
        true
    }

    /// Answers the sender of `req` with `status` (nothing for ID 0: a
    /// fire-and-forget SEND gets no STATUS).
    fn answer(&mut self, req: &Accept, to: Arc<str>, group: bool, status: StatusCode) {
        self.then(Completion::Reply {
            conn: req.conn.clone(),
            answer: Answer {
                id: req.id,
                to,
                group,
                status: (req.id != 0).then_some(status),
            },
        });
    }

    /// The end of an accepted SEND: its dedup record (`seq` of the 1:1 item,
    /// 0 for a group), the count, and SENT for the sender (nothing for ID 0).
    fn accepted(
        &mut self,
        req: &Accept,
        dedup: Option<Vec<u8>>,
        seq: u64,
        to: Arc<str>,
        group: bool,
    ) -> Result<()> {
        #[cfg(test)]
        super::tests::fault_point(req.id)?;
        if let Some(key) = dedup {
            let record = Dedup {
                status: StatusCode::SENT,
                flags: req.flags,
                priority: req.priority,
                seq,
                time: req.time,
                expire_at: req.expire_at,
                recipient: to.to_string(),
                until: req.dedup_until,
            };
            let receipts = group && req.flags & flags::READ_RECEIPT != 0;
            self.remember(key, record, receipts)?;
        }
        self.cur_tally.accepted += 1;
        self.answer(req, to, group, StatusCode::SENT);
        Ok(())
    }

    /// Gives `user` the next SEQ and queues `stored` (the MSG record, or a
    /// group's REF: `group_ref`) under it, with its expiry entry unless it
    /// is a REF (which share their group send's); once the batch is
    /// written, the user's queue grows by one and a connected session gets
    /// the MSG record itself. Returns the SEQ.
    fn enqueue(
        &mut self,
        user: &Arc<User>,
        req: &Accept,
        stored: &[u8],
        group_ref: Option<GroupRef>,
    ) -> Result<u64> {
        let seq = user.next_seq();
        let held = group_ref.is_some_and(|g| g.held.is_some());
        if !held {
            let inbox = inbox_key(&user.address, req.priority, seq);
            self.batch.put(CF_INBOX, &inbox, stored)?;
            if group_ref.is_none() {
                let expiry = expiry_key(req.expire_at, EXPIRE_ITEM, &inbox);
                self.batch.put(CF_EXPIRY, &expiry, &[])?;
            }
        }
        self.then(Completion::Queued {
            user: user.clone(),
            delta: 1,
        });
        let item = Arc::new(Item {
            seq,
            priority: req.priority,
            ephemeral: false,
            record: req.record.clone(),
            born_us: req.read_us,
            pushed_us: Default::default(),
            group_ref,
            settle_hint: Default::default(),
        });
        let user = user.clone();
        self.then(if held {
            Completion::Hold { user, item }
        } else {
            Completion::Push { user, item }
        });
        Ok(seq)
    }

    /// Whether `user`'s share of a group send may be held in memory rather
    /// than stored as a REF: the user is online (so it is likely ACKed
    /// within moments, and its REF would be written and deleted again),
    /// and neither the user nor the server holds too many already.
    fn may_hold(&mut self, user: &User, record: &[u8]) -> bool {
        let cost = held_cost(record);
        if user.attached.load().is_none()
            || user.deleted.load(Ordering::Acquire)
            || user.held() >= HELD_PER_USER
            || self.c.dir.held_bytes.load(Ordering::Relaxed)
                + self.c.dir.held_pending.load(Ordering::Relaxed)
                + self.held_new
                + cost
                > HELD_MAX_BYTES
        {
            return false;
        }
        self.held_new += cost;
        true
    }

    pub(super) fn send(&mut self, send: &SendRequest) -> Result<()> {
        let SendRequest {
            accept: req,
            recipient,
        } = send;
        let to: Arc<str> = recipient.address.clone();
        let Some(dedup) = self.first_time(&req.sender, req.id, &req.conn, &to, false)? else {
            return Ok(());
        };
        if self.refused_for_space(req, &to, false) {
            return Ok(());
        }
        if recipient.deleted.load(Ordering::Acquire) {
            // Deleted since the SEND was accepted. The flag is set before
            // the purge is submitted, so an item queued now could come after
            // the purge and outlive the user: INVALID_DEST, as for a SEND
            // accepted after the delete. Nothing is written.
            self.answer(req, to, false, StatusCode::INVALID_DEST);
            return Ok(());
        }
        let seq = self.enqueue(recipient, req, &req.record, None)?;
        self.accepted(req, dedup, seq, to, false)
    }

    pub(super) fn group_send(&mut self, send: &GroupSendRequest) -> Result<()> {
        let req = &send.accept;
        let group = &send.group.name;
        let Some(dedup) = self.first_time(&req.sender, req.id, &req.conn, group, true)? else {
            return Ok(());
        };
        if self.refused_for_space(req, group, true) {
            return Ok(());
        }
        let recipients: Vec<&Arc<User>> = send.recipients().collect();
        let msgno = self.c.dir.next_msgno();
        let count = u32::try_from(recipients.len()).unwrap_or(u32::MAX);
        let reference = encode_ref(&RefView {
            time: req.time,
            expire_at: req.expire_at,
            id: req.id,
            flags: req.flags,
            msgno,
            from: &req.sender.address,
            group,
            shared_expiry: true,
        });
        let receipts = req.id != 0 && req.flags & flags::READ_RECEIPT != 0;
        let mut seqs = Vec::with_capacity(recipients.len());
        let may_hold = recipients.len() <= HELD_MAX_MEMBERS;
        let bitmap_len = if may_hold {
            recipients.len().div_ceil(8)
        } else {
            0
        };
        let mut held = vec![0u8; bitmap_len];
        for (i, &user) in (0u32..).zip(&recipients) {
            let hold = may_hold && self.may_hold(user, &req.record);
            if hold {
                set_bit(&mut held, i);
            }
            let group_ref = GroupRef {
                msgno,
                shared_expiry: true,
                held: hold.then_some(i),
            };
            let seq = self.enqueue(user, req, &reference, Some(group_ref))?;
            seqs.push(seq);
            if receipts {
                let key = member_receipt_key(&req.sender.address, req.id, &user.address);
                self.put_receipt(key, seq, RECEIPT_QUEUED)?;
            }
        }
        if count > 0 {
            // One record, one count, one member list and one expiry entry
            // for the whole send, however many members it has.
            self.batch
                .put(CF_MESSAGES, &message_key(msgno), &req.record)?;
            self.batch.put(
                CF_MESSAGES,
                &message_refs_key(msgno),
                &encode_refs(count, &held),
            )?;
            let members = recipients.iter().map(|u| &*u.address).zip(seqs);
            let members = encode_members(req.priority, members);
            self.batch
                .put(CF_MESSAGES, &message_members_key(msgno), &members)?;
            let entry = expiry_key(req.expire_at, EXPIRE_GROUP, &msgno.to_be_bytes());
            self.batch.put(CF_EXPIRY, &entry, &[])?;
            self.set_refs(
                msgno,
                Refs {
                    count,
                    held: held.into(),
                },
            );
        }
        self.accepted(req, dedup, 0, group.clone(), true)
    }
}
