//! The WebSocket transport (`GET /v1/ws` on the protocol port, subprotocol
//! `tern.v1`): the same frames, session and limits as over TCP, driven here
//! by tungstenite's blocking client over real sockets.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tern::client::{Event, Outgoing};
use tern::wire::{self, ErrorCode, Frame, StatusCode};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use crate::util::{msg, next, send_pipelined, status, TestServer};

/// What a test looks at in a frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    Welcome(String),
    Error(ErrorCode),
    Status(u64, StatusCode),
    Msg {
        seq: u64,
        from: String,
        payload: Vec<u8>,
    },
    Pong,
    /// The server closed the WebSocket (or the socket).
    Closed,
}

/// A byte stream under a WebSocket: a socket, or TLS over one.
pub trait Stream: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> Stream for T {}

/// A WebSocket client speaking protocol v1.
pub struct WsClient {
    ws: WebSocket<Box<dyn Stream>>,
    pending: std::collections::VecDeque<Got>,
}

/// The upgrade request for `addr`, with the subprotocol and `origin`.
fn upgrade_request(
    addr: SocketAddr,
    path: &str,
    origin: Option<&str>,
) -> tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "tern.v1".parse().unwrap());
    if let Some(origin) = origin {
        req.headers_mut().insert("Origin", origin.parse().unwrap());
    }
    req
}

impl WsClient {
    /// Upgrades; panics unless the server answers 101 with `tern.v1`.
    fn open(addr: SocketAddr) -> WsClient {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        WsClient::open_over(addr, Box::new(stream))
    }

    /// Upgrades over `stream` (connected to `addr`).
    pub fn open_over(addr: SocketAddr, stream: Box<dyn Stream>) -> WsClient {
        let (ws, answer) = tungstenite::client(upgrade_request(addr, "/v1/ws", None), stream)
            .unwrap_or_else(|e| panic!("upgrade: {e}"));
        assert_eq!(
            answer.headers()["Sec-WebSocket-Protocol"],
            "tern.v1",
            "subprotocol"
        );
        WsClient {
            ws,
            pending: Default::default(),
        }
    }

    /// Upgrades and logs in.
    fn login(addr: SocketAddr, token: &str) -> WsClient {
        WsClient::open(addr).hello(token)
    }

    /// Logs in on an upgraded connection.
    pub fn hello(mut self, token: &str) -> WsClient {
        let c = &mut self;
        c.send(&[Frame::Hello(wire::Hello {
            version: Some(wire::VERSION),
            token: Some(token),
            client: Some("ws-test"),
            keepalive: None,
        })]);
        match c.next() {
            Got::Welcome(_) => self,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Sends `frames` in one binary message.
    pub fn send(&mut self, frames: &[Frame<'_>]) {
        let mut bytes = Vec::new();
        for f in frames {
            wire::encode(f, &mut bytes).unwrap();
        }
        self.raw(Message::binary(bytes));
    }

    fn raw(&mut self, message: Message) {
        self.ws.send(message).unwrap();
    }

    /// The next frame from the server (or `Closed`).
    pub fn next(&mut self) -> Got {
        while self.pending.is_empty() {
            let data = match self.ws.read() {
                Ok(Message::Binary(data)) => data,
                Ok(Message::Close(_)) | Err(_) => return Got::Closed,
                Ok(_) => continue,
            };
            let mut rest = &data[..];
            while !rest.is_empty() {
                let (frame, used) =
                    wire::decode_frame(rest, u32::MAX).expect("whole frames in a message");
                self.pending.push_back(match frame {
                    Frame::Welcome(w) => Got::Welcome(w.address.unwrap_or("").into()),
                    Frame::Error(e) => Got::Error(e.code.unwrap()),
                    Frame::Status(s) => Got::Status(s.id.unwrap(), s.status.unwrap()),
                    Frame::Msg(m) => Got::Msg {
                        seq: m.seq.unwrap(),
                        from: m.from.unwrap_or("").into(),
                        payload: m.payload.unwrap_or(&[]).to_vec(),
                    },
                    Frame::Pong(_) => Got::Pong,
                    other => panic!("unexpected {:?} from the server", other.kind()),
                });
                rest = &rest[used..];
            }
        }
        self.pending.pop_front().unwrap()
    }
}

/// A TCP client and a WebSocket client talk to each other, both ways, with
/// statuses and ACKs, and a ping over the WebSocket is answered.
#[test]
fn tcp_and_websocket_clients_talk_to_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut alice = WsClient::login(server.addr, &ta);
    let mut bob = server.connect(&tb);

    alice.send(&[Frame::Send(wire::Send {
        id: Some(1),
        to: Some("bob"),
        flags: Some(0),
        payload: Some(b"from the browser"),
        ..Default::default()
    })]);
    assert_eq!(alice.next(), Got::Status(1, StatusCode::SENT));
    let m = msg(next(&mut bob, 10));
    assert_eq!(
        (m.from.as_str(), &m.payload[..]),
        ("alice", &b"from the browser"[..])
    );
    bob.ack(&[m.seq]).unwrap();

    let sent = bob
        .send_wait(&Outgoing::to("alice", b"from tcp").id(2).flags(0))
        .unwrap();
    assert_eq!(sent, StatusCode::SENT);
    let Got::Msg { seq, from, payload } = alice.next() else {
        panic!("expected MSG");
    };
    assert_eq!((from.as_str(), &payload[..]), ("bob", &b"from tcp"[..]));
    alice.send(&[
        Frame::Ack(wire::Ack {
            seqs: wire::Seqs::List(&[seq]),
        }),
        Frame::Ping(wire::Ping { time: None }),
    ]);
    assert_eq!(alice.next(), Got::Pong);
    // A WebSocket ping is answered too (by a pong).
    alice.raw(Message::Ping(b"are you there".to_vec().into()));
    alice.send(&[Frame::Ping(wire::Ping { time: None })]);
    assert_eq!(alice.next(), Got::Pong);
    let _ = status; // (imported for symmetry with other tests)
    let _ = Event::Pong(None);
}

/// The framing errors of `bad_input.rs`, over a WebSocket: the same ERROR
/// as over TCP, then a close; other connections go on.
#[test]
fn framing_errors_over_websocket_get_the_same_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        dir.path(),
        &["--max-frame", "4096", "--max-payload", "1024"],
    );
    let tb = server.user("bob");
    let mut bob = server.connect(&tb);
    let cases: Vec<(&str, Message, ErrorCode)> = vec![
        // Unknown frame kind.
        (
            "unknown kind",
            Message::binary(vec![0x7f, 0, 0, 0, 0]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        // A field running past the end of the body.
        (
            "field past the end",
            Message::binary(vec![0x01, 0, 0, 0, 3, 0x0e, 5, 1]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        // A frame announcing more than max_frame.
        (
            "over max_frame",
            Message::binary(vec![0x01, 0, 0, 0x20, 0]),
            ErrorCode::FRAME_TOO_LARGE,
        ),
        // A message far over max_frame.
        (
            "huge message",
            Message::binary(vec![0u8; 200_000]),
            ErrorCode::FRAME_TOO_LARGE,
        ),
        // A message that ends inside a frame.
        (
            "partial frame",
            Message::binary(vec![0x01, 0, 0, 0, 10, 0x0e]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        // Text is not the binding.
        (
            "text message",
            Message::text("HELLO"),
            ErrorCode::PROTOCOL_ERROR,
        ),
    ];
    for (what, message, code) in cases {
        let mut c = WsClient::open(server.addr);
        c.raw(message);
        assert_eq!(c.next(), Got::Error(code), "{what}");
        assert_eq!(c.next(), Got::Closed, "{what}: closed after the ERROR");
        // Others are unaffected.
        bob.ping(Some(9)).unwrap();
        assert!(matches!(next(&mut bob, 10), Event::Pong(Some(9))), "{what}");
    }
}

/// The framing errors of `bad_input.rs`, byte for byte, in a binary message
/// after a login over a WebSocket: the same ERROR as over TCP, then a close.
#[test]
fn bad_input_framing_cases_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        dir.path(),
        &["--max-frame", "4096", "--max-payload", "1024"],
    );
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut bob = server.connect(&tb);
    for (name, bytes, want) in crate::bad_input::framing_cases() {
        let mut c = WsClient::login(server.addr, &ta);
        c.raw(Message::binary(bytes));
        assert_eq!(c.next(), Got::Error(want), "{name}");
        assert_eq!(c.next(), Got::Closed, "{name}: closed after the ERROR");
        bob.ping(Some(3)).unwrap();
        assert!(matches!(next(&mut bob, 10), Event::Pong(Some(3))), "{name}");
    }
}

/// The upgrade itself: only `/v1/ws`, only with the `tern.v1` subprotocol,
/// and only from an allowed `Origin`.
#[test]
fn the_upgrade_checks_path_subprotocol_and_origin() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(
        dir.path(),
        &[
            "--ws-allowed-origins",
            "https://chat.example, https://other.example",
        ],
    );
    let status_of = |req: tungstenite::handshake::client::Request| {
        let stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match tungstenite::client(req, stream) {
            Ok(_) => 101,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                r.status().as_u16()
            }
            Err(e) => panic!("{e}"),
        }
    };
    let good = Some("https://chat.example");
    assert_eq!(status_of(upgrade_request(server.addr, "/v1/ws", good)), 101);
    assert_eq!(
        status_of(upgrade_request(server.addr, "/v1/other", good)),
        404
    );
    assert_eq!(
        status_of(upgrade_request(
            server.addr,
            "/v1/ws",
            Some("https://evil.example")
        )),
        403
    );
    assert_eq!(status_of(upgrade_request(server.addr, "/v1/ws", None)), 403);
    let mut no_protocol = upgrade_request(server.addr, "/v1/ws", good);
    no_protocol.headers_mut().remove("Sec-WebSocket-Protocol");
    assert_eq!(status_of(no_protocol), 400);
}

/// The JavaScript client and the web chat are served by tern itself.
#[test]
fn the_js_client_and_the_web_chat_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let get = |path| crate::util::request("GET", path).send(server.http);
    let js = get("/client/tern.js");
    assert_eq!(js.status, 200);
    assert!(js
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert!(
        js.text().contains("export class TernClient"),
        "the client module"
    );
    let page = get("/app/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.header("content-security-policy").is_some());
    for asset in ["/app/app.js", "/app/app.css", "/client/tern.d.ts"] {
        assert_eq!(get(asset).status, 200, "{asset}");
    }
    let moved = get("/app");
    assert_eq!(moved.status, 301);
    assert_eq!(moved.header("location"), Some("/app/"));
    assert_eq!(get("/app/nothing.js").status, 404);
}

/// A WebSocket client that stops reading while 25,000 messages of 16 KiB
/// (391 MiB) are sent to it: the server holds at most `conn_buffer` of
/// output for it, as for a TCP client (the rest waits in the store), and
/// every message arrives once, once it reads again.
#[test]
fn a_websocket_that_stops_reading_holds_bounded_output() {
    const N: u64 = 25_000;
    const LEN: usize = 16 * 1024;
    // Over the server's memory with bob connected: RocksDB's write buffers
    // (96 MiB) and block cache (64 MiB), bob's mailbox (1,024 items) and
    // staging (512), all at most; far less than the 391 MiB sent.
    const GROWTH_BOUND_KIB: u64 = 250 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let (ta, tb) = (server.user("alice"), server.user("bob"));
    let mut bob = WsClient::login(server.addr, &tb);
    let mut alice = server.connect(&ta);
    let baseline = server.rss_kib();

    let mut payload = vec![0x5au8; LEN];
    let mut peak = 0;
    let accepted = send_pipelined(
        &mut alice,
        N,
        (16, 64),
        |i| {
            payload[..8].copy_from_slice(&i.to_be_bytes());
            Outgoing::to("bob", &payload).id(i + 1).flags(0)
        },
        |sent| {
            if sent.is_multiple_of(1024) {
                peak = peak.max(server.rss_kib());
            }
        },
    );
    assert_eq!(accepted, N);
    peak = peak.max(server.rss_kib());
    eprintln!("websocket slow reader: RSS baseline {baseline} KiB, peak {peak} KiB");
    assert!(
        peak.saturating_sub(baseline) < GROWTH_BOUND_KIB,
        "RSS grew by {} KiB, over {GROWTH_BOUND_KIB} KiB: output held for a reader that stopped",
        peak - baseline
    );

    let mut seen = std::collections::HashSet::new();
    let mut seqs = Vec::new();
    while (seen.len() as u64) < N {
        let Got::Msg { seq, payload, .. } = bob.next() else {
            panic!("expected MSG after {} of {N}", seen.len());
        };
        let i = u64::from_be_bytes(payload[..8].try_into().unwrap());
        assert!(seen.insert(i), "message {i} delivered twice");
        assert_eq!(payload.len(), LEN);
        seqs.push(seq);
        if seqs.len() == 256 {
            bob.send(&[Frame::Ack(wire::Ack {
                seqs: wire::Seqs::List(&seqs),
            })]);
            seqs.clear();
        }
    }
}

/// A peer that keeps its socket full does not hold its event loop: after a
/// few reads the loop turns to its other connections, timers and notices,
/// and reads on at its next turn. Here an upgraded WebSocket that never
/// sends HELLO streams empty pongs (work for the server, nothing to
/// answer) into a server with one event loop: bob, on the same loop, gets
/// his PONGs at once, and the flooder is closed at its HELLO deadline.
/// Before, the loop read the flood for as long as it came, and neither
/// happened.
#[test]
fn a_flooding_socket_does_not_hold_its_event_loop() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), &["--workers", "1", "--hello-timeout", "2"]);
    let mut bob = server.connect(&server.user("bob"));
    let stream = TcpStream::connect(server.addr).unwrap();
    let mut flood = stream.try_clone().unwrap();
    let (_ws, _) = tungstenite::client(upgrade_request(server.addr, "/v1/ws", None), stream)
        .unwrap_or_else(|e| panic!("upgrade: {e}"));
    // Masked (as a client's must be), empty, one after another.
    let chunk: Vec<u8> = [0x8a, 0x80, 0, 0, 0, 0].repeat(100_000);
    let (started, flooding) = std::sync::mpsc::channel();
    let flooder = std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < until {
            if flood.write_all(&chunk).is_err() {
                return true; // closed by the server
            }
            let _ = started.send(());
        }
        false
    });
    flooding.recv().unwrap();
    for i in 0..3 {
        bob.ping(Some(i)).unwrap();
        assert!(matches!(next(&mut bob, 5), Event::Pong(Some(p)) if p == i));
    }
    assert!(
        flooder.join().unwrap(),
        "the flooder was not closed at its HELLO deadline"
    );
    bob.ping(Some(9)).unwrap();
    assert!(matches!(next(&mut bob, 5), Event::Pong(Some(9))));
}
