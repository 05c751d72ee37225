//! Group commit: durable (fsync'd) messages per second at several batch
//! sizes, and the cost of accepting one group send to offline members.
//!
//! Each iteration applies `batch` SEND requests to one WriteBatch and writes it
//! with `sync = true`, exactly as the commit thread does (`commit_batch`), on a
//! real RocksDB in a temporary directory. Throughput is in messages.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tern::commit::{self, Accept, Committer, GroupSendRequest, ReplyTo, Request, SendRequest};
use tern::directory::{Directory, Group, Member, User};
use tern::mailbox::{Answer, ConnRef, Notify};
use tern::metrics::Metrics;
use tern::store::record::encode_msg;
use tern::store::{MsgView, Store};

/// Answers go nowhere.
struct Nowhere;

impl Notify for Nowhere {
    fn mailbox(&self, _: ConnRef) {}
    fn answer(&self, _: ConnRef, _: Answer) {}
}

/// The commit thread's parts over a fresh store in `dir`, with no thread:
/// the bench calls `commit_batch` itself.
fn core(dir: &tempfile::TempDir) -> Committer {
    Committer {
        dir: Arc::new(Directory::new(1)),
        store: Arc::new(Store::open(dir.path()).expect("open")),
        notify: Arc::new(Nowhere),
        metrics: Arc::new(Metrics::default()),
        retain_delivered: false,
        max_expiry: 3600,
    }
}

/// A stored SEND from `sender`, answered nowhere.
fn accept(sender: &Arc<User>, id: u64, record: Arc<[u8]>) -> Accept {
    Accept {
        conn: ReplyTo::Conn(ConnRef {
            worker: 0,
            token: 0,
            generation: 0,
        }),
        sender: sender.clone(),
        id,
        priority: 0,
        flags: 3,
        time: 1,
        expire_at: u64::MAX / 2,
        dedup_until: u64::MAX / 2,
        record,
        read_us: 0,
    }
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let core = core(&dir);
    let alice = Arc::new(User::new("alice", String::new(), 1));
    let bob = Arc::new(User::new("bob", String::new(), 1));
    let payload = [0x5au8; 256];
    let mut next_id = 1u64;
    let mut group = c.benchmark_group("store_group_commit");
    group.sample_size(20);
    for batch in [1usize, 16, 256, 4096] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("durable_msgs", batch),
            &batch,
            |b, &batch| {
                b.iter_batched(
                    || {
                        (0..batch)
                            .map(|_| {
                                next_id += 1;
                                let record = encode_msg(&MsgView {
                                    time: 1,
                                    expire_at: u64::MAX / 2,
                                    id: next_id,
                                    msg_type: 0,
                                    flags: 3,
                                    from: "alice",
                                    group: None,
                                    payload: &payload,
                                });
                                Request::Send(SendRequest {
                                    accept: accept(&alice, next_id, record),
                                    recipient: bob.clone(),
                                })
                            })
                            .collect::<Vec<_>>()
                    },
                    |mut requests| commit::commit_batch(&core, &mut requests),
                    BatchSize::SmallInput,
                );
            },
        );
    }
    group.finish();
}

/// One group send to 1,000 offline members: the payload once, 1,000 REF
/// items, one synced batch. The time per iteration is the time to accept
/// one such send.
fn group_fanout(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let core = core(&dir);
    let sender = Arc::new(User::new("boss", String::new(), 1));
    let mut group = c.benchmark_group("store_group_fanout");
    group.sample_size(20);
    for members in [100usize, 1000] {
        let big = Arc::new(Group {
            name: "big".into(),
            members: (0..members)
                .map(|i| Member {
                    user: Arc::new(User::new(&format!("m{i}"), String::new(), 1)),
                    send: false,
                    recv: true,
                })
                .collect(),
        });
        let payload = [0x5au8; 256];
        let record = encode_msg(&MsgView {
            time: 1,
            expire_at: u64::MAX / 2,
            id: 0,
            msg_type: 0,
            flags: 3,
            from: "boss",
            group: Some("big"),
            payload: &payload,
        });
        let mut next_id = 0u64;
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(
            BenchmarkId::new("offline_members", members),
            &members,
            |b, _| {
                b.iter_batched(
                    || {
                        next_id += 1;
                        vec![Request::GroupSend(GroupSendRequest {
                            accept: accept(&sender, next_id, record.clone()),
                            group: big.clone(),
                        })]
                    },
                    |mut requests| commit::commit_batch(&core, &mut requests),
                    BatchSize::SmallInput,
                );
            },
        );
    }
    group.finish();
}

criterion_group!(benches, group_commit, group_fanout);
criterion_main!(benches);
