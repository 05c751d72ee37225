//! Durability: SIGKILL at an arbitrary point, SIGTERM.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tern::client::{Client, ClientError, Outgoing};
use tern::wire::StatusCode;

use crate::util::{
    barrier_self, kill_mid_burst, marker, msg, next, send_burst, status, wait_for, TestServer,
};

const N: u64 = 1_500;
/// SENDs in flight at most during the burst. The SIGKILL comes at `N / 2`
/// SENTs, so at most `N / 2 + WINDOW` of the `N` can ever be answered.
const WINDOW: usize = 100;

/// Acceptance 3: ≥ 1,000 messages to an offline recipient, SIGKILL part-way,
/// restart.
///
/// - Before any retry, every message the sender saw SENT for is delivered,
///   each once.
/// - Retrying only the unanswered IDs then gets every message delivered
///   exactly once (SEQ dedup makes the retry of one that was written but not
///   answered safe).
/// - A message whose DELIVERED the sender received is never delivered again,
///   even across another SIGKILL; the rest are redelivered with the same SEQ.
#[test]
fn sigkill_loses_nothing_acknowledged_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let msgs = burst_to_bob();
    let Survived {
        acknowledged,
        mut alice,
        mut bob,
        mut got,
        marker_seq,
    } = kill_and_drain(&mut server, &ta, &tb, &msgs);
    let mut marker_seqs = vec![marker_seq];

    // alice retries only what was not answered, under the same IDs. Those
    // written before the SIGKILL are answered SENT as duplicates and not
    // delivered again; bob gets exactly the others, then the next marker.
    let retry: Vec<Outgoing> = msgs
        .iter()
        .filter(|m| !acknowledged.contains(&m.id))
        .cloned()
        .collect();
    let answered = send_burst(&mut alice, &retry, WINDOW, |_| {});
    assert_eq!(answered.len(), retry.len(), "every retry is answered SENT");
    let mark = marker("bob");
    assert_eq!(alice.send_wait(&mark).unwrap(), StatusCode::SENT);
    marker_seqs.push(drain_to(&mut bob, &mark, &mut got));
    let ids: BTreeSet<u64> = got.keys().copied().collect();
    assert_eq!(
        ids,
        (1..=N).collect::<BTreeSet<u64>>(),
        "every message, exactly once"
    );

    // bob ACKs the markers and the first half; alice sees DELIVERED for each
    // of that half, so those ACKs (and the markers', sent in the same ACK)
    // are durable.
    let mut acks = marker_seqs;
    acks.extend((1..=N / 2).map(|id| got[&id]));
    bob.ack(&acks).unwrap();
    let mut delivered = HashSet::new();
    let mut status_seqs = Vec::new();
    while (delivered.len() as u64) < N / 2 {
        let s = status(next(&mut alice, 10));
        assert_eq!(s.status, StatusCode::DELIVERED, "{s:?}");
        assert!(delivered.insert(s.id), "DELIVERED twice for {}", s.id);
        status_seqs.push(s.seq.expect("stored"));
    }
    assert_eq!(delivered, (1..=N / 2).collect::<HashSet<u64>>());
    alice.ack(&status_seqs).unwrap();
    drop(bob);

    // Another SIGKILL: delivered messages stay delivered; the un-ACKed half
    // comes back to a client with no SEQ memory, with the same SEQs, marked
    // REDELIVERY, and nothing else before the next marker.
    server.restart();
    let mut alice = server.connect(&ta);
    let mark = marker("bob");
    assert_eq!(alice.send_wait(&mark).unwrap(), StatusCode::SENT);
    let mut bob = server.connect(&tb);
    let mut again = BTreeSet::new();
    loop {
        let m = msg(next(&mut bob, 10));
        if m.id == mark.id {
            break;
        }
        assert!(
            !delivered.contains(&m.id),
            "delivered message {} came back",
            m.id
        );
        assert_eq!(got.get(&m.id), Some(&m.seq), "SEQ is stable: {m:?}");
        assert!(m.is_redelivery(), "{m:?}");
        assert!(again.insert(m.id), "id {} redelivered twice", m.id);
    }
    assert_eq!(
        again,
        (N / 2 + 1..=N).collect::<BTreeSet<u64>>(),
        "the un-ACKed half is redelivered"
    );
}

/// The `N` messages alice sends bob: IDs 1..=N, payload `m<ID>`.
fn burst_to_bob() -> Vec<Outgoing> {
    (1..=N)
        .map(|i| Outgoing::to("bob", format!("m{i}").as_bytes()).id(i))
        .collect()
}

/// What [`kill_and_drain`] leaves: alice's SENT IDs from before the
/// SIGKILL, both connected again, and what bob got (ID → SEQ) up to a
/// marker (its SEQ).
struct Survived {
    acknowledged: HashSet<u64>,
    alice: Client,
    bob: Client,
    got: HashMap<u64, u64>,
    marker_seq: u64,
}

/// alice sends `msgs` to bob (offline); SIGKILL once half are answered,
/// with up to WINDOW more in flight (the burst goes on until the
/// connection breaks); restart. Then bob drains what survived, each once,
/// up to a marker alice sends now (delivered after everything stored
/// before it), and every message answered SENT before the SIGKILL is among
/// them.
fn kill_and_drain(server: &mut TestServer, ta: &str, tb: &str, msgs: &[Outgoing]) -> Survived {
    let mut alice = server.connect(ta);
    let acknowledged = kill_mid_burst(server, &mut alice, msgs, WINDOW);
    server.restart();

    let mut alice = server.connect(ta);
    let mark = marker("bob");
    assert_eq!(alice.send_wait(&mark).unwrap(), StatusCode::SENT);
    let mut bob = server.connect(tb);
    let mut got: HashMap<u64, u64> = HashMap::new();
    let marker_seq = drain_to(&mut bob, &mark, &mut got);
    eprintln!("{} delivered before any retry", got.len());
    let lost: BTreeSet<u64> = acknowledged
        .iter()
        .copied()
        .filter(|id| !got.contains_key(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of the {} messages answered SENT before the SIGKILL are lost: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
    Survived {
        acknowledged,
        alice,
        bob,
        got,
        marker_seq,
    }
}

/// The same SIGKILL after the cap on WAL files (`store::MAX_TOTAL_WAL`)
/// made RocksDB flush the column families holding the oldest WAL and
/// delete it mid-run: nothing answered SENT is lost, nothing is delivered
/// twice, neither what went through the deleted WAL files nor the burst
/// in the live one. The test waits for RocksDB's LOG to name the WAL the
/// cap retires and for that file to be gone, so it cannot pass without the
/// cap.
///
/// alice first sends carol 48 KiB messages (compressible: little SST)
/// until the cap acts, at most 640 MiB; carol reads all of them after the
/// restart.
#[test]
fn sigkill_after_the_wal_cap_retired_files_loses_nothing() {
    /// 48 KiB messages per round: ~10 MiB.
    const ROUND: u64 = 210;
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb, tc) = (
        server.user("alice"),
        server.user("bob"),
        server.user("carol"),
    );
    let db = dir.path().join("db");
    let retired_wal = || -> Option<u64> {
        let log = std::fs::read_to_string(db.join("LOG")).unwrap_or_default();
        let (_, rest) = log.split_once("Flushing all column families with data in WAL number ")?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut alice = server.connect(&ta);
    // IDs past the burst's: a SEND that reuses an (alice, ID) is a
    // duplicate, answered SENT and not stored.
    let first = 1_000_000;
    let mut id = first;
    while retired_wal().is_none() {
        assert!(
            id - first < 64 * ROUND,
            "no WAL retired by the cap after 640 MiB"
        );
        let big: Vec<Outgoing> = (0..ROUND)
            .map(|_| {
                id += 1;
                Outgoing::to("carol", &[b'c'; 48 << 10][..]).id(id)
            })
            .collect();
        assert_eq!(
            send_burst(&mut alice, &big, WINDOW, |_| {}).len(),
            big.len()
        );
    }
    let wal = retired_wal().unwrap();
    wait_for(
        Duration::from_secs(30),
        "the retired WAL file deleted",
        || {
            let live = std::fs::read_dir(&db).unwrap().flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".log")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n <= wal)
            });
            (!live).then_some(())
        },
    );
    eprintln!("WAL {wal} retired after {} messages of 48 KiB", id - first);
    drop(alice);

    let Survived { mut alice, .. } = kill_and_drain(&mut server, &ta, &tb, &burst_to_bob());

    // carol gets every one of her messages, once, ACKing as she goes.
    let mark = marker("carol");
    assert_eq!(alice.send_wait(&mark).unwrap(), StatusCode::SENT);
    let mut carol = server.connect(&tc);
    let mut ids = BTreeSet::new();
    loop {
        let m = msg(next(&mut carol, 10));
        carol.ack(&[m.seq]).unwrap();
        if m.id == mark.id {
            break;
        }
        assert!(ids.insert(m.id), "carol got {} twice", m.id);
    }
    assert_eq!(
        ids,
        (first + 1..=id).collect::<BTreeSet<u64>>(),
        "carol's messages, each once"
    );
}

/// Reads bob's messages into `got` (ID → SEQ; each ID once, payload
/// `m<ID>`) up to the marker `mark`; returns the marker's SEQ.
fn drain_to(bob: &mut Client, mark: &Outgoing, got: &mut HashMap<u64, u64>) -> u64 {
    loop {
        let m = msg(next(bob, 10));
        if m.id == mark.id {
            assert_eq!(m.payload, mark.payload);
            return m.seq;
        }
        assert!(
            got.insert(m.id, m.seq).is_none(),
            "id {} delivered twice",
            m.id
        );
        assert_eq!(m.payload, format!("m{}", m.id).into_bytes());
    }
}

/// Acceptance 9: SIGTERM exits 0 within 5 s and the restart serves
/// everything that was accepted, once. Clients get ERROR SHUTDOWN.
#[test]
fn sigterm_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let msgs: Vec<Outgoing> = (1..=200).map(|i| Outgoing::to("bob", b"x").id(i)).collect();
    alice.send_many(&msgs).unwrap();
    for _ in 0..200 {
        assert_eq!(status(next(&mut alice, 10)).status, StatusCode::SENT);
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
        let m = msg(next(&mut bob, 10));
        assert!(ids.insert(m.id), "id {} delivered twice", m.id);
    }
    barrier_self(&mut bob);
}
