//! One batch being built: the store batch, the overlays that let a request
//! see what earlier requests of the same batch wrote, and the completions to
//! run once it is durable.
//!
//! Every request runs under a save point. Its writes are staged in the store
//! batch, its overlay changes in `cur`, its completions after `sealed` in
//! `done` and its counters in `cur_tally`; success seals all four into the
//! batch, failure drops all four and queues the request's failure
//! completions instead (the SEND is answered OVERLOADED, an ACK can be
//! retried, a waiter is released).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use foldhash::{HashMap, HashSet};

use super::{Committer, Completion, GroupSendRequest, Request, SendRequest};
use crate::mailbox::Answer;
use crate::metrics::Metrics;
use crate::store::keys::{
    dedup_key, expiry_key, inbox_prefix, message_key, message_members_key, message_refs_key,
    prefix_end, CF_DEDUP, CF_EXPIRY, CF_HISTORY, CF_INBOX, CF_MESSAGES, EXPIRE_GROUP,
};
use crate::store::record::{
    bit, decode_receipt, decode_refs, encode_receipt, encode_refs, Dedup, ItemView,
};
use crate::store::{Batch, Result, Store};
use crate::wire::StatusCode;

/// A retained message: its history key and its MSG record.
pub type Retained = (Vec<u8>, Arc<[u8]>);

/// Counters a batch adds to the metrics once it is written.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Messages accepted.
    pub accepted: u64,
    /// Items ACKed.
    pub delivered: u64,
    /// Items expired.
    pub expired: u64,
    /// SENDs answered from their dedup record.
    pub deduplicated: u64,
    /// Requests rolled back by a store error.
    pub failed: u64,
    /// New messages refused for lack of disk space.
    pub refused_space: u64,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.accepted += o.accepted;
        self.delivered += o.delivered;
        self.expired += o.expired;
        self.deduplicated += o.deduplicated;
        self.failed += o.failed;
        self.refused_space += o.refused_space;
    }

    /// Adds these counts to the exported metrics.
    pub fn add_to(&self, m: &Metrics) {
        let add = |c: &AtomicU64, n: u64| {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&m.accepted, self.accepted);
        add(&m.delivered, self.delivered);
        add(&m.expired, self.expired);
        add(&m.deduplicated, self.deduplicated);
        add(&m.failed_requests, self.failed);
        add(&m.refused_space, self.refused_space);
    }
}

/// What requests of this batch changed, so later ones read it before the
/// store; and, while this batch is being written, what the next batch reads
/// before the store (see `commit`'s pipeline).
#[derive(Default)]
pub(super) struct Overlay {
    /// Dedup records (None = deleted).
    dedup: HashMap<Vec<u8>, Option<Dedup>>,
    /// Inbox keys deleted.
    deleted: HashSet<Vec<u8>>,
    /// Reference counts and `held` bitmaps of group messages.
    refs: HashMap<u64, Refs>,
    /// Group messages whose count went down, with their shared expiry time
    /// (for REFs that share one expiry entry): written once per batch, by
    /// [`Pass::finish`], however many of their REFs the batch settles.
    released: HashMap<u64, Option<u64>>,
    /// Member receipts (None = deleted).
    receipts: HashMap<Vec<u8>, Option<(u64, u8)>>,
    /// Retained (history) records written or deleted (None).
    history: BTreeMap<Vec<u8>, Option<Arc<[u8]>>>,
}

impl Overlay {
    fn absorb(&mut self, o: &mut Overlay) {
        self.dedup.extend(o.dedup.drain());
        self.deleted.extend(o.deleted.drain());
        self.refs.extend(o.refs.drain());
        self.released.extend(o.released.drain());
        self.receipts.extend(o.receipts.drain());
        self.history.append(&mut o.history);
    }
}

/// A group send's references as a batch sees them: how many members'
/// shares are still queued, and which of them are held in memory only
/// (`store::record::encode_refs`).
#[derive(Clone, Debug, Default)]
pub(super) struct Refs {
    pub count: u32,
    pub held: Box<[u8]>,
}

/// The state of one batch being built.
pub(super) struct Pass<'c> {
    /// The commit thread's parts.
    pub c: &'c Committer,
    /// The synced write under construction.
    pub batch: Batch<'c>,
    /// What sealed requests changed.
    base: Overlay,
    /// What the current request changed.
    cur: Overlay,
    /// What the batch before this one changed, if it may not be in the
    /// store yet (it is being written while this one is built).
    prev: Overlay,
    /// Dedup records read from the store before the batch began, all at
    /// once ([`Prefetch`]); read after every overlay, as the store is.
    prefetched: Prefetch,
    /// Completions, in order: of sealed requests up to `sealed`, of the
    /// current request after it.
    done: Vec<Completion>,
    sealed: usize,
    /// Counters of sealed requests.
    tally: Tally,
    /// Counters of the current request.
    pub cur_tally: Tally,
    /// One clock reading for the whole batch.
    pub now: u64,
    /// What the group shares this batch decided to hold in memory cost,
    /// bytes (`send::may_hold`).
    pub held_new: usize,
}

/// The dedup records a batch's requests will look up, read from the store
/// in one MultiGet before the batch begins (a `get` each was half of the
/// commit thread's time at the durable maximum): each SEND's own, and the
/// record of each 1:1 message an ACK settles (its session's copy names it).
///
/// What the store holds under these keys changes meanwhile only by the
/// batch being written, whose changes the batch reads first from its
/// overlay, and by the compaction filter, which drops records that are
/// gone (and read as absent either way); so a prefetched value is what a
/// `get` would return then.
#[derive(Default)]
pub(super) struct Prefetch(HashMap<Vec<u8>, Option<Vec<u8>>>);

impl Prefetch {
    /// Reads the records `requests` will look up. A key whose read fails is
    /// left to a `get` of its own (whose error rolls back its request).
    pub fn read(store: &Store, requests: &[Request]) -> Prefetch {
        let mut keys = Vec::new();
        for r in requests {
            match r {
                Request::Send(SendRequest { accept, .. })
                | Request::GroupSend(GroupSendRequest { accept, .. })
                    if accept.id != 0 =>
                {
                    keys.push(dedup_key(&accept.sender.address, accept.id));
                }
                Request::Ack { items, .. } => {
                    for a in items {
                        if let Some(ItemView::Msg(m)) =
                            a.item.as_ref().and_then(|i| i.stored_view())
                        {
                            if m.id != 0 {
                                keys.push(dedup_key(m.from, m.id));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if keys.is_empty() {
            return Prefetch::default();
        }
        keys.sort_unstable();
        keys.dedup();
        let Ok(values) = store.multi_get(CF_DEDUP, &keys) else {
            return Prefetch::default();
        };
        let mut map = HashMap::with_capacity_and_hasher(keys.len(), Default::default());
        for (key, value) in keys.into_iter().zip(values) {
            if let Ok(value) = value {
                map.insert(key, value);
            }
        }
        Prefetch(map)
    }
}

/// How big a batch was: the next one starts with room for as much (a
/// group send to a thousand members queues a thousand completions, and
/// growing the buffers request by request copied them over and over).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sizes {
    /// Staged changes.
    pub ops: usize,
    /// Their keys and values, bytes.
    pub bytes: usize,
    /// Completions.
    pub done: usize,
}

impl Sizes {
    /// The sizes of a batch and its completions, as a hint for the next
    /// one: capped, so that one huge batch (an operator's purge) does not
    /// make the next, small one reserve as much.
    pub fn of(batch: Option<&Batch<'_>>, done: &[Completion]) -> Sizes {
        const MAX_OPS: usize = 1 << 16;
        let (ops, bytes) = batch.map_or((0, 0), Batch::size);
        Sizes {
            ops: ops.min(MAX_OPS),
            bytes: bytes.min(MAX_OPS * 256),
            done: done.len().min(MAX_OPS),
        }
    }
}

impl<'c> Pass<'c> {
    /// A new batch, built on `prev` (what the batch being written changes;
    /// empty when the store has everything).
    pub fn new(
        c: &'c Committer,
        now: u64,
        requests: usize,
        prev: Overlay,
        hint: Sizes,
        prefetched: Prefetch,
    ) -> Pass<'c> {
        Pass {
            c,
            batch: c.store.batch_with_capacity(hint.ops, hint.bytes),
            base: Overlay::default(),
            cur: Overlay::default(),
            prev,
            prefetched,
            done: Vec::with_capacity((requests * 2).max(hint.done)),
            sealed: 0,
            tally: Tally::default(),
            cur_tally: Tally::default(),
            now,
            held_new: 0,
        }
    }

    pub fn store(&self) -> &Store {
        &self.c.store
    }

    /// Applies one request under a save point.
    pub fn apply(&mut self, req: Request) {
        match self.dispatch(&req) {
            Ok(()) => {
                self.batch.seal();
                self.base.absorb(&mut self.cur);
                self.sealed = self.done.len();
                self.tally.merge(std::mem::take(&mut self.cur_tally));
            }
            Err(e) => {
                tracing::error!(error = %e, "store error: one request rolled back");
                self.batch.rollback();
                self.cur = Overlay::default();
                self.done.truncate(self.sealed);
                self.cur_tally = Tally::default();
                self.tally.failed += 1;
                failed(req, &mut self.done);
                self.sealed = self.done.len();
            }
        }
    }

    fn dispatch(&mut self, req: &Request) -> Result<()> {
        match req {
            Request::Send(send) => self.send(send),
            Request::GroupSend(send) => self.group_send(send),
            Request::Ack { user, items } => self.ack(user, items),
            Request::Read {
                reader,
                from,
                id,
                group: None,
            } => self.read(reader.user(), from, *id),
            Request::Read {
                reader,
                from,
                id,
                group: Some(group),
            } => self.group_read(reader.user(), from, *id, group),
            Request::Expire { keys, done } => {
                for key in keys {
                    self.expire(key)?;
                }
                self.then(Completion::Done(done.clone(), true));
                Ok(())
            }
            Request::DeleteMessages { user, filter, done } => {
                let n = self.delete_messages(user, filter)?;
                self.then(Completion::Count(done.clone(), Some(n)));
                Ok(())
            }
            Request::Purge { user, done } => {
                self.purge(user)?;
                self.then(Completion::Done(done.clone(), true));
                Ok(())
            }
            Request::Barrier(tx) => {
                self.then(Completion::Done(tx.clone(), true));
                Ok(())
            }
        }
    }

    /// The batch to write (`None` if its last writes could not be staged:
    /// then nothing may be written), the completions to run after it, its
    /// counters, and what it changes (for the batch built while it is
    /// written).
    pub fn finish(mut self) -> (Option<Batch<'c>>, Vec<Completion>, Tally, Overlay) {
        let batch = match self.write_refs() {
            Ok(()) => {
                self.batch.seal();
                Some(self.batch)
            }
            Err(e) => {
                tracing::error!(error = %e, "store error: the batch is refused");
                None
            }
        };
        (batch, self.done, self.tally, self.base)
    }

    /// The new reference count of each group message released in this
    /// batch; the last release deletes the message, its count, its member
    /// list and its shared expiry entry.
    fn write_refs(&mut self) -> Result<()> {
        for (&msgno, &shared_at) in &self.base.released {
            if let Some(left) = self.base.refs.get(&msgno).filter(|r| r.count > 0) {
                let value = encode_refs(left.count, &left.held);
                self.batch
                    .put(CF_MESSAGES, &message_refs_key(msgno), &value)?;
                continue;
            }
            self.batch.delete(CF_MESSAGES, &message_key(msgno))?;
            self.batch.delete(CF_MESSAGES, &message_refs_key(msgno))?;
            if let Some(at) = shared_at {
                self.batch
                    .delete(CF_MESSAGES, &message_members_key(msgno))?;
                let entry = expiry_key(at, EXPIRE_GROUP, &msgno.to_be_bytes());
                self.batch.single_delete(CF_EXPIRY, &entry)?;
            }
        }
        Ok(())
    }

    /// Queues a completion of the current request.
    pub fn then(&mut self, completion: Completion) {
        self.done.push(completion);
    }

    /// The dedup record of a send, unless it is [`Dedup::gone`] (then it
    /// is absent, whether compaction dropped it yet or not).
    pub fn get_dedup(&self, key: &[u8]) -> Result<Option<Dedup>> {
        Ok(self.dedup_record(key)?.filter(|d| !d.gone(self.now)))
    }

    /// The dedup record stored under `key`, gone or not.
    fn dedup_record(&self, key: &[u8]) -> Result<Option<Dedup>> {
        let d = self.cur.dedup.get(key);
        let d = d.or_else(|| self.base.dedup.get(key));
        Ok(match d.or_else(|| self.prev.dedup.get(key)) {
            Some(d) => d.clone(),
            None => match self.prefetched.0.get(key) {
                Some(v) => v.as_deref().and_then(Dedup::decode),
                None => self
                    .store()
                    .get(CF_DEDUP, key)?
                    .and_then(|v| Dedup::decode(&v)),
            },
        })
    }

    pub fn put_dedup(&mut self, key: Vec<u8>, d: Dedup) -> Result<()> {
        self.batch.put(CF_DEDUP, &key, &d.encode())?;
        self.cur.dedup.insert(key, Some(d));
        Ok(())
    }

    /// Forgets a dedup record and, with `receipts`, the member receipts
    /// stored under its key. Point deletes, never a range delete: dedup
    /// records expire at the rate messages arrive, and RocksDB's point
    /// look-ups slow down with every range tombstone in the memtable (in a
    /// soak with a 5-minute window, 15,000 an hour took the batch stage from
    /// a millisecond to a second).
    ///
    /// `at` is the due time of the expiry entry that asks: a record with
    /// another `until` belongs to a later send that reused the ID once this
    /// one was forgotten, and is left alone (with its receipts) for its
    /// own entry.
    pub fn forget_dedup(&mut self, key: &[u8], receipts: bool, at: u64) -> Result<()> {
        if let Some(d) = self.dedup_record(key)? {
            if d.until != 0 && d.until != at {
                return Ok(());
            }
        }
        if receipts {
            for receipt in self.store().keys_in(CF_DEDUP, key, &prefix_end(key))? {
                // The range starts with the record itself, deleted below.
                if receipt.len() > key.len() {
                    self.batch.delete(CF_DEDUP, &receipt)?;
                    self.cur.receipts.insert(receipt, None);
                }
            }
        }
        self.batch.delete(CF_DEDUP, key)?;
        self.cur.dedup.insert(key.to_vec(), None);
        Ok(())
    }

    pub fn get_inbox(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.inbox_deleted(key) {
            return Ok(None);
        }
        self.store().get(CF_INBOX, key)
    }

    /// Whether this batch (or the one being written) deleted the inbox item
    /// `key`.
    pub fn inbox_deleted(&self, key: &[u8]) -> bool {
        [&self.cur, &self.base, &self.prev]
            .iter()
            .any(|o| o.deleted.contains(key))
    }

    /// Deletes an inbox item (the caller deletes its expiry entry).
    pub fn delete_inbox(&mut self, key: Vec<u8>) -> Result<()> {
        self.batch.single_delete(CF_INBOX, &key)?;
        self.cur.deleted.insert(key);
        Ok(())
    }

    /// Retains a delivered message's record under `key`.
    pub fn put_history(&mut self, key: Vec<u8>, record: Arc<[u8]>) -> Result<()> {
        self.batch.put(CF_HISTORY, &key, &record)?;
        self.cur.history.insert(key, Some(record));
        Ok(())
    }

    /// Forgets a retained message.
    pub fn delete_history(&mut self, key: Vec<u8>) -> Result<()> {
        self.batch.delete(CF_HISTORY, &key)?;
        self.cur.history.insert(key, None);
        Ok(())
    }

    /// A user's retained messages as this batch sees them: the store's, less
    /// those deleted in this batch, plus those retained in it (an ACK and a
    /// delete in the same batch must agree).
    pub fn history(&self, address: &str) -> Result<Vec<Retained>> {
        let prefix = inbox_prefix(address);
        let end = prefix_end(&prefix);
        let mut all: BTreeMap<Vec<u8>, Option<Arc<[u8]>>> = self
            .store()
            .history_keys(address)?
            .into_iter()
            .map(|(k, v)| (k, Some(Arc::from(v))))
            .collect();
        for overlay in [&self.prev.history, &self.base.history, &self.cur.history] {
            for (k, v) in overlay.range(prefix.clone()..end.clone()) {
                all.insert(k.clone(), v.clone());
            }
        }
        Ok(all.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
    }

    /// A group message's references as this batch sees them (a count of
    /// 1 and nothing held if the store has none: the caller is settling one).
    pub fn refs(&self, msgno: u64) -> Result<Refs> {
        if let Some(r) = self.overlay_refs(msgno) {
            return Ok(r.clone());
        }
        let stored = self.store().get(CF_MESSAGES, &message_refs_key(msgno))?;
        Ok(match stored.as_deref().and_then(decode_refs) {
            Some((count, held)) => Refs {
                count,
                held: held.into(),
            },
            None => Refs {
                count: 1,
                held: Box::default(),
            },
        })
    }

    /// Whether member `i`'s share of group message `msgno` is held in
    /// memory and not settled, as this batch sees it.
    pub fn is_held(&self, msgno: u64, i: u32) -> Result<bool> {
        match self.overlay_refs(msgno) {
            // No copy of the bitmap: this is asked once per ACK.
            Some(r) => Ok(bit(&r.held, i)),
            None => Ok(bit(&self.refs(msgno)?.held, i)),
        }
    }

    /// A group message's references, if this batch or the one being
    /// written changed them.
    fn overlay_refs(&self, msgno: u64) -> Option<&Refs> {
        [&self.cur, &self.base, &self.prev]
            .into_iter()
            .find_map(|o| o.refs.get(&msgno))
    }

    /// The references of a group send written by this batch.
    pub fn set_refs(&mut self, msgno: u64, refs: Refs) {
        self.cur.refs.insert(msgno, refs);
    }

    /// What still refers to group message `msgno` (whose REFs share the
    /// expiry entry at `shared_at`, if any): stored at the end of the batch.
    pub fn release_refs(&mut self, msgno: u64, left: Refs, shared_at: Option<u64>) {
        self.cur.refs.insert(msgno, left);
        self.cur.released.insert(msgno, shared_at);
    }

    /// Records that the held share under `key` is settled: no REF to
    /// delete, but later requests of the batch must see it gone.
    pub fn forget_held(&mut self, key: Vec<u8>) {
        self.cur.deleted.insert(key);
    }

    pub fn get_receipt(&self, key: &[u8]) -> Result<Option<(u64, u8)>> {
        let found = [&self.cur, &self.base, &self.prev]
            .iter()
            .find_map(|o| o.receipts.get(key));
        if let Some(r) = found {
            return Ok(*r);
        }
        Ok(self
            .store()
            .get(CF_DEDUP, key)?
            .and_then(|v| decode_receipt(&v)))
    }

    pub fn put_receipt(&mut self, key: Vec<u8>, seq: u64, state: u8) -> Result<()> {
        self.batch
            .put(CF_DEDUP, &key, &encode_receipt(seq, state))?;
        self.cur.receipts.insert(key, Some((seq, state)));
        Ok(())
    }

    pub fn delete_receipt(&mut self, key: Vec<u8>) -> Result<()> {
        self.batch.delete(CF_DEDUP, &key)?;
        self.cur.receipts.insert(key, None);
        Ok(())
    }
}

/// What a request that was rolled back still owes: an answer to its sender,
/// a retry chance for its ACKs, a release for its waiter.
fn failed(req: Request, done: &mut Vec<Completion>) {
    let overloaded = |id: u64| (id != 0).then_some(StatusCode::OVERLOADED);
    match req {
        Request::Send(s) => done.push(Completion::Reply {
            answer: Answer {
                id: s.accept.id,
                to: s.recipient.address.clone(),
                group: false,
                status: overloaded(s.accept.id),
            },
            conn: s.accept.conn,
        }),
        Request::GroupSend(s) => done.push(Completion::Reply {
            answer: Answer {
                id: s.accept.id,
                to: s.group.name.clone(),
                group: true,
                status: overloaded(s.accept.id),
            },
            conn: s.accept.conn,
        }),
        Request::Ack { user, items } => {
            for a in items {
                done.push(Completion::Unsettled {
                    user: user.clone(),
                    seq: a.seq,
                });
            }
        }
        Request::Read { .. } => {}
        Request::Expire { done: tx, .. }
        | Request::Purge { done: tx, .. }
        | Request::Barrier(tx) => done.push(Completion::Done(tx, false)),
        Request::DeleteMessages { done: tx, .. } => done.push(Completion::Count(tx, None)),
    }
}
