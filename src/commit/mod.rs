//! The commit thread: group commit for every change to queued state.
//!
//! Event loops, the expiry sweeper and the admin API send [`Request`]s over a
//! bounded channel. The thread blocks only when idle; otherwise it drains up to
//! [`MAX_BATCH`] requests, applies them one by one to one batch, writes it,
//! syncs the WAL (one fsync for the lot, or for several batches; see
//! [`needs_sync`] for the batches that need none), and only then runs their
//! effects ([`Completion`]s): STATUS SENT to senders, items to connected
//! recipients' mailboxes, inflight bookkeeping, counters. This is the
//! durability point of the server: nothing is acknowledged before the sync
//! returns. The write runs on a second thread, the writer, and the sync and
//! the effects on a third, the syncer, while the next batches are written
//! and built ([`Pipeline`]).
//!
//! Each request is applied under its own save point ([`pass`]): a store
//! error part-way through one request rolls back only that request's keys and
//! answers its sender (OVERLOADED, retry with the same ID); the requests
//! before and after it in the batch still commit.
//!
//! Because one thread decides every change in one order (the batch being
//! written is seen through its overlay), the rules need no
//! locks: a duplicate SEND is seen by the dedup check (the batch overlay or
//! the store), an ACK and an expiry of the same item cannot both win, and a
//! user's stored items get SEQs in the order they become visible, which is
//! what lets a session merge its mailbox with a store scan (see `session`).
//!
//! - [`pass`]: one batch being built: overlays, save points, completions.
//! - [`send`]: SEND and group SEND (dedup, SEQ, fan-out).
//! - [`settle`]: ACK, expiry and deletion of queued items, and the statuses
//!   their senders are owed.
//! - [`receipts`]: READ receipts, 1:1 and per group member.

mod pass;
mod receipts;
mod send;
mod settle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::clock::{mono_us, now_ms};
pub use crate::directory::Acked;
use crate::directory::{held_cost, Directory, Group, User};
use crate::mailbox::{Answer, ConnRef, Notify};
use crate::metrics::{Metrics, Stage};
use crate::store::{Batch, Item, Store};
use crate::wire::{ErrorCode, StatusCode};

pub use pass::Tally;

/// Requests drained into one synced batch at most.
pub const MAX_BATCH: usize = 4096;
/// Recipients one batch of sends reaches at most (a group send reaches
/// each member): past it, the next group send goes in the next batch, so
/// that 4,096 sends to groups of thousands cannot make one batch of
/// millions of inbox writes that every other sender waits behind.
const MAX_BATCH_REACH: usize = 65_536;
/// Requests waiting for the commit thread before senders get OVERLOADED.
pub const QUEUE_CAPACITY: usize = 65_536;

/// Where the answer to a SEND goes.
#[derive(Clone, Debug)]
pub enum ReplyTo {
    /// A protocol connection (STATUS frame via its event loop).
    Conn(ConnRef),
    /// A waiting thread (the HTTP API's backend send).
    Channel(Sender<Option<StatusCode>>),
}

/// What every stored SEND carries, whatever its destination.
pub struct Accept {
    /// Where the answer goes.
    pub conn: ReplyTo,
    /// The sender (for a group, a member with `send`).
    pub sender: Arc<User>,
    /// The sender's message ID (0 = fire-and-forget: no dedup, no statuses).
    pub id: u64,
    /// 0 … 15.
    pub priority: u8,
    /// The SEND's FLAGS.
    pub flags: u32,
    /// Server time of acceptance, ms.
    pub time: u64,
    /// When the queued item(s) expire, ms.
    pub expire_at: u64,
    /// When the duplicate-detection record may be forgotten, ms.
    pub dedup_until: u64,
    /// The encoded MSG record (`record::encode_msg`), GROUP set for a group.
    pub record: Arc<[u8]>,
    /// When the SEND was read, `clock::mono_us` (0: not timed).
    pub read_us: u64,
}

/// A stored 1:1 message to accept.
pub struct SendRequest {
    /// The message.
    pub accept: Accept,
    /// The recipient.
    pub recipient: Arc<User>,
}

/// A stored group message to accept: written once, referenced from each
/// recipient's inbox, all in one batch.
pub struct GroupSendRequest {
    /// The message.
    pub accept: Accept,
    /// The group as it was when the send was accepted: the directory's
    /// immutable snapshot, shared, so a queued send holds no copy of its
    /// member list (8,192 members would be 64 KiB a request).
    pub group: Arc<Group>,
}

impl GroupSendRequest {
    /// Who gets the message: the members with `recv` at the time of
    /// sending, less the sender and members deleted since (their purge,
    /// submitted after the flag was set, would not see a share).
    pub fn recipients(&self) -> impl Iterator<Item = &Arc<User>> {
        self.group.recipients(&self.accept.sender)
    }
}

/// READs of one user at the commit thread at most: past them, a READ is
/// dropped (a READ receipt is best effort), so that one client's flood of
/// READs cannot fill the commit queue that every user's SENDs share.
pub const MAX_QUEUED_READS: usize = 4096;

/// The reader of a READ, holding its place among the reader's
/// [`MAX_QUEUED_READS`]: taken when the session submits it, given back when
/// the request is dropped (done, refused, or never queued).
pub struct ReadTicket(Arc<User>);

impl ReadTicket {
    /// A place for one more READ of `user`, if there is one.
    pub fn take(user: &Arc<User>) -> Option<ReadTicket> {
        let queued = user.reads_queued.fetch_add(1, Ordering::Relaxed);
        if queued >= MAX_QUEUED_READS {
            user.reads_queued.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ReadTicket(user.clone()))
    }

    /// The reader.
    pub fn user(&self) -> &Arc<User> {
        &self.0
    }
}

impl Drop for ReadTicket {
    fn drop(&mut self) {
        self.0.reads_queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A change to queued state.
pub enum Request {
    /// Store a message.
    Send(SendRequest),
    /// Store a group message.
    GroupSend(GroupSendRequest),
    /// The user's application processed these items.
    Ack { user: Arc<User>, items: Vec<Acked> },
    /// The user read message `id` from `from` (sent to `group`, if set).
    Read {
        /// The reader, with its place among its READs at the commit thread.
        reader: ReadTicket,
        from: String,
        id: u64,
        group: Option<String>,
    },
    /// Expiry-index keys found due by the sweeper; `done` gets whether
    /// their expiry was committed.
    Expire {
        keys: Vec<Box<[u8]>>,
        done: Sender<bool>,
    },
    /// Deletes a user's queued (and retained) messages that match `filter`;
    /// senders of undelivered ones get STATUS DELETED. `done` gets the count,
    /// or `None` if the delete was not committed.
    DeleteMessages {
        user: Arc<User>,
        filter: MessageFilter,
        done: Sender<Option<usize>>,
    },
    /// Deletes everything queued for a user (deleted by the admin API);
    /// senders of undelivered messages get STATUS DELETED. `done` gets
    /// whether it was committed.
    Purge { user: Arc<User>, done: Sender<bool> },
    /// Fires once everything submitted before it is committed (or refused):
    /// `true` if its own batch was written.
    Barrier(Sender<bool>),
}

/// Which messages an admin delete removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageFilter {
    /// The message `id` from `from`.
    Id { from: String, id: u64 },
    /// Messages accepted before this time, ms.
    Before(u64),
}

impl MessageFilter {
    fn matches(&self, from: &str, id: u64, time: u64) -> bool {
        match self {
            MessageFilter::Id { from: f, id: i } => f == from && *i == id,
            MessageFilter::Before(t) => time < *t,
        }
    }
}

/// The commit queue refused a request: it is full (the store cannot keep up)
/// or the thread is gone. The request comes back, so the caller can retry it.
pub struct Full(pub Box<Request>);

/// The submitting side of the commit queue.
#[derive(Clone)]
pub struct Commit {
    /// Bounded: a full queue means the store cannot keep up.
    tx: Sender<Request>,
}

/// The receiving side, handed to [`spawn`].
pub struct CommitQueue {
    rx: Receiver<Request>,
}

#[cfg(test)]
impl CommitQueue {
    /// The raw queue, for a test that plays the commit thread.
    pub fn into_receiver(self) -> Receiver<Request> {
        self.rx
    }
}

/// A new commit queue.
pub fn queue() -> (Commit, CommitQueue) {
    let (tx, rx) = channel::bounded(QUEUE_CAPACITY);
    (Commit { tx }, CommitQueue { rx })
}

impl Commit {
    /// Queues a request without blocking.
    pub fn try_submit(&self, req: Request) -> Result<(), Full> {
        self.tx.try_send(req).map_err(|e| match e {
            TrySendError::Full(r) | TrySendError::Disconnected(r) => Full(Box::new(r)),
        })
    }

    /// Queues a request, waiting for room. Never call it from an event loop.
    pub fn submit(&self, req: Request) -> bool {
        self.tx.send(req).is_ok()
    }

    /// Waits until everything submitted so far is committed or refused.
    pub fn barrier(&self) {
        let (tx, rx) = channel::bounded(1);
        if self.submit(Request::Barrier(tx)) {
            let _ = rx.recv();
        }
    }
}

/// What the commit thread works with.
pub struct Committer {
    /// Users and groups (SEQs, inflight maps, mailboxes).
    pub dir: Arc<Directory>,
    /// Where batches are written.
    pub store: Arc<Store>,
    /// How SEND answers reach event loops.
    pub notify: Arc<dyn Notify>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Keep ACKed messages in the `history` column family.
    pub retain_delivered: bool,
    /// Longest expiry, seconds (stored statuses live this long).
    pub max_expiry: u32,
}

/// Completion of a request, run after its batch is written and synced
/// (or written only, for a batch that [`needs_sync`] exempts).
pub enum Completion {
    /// Answer a SEND.
    Reply { conn: ReplyTo, answer: Answer },
    /// Offer a new stored item to its recipient, if connected.
    Push { user: Arc<User>, item: Arc<Item> },
    /// Hold a member's share of a group send in memory (no REF stored),
    /// then offer it like [`Completion::Push`].
    Hold { user: Arc<User>, item: Arc<Item> },
    /// A held share is settled (or was stored after all): forget it.
    Unhold {
        user: Arc<User>,
        priority: u8,
        seq: u64,
    },
    /// The item is gone from the store: forget it as inflight. `ack`: it
    /// was the user's ACK (if the write fails, the ACK is retried).
    Settled {
        user: Arc<User>,
        seq: u64,
        ack: bool,
    },
    /// A request with these items was rolled back: a later ACK may retry.
    Unsettled { user: Arc<User>, seq: u64 },
    /// One of the user's items was expired or deleted (settled otherwise
    /// than by an ACK): counted in `User::other_settles`, in the order of
    /// the pushes, whether the write succeeded or not.
    SettledOtherwise { user: Arc<User> },
    /// Items were added to (positive) or removed from a user's queue.
    Queued { user: Arc<User>, delta: i64 },
    /// Tell a waiter whether its request was committed: `false` if the
    /// request was rolled back (the second field) or its batch not written.
    Done(Sender<bool>, bool),
    /// Answer a count (deleted messages; `None`: rolled back).
    Count(Sender<Option<usize>>, Option<usize>),
}

/// Starts the commit thread. It exits when every [`Commit`] is dropped and
/// the queue is drained.
pub fn spawn(c: Committer, queue: CommitQueue) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("tern-commit".into())
        .spawn(move || {
            raise_priority();
            run(&c, &queue.rx)
        })
}

/// The commit thread's nice value, when the process may set it.
const COMMIT_NICE: i32 = -10;

/// Every durable message waits for the commit thread, and the commit thread
/// for the CPU: on a busy machine (event loops, clients, RocksDB's own
/// threads) the scheduler's fair share made a batch take twice as long as
/// its work (docs/benchmarks.md, "Where the time goes"). So the thread asks
/// for a higher priority than the rest. That needs CAP_SYS_NICE or an
/// RLIMIT_NICE allowing it (the systemd unit sets `LimitNICE=-10`); without
/// either, it runs at the normal priority and says so once.
fn raise_priority() {
    let tid = rustix::thread::gettid();
    match rustix::process::setpriority_process(Some(tid), COMMIT_NICE) {
        Ok(()) => tracing::debug!(nice = COMMIT_NICE, "commit thread priority raised"),
        Err(e) => tracing::info!(
            error = %e,
            "commit thread at normal priority (CAP_SYS_NICE or LimitNICE=-10 lowers latency on a busy machine)"
        ),
    }
}

fn run(c: &Committer, rx: &Receiver<Request>) {
    thread::scope(|scope| {
        let (jobs, writer_jobs) = channel::bounded::<Job<'_>>(1);
        let (writer_results, results) = channel::bounded(1);
        let (staged, syncer_jobs) = channel::bounded::<Staged>(SYNC_GROUP);
        let failed = Arc::new(AtomicBool::new(false));
        let sync_failed = failed.clone();
        let syncer = thread::Builder::new()
            .name("tern-commit-s".into())
            .spawn_scoped(scope, move || {
                raise_priority();
                sync_loop(c, &syncer_jobs, &sync_failed);
            });
        let writer = syncer.and_then(|_| {
            thread::Builder::new()
                .name("tern-commit-w".into())
                .spawn_scoped(scope, move || {
                    raise_priority();
                    write_loop(&writer_jobs, &staged, &writer_results);
                })
        });
        let mut pipe = match writer {
            Ok(_) => Pipeline::new(
                c,
                Some(Writer {
                    jobs,
                    results,
                    failed,
                }),
            ),
            Err(e) => {
                tracing::error!(error = %e, "no commit writer or syncer thread: batches are written one at a time");
                Pipeline::new(c, None)
            }
        };
        build_loop(c, rx, &mut pipe);
        pipe.drain();
        sync_wal(c);
    });
}

/// The writer: writes each batch it is handed without an fsync, passes it
/// on to the syncer, then tells the commit thread whether the write went
/// through (so that the next batch, built on this one's overlay, may be
/// handed over).
fn write_loop<'c>(jobs: &Receiver<Job<'c>>, staged: &Sender<Staged>, results: &Sender<bool>) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Batch(built) => {
                let written = write_phase(built);
                let ok = written.written;
                if staged.send(Staged::Batch(written)).is_err() || results.send(ok).is_err() {
                    return;
                }
            }
            Job::Fence(tx) => {
                if staged.send(Staged::Fence(tx)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Batches written and waiting for the syncer, at most (as many again may
/// be in the group it is syncing); also the most it syncs with one fsync.
/// So completions lag the commit thread by up to 2 × SYNC_GROUP + 2
/// batches.
const SYNC_GROUP: usize = 8;

/// The syncer: takes the batches the writer wrote, as many as are there
/// (up to [`SYNC_GROUP`]), syncs the WAL once for all of them if one
/// needs it ([`needs_sync`]), then runs their completions in order.
///
/// A failed sync refuses its batches and every batch after them
/// ([`sync_group`]).
fn sync_loop(c: &Committer, rx: &Receiver<Staged>, failed: &AtomicBool) {
    let mut group = Vec::with_capacity(SYNC_GROUP);
    while let Some(first) = next_staged(c, rx, failed) {
        let mut fence = None;
        let mut next = Some(first);
        while let Some(staged) = next.take() {
            match staged {
                Staged::Batch(w) => group.push(w),
                Staged::Fence(tx) => {
                    fence = Some(tx);
                    break;
                }
            }
            if group.len() < SYNC_GROUP {
                next = rx.try_recv().ok();
            }
        }
        if !group.is_empty() {
            sync_group(c, &mut group, failed);
        }
        if let Some(tx) = fence {
            let _ = tx.send(());
        }
    }
}

/// Syncs and completes a group of written batches (drained), refusing
/// them all while `failed` is set, and setting it when the sync fails.
///
/// After a failed sync the written batches are in RocksDB's memtable but
/// may not be on disk, and later batches were built on them (a dedup
/// record, a SEQ): so every batch is refused, written or not, until the
/// commit thread has waited for all of them and the store has no fault
/// (it was reopened: its WAL replayed, what is in it now is what
/// survives); see [`Pipeline::drain`], which clears the flag. The commit
/// thread refuses what it builds meanwhile.
fn sync_group(c: &Committer, group: &mut Vec<Written>, failed: &AtomicBool) {
    if !finish(c, group, failed.load(Ordering::Acquire)) {
        failed.store(true, Ordering::Release);
    }
}

/// The syncer's next batch or fence; `None` once the writer is gone. While
/// a write is unsynced, waits at most until it is [`MAX_UNSYNCED`] old and
/// syncs the WAL then: only the writer writes without `sync`, so this
/// keeps the bound when no batch follows.
fn next_staged(c: &Committer, rx: &Receiver<Staged>, failed: &AtomicBool) -> Option<Staged> {
    loop {
        let Some(age) = c.store.unsynced_for() else {
            return rx.recv().ok();
        };
        match rx.recv_timeout(MAX_UNSYNCED.saturating_sub(age)) {
            Ok(staged) => return Some(staged),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {
                if !sync_wal(c) {
                    // Refuse what comes next, as after a group's failed sync.
                    failed.store(true, Ordering::Release);
                    // A store fault now (the upkeep reopens the store):
                    // no retry until the next batch.
                    return rx.recv().ok();
                }
            }
        }
    }
}

fn build_loop(c: &Committer, rx: &Receiver<Request>, pipe: &mut Pipeline<'_>) {
    let mut queues = Queues::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut upkeep = Upkeep::new();
    loop {
        if queues.is_empty() {
            match rx.recv_timeout(UPKEEP_INTERVAL) {
                Ok(first) => queues.add(first),
                Err(RecvTimeoutError::Timeout) => {
                    pipe.drain();
                    upkeep.run(c);
                    upkeep.idle(c);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while !queues.full() {
            match rx.try_recv() {
                Ok(r) => queues.add(r),
                Err(_) => break,
            }
        }
        if upkeep.due() {
            pipe.drain();
            upkeep.run(c);
        }
        queues.next_batch(&mut batch);
        pipe.commit(&mut batch);
        upkeep.busy = true;
    }
}

/// Batches are built on the commit thread, written on a second one (the
/// writer, without an fsync) and synced and completed on a third (the
/// syncer): while the syncer syncs batch N (and up to [`SYNC_GROUP`] - 1
/// before it, with the same fsync) and completes it, the writer writes
/// N+1 (memtable inserts, WAL; up to [`SYNC_GROUP`] written batches may
/// wait for the syncer) and the commit thread builds N+2. N+2 reads what
/// N+1 changes from N+1's overlay, since N+1 may not be in the store yet;
/// it is handed to the writer only once N+1 is written, so batches reach
/// the store, and their completions run, in the order they were built.
///
/// - A write lands in RocksDB's memtable before its fsync: nothing that
///   tells a client reads it from there before its completions run. An
///   inbox scan takes items only up to [`User::visible`], which a
///   completion raises; a later batch that acts on a dedup record read
///   from there is synced after it, or refused with it. (The operator's
///   message list reads the store as it is, and may show a message whose
///   batch is not synced yet.)
/// - A batch built on one whose write failed is refused unwritten (its
///   SENDs answered OVERLOADED, its ACKs left to retry): it may rest on
///   what that batch would have stored, such as a dedup record. A failed
///   sync refuses its batches and every one after them until the first
///   drain after the store is reopened ([`sync_group`]); the commit thread refuses what it builds
///   meanwhile. A refusal on the commit thread first waits for the batches
///   before it, so that completions still run in build order.
/// - Requests that scan the store (an admin delete or purge, an expiry
///   sweep) and the upkeep (a reopen) wait for every batch handed over to
///   be written, synced if it needs it, and completed.
/// - Only the syncer syncs while batches are in flight (the commit
///   thread's own syncs, and the synced write of `resync`, come after a
///   drain): a sync elsewhere could clear the unsynced marker for a write
///   it did not cover, and a group would skip its fsync.
/// - Only completions, on the syncer, change what a later batch's
///   decisions read from the directory, and they lag by up to
///   2 × [`SYNC_GROUP`] + 2 batches: in-flight entries, held shares,
///   settle counts. The store and the overlay of the batch not yet written
///   cover what those decide on, with two exceptions. An item's settle
///   count (`settle::known`) moves when a batch expires or deletes items,
///   so the batch after one that does waits for it to complete. And a
///   user's count of held shares may be exceeded by what the batches in
///   the pipeline hold for it; their bytes count against the byte budget
///   from the moment they are built (`Directory::held_pending`).
struct Pipeline<'c> {
    c: &'c Committer,
    /// The writer thread's queue and answers (`None`: no writer thread;
    /// each batch is written and synced by the commit thread itself).
    writer: Option<Writer<'c>>,
    /// A batch was handed to the writer and its answer is not read yet.
    in_flight: bool,
    /// A batch was handed to the writer since the last fence.
    unfenced: bool,
    /// What the batch being written changes.
    prev: pass::Overlay,
    /// How big the last batch built was.
    sizes: pass::Sizes,
}

/// The commit thread's ends of the writer's queues.
struct Writer<'c> {
    /// Batches to write, and fences.
    jobs: Sender<Job<'c>>,
    /// Whether each batch was written (not yet synced).
    results: Receiver<bool>,
    /// Set by the syncer while it refuses every batch (a sync failed);
    /// cleared by [`Pipeline::drain`] once the store is reopened.
    failed: Arc<AtomicBool>,
}

/// What the writer takes from the commit thread. (A fence is rare, and a
/// batch moves through a queue of one: nothing gained by boxing it.)
#[allow(clippy::large_enum_variant)]
enum Job<'c> {
    /// A batch to write.
    Batch(Built<'c>),
    /// Fires once every batch handed over before it is synced (or refused)
    /// and completed.
    Fence(Sender<()>),
}

/// What the syncer takes from the writer (not boxed, as [`Job`]).
#[allow(clippy::large_enum_variant)]
enum Staged {
    /// A batch written (or not), to sync and complete.
    Batch(Written),
    /// See [`Job::Fence`].
    Fence(Sender<()>),
}

impl<'c> Pipeline<'c> {
    fn new(c: &'c Committer, writer: Option<Writer<'c>>) -> Pipeline<'c> {
        Pipeline {
            c,
            writer,
            in_flight: false,
            unfenced: false,
            prev: pass::Overlay::default(),
            sizes: pass::Sizes::default(),
        }
    }

    /// Builds a batch of `requests` (drained) and hands it to the writer
    /// once the batch before it is written.
    fn commit(&mut self, requests: &mut Vec<Request>) {
        if requests.iter().any(Request::scans_store) {
            self.drain();
        }
        // Nothing handed over since the last drain: built on the store alone.
        let on_store = !self.unfenced;
        let prev = std::mem::take(&mut self.prev);
        let (built, overlay) = build_batch(self.c, requests, prev, self.sizes);
        self.sizes = pass::Sizes::of(built.batch.as_ref(), &built.done);
        // Refusals wait for the batches before them to complete: their
        // completions (an OVERLOADED, a barrier) run in build order.
        if !self.wait() {
            self.drain();
            refuse_batch(self.c, built, "the batch before this one was not written");
            return;
        }
        if self.refusing() {
            // The syncer refuses every batch handed over since a failed
            // sync, and this one may be built on the last of them. Once
            // the store is reopened, one built on the store alone goes on.
            self.drain();
            if !on_store || self.refusing() {
                refuse_batch(self.c, built, "a sync before this batch failed");
                return;
            }
        }
        let Some(writer) = &self.writer else {
            write_batch(self.c, built);
            return;
        };
        let settles_otherwise = built.settles_otherwise;
        match writer.jobs.send(Job::Batch(built)) {
            Ok(()) => {
                self.in_flight = true;
                self.unfenced = true;
                self.prev = overlay;
            }
            Err(channel::SendError(job)) => {
                if let Job::Batch(built) = job {
                    refuse_batch(self.c, built, "the commit writer is gone");
                }
                return;
            }
        }
        if settles_otherwise {
            // An ACK of an item it expires or deletes, built after the next
            // batch, would find neither the item's deletion in its overlay
            // nor the settle count raised (`settle::known`), and settle the
            // item again from its session's copy.
            self.drain();
        }
    }

    /// Waits for the batch being written; whether it was written.
    fn wait(&mut self) -> bool {
        if !std::mem::take(&mut self.in_flight) {
            return true;
        }
        match &self.writer {
            Some(writer) => writer.results.recv().unwrap_or(false),
            None => true,
        }
    }

    /// Waits for every batch handed over to be written, synced (if it
    /// needs it) and completed: then the store and the directory have
    /// everything. If the syncer refuses batches (a sync failed) and the
    /// store has no fault any more (the upkeep reopened it), clears the
    /// flag: every batch that may rest on a refused one is through.
    fn drain(&mut self) {
        self.wait();
        if let Some(writer) = &self.writer {
            if std::mem::take(&mut self.unfenced) {
                let (tx, rx) = channel::bounded(1);
                if writer.jobs.send(Job::Fence(tx)).is_ok() {
                    let _ = rx.recv();
                }
            }
            if writer.failed.load(Ordering::Acquire) && self.c.store.fault().is_none() {
                writer.failed.store(false, Ordering::Release);
                // The syncer's timed sync may have failed just now: it sets
                // the store's fault before the flag, so look again.
                if self.c.store.fault().is_some() {
                    writer.failed.store(true, Ordering::Release);
                }
            }
        }
        self.prev = pass::Overlay::default();
    }

    /// Whether the syncer refuses every batch.
    fn refusing(&self) -> bool {
        self.writer
            .as_ref()
            .is_some_and(|w| w.failed.load(Ordering::Acquire))
    }
}

impl Request {
    /// Whether applying it reads the store beyond keys a batch overlay
    /// tracks (so it must not be built while a batch is being written).
    fn scans_store(&self) -> bool {
        matches!(
            self,
            Request::Expire { .. } | Request::DeleteMessages { .. } | Request::Purge { .. }
        )
    }
}

/// Settlements (ACK, READ, expiry) at most in one batch of their own.
pub const MAX_SETTLE_BATCH: usize = 1024;

/// The requests drained from the commit queue, in two lines. A SEND is what
/// a user waits for (its STATUS SENT, its delivery), while settling an ACK
/// or a READ only frees a window slot and queues a receipt: so batches take
/// turns, one of everything else (SENDs first), then one of settlements,
/// and a SEND never waits behind more than one batch of ACKs. With a
/// thousand online group members, a group SEND is followed by a thousand
/// ACKs: they no longer delay the next SEND by all of their work.
///
/// Settlements are independent of the SENDs they are moved past (other
/// keys, and the dedup record of a message is only touched by its own ACK
/// and READ, which stay in order). Requests that must see everything queued
/// before them (a barrier, an admin delete or purge) take the settlements
/// queued so far along, in order.
#[derive(Default)]
struct Queues {
    first: Vec<Request>,
    settle: std::collections::VecDeque<Request>,
    /// The last batch was of `first`.
    settle_turn: bool,
}

impl Queues {
    fn is_empty(&self) -> bool {
        self.first.is_empty() && self.settle.is_empty()
    }

    /// Either line is at its batch size: drain no more (the channel holds
    /// the rest, and fills up to OVERLOADED as before).
    fn full(&self) -> bool {
        self.first.len() >= MAX_BATCH || self.settle.len() >= MAX_BATCH
    }

    fn add(&mut self, r: Request) {
        match r {
            Request::Ack { .. } | Request::Read { .. } | Request::Expire { .. } => {
                self.settle.push_back(r)
            }
            Request::Send(_) | Request::GroupSend(_) => self.first.push(r),
            Request::DeleteMessages { .. } | Request::Purge { .. } | Request::Barrier(_) => {
                self.first.extend(self.settle.drain(..));
                self.first.push(r);
            }
        }
    }

    /// Moves the next batch into `batch` (empty).
    fn next_batch(&mut self, batch: &mut Vec<Request>) {
        let settle = !self.settle.is_empty() && (self.settle_turn || self.first.is_empty());
        if settle {
            let n = self.settle.len().min(MAX_SETTLE_BATCH);
            batch.extend(self.settle.drain(..n));
        } else {
            // An operator's delete or a purge lists the user's items in the
            // store and in memory: what is queued before it (a SEND to that
            // user) is committed and completed first, in a batch of its own.
            // And a batch reaches at most MAX_BATCH_REACH recipients (a
            // first request alone may reach more).
            let mut reach = 0;
            let cut = self.first.iter().enumerate().position(|(i, r)| {
                reach += r.reach();
                i > 0 && (r.lists_items() || reach > MAX_BATCH_REACH)
            });
            match cut {
                Some(i) => batch.extend(self.first.drain(..i)),
                None => std::mem::swap(batch, &mut self.first),
            }
        }
        self.settle_turn = !settle;
    }
}

impl Request {
    /// How many users a send reaches (a group send's members, sender
    /// included: an upper bound); 1 for anything else.
    fn reach(&self) -> usize {
        match self {
            Request::GroupSend(g) => g.group.members.len(),
            _ => 1,
        }
    }

    /// Whether applying it lists a user's queued items (from the store and
    /// the held shares), so it must not share a batch with the requests
    /// queued before it.
    fn lists_items(&self) -> bool {
        matches!(self, Request::DeleteMessages { .. } | Request::Purge { .. })
    }
}

/// How often, at least, the commit thread measures free space and, after a
/// failed write, tries to reopen the store.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);
/// Between two reopen attempts.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// The commit thread's own care of the disk: the free-space reserve, and
/// recovery from a failed write without a restart.
struct Upkeep {
    last_check: Instant,
    last_reopen: Instant,
    /// The last health verdict, to log transitions only.
    healthy: bool,
    /// Batches were written since the last [`Upkeep::idle`].
    busy: bool,
}

impl Upkeep {
    fn new() -> Upkeep {
        let long_ago = Instant::now() - REOPEN_INTERVAL;
        Upkeep {
            last_check: long_ago,
            last_reopen: long_ago,
            healthy: true,
            busy: false,
        }
    }

    /// Nothing to commit for [`UPKEEP_INTERVAL`]: sync what was written
    /// without an fsync (the syncer thread does within [`MAX_UNSYNCED`];
    /// this covers batches written here when it could not start), and
    /// after a busy spell, give the memory freed meanwhile back to the OS
    /// (once per spell).
    fn idle(&mut self, c: &Committer) {
        if let Err(e) = c.store.sync_wal() {
            // A store fault now (`Store::failed`): `run` reopens the store.
            tracing::debug!(error = %e, "idle WAL sync failed");
        }
        if std::mem::take(&mut self.busy) {
            if let Err(e) = c.store.compact_memory() {
                tracing::debug!(error = %e, "idle memtable flush failed");
            }
        }
    }

    /// Whether [`Upkeep::run`] has something to do.
    fn due(&self) -> bool {
        self.last_check.elapsed() >= UPKEEP_INTERVAL
    }

    /// At most every [`UPKEEP_INTERVAL`]: measures free space (so SENDs are
    /// refused below the reserve) and, while a failed write is not recovered
    /// and there is room again, reopens the store.
    fn run(&mut self, c: &Committer) {
        if !self.due() {
            return;
        }
        self.last_check = Instant::now();
        let low = c.store.check_space();
        if !low && c.store.fault().is_some() && self.last_reopen.elapsed() >= REOPEN_INTERVAL {
            self.last_reopen = Instant::now();
            match c.store.reopen() {
                Ok(()) => {
                    c.metrics.store_recoveries.fetch_add(1, Ordering::Relaxed);
                    resync(c);
                    // Only now: a client that reconnects once `/readyz`
                    // says healthy is not closed by `resync`.
                    c.store.recovered();
                }
                Err(e) => tracing::debug!(error = %e, "store not recovered yet"),
            }
        }
        match (self.healthy, c.store.health()) {
            (true, Err(why)) => {
                tracing::error!(%why, "new messages are refused (OVERLOADED) until this clears");
                self.healthy = false;
            }
            (false, Ok(())) => {
                tracing::warn!("store healthy again: new messages are accepted");
                self.healthy = true;
            }
            _ => {}
        }
    }
}

/// After a reopen: a write that failed may still have reached the WAL (it
/// is replayed at open), with items below a session's scan cursors. So
/// queue counts are recounted from the store, and every connected session
/// is closed with SHUTDOWN: its client reconnects and reads its inbox from
/// the start, as after a restart. Nothing is lost either way: the sender of
/// such a message got OVERLOADED, and its retry is answered from the
/// replayed dedup record.
///
/// Group shares held in memory get their REFs stored as at a start-up
/// (`Store::store_held_shares`) and are dropped from memory: a failed write
/// may have reached the disk with bits of the `held` bitmaps that no memory
/// has, and from here on the store alone says what is queued.
fn resync(c: &Committer) {
    match c.store.store_held_shares() {
        // Every session is closed below, so what a scan in between took
        // does not matter: the next one, after this, reads the store.
        Ok(_) => {
            for user in c.dir.users() {
                for item in user.shares_after(&[0; crate::store::keys::PRIORITIES]) {
                    c.dir.unhold(&user, item.priority, item.seq);
                }
            }
        }
        // None stored (one batch), so still held, as the bitmaps say.
        Err(e) => tracing::warn!(error = %e, "cannot store held group shares after recovery"),
    }
    // The failed write may have stored items whose completions did not run
    // (nor raise `visible`): the next scans take everything stored.
    for user in c.dir.users() {
        user.visible.fetch_max(user.last_seq(), Ordering::SeqCst);
    }
    match c.store.count_inbox() {
        Ok(counts) => {
            for user in c.dir.users() {
                let n = counts.get(&*user.address).copied().unwrap_or(0);
                user.queued.store(n, Ordering::Relaxed);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot recount queues after recovery"),
    }
    for user in c.dir.users() {
        if let Some(mb) = user.mailbox() {
            mb.close(ErrorCode::SHUTDOWN);
            mb.wake();
        }
    }
}

/// Applies, writes and completes one batch of requests.
pub fn commit_batch(c: &Committer, requests: &mut Vec<Request>) {
    let (built, _) = build_batch(
        c,
        requests,
        pass::Overlay::default(),
        pass::Sizes::default(),
    );
    write_batch(c, built);
}

/// A batch built and not written yet.
struct Built<'c> {
    /// What to write (`None`: nothing may be written, see [`pass::Pass::finish`]).
    batch: Option<Batch<'c>>,
    /// What to run once it is written (or not).
    done: Vec<Completion>,
    tally: Tally,
    clock: StageClock,
    /// Requests in it.
    count: u64,
    /// It expires or deletes items (see [`Pipeline::commit`]).
    settles_otherwise: bool,
}

/// Applies `requests` (drained) to a new batch built on `prev`; returns it
/// and what it changes.
fn build_batch<'c>(
    c: &'c Committer,
    requests: &mut Vec<Request>,
    prev: pass::Overlay,
    hint: pass::Sizes,
) -> (Built<'c>, pass::Overlay) {
    let count = requests.len() as u64;
    let clock = StageClock::start(requests);
    let prefetched = pass::Prefetch::read(&c.store, requests);
    let mut pass = pass::Pass::new(c, now_ms(), requests.len(), prev, hint, prefetched);
    for req in requests.drain(..) {
        pass.apply(req);
    }
    let (batch, done, tally, overlay) = pass.finish();
    // The shares it will hold count against the budget from now on: up to
    // 2 × SYNC_GROUP + 2 batches may wait for their completions.
    let (mut pending, mut settles_otherwise) = (0, false);
    for d in &done {
        match d {
            Completion::Hold { item, .. } => pending += held_cost(&item.record),
            Completion::SettledOtherwise { .. } => settles_otherwise = true,
            _ => {}
        }
    }
    if pending > 0 {
        c.dir.held_pending.fetch_add(pending, Ordering::Relaxed);
    }
    let mut built = Built {
        batch,
        done,
        tally,
        clock,
        count,
        settles_otherwise,
    };
    built.clock.lap(Stage::Batch);
    (built, overlay)
}

/// The longest a written batch stays unsynced: the first batch written
/// after that is synced, whatever it holds, and without one the syncer
/// syncs the WAL by itself ([`next_staged`]).
pub const MAX_UNSYNCED: Duration = Duration::from_millis(100);

impl Completion {
    /// Whether running it tells anyone that its batch is written: a
    /// SEND's answer, a new item offered (a message, or a status such as
    /// DELIVERED, which says an ACK is durable), a share held, a barrier,
    /// an operator's count. The rest only forget or count what the batch
    /// settled.
    fn tells(&self) -> bool {
        match self {
            Completion::Reply { .. }
            | Completion::Push { .. }
            | Completion::Hold { .. }
            | Completion::Done(..)
            | Completion::Count(..) => true,
            Completion::Unhold { .. }
            | Completion::Settled { .. }
            | Completion::Unsettled { .. }
            | Completion::SettledOtherwise { .. }
            | Completion::Queued { .. } => false,
        }
    }
}

/// Whether a batch must be synced before its completions run: when one of
/// them tells anyone it is written. A batch that only settles ACKs that owe
/// no one a status (in fan-out without receipts, nearly every batch) is
/// written without an fsync. A crash of the process loses nothing of it (the
/// write is in the kernel); a power cut before the next synced write may,
/// and then its items are delivered again after the restart, flagged
/// REDELIVERY: what the protocol allows for an ACK not durably recorded yet
/// (an ACK is known to be durable only through its DELIVERED, which is
/// pushed, so synced).
fn needs_sync(done: &[Completion]) -> bool {
    done.iter().any(Completion::tells)
}

/// A batch after its write, before its sync: what the syncer takes.
struct Written {
    /// The write went through (not synced yet).
    written: bool,
    /// It wrote something.
    writes: bool,
    done: Vec<Completion>,
    tally: Tally,
    clock: StageClock,
    count: u64,
    /// When its write began.
    started: Instant,
}

/// Writes a built batch without an fsync (a crash of the process loses
/// nothing of it; a power cut may, until [`finish`] syncs it).
fn write_phase(built: Built<'_>) -> Written {
    let Built {
        batch,
        done,
        tally,
        clock,
        count,
        ..
    } = built;
    let started = Instant::now();
    let writes = batch.as_ref().is_some_and(|b| !b.is_empty());
    let written = match batch {
        None => false,
        // Nothing to write, but a barrier or an answer still means durable:
        // `finish` syncs what is not.
        Some(batch) if batch.is_empty() => true,
        Some(batch) => match batch.commit(false) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "write failed; the batch is refused");
                false
            }
        },
    };
    Written {
        written,
        writes,
        done,
        tally,
        clock,
        count,
        started,
    }
}

/// Syncs the WAL once for a group of written batches (drained), if one of
/// them [`needs_sync`] or an earlier write has waited [`MAX_UNSYNCED`], and
/// runs their completions in order. Returns whether the sync (if any)
/// worked; with `refuse`, every batch in the group is refused without a
/// sync, as after a failed one, and it returns `false`.
fn finish(c: &Committer, group: &mut Vec<Written>, refuse: bool) -> bool {
    let sync = group.iter().any(|w| w.written && needs_sync(&w.done))
        || c.store
            .unsynced_for()
            .is_some_and(|waited| waited >= MAX_UNSYNCED);
    let synced = !refuse && (!sync || sync_wal(c));
    if !synced && !refuse {
        tracing::error!(
            batches = group.len(),
            "WAL sync failed; the batches it covered are refused"
        );
    }
    if synced {
        for w in group.iter().filter(|w| w.written && (w.writes || sync)) {
            c.metrics.record_commit(w.started.elapsed(), w.count, sync);
        }
    }
    for w in group.drain(..) {
        let Written {
            written,
            done,
            tally,
            mut clock,
            ..
        } = w;
        let written = written && synced;
        clock.lap(Stage::Sync);
        if written {
            tally.add_to(&c.metrics);
        }
        for completion in done {
            complete(c, completion, written, &mut clock);
        }
        clock.record(&c.metrics);
    }
    synced
}

/// Writes, syncs (if [`needs_sync`]) and completes a built batch on this
/// thread; whether it was written.
fn write_batch(c: &Committer, built: Built<'_>) -> bool {
    let written = write_phase(built);
    let ok = written.written;
    finish(c, &mut vec![written], false) && ok
}

/// Syncs writes made without an fsync; whether that worked.
fn sync_wal(c: &Committer) -> bool {
    match c.store.sync_wal() {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "WAL sync failed");
            false
        }
    }
}

/// Runs a built batch's completions as if its write had failed.
fn refuse_batch(c: &Committer, built: Built<'_>, why: &str) {
    tracing::error!(requests = built.count, why, "a batch is refused unwritten");
    let mut clock = built.clock;
    for completion in built.done {
        complete(c, completion, false, &mut clock);
    }
}

/// The stage histograms' view of one batch (`metrics::Stage`): the SENDs in
/// it, when each of its phases ended, and the samples taken.
struct StageClock {
    /// Timed SENDs in the batch (group sends count once).
    sends: usize,
    /// When the last phase ended, `clock::mono_us`.
    last: u64,
    /// Samples per stage, µs.
    samples: [Vec<u64>; Stage::ALL.len()],
}

impl StageClock {
    /// At the batch's start: each timed SEND's wait since it was read.
    fn start(requests: &[Request]) -> StageClock {
        let last = mono_us();
        let mut samples: [Vec<u64>; Stage::ALL.len()] = Default::default();
        for r in requests {
            let read_us = match r {
                Request::Send(s) => s.accept.read_us,
                Request::GroupSend(g) => g.accept.read_us,
                _ => 0,
            };
            if read_us != 0 {
                samples[Stage::Queue as usize].push(last.saturating_sub(read_us));
            }
        }
        StageClock {
            sends: samples[Stage::Queue as usize].len(),
            last,
            samples,
        }
    }

    /// A phase of the whole batch ended: one sample per SEND in it.
    fn lap(&mut self, stage: Stage) {
        let now = mono_us();
        let took = now.saturating_sub(self.last);
        self.last = now;
        let s = &mut self.samples[stage as usize];
        s.extend(std::iter::repeat_n(took, self.sends));
    }

    /// A timed item reached its mailbox now.
    fn pushed(&mut self, item: &Item) {
        if item.born_us == 0 {
            return;
        }
        let now = mono_us();
        item.pushed_us.store(now, Ordering::Relaxed);
        self.samples[Stage::Push as usize].push(now.saturating_sub(self.last));
    }

    /// A timed item's ACK was committed now.
    fn acked(&mut self, written_us: u64) {
        if written_us != 0 {
            self.samples[Stage::Ack as usize].push(mono_us().saturating_sub(written_us));
        }
    }

    fn record(&self, m: &Metrics) {
        for stage in Stage::ALL {
            m.record_stage(stage, &self.samples[stage as usize]);
        }
    }
}

fn complete(c: &Committer, completion: Completion, written: bool, clock: &mut StageClock) {
    match completion {
        Completion::Reply { conn, mut answer } => {
            // A failed write stored nothing: the sender may retry the same ID.
            if !written {
                answer.status = answer.status.map(|_| StatusCode::OVERLOADED);
            }
            match conn {
                ReplyTo::Conn(conn) => c.notify.answer(conn, answer),
                ReplyTo::Channel(tx) => {
                    let _ = tx.send(answer.status);
                }
            }
        }
        Completion::Hold { user, item } => {
            let cost = held_cost(&item.record);
            if written {
                c.dir.hold(&user, item.clone());
            }
            c.dir.held_pending.fetch_sub(cost, Ordering::Relaxed);
            if written {
                push(&user, item, clock);
            }
        }
        Completion::Unhold {
            user,
            priority,
            seq,
        } if written => c.dir.unhold(&user, priority, seq),
        Completion::Push { user, item } if written => push(&user, item, clock),
        Completion::Settled { user, seq, .. } if written => {
            if let Some(entry) = user.settled(seq) {
                clock.acked(entry.written_us);
            }
        }
        Completion::SettledOtherwise { user } => {
            user.other_settles.fetch_add(1, Ordering::Relaxed);
        }
        Completion::Settled {
            user,
            seq,
            ack: true,
        }
        | Completion::Unsettled { user, seq } => {
            // Nothing was written: the item is still queued; the ACK is
            // kept and offered again (`User::ack_failed`). A failed synced
            // write may still reach the disk (and show after a reopen), so
            // that ACK reads the item back rather than trust the copy it
            // has (`Item::settle_hint`).
            user.other_settles.fetch_add(1, Ordering::Relaxed);
            user.ack_failed(seq, now_ms());
        }
        Completion::Settled { user, .. } => {
            // An expiry or a delete not written: the item is still queued,
            // as far as the session knows it.
            user.other_settles.fetch_add(1, Ordering::Relaxed);
        }
        Completion::Queued { user, delta } if written => {
            let _ = user
                .queued
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add_signed(delta))
                });
        }
        Completion::Done(tx, staged) => {
            let _ = tx.send(staged && written);
        }
        Completion::Count(tx, n) => {
            // A failed write deleted nothing.
            let _ = tx.send(n.filter(|_| written));
        }
        Completion::Push { .. } | Completion::Unhold { .. } | Completion::Queued { .. } => {}
    }
}

/// Offers a newly written item to its recipient's mailbox, if connected,
/// once inbox scans can see it (`User::visible`).
fn push(user: &User, item: Arc<Item>, clock: &mut StageClock) {
    user.visible.fetch_max(item.seq, Ordering::SeqCst);
    if let Some(mb) = user.mailbox() {
        clock.pushed(&item);
        let settles = user.other_settles.load(Ordering::Relaxed);
        item.settle_hint.store(settles + 1, Ordering::Relaxed);
        mb.push_durable(item);
        mb.wake();
    }
}

#[cfg(test)]
mod tests;
