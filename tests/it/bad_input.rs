//! Acceptance 7: every framing error class, authentication failures,
//! REPLACED and IDLE_TIMEOUT — while other connections are served normally.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tern::client::{Client, ClientError, Event, Outgoing};
use tern::wire::{self, ErrorCode, Frame, StatusCode};

use crate::util::{next, scrape, wait_for, TestServer};

fn hello(token: &str) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode(
        &Frame::Hello(wire::Hello {
            version: Some(1),
            token: Some(token),
            ..Default::default()
        }),
        &mut out,
    )
    .unwrap();
    out
}

/// Reads frames until an ERROR and then EOF; returns the ERROR's code.
fn expect_error_and_close(stream: &mut TcpStream) -> ErrorCode {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut code = None;
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read: {e} (buffered {buf:02x?})"),
        }
        while let Ok((frame, len)) = wire::decode_frame(&buf, u32::MAX) {
            if let Frame::Error(e) = &frame {
                code = e.code;
            }
            buf.drain(..len);
        }
    }
    code.expect("an ERROR frame before the close")
}

/// A connection logged in as `token` that sends `bytes` next.
fn after_login(server: &TestServer, token: &str, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(&hello(token)).unwrap();
    // Read the WELCOME.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while wire::decode_frame(&buf, u32::MAX).is_err() {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed before WELCOME");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(matches!(
        wire::decode_frame(&buf, u32::MAX),
        Ok((Frame::Welcome(_), _))
    ));
    s.write_all(bytes).unwrap();
    s
}

/// Malformed frames sent right after a login, and the ERROR each must get,
/// with `--max-frame 4096`. `ws.rs` sends the same over a WebSocket.
pub fn framing_cases() -> Vec<(&'static str, Vec<u8>, ErrorCode)> {
    vec![
        // flen runs past the end of the body
        (
            "field past body",
            vec![0x02, 0, 0, 0, 3, 0x02, 0x05, b'a'],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // 5-byte varint
        (
            "5-byte varint",
            vec![0x02, 0, 0, 0, 6, 0x09, 0x80, 0x80, 0x80, 0x80, 0x01],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // over-long (non-minimal) varint
        (
            "non-minimal varint",
            vec![0x02, 0, 0, 0, 3, 0x09, 0x80, 0x00],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // integer field of the wrong width
        (
            "bad int width",
            vec![0x02, 0, 0, 0, 4, 0x01, 0x02, 0, 1],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // a string that is not UTF-8
        (
            "bad utf-8",
            vec![0x02, 0, 0, 0, 3, 0x02, 0x01, 0xff],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // unknown frame kind
        (
            "unknown kind",
            vec![0x42, 0, 0, 0, 0],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // a server-to-client frame from a client
        (
            "server frame",
            vec![0x83, 0, 0, 0, 0],
            ErrorCode::PROTOCOL_ERROR,
        ),
        // body over max_frame: refused from the header alone (no body sent)
        (
            "too large",
            vec![0x02, 0x7f, 0xff, 0xff, 0xff],
            ErrorCode::FRAME_TOO_LARGE,
        ),
        (
            "just too large",
            vec![0x02, 0, 0, 0x10, 0x01],
            ErrorCode::FRAME_TOO_LARGE,
        ),
    ]
}

#[test]
fn framing_errors_close_only_the_offending_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        dir.path(),
        &["--max-frame", "4096", "--max-payload", "1024"],
    );
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut bystander = server.connect(&tb);

    let cases = framing_cases();
    for (name, bytes, want) in &cases {
        let mut s = after_login(&server, &ta, bytes);
        assert_eq!(expect_error_and_close(&mut s), *want, "{name}");
        // Another connection is served normally throughout.
        bystander.ping(Some(1)).unwrap();
        assert_eq!(next(&mut bystander, 10), Event::Pong(Some(1)), "{name}");
    }

    // FRAME_TOO_LARGE without reading the body: the header alone gets the
    // answer, though the announced body never comes.
    let mut s = after_login(&server, &ta, &[0x02, 0x00, 0x10, 0x00, 0x00]);
    let started = Instant::now();
    assert_eq!(expect_error_and_close(&mut s), ErrorCode::FRAME_TOO_LARGE);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Unknown field tags are skipped, not errors.
    let mut c = server.connect(&ta);
    let mut raw = Vec::new();
    wire::encode(
        &Frame::Send(wire::Send {
            id: Some(5),
            to: Some("bob"),
            payload: Some(b"hi"),
            ..Default::default()
        }),
        &mut raw,
    )
    .unwrap();
    raw.extend_from_slice(&[0x7e, 0x01, 0x00]); // unknown tag appended
    let len = (raw.len() - 5) as u32;
    raw[1..5].copy_from_slice(&len.to_be_bytes());
    c.write_raw(&raw).unwrap();
    match next(&mut c, 10) {
        Event::Status(s) => assert_eq!((s.id, s.status), (5, StatusCode::SENT)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn authentication_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let ta = server.user("alice");

    // First frame not HELLO.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(&[0x05, 0, 0, 0, 0]).unwrap(); // PING
    assert_eq!(expect_error_and_close(&mut s), ErrorCode::NOT_AUTHENTICATED);

    // Unknown token.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(&hello("not-a-token")).unwrap();
    assert_eq!(expect_error_and_close(&mut s), ErrorCode::AUTH_FAILED);

    // Version other than 1.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut v2 = Vec::new();
    wire::encode(
        &Frame::Hello(wire::Hello {
            version: Some(2),
            token: Some(&ta),
            ..Default::default()
        }),
        &mut v2,
    )
    .unwrap();
    s.write_all(&v2).unwrap();
    assert_eq!(
        expect_error_and_close(&mut s),
        ErrorCode::UNSUPPORTED_VERSION
    );

    // A second login replaces the first; un-ACKed deliveries move over.
    let tb = server.user("bob");
    let mut first = server.connect(&ta);
    let mut bob = server.connect(&tb);
    assert_eq!(
        bob.send_wait(&Outgoing::to("alice", b"hi").id(1)).unwrap(),
        StatusCode::SENT
    );
    let Event::Msg(m) = next(&mut first, 10) else {
        panic!("no MSG")
    };
    let mut second = server.connect(&ta);
    match first.recv_timeout(Duration::from_secs(10)) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::REPLACED),
        other => panic!("expected REPLACED, got {other:?}"),
    }
    let Event::Msg(again) = next(&mut second, 10) else {
        panic!("no redelivery")
    };
    assert_eq!(again.seq, m.seq);
    assert!(again.is_redelivery());
}

#[test]
fn silence_is_an_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--hello-timeout", "1"]);
    let ta = server.user("alice");
    let mut idle = server.connect_keepalive(&ta, 1);
    assert_eq!(idle.keepalive, 1);
    let started = Instant::now();
    match idle.recv_timeout(Duration::from_secs(10)) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::IDLE_TIMEOUT),
        other => panic!("expected IDLE_TIMEOUT, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // A PINGing client stays connected past the same interval.
    let mut busy = server.connect_keepalive(&ta, 1);
    for i in 0..6 {
        busy.ping(Some(i)).unwrap();
        assert_eq!(next(&mut busy, 5), Event::Pong(Some(i)));
        std::thread::sleep(Duration::from_millis(500));
    }

    // No HELLO at all: closed after hello_timeout.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let started = Instant::now();
    assert_eq!(expect_error_and_close(&mut s), ErrorCode::NOT_AUTHENTICATED);
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// The blocking client reports a server ERROR as such.
#[test]
fn client_sees_auth_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    match Client::connect(server.addr, "wrong") {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::AUTH_FAILED),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("logged in with a wrong token"),
    }
}

/// Regression: a peer that stops reading and goes silent had its ERROR
/// IDLE_TIMEOUT queued behind a full output buffer and was never closed,
/// holding the connection and its buffer. Now a closing connection gets at
/// most two seconds to take its last frames.
#[test]
fn a_peer_that_never_reads_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let _bob = server.connect_keepalive(&tb, 1); // never reads, never sends
    let mut alice = server.connect(&ta);
    let payload = vec![1u8; 16 * 1024];
    let msgs: Vec<Outgoing> = (1..=400)
        .map(|i| Outgoing::to("bob", &payload).id(i).flags(0))
        .collect();
    alice.send_many(&msgs).unwrap();
    for _ in 0..400 {
        let Event::Status(s) = next(&mut alice, 30) else {
            panic!("no SENT")
        };
        assert_eq!(s.status, StatusCode::SENT);
    }
    wait_for(Duration::from_secs(15), "bob's connection to close", || {
        // alice's connection is served meanwhile.
        alice.ping(None).unwrap();
        assert_eq!(next(&mut alice, 5), Event::Pong(None));
        (scrape(server.http).value("tern_connections") == 1.0).then_some(())
    });
}

/// A peer that writes its last frames and closes at once: the data and the
/// end of the stream arrive in one segment (`TCP_CORK` holds the data until
/// the FIN joins it), and epoll reports them once. The server must read on past the frames (not
/// stop at the short read, as it does otherwise) to see the end: the
/// frames are handled, the connection closes at once (not after the
/// keepalive), and every message arrives once.
#[test]
fn frames_followed_by_a_close_are_all_answered_then_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    const CONNS: u64 = 20;
    for i in 0..CONNS {
        let mut bytes = hello(&ta);
        let payload = i.to_be_bytes();
        for frame in [
            Frame::Send(wire::Send {
                id: Some(i + 1),
                to: Some("bob"),
                expiry: Some(3600),
                payload: Some(&payload),
                ..Default::default()
            }),
            Frame::Ping(wire::Ping { time: Some(i) }),
        ] {
            wire::encode(&frame, &mut bytes).unwrap();
        }
        let mut s = TcpStream::connect(server.addr).unwrap();
        socket2::SockRef::from(&s).set_tcp_cork(true).unwrap();
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // The keepalive is 30 s or more: 10 s is the server seeing the end.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("connection {i}: {e}, not closed (got {buf:02x?})"),
            }
        }
        let mut kinds = Vec::new();
        while let Ok((frame, len)) = wire::decode_frame(&buf, u32::MAX) {
            match &frame {
                Frame::Welcome(_) => kinds.push("WELCOME".to_owned()),
                Frame::Status(st) => {
                    assert_eq!((st.id, st.status), (Some(i + 1), Some(StatusCode::SENT)));
                    kinds.push("SENT".to_owned());
                }
                Frame::Pong(p) => {
                    assert_eq!(p.time, Some(i));
                    kinds.push("PONG".to_owned());
                }
                other => kinds.push(format!("{other:?}")),
            }
            buf.drain(..len);
        }
        // The SENT may come after the close has begun, and is then not
        // written (the message is stored all the same: bob gets it below).
        kinds.retain(|k| k != "SENT");
        assert_eq!(kinds, ["WELCOME", "PONG"], "connection {i}");
    }
    let mut bob = server.connect(&tb);
    let mut got = Vec::new();
    for _ in 0..CONNS {
        let m = crate::util::msg(next(&mut bob, 10));
        bob.ack(&[m.seq]).unwrap();
        got.push(m.id);
    }
    got.sort_unstable();
    assert_eq!(got, (1..=CONNS).collect::<Vec<_>>());
    bob.ping(Some(7)).unwrap();
    assert_eq!(next(&mut bob, 5), Event::Pong(Some(7)));
}
