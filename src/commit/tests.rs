//! The commit thread's rules against a real RocksDB in a temporary
//! directory, one batch at a time (`commit_batch` called directly: no
//! thread, no sockets).

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use super::*;
use crate::directory::Directory;
use crate::mailbox::Mailbox;
use crate::store::keys::{dedup_key, CF_DEDUP, CF_INBOX};
use crate::store::record::encode_msg;
use crate::store::{MsgView, StoreError};
use crate::wire::flags;

thread_local! {
    /// A SEND with this ID fails with a store error after its first write.
    static FAIL_ID: Cell<u64> = const { Cell::new(0) };
}

/// Where `send` and `group_send` fail when a test asks (between the inbox
/// item and the dedup record: half a request is staged).
pub(super) fn fault_point(id: u64) -> crate::store::Result<()> {
    match FAIL_ID.with(Cell::get) {
        0 => Ok(()),
        f if f == id => Err(StoreError::Injected),
        _ => Ok(()),
    }
}

/// Records what the commit thread tells the event loops.
#[derive(Default)]
struct Recorder {
    answers: Mutex<Vec<(ConnRef, Answer)>>,
    wakes: Mutex<Vec<ConnRef>>,
}

impl Notify for Recorder {
    fn mailbox(&self, conn: ConnRef) {
        self.wakes.lock().unwrap().push(conn);
    }
    fn answer(&self, conn: ConnRef, answer: Answer) {
        self.answers.lock().unwrap().push((conn, answer));
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    c: Committer,
    rec: Arc<Recorder>,
}

fn fixture(users: &[&str]) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(tmp.path()).unwrap());
    let dir = Arc::new(Directory::new(1));
    for u in users {
        dir.insert_user(Arc::new(User::new(u, String::new(), 1)));
    }
    let rec = Arc::new(Recorder::default());
    let c = Committer {
        dir,
        store,
        notify: rec.clone(),
        metrics: Arc::new(Metrics::default()),
        retain_delivered: false,
        max_expiry: 3600,
    };
    Fixture { _dir: tmp, c, rec }
}

const CONN: ConnRef = ConnRef {
    worker: 0,
    token: 7,
    generation: 9,
};

/// What the session submits for a SEND from `from` (to group `group`, if
/// set) with this ID, priority and flags, expiring in a minute.
fn accept(
    f: &Fixture,
    from: &str,
    group: Option<&str>,
    id: u64,
    priority: u8,
    flags: u32,
) -> Accept {
    let now = now_ms();
    let record = encode_msg(&MsgView {
        time: now,
        expire_at: now + 60_000,
        id,
        msg_type: 0,
        flags,
        from,
        group,
        payload: b"hi",
    });
    Accept {
        conn: ReplyTo::Conn(CONN),
        sender: f.c.dir.user(from).unwrap(),
        id,
        priority,
        flags,
        time: now,
        expire_at: now + 60_000,
        dedup_until: now + 60_000,
        record,
        read_us: 0,
    }
}

/// An ACK of `items` (SEQ, priority) by `user`, each with the item its
/// in-flight entry holds, as the session sends it.
fn ack_req(user: &Arc<User>, items: &[(u64, u8)]) -> Request {
    let inflight = user.inflight();
    let items = items
        .iter()
        .map(|&(seq, priority)| Acked {
            seq,
            priority,
            item: inflight.get(&seq).and_then(|e| e.item.clone()),
        })
        .collect();
    Request::Ack {
        user: user.clone(),
        items,
    }
}

/// An operator's delete of message `id` from `from` in `user`'s queue, and
/// where its count of deleted items comes.
fn delete_id(user: &Arc<User>, from: &str, id: u64) -> (Request, channel::Receiver<Option<usize>>) {
    let (done, deleted) = channel::bounded(1);
    let delete = Request::DeleteMessages {
        user: user.clone(),
        filter: MessageFilter::Id {
            from: from.into(),
            id,
        },
        done,
    };
    (delete, deleted)
}

/// The in-flight entry of a priority-0 item its session is ACKing.
fn acking(item: Option<Arc<crate::store::Item>>) -> crate::directory::Inflight {
    crate::directory::Inflight {
        priority: 0,
        acking: true,
        written_us: 0,
        item,
    }
}

fn send(f: &Fixture, from: &str, to: &str, id: u64) -> Request {
    Request::Send(SendRequest {
        accept: accept(f, from, None, id, 0, flags::SEND_DEFAULT),
        recipient: f.c.dir.user(to).unwrap(),
    })
}

/// A group send from `from` to `members` of group "g" (ID, priority, flags
/// as given), as the session would submit it.
fn group_send(
    f: &Fixture,
    from: &str,
    members: &[&str],
    id: u64,
    priority: u8,
    flags: u32,
) -> Request {
    let members = members
        .iter()
        .map(|u| crate::directory::Member {
            user: f.c.dir.user(u).unwrap(),
            send: true,
            recv: true,
        })
        .collect();
    Request::GroupSend(GroupSendRequest {
        accept: accept(f, from, Some("g"), id, priority, flags),
        group: Arc::new(crate::directory::Group {
            name: "g".into(),
            members,
        }),
    })
}

fn answers(f: &Fixture) -> Vec<(u64, Option<StatusCode>)> {
    let mut a = f.rec.answers.lock().unwrap();
    a.drain(..).map(|(_, a)| (a.id, a.status)).collect()
}

fn stored(f: &Fixture, from: &str, id: u64) -> bool {
    f.c.store
        .get(CF_DEDUP, &dedup_key(from, id))
        .unwrap()
        .is_some()
}

#[test]
fn a_store_error_rolls_back_only_its_own_request() {
    let f = fixture(&["alice", "bob"]);
    FAIL_ID.with(|c| c.set(2));
    // Two failures in a row: each keeps its answer.
    let mut batch = vec![
        send(&f, "alice", "bob", 1),
        send(&f, "alice", "bob", 2),
        send(&f, "bob", "alice", 2),
        send(&f, "alice", "bob", 3),
    ];
    commit_batch(&f.c, &mut batch);
    FAIL_ID.with(|c| c.set(0));
    assert_eq!(
        answers(&f),
        [
            (1, Some(StatusCode::SENT)),
            (2, Some(StatusCode::OVERLOADED)),
            (2, Some(StatusCode::OVERLOADED)),
            (3, Some(StatusCode::SENT)),
        ]
    );
    assert!(stored(&f, "alice", 1) && stored(&f, "alice", 3));
    assert!(
        !stored(&f, "alice", 2) && !stored(&f, "bob", 2),
        "the failed requests' keys were written"
    );
    // Only two inbox items (+ nothing half-written from the failed one).
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 2);
    let bob = f.c.dir.user("bob").unwrap();
    assert_eq!(bob.queued.load(Ordering::Relaxed), 2);
    assert_eq!(f.c.metrics.failed_requests.load(Ordering::Relaxed), 2);
    assert_eq!(f.c.metrics.accepted.load(Ordering::Relaxed), 2);
    // The sender retries the same ID: now it is stored, once.
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 2)]);
    assert_eq!(answers(&f), [(2, Some(StatusCode::SENT))]);
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 3);
}

#[test]
fn a_rolled_back_send_is_not_seen_by_the_rest_of_its_batch() {
    let f = fixture(&["alice", "bob"]);
    FAIL_ID.with(|c| c.set(5));
    let mut batch = vec![send(&f, "alice", "bob", 5)];
    commit_batch(&f.c, &mut batch);
    FAIL_ID.with(|c| c.set(0));
    // The same ID again within one batch: the first is stored, the second
    // is a duplicate answered from the batch overlay.
    let mut batch = vec![send(&f, "alice", "bob", 5), send(&f, "alice", "bob", 5)];
    commit_batch(&f.c, &mut batch);
    assert_eq!(
        answers(&f),
        [
            (5, Some(StatusCode::OVERLOADED)),
            (5, Some(StatusCode::SENT)),
            (5, Some(StatusCode::SENT)),
        ]
    );
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1);
    assert_eq!(f.c.metrics.deduplicated.load(Ordering::Relaxed), 1);
}

#[test]
fn ack_settles_once_and_owes_delivered() {
    let f = fixture(&["alice", "bob"]);
    let bob = f.c.dir.user("bob").unwrap();
    let alice = f.c.dir.user("alice").unwrap();
    let mb = Arc::new(Mailbox::new(CONN, f.rec.clone()));
    bob.attached.store(Some(mb.clone()));
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 1)]);
    let item = mb.pop_durable().expect("pushed after commit");
    bob.inflight().insert(item.seq, acking(None));
    let ack = || ack_req(&bob, &[(item.seq, 0)]);
    // Two ACKs of the same item in one batch and one more later: one settlement.
    commit_batch(&f.c, &mut vec![ack(), ack()]);
    commit_batch(&f.c, &mut vec![ack()]);
    assert!(bob.inflight().is_empty());
    assert_eq!(bob.queued.load(Ordering::Relaxed), 0);
    assert_eq!(f.c.metrics.delivered.load(Ordering::Relaxed), 1);
    // Alice's DELIVERED is stored in her inbox (SEND_DEFAULT asks for it).
    assert_eq!(alice.queued.load(Ordering::Relaxed), 1);
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1);
}

#[test]
fn requests_before_a_failure_still_commit() {
    let f = fixture(&["alice", "bob"]);
    let bob = f.c.dir.user("bob").unwrap();
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 1)]);
    let (seq, _) = {
        let scan = f.c.store.scan_inbox("bob", &[0; 16], 10).unwrap();
        (scan.0[0].seq, scan.1)
    };
    let inflight = acking(None);
    bob.inflight().insert(seq, inflight);
    // Fail the ACK's request by making the batch's request list contain a
    // failing SEND after it; the ACK itself commits.
    FAIL_ID.with(|c| c.set(9));
    let ack = ack_req(&bob, &[(seq, 0)]);
    commit_batch(&f.c, &mut vec![ack, send(&f, "alice", "bob", 9)]);
    FAIL_ID.with(|c| c.set(0));
    assert!(
        bob.inflight().is_empty(),
        "the ACK before the failure committed"
    );
    assert_eq!(answers(&f).last(), Some(&(9, Some(StatusCode::OVERLOADED))));
}

/// Regression: with `retain_delivered`, a delete that landed in the same
/// batch as the ACK of its message missed it (history was read from the
/// store only), answered 0 and left the message listed.
#[test]
fn a_delete_sees_a_message_retained_earlier_in_its_batch() {
    let mut f = fixture(&["alice", "bob"]);
    f.c.retain_delivered = true;
    let bob = f.c.dir.user("bob").unwrap();
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 1)]);
    let (items, _) = f.c.store.scan_inbox("bob", &[0; 16], 10).unwrap();
    let seq = items[0].seq;
    bob.inflight().insert(seq, acking(None));
    let (delete, count) = delete_id(&bob, "alice", 1);
    let ack = ack_req(&bob, &[(seq, 0)]);
    commit_batch(&f.c, &mut vec![ack, delete]);
    assert_eq!(count.recv().unwrap(), Some(1));
    assert_eq!(
        f.c.store
            .count_keys(crate::store::keys::CF_HISTORY)
            .unwrap(),
        0
    );
}

/// What kind of request a batch holds, for the `Queues` tests.
fn kinds(batch: &[Request]) -> String {
    batch
        .iter()
        .map(|r| match r {
            Request::Send(_) => 'S',
            Request::Expire { .. } => 'E',
            Request::Barrier(_) => 'B',
            Request::DeleteMessages { .. } => 'D',
            _ => '?',
        })
        .collect()
}

fn expire() -> Request {
    let (done, _) = channel::bounded(1);
    Request::Expire {
        keys: Vec::new(),
        done,
    }
}

/// SENDs go first, settlements take the next turn, and the two alternate;
/// a barrier takes the settlements queued before it along, in order.
#[test]
fn batches_take_turns_and_a_barrier_keeps_order() {
    let f = fixture(&["alice", "bob"]);
    let mut q = Queues::default();
    let mut batch = Vec::new();
    q.add(expire());
    q.add(send(&f, "alice", "bob", 1));
    q.add(expire());
    q.add(send(&f, "alice", "bob", 2));
    q.next_batch(&mut batch);
    assert_eq!(kinds(&batch), "SS");
    batch.clear();
    q.add(send(&f, "alice", "bob", 3));
    q.next_batch(&mut batch);
    assert_eq!(kinds(&batch), "EE", "settlements take the next turn");
    batch.clear();
    q.add(expire());
    q.add(send(&f, "alice", "bob", 4));
    let (tx, _rx) = channel::bounded(1);
    q.add(Request::Barrier(tx));
    q.add(expire());
    q.next_batch(&mut batch);
    // S3 was waiting; the settlement may move past S4, never past B.
    assert_eq!(
        kinds(&batch),
        "SSEB",
        "the barrier comes after all before it"
    );
    batch.clear();
    q.next_batch(&mut batch);
    assert_eq!(kinds(&batch), "E");
    assert!(q.is_empty());
}

/// An operator's delete lists what the store holds: a SEND queued before
/// it, in the same drain, is committed in a batch of its own first, so
/// that the delete finds it; one queued after it goes with it, and stays.
#[test]
fn a_delete_finds_what_was_sent_before_it_in_the_same_drain() {
    let f = fixture(&["alice", "bob"]);
    let bob = f.c.dir.user("bob").unwrap();
    let mut q = Queues::default();
    q.add(send(&f, "alice", "bob", 1));
    let (delete, deleted) = delete_id(&bob, "alice", 1);
    q.add(delete);
    q.add(send(&f, "alice", "bob", 2));
    let mut batch = Vec::new();
    q.next_batch(&mut batch);
    assert_eq!(kinds(&batch), "S");
    commit_batch(&f.c, &mut batch);
    q.next_batch(&mut batch);
    assert_eq!(kinds(&batch), "DS");
    commit_batch(&f.c, &mut batch);
    assert!(q.is_empty());
    assert_eq!(deleted.recv().unwrap(), Some(1), "message 1 deleted");
    let alice = f.c.dir.user("alice").unwrap();
    assert_eq!(
        alice.queued.load(Ordering::Relaxed),
        1,
        "alice owed DELETED"
    );
    assert_eq!(bob.queued.load(Ordering::Relaxed), 1, "message 2 stays");
}

/// Group sends to large groups go into batches that reach at most
/// `MAX_BATCH_REACH` recipients (a first one alone may reach more); sends
/// to users fill up what is left.
#[test]
fn batches_of_group_sends_reach_a_bounded_number_of_members() {
    let f = fixture(&["alice", "bob"]);
    let bob = f.c.dir.user("bob").unwrap();
    let big = |id| {
        let mut req = group_send(&f, "alice", &["bob"], id, 0, 0);
        if let Request::GroupSend(g) = &mut req {
            let member = crate::directory::Member {
                user: bob.clone(),
                send: true,
                recv: true,
            };
            g.group = Arc::new(crate::directory::Group {
                name: "g".into(),
                members: vec![member; MAX_BATCH_REACH / 2 + 1],
            });
        }
        req
    };
    let mut q = Queues::default();
    q.add(big(1));
    q.add(big(2));
    q.add(send(&f, "alice", "bob", 3));
    let mut batch = Vec::new();
    q.next_batch(&mut batch);
    assert_eq!(batch.len(), 1, "two halves and one are over the bound");
    batch.clear();
    q.next_batch(&mut batch);
    assert_eq!(batch.len(), 2, "one half and one are not");
    assert!(q.is_empty());
}

/// A settlement batch holds at most `MAX_SETTLE_BATCH` requests.
#[test]
fn settlement_batches_are_bounded() {
    let mut q = Queues::default();
    for _ in 0..MAX_SETTLE_BATCH + 5 {
        q.add(expire());
    }
    let mut batch = Vec::new();
    q.next_batch(&mut batch);
    assert_eq!(batch.len(), MAX_SETTLE_BATCH);
    batch.clear();
    q.next_batch(&mut batch);
    assert_eq!(batch.len(), 5);
}

/// REF items written before group sends shared one expiry entry (kind 3,
/// an entry each, no member list) still settle: an ACK deletes the item and
/// its own entry, an expiry the rest, and the last one the message.
#[test]
fn refs_with_their_own_expiry_entries_still_settle() {
    use crate::store::keys::*;
    use crate::store::record::{encode_ref, RefView};
    let f = fixture(&["alice", "bob", "carol"]);
    let now = now_ms();
    let (msgno, at) = (77, now + 60_000);
    let record = encode_msg(&MsgView {
        time: now,
        expire_at: at,
        id: 0,
        msg_type: 0,
        flags: 0,
        from: "alice",
        group: Some("g"),
        payload: b"old",
    });
    let old = encode_ref(&RefView {
        time: now,
        expire_at: at,
        id: 0,
        flags: 0,
        msgno,
        from: "alice",
        group: "g",
        shared_expiry: false,
    });
    let mut b = f.c.store.batch();
    b.put(CF_MESSAGES, &message_key(msgno), &record).unwrap();
    b.put(CF_MESSAGES, &message_refs_key(msgno), &2u32.to_be_bytes())
        .unwrap();
    for (user, seq) in [("bob", 5), ("carol", 6)] {
        let key = inbox_key(user, 0, seq);
        b.put(CF_INBOX, &key, &old).unwrap();
        b.put(CF_EXPIRY, &expiry_key(at, EXPIRE_ITEM, &key), &[])
            .unwrap();
    }
    b.seal();
    b.commit(true).unwrap();
    let keys = |cf| f.c.store.count_keys(cf).unwrap();
    let bob = f.c.dir.user("bob").unwrap();
    commit_batch(&f.c, &mut vec![ack_req(&bob, &[(5, 0)])]);
    assert_eq!(
        (keys(CF_INBOX), keys(CF_EXPIRY), keys(CF_MESSAGES)),
        (1, 1, 2)
    );
    let (done, _) = channel::bounded(1);
    let carols = expiry_key(at, EXPIRE_ITEM, &inbox_key("carol", 0, 6));
    commit_batch(
        &f.c,
        &mut vec![Request::Expire {
            keys: vec![carols.into()],
            done,
        }],
    );
    assert_eq!(
        (keys(CF_INBOX), keys(CF_EXPIRY), keys(CF_MESSAGES)),
        (0, 0, 0)
    );
}

/// A group send has one expiry entry and one member list, whatever its
/// size; ACKs of several members in one batch write its count once; when
/// the entry is due, every REF still queued expires and the message goes.
#[test]
fn a_group_send_shares_one_expiry_entry() {
    use crate::store::keys::*;
    let f = fixture(&["alice", "bob", "carol", "dan"]);
    let members: Vec<_> = ["bob", "carol", "dan"]
        .iter()
        .map(|u| f.c.dir.user(u).unwrap())
        .collect();
    commit_batch(
        &f.c,
        &mut vec![group_send(&f, "alice", &["bob", "carol", "dan"], 0, 3, 0)],
    );
    let keys = |cf| f.c.store.count_keys(cf).unwrap();
    assert_eq!(
        (keys(CF_INBOX), keys(CF_EXPIRY), keys(CF_MESSAGES)),
        (3, 1, 3)
    );
    let seq = |u: &str| f.c.store.scan_inbox(u, &[0; 16], 10).unwrap().0[0].seq;
    let ack = |i: usize, u: &str| ack_req(&members[i], &[(seq(u), 3)]);
    commit_batch(&f.c, &mut vec![ack(0, "bob"), ack(1, "carol")]);
    assert_eq!(
        (keys(CF_INBOX), keys(CF_EXPIRY), keys(CF_MESSAGES)),
        (1, 1, 3)
    );
    let msgno = u64::from_be_bytes(
        f.c.store
            .due_expiries(u64::MAX, 10)
            .unwrap()
            .first()
            .map(|k| parse_expiry_key(k).unwrap().2.try_into().unwrap())
            .unwrap(),
    );
    let count =
        f.c.store
            .get(CF_MESSAGES, &message_refs_key(msgno))
            .unwrap();
    assert_eq!(count, Some(1u32.to_be_bytes().to_vec()), "written once");
    let (done, _) = channel::bounded(1);
    let due = f.c.store.due_expiries(u64::MAX, 10).unwrap();
    commit_batch(&f.c, &mut vec![Request::Expire { keys: due, done }]);
    assert_eq!(
        (keys(CF_INBOX), keys(CF_EXPIRY), keys(CF_MESSAGES)),
        (0, 0, 0)
    );
    assert_eq!(f.c.metrics.expired.load(Ordering::Relaxed), 1);
}

/// An ACK must not settle again an item that is gone. Here bob's share of
/// a group send (held in memory: both members are online) is deleted while
/// a copy is still staged in his session, which then writes it and gets its
/// ACK: the send's `held` bitmap no longer has bob's bit, so the ACK settles
/// nothing. Releasing the group message a second time would delete it while
/// carol still has it queued. (The next test is the same for a 1:1 message,
/// settled from the session's copy.)
#[test]
fn an_ack_after_a_delete_does_not_settle_twice() {
    use crate::store::keys::*;
    let f = fixture(&["alice", "bob", "carol"]);
    let members: Vec<_> = ["bob", "carol"]
        .iter()
        .map(|u| f.c.dir.user(u).unwrap())
        .collect();
    let mailboxes: Vec<_> = members
        .iter()
        .map(|u| {
            let mb = Arc::new(Mailbox::new(CONN, f.rec.clone()));
            u.attached.store(Some(mb.clone()));
            mb
        })
        .collect();
    commit_batch(
        &f.c,
        &mut vec![group_send(&f, "alice", &["bob", "carol"], 1, 0, 0)],
    );
    let items: Vec<_> = mailboxes
        .iter()
        .map(|mb| mb.pop_durable().unwrap())
        .collect();
    let msgno = items[0].group_ref.expect("a member's share").msgno;
    // What a session does when it writes an item.
    let written = |i: usize| {
        members[i]
            .inflight()
            .insert(items[i].seq, acking(Some(items[i].clone())));
    };
    let ack = |i: usize| ack_req(&members[i], &[(items[i].seq, 0)]);
    let (delete, deleted) = delete_id(&members[0], "alice", 1);
    commit_batch(&f.c, &mut vec![delete]);
    assert_eq!(deleted.recv().unwrap(), Some(1));
    written(0);
    commit_batch(&f.c, &mut vec![ack(0)]);
    let message = |f: &Fixture| f.c.store.get(CF_MESSAGES, &message_key(msgno)).unwrap();
    assert!(message(&f).is_some(), "carol still has it queued");
    assert_eq!(f.c.metrics.delivered.load(Ordering::Relaxed), 0);
    // Carol's ACK settles hers without a read, and the message goes.
    written(1);
    commit_batch(&f.c, &mut vec![ack(1)]);
    assert!(message(&f).is_none());
    assert_eq!(f.c.metrics.delivered.load(Ordering::Relaxed), 1);
    assert_eq!(
        f.c.store.count_keys(CF_INBOX).unwrap(),
        1,
        "alice's DELETED"
    );
}

/// The same for a 1:1 message: an ACK of the copy its session wrote, sent
/// before an operator deleted it and committed after, settles nothing (the
/// copy is stale: the user's count of other settlements moved past its
/// hint).
#[test]
fn an_ack_of_a_deleted_message_settles_nothing() {
    let f = fixture(&["alice", "bob"]);
    let (bob, item) = bob_holds_message_1(&f);
    // Sent by the session before the delete's batch removed the entry.
    let ack = ack_req(&bob, &[(item.seq, 0)]);
    let (delete, deleted) = delete_id(&bob, "alice", 1);
    commit_batch(&f.c, &mut vec![delete]);
    assert_eq!(deleted.recv().unwrap(), Some(1));
    commit_batch(&f.c, &mut vec![ack]);
    assert_eq!(f.c.metrics.delivered.load(Ordering::Relaxed), 0);
    assert_eq!(bob.queued.load(Ordering::Relaxed), 0);
    let record = f.c.store.get(CF_DEDUP, &dedup_key("alice", 1)).unwrap();
    let record = record
        .as_deref()
        .and_then(crate::store::record::Dedup::decode)
        .expect("a record");
    assert_eq!(record.status, StatusCode::DELETED);
}

/// Dedup records expire by point deletes, never by a range delete (range
/// tombstones slow every later look-up in the family): a group send with
/// READ_RECEIPT has the one dedup expiry entry, and its sweep removes the
/// record and its member receipts but leaves alone a key that sorts under
/// a record without being its receipt. A 1:1 send's record has no expiry
/// entry at all (compaction drops it: the next test).
#[test]
fn dedup_records_expire_by_point_deletes() {
    use crate::store::keys::*;
    let f = fixture(&["alice", "bob", "carol"]);
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 1)]);
    let receipts = group_send(&f, "alice", &["bob", "carol"], 2, 0, flags::READ_RECEIPT);
    commit_batch(&f.c, &mut vec![receipts]);
    // Not a receipt of send 2: nothing but a range delete would reach it.
    let stranger = member_receipt_key("alice", 1, "zed");
    let mut b = f.c.store.batch();
    b.put(CF_DEDUP, &stranger, &[0; 9]).unwrap();
    b.seal();
    b.commit(true).unwrap();
    assert_eq!(
        f.c.store.count_keys(CF_DEDUP).unwrap(),
        5,
        "2 records, 3 receipts"
    );
    let due: Vec<_> =
        f.c.store
            .due_expiries(u64::MAX, 100)
            .unwrap()
            .into_iter()
            .filter(|k| {
                matches!(
                    parse_expiry_key(k),
                    Some((_, EXPIRE_DEDUP | EXPIRE_DEDUP_ONLY, _))
                )
            })
            .collect();
    assert_eq!(due.len(), 1, "only the group send with receipts");
    let (done, _) = channel::bounded(1);
    commit_batch(&f.c, &mut vec![Request::Expire { keys: due, done }]);
    assert!(stored(&f, "alice", 1) && !stored(&f, "alice", 2));
    let left = f.c.store.keys_in(CF_DEDUP, &[], &[0xff]).unwrap();
    assert_eq!(left, vec![dedup_key("alice", 1), stranger]);
}

/// A 1:1 send past its dedup window (here a window shorter than the
/// message's expiry, which the session never sets, so that the item is
/// still queued): while its item is queued, the record stays, so a repeat
/// is still a duplicate and the item's expiry still owes the sender
/// EXPIRED; once the item is settled the record is gone, a repeat is a new
/// message, and compaction drops it. Compaction leaves alone a record
/// inside its window, one whose item is queued, a member receipt, and a
/// record of an earlier version (no `until`: its expiry entry deletes it).
#[test]
fn dedup_records_past_their_window_are_forgotten_once_settled() {
    use crate::store::keys::*;
    use crate::store::record::Dedup;
    let f = fixture(&["alice", "bob"]);
    let (alice, bob) = (f.c.dir.user("alice").unwrap(), f.c.dir.user("bob").unwrap());
    let past = |id| {
        let mut req = accept(&f, "alice", None, id, 0, flags::SEND_DEFAULT);
        req.dedup_until = req.time; // over by the time the batch runs
        Request::Send(SendRequest {
            accept: req,
            recipient: bob.clone(),
        })
    };
    commit_batch(
        &f.c,
        &mut vec![past(1), past(2), send(&f, "alice", "bob", 3)],
    );
    commit_batch(&f.c, &mut vec![past(1)]);
    let accepted = || f.c.metrics.accepted.load(Ordering::Relaxed);
    assert_eq!(
        accepted(),
        3,
        "1 is still queued: its repeat is a duplicate"
    );
    // 1's item expires (its entry sorts first): EXPIRED is owed to alice.
    let entries = f.c.store.due_expiries(u64::MAX, 10).unwrap();
    let (done, _) = channel::bounded(1);
    let first = vec![entries[0].clone()];
    commit_batch(&f.c, &mut vec![Request::Expire { keys: first, done }]);
    assert_eq!(alice.queued.load(Ordering::Relaxed), 1, "alice's EXPIRED");
    commit_batch(&f.c, &mut vec![past(1)]);
    assert_eq!(accepted(), 4, "1 settled: its repeat is a new message");
    // 2 is delivered and ACKed: its record is gone too.
    let (two, _) = f.c.store.scan_inbox("bob", &[0; 16], 10).unwrap();
    let two = two[0].seq;
    let inflight = acking(None);
    bob.inflight().insert(two, inflight);
    commit_batch(&f.c, &mut vec![ack_req(&bob, &[(two, 0)])]);
    assert_eq!(f.c.metrics.delivered.load(Ordering::Relaxed), 1);
    let old = Dedup {
        status: StatusCode::DELIVERED,
        flags: 0,
        priority: 0,
        seq: 1,
        time: 1,
        expire_at: 1,
        recipient: "bob".into(),
        until: 0,
    };
    let receipt = member_receipt_key("alice", 3, "bob");
    let mut b = f.c.store.batch();
    b.put(CF_DEDUP, &dedup_key("alice", 4), &old.encode())
        .unwrap();
    b.put(CF_DEDUP, &receipt, &[0; 9]).unwrap();
    b.seal();
    b.commit(true).unwrap();
    assert!(stored(&f, "alice", 2), "gone, but not compacted yet");
    f.c.store.compact(CF_DEDUP).unwrap();
    let left = f.c.store.keys_in(CF_DEDUP, &[], &[0xff]).unwrap();
    let want = [dedup_key("alice", 1), dedup_key("alice", 3), receipt];
    assert_eq!(left, [&want[..], &[dedup_key("alice", 4)]].concat());
}

/// A group send with READ_RECEIPT whose ID is used again once its window
/// is over: the old send's expiry entry, swept late, leaves the new send's
/// record and member receipts alone.
#[test]
fn a_late_dedup_entry_spares_a_later_send_of_the_same_id() {
    use crate::store::keys::*;
    let f = fixture(&["alice", "bob", "carol"]);
    let mut old = group_send(&f, "alice", &["bob", "carol"], 7, 0, flags::READ_RECEIPT);
    if let Request::GroupSend(g) = &mut old {
        g.accept.dedup_until = g.accept.time; // over by the time the batch runs
    }
    commit_batch(&f.c, &mut vec![old]);
    let entry: Vec<_> =
        f.c.store
            .due_expiries(u64::MAX, 100)
            .unwrap()
            .into_iter()
            .filter(|k| matches!(parse_expiry_key(k), Some((_, EXPIRE_DEDUP, _))))
            .collect();
    assert_eq!(entry.len(), 1);
    let new = group_send(&f, "alice", &["bob", "carol"], 7, 0, flags::READ_RECEIPT);
    commit_batch(&f.c, &mut vec![new]);
    assert_eq!(f.c.metrics.accepted.load(Ordering::Relaxed), 2);
    let (done, _) = channel::bounded(1);
    commit_batch(&f.c, &mut vec![Request::Expire { keys: entry, done }]);
    assert!(stored(&f, "alice", 7));
    assert_eq!(
        f.c.store.count_keys(CF_DEDUP).unwrap(),
        3,
        "the new record and its 2 receipts"
    );
}

/// A pipeline whose writer is the test: batches handed over are taken from
/// the returned channel (with [`handed`]) and written with `write_batch`;
/// the test answers for each on the other one.
fn pipeline(f: &Fixture) -> (Pipeline<'_>, Receiver<Job<'_>>, Sender<bool>) {
    let (jobs, taken) = channel::bounded(1);
    let (answer, results) = channel::bounded(1);
    let writer = Writer {
        jobs,
        results,
        failed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    (Pipeline::new(&f.c, Some(writer)), taken, answer)
}

/// The batch handed to the writer, if one was.
fn handed<'c>(taken: &Receiver<Job<'c>>) -> Option<Built<'c>> {
    match taken.try_recv().ok()? {
        Job::Batch(built) => Some(built),
        Job::Fence(_) => panic!("a fence, not a batch"),
    }
}

#[test]
fn a_batch_built_while_the_one_before_is_written_sees_its_changes() {
    let f = fixture(&["alice", "bob"]);
    let (mut pipe, taken, answer) = pipeline(&f);
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    let first = handed(&taken).expect("handed to the writer");
    assert!(!stored(&f, "alice", 1), "not written yet");
    // The writer's answer for the first batch, given ahead: the second is
    // built before the first is written, and handed over after.
    answer.send(true).unwrap();
    // Alice's retry of the same ID, built on the first batch's changes.
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    assert!(write_batch(&f.c, first));
    let second = handed(&taken).expect("handed to the writer");
    assert!(write_batch(&f.c, second));
    assert_eq!(
        answers(&f),
        vec![(1, Some(StatusCode::SENT)), (1, Some(StatusCode::SENT))]
    );
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1, "stored once");
    assert_eq!(f.c.metrics.deduplicated.load(Ordering::Relaxed), 1);
}

#[test]
fn an_ack_repeated_while_the_first_is_written_settles_once() {
    let f = fixture(&["alice", "bob"]);
    let alice = f.c.dir.user("alice").unwrap();
    let (bob, item) = bob_holds_message_1(&f);
    let ack = || ack_req(&bob, &[(item.seq, 0)]);
    let (mut pipe, taken, answer) = pipeline(&f);
    pipe.commit(&mut vec![ack()]);
    let first = handed(&taken).unwrap();
    answer.send(true).unwrap();
    // Built while the first is not written: the in-flight entry is still
    // there (its removal is a completion of the first batch).
    pipe.commit(&mut vec![ack()]);
    assert!(write_batch(&f.c, first));
    assert!(write_batch(&f.c, handed(&taken).unwrap()));
    assert_eq!(f.c.metrics.delivered.load(Ordering::Relaxed), 1);
    assert_eq!(bob.queued.load(Ordering::Relaxed), 0);
    // One DELIVERED for alice, not two.
    assert_eq!(alice.queued.load(Ordering::Relaxed), 1);
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1);
}

/// Commits `requests`, which must be refused after a fence (within 10 s)
/// and never handed to the writer; `at_fence` runs when the fence comes,
/// before it is answered.
fn commit_refused_after_a_fence<'c>(
    pipe: &mut Pipeline<'c>,
    taken: &Receiver<Job<'c>>,
    mut requests: Vec<Request>,
    at_fence: impl FnOnce() + Send,
) {
    std::thread::scope(|s| {
        s.spawn(|| match taken.recv_timeout(Duration::from_secs(10)) {
            Ok(Job::Fence(tx)) => {
                at_fence();
                tx.send(()).unwrap();
            }
            Ok(Job::Batch(_)) => panic!("handed to the writer"),
            Err(e) => panic!("no fence: {e}"),
        });
        pipe.commit(&mut requests);
    });
}

#[test]
fn a_batch_built_on_one_whose_write_failed_is_refused() {
    let f = fixture(&["alice", "bob"]);
    let (mut pipe, taken, answer) = pipeline(&f);
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    let first = handed(&taken).unwrap();
    // The first batch's write fails.
    let db = f.c.store.swap_db(None);
    assert!(!write_batch(&f.c, first));
    f.c.store.swap_db(db);
    answer.send(false).unwrap();
    // Alice's retry was built on what the failed batch would have stored:
    // answering it SENT from there would lose the message. It is refused
    // after a fence (nothing left before it here).
    commit_refused_after_a_fence(&mut pipe, &taken, vec![send(&f, "alice", "bob", 1)], || {});
    assert_eq!(
        answers(&f),
        vec![
            (1, Some(StatusCode::OVERLOADED)),
            (1, Some(StatusCode::OVERLOADED))
        ]
    );
    assert!(!stored(&f, "alice", 1));
    // The next retry is built on the store alone, and stored.
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    assert!(write_batch(&f.c, handed(&taken).unwrap()));
    assert_eq!(answers(&f), vec![(1, Some(StatusCode::SENT))]);
    assert!(stored(&f, "alice", 1));
}

/// A batch written but whose sync failed is refused (its SENDs answered
/// OVERLOADED), and so is every batch built on it: the next one handed
/// over, refused by the syncer without a sync though the store works
/// again, and the one the commit thread built meanwhile, refused before
/// the writer sees it. After the fence (with the store's fault cleared:
/// here there was none, the store was only unavailable), batches are
/// built on the store alone again.
#[test]
fn batches_built_on_one_whose_sync_failed_are_refused() {
    let f = fixture(&["alice", "bob"]);
    let (mut pipe, taken, answer) = pipeline(&f);
    let failed = pipe.writer.as_ref().unwrap().failed.clone();
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    let first = handed(&taken).unwrap();
    answer.send(true).unwrap();
    // Alice's retry, built on the first batch's overlay: answered from it.
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    let second = handed(&taken).unwrap();
    let (first, second) = (write_phase(first), write_phase(second));
    assert!(first.written && second.written);

    // The first batch's sync fails; the second's would work.
    let db = f.c.store.swap_db(None);
    sync_group(&f.c, &mut vec![first], &failed);
    f.c.store.swap_db(db);
    sync_group(&f.c, &mut vec![second], &failed);
    assert!(failed.load(Ordering::Acquire), "the commit thread is told");
    assert_eq!(
        answers(&f),
        vec![
            (1, Some(StatusCode::OVERLOADED)),
            (1, Some(StatusCode::OVERLOADED))
        ]
    );

    // Built on the second batch's overlay: refused, then a fence.
    answer.send(true).unwrap();
    commit_refused_after_a_fence(&mut pipe, &taken, vec![send(&f, "alice", "bob", 1)], || {});
    assert_eq!(answers(&f), vec![(1, Some(StatusCode::OVERLOADED))]);
    assert!(!failed.load(Ordering::Acquire));

    // Built on the store: the first write is there (unsynced), and this
    // batch's sync covers it.
    pipe.commit(&mut vec![send(&f, "alice", "bob", 1)]);
    sync_group(
        &f.c,
        &mut vec![write_phase(handed(&taken).unwrap())],
        &failed,
    );
    assert_eq!(answers(&f), vec![(1, Some(StatusCode::SENT))]);
    assert_eq!(f.c.store.unsynced_for(), None);
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1, "stored once");
}

/// An inbox scan that overlaps a batch holding a stored 1:1 item and, at
/// a higher SEQ, a held group share, for the same user: the store is read
/// before the write, the held shares after the completions. Taking the
/// share would move the cursor past the stored item, which the store read
/// missed and the mailbox then offers below the cursor: lost until a
/// reconnect. So it takes neither (only what was visible before it
/// began); both come to the mailbox, and the next scan takes both, the
/// stored one first.
#[test]
fn a_scan_overlapping_a_write_takes_nothing_it_wrote() {
    let f = fixture(&["alice", "boss", "m"]);
    let m = f.c.dir.user("m").unwrap();
    let mb = Arc::new(Mailbox::new(CONN, f.rec.clone()));
    m.attached.store(Some(mb.clone()));
    let cursors = [0; crate::store::keys::PRIORITIES];
    // `directory::scan_inbox`, cut in two around the batch.
    let visible = m.visible.load(Ordering::Acquire);
    let scanned = f.c.store.scan_inbox("m", &cursors, 100).unwrap();
    let mut requests = vec![
        send(&f, "alice", "m", 1),
        group_send(&f, "boss", &["m"], 2, 0, 0),
    ];
    commit_batch(&f.c, &mut requests);
    let held = m.shares_after(&cursors);
    assert_eq!(held.len(), 1, "the share is held");
    let (items, exhausted) = crate::directory::merge_scan(scanned, held, 100, visible);
    assert!(items.is_empty(), "nothing the mailbox also gets: {items:?}");
    assert!(exhausted);

    let pushed: Vec<u64> = std::iter::from_fn(|| mb.pop_durable())
        .map(|i| i.seq)
        .collect();
    let (items, exhausted) = crate::directory::scan_inbox(&f.c.store, &m, &cursors, 100).unwrap();
    let scanned: Vec<u64> = items.iter().map(|i| i.seq).collect();
    assert_eq!(scanned, pushed);
    assert_eq!(scanned.len(), 2);
    assert!(exhausted);
    assert!(items[1].group_ref.is_some_and(|g| g.held.is_some()), "held");
}

/// What bounds the memory of held shares: a share is held only for an
/// online member, under the server's byte budget and the user's count;
/// otherwise it is stored as a REF, as before.
#[test]
fn shares_are_held_only_within_the_bounds() {
    use super::send::{HELD_MAX_BYTES, HELD_PER_USER};
    let f = fixture(&["boss", "m", "off"]);
    let m = f.c.dir.user("m").unwrap();
    let mb = Arc::new(Mailbox::new(CONN, f.rec.clone()));
    m.attached.store(Some(mb.clone()));
    let refs = || f.c.store.count_keys(CF_INBOX).unwrap();
    let mut id = 0;
    let mut send_to = |members: &[&str]| {
        id += 1;
        commit_batch(&f.c, &mut vec![group_send(&f, "boss", members, id, 0, 0)]);
    };
    send_to(&["m", "off"]);
    assert_eq!((m.held(), refs()), (1, 1), "online: held; offline: a REF");

    let budget = &f.c.dir.held_bytes;
    let used = budget.load(Ordering::Relaxed);
    budget.store(HELD_MAX_BYTES - 100, Ordering::Relaxed);
    send_to(&["m"]);
    assert_eq!((m.held(), refs()), (1, 2), "over the byte budget: a REF");
    budget.store(used, Ordering::Relaxed);

    let filler = mb.pop_durable().expect("the held share");
    for seq in 1..HELD_PER_USER as u64 {
        let item = crate::store::Item::held(seq, 9, filler.record.clone(), 1, 0);
        f.c.dir.hold(&m, Arc::new(item));
    }
    assert_eq!(m.held(), HELD_PER_USER);
    send_to(&["m"]);
    assert_eq!(
        (m.held(), refs()),
        (HELD_PER_USER, 3),
        "at the user's count: a REF"
    );
}

/// Runs `body` on a pipeline whose writer writes each batch at once and
/// whose syncer syncs and completes nothing until a fence asks it to: the
/// most its completions can lag.
fn with_lazy_syncer<'f>(f: &'f Fixture, body: impl FnOnce(&mut Pipeline<'f>)) {
    let (mut pipe, taken, answer) = pipeline(f);
    std::thread::scope(|s| {
        s.spawn(move || {
            let failed = std::sync::atomic::AtomicBool::new(false);
            let mut written = Vec::new();
            while let Ok(job) = taken.recv() {
                match job {
                    Job::Batch(built) => {
                        written.push(write_phase(built));
                        answer.send(true).unwrap();
                    }
                    Job::Fence(tx) => {
                        sync_group(&f.c, &mut written, &failed);
                        tx.send(()).unwrap();
                    }
                }
            }
        });
        body(&mut pipe);
        pipe.drain();
        drop(pipe);
    });
}

/// An operator's delete, then the recipient's ACK of the same item, right
/// after it or with an unrelated batch between them, while the syncer
/// lags: the ACK must not settle the item again from its session's copy.
/// Only the delete's completion (the settle count it raises,
/// `settle::known`) can stop an ACK built after the batch that follows
/// the delete: so the batch after a delete waits for it.
#[test]
fn an_ack_built_after_its_items_delete_settles_nothing() {
    for gap in [false, true] {
        let f = fixture(&["alice", "bob"]);
        let alice = f.c.dir.user("alice").unwrap();
        let (bob, item) = bob_holds_message_1(&f);
        let (delete, deleted) = delete_id(&bob, "alice", 1);
        with_lazy_syncer(&f, |pipe| {
            pipe.commit(&mut vec![delete]);
            if gap {
                pipe.commit(&mut vec![send(&f, "alice", "bob", 2)]);
            }
            pipe.commit(&mut vec![ack_req(&bob, &[(item.seq, 0)])]);
        });
        assert_eq!(deleted.recv().unwrap(), Some(1));
        assert_eq!(
            f.c.metrics.delivered.load(Ordering::Relaxed),
            0,
            "gap {gap}"
        );
        // Alice is owed DELETED, and nothing else.
        assert_eq!(alice.queued.load(Ordering::Relaxed), 1, "gap {gap}");
        assert_eq!(bob.queued.load(Ordering::Relaxed), u64::from(gap));
    }
}

/// A batch refused on the commit thread (the write before it failed) is
/// answered after the batches handed over before it: alice's SENT for 5,
/// then OVERLOADED for 6 and 7, and the barrier only after all three.
#[test]
fn a_refusal_waits_for_the_batches_before_it() {
    let f = fixture(&["alice", "bob"]);
    let (mut pipe, taken, answer) = pipeline(&f);
    pipe.commit(&mut vec![send(&f, "alice", "bob", 5)]);
    let first = handed(&taken).unwrap();
    answer.send(true).unwrap();
    pipe.commit(&mut vec![send(&f, "alice", "bob", 6)]);
    let second = handed(&taken).unwrap();
    // The first is written, not yet synced; the second's write fails.
    let first = write_phase(first);
    let db = f.c.store.swap_db(None);
    let second = write_phase(second);
    f.c.store.swap_db(db);
    assert!(first.written && !second.written);
    answer.send(false).unwrap();
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (barrier, fired) = channel::bounded(1);
    let refused = vec![send(&f, "alice", "bob", 7), Request::Barrier(barrier)];
    commit_refused_after_a_fence(&mut pipe, &taken, refused, || {
        assert!(fired.try_recv().is_err(), "the barrier waits");
        sync_group(&f.c, &mut vec![first, second], &failed);
    });
    assert_eq!(fired.try_recv(), Ok(false), "the barrier fired, refused");
    assert_eq!(
        answers(&f),
        vec![
            (5, Some(StatusCode::SENT)),
            (6, Some(StatusCode::OVERLOADED)),
            (7, Some(StatusCode::OVERLOADED))
        ]
    );
}

/// An operator's purge or delete, and a barrier, are told whether they
/// were committed: a purge rolled back (the store failed its reads) or in
/// a batch whose write failed must not report the user's queue gone (the
/// admin API keeps the user then, so that the delete can be retried, and
/// the items never reach a user created again under that address), nor a
/// delete report a count.
#[test]
fn waiters_are_told_when_their_request_was_not_committed() {
    let f = fixture(&["alice", "bob"]);
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 1)]);
    let bob = f.c.dir.user("bob").unwrap();
    let purge = || {
        let (done, purged) = channel::bounded(1);
        (
            Request::Purge {
                user: bob.clone(),
                done,
            },
            purged,
        )
    };
    let build = |requests: Vec<Request>| {
        let mut requests = requests;
        build_batch(
            &f.c,
            &mut requests,
            pass::Overlay::default(),
            pass::Sizes::default(),
        )
        .0
    };
    let queued = || f.c.store.inbox_keys("bob").unwrap().len();

    // Rolled back; its batch, empty, is written.
    let (request, purged) = purge();
    let db = f.c.store.swap_db(None);
    let built = build(vec![request]);
    f.c.store.swap_db(db);
    assert!(write_batch(&f.c, built));
    assert_eq!(purged.try_recv(), Ok(false), "a purge rolled back");

    // Built, but the write fails.
    let (delete, deleted) = delete_id(&bob, "alice", 1);
    let (request, purged) = purge();
    let (barrier, fired) = channel::bounded(1);
    let built = build(vec![delete, request, Request::Barrier(barrier)]);
    let db = f.c.store.swap_db(None);
    assert!(!write_batch(&f.c, built));
    f.c.store.swap_db(db);
    assert_eq!(deleted.try_recv(), Ok(None), "a delete not written");
    assert_eq!(purged.try_recv(), Ok(false), "a purge not written");
    assert_eq!(fired.try_recv(), Ok(false), "a barrier not written");
    assert_eq!(queued(), 1);

    // Written.
    let (request, purged) = purge();
    commit_batch(&f.c, &mut vec![request]);
    assert_eq!(purged.try_recv(), Ok(true));
    assert_eq!(queued(), 0);
}

/// Shares that a batch not yet completed will hold count against the byte
/// budget from the moment it is built: with the syncer behind, every batch
/// built meanwhile would otherwise see the same room, and hold as much.
#[test]
fn shares_of_batches_not_yet_completed_count_against_the_budget() {
    use super::send::HELD_MAX_BYTES;
    let f = fixture(&["boss", "m"]);
    let (m, _mb) = attach(&f, "m");
    let (mut pipe, taken, answer) = pipeline(&f);
    pipe.commit(&mut vec![group_send(&f, "boss", &["m"], 1, 0, 0)]);
    let first = handed(&taken).unwrap();
    let cost = f.c.dir.held_pending.load(Ordering::Relaxed);
    assert!(cost > 0, "counted when built");
    // Room for one more such share besides the pending one, less a byte.
    f.c.dir
        .held_bytes
        .store(HELD_MAX_BYTES - 2 * cost + 1, Ordering::Relaxed);
    answer.send(true).unwrap();
    pipe.commit(&mut vec![group_send(&f, "boss", &["m"], 2, 0, 0)]);
    assert!(write_batch(&f.c, first));
    assert!(write_batch(&f.c, handed(&taken).unwrap()));
    assert_eq!(m.held(), 1, "the first held, the second not");
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1, "a REF");
    assert_eq!(f.c.dir.held_pending.load(Ordering::Relaxed), 0);
}

/// An ACK whose write fails leaves its item queued, and the ACK is kept
/// for a retry (its entry still marked `acking`, so the item is not
/// written to the client again); its connection is woken to set its timer.
/// An expiry or a delete whose write fails, of an item whose ACK is on its
/// way, leaves the ACK to that retry.
#[test]
fn an_ack_whose_write_fails_is_kept_for_a_retry() {
    let f = fixture(&["alice", "bob"]);
    let (bob, item) = bob_holds_message_1(&f);
    bob.mailbox().unwrap().clear_wake();
    f.rec.wakes.lock().unwrap().clear();
    // Built, then its write fails.
    let fail_write = |requests: Vec<Request>| {
        let (built, _) = build_batch(
            &f.c,
            &mut { requests },
            pass::Overlay::default(),
            pass::Sizes::default(),
        );
        let db = f.c.store.swap_db(None);
        assert!(!write_batch(&f.c, built));
        f.c.store.swap_db(db);
    };
    fail_write(vec![ack_req(&bob, &[(item.seq, 0)])]);
    let kept = |bob: &User| {
        bob.take_unsent_acks()
            .iter()
            .map(|a| a.seq)
            .collect::<Vec<_>>()
    };
    assert!(bob.inflight()[&item.seq].acking);
    assert_eq!(kept(&bob), [item.seq]);
    assert!(bob.ack_retry_at() > crate::clock::now_ms());
    assert_eq!(*f.rec.wakes.lock().unwrap(), [CONN]);
    // The retry rolled back (the store fails a read): kept again.
    let db = f.c.store.swap_db(None);
    commit_batch(&f.c, &mut vec![ack_req(&bob, &[(item.seq, 0)])]);
    f.c.store.swap_db(db);
    assert_eq!(kept(&bob), [item.seq]);
    // A delete of it whose write fails leaves the ACK alone.
    let (delete, deleted) = delete_id(&bob, "alice", 1);
    fail_write(vec![delete]);
    assert_eq!(deleted.recv().unwrap(), None);
    assert!(bob.inflight()[&item.seq].acking);
    assert!(kept(&bob).is_empty());
}

/// Alice's message 1, committed and written to bob's connection, as his
/// session records it: an in-flight entry with the item (so his ACK may
/// settle from it), marked as being ACKed. Returns bob and the item.
fn bob_holds_message_1(f: &Fixture) -> (Arc<User>, Arc<crate::store::Item>) {
    let (bob, mb) = attach(f, "bob");
    commit_batch(&f.c, &mut vec![send(f, "alice", "bob", 1)]);
    let item = mb.pop_durable().expect("pushed after commit");
    bob.inflight().insert(item.seq, acking(Some(item.clone())));
    (bob, item)
}

/// Connects `name`: items committed for them are pushed to the mailbox returned.
fn attach(f: &Fixture, name: &str) -> (Arc<User>, Arc<Mailbox>) {
    let user = f.c.dir.user(name).unwrap();
    let mb = Arc::new(Mailbox::new(CONN, f.rec.clone()));
    user.attached.store(Some(mb.clone()));
    (user, mb)
}

/// Takes the next item pushed to `user`'s mailbox, as written to them, and
/// commits their ACK of it in a batch of its own.
fn ack_next(f: &Fixture, user: &Arc<User>, mb: &Mailbox) {
    let item = mb.pop_durable().expect("an item pushed");
    user.inflight().insert(item.seq, acking(Some(item.clone())));
    let mut batch = vec![ack_req(user, &[(item.seq, item.priority)])];
    commit_batch(&f.c, &mut batch);
}

/// A batch is synced when a completion tells anyone it is written (an
/// answer, a pushed item or status, a held share); a batch of settlements
/// that owe no one a status is written without an fsync, and synced by the
/// next synced write, by the first batch after [`MAX_UNSYNCED`], or by a
/// barrier with nothing to write.
#[test]
fn only_settlements_that_tell_no_one_are_written_unsynced() {
    let f = fixture(&["alice", "bob", "m"]);
    let ((alice, alice_mb), (bob, bob_mb), (m, m_mb)) =
        (attach(&f, "alice"), attach(&f, "bob"), attach(&f, "m"));
    let ack_next = |user: &Arc<User>, mb: &Mailbox| ack_next(&f, user, mb);
    let writes = || {
        (
            f.c.metrics.commits.load(Ordering::Relaxed),
            f.c.metrics.unsynced_commits.load(Ordering::Relaxed),
        )
    };

    // A group send without receipts, held for m: SENT, so synced.
    commit_batch(&f.c, &mut vec![group_send(&f, "alice", &["m"], 1, 0, 0)]);
    assert_eq!(writes(), (1, 0), "a send");
    assert_eq!(m.held(), 1);
    // m's ACK owes no one anything: unsynced.
    ack_next(&m, &m_mb);
    assert_eq!(
        (writes(), m.held()),
        ((1, 1), 0),
        "an ACK without a receipt"
    );
    assert!(f.c.store.unsynced_for().is_some());

    // A 1:1 send asking for DELIVERED: synced; bob's ACK stores and pushes
    // alice's DELIVERED, which says the ACK is durable: synced.
    commit_batch(&f.c, &mut vec![send(&f, "alice", "bob", 2)]);
    assert_eq!(writes(), (2, 1), "a send");
    assert_eq!(f.c.store.unsynced_for(), None, "synced with it");
    ack_next(&bob, &bob_mb);
    assert_eq!(writes(), (3, 1), "an ACK owing DELIVERED");
    // alice's ACK of her DELIVERED owes nothing: unsynced.
    ack_next(&alice, &alice_mb);
    assert_eq!(writes(), (3, 2), "the ACK of a status");
    assert_eq!(alice.queued.load(Ordering::Relaxed), 0);

    // A barrier with nothing to write still syncs what was not.
    assert!(f.c.store.unsynced_for().is_some());
    let (tx, rx) = channel::bounded(1);
    commit_batch(&f.c, &mut vec![Request::Barrier(tx)]);
    assert_eq!(rx.try_recv(), Ok(true), "the barrier fired");
    assert_eq!(f.c.store.unsynced_for(), None, "synced by the barrier");

    // Once an unsynced write has waited MAX_UNSYNCED, the next batch is
    // synced, whatever it holds.
    let mut sends = vec![
        group_send(&f, "alice", &["m"], 3, 0, 0),
        group_send(&f, "alice", &["m"], 4, 0, 0),
    ];
    commit_batch(&f.c, &mut sends);
    let before = writes();
    ack_next(&m, &m_mb);
    assert_eq!(writes(), (before.0, before.1 + 1));
    f.c.store.age_unsynced(MAX_UNSYNCED);
    ack_next(&m, &m_mb);
    assert_eq!(
        writes(),
        (before.0 + 1, before.1 + 1),
        "synced after MAX_UNSYNCED"
    );
    assert_eq!((m.held(), f.c.store.unsynced_for()), (0, None));
}

/// With no batch after an unsynced write, the syncer thread syncs the WAL
/// by itself once the write is [`MAX_UNSYNCED`] old.
#[test]
fn the_syncer_syncs_an_unsynced_write_by_itself() {
    let f = fixture(&["alice", "m"]);
    let (m, mb) = attach(&f, "m");
    commit_batch(&f.c, &mut vec![group_send(&f, "alice", &["m"], 1, 0, 0)]);
    ack_next(&f, &m, &mb);
    assert!(
        f.c.store.unsynced_for().is_some(),
        "the ACK was written unsynced"
    );
    f.c.store.age_unsynced(MAX_UNSYNCED);
    let (jobs, syncer_jobs) = channel::bounded::<Staged>(1);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let syncer = s.spawn(|| next_staged(&f.c, &syncer_jobs, &failed).is_none());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while f.c.store.unsynced_for().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "not synced within 10 s"
            );
            std::thread::yield_now();
        }
        drop(jobs);
        assert!(syncer.join().unwrap(), "no batch, then the writer gone");
    });
}

/// A recipient deleted between a SEND's acceptance and its batch: the purge
/// that follows the deletion would not see an item queued now, so none is
/// (INVALID_DEST for a 1:1 send; no share for a group member).
#[test]
fn a_recipient_deleted_after_the_send_was_accepted_gets_nothing() {
    let f = fixture(&["alice", "bob", "carol"]);
    let (one, group) = (
        send(&f, "alice", "bob", 1),
        group_send(&f, "alice", &["bob", "carol"], 2, 0, 0),
    );
    let bob = f.c.dir.user("bob").unwrap();
    bob.deleted.store(true, Ordering::Release);
    commit_batch(&f.c, &mut vec![one, group]);
    assert_eq!(
        answers(&f),
        vec![
            (1, Some(StatusCode::INVALID_DEST)),
            (2, Some(StatusCode::SENT))
        ]
    );
    assert!(!stored(&f, "alice", 1));
    assert_eq!(bob.queued.load(Ordering::Relaxed), 0);
    let carol = f.c.dir.user("carol").unwrap();
    assert_eq!(carol.queued.load(Ordering::Relaxed), 1);
    assert_eq!(f.c.store.count_keys(CF_INBOX).unwrap(), 1);
    assert!(f
        .c
        .store
        .scan_inbox("bob", &[0; 16], 10)
        .unwrap()
        .0
        .is_empty());
}
