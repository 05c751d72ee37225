//! Liveness under the conditions an operator meets in the first week
//! (issue 8): each test pins a failure found by probing the server.

use std::collections::HashSet;

use tern::client::{Event, Outgoing};
use tern::wire::StatusCode;

use crate::util::{next, TestServer};

/// Regression (issue 8, item 1): a recipient that reads but ACKs only every
/// 512 messages stopped receiving after about `conn_buffer` of output (256
/// messages of 8 KiB), until it happened to send any frame: delivery waited
/// for input instead of for room in the socket. Now every message arrives
/// while the client sends nothing but its ACKs, 512 at a time.
#[test]
fn a_client_that_acks_in_batches_never_stalls() {
    const N: u64 = 4000;
    const EVERY: usize = 512;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = server.connect(&ta);
    let payload = vec![0x42u8; 8 * 1024];
    // Queue all N while bob is offline; 0x0 flags: no receipts to drain.
    let out: Vec<Outgoing> = (1..=N)
        .map(|id| Outgoing::to("bob", &payload).id(id).flags(0))
        .collect();
    for chunk in out.chunks(500) {
        alice.send_many(chunk).unwrap();
        for _ in chunk {
            match next(&mut alice, 30) {
                Event::Status(s) => assert_eq!(s.status, StatusCode::SENT, "id {}", s.id),
                other => panic!("expected STATUS, got {other:?}"),
            }
        }
    }
    let mut bob = server.connect(&tb);
    let mut ids = HashSet::new();
    let mut unacked = Vec::new();
    while ids.len() < N as usize {
        match next(&mut bob, 20) {
            Event::Msg(m) => {
                assert!(ids.insert(m.id), "message {} delivered twice", m.id);
                unacked.push(m.seq);
            }
            other => panic!("expected MSG, got {other:?}"),
        }
        if unacked.len() == EVERY {
            bob.ack(&unacked).unwrap();
            unacked.clear();
        }
    }
    assert_eq!(ids.len(), N as usize);
}
