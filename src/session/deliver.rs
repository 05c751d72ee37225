//! Deliveries: taking items from the mailbox and the store (see the module
//! doc of `session`), and writing them as MSG and STATUS frames within the
//! output buffer and the window.

use std::collections::hash_map::Entry;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Active, Ctx, STAGE_MAX};
use crate::directory::{Inflight, SEQ_BOOT_SHIFT};
use crate::mailbox::LIVE_CAPACITY;
use crate::store::keys::PRIORITIES;
use crate::store::{Item, ItemView};
use crate::wire::{self, flags, Frame};

/// Latencies sampled while writing deliveries, µs (at most [`SAMPLES`] of
/// each per call).
#[derive(Default)]
pub(super) struct Samples {
    /// From the message's TIME (ms resolution).
    pub delivery: Vec<u64>,
    /// `metrics::Stage::Write`: from the mailbox to the connection.
    pub write: Vec<u64>,
    /// `metrics::Stage::Total`: from the SEND's read.
    pub total: Vec<u64>,
}

/// Samples of each kind kept per call.
const SAMPLES: usize = 256;

impl Active {
    /// Writes as many deliveries as the output buffer and the window allow,
    /// recording a sample of their latencies.
    pub(super) fn pump(&mut self, ctx: &mut Ctx<'_>, samples: &mut Samples) {
        let config = ctx.env.config();
        let conn_buffer = config.conn_buffer;
        let window = config.max_inflight as usize;
        let boot = ctx.env.directory().boot;
        loop {
            if ctx.out.len() >= conn_buffer {
                return;
            }
            let more = self.take(ctx);
            let mut inflight = self.user.inflight();
            if self.mailbox.closed().is_some() {
                // Replaced (or shut): the in-flight entries are the next
                // connection's now, which took its `owed` under this lock
                // after the close; this one writes no more.
                return;
            }
            let mut wrote = false;
            // What earlier connections wrote and got no ACK for goes out
            // again first: those entries fill the window already, so the
            // window alone would hold them back for good.
            while ctx.out.len() < conn_buffer {
                let Some(item) = self.owed.pop_front() else {
                    break;
                };
                match inflight.get(&item.seq) {
                    None => continue, // settled meanwhile
                    // The client ACKed it: the ACK is at the commit thread,
                    // or kept for a retry (`User::ack_failed`).
                    Some(entry) if entry.acking => continue,
                    Some(_) => {}
                }
                let Some(view) = unexpired(&item, ctx.now) else {
                    continue;
                };
                write_item(ctx, &item, Some(view), true);
                wrote = true;
            }
            while ctx.out.len() < conn_buffer {
                let Some(entry) = self.staged.first_entry() else {
                    break;
                };
                let item = entry.get().clone();
                if item.ephemeral {
                    if self.ephemeral.len() >= window.min(LIVE_CAPACITY) {
                        break;
                    }
                    entry.remove();
                    self.staged_live -= 1;
                    let view = item.view();
                    write_item(ctx, &item, view, false);
                    if let Some(ItemView::Msg(m)) = view {
                        if m.id != 0 && m.flags & flags::READ_RECEIPT != 0 {
                            if self.ephemeral_reads.len() >= LIVE_CAPACITY {
                                self.ephemeral_reads.clear();
                            }
                            self.ephemeral_reads.insert((m.from.into(), m.id));
                        }
                    }
                    if item.seq != 0 {
                        self.ephemeral.insert(item.seq, item);
                    }
                    wrote = true;
                    continue;
                }
                if self.owed_seqs.remove(&item.seq) {
                    // Written from `owed` (or settled or expired since).
                    // The staged loop runs only once `owed` is written (the
                    // owed loop stops only when it is empty or the output
                    // full), so this copy never goes out first.
                    entry.remove();
                    continue;
                }
                // An item still in flight holds its slot already.
                if inflight.len() >= window && !inflight.contains_key(&item.seq) {
                    // Under the in-flight lock: see `Mailbox::window_full`.
                    self.mailbox.window_full();
                    break;
                }
                entry.remove();
                let Some(view) = unexpired(&item, ctx.now) else {
                    continue;
                };
                let written_before = match inflight.entry(item.seq) {
                    Entry::Occupied(mut o) => {
                        o.get_mut().item = Some(item.clone());
                        true
                    }
                    Entry::Vacant(v) => {
                        v.insert(Inflight {
                            priority: item.priority,
                            acking: false,
                            written_us: if item.born_us != 0 { ctx.now_us } else { 0 },
                            item: Some(item.clone()),
                        });
                        false
                    }
                };
                let seen = written_before || item.seq >> SEQ_BOOT_SHIFT < boot;
                if let ItemView::Msg(m) = view {
                    if samples.delivery.len() < SAMPLES {
                        samples.delivery.push(ctx.now.saturating_sub(m.time) * 1000);
                    }
                }
                if item.born_us != 0 && !seen && samples.total.len() < SAMPLES {
                    samples.total.push(ctx.now_us.saturating_sub(item.born_us));
                    let pushed = item.pushed_us.load(Ordering::Relaxed);
                    if pushed != 0 {
                        samples.write.push(ctx.now_us.saturating_sub(pushed));
                    }
                }
                write_item(ctx, &item, Some(view), seen);
                wrote = true;
            }
            drop(inflight);
            if !wrote || !more && self.staged.is_empty() {
                return;
            }
        }
    }

    /// Moves items from the mailbox (and, when catching up, the store) into
    /// the staging area. Returns whether more may be available right away.
    fn take(&mut self, ctx: &mut Ctx<'_>) -> bool {
        while self.staged_live < LIVE_CAPACITY {
            let Some(item) = self.mailbox.pop_live() else {
                break;
            };
            self.stage(item);
        }
        if self.live && self.mailbox.overflowed() {
            self.live = false;
        }
        if !self.live {
            self.mailbox.reset_durable();
        }
        if self.live {
            while self.staged.len() < STAGE_MAX {
                let Some(item) = self.mailbox.pop_durable() else {
                    break;
                };
                let cursor = &mut self.cursors[usize::from(item.priority) % PRIORITIES];
                if item.seq > *cursor {
                    *cursor = item.seq;
                    self.stage(item);
                }
            }
            return self.staged.len() >= STAGE_MAX;
        }
        let budget = STAGE_MAX.saturating_sub(self.staged.len());
        if budget == 0 {
            return true;
        }
        match ctx
            .env
            .scan_inbox(&self.user.address, &self.cursors, budget)
        {
            Ok((items, exhausted)) => {
                for item in items {
                    self.stage_scanned(item);
                }
                self.live = exhausted;
                !exhausted
            }
            Err(e) => {
                tracing::error!(user = %self.user.address, error = %e, "inbox scan failed");
                false
            }
        }
    }

    /// Adds `item` to the staging area, counting it if it is real-time.
    fn stage(&mut self, item: Arc<Item>) {
        let order = if item.seq == 0 {
            // Live statuses have no SEQ: each one keeps its place.
            self.unsequenced += 1;
            self.unsequenced
        } else {
            0
        };
        if item.ephemeral {
            self.staged_live += 1;
        }
        if let Some(old) = self.staged.insert((item.priority, item.seq, order), item) {
            if old.ephemeral {
                self.staged_live -= 1;
            }
        }
    }

    fn stage_scanned(&mut self, item: Arc<Item>) {
        let cursor = &mut self.cursors[usize::from(item.priority) % PRIORITIES];
        *cursor = (*cursor).max(item.seq);
        self.stage(item);
    }
}

/// A stored item decoded, unless it is corrupt or past its expiry (the
/// sweeper settles those; they are not written).
fn unexpired(item: &Item, now: u64) -> Option<ItemView<'_>> {
    item.view().filter(|view| view.expire_at() > now)
}

/// Encodes one delivery, `item` decoded as `view`, into the output buffer.
fn write_item(ctx: &mut Ctx<'_>, item: &Item, view: Option<ItemView<'_>>, redelivery: bool) {
    let Some(view) = view else {
        tracing::error!(seq = item.seq, "corrupt item not delivered");
        return;
    };
    let frame = match view {
        ItemView::Ref(_) => {
            // Scans and the commit thread resolve REFs to the shared MSG record.
            tracing::error!(seq = item.seq, "unresolved group item not delivered");
            return;
        }
        ItemView::Msg(m) => Frame::Msg(wire::Msg {
            seq: Some(item.seq),
            from: Some(m.from),
            group: m.group,
            id: Some(m.id),
            time: Some(m.time),
            msg_type: Some(m.msg_type),
            priority: Some(item.priority),
            flags: Some(if redelivery {
                m.flags | flags::REDELIVERY
            } else {
                m.flags
            }),
            payload: Some(m.payload),
        }),
        ItemView::Status(s) => Frame::Status(wire::Status {
            seq: (item.seq != 0).then_some(item.seq),
            id: Some(s.id),
            to: if s.group.is_some() { None } else { Some(s.to) },
            group: s.group,
            member: s.member,
            status: Some(s.status),
            time: Some(s.time),
        }),
    };
    ctx.write(&frame);
}
