//! Queued items leaving the store: ACKed, expired, or deleted by an operator,
//! and the status each one owes its sender.
//!
//! | item  | Acked                                 | Expired / Deleted                  |
//! |-------|---------------------------------------|------------------------------------|
//! | MSG   | dedup → DELIVERED; STATUS if asked     | dedup → EXPIRED/DELETED; STATUS    |
//! | REF   | receipt → delivered; STATUS if asked   | receipt dropped; STATUS w/ MEMBER  |
//! | STATUS| —                                     | —                                  |
//!
//! A dedup record that already moved on (READ stays READ) owes nothing more,
//! except that an ACK of a redelivered message still owes DELIVERED.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::pass::{Pass, Refs};
use super::{Acked, Completion, MessageFilter};
use crate::directory::User;
use crate::store::keys::*;
use crate::store::record::{
    clear_bit, decode_item, decode_members, encode_status, GroupRef, Item, ItemView, StatusView,
    RECEIPT_DELIVERED, RECEIPT_QUEUED,
};
use crate::store::Result;
use crate::wire::{flags, StatusCode};

/// Why a queued item leaves the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// The recipient ACKed it: DELIVERED.
    Acked,
    /// Its EXPIRY passed: EXPIRED.
    Expired,
    /// An operator removed it: DELETED.
    Deleted,
}

impl Settle {
    /// The status the sender is owed.
    fn status(self) -> StatusCode {
        match self {
            Settle::Acked => StatusCode::DELIVERED,
            Settle::Expired => StatusCode::EXPIRED,
            Settle::Deleted => StatusCode::DELETED,
        }
    }

    /// Whether the sender gets that status without having asked for it
    /// (only DELIVERED is opt-in, with DELIVERY_RECEIPT).
    fn unasked(self) -> bool {
        self != Settle::Acked
    }
}

impl Pass<'_> {
    pub(super) fn ack(&mut self, user: &Arc<User>, items: &[Acked]) -> Result<()> {
        for a in items {
            let (seq, priority) = (a.seq, a.priority);
            let key = inbox_key(&user.address, priority, seq);
            self.then(Completion::Settled {
                user: user.clone(),
                seq,
                ack: true,
            });
            if self.inbox_deleted(&key) {
                continue; // settled earlier in this batch (or the one not yet written)
            }
            // The item as the session wrote it: a held share's bitmap says
            // whether it is still held, so the session's copy is as good as
            // the one in `User::shares` (and not another look-up).
            let item = match &a.item {
                Some(item) if item.seq == seq && item.priority == priority => Some(item.clone()),
                _ => user.share(priority, seq),
            };
            if let Some(item) = item.as_ref().filter(|i| is_held_share(i)) {
                if self.settle_held(user, key.clone(), item, Settle::Acked)? {
                    continue;
                }
                // Not held any more (its REF was written after a failed
                // write, or it expired): settled as stored, below.
            }
            match item.filter(|i| known(user, i)) {
                Some(item) => match item.stored_view() {
                    Some(view) => {
                        self.settle_view(user, key, seq, view, &item.record, Settle::Acked, None)?
                    }
                    None => self.settle_stored(user, key, seq, Settle::Acked)?,
                },
                None => self.settle_stored(user, key, seq, Settle::Acked)?,
            }
        }
        Ok(())
    }

    /// Settles `item`, a member's share of a group send held in memory
    /// (`directory::User::shares`), if the send's `held` bitmap still has
    /// it; whether it did. The bitmap, not the memory, decides: it is what
    /// the store has.
    fn settle_held(
        &mut self,
        user: &Arc<User>,
        key: Vec<u8>,
        item: &Item,
        how: Settle,
    ) -> Result<bool> {
        let Some(GroupRef {
            msgno,
            held: Some(i),
            ..
        }) = item.group_ref
        else {
            return Ok(false);
        };
        let held = self.is_held(msgno, i)?;
        if held {
            let Some(view) = item.stored_view() else {
                return Ok(false);
            };
            self.settle_view(user, key, item.seq, view, &item.record, how, Some(i))?;
        }
        // Settled here, or not held any more (its REF was stored after a
        // failed write): either way, memory forgets it.
        self.then(Completion::Unhold {
            user: user.clone(),
            priority: item.priority,
            seq: item.seq,
        });
        Ok(held)
    }

    /// Removes a queued item and stores the status its sender is owed.
    fn settle(&mut self, user: &Arc<User>, priority: u8, seq: u64, how: Settle) -> Result<()> {
        let key = inbox_key(&user.address, priority, seq);
        self.then(Completion::Settled {
            user: user.clone(),
            seq,
            ack: false,
        });
        self.settle_stored(user, key, seq, how)
    }

    /// Settles the item under `key` as the store has it.
    fn settle_stored(
        &mut self,
        user: &Arc<User>,
        key: Vec<u8>,
        seq: u64,
        how: Settle,
    ) -> Result<()> {
        let Some(record) = self.get_inbox(&key)? else {
            return Ok(()); // already gone (an expiry or an earlier ACK won)
        };
        let Some(view) = decode_item(&record) else {
            tracing::error!(user = %user.address, seq, "corrupt inbox record dropped");
            return self.delete_inbox(key);
        };
        self.settle_view(user, key, seq, view, &record, how, None)
    }

    /// Settles the item `view` (whose record is `record`) stored under `key`,
    /// or, `held`, the member's share held in memory with that bit in its
    /// send's `held` bitmap (the caller checked it is set).
    #[allow(clippy::too_many_arguments)]
    fn settle_view(
        &mut self,
        user: &Arc<User>,
        key: Vec<u8>,
        seq: u64,
        view: ItemView<'_>,
        record: &[u8],
        how: Settle,
        held: Option<u32>,
    ) -> Result<()> {
        if how != Settle::Acked {
            self.then(Completion::SettledOtherwise { user: user.clone() });
        }
        if !matches!(view, ItemView::Ref(r) if r.shared_expiry) {
            let entry = expiry_key(view.expire_at(), EXPIRE_ITEM, &key);
            self.batch.single_delete(CF_EXPIRY, &entry)?;
        }
        self.then(Completion::Queued {
            user: user.clone(),
            delta: -1,
        });
        match how {
            Settle::Acked if !matches!(view, ItemView::Status(_)) => self.cur_tally.delivered += 1,
            Settle::Expired => self.cur_tally.expired += 1,
            Settle::Acked | Settle::Deleted => {}
        }
        if how == Settle::Acked && self.c.retain_delivered {
            let kept = match view {
                ItemView::Msg(_) => Some(Arc::<[u8]>::from(record)),
                ItemView::Ref(r) => self.store().message(r.msgno)?,
                ItemView::Status(_) => None,
            };
            if let Some(kept) = kept {
                self.put_history(history_key(&user.address, seq), kept)?;
            }
        }
        match view {
            ItemView::Msg(m) if m.id != 0 => {
                let dkey = dedup_key(m.from, m.id);
                let owed = match self.get_dedup(&dkey)? {
                    // Only a message still queued moves on; READ stays READ.
                    Some(mut d) if d.status == StatusCode::SENT => {
                        d.status = how.status();
                        self.put_dedup(dkey, d)?;
                        true
                    }
                    Some(_) => how == Settle::Acked,
                    None => false,
                };
                let asked = how.unasked() || m.flags & flags::DELIVERY_RECEIPT != 0;
                if owed && asked {
                    let to = Some(&*user.address);
                    self.store_status(m.from, m.id, to, None, None, how.status())?;
                }
            }
            ItemView::Msg(_) | ItemView::Status(_) => {}
            ItemView::Ref(r) => {
                self.release_message(r.msgno, r.shared_expiry.then_some(r.expire_at), held)?;
                let receipt = member_receipt_key(r.from, r.id, &user.address);
                let member = Some(&*user.address);
                let group = Some(r.group);
                let asked = how.unasked() || r.flags & flags::DELIVERY_RECEIPT != 0;
                if r.id != 0 && how == Settle::Acked {
                    if r.flags & flags::READ_RECEIPT != 0 {
                        if let Some((seq, RECEIPT_QUEUED)) = self.get_receipt(&receipt)? {
                            self.put_receipt(receipt, seq, RECEIPT_DELIVERED)?;
                        }
                    }
                } else if r.id != 0 {
                    self.delete_receipt(receipt)?;
                }
                if r.id != 0 && asked {
                    self.store_status(r.from, r.id, None, group, member, how.status())?;
                }
            }
        }
        if held.is_some() {
            self.forget_held(key); // no REF to delete
            return Ok(());
        }
        self.delete_inbox(key)
    }

    /// One member's share fewer refers to a group message (member `held`'s
    /// share held in memory, or a REF); the last one deletes it (at the end
    /// of the batch: see [`Pass::release_refs`]).
    fn release_message(
        &mut self,
        msgno: u64,
        shared_at: Option<u64>,
        held: Option<u32>,
    ) -> Result<()> {
        let mut refs = self.refs(msgno)?;
        refs.count = refs.count.saturating_sub(1);
        if let Some(i) = held {
            clear_bit(&mut refs.held, i);
        }
        self.release_refs(msgno, refs, shared_at);
        Ok(())
    }

    /// A group send's shared expiry entry is due: every member's REF that
    /// is still queued expires, and the message goes.
    fn expire_group(&mut self, at: u64, msgno: &[u8]) -> Result<()> {
        let Ok(msgno) = msgno.try_into().map(u64::from_be_bytes) else {
            return Ok(());
        };
        let members = self.store().get(CF_MESSAGES, &message_members_key(msgno))?;
        let Some(members) = members else {
            return Ok(()); // every member ACKed it first
        };
        let Some((priority, members)) = decode_members(&members) else {
            tracing::error!(msgno, "corrupt member list of a group send dropped");
            self.release_refs(msgno, Refs::default(), Some(at));
            return Ok(());
        };
        let mut msg = None;
        for (i, (address, seq)) in (0u32..).zip(members) {
            let user = self.c.dir.any_user(address);
            if let Some(user) = &user {
                if self.is_held(msgno, i)? {
                    // Held in memory: the item as its session has it, or
                    // as the store can rebuild it.
                    let item = match user.share(priority, seq) {
                        Some(item) => item,
                        None => {
                            if msg.is_none() {
                                msg = self.store().message(msgno)?;
                            }
                            let Some(record) = msg.clone() else { continue };
                            Arc::new(Item::held(seq, priority, record, msgno, i))
                        }
                    };
                    self.settle_held_otherwise(user, &item, Settle::Expired)?;
                    continue;
                }
            }
            match user {
                Some(user) => self.settle(&user, priority, seq, Settle::Expired)?,
                None => {
                    // Only if it is there: a REF its member ACKed before is
                    // gone, perhaps by a plain Delete of an earlier version,
                    // which a SingleDelete must not meet.
                    let key = inbox_key(address, priority, seq);
                    if self.get_inbox(&key)?.is_some() {
                        self.delete_inbox(key)?;
                    }
                }
            }
        }
        // All its REFs were due at once: none is left, whatever the count says.
        self.release_refs(msgno, Refs::default(), Some(at));
        Ok(())
    }

    /// One expiry-index entry found due by the sweeper.
    pub(super) fn expire(&mut self, expiry: &[u8]) -> Result<()> {
        self.batch.single_delete(CF_EXPIRY, expiry)?;
        let Some((at, kind, key)) = parse_expiry_key(expiry) else {
            return Ok(());
        };
        match kind {
            EXPIRE_GROUP => self.expire_group(at, key)?,
            EXPIRE_ITEM => {
                let Some((address, priority, seq)) = parse_inbox_key(key) else {
                    return Ok(());
                };
                match self.c.dir.any_user(address) {
                    Some(user) => self.settle(&user, priority, seq, Settle::Expired)?,
                    None => self.delete_inbox(key.to_vec())?,
                }
            }
            // The send's record and, for a group send with READ_RECEIPT,
            // its member receipts.
            EXPIRE_DEDUP => self.forget_dedup(key, true, at)?,
            EXPIRE_DEDUP_ONLY => self.forget_dedup(key, false, at)?,
            _ => {}
        }
        Ok(())
    }

    /// Deletes a user's queued and retained messages that match `filter`.
    pub(super) fn delete_messages(
        &mut self,
        user: &Arc<User>,
        filter: &MessageFilter,
    ) -> Result<usize> {
        let mut n = 0;
        for key in self.store().inbox_keys(&user.address)? {
            let Some((_, priority, seq)) = parse_inbox_key(&key) else {
                continue;
            };
            let Some(value) = self.get_inbox(&key)? else {
                continue;
            };
            let hit = match decode_item(&value) {
                Some(ItemView::Msg(m)) => filter.matches(m.from, m.id, m.time),
                Some(ItemView::Ref(r)) => filter.matches(r.from, r.id, r.time),
                _ => false,
            };
            if hit {
                self.settle(user, priority, seq, Settle::Deleted)?;
                n += 1;
            }
        }
        for item in user.shares_after(&[0; PRIORITIES]) {
            let hit = match item.view() {
                Some(ItemView::Msg(m)) => filter.matches(m.from, m.id, m.time),
                _ => false,
            };
            if hit && self.settle_held_otherwise(user, &item, Settle::Deleted)? {
                n += 1;
            }
        }
        for (key, value) in self.history(&user.address)? {
            if let Some(ItemView::Msg(m)) = decode_item(&value) {
                if filter.matches(m.from, m.id, m.time) {
                    self.delete_history(key)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Deletes everything queued for a user.
    pub(super) fn purge(&mut self, user: &Arc<User>) -> Result<()> {
        for key in self.store().inbox_keys(&user.address)? {
            if let Some((_, priority, seq)) = parse_inbox_key(&key) {
                self.settle(user, priority, seq, Settle::Deleted)?;
            }
        }
        for item in user.shares_after(&[0; PRIORITIES]) {
            self.settle_held_otherwise(user, &item, Settle::Deleted)?;
        }
        Ok(())
    }

    /// Settles a held share other than by its ACK (expired, deleted);
    /// whether it was still queued.
    fn settle_held_otherwise(
        &mut self,
        user: &Arc<User>,
        item: &Item,
        how: Settle,
    ) -> Result<bool> {
        let key = inbox_key(&user.address, item.priority, item.seq);
        if self.inbox_deleted(&key) {
            return Ok(false);
        }
        self.then(Completion::Settled {
            user: user.clone(),
            seq: item.seq,
            ack: false,
        });
        self.settle_held(user, key, item, how)
    }

    /// Queues a STATUS for the sender `owner` of message `id`, about the
    /// recipient `to` or the `member` of `group`.
    pub(super) fn store_status(
        &mut self,
        owner: &str,
        id: u64,
        to: Option<&str>,
        group: Option<&str>,
        member: Option<&str>,
        status: StatusCode,
    ) -> Result<()> {
        let Some(owner) = self.c.dir.user(owner) else {
            return Ok(());
        };
        let seq = owner.next_seq();
        let expire_at = self.now.saturating_add(u64::from(self.c.max_expiry) * 1000);
        let record = encode_status(&StatusView {
            time: self.now,
            expire_at,
            id,
            status,
            to: to.unwrap_or(""),
            group,
            member,
        });
        let key = inbox_key(&owner.address, 0, seq);
        self.batch.put(CF_INBOX, &key, &record)?;
        self.batch
            .put(CF_EXPIRY, &expiry_key(expire_at, EXPIRE_ITEM, &key), &[])?;
        self.then(Completion::Queued {
            user: owner.clone(),
            delta: 1,
        });
        self.then(Completion::Push {
            user: owner,
            item: Arc::new(Item {
                seq,
                priority: 0,
                ephemeral: false,
                record,
                born_us: 0,
                pushed_us: Default::default(),
                group_ref: None,
                settle_hint: Default::default(),
            }),
        });
        Ok(())
    }
}

/// Whether `item` is a member's share of a group send that was held in
/// memory when it was written.
fn is_held_share(item: &Item) -> bool {
    item.group_ref.is_some_and(|g| g.held.is_some())
}

/// Whether the item an ACK settles, as its session wrote it, is certainly
/// still stored: handed to the mailbox right after it was written, and no
/// settlement of the user's items but ACKs since. An ACK of the same item
/// twice is stopped by the session: its in-flight entry is marked `acking`
/// when the first ACK request is built, and the first settlement removes
/// the entry, which only a new write puts back, with the item as read then
/// (no hint). Within the batch and the one being written, `inbox_deleted`
/// stops it too. A batch that expires or deletes items is completed (its
/// settle counts raised) before the batch after it is built (see
/// `commit::Pipeline`): a count that lagged would let an ACK built later
/// settle an item twice.
///
/// A share that was held in memory when it was written is never "known":
/// it had no REF then (if it has one now, it was written later).
fn known(user: &User, item: &Item) -> bool {
    if is_held_share(item) {
        return false;
    }
    let hint = item.settle_hint.load(Ordering::Relaxed);
    let settles = user.other_settles.load(Ordering::Relaxed);
    hint != 0 && hint == settles + 1
}
