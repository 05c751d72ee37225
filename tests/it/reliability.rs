//! Liveness under the conditions an operator meets in the first week
//! (issue 8): each test pins a failure found by probing the server.

use std::collections::HashSet;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use std::io::Write;

use tern::client::{Client, ClientError, Event, Options, Outgoing};
use tern::wire::{ErrorCode, StatusCode};

use crate::util::{next, request, wait_for, TestServer, ADMIN};

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
    // The flood comes from one address: lift the per-address limits, which
    // would otherwise refuse it long before the descriptors run out.
    let server = TestServer::start_with(
        dir.path(),
        &[
            "--max-unauthenticated-per-ip",
            "0",
            "--http-max-connections-per-ip",
            "0",
        ],
    );
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

/// Lines of the server's log (stderr, appended to `server.log`).
fn log_lines(server: &TestServer) -> Vec<String> {
    std::fs::read_to_string(server.dir.join("server.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Logs in from local address `from`.
fn login_from(server: &TestServer, token: &str, from: &str) -> Result<Client, ClientError> {
    let options = Options {
        bind: Some(from.parse().unwrap()),
        ..Options::default()
    };
    Client::connect_with(server.addr, token, options)
}

/// `n` sockets to `addr` that never send a byte.
fn silent_sockets(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect()
}

/// Regression (issue 8, item 5): connections that never sent HELLO counted
/// against `max_connections` like any other, so 2,000 silent sockets from
/// one host locked every legitimate login out for as long as they stayed
/// (and logged one warning per refusal). Now one address may hold at most
/// `max_unauthenticated_per_ip` (64) of them, and refusals are summed up in
/// one line per 10 s.
#[test]
fn silent_sockets_from_one_host_never_lock_out_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with(dir.path(), &["--max-connections", "2000", "--log", "info"]);
    let token = server.user("alice");
    let silent = silent_sockets(server.addr, 2000);
    assert!(
        silent.len() > 1900,
        "only {} sockets connected",
        silent.len()
    );
    let mut alice =
        login_from(&server, &token, "127.0.0.2").expect("login beside 2,000 silent sockets");
    alice.ping(Some(1)).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(Some(1))));
    let lines = log_lines(&server);
    assert!(
        lines.len() < 50,
        "{} log lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    drop(silent);
}

/// Issue 8, item 5, from many hosts (here: one, with the per-address limit
/// lifted): past `max_unauthenticated`, the oldest connection that has not
/// logged in is closed to make room, so a client that sends HELLO at once
/// always gets in, however many silent sockets there are.
#[test]
fn silent_sockets_are_pushed_out_by_a_login() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        dir.path(),
        &[
            "--max-connections",
            "2000",
            "--max-unauthenticated",
            "256",
            "--max-unauthenticated-per-ip",
            "0",
        ],
    );
    let token = server.user("alice");
    let silent = silent_sockets(server.addr, 2000);
    assert!(
        silent.len() > 1900,
        "only {} sockets connected",
        silent.len()
    );
    // Sockets whose handshake the kernel completed late (its accept queue
    // overflowed) may still arrive after the login and push it out: a
    // client retries then, as after any reset. Without the eviction, every
    // try is refused.
    let mut alice = wait_for(Duration::from_secs(20), "a login", || {
        Client::connect(server.addr, &token).ok()
    });
    alice.ping(Some(2)).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(Some(2))));
    drop(silent);
}

/// Regression (issue 8, item 6): failed logins had no limit (8,060 guesses
/// a second from one host) and one log line each. Now, after 5 failures an
/// address is refused unchecked for 1 s, doubling up to 60 s, on both
/// listeners, and failures are summed up in one line per 10 s; other hosts
/// log in as usual.
#[test]
fn a_login_failure_flood_is_slowed_and_leaves_the_log_small() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--log", "info"]);
    let token = server.user("alice");
    let before = log_lines(&server).len();
    let mut refused_unchecked = 0;
    for i in 0..2000 {
        match Client::connect(server.addr, &format!("guess-{i}")) {
            Err(ClientError::Server { code, reason }) => {
                assert_eq!(code, ErrorCode::AUTH_FAILED);
                if reason.contains("too many failed logins") {
                    refused_unchecked += 1;
                }
            }
            Err(e) => panic!("guess {i}: {e}"),
            Ok(_) => panic!("guess {i} logged in"),
        }
    }
    assert!(
        refused_unchecked >= 1990,
        "only {refused_unchecked} of 2,000 guesses were refused unchecked"
    );
    // Even the right token is refused from there, for now...
    match Client::connect(server.addr, &token) {
        Err(ClientError::Server { reason, .. }) => assert!(reason.contains("retry in"), "{reason}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // ...and over HTTP: 429 with Retry-After, whatever the token.
    let r = request("GET", "/v1/users/alice")
        .bearer(Some(ADMIN))
        .send(server.http);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    // Other hosts are served.
    let mut alice = login_from(&server, &token, "127.0.0.2").expect("login from another host");
    alice.ping(None).unwrap();
    assert!(matches!(next(&mut alice, 10), Event::Pong(None)));
    let r = request("GET", "/v1/users/alice")
        .bearer(Some(ADMIN))
        .from("127.0.0.2")
        .send(server.http);
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = log_lines(&server);
    let added = lines.len() - before;
    assert!(
        added < 50,
        "{added} log lines for 2,000 failed logins:\n{}",
        lines[before..].join("\n")
    );
}

/// Regression (issue 8, item 3): unauthenticated requests that announce a
/// body and trickle it each held one of the 512 handler slots while the
/// server drained the body, so 515 of them made every request, /healthz
/// included, answer 503. Now an unauthenticated request is answered without
/// its body being read and its connection closes (a bounded lingering
/// close), so 600 of them, from 20 hosts, leave the admin API answering.
#[test]
fn trickled_unauthenticated_bodies_never_hold_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    server.user("alice");
    let mut trickling: Vec<TcpStream> = (0..600)
        .map(|i| {
            request("POST", "/v1/users")
                .header("Content-Length", "65536")
                .header("Content-Type", "application/json")
                .from(&format!("127.0.1.{}", 1 + i % 20))
                .timeout(Duration::from_secs(10))
                .open(server.http)
                .expect("open a trickling request")
        })
        .collect();
    for round in 0..10 {
        for s in &mut trickling {
            let _ = s.write_all(b" ");
        }
        let r = request("GET", "/v1/users/alice")
            .bearer(Some(ADMIN))
            .timeout(Duration::from_secs(10))
            .send(server.http);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert_eq!(request("GET", "/healthz").send(server.http).status, 200);
    }
    drop(trickling);
}

/// Issue 8, item 3: a request head or a body that trickles in is cut off: a
/// head must arrive within 10 s of its first byte, a body at 8 KiB/s on
/// average after 10 s, so neither can hold a connection thread for long.
#[test]
fn trickled_heads_and_bodies_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let token = server.user("alice");
    let mut head = request("GET", "/healthz")
        .timeout(Duration::from_secs(60))
        .connect_only(server.http)
        .unwrap();
    let mut body = request("POST", "/v1/files")
        .bearer(Some(&token))
        .header("Content-Length", "1000000")
        .timeout(Duration::from_secs(60))
        .open(server.http)
        .unwrap();
    let started = std::time::Instant::now();
    let (mut head_done, mut body_done) = (None, None);
    let slowloris = b"GET /healthz HTTP/1.1\r\nX-Slow: ";
    let mut i = 0;
    while head_done.is_none() || body_done.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still open after 60 s"
        );
        if head_done.is_none() {
            let byte = slowloris.get(i).copied().unwrap_or(b'a');
            if head.write_all(&[byte]).is_err() {
                head_done = Some(started.elapsed());
            }
        }
        if body_done.is_none() && body.write_all(&[b'x'; 100]).is_err() {
            body_done = Some(started.elapsed());
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("head cut off after {head_done:?}, body after {body_done:?}");
}
