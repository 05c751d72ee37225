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
//!
//! Waking the owner is the mailbox's own business: it holds the [`Notify`]
//! port of the event loops (implemented by `net`), so a producer (the commit
//! thread, another session, the admin API) needs nothing but the mailbox.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam::queue::SegQueue;

use crate::store::Item;
use crate::wire::{ErrorCode, StatusCode};

/// Names one connection across threads. The generation makes a reference to a
/// closed connection stale even after its slab slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    /// Index of the event loop that owns the connection.
    pub worker: usize,
    /// Slab slot in that loop.
    pub token: usize,
    /// Unique per connection for the life of the process.
    pub generation: u64,
}

/// The answer to a stored SEND, on its way back to the sending connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The SEND's ID.
    pub id: u64,
    /// The SEND's destination (a user, or a group if `group`), echoed in STATUS.
    pub to: Arc<str>,
    /// Whether `to` names a group.
    pub group: bool,
    /// SENT, the latest status of a duplicate, or OVERLOADED when the store
    /// failed; `None` for fire-and-forget sends, which get no answer.
    pub status: Option<StatusCode>,
}

/// The port through which other threads reach a connection's event loop
/// (implemented by `net`; a recorder in tests).
pub trait Notify: Send + Sync {
    /// The mailbox of `conn` has something (or was closed).
    fn mailbox(&self, conn: ConnRef);
    /// A stored SEND of `conn` was answered.
    fn answer(&self, conn: ConnRef, answer: Answer);
}

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
    /// How the owner's event loop is woken.
    notify: Arc<dyn Notify>,
    /// Stored items, in commit (= SEQ) order; pushed by the commit thread only.
    durable: Ring,
    /// Set when a durable push failed; no durable push happens until the owner
    /// clears it, so the queue always holds a gap-free run of SEQs.
    overflow: AtomicBool,
    /// Memory-only items: real-time messages and receipts about them.
    live: Ring,
    /// Whether a wake-up is already pending at the owner's event loop.
    notified: AtomicBool,
    /// The owner stopped writing stored items at its window
    /// (`max_inflight`), and waits for an ACK to free a slot.
    window_full: AtomicBool,
    /// 0 while open; otherwise the ERROR code the owner must close with.
    closed: AtomicU16,
}

impl Mailbox {
    /// An empty, open mailbox for `owner`, woken through `notify`.
    pub fn new(owner: ConnRef, notify: Arc<dyn Notify>) -> Mailbox {
        Mailbox {
            owner,
            notify,
            durable: Ring::new(DURABLE_CAPACITY),
            overflow: AtomicBool::new(false),
            live: Ring::new(LIVE_CAPACITY),
            notified: AtomicBool::new(false),
            window_full: AtomicBool::new(false),
            closed: AtomicU16::new(0),
        }
    }

    /// The owner stops writing stored items at its window. Call it with the
    /// user's in-flight map locked, where the window was found full: an ACK
    /// settled after that unlock sees this in [`Mailbox::slot_freed`], and
    /// one settled before it freed its slot before the window was counted.
    pub fn window_full(&self) {
        self.window_full.store(true, Ordering::Release);
    }

    /// An ACK's item left the in-flight map (removed under its lock): wakes
    /// the owner if it waits for a slot. Only then: most settlements free a
    /// slot nobody waits for, and a wake-up costs the owner's event loop a
    /// pass over its session.
    pub fn slot_freed(&self) {
        if self.window_full.swap(false, Ordering::AcqRel) {
            self.wake();
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
    fn claim_wake(&self) -> bool {
        !self.notified.swap(true, Ordering::AcqRel)
    }

    /// Wakes the owner's event loop, once per burst: a wake-up already on its
    /// way covers this one.
    pub fn wake(&self) {
        if self.claim_wake() {
            self.notify.mailbox(self.owner);
        }
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
            born_us: 0,
            pushed_us: Default::default(),
            group_ref: None,
            settle_hint: Default::default(),
        })
    }

    struct Silent;
    impl Notify for Silent {
        fn mailbox(&self, _: ConnRef) {}
        fn answer(&self, _: ConnRef, _: Answer) {}
    }

    fn mailbox() -> Mailbox {
        let owner = ConnRef {
            worker: 0,
            token: 0,
            generation: 0,
        };
        Mailbox::new(owner, Arc::new(Silent))
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
