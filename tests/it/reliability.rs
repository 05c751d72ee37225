//! Liveness under the conditions an operator meets in the first week
//! (issue 8): each test pins a failure found by probing the server.

use std::collections::HashSet;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tern::client::{Client, Event, Outgoing};
use tern::wire::StatusCode;

use crate::util::{next, request, wait_for, TestServer};

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

/// Regression (issue 8, item 2): at its descriptor limit the server lost its
/// HTTP listener for good. tiny_http's accept thread duplicated each socket
/// with `try_clone().unwrap()` (a panic on EMFILE) and left its loop on the
/// first accept error, so `/healthz` and the admin API went unanswered while
/// the process stayed up. Here the running server's limit is lowered to 256
/// (`prlimit`), both ports are flooded until it has no descriptor left, the
/// flood is released, and both listeners must serve again.
#[test]
fn every_listener_survives_descriptor_exhaustion() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let token = server.user("alice");
    let pid = server.pid();
    let limited = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=256:256"])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(limited.success(), "prlimit failed: {limited:?}");
    let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let mut flood = Vec::new();
    for _ in 0..300 {
        for addr in [server.http, server.addr] {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                flood.push(s);
            }
        }
    }
    // The server has taken what it could: it is at its limit.
    wait_for(
        Duration::from_secs(10),
        "the server to run out of descriptors",
        || (open_fds() >= 250).then_some(()),
    );
    drop(flood);
    // Every listener serves again, without a restart.
    wait_for(Duration::from_secs(20), "/healthz to answer again", || {
        let r = request("GET", "/healthz")
            .timeout(Duration::from_secs(2))
            .try_send(server.http)
            .ok()?;
        (r.status == 200).then_some(())
    });
    let mut alice = wait_for(Duration::from_secs(20), "a login to succeed", || {
        Client::connect(server.addr, &token).ok()
    });
    alice.ping(Some(7)).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(Some(7))));
}
