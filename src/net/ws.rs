//! The WebSocket transport (protocol.md §1, "Transports"): an HTTP/1.1
//! `GET /v1/ws` upgrade on the protocol port, subprotocol `tern.v1`, each
//! binary message carrying whole protocol frames.
//!
//! tungstenite runs without I/O of its own, over a [`Pipe`]: the event loop
//! puts the socket's bytes in and takes the bytes to write out, exactly as
//! it does for a TCP connection. So a WebSocket connection lives in the same
//! mio loop, with the same buffers, bounds and backpressure; its frames go
//! through the same deframer and session.
//!
//! The upgrade request is parsed here with `httparse` (bounded to
//! [`MAX_HEAD`]); a bad one gets an HTTP error status and the connection
//! closes. tungstenite then frames messages, answers pings and closes.

use std::io::{self, Read, Write};

use tungstenite::handshake::derive_accept_key;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::wire::ErrorCode;

/// The only path served.
pub const PATH: &str = "/v1/ws";
/// The subprotocol a client must offer.
pub const SUBPROTOCOL: &str = "tern.v1";
/// Largest upgrade request head, bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers an upgrade request may carry.
const MAX_HEADERS: usize = 64;

/// In-memory stream under tungstenite: `input` holds socket bytes not yet
/// parsed (a read past them is `WouldBlock`), `output` the bytes to write.
#[derive(Default)]
pub struct Pipe {
    input: Vec<u8>,
    in_pos: usize,
    /// Encoded WebSocket frames (or the handshake answer) for the socket.
    pub output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.input[self.in_pos..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.in_pos += n;
        if self.in_pos == self.input.len() {
            self.input.clear();
            self.in_pos = 0;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the socket's bytes amounted to.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A binary message: protocol frames.
    Frames(Vec<u8>),
    /// The peer closed (a Close frame), or the connection cannot go on.
    Closed,
    /// A message that breaks the binding (text, too large, bad framing):
    /// answered with ERROR `code` and `reason`, then a close.
    Violation(ErrorCode, String),
}

/// A connection that began with `GET`: the upgrade, then the WebSocket.
pub enum Ws {
    /// Reading the upgrade request.
    Upgrading(Pipe),
    /// Upgraded.
    Open(Box<WebSocket<Pipe>>),
    /// The upgrade was refused (the answer is in the pipe) or the socket
    /// closed: only output is left.
    Done(Pipe),
}

/// Why an upgrade request is refused: an HTTP status and a reason.
struct Refusal(u16, &'static str);

impl Ws {
    /// A connection whose first byte was `G`.
    pub fn new() -> Ws {
        Ws::Upgrading(Pipe::default())
    }

    /// Whether the connection is upgraded.
    pub fn is_open(&self) -> bool {
        matches!(self, Ws::Open(_))
    }

    fn pipe(&mut self) -> &mut Pipe {
        match self {
            Ws::Upgrading(p) | Ws::Done(p) => p,
            Ws::Open(ws) => ws.get_mut(),
        }
    }

    /// Bytes to write to the socket.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.pipe().output
    }

    /// How many bytes [`Ws::output`] holds.
    pub fn output_len(&self) -> usize {
        match self {
            Ws::Upgrading(p) | Ws::Done(p) => p.output.len(),
            Ws::Open(ws) => ws.get_ref().output.len(),
        }
    }

    /// Takes `bytes` read from the socket; appends what they complete to
    /// `incoming`. `max_frame` bounds a message (one frame and its header, or
    /// several whole frames).
    pub fn receive(
        &mut self,
        bytes: &[u8],
        allowed_origins: &[String],
        max_frame: u32,
        incoming: &mut Vec<Incoming>,
    ) {
        self.pipe().input.extend_from_slice(bytes);
        if let Ws::Upgrading(pipe) = self {
            match upgrade(pipe, allowed_origins) {
                Ok(None) => return, // the head is not complete yet
                Ok(Some(answer)) => {
                    let mut pipe = std::mem::take(pipe);
                    pipe.output.extend_from_slice(answer.as_bytes());
                    let message = max_frame as usize + 5 + 64;
                    let config = WebSocketConfig::default()
                        .max_message_size(Some(message))
                        .max_frame_size(Some(message));
                    let ws = WebSocket::from_raw_socket(pipe, Role::Server, Some(config));
                    *self = Ws::Open(Box::new(ws));
                }
                Err(Refusal(status, reason)) => {
                    let mut pipe = std::mem::take(pipe);
                    pipe.input.clear();
                    pipe.output.extend_from_slice(
                        format!(
                            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{reason}",
                            reason.len()
                        )
                        .as_bytes(),
                    );
                    *self = Ws::Done(pipe);
                    incoming.push(Incoming::Closed);
                    return;
                }
            }
        }
        let Ws::Open(ws) = self else {
            return;
        };
        loop {
            match ws.read() {
                Ok(Message::Binary(data)) => incoming.push(Incoming::Frames(data.to_vec())),
                Ok(Message::Text(_)) => {
                    incoming.push(Incoming::Violation(
                        ErrorCode::PROTOCOL_ERROR,
                        "a text message: frames travel in binary messages".into(),
                    ));
                    return;
                }
                Ok(Message::Close(_)) => {
                    incoming.push(Incoming::Closed);
                    return;
                }
                // Pings are answered by tungstenite (into the pipe).
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(tungstenite::Error::Capacity(e)) => {
                    incoming.push(Incoming::Violation(
                        ErrorCode::FRAME_TOO_LARGE,
                        format!("message too large: {e}"),
                    ));
                    return;
                }
                Err(e) => {
                    incoming.push(Incoming::Violation(
                        ErrorCode::PROTOCOL_ERROR,
                        format!("websocket: {e}"),
                    ));
                    return;
                }
            }
        }
    }

    /// Queues `frames` (whole protocol frames) as one binary message.
    pub fn send(&mut self, frames: &[u8]) {
        if let Ws::Open(ws) = self {
            // Into the pipe, which never blocks; an error means the
            // WebSocket is closing, and the frames are not needed any more.
            let _ = ws.send(Message::binary(frames.to_vec()));
        }
    }

    /// Queues a Close frame: 1000 after BYE, 1008 after an ERROR.
    pub fn close(&mut self, error: bool) {
        if let Ws::Open(ws) = self {
            let frame = CloseFrame {
                code: if error {
                    CloseCode::Policy
                } else {
                    CloseCode::Normal
                },
                reason: "".into(),
            };
            let _ = ws.close(Some(frame));
            let _ = ws.flush();
        }
    }
}

impl Default for Ws {
    fn default() -> Self {
        Ws::new()
    }
}

/// Parses the upgrade request in `pipe`'s input: `Ok(None)` while the head
/// is incomplete, `Ok(Some(answer))` with the 101 answer, or the refusal.
fn upgrade(pipe: &mut Pipe, allowed_origins: &[String]) -> Result<Option<String>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(&pipe.input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if pipe.input.len() <= MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(Refusal(431, "Request Header Fields Too Large"))
        }
        Err(_) => return Err(Refusal(400, "Bad Request")),
    };
    if head_len > MAX_HEAD {
        return Err(Refusal(431, "Request Header Fields Too Large"));
    }
    if req.method != Some("GET") {
        return Err(Refusal(405, "Method Not Allowed"));
    }
    if req.path.map(|p| p.split('?').next().unwrap_or(p)) != Some(PATH) {
        return Err(Refusal(404, "Not Found"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") || !has_token("Connection", "upgrade") {
        return Err(Refusal(426, "Upgrade Required"));
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return Err(Refusal(426, "Upgrade Required"));
    }
    let Some(key) = header("Sec-WebSocket-Key").filter(|k| !k.is_empty()) else {
        return Err(Refusal(400, "Bad Request"));
    };
    let any_origin = allowed_origins.iter().any(|o| o == "*");
    if !any_origin {
        let origin = header("Origin");
        if !origin.is_some_and(|o| allowed_origins.iter().any(|a| a == o)) {
            return Err(Refusal(403, "Forbidden"));
        }
    }
    if !has_token("Sec-WebSocket-Protocol", SUBPROTOCOL) {
        return Err(Refusal(400, "Bad Request"));
    }
    let accept = derive_accept_key(key.as_bytes());
    // Bytes after the head are the first WebSocket frames.
    pipe.in_pos += head_len;
    Ok(Some(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
    )))
}
