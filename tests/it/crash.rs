//! Durability: SIGKILL at an arbitrary point, SIGTERM.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tern::client::{Client, ClientError, Event, Outgoing};
use tern::wire::StatusCode;

use crate::util::{barrier_self, next, TestServer};

const N: u64 = 1_500;

/// Sends the ids pipelined (100 per write) until the connection breaks or all
/// are answered; returns the ids that got SENT. With `kill`, SIGKILLs that pid
/// once that many SENTs have arrived, with more SENDs in flight.
fn send_until_broken(
    client: &mut Client,
    ids: impl Iterator<Item = u64>,
    kill: Option<(usize, u32)>,
) -> HashSet<u64> {
    let mut sent = HashSet::new();
    let mut kill = kill;
    let msgs: Vec<Outgoing> = ids
        .map(|i| Outgoing::to("bob", format!("m{i}").as_bytes()).id(i))
        .collect();
    for chunk in msgs.chunks(100) {
        if client.send_many(chunk).is_err() {
            break;
        }
        // Read what answers there are; a broken connection ends the run.
        loop {
            match client.recv_timeout(Duration::from_millis(1)) {
                Ok(Some(Event::Status(s))) if s.seq.is_none() => {
                    assert_eq!(s.status, StatusCode::SENT);
                    sent.insert(s.id);
                    if let Some((at, pid)) = kill {
                        if sent.len() >= at {
                            let pid = pid.to_string();
                            let _ = std::process::Command::new("kill")
                                .args(["-KILL", &pid])
                                .status();
                            kill = None;
                        }
                    }
                }
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) => break,
                Err(_) => return sent,
            }
        }
    }
    loop {
        match client.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(Event::Status(s))) if s.seq.is_none() => {
                sent.insert(s.id);
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) | Err(_) => return sent,
        }
    }
}

/// Acceptance 3: ≥ 1,000 messages to an offline recipient, SIGKILL part-way,
/// restart: every message that got SENT is delivered, none twice with SEQ
/// dedup; a message whose DELIVERED the sender received is never delivered
/// again, even across another SIGKILL.
#[test]
fn sigkill_loses_nothing_acknowledged_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));

    // SIGKILL while alice is mid-burst: half answered, more in flight.
    let mut alice = server.connect(&ta);
    let acknowledged = send_until_broken(&mut alice, 1..=N, Some((N as usize / 2, server.pid())));
    eprintln!("SENT before SIGKILL: {}", acknowledged.len());
    server.restart();

    // The sender retries everything with the same IDs: duplicate detection
    // makes that safe. Every message is now stored exactly once.
    let mut alice = server.connect(&ta);
    let retried = send_until_broken(&mut alice, 1..=N, None);
    assert_eq!(retried.len() as u64, N, "every retry is answered");

    // bob receives everything, deduplicating by SEQ; ACKs half.
    let mut bob = server.connect(&tb);
    let mut got: HashMap<u64, u64> = HashMap::new(); // id -> seq
    while (got.len() as u64) < N {
        match bob.recv_new_timeout(Duration::from_secs(10)).unwrap() {
            Some(Event::Msg(m)) => {
                assert!(
                    got.insert(m.id, m.seq).is_none(),
                    "id {} delivered twice",
                    m.id
                );
                assert_eq!(m.payload, format!("m{}", m.id).into_bytes());
            }
            other => panic!("expected MSG, got {other:?} after {} messages", got.len()),
        }
    }
    for id in &acknowledged {
        assert!(got.contains_key(id), "acknowledged message {id} lost");
    }
    let acked: Vec<u64> = (1..=N / 2).map(|id| got[&id]).collect();
    bob.ack(&acked).unwrap();

    // alice sees DELIVERED for each ACKed message.
    let mut delivered = HashSet::new();
    let mut status_seqs = Vec::new();
    while (delivered.len() as u64) < N / 2 {
        match next(&mut alice, 10) {
            Event::Status(s) if s.status == StatusCode::DELIVERED => {
                delivered.insert(s.id);
                status_seqs.push(s.seq.expect("stored"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    alice.ack(&status_seqs).unwrap();
    drop(bob);

    // Another SIGKILL: delivered messages stay delivered.
    server.restart();
    let mut bob = Client::connect(server.addr, &tb).unwrap(); // no SEQ memory
    let mut again = HashSet::new();
    while let Some(event) = bob.recv_timeout(Duration::from_secs(2)).unwrap() {
        let Event::Msg(m) = event else {
            panic!("unexpected {event:?}")
        };
        assert!(
            !delivered.contains(&m.id),
            "delivered message {} came back",
            m.id
        );
        assert!(m.is_redelivery());
        assert_eq!(got[&m.id], m.seq, "SEQ is stable across restarts");
        again.insert(m.id);
    }
    assert_eq!(
        again.len() as u64,
        N - N / 2,
        "the un-ACKed half is redelivered"
    );
}

/// Acceptance 9: SIGTERM exits 0 within 5 s and the restart serves
/// everything that was accepted. Clients get ERROR SHUTDOWN.
#[test]
fn sigterm_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let msgs: Vec<Outgoing> = (1..=200).map(|i| Outgoing::to("bob", b"x").id(i)).collect();
    alice.send_many(&msgs).unwrap();
    let mut sent = 0;
    while sent < 200 {
        if let Event::Status(s) = next(&mut alice, 10) {
            assert_eq!(s.status, StatusCode::SENT);
            sent += 1;
        }
    }
    let (status, took) = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    match alice.recv_timeout(Duration::from_secs(5)) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, tern::wire::ErrorCode::SHUTDOWN),
        other => panic!("expected ERROR SHUTDOWN, got {other:?}"),
    }

    server.restart();
    let mut bob = server.connect(&tb);
    let mut ids = HashSet::new();
    while ids.len() < 200 {
        if let Event::Msg(m) = next(&mut bob, 10) {
            assert!(ids.insert(m.id));
        }
    }
    barrier_self(&mut bob);
}
