//! HTTP connection handling (the vendored tiny_http, see vendor/README.md):
//! a connection whose request body was read to its end stays open for the
//! next request, and every answer after which the server closes says
//! `Connection: close`.
//!
//! Regression: the server closed every connection after a request with a
//! body, without `Connection: close`, so a pooling client sent its next
//! request on a closed connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::{TestServer, ADMIN};

/// A response: status, headers (names lowercased) and body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the answer says the server closes the connection after it.
    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A client connection: writes on the stream, reads through a buffer.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        // Bounds on a broken server, not expected waits.
        stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(30))).ok();
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Conn { stream, reader }
    }

    /// Reads one response, framed by its `Content-Length`.
    fn read_resp(&mut self) -> io::Result<Resp> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let len: u64 = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no Content-Length in {headers:?}")))?;
        let mut body = Vec::new();
        self.reader.by_ref().take(len).read_to_end(&mut body)?;
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    /// Sends `request` and reads the answer.
    fn exchange(&mut self, request: &[u8]) -> Resp {
        self.stream.write_all(request).expect("write request");
        self.read_resp().expect("read answer")
    }

    /// Asserts the server closed the connection cleanly (EOF, not a reset).
    #[track_caller]
    fn assert_closed(&mut self) {
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Ok(0) => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
}

/// A `POST /v1/users` request head announcing `len` body bytes.
fn post_users_head(bearer: Option<&str>, len: usize, extra: &str) -> String {
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /v1/users HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {len}\r\n{extra}\r\n"
    )
}

/// (a) A pooling client (one `ureq::Agent`) makes 100 POSTs in a row. Every
/// other body is over 1 KiB: tiny_http buffers small bodies whole and
/// streams larger ones, and both must leave the connection usable.
#[test]
fn pooled_client_posts_in_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let url = format!("http://{}/v1/users", server.http);
    for i in 0..100 {
        let pad = if i % 2 == 1 {
            "x".repeat(2000)
        } else {
            String::new()
        };
        let answer = agent
            .post(&url)
            .set("Authorization", &format!("Bearer {ADMIN}"))
            .send_json(serde_json::json!({ "address": format!("pooled{i}"), "pad": pad }));
        match answer {
            Ok(r) => {
                assert_eq!(r.status(), 201, "POST {i}");
                let body = r.into_string().expect("body");
                assert!(body.contains("token"), "POST {i}: {body}");
            }
            Err(e) => panic!("POST {i} of 100 on a pooled connection: {e}"),
        }
    }
}

/// A connection whose request bodies are read to their end (buffered,
/// streamed, chunked) carries the next request, and nothing says close.
#[test]
fn bodies_read_to_the_end_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let mut c = Conn::open(server.http);
    let small = r#"{"address":"kept1"}"#;
    let large = format!(r#"{{"address":"kept2","pad":"{}"}}"#, "x".repeat(50_000));
    let chunked = r#"{"address":"kept3"}"#;
    let requests = [
        format!("{}{small}", post_users_head(Some(ADMIN), small.len(), "")),
        format!("{}{large}", post_users_head(Some(ADMIN), large.len(), "")),
        format!(
            "POST /v1/users HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunked}\r\n0\r\n\r\n",
            chunked.len()
        ),
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
    ];
    for (i, request) in requests.iter().enumerate() {
        let r = c.exchange(request.as_bytes());
        let want = if i == 3 { 200 } else { 201 };
        assert_eq!(r.status, want, "request {i}: {:?}", r.body);
        assert!(!r.closes(), "request {i}: {:?}", r.headers);
    }
}

/// (c) Every answer after which the server closes says `Connection: close`,
/// and the server then closes (a clean EOF).
#[test]
fn closing_answers_say_connection_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir);
    let unread = "x".repeat(100_000);
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "the client asks to close",
            "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_owned(),
            200,
        ),
        (
            "HTTP/1.0 without keep-alive",
            "GET /healthz HTTP/1.0\r\n\r\n".to_owned(),
            200,
        ),
        (
            "a body the server does not read (no token)",
            format!("{}{unread}", post_users_head(None, unread.len(), "")),
            401,
        ),
        (
            "a body the client waits to send (Expect: 100-continue)",
            post_users_head(None, 5000, "Expect: 100-continue\r\n"),
            401,
        ),
        (
            "a malformed request line",
            "NONSENSE\r\n\r\n".to_owned(),
            400,
        ),
        (
            "HTTP/2.0 (the released tiny_http never answered it)",
            "GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n".to_owned(),
            505,
        ),
    ];
    for (what, request, status) in cases {
        let mut c = Conn::open(server.http);
        let r = c.exchange(request.as_bytes());
        assert_eq!(r.status, status, "{what}");
        assert!(
            r.closes(),
            "{what}: no Connection: close in {:?}",
            r.headers
        );
        c.assert_closed();
    }
}
