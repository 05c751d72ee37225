//! Per-connection delivery rings: how an item reaches a connected user's event
//! loop without a lock.
//!
//! A [`Mailbox`] belongs to one authenticated connection and is published in
//! its user's `attached` slot. Producers (the commit thread for stored items,
//! any worker for real-time ones) push `Arc<Item>`s into lock-free bounded
//! queues (crossbeam `SegQueue` + an atomic length, so an idle mailbox holds no
//! buffer at all) and wake the owning event loop once per burst. The owner
//! drains them into its own priority-ordered staging area.
//!
//! Two queues, two overflow rules:
//! - `durable`: items already in the store. When full, the commit thread sets
//!   `overflow` and stops pushing; the owner then drops what is queued and
//!   re-reads the store from its cursors. Nothing is lost: the store has it.
//! - `live`: real-time (EXPIRY = 0) items and receipts that exist only in
//!   memory. When full, the push fails and the sender is told OVERLOADED.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam::queue::SegQueue;

use crate::core::ConnRef;
use crate::store::Item;
use crate::wire::ErrorCode;

/// Stored items a mailbox holds before it overflows back to the store.
pub const DURABLE_CAPACITY: usize = 1024;
/// Real-time items a mailbox holds before senders get OVERLOADED.
pub const LIVE_CAPACITY: usize = 4096;

/// A bounded lock-free FIFO.
struct Ring {
    /// The items, oldest first.
    queue: SegQueue<Arc<Item>>,
    /// Items in `queue`; a push reserves a slot here first, so `len <= cap`.
    len: AtomicUsize,
    /// The bound.
    cap: usize,
}

impl Ring {
    fn new(cap: usize) -> Ring {
        Ring {
            queue: SegQueue::new(),
            len: AtomicUsize::new(0),
            cap,
        }
    }

    fn push(&self, item: Arc<Item>) -> bool {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.queue.push(item);
        true
    }

    fn pop(&self) -> Option<Arc<Item>> {
        let item = self.queue.pop()?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Some(item)
    }
}

/// The delivery rings of one connected user's session.
pub struct Mailbox {
    /// The connection that drains this mailbox (for wake-ups).
    pub owner: ConnRef,
    /// Stored items, in commit (= SEQ) order; pushed by the commit thread only.
    durable: Ring,
    /// Set when a durable push failed; no durable push happens until the owner
    /// clears it, so the queue always holds a gap-free run of SEQs.
    overflow: AtomicBool,
    /// Memory-only items: real-time messages and receipts about them.
    live: Ring,
    /// Whether a wake-up is already pending at the owner's event loop.
    notified: AtomicBool,
    /// 0 while open; otherwise the ERROR code the owner must close with.
    closed: AtomicU16,
}

impl Mailbox {
    /// An empty, open mailbox for `owner`.
    pub fn new(owner: ConnRef) -> Mailbox {
        Mailbox {
            owner,
            durable: Ring::new(DURABLE_CAPACITY),
            overflow: AtomicBool::new(false),
            live: Ring::new(LIVE_CAPACITY),
            notified: AtomicBool::new(false),
            closed: AtomicU16::new(0),
        }
    }

    /// Offers a stored item. `false` means it was not queued (overflow): the
    /// owner will find it in the store.
    pub fn push_durable(&self, item: Arc<Item>) -> bool {
        if self.overflow.load(Ordering::Acquire) {
            return false;
        }
        if self.durable.push(item) {
            return true;
        }
        self.overflow.store(true, Ordering::Release);
        false
    }

    /// Offers a memory-only item; `false` if the ring is full.
    pub fn push_live(&self, item: Arc<Item>) -> bool {
        self.live.push(item)
    }

    /// The oldest stored item.
    pub fn pop_durable(&self) -> Option<Arc<Item>> {
        self.durable.pop()
    }

    /// The oldest memory-only item.
    pub fn pop_live(&self) -> Option<Arc<Item>> {
        self.live.pop()
    }

    /// Whether stored items were refused since the last [`Mailbox::reset_durable`].
    pub fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::Acquire)
    }

    /// Clears the overflow mark and drops every queued stored item; the caller
    /// then re-reads the store, which holds all of them.
    pub fn reset_durable(&self) {
        self.overflow.store(false, Ordering::Release);
        while self.durable.pop().is_some() {}
    }

    /// Marks that a wake-up must be sent; `true` for the first caller only.
    pub fn claim_wake(&self) -> bool {
        !self.notified.swap(true, Ordering::AcqRel)
    }

    /// Called by the owner before it drains, so later pushes wake it again.
    pub fn clear_wake(&self) {
        self.notified.store(false, Ordering::Release);
    }

    /// Asks the owner to close its connection with `code`.
    pub fn close(&self, code: ErrorCode) {
        let _ = self
            .closed
            .compare_exchange(0, code.0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The ERROR code the owner must close with, if any.
    pub fn closed(&self) -> Option<ErrorCode> {
        match self.closed.load(Ordering::Acquire) {
            0 => None,
            code => Some(ErrorCode(code)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> Arc<Item> {
        Arc::new(Item {
            seq,
            priority: 0,
            ephemeral: false,
            record: Arc::from(&[][..]),
        })
    }

    fn mailbox() -> Mailbox {
        Mailbox::new(ConnRef {
            worker: 0,
            token: 0,
            generation: 0,
        })
    }

    #[test]
    fn durable_overflow_stops_pushes_until_reset() {
        let mb = mailbox();
        for seq in 0..DURABLE_CAPACITY as u64 {
            assert!(mb.push_durable(item(seq)));
        }
        assert!(!mb.push_durable(item(9999)));
        assert!(mb.overflowed());
        // Even with room again, nothing is queued until the owner resets:
        // the queue never has a gap.
        assert_eq!(mb.pop_durable().map(|i| i.seq), Some(0));
        assert!(!mb.push_durable(item(10_000)));
        mb.reset_durable();
        assert!(mb.pop_durable().is_none());
        assert!(mb.push_durable(item(10_001)));
        assert_eq!(mb.pop_durable().map(|i| i.seq), Some(10_001));
    }

    #[test]
    fn live_ring_is_bounded() {
        let mb = mailbox();
        for seq in 0..LIVE_CAPACITY as u64 {
            assert!(mb.push_live(item(seq)));
        }
        assert!(!mb.push_live(item(0)));
        assert_eq!(mb.pop_live().map(|i| i.seq), Some(0));
        assert!(mb.push_live(item(1)));
    }

    #[test]
    fn wake_is_claimed_once_and_close_keeps_first_code() {
        let mb = mailbox();
        assert!(mb.claim_wake());
        assert!(!mb.claim_wake());
        mb.clear_wake();
        assert!(mb.claim_wake());
        mb.close(ErrorCode::REPLACED);
        mb.close(ErrorCode::SHUTDOWN);
        assert_eq!(mb.closed(), Some(ErrorCode::REPLACED));
    }
}
