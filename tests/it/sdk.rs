//! The client SDK (`tern-sdk`) against the real server: real sockets, real
//! SQLite files in temporary directories. Issue 10's acceptance items 1
//! (offline-first), 4 (server SIGKILL mid-transfer), 5 (groups) and 6
//! (attachments); the app crash tests (2, 3) are in `sdk_crash.rs`.
//!
//! Waiting is on events or on the store, with deadlines; never a sleep.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tern_sdk::{
    Config, ConnectionState, Direction, Draft, Error, Event, Events, Peer, Status, Store, Tern,
};

use crate::proxy::Proxy;
use crate::util::{http, reserve_port, wait_for, TestServer, ADMIN};

/// An SDK configuration for tests: a short keepalive and reconnect delays.
pub fn config(addr: SocketAddr, token: &str, db: PathBuf) -> Config {
    Config::new(addr.to_string(), token, db)
        .keepalive(5)
        .reconnect(Duration::from_millis(50), Duration::from_millis(500))
        .connect_timeout(Duration::from_secs(5))
}

/// Opens an SDK.
#[track_caller]
pub fn open(config: Config) -> (Tern, Events) {
    Tern::open(config).expect("open the SDK")
}

/// Takes events until one matches, within `within`; returns it.
#[track_caller]
pub fn wait_event(
    events: &Events,
    within: Duration,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + within;
    loop {
        match events.recv_deadline(deadline) {
            Some(e) if pred(&e) => return e,
            Some(_) => {}
            None => panic!("no event {what} within {within:?}"),
        }
    }
}

/// The text payloads of a conversation in store order.
pub fn texts(store: &Store, peer: &Peer) -> Vec<String> {
    store
        .all_messages(peer)
        .expect("read the store")
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

/// How many outgoing messages have `status`.
pub fn outgoing(store: &Store, status: Status) -> u64 {
    store
        .count(Direction::Outgoing, Some(status))
        .expect("count")
}

/// How many incoming messages are stored.
pub fn incoming(store: &Store) -> u64 {
    store.count(Direction::Incoming, None).expect("count")
}

/// Every payload that appears more than once.
pub fn duplicates(texts: &[String]) -> Vec<(&str, usize)> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for t in texts {
        *seen.entry(t).or_default() += 1;
    }
    let mut dups: Vec<_> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
    dups.sort();
    dups
}

/// A thread that takes every event until the SDK shuts down, and returns
/// the texts of the `Received` events (panicking on `Lagged`, which would
/// make the count meaningless).
fn collect_received(events: Events) -> JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut got = Vec::new();
        for e in events {
            match e {
                Event::Received(m) => got.push(String::from_utf8_lossy(&m.payload).into_owned()),
                Event::Lagged => panic!("events lagged"),
                _ => {}
            }
        }
        got
    })
}

/// Acceptance 1: offline-first. With the server stopped, 100 messages are
/// queued (visible as OUTBOX); the server starts; all reach the recipient
/// exactly once and in order, and each status goes DELIVERED, then READ
/// when the recipient marks them read.
#[test]
fn offline_first_queue_then_deliver_in_order_with_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let proxy = Proxy::start(server.addr);
    server.terminate();

    let (alice, alice_events) = open(config(proxy.addr, &alice_token, dir.path().join("a.db")));
    let bob_peer = Peer::user("bob");
    let want: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    for t in &want {
        let m = alice.send(Draft::text(bob_peer.clone(), t)).unwrap();
        assert_eq!(m.status, Status::Outbox);
        assert_ne!(m.id, 0);
    }
    wait_event(&alice_events, Duration::from_secs(10), "Offline", |e| {
        matches!(e, Event::Connection(ConnectionState::Offline { .. }))
    });
    let outbox = alice.store().outbox().unwrap();
    assert_eq!(outbox.len(), 100);
    assert!(outbox.iter().all(|m| m.status == Status::Outbox));
    assert_eq!(texts(alice.store(), &bob_peer), want);

    server.restart();
    proxy.set_target(server.addr);
    let (bob, bob_events) = open(config(server.addr, &bob_token, dir.path().join("b.db")));
    let received = collect_received(bob_events);
    let alice_peer = Peer::user("alice");
    wait_for(Duration::from_secs(30), "bob stores 100", || {
        (incoming(bob.store()) >= 100).then_some(())
    });
    assert_eq!(
        texts(bob.store(), &alice_peer),
        want,
        "exactly once, in order"
    );
    assert_eq!(bob.store().unread(&alice_peer).unwrap(), 100);
    wait_for(Duration::from_secs(30), "alice: 100 DELIVERED", || {
        (outgoing(alice.store(), Status::Delivered) == 100).then_some(())
    });

    assert_eq!(bob.mark_read(&alice_peer).unwrap(), 100);
    assert_eq!(bob.store().unread(&alice_peer).unwrap(), 0);
    wait_for(Duration::from_secs(30), "alice: 100 READ", || {
        (outgoing(alice.store(), Status::Read) == 100).then_some(())
    });

    // A last message is the next thing bob's app gets: nothing came twice.
    alice.send(Draft::text(bob_peer, "end")).unwrap();
    wait_for(Duration::from_secs(30), "the end marker", || {
        (incoming(bob.store()) == 101).then_some(())
    });
    bob.shutdown();
    let mut got = received.join().unwrap();
    assert_eq!(got.pop().as_deref(), Some("end"));
    assert_eq!(got, want, "one Received event per message, in order");
    alice.shutdown();
}

/// Inbox exactly once, deterministically: bob's SDK stores 50 messages
/// and ACKs them, but the ACKs are lost on the way (the proxy swallows
/// them); after the connection is cut, the server redelivers all 50 and
/// the SDK stores none of them again, raises no second event, and ACKs
/// them, emptying the server's queue.
#[test]
fn a_redelivery_after_lost_acks_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let proxy = Proxy::start(server.addr);
    let (bob, bob_events) = open(config(proxy.addr, &bob_token, dir.path().join("b.db")));
    wait_for(Duration::from_secs(10), "bob online", || {
        matches!(bob.state(), ConnectionState::Online { .. }).then_some(())
    });
    let received = collect_received(bob_events);
    proxy.swallow_upstream(true);
    let (alice, _ae) = open(config(server.addr, &alice_token, dir.path().join("a.db")));
    let want: Vec<String> = (0..50).map(|i| format!("d{i:02}")).collect();
    for t in &want {
        alice.send(Draft::text(Peer::user("bob"), t)).unwrap();
    }
    wait_for(Duration::from_secs(20), "bob stores 50", || {
        (incoming(bob.store()) == 50).then_some(())
    });
    let pending = |server: &TestServer| {
        let (code, body) = http(server.http, "GET", "/v1/users/bob", Some(ADMIN), "");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["pending"].as_u64()
    };
    assert_eq!(pending(&server), Some(50), "the ACKs were lost");

    proxy.swallow_upstream(false);
    proxy.cut();
    wait_for(Duration::from_secs(20), "the redelivery ACKed", || {
        (pending(&server) == Some(0)).then_some(())
    });
    assert_eq!(
        texts(bob.store(), &Peer::user("alice")),
        want,
        "stored once each"
    );
    alice.shutdown();
    bob.shutdown();
    assert_eq!(received.join().unwrap(), want, "one event per message");
}

/// Acceptance 5: a group send gets per-member statuses in the sender's
/// store; unread counts of group conversations are right, also for a
/// member who comes online later.
#[test]
fn group_member_statuses_and_unread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let names = ["ann", "ben", "cat", "dan"];
    let tokens: Vec<String> = names.iter().map(|n| server.user(n)).collect();
    let (code, body) = http(
        server.http,
        "PUT",
        "/v1/groups/team",
        Some(ADMIN),
        r#"{"members":["ann","ben","cat","dan"]}"#,
    );
    assert_eq!(code, 201, "{body}");
    let sdk = |i: usize| open(config(server.addr, &tokens[i], dir.path().join(names[i])));
    let ((ann, _ae), (ben, _be), (cat, _ce)) = (sdk(0), sdk(1), sdk(2));
    let team = Peer::group("team");

    let sent: Vec<_> = (0..3)
        .map(|i| {
            ann.send(Draft::text(team.clone(), &format!("g{i}")))
                .unwrap()
        })
        .collect();
    for member in [&ben, &cat] {
        wait_for(Duration::from_secs(20), "3 group messages", || {
            (incoming(member.store()) == 3).then_some(())
        });
        assert_eq!(texts(member.store(), &team), ["g0", "g1", "g2"]);
        let m = &member.store().all_messages(&team).unwrap()[0];
        assert_eq!(m.sender.as_deref(), Some("ann"));
    }
    assert_eq!(cat.store().unread(&team).unwrap(), 3);
    let convs = cat.store().conversations().unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].peer.clone(), convs[0].unread), (team.clone(), 3));

    assert_eq!(ben.mark_read(&team).unwrap(), 3);
    assert_eq!(ben.store().unread(&team).unwrap(), 0);
    for m in &sent {
        let statuses = wait_for(Duration::from_secs(20), "ben READ, cat DELIVERED", || {
            let s: Vec<_> = ann
                .store()
                .member_statuses(m.lid)
                .unwrap()
                .into_iter()
                .map(|ms| (ms.member, ms.status))
                .collect();
            (s == [
                ("ben".to_owned(), Status::Read),
                ("cat".to_owned(), Status::Delivered),
            ])
            .then_some(s)
        });
        assert_eq!(statuses.len(), 2);
        let stored = ann.store().message(m.lid).unwrap().unwrap();
        assert_eq!(stored.status, Status::Read, "the furthest a member got");
    }

    // ben writes to the group: one unread more for ann (her own messages
    // are not unread) and for cat.
    ben.send(Draft::text(team.clone(), "from ben")).unwrap();
    wait_for(Duration::from_secs(20), "ann and cat get ben's", || {
        (ann.store().unread(&team).unwrap() == 1 && cat.store().unread(&team).unwrap() == 4)
            .then_some(())
    });
    assert_eq!(
        texts(ann.store(), &team),
        ["g0", "g1", "g2", "from ben"],
        "one conversation holds both directions"
    );

    // dan was offline: he gets all four, and ann's store learns he has hers.
    let (dan, _de) = sdk(3);
    wait_for(Duration::from_secs(20), "dan gets 4", || {
        (dan.store().unread(&team).unwrap() == 4).then_some(())
    });
    for m in &sent {
        wait_for(
            Duration::from_secs(20),
            "dan DELIVERED in ann's store",
            || {
                ann.store()
                    .member_statuses(m.lid)
                    .unwrap()
                    .iter()
                    .any(|ms| ms.member == "dan" && ms.status == Status::Delivered)
                    .then_some(())
            },
        );
    }
    for t in [ann, ben, cat, dan] {
        t.shutdown();
    }
}

/// Acceptance 4: the server is SIGKILLed twice while 2,000 messages go
/// from one SDK to another; both reconnect by themselves, and in the end
/// each store holds each message once, in order, all DELIVERED.
#[test]
fn server_sigkill_mid_transfer_loses_and_duplicates_nothing() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let proxy = Proxy::start(server.addr);
    // A window of 4 SENDs paces the transfer so that the kills fall in
    // its middle.
    let (alice, alice_events) =
        open(config(proxy.addr, &alice_token, dir.path().join("a.db")).window(4));
    let (bob, bob_events) = open(config(proxy.addr, &bob_token, dir.path().join("b.db")));
    let received = collect_received(bob_events);
    let alice_states = thread::spawn(move || {
        alice_events
            .filter_map(|e| match e {
                Event::Connection(s) => Some(s),
                _ => None,
            })
            .collect::<Vec<_>>()
    });
    let (bob_peer, alice_peer) = (Peer::user("bob"), Peer::user("alice"));
    let want: Vec<String> = (0..N).map(|i| format!("x{i:04}")).collect();
    for t in &want {
        alice.send(Draft::text(bob_peer.clone(), t)).unwrap();
    }

    for round in 1..=2 {
        // Both online (again), then some progress, then the kill.
        wait_for(Duration::from_secs(30), "both SDKs online", || {
            [&alice, &bob]
                .iter()
                .all(|t| matches!(t.state(), ConnectionState::Online { .. }))
                .then_some(())
        });
        let from = incoming(bob.store());
        let target = from + (N as u64 - from) / 3;
        wait_for(Duration::from_secs(60), "progress before the kill", || {
            (incoming(bob.store()) >= target).then_some(())
        });
        server.sigkill();
        let delivered = outgoing(alice.store(), Status::Delivered);
        eprintln!(
            "kill {round}: bob has {}, alice has {delivered} DELIVERED",
            incoming(bob.store())
        );
        assert!(delivered < N as u64, "the kill came after the transfer");
        server.restart();
        proxy.set_target(server.addr);
    }

    wait_for(Duration::from_secs(120), "all delivered", || {
        (incoming(bob.store()) >= N as u64
            && outgoing(alice.store(), Status::Delivered) == N as u64)
            .then_some(())
    });
    let got = texts(bob.store(), &alice_peer);
    assert_eq!(duplicates(&got), [], "no duplicates in bob's store");
    assert_eq!(got, want, "nothing lost, in order");
    assert_eq!(
        alice.store().count(Direction::Outgoing, None).unwrap(),
        N as u64
    );
    assert_eq!(texts(alice.store(), &bob_peer), want);
    alice.shutdown();
    bob.shutdown();
    assert_eq!(received.join().unwrap(), want, "one event per message");
    let states = alice_states.join().unwrap();
    let onlines = states
        .iter()
        .filter(|s| matches!(s, ConnectionState::Online { .. }))
        .count();
    assert!(
        onlines >= 3,
        "alice reconnected after each kill: {states:?}"
    );
    assert!(states
        .iter()
        .any(|s| matches!(s, ConnectionState::Offline { .. })));
}

/// `len` pseudo-random bytes written to `path`; returns their sha256.
pub fn noise_file(path: &Path, len: u64) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hash = Sha256::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let n = buf.len().min(left as usize);
        for chunk in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = x.to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        hash.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    hex::encode(hash.finalize())
}

/// sha256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> (String, u64) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return (hex::encode(hash.finalize()), len);
        }
        hash.update(&buf[..n]);
        len += n as u64;
    }
}

/// Acceptance 6 (download side): a corrupted download is detected and
/// leaves nothing in the cache; the same download uncorrupted succeeds.
/// (The 50 MiB send across a sender restart is in `sdk_crash.rs`.)
#[test]
fn a_corrupted_download_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let files = Proxy::start(server.http);
    let http_base = format!("http://{}", server.http);
    let file = dir.path().join("photo.png");
    let sha = noise_file(&file, 3 << 20);
    let (alice, _ae) =
        open(config(server.addr, &alice_token, dir.path().join("a.db")).http(&http_base));
    let cache = dir.path().join("bob-cache");
    let (bob, bob_events) = open(
        config(server.addr, &bob_token, dir.path().join("b.db"))
            .http(files.url())
            .cache_dir(&cache),
    );
    let sent = alice
        .send_file(Peer::user("bob"), &file, Some("look"))
        .unwrap();
    assert_eq!(sent.status, Status::Uploading);
    let Event::Received(m) = wait_event(
        &bob_events,
        Duration::from_secs(30),
        "the attachment",
        |e| matches!(e, Event::Received(_)),
    ) else {
        unreachable!()
    };
    let a = m.attachment().expect("an attachment");
    assert_eq!(
        (
            a.name.as_str(),
            a.size,
            a.mime.as_str(),
            a.sha256.as_str(),
            a.caption.as_deref()
        ),
        (
            "photo.png",
            3 << 20,
            "image/png",
            sha.as_str(),
            Some("look")
        )
    );

    files.corrupt_downstream_at(Some(1 << 20));
    match bob.download(&m) {
        Err(Error::Corrupt { expected, got, .. }) => {
            assert_eq!(expected, sha);
            assert_ne!(got, sha);
        }
        other => panic!("expected a corrupt download, got {other:?}"),
    }
    let left: Vec<_> = walk(&cache);
    assert!(left.is_empty(), "nothing kept: {left:?}");

    files.corrupt_downstream_at(None);
    let path = bob.download(&m).unwrap();
    assert_eq!(sha256_file(&path), (sha.clone(), 3 << 20));
    assert_eq!(path.file_name().unwrap(), "photo.png");
    // A second call finds it in the cache (verified again).
    assert_eq!(bob.download(&m).unwrap(), path);
    alice.shutdown();
    bob.shutdown();
}

/// An attachment whose upload finishes after a later message was sent goes
/// out at once. The connection sends the outbox from a cursor, the last
/// local id written; the text sent while the photo uploaded moved it past
/// the photo, so the photo waited for the next reconnect, behind a healthy
/// connection.
#[test]
fn an_attachment_uploaded_after_a_later_message_is_sent_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let files = Proxy::start(server.http);
    let file = dir.path().join("photo.png");
    noise_file(&file, 4 << 20);
    let (alice, alice_events) =
        open(config(server.addr, &alice_token, dir.path().join("a.db")).http(files.url()));
    let (bob, bob_events) = open(config(server.addr, &bob_token, dir.path().join("b.db")));
    // The upload stops after its first MiB until the text is SENT.
    let (resume, held) = std::sync::mpsc::channel::<()>();
    files.on_upstream_bytes(1 << 20, move || {
        let _ = held.recv_timeout(Duration::from_secs(30));
    });
    let sent = |lid: i64| move |e: &Event| matches!(e, Event::Status { lid: l, status: Status::Sent, .. } if *l == lid);
    let photo = alice.send_file(Peer::user("bob"), &file, None).unwrap();
    let text = alice
        .send(Draft::text(Peer::user("bob"), "after the photo"))
        .unwrap();
    wait_event(
        &alice_events,
        Duration::from_secs(20),
        "the text SENT",
        sent(text.lid),
    );
    resume.send(()).unwrap();
    wait_event(
        &alice_events,
        Duration::from_secs(20),
        "the photo SENT",
        sent(photo.lid),
    );
    let mut got = 0;
    while got < 2 {
        wait_event(&bob_events, Duration::from_secs(20), "both messages", |e| {
            matches!(e, Event::Received(_))
        });
        got += 1;
    }
    alice.shutdown();
    bob.shutdown();
}

/// An upload whose files server stops taking bytes and never answers (a
/// stalled server, a half-open connection) fails at `http_timeout` and is
/// retried, rather than hold its thread, and with it `shutdown`, until the
/// server gives up on its side.
#[test]
fn a_stalled_upload_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let alice_token = server.user("alice");
    let files = Proxy::start(server.http);
    let file = dir.path().join("photo.png");
    noise_file(&file, 2 << 20);
    let (alice, events) = open(
        config(server.addr, &alice_token, dir.path().join("a.db"))
            .http(files.url())
            .http_timeout(Duration::from_secs(2)),
    );
    // The files server gets the first MiB, then nothing: the rest waits in
    // the sockets' buffers, and the SDK for an answer.
    let (_resume, held) = std::sync::mpsc::channel::<()>();
    files.on_upstream_bytes(1 << 20, move || {
        let _ = held.recv_timeout(Duration::from_secs(60));
    });
    alice.send_file(Peer::user("bob"), &file, None).unwrap();
    // The whole file read: from here the upload waits for the server.
    wait_event(
        &events,
        Duration::from_secs(20),
        "the file read",
        |e| matches!(e, Event::Upload { sent, total, .. } if sent == total),
    );
    let (done, stopped) = std::sync::mpsc::channel();
    let began = Instant::now();
    thread::spawn(move || {
        alice.shutdown();
        let _ = done.send(());
    });
    assert!(
        stopped.recv_timeout(Duration::from_secs(6)).is_ok(),
        "shutdown still waiting for the upload after {:?}",
        began.elapsed()
    );
}

/// Every file under `dir` (none if it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// An SDK whose token the server refuses says AuthFailed and does not
/// retry on its own; a second login of the same user makes the first say
/// Replaced. Messages queued meanwhile stay in the outbox.
#[test]
fn auth_failed_and_replaced_are_reported_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let token = server.user("alice");
    let (bad, bad_events) = open(config(server.addr, "not-a-token", dir.path().join("x.db")));
    wait_event(&bad_events, Duration::from_secs(10), "AuthFailed", |e| {
        *e == Event::Connection(ConnectionState::AuthFailed)
    });
    assert_eq!(bad.state(), ConnectionState::AuthFailed);
    bad.send(Draft::text(Peer::user("bob"), "kept")).unwrap();
    assert_eq!(bad.store().outbox().unwrap().len(), 1);
    bad.shutdown();

    let (first, first_events) = open(config(server.addr, &token, dir.path().join("1.db")));
    wait_event(&first_events, Duration::from_secs(10), "Online", |e| {
        matches!(e, Event::Connection(ConnectionState::Online { .. }))
    });
    let (second, second_events) = open(config(server.addr, &token, dir.path().join("2.db")));
    wait_event(&second_events, Duration::from_secs(10), "Online", |e| {
        matches!(e, Event::Connection(ConnectionState::Online { .. }))
    });
    wait_event(&first_events, Duration::from_secs(10), "Replaced", |e| {
        *e == Event::Connection(ConnectionState::Replaced)
    });
    // `reconnect` takes the connection back.
    first.reconnect();
    wait_event(
        &first_events,
        Duration::from_secs(10),
        "Online again",
        |e| matches!(e, Event::Connection(ConnectionState::Online { .. })),
    );
    wait_event(
        &second_events,
        Duration::from_secs(10),
        "second Replaced",
        |e| *e == Event::Connection(ConnectionState::Replaced),
    );
    first.shutdown();
    second.shutdown();
}

/// A connection that fails right after its login backs off like a failed
/// attempt. Before, every login reset the delays, so a session that ended
/// at once (here, a frame garbled after WELCOME, every time; in an app, a
/// local store that fails each batch) reconnected every `reconnect_min`
/// for as long as it lasted.
#[test]
fn a_connection_that_fails_after_login_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice, bob) = (server.user("alice"), server.user("bob"));
    // Something for alice, so that a frame follows her WELCOME.
    let mut sender = server.connect(&bob);
    let mut m = tern::client::Outgoing::to("alice", b"waiting");
    m.id = 1;
    m.expiry = Some(3600);
    assert_eq!(sender.send_wait(&m).unwrap(), tern::wire::StatusCode::SENT);
    // WELCOME's length, from a login of her own (same keepalive as the
    // SDK's, and nothing ACKed).
    let welcome_len = {
        let mut hello = Vec::new();
        tern::wire::encode(
            &tern::wire::Frame::Hello(tern::wire::Hello {
                version: Some(1),
                token: Some(&alice),
                keepalive: Some(5),
                ..Default::default()
            }),
            &mut hello,
        )
        .unwrap();
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&hello).unwrap();
        let mut head = [0u8; 5];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[0], tern::wire::Kind::WELCOME.0);
        5 + u64::from(u32::from_be_bytes(head[1..].try_into().unwrap()))
    };
    // Every connection's frame after WELCOME gets a bad kind.
    let proxy = Proxy::start(server.addr);
    proxy.corrupt_downstream_at(Some(welcome_len));
    let (sdk, events) = open(config(proxy.addr, &alice, dir.path().join("a.db")));
    // Delays with reconnect(50 ms, 500 ms): attempt n waits at least
    // min(50·2ⁿ, 500)/2 ms, so the sixth at least 250 ms; each reset, at
    // most 50 ms.
    let mut delays = Vec::new();
    let mut logged_in = false;
    while delays.len() < 6 {
        match wait_event(&events, Duration::from_secs(20), "a state", |e| {
            matches!(e, Event::Connection(_))
        }) {
            Event::Connection(ConnectionState::Online { .. }) => logged_in = true,
            Event::Connection(ConnectionState::Offline { retry_in, reason }) => {
                assert!(logged_in, "offline before a login: {reason}");
                logged_in = false;
                delays.push(retry_in);
            }
            _ => {}
        }
    }
    assert!(
        delays[5] >= Duration::from_millis(200),
        "delays after logins that failed at once: {delays:?}"
    );
    sdk.shutdown();
}

/// One instance per store file: a second open fails with InUse while the
/// first lives, whatever its token (it would have run a second connection
/// on the same outbox, or raced the first login's claim of the store), and
/// succeeds once the first has shut down.
#[test]
fn a_store_is_open_in_one_instance_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice, bob) = (server.user("alice"), server.user("bob"));
    let db = dir.path().join("a.db");
    let (first, _events) = open(config(server.addr, &alice, db.clone()));
    for token in [&alice, &bob] {
        match Tern::open(config(server.addr, token, db.clone())) {
            Err(Error::InUse(path)) => assert_eq!(path, db),
            Err(e) => panic!("expected InUse, got {e}"),
            Ok(_) => panic!("a second instance opened {}", db.display()),
        }
    }
    first.shutdown();
    let (again, events) = open(config(server.addr, &alice, db));
    wait_event(&events, Duration::from_secs(10), "Online", |e| {
        matches!(e, Event::Connection(ConnectionState::Online { .. }))
    });
    again.shutdown();
}

/// A store opened with another user's token exchanges nothing: SEQs are
/// numbered per user, so the other user's messages whose SEQs the store
/// already holds were dropped as duplicates, and ACKed, and this store's
/// outbox went out under the other user's name. No file goes up or down
/// with that token either, and the state is final: a reconnect would log
/// in as the other user again.
#[test]
fn a_store_opened_with_another_users_token_exchanges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token, carol_token) = (
        server.user("alice"),
        server.user("bob"),
        server.user("carol"),
    );
    let http = format!("http://{}", server.http);
    let db = dir.path().join("alice.db");
    let (alice, alice_events) = open(config(server.addr, &alice_token, db.clone()));
    let to_bob = alice
        .send(Draft::text(Peer::user("bob"), "for bob"))
        .unwrap();
    wait_event(
        &alice_events,
        Duration::from_secs(20),
        "SENT",
        |e| matches!(e, Event::Status { lid, status: Status::Sent, .. } if *lid == to_bob.lid),
    );
    // A file from carol, in alice's store.
    let (carol, _carol_events) =
        open(config(server.addr, &carol_token, dir.path().join("carol.db")).http(&http));
    let file = dir.path().join("for-alice.png");
    noise_file(&file, 1 << 10);
    carol.send_file(Peer::user("alice"), &file, None).unwrap();
    let Event::Received(from_carol) = wait_event(
        &alice_events,
        Duration::from_secs(20),
        "carol's file",
        |e| matches!(e, Event::Received(_)),
    ) else {
        unreachable!()
    };
    carol.shutdown();
    alice.shutdown();

    let files = Proxy::start(server.http);
    let (wrong, wrong_events) = open(config(server.addr, &bob_token, db.clone()).http(files.url()));
    wrong
        .send(Draft::text(Peer::user("carol"), "not as bob"))
        .unwrap();
    wrong.send_file(Peer::user("carol"), &file, None).unwrap();
    let expected = ConnectionState::WrongUser {
        stored: "alice".into(),
        token_for: "bob".into(),
    };
    wait_event(&wrong_events, Duration::from_secs(10), "WrongUser", |e| {
        *e == Event::Connection(expected.clone())
    });
    assert_eq!(incoming(wrong.store()), 1, "bob's message not taken");
    assert_eq!(outgoing(wrong.store(), Status::Outbox), 1, "nothing sent");
    // No file goes up or down with bob's token.
    assert!(matches!(wrong.download(&from_carol), Err(Error::Offline)));
    assert_eq!(outgoing(wrong.store(), Status::Uploading), 1);
    assert_eq!(files.upstream_bytes(), 0, "an upload as bob");
    // Final: a reconnect does not log in as bob again (it would announce
    // Connecting at once; two seconds of nothing).
    wrong.reconnect();
    let next = wrong_events.recv_deadline(Instant::now() + Duration::from_secs(2));
    assert!(next.is_none(), "{next:?}");
    wrong.shutdown();
    // Bob's own store gets his message: it was not ACKed by the wrong one.
    let (bob, bob_events) = open(config(server.addr, &bob_token, dir.path().join("bob.db")));
    wait_event(
        &bob_events,
        Duration::from_secs(20),
        "bob's message",
        |e| matches!(e, Event::Received(m) if m.payload == b"for bob"),
    );
    bob.shutdown();
}

/// EXPIRY 0 and id 0 never enter the outbox: `send` refuses EXPIRY 0, and
/// live sends fail while offline and store nothing.
#[test]
fn real_time_and_fire_and_forget_never_enter_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (alice_token, bob_token) = (server.user("alice"), server.user("bob"));
    let bob_peer = Peer::user("bob");
    let (alice, alice_events) = open(config(server.addr, &alice_token, dir.path().join("a.db")));
    assert!(matches!(
        alice.send(Draft::text(bob_peer.clone(), "typing").expiry(0)),
        Err(Error::Invalid(_))
    ));
    wait_event(&alice_events, Duration::from_secs(10), "Online", |e| {
        matches!(e, Event::Connection(ConnectionState::Online { .. }))
    });
    // bob is offline: a real-time message is answered OFFLINE, not stored.
    let id = alice
        .send_live(&Draft::text(bob_peer.clone(), "typing").msg_type(7))
        .unwrap();
    let e = wait_event(&alice_events, Duration::from_secs(10), "LiveStatus", |e| {
        matches!(e, Event::LiveStatus { .. })
    });
    assert_eq!(
        e,
        Event::LiveStatus {
            id,
            status: tern::wire::StatusCode::OFFLINE
        }
    );
    // Online and TYPE 7 declared ephemeral: a Live event, nothing stored.
    let (bob, bob_events) =
        open(config(server.addr, &bob_token, dir.path().join("b.db")).ephemeral_types([7]));
    wait_event(&bob_events, Duration::from_secs(10), "Online", |e| {
        matches!(e, Event::Connection(ConnectionState::Online { .. }))
    });
    alice
        .send_live(&Draft::text(bob_peer.clone(), "typing").msg_type(7))
        .unwrap();
    alice
        .send_fire_and_forget(&Draft::text(bob_peer.clone(), "ff"))
        .unwrap();
    let e = wait_event(&bob_events, Duration::from_secs(10), "Live", |e| {
        matches!(e, Event::Live(_))
    });
    assert!(matches!(e, Event::Live(m) if m.payload == b"typing"));
    wait_event(
        &bob_events,
        Duration::from_secs(10),
        "the fire-and-forget",
        |e| matches!(e, Event::Received(m) if m.payload == b"ff" && m.id == 0),
    );
    assert_eq!(alice.store().count(Direction::Outgoing, None).unwrap(), 0);
    assert_eq!(
        incoming(bob.store()),
        1,
        "only the fire-and-forget is stored"
    );
    alice.shutdown();
    bob.shutdown();
    // Offline (nothing listens at its address), a live send is refused.
    let (_held, nowhere) = reserve_port(0);
    let (offline, _) = open(config(nowhere, &alice_token, dir.path().join("c.db")));
    assert!(matches!(
        offline.send_live(&Draft::text(bob_peer, "x")),
        Err(Error::Offline)
    ));
    offline.shutdown();
}
