//! The commit thread: group commit for every change to queued state.
//!
//! Event loops, the expiry sweeper and the admin API send [`Request`]s over a
//! bounded channel. The thread blocks only when idle; otherwise it drains up to
//! [`MAX_BATCH`] requests, applies them all to one `WriteBatch`, writes it with
//! `sync = true` (one fsync for the lot), and only then runs their effects:
//! STATUS SENT to senders, items to connected recipients' mailboxes, inflight
//! bookkeeping. This is the durability point of the server: nothing is
//! acknowledged before the write returns.
//!
//! Because one thread decides every change in one order, the rules need no
//! locks: a duplicate SEND is seen by the dedup check (the batch overlay or
//! the store), an ACK and an expiry of the same item cannot both win, and a
//! user's stored items get SEQs in the order they become visible, which is
//! what lets a session merge its mailbox with a store scan (see `session`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;

use crossbeam::channel::{self, Receiver, Sender};

use super::keys::*;
use super::record::{
    decode_receipt, encode_receipt, encode_ref, encode_status, Dedup, Item, ItemView, RefView,
    StatusView, RECEIPT_DELIVERED, RECEIPT_QUEUED, RECEIPT_READ,
};
use super::{Batch, Result, Store};
use crate::core::{now_ms, ConnRef, Core, User};
use crate::net::Notice;
use crate::wire::{flags, StatusCode};

/// Requests drained into one synced batch at most.
pub const MAX_BATCH: usize = 4096;
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
    /// The group's name.
    pub group: Arc<str>,
    /// The members with `recv` at the time of sending, less the sender.
    pub recipients: Vec<Arc<User>>,
}

/// A change to queued state.
pub enum Request {
    /// Store a message.
    Send(SendRequest),
    /// Store a group message.
    GroupSend(GroupSendRequest),
    /// The user's application processed these (SEQ, priority) items.
    Ack {
        user: Arc<User>,
        items: Vec<(u64, u8)>,
    },
    /// The user read message `id` from `from` (sent to `group`, if set).
    Read {
        reader: Arc<User>,
        from: String,
        id: u64,
        group: Option<String>,
    },
    /// Expiry-index keys found due by the sweeper; `done` fires after commit.
    Expire {
        keys: Vec<Box<[u8]>>,
        done: Sender<()>,
    },
    /// Deletes a user's queued (and retained) messages that match `filter`;
    /// senders of undelivered ones get STATUS DELETED. `done` gets the count.
    DeleteMessages {
        user: Arc<User>,
        filter: MessageFilter,
        done: Sender<usize>,
    },
    /// Deletes everything queued for a user (deleted by the admin API);
    /// senders of undelivered messages get STATUS DELETED. `done` fires after
    /// commit.
    Purge { user: Arc<User>, done: Sender<()> },
    /// Fires once everything submitted before it is committed.
    Barrier(Sender<()>),
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

/// The commit queue refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull;

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

/// A new commit queue.
pub fn queue() -> (Commit, CommitQueue) {
    let (tx, rx) = channel::bounded(QUEUE_CAPACITY);
    (Commit { tx }, CommitQueue { rx })
}

impl Commit {
    /// Queues a request without blocking; fails if the queue is full (the
    /// store cannot keep up) or the thread is gone. The request is dropped.
    pub fn try_submit(&self, req: Request) -> Result<(), QueueFull> {
        self.tx.try_send(req).map_err(|_| QueueFull)
    }

    /// Queues a request, waiting for room.
    pub fn submit(&self, req: Request) -> bool {
        self.tx.send(req).is_ok()
    }

    /// Waits until everything submitted so far is committed.
    pub fn barrier(&self) {
        let (tx, rx) = channel::bounded(1);
        if self.submit(Request::Barrier(tx)) {
            let _ = rx.recv();
        }
    }
}

/// Completion of a request, run after its batch is durable.
pub enum Completion {
    /// Answer a SEND.
    Reply {
        conn: ReplyTo,
        id: u64,
        to: Arc<str>,
        group: bool,
        status: Option<StatusCode>,
    },
    /// Offer a new stored item to its recipient, if connected.
    Push { user: Arc<User>, item: Arc<Item> },
    /// The item is gone from the store: forget it as inflight.
    Settled { user: Arc<User>, seq: u64 },
    /// Fire a barrier.
    Done(Sender<()>),
    /// Answer a count (deleted messages).
    Count(Sender<usize>, usize),
}

/// Starts the commit thread. It exits when every [`Commit`] is dropped and
/// the queue is drained.
pub fn spawn(core: Arc<Core>, queue: CommitQueue) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("tern-commit".into())
        .spawn(move || run(&core, &queue.rx))
}

fn run(core: &Core, rx: &Receiver<Request>) {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        requests.push(first);
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        commit_batch(core, &mut requests);
    }
}

/// Applies, writes and completes one batch of requests.
pub fn commit_batch(core: &Core, requests: &mut Vec<Request>) {
    let count = requests.len() as u64;
    let mut pass = Pass {
        core,
        batch: core.store.batch(),
        dedup: HashMap::new(),
        deleted: HashSet::new(),
        refs: HashMap::new(),
        receipts: HashMap::new(),
        done: Vec::with_capacity(requests.len() * 2),
        now: now_ms(),
    };
    for req in requests.drain(..) {
        if let Err(e) = pass.apply(req) {
            tracing::error!(error = %e, "store read failed while applying a request");
        }
    }
    let Pass { batch, done, .. } = pass;
    let started = std::time::Instant::now();
    let written = batch.is_empty() || batch.commit(true).is_ok();
    core.metrics.record_commit(started.elapsed(), count);
    if !written {
        tracing::error!("synced write failed; the batch is refused");
    }
    for completion in done {
        complete(core, completion, written);
    }
}

fn complete(core: &Core, completion: Completion, written: bool) {
    match completion {
        Completion::Reply {
            conn,
            id,
            to,
            group,
            status,
        } => {
            // A failed write stored nothing: the sender may retry the same ID.
            let status = if written {
                status
            } else {
                status.map(|_| StatusCode::OVERLOADED)
            };
            match conn {
                ReplyTo::Conn(conn) => core.post(
                    conn.worker,
                    Notice::SendDone {
                        conn,
                        id,
                        to,
                        group,
                        status,
                    },
                ),
                ReplyTo::Channel(tx) => {
                    let _ = tx.send(status);
                }
            }
        }
        Completion::Push { user, item } if written => {
            if let Some(mb) = user.mailbox() {
                mb.push_durable(item);
                core.wake(&mb);
            }
        }
        Completion::Settled { user, seq } if written => {
            user.inflight().remove(&seq);
            if let Some(mb) = user.mailbox() {
                core.wake(&mb);
            }
        }
        Completion::Done(tx) => {
            let _ = tx.send(());
        }
        Completion::Count(tx, n) => {
            // A failed write deleted nothing.
            let _ = tx.send(if written { n } else { 0 });
        }
        Completion::Settled { user, seq } => {
            // Nothing was written: the item is still queued; let a later ACK retry.
            if let Some(entry) = user.inflight().get_mut(&seq) {
                entry.acking = false;
            }
        }
        Completion::Push { .. } => {}
    }
}

/// The state of one batch being built.
struct Pass<'c> {
    core: &'c Core,
    /// The synced write under construction.
    batch: Batch<'c>,
    /// Dedup records changed in this batch (None = deleted): reads see them
    /// before the store.
    dedup: HashMap<Vec<u8>, Option<Dedup>>,
    /// Inbox keys deleted in this batch.
    deleted: HashSet<Vec<u8>>,
    /// Reference counts of group messages changed in this batch.
    refs: HashMap<u64, u32>,
    /// Member receipts changed in this batch (None = deleted).
    receipts: HashMap<Vec<u8>, Option<(u64, u8)>>,
    /// What to do once the batch is durable, in order.
    done: Vec<Completion>,
    /// One clock reading for the whole batch.
    now: u64,
}

impl Pass<'_> {
    fn store(&self) -> &Store {
        &self.core.store
    }

    fn apply(&mut self, req: Request) -> Result<()> {
        match req {
            Request::Send(send) => self.send(send),
            Request::GroupSend(send) => self.group_send(send),
            Request::Ack { user, items } => {
                for (seq, priority) in items {
                    self.settle(&user, priority, seq, Settle::Acked)?;
                }
                Ok(())
            }
            Request::Read {
                reader,
                from,
                id,
                group: None,
            } => self.read(&reader, &from, id),
            Request::Read {
                reader,
                from,
                id,
                group: Some(group),
            } => self.group_read(&reader, &from, id, &group),
            Request::Expire { keys, done } => {
                for key in keys {
                    self.expire(&key)?;
                }
                self.done.push(Completion::Done(done));
                Ok(())
            }
            Request::DeleteMessages { user, filter, done } => {
                let mut n = 0;
                for key in self.store().inbox_keys(&user.address)? {
                    let Some((_, priority, seq)) = parse_inbox_key(&key) else {
                        continue;
                    };
                    let Some(value) = self.get_inbox(&key)? else {
                        continue;
                    };
                    let hit = match crate::store::record::decode_item(&value) {
                        Some(ItemView::Msg(m)) => filter.matches(m.from, m.id, m.time),
                        Some(ItemView::Ref(r)) => filter.matches(r.from, r.id, r.time),
                        _ => false,
                    };
                    if hit {
                        self.settle(&user, priority, seq, Settle::Deleted)?;
                        n += 1;
                    }
                }
                for (key, value) in self.store().history_keys(&user.address)? {
                    if let Some(ItemView::Msg(m)) = crate::store::record::decode_item(&value) {
                        if filter.matches(m.from, m.id, m.time) {
                            self.batch.delete(CF_HISTORY, &key)?;
                            n += 1;
                        }
                    }
                }
                self.done.push(Completion::Count(done, n));
                Ok(())
            }
            Request::Purge { user, done } => {
                for key in self.store().inbox_keys(&user.address)? {
                    if let Some((_, priority, seq)) = parse_inbox_key(&key) {
                        self.settle(&user, priority, seq, Settle::Deleted)?;
                    }
                }
                self.done.push(Completion::Done(done));
                Ok(())
            }
            Request::Barrier(tx) => {
                self.done.push(Completion::Done(tx));
                Ok(())
            }
        }
    }

    fn get_dedup(&self, key: &[u8]) -> Result<Option<Dedup>> {
        if let Some(d) = self.dedup.get(key) {
            return Ok(d.clone());
        }
        Ok(self
            .store()
            .get(CF_DEDUP, key)?
            .and_then(|v| Dedup::decode(&v)))
    }

    fn put_dedup(&mut self, key: Vec<u8>, d: Dedup) -> Result<()> {
        self.batch.put(CF_DEDUP, &key, &d.encode())?;
        self.dedup.insert(key, Some(d));
        Ok(())
    }

    /// Records an accepted SEND for duplicate detection until `until` (ms).
    fn remember(&mut self, key: Vec<u8>, until: u64, record: Dedup) -> Result<()> {
        self.batch
            .put(CF_EXPIRY, &expiry_key(until, EXPIRE_DEDUP, &key), &[])?;
        self.put_dedup(key, record)
    }

    fn get_inbox(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.deleted.contains(key) {
            return Ok(None);
        }
        self.store().get(CF_INBOX, key)
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
        self.core
            .metrics
            .deduplicated
            .fetch_add(1, Ordering::Relaxed);
        self.done.push(Completion::Reply {
            conn: conn.clone(),
            id,
            to: to.clone(),
            group,
            status: Some(d.status),
        });
        Ok(None)
    }

    fn send(&mut self, send: SendRequest) -> Result<()> {
        let SendRequest {
            accept: req,
            recipient,
        } = send;
        let to: Arc<str> = recipient.address.clone();
        let Some(dedup) = self.first_time(&req.sender, req.id, &req.conn, &to, false)? else {
            return Ok(());
        };
        let seq = recipient.next_seq();
        let inbox = inbox_key(&recipient.address, req.priority, seq);
        self.batch.put(CF_INBOX, &inbox, &req.record)?;
        self.batch.put(
            CF_EXPIRY,
            &expiry_key(req.expire_at, EXPIRE_ITEM, &inbox),
            &[],
        )?;
        if let Some(key) = dedup {
            let record = Dedup {
                status: StatusCode::SENT,
                flags: req.flags,
                priority: req.priority,
                seq,
                time: req.time,
                expire_at: req.expire_at,
                recipient: recipient.address.to_string(),
            };
            self.remember(key, req.dedup_until, record)?;
        }
        recipient.queued.fetch_add(1, Ordering::Relaxed);
        self.core.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        self.done.push(Completion::Reply {
            conn: req.conn,
            id: req.id,
            to,
            group: false,
            status: (req.id != 0).then_some(StatusCode::SENT),
        });
        self.done.push(Completion::Push {
            user: recipient,
            item: Arc::new(Item {
                seq,
                priority: req.priority,
                ephemeral: false,
                record: req.record,
            }),
        });
        Ok(())
    }

    /// Removes a queued item that was ACKed or has expired, and stores the
    /// status its sender is owed.
    fn settle(&mut self, user: &Arc<User>, priority: u8, seq: u64, how: Settle) -> Result<()> {
        let key = inbox_key(&user.address, priority, seq);
        let Some(record) = self.get_inbox(&key)? else {
            self.done.push(Completion::Settled {
                user: user.clone(),
                seq,
            });
            return Ok(());
        };
        let Some(view) = crate::store::record::decode_item(&record) else {
            tracing::error!(user = %user.address, seq, "corrupt inbox record dropped");
            self.batch.delete(CF_INBOX, &key)?;
            self.deleted.insert(key);
            return Ok(());
        };
        self.batch.delete(CF_INBOX, &key)?;
        self.batch
            .delete(CF_EXPIRY, &expiry_key(view.expire_at(), EXPIRE_ITEM, &key))?;
        let _ = user
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        self.done.push(Completion::Settled {
            user: user.clone(),
            seq,
        });
        if how == Settle::Acked && self.core.config.retain_delivered {
            let kept = match view {
                ItemView::Msg(_) => Some(Arc::<[u8]>::from(&record[..])),
                ItemView::Ref(r) => self.store().message(r.msgno)?,
                ItemView::Status(_) => None,
            };
            if let Some(kept) = kept {
                self.batch
                    .put(CF_HISTORY, &history_key(&user.address, seq), &kept)?;
            }
        }
        if let ItemView::Msg(m) = view {
            let (new_status, wanted) = match how {
                Settle::Acked => {
                    self.core.metrics.delivered.fetch_add(1, Ordering::Relaxed);
                    (
                        StatusCode::DELIVERED,
                        m.flags & flags::DELIVERY_RECEIPT != 0,
                    )
                }
                Settle::Expired => {
                    self.core.metrics.expired.fetch_add(1, Ordering::Relaxed);
                    (StatusCode::EXPIRED, true)
                }
                Settle::Deleted => (StatusCode::DELETED, true),
            };
            if m.id != 0 {
                let dkey = dedup_key(m.from, m.id);
                let mut owed = false;
                if let Some(mut d) = self.get_dedup(&dkey)? {
                    // Only a message still queued moves on; READ stays READ.
                    if d.status == StatusCode::SENT {
                        d.status = new_status;
                        self.put_dedup(dkey, d)?;
                        owed = true;
                    } else {
                        owed = how == Settle::Acked;
                    }
                }
                if owed && wanted {
                    let (from, id) = (m.from.to_owned(), m.id);
                    self.store_status(&from, id, Some(&user.address), None, None, new_status)?;
                }
            }
        } else if let ItemView::Ref(r) = view {
            self.release_message(r.msgno)?;
            let (from, group) = (r.from.to_owned(), r.group.to_owned());
            let receipt = member_receipt_key(&from, r.id, &user.address);
            let member = Some(&*user.address);
            match how {
                Settle::Acked => {
                    self.core.metrics.delivered.fetch_add(1, Ordering::Relaxed);
                    if r.id != 0 && r.flags & flags::READ_RECEIPT != 0 {
                        if let Some((seq, RECEIPT_QUEUED)) = self.get_receipt(&receipt)? {
                            self.put_receipt(receipt, seq, RECEIPT_DELIVERED)?;
                        }
                    }
                    if r.id != 0 && r.flags & flags::DELIVERY_RECEIPT != 0 {
                        self.store_status(
                            &from,
                            r.id,
                            None,
                            Some(&group),
                            member,
                            StatusCode::DELIVERED,
                        )?;
                    }
                }
                Settle::Expired | Settle::Deleted => {
                    let status = if how == Settle::Expired {
                        self.core.metrics.expired.fetch_add(1, Ordering::Relaxed);
                        StatusCode::EXPIRED
                    } else {
                        StatusCode::DELETED
                    };
                    if r.id != 0 {
                        self.batch.delete(CF_DEDUP, &receipt)?;
                        self.receipts.insert(receipt, None);
                        self.store_status(&from, r.id, None, Some(&group), member, status)?;
                    }
                }
            }
        } else if how == Settle::Expired {
            self.core.metrics.expired.fetch_add(1, Ordering::Relaxed);
        }
        self.deleted.insert(key);
        Ok(())
    }

    /// One inbox item fewer refers to a group message; the last one deletes it.
    fn release_message(&mut self, msgno: u64) -> Result<()> {
        let refs = match self.refs.get(&msgno) {
            Some(&n) => n,
            None => self
                .store()
                .get(CF_MESSAGES, &message_refs_key(msgno))?
                .and_then(|v| v.as_slice().try_into().ok().map(u32::from_be_bytes))
                .unwrap_or(1),
        };
        let left = refs.saturating_sub(1);
        if left == 0 {
            self.batch.delete(CF_MESSAGES, &message_key(msgno))?;
            self.batch.delete(CF_MESSAGES, &message_refs_key(msgno))?;
        } else {
            self.batch
                .put(CF_MESSAGES, &message_refs_key(msgno), &left.to_be_bytes())?;
        }
        self.refs.insert(msgno, left);
        Ok(())
    }

    fn get_receipt(&self, key: &[u8]) -> Result<Option<(u64, u8)>> {
        if let Some(r) = self.receipts.get(key) {
            return Ok(*r);
        }
        Ok(self
            .store()
            .get(CF_DEDUP, key)?
            .and_then(|v| decode_receipt(&v)))
    }

    fn put_receipt(&mut self, key: Vec<u8>, seq: u64, state: u8) -> Result<()> {
        self.batch
            .put(CF_DEDUP, &key, &encode_receipt(seq, state))?;
        self.receipts.insert(key, Some((seq, state)));
        Ok(())
    }

    fn group_send(&mut self, send: GroupSendRequest) -> Result<()> {
        let GroupSendRequest {
            accept: req,
            group,
            recipients,
        } = send;
        let Some(dedup) = self.first_time(&req.sender, req.id, &req.conn, &group, true)? else {
            return Ok(());
        };
        let msgno = self.core.next_msgno();
        let count = u32::try_from(recipients.len()).unwrap_or(u32::MAX);
        if count > 0 {
            self.batch
                .put(CF_MESSAGES, &message_key(msgno), &req.record)?;
            self.batch
                .put(CF_MESSAGES, &message_refs_key(msgno), &count.to_be_bytes())?;
            self.refs.insert(msgno, count);
        }
        let reference = encode_ref(&RefView {
            time: req.time,
            expire_at: req.expire_at,
            id: req.id,
            flags: req.flags,
            msgno,
            from: &req.sender.address,
            group: &group,
        });
        let receipts = req.id != 0 && req.flags & flags::READ_RECEIPT != 0;
        for user in recipients {
            let seq = user.next_seq();
            let inbox = inbox_key(&user.address, req.priority, seq);
            self.batch.put(CF_INBOX, &inbox, &reference)?;
            self.batch.put(
                CF_EXPIRY,
                &expiry_key(req.expire_at, EXPIRE_ITEM, &inbox),
                &[],
            )?;
            if receipts {
                let key = member_receipt_key(&req.sender.address, req.id, &user.address);
                self.put_receipt(key, seq, RECEIPT_QUEUED)?;
            }
            user.queued.fetch_add(1, Ordering::Relaxed);
            self.done.push(Completion::Push {
                user,
                item: Arc::new(Item {
                    seq,
                    priority: req.priority,
                    ephemeral: false,
                    record: req.record.clone(),
                }),
            });
        }
        if let Some(key) = dedup {
            let record = Dedup {
                status: StatusCode::SENT,
                flags: req.flags,
                priority: req.priority,
                seq: 0,
                time: req.time,
                expire_at: req.expire_at,
                recipient: group.to_string(),
            };
            self.remember(key, req.dedup_until, record)?;
        }
        self.core.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        self.done.push(Completion::Reply {
            conn: req.conn,
            id: req.id,
            to: group,
            group: true,
            status: (req.id != 0).then_some(StatusCode::SENT),
        });
        Ok(())
    }

    fn group_read(&mut self, reader: &User, from: &str, id: u64, group: &str) -> Result<()> {
        if id == 0 || !crate::wire::is_valid_address(from) || !crate::wire::is_valid_address(group)
        {
            return Ok(());
        }
        match self.get_dedup(&dedup_key(from, id))? {
            Some(d) if d.recipient == group && d.flags & flags::READ_RECEIPT != 0 => {}
            _ => return Ok(()),
        }
        let key = member_receipt_key(from, id, &reader.address);
        let delivered = match self.get_receipt(&key)? {
            Some((_, RECEIPT_DELIVERED)) => true,
            Some((seq, RECEIPT_QUEUED)) => reader.inflight().contains_key(&seq),
            _ => false,
        };
        if !delivered {
            return Ok(());
        }
        let seq = self.get_receipt(&key)?.map(|(seq, _)| seq).unwrap_or(0);
        self.put_receipt(key, seq, RECEIPT_READ)?;
        self.store_status(
            from,
            id,
            None,
            Some(group),
            Some(&reader.address),
            StatusCode::READ,
        )
    }

    fn read(&mut self, reader: &User, from: &str, id: u64) -> Result<()> {
        if id == 0 || !crate::wire::is_valid_address(from) {
            return Ok(());
        }
        let key = dedup_key(from, id);
        let Some(mut d) = self.get_dedup(&key)? else {
            return Ok(());
        };
        let delivered = match d.status {
            StatusCode::DELIVERED => true,
            StatusCode::SENT => reader.inflight().contains_key(&d.seq),
            _ => false,
        };
        if d.recipient != *reader.address || d.flags & flags::READ_RECEIPT == 0 || !delivered {
            return Ok(());
        }
        d.status = StatusCode::READ;
        self.put_dedup(key, d)?;
        self.store_status(
            from,
            id,
            Some(&reader.address),
            None,
            None,
            StatusCode::READ,
        )
    }

    fn expire(&mut self, expiry: &[u8]) -> Result<()> {
        self.batch.delete(CF_EXPIRY, expiry)?;
        let Some((_, kind, key)) = parse_expiry_key(expiry) else {
            return Ok(());
        };
        match kind {
            EXPIRE_ITEM => {
                let Some((address, priority, seq)) = parse_inbox_key(key) else {
                    return Ok(());
                };
                if let Some(user) = self.core.users.pin().get(address).cloned() {
                    self.settle(&user, priority, seq, Settle::Expired)?;
                } else {
                    self.batch.delete(CF_INBOX, key)?;
                }
            }
            EXPIRE_DEDUP => {
                // The send's record and, for a group send, its member receipts.
                self.batch.delete_range(CF_DEDUP, key, &prefix_end(key))?;
                self.dedup.insert(key.to_vec(), None);
            }
            _ => {}
        }
        Ok(())
    }

    /// Queues a STATUS for the sender `owner` of message `id`, about the
    /// recipient `to` or the `member` of `group`.
    fn store_status(
        &mut self,
        owner: &str,
        id: u64,
        to: Option<&str>,
        group: Option<&str>,
        member: Option<&str>,
        status: StatusCode,
    ) -> Result<()> {
        let Some(owner) = self.core.user(owner) else {
            return Ok(());
        };
        let seq = owner.next_seq();
        let expire_at = self
            .now
            .saturating_add(u64::from(self.core.config.max_expiry) * 1000);
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
        owner.queued.fetch_add(1, Ordering::Relaxed);
        self.done.push(Completion::Push {
            user: owner,
            item: Arc::new(Item {
                seq,
                priority: 0,
                ephemeral: false,
                record,
            }),
        });
        Ok(())
    }
}

/// Why a queued item leaves the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// The recipient ACKed it: DELIVERED.
    Acked,
    /// Its EXPIRY passed: EXPIRED.
    Expired,
    /// An operator removed it: DELETED.
    Deleted,
}
