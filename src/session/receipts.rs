//! ACK and READ from the client: stored items go to the commit thread;
//! real-time ones are settled here, with live receipts to a connected sender.

use std::sync::Arc;

use super::{Active, Ctx, RETRY_MS};
use crate::admission::Summary;
use crate::commit::{Acked, Full, ReadTicket, Request};
use crate::directory::User;
use crate::store::record::encode_status;
use crate::store::{Item, ItemView, StatusView};
use crate::wire::{flags, is_valid_address, StatusCode};

/// Handles an ACK (and offers ACKs the commit queue refused earlier again).
/// A repeated ACK while the first is at the commit thread is not sent again:
/// a flood of ACKs costs no commit work. ACKs are never dropped: a full
/// commit queue keeps them for a retry (the event loop never blocks).
pub(super) fn ack(ctx: &mut Ctx<'_>, a: &mut Active, seqs: impl Iterator<Item = u64>) {
    let mut stored = a.user.take_unsent_acks();
    // ACKs kept after a failed write wait for their time (`User::ack_failed`
    // sets it before it keeps them, and it is read after taking them: the
    // `unsent_acks` lock orders the two, so an ACK kept just now is not
    // taken with an old time).
    if !stored.is_empty() && ctx.now < a.user.ack_retry_at() {
        a.user.keep_unsent_acks(std::mem::take(&mut stored));
    }
    {
        let mut inflight = a.user.inflight();
        for seq in seqs {
            if let Some(entry) = inflight.get_mut(&seq) {
                if !entry.acking {
                    entry.acking = true;
                    stored.push(Acked {
                        seq,
                        priority: entry.priority,
                        item: entry.item.clone(),
                    });
                }
            } else if let Some(item) = a.ephemeral.remove(&seq) {
                if let Some(ItemView::Msg(m)) = item.view() {
                    if m.flags & flags::DELIVERY_RECEIPT != 0 {
                        live_receipt(ctx, &a.user, m.from, m.id, m.group, StatusCode::DELIVERED);
                    }
                }
            }
        }
    }
    if stored.is_empty() {
        return;
    }
    let req = Request::Ack {
        user: a.user.clone(),
        items: stored,
    };
    if let Err(Full(req)) = ctx.env.submit(req) {
        if let Request::Ack { items, .. } = *req {
            a.user.keep_unsent_acks(items);
            a.retry_at = ctx.now + RETRY_MS;
        }
    }
}

/// Handles a READ: live for a real-time message delivered on this
/// connection, else through the commit thread (dropped if it is full: a READ
/// receipt is best effort, and the server never blocks a loop for one).
/// A READ naming no address or group that can exist is ignored here, before
/// anything is copied (the commit thread checks again where it builds the
/// keys), and so is one past the user's [`crate::commit::MAX_QUEUED_READS`]
/// at the commit thread.
pub(super) fn read(ctx: &mut Ctx<'_>, a: &mut Active, from: &str, id: u64, group: Option<&str>) {
    if !is_valid_address(from) || group.is_some_and(|g| !is_valid_address(g)) {
        return;
    }
    if a.ephemeral_reads.remove(&(Arc::from(from), id)) {
        live_receipt(ctx, &a.user, from, id, group, StatusCode::READ);
        return;
    }
    let Some(reader) = ReadTicket::take(&a.user) else {
        READS_OVER_QUOTA.note(ctx.now);
        return;
    };
    let req = Request::Read {
        reader,
        from: from.to_owned(),
        id,
        group: group.map(str::to_owned),
    };
    if ctx.env.submit(req).is_err() {
        READS_REFUSED.note(ctx.now);
    }
}

static READS_OVER_QUOTA: Summary =
    Summary::new("READ receipts dropped: the user had 4096 READs waiting for the commit thread");
static READS_REFUSED: Summary = Summary::new("READ receipts dropped: the commit queue was full");

/// Sends a memory-only STATUS (no SEQ) about message `id` (to `group`, if
/// set) to its sender, if the sender is connected.
fn live_receipt(
    ctx: &mut Ctx<'_>,
    recipient: &User,
    sender: &str,
    id: u64,
    group: Option<&str>,
    status: StatusCode,
) {
    if id == 0 {
        return;
    }
    let Some(sender) = ctx.env.directory().user(sender) else {
        return;
    };
    let Some(mb) = sender.mailbox() else { return };
    let status = Arc::new(Item {
        seq: 0,
        priority: 0,
        ephemeral: true,
        record: encode_status(&StatusView {
            time: ctx.now,
            expire_at: 0,
            id,
            status,
            to: if group.is_some() {
                ""
            } else {
                &recipient.address
            },
            group,
            member: group.map(|_| &*recipient.address),
        }),
        born_us: 0,
        pushed_us: Default::default(),
        group_ref: None,
        settle_hint: Default::default(),
    });
    if mb.push_live(status) {
        mb.wake();
    }
}
