//! 1:1 delivery: receipts, store-and-forward, duplicates, priority, expiry,
//! slow consumers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tern::client::{Event, Outgoing};
use tern::wire::{flags, StatusCode};

use crate::util::{
    barrier, barrier_self, msg, next, now_ms, receive_all, send_pipelined, status, TestServer,
};

/// Acceptance 1: alice → bob online; SENT, then DELIVERED after ACK, then
/// READ after READ; every MSG field intact.
#[test]
fn online_message_with_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    assert_eq!(bob.address, "bob");

    let payload: Vec<u8> = (0..=255u8).collect();
    let before = now_ms();
    let out = Outgoing::to("bob", &payload).id(42).msg_type(7).priority(3);
    assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);

    let m = msg(next(&mut bob, 10));
    assert_eq!(m.from, "alice");
    assert_eq!(m.id, 42);
    assert_eq!(m.msg_type, 7);
    assert_eq!(m.priority, 3);
    assert_eq!(m.payload, payload);
    assert_eq!(m.group, None);
    assert_eq!(m.flags, flags::DELIVERY_RECEIPT | flags::READ_RECEIPT);
    assert!(m.seq > 0);
    assert!(
        m.time >= before - 1000 && m.time <= now_ms() + 1000,
        "TIME {}",
        m.time
    );

    bob.ack(&[m.seq]).unwrap();
    let s = status(next(&mut alice, 10));
    assert_eq!(
        (s.id, s.status, s.to.as_deref()),
        (42, StatusCode::DELIVERED, Some("bob"))
    );
    let delivered_seq = s.seq.expect("stored status carries SEQ");
    alice.ack(&[delivered_seq]).unwrap();

    bob.read_receipt("alice", 42).unwrap();
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status), (42, StatusCode::READ));
    let read_seq = s.seq.expect("stored status carries SEQ");
    assert!(read_seq > delivered_seq);
    alice.ack(&[read_seq]).unwrap();

    // A second READ is ignored: the marker bob sends after it is the next
    // thing alice gets; and nothing else reaches bob either.
    bob.read_receipt("alice", 42).unwrap();
    barrier(&mut bob, &mut alice);
    barrier_self(&mut bob);
}

/// Acceptance 2: bob offline; SENT now, the message at login; alice gets
/// DELIVERED live, or stored if she has gone offline by then.
#[test]
fn offline_recipient_gets_message_at_login() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    assert_eq!(
        alice.send_wait(&Outgoing::to("bob", b"one").id(1)).unwrap(),
        StatusCode::SENT
    );
    assert_eq!(
        alice.send_wait(&Outgoing::to("bob", b"two").id(2)).unwrap(),
        StatusCode::SENT
    );

    // Live DELIVERED for message 1.
    let mut bob = server.connect(&tb);
    let m1 = msg(next(&mut bob, 10));
    let m2 = msg(next(&mut bob, 10));
    assert_eq!(
        (m1.payload.as_slice(), m2.payload.as_slice()),
        (&b"one"[..], &b"two"[..])
    );
    assert!(
        !m1.is_redelivery(),
        "first delivery must not carry REDELIVERY"
    );
    bob.ack(&[m1.seq]).unwrap();
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status), (1, StatusCode::DELIVERED));
    alice.ack(&[s.seq.unwrap()]).unwrap();

    // Stored DELIVERED for message 2: alice is offline when bob ACKs. Her
    // ACK of the first status may not be durable yet when she comes back, so
    // that status may be redelivered: she keeps her SEQ memory, as a client
    // must, and skips it.
    let seen = alice.into_seen();
    bob.ack(&[m2.seq]).unwrap();
    bob.ping(Some(1)).unwrap();
    assert_eq!(next(&mut bob, 10), Event::Pong(Some(1)));
    let mut alice = tern::client::Client::reconnect_to(server.addr, &ta, seen).unwrap();
    let s = match alice.recv_new_timeout(Duration::from_secs(10)).unwrap() {
        Some(e) => status(e),
        None => panic!("no stored DELIVERED"),
    };
    assert_eq!(
        (s.id, s.status, s.to.as_deref()),
        (2, StatusCode::DELIVERED, Some("bob"))
    );
    assert!(s.seq.is_some());
}

/// Acceptance 4: a SEND repeated with the same ID, before and after a
/// restart, is delivered once and answered with the current status.
#[test]
fn duplicate_send_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let out = Outgoing::to("bob", b"once").id(7);
    assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);
    assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);

    server.restart();
    let mut alice = server.connect(&ta);
    assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);

    let mut bob = server.connect(&tb);
    let m = msg(next(&mut bob, 10));
    assert_eq!(m.id, 7);
    assert!(
        m.is_redelivery(),
        "a message from before a restart may have been written before"
    );
    // No second copy is queued (the barrier ACKs its marker before bob's
    // ACK below, so the DELIVERED also means the marker's ACK is durable).
    barrier(&mut alice, &mut bob);
    bob.ack(&[m.seq]).unwrap();
    let s = status(next(&mut alice, 10));
    assert_eq!(s.status, StatusCode::DELIVERED);

    // Once delivered, the duplicate is answered DELIVERED and not delivered.
    assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::DELIVERED);
    server.restart();
    let mut alice = server.connect(&ta);
    assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::DELIVERED);
    // A new connection (no SEQ memory) gets neither the message nor the
    // earlier marker again.
    let mut bob = server.connect(&tb);
    barrier(&mut alice, &mut bob);
}

/// Acceptance 5: 30 messages at mixed priorities to an offline recipient
/// arrive lowest PRIORITY first, in send order within a priority.
#[test]
fn priority_then_send_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let priorities = [5u8, 0, 15, 2];
    let mut expected = Vec::new();
    for i in 0..30u64 {
        let p = priorities[(i as usize * 7) % priorities.len()];
        let out = Outgoing::to("bob", &i.to_be_bytes()).id(i + 1).priority(p);
        assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);
        expected.push((p, i + 1));
    }
    expected.sort(); // stable: by priority, then send order (= id order)
    let mut bob = server.connect(&tb);
    let mut got = Vec::new();
    let mut last_seq_per_priority = [0u64; 16];
    for _ in 0..30 {
        let m = msg(next(&mut bob, 10));
        assert!(m.seq > last_seq_per_priority[m.priority as usize]);
        last_seq_per_priority[m.priority as usize] = m.seq;
        got.push((m.priority, m.id));
    }
    assert_eq!(got, expected);
    barrier(&mut alice, &mut bob);
}

/// A later, more urgent SEND overtakes items already queued for a connected
/// recipient: with `max_inflight` 1, bob holds one un-ACKed message and the
/// rest wait at the server; a PRIORITY 0 message sent then is the next one
/// he gets after his ACK.
#[test]
fn a_later_urgent_send_overtakes_queued_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--max-inflight", "1"]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    for id in 1..=5 {
        let out = Outgoing::to("bob", b"later").id(id).priority(9).flags(0);
        assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);
    }
    let first = msg(next(&mut bob, 10));
    assert_eq!(first.id, 1);
    let urgent = Outgoing::to("bob", b"now").id(6).priority(0).flags(0);
    assert_eq!(alice.send_wait(&urgent).unwrap(), StatusCode::SENT);
    bob.ack(&[first.seq]).unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = msg(next(&mut bob, 10));
        got.push(m.id);
        bob.ack(&[m.seq]).unwrap();
    }
    assert_eq!(got, [6, 2, 3, 4, 5]);
    barrier(&mut alice, &mut bob);
}

/// The in-flight map, which the window counts, outlives a connection (an
/// ACK of a SEQ written on an earlier one still settles it). With
/// `max_inflight` 1, bob reads one message and drops the connection without
/// an ACK; 600 urgent ones arrive meanwhile (more than a session stages at
/// once). Reconnected, he gets the first one again at once (its SEQ,
/// REDELIVERY), then, one per ACK, the urgent ones and the last. (It
/// stalled for good: the full window stopped every delivery of the new
/// connection, the un-ACKed one included, and nothing could free it.)
#[test]
fn a_reconnect_with_a_full_window_delivers_again() {
    const URGENT: u64 = 600;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--max-inflight", "1"]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    for id in 1..=2 {
        let out = Outgoing::to("bob", b"later").id(id).priority(9).flags(0);
        assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);
    }
    let first = msg(next(&mut bob, 10));
    assert_eq!(first.id, 1);
    drop(bob);
    for id in 3..3 + URGENT {
        let urgent = Outgoing::to("bob", b"now").id(id).priority(0).flags(0);
        assert_eq!(alice.send_wait(&urgent).unwrap(), StatusCode::SENT);
    }
    let mut bob = server.connect(&tb);
    let mut got = Vec::new();
    for _ in 0..URGENT + 2 {
        let m = msg(next(&mut bob, 10));
        if m.id == 1 {
            assert_eq!(m.seq, first.seq, "the same SEQ");
            assert_ne!(m.flags & flags::REDELIVERY, 0, "flagged REDELIVERY");
        }
        got.push(m.id);
        bob.ack(&[m.seq]).unwrap();
    }
    let want: Vec<u64> = [1].into_iter().chain(3..3 + URGENT).chain([2]).collect();
    assert_eq!(got, want);
    barrier(&mut alice, &mut bob);
}

/// A reconnect writes each un-ACKed delivery again once: first from what
/// the earlier connection left in flight, and not a second time when the
/// catch-up scan of the store finds it, even once it is ACKed. With
/// `max_inflight` 3 and an urgent message sent while bob was away, the
/// window holds the scan's copies back until their ACKs are settled.
#[test]
fn a_reconnect_writes_each_unacked_delivery_again_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--max-inflight", "3"]);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    for id in 1..=3 {
        let out = Outgoing::to("bob", b"hi").id(id).priority(9).flags(0);
        assert_eq!(alice.send_wait(&out).unwrap(), StatusCode::SENT);
    }
    let seqs: Vec<u64> = (1..=3).map(|_| msg(next(&mut bob, 10)).seq).collect();
    drop(bob);
    let urgent = Outgoing::to("bob", b"now").id(4).priority(0).flags(0);
    assert_eq!(alice.send_wait(&urgent).unwrap(), StatusCode::SENT);
    let mut bob = server.connect(&tb);
    for (id, &seq) in (1..=3).zip(&seqs) {
        let m = msg(next(&mut bob, 10));
        assert_eq!((m.id, m.seq), (id, seq));
        assert_ne!(m.flags & flags::REDELIVERY, 0, "flagged REDELIVERY");
        bob.ack(&[m.seq]).unwrap();
    }
    let m = msg(next(&mut bob, 10));
    assert_eq!(m.id, 4);
    bob.ack(&[m.seq]).unwrap();
    // Nothing more before bob's own marker.
    barrier_self(&mut bob);
}

/// With EXPIRY as long as `dedup_window` (the defaults are a week and a
/// day; here both 1 s), duplicate detection forgets the send the moment its
/// item expires: the sender still gets EXPIRED, and only then does a SEND
/// of the same ID count as a new message.
#[test]
fn expiry_at_the_end_of_the_dedup_window_still_owes_expired() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--dedup-window", "1"]);
    let (ta, _) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let once = Outgoing::to("bob", b"soon gone").id(1).expiry(1);
    assert_eq!(alice.send_wait(&once).unwrap(), StatusCode::SENT);
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status), (1, StatusCode::EXPIRED));
    alice.ack(&[s.seq.unwrap()]).unwrap();
    assert_eq!(
        alice.send_wait(&once).unwrap(),
        StatusCode::SENT,
        "a new message"
    );
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status), (1, StatusCode::EXPIRED));
}

/// Acceptance 6: EXPIRY=1 to an offline user expires with a stored EXPIRED
/// status; EXPIRY=0 is OFFLINE when the user is offline, delivered when online.
#[test]
fn expiry_and_real_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);

    let started = Instant::now();
    assert_eq!(
        alice
            .send_wait(&Outgoing::to("bob", b"soon gone").id(1).expiry(1))
            .unwrap(),
        StatusCode::SENT
    );
    let s = status(next(&mut alice, 10));
    assert_eq!(
        (s.id, s.status, s.to.as_deref()),
        (1, StatusCode::EXPIRED, Some("bob"))
    );
    assert!(s.seq.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "EXPIRED took {:?}",
        started.elapsed()
    );
    alice.ack(&[s.seq.unwrap()]).unwrap();

    assert_eq!(
        alice
            .send_wait(&Outgoing::to("bob", b"now").id(2).expiry(0))
            .unwrap(),
        StatusCode::OFFLINE
    );
    // The duplicate answer of an expired message is EXPIRED.
    assert_eq!(
        alice
            .send_wait(&Outgoing::to("bob", b"soon gone").id(1).expiry(1))
            .unwrap(),
        StatusCode::EXPIRED
    );

    let mut bob = server.connect(&tb);
    // Neither the expired nor the real-time message is queued for bob.
    barrier(&mut alice, &mut bob);
    assert_eq!(
        alice
            .send_wait(&Outgoing::to("bob", b"live").id(3).expiry(0))
            .unwrap(),
        StatusCode::SENT
    );
    let m = msg(next(&mut bob, 10));
    assert_eq!((m.id, m.payload.as_slice()), (3, &b"live"[..]));
    bob.ack(&[m.seq]).unwrap();
    // The receipts of a real-time message are live (no SEQ).
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status, s.seq), (3, StatusCode::DELIVERED, None));
    bob.read_receipt("alice", 3).unwrap();
    let s = status(next(&mut alice, 10));
    assert_eq!((s.id, s.status, s.seq), (3, StatusCode::READ, None));
    // A second READ is ignored.
    bob.read_receipt("alice", 3).unwrap();
    barrier(&mut bob, &mut alice);
}

/// A flood of repeated ACKs (and READs) for one delivery produces exactly one
/// DELIVERED and one READ, and the connection keeps being served.
#[test]
fn repeated_acks_and_reads_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    assert_eq!(
        alice.send_wait(&Outgoing::to("bob", b"x").id(1)).unwrap(),
        StatusCode::SENT
    );
    let m = msg(next(&mut bob, 10));
    let seqs = vec![m.seq; 10_000];
    for _ in 0..5 {
        bob.ack(&seqs).unwrap();
    }
    for _ in 0..1000 {
        bob.read_receipt("alice", 1).unwrap();
    }
    let first = status(next(&mut alice, 10));
    let second = status(next(&mut alice, 10));
    let mut got = [first.status, second.status];
    got.sort();
    assert_eq!(got, [StatusCode::DELIVERED, StatusCode::READ]);
    // Nothing more for alice: bob's marker, sent after all those frames,
    // is the next thing she gets.
    barrier(&mut bob, &mut alice);
    bob.ping(Some(2)).unwrap();
    assert_eq!(next(&mut bob, 10), Event::Pong(Some(2)));
}

/// Statuses for bad SENDs: every rule of the STATUS table.
#[test]
fn send_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--max-payload", "100"]);
    let ta = server.user("alice");
    server.user("bob");
    let mut alice = server.connect(&ta);
    let cases = [
        (Outgoing::to("nobody", b"x").id(1), StatusCode::INVALID_DEST),
        (
            Outgoing::to("bad address!", b"x").id(2),
            StatusCode::INVALID_DEST,
        ),
        (Outgoing::to("bob", &[0; 101]).id(3), StatusCode::TOO_LARGE),
        (
            Outgoing::to("bob", b"x").id(4).priority(16),
            StatusCode::BAD_REQUEST,
        ),
        (
            Outgoing {
                id: 5,
                ..Default::default()
            },
            StatusCode::BAD_REQUEST,
        ),
        (
            Outgoing {
                id: 6,
                group: Some("team".into()),
                ..Outgoing::to("bob", b"x")
            },
            StatusCode::BAD_REQUEST,
        ),
        (
            Outgoing {
                id: 7,
                group: Some("team".into()),
                ..Default::default()
            },
            StatusCode::INVALID_DEST,
        ),
    ];
    for (out, want) in cases {
        assert_eq!(alice.send_wait(&out).unwrap(), want, "{out:?}");
    }
    // Fire-and-forget gets no status at all, even for an error.
    alice.send(&Outgoing::to("nobody", b"x")).unwrap();
    alice.ping(Some(9)).unwrap();
    assert_eq!(next(&mut alice, 10), Event::Pong(Some(9)));
}

/// Acceptance 8: a recipient that stops reading while 100,000 messages are
/// sent to it: the server's memory stays bounded (docs/operations.md gives
/// the bound), and every message arrives once it reads again.
#[test]
fn slow_consumer_is_bounded_and_loses_nothing() {
    const N: u64 = 100_000;
    const RSS_BOUND_KIB: u64 = 128 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut bob = server.connect(&tb);
    let mut alice = server.connect(&ta);
    let baseline = server.rss_kib();
    assert!(baseline > 0, "VmRSS read as 0");

    // Pipelined: up to 2,000 SENDs outstanding.
    let payload = [0xabu8; 100];
    let mut peak = 0;
    let accepted = send_pipelined(
        &mut alice,
        N,
        (500, 2_000),
        |i| Outgoing::to("bob", &payload).id(i + 1).flags(0),
        |sent| {
            if sent.is_multiple_of(10_000) {
                peak = peak.max(server.rss_kib());
            }
        },
    );
    assert_eq!(accepted, N);
    peak = peak.max(server.rss_kib());
    eprintln!("slow consumer: RSS baseline {baseline} KiB, peak {peak} KiB");
    assert!(
        peak < RSS_BOUND_KIB,
        "RSS {peak} KiB over the {RSS_BOUND_KIB} KiB bound"
    );

    receive_all(&mut bob, N, 1000);
    barrier(&mut alice, &mut bob);
}

/// A recipient that neither reads nor ACKs real-time messages holds at most
/// its window of them written, as many staged and as many in its ring
/// (4,096 each): past that, their sender is told OVERLOADED instead of
/// SENT, as the protocol says. Every one answered SENT arrives, once,
/// when the recipient reads again.
#[test]
fn real_time_messages_nobody_acks_are_refused_past_their_bound() {
    const N: u64 = 20_000;
    const LIVE_CAPACITY: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut bob = server.connect(&tb);
    let mut alice = server.connect(&ta);
    let payload = [0x11u8; 64];
    let accepted = send_pipelined(
        &mut alice,
        N,
        (250, 1_000),
        |i| Outgoing::to("bob", &payload).id(i + 1).expiry(0).flags(0),
        |_| {},
    );
    assert!(
        accepted <= 3 * LIVE_CAPACITY,
        "{accepted} of {N} real-time messages accepted for a recipient that ACKs none"
    );

    receive_all(&mut bob, accepted, 500);
    barrier(&mut alice, &mut bob);
}

/// Live receipts of real-time messages ACKed in one ACK all reach the
/// sender: they have no SEQ, and none may take another's place.
#[test]
fn live_receipts_acked_together_all_arrive() {
    const N: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let mut bob = server.connect(&tb);
    let batch: Vec<Outgoing> = (1..=N)
        .map(|i| Outgoing::to("bob", b"live").id(i).expiry(0))
        .collect();
    alice.send_many(&batch).unwrap();
    let mut seqs = Vec::new();
    for _ in 0..N {
        seqs.push(msg(next(&mut bob, 10)).seq);
    }
    bob.ack(&seqs).unwrap();
    let mut delivered = HashSet::new();
    while (delivered.len() as u64) < N {
        let s = status(next(&mut alice, 10));
        match s.status {
            StatusCode::SENT => {}
            StatusCode::DELIVERED => {
                assert_eq!(s.seq, None, "a live receipt has no SEQ");
                assert!(delivered.insert(s.id), "DELIVERED {} twice", s.id);
            }
            other => panic!("message {}: {other:?}", s.id),
        }
    }
    barrier(&mut bob, &mut alice);
}
