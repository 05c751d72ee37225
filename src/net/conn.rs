//! One client connection: its socket, its bounded buffers and its session.

use std::io::{self, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use super::ws::Ws;
use crate::admission::Ticket;
use crate::session::Session;
use crate::wire::Deframer;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading and writing frames.
    Open,
    /// Flushing output before the write side is shut.
    Closing,
    /// Write side shut; input is read and discarded until EOF or the deadline,
    /// so that the peer sees our last frame rather than a reset.
    Draining { until: u64 },
}

/// A connection owned by one event loop.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// Unique id (see `ConnRef`).
    pub generation: u64,
    /// Splits the input into frames; holds at most one incomplete frame.
    pub deframer: Deframer,
    /// Encoded frames not yet written; `out[out_pos..]` is pending.
    pub out: Vec<u8>,
    /// How much of `out` the socket has taken.
    pub out_pos: usize,
    /// The protocol state machine.
    pub session: Session,
    /// Reading stopped for backpressure (not because of `WouldBlock`): the
    /// loop must read again by itself once the session wants input.
    pub read_paused: bool,
    /// Reading stopped at `worker::READ_BUDGET` with input perhaps left: the
    /// connection is in the loop's `ready` queue, which reads on next turn.
    pub read_yielded: bool,
    /// Whether WRITABLE interest is registered (only while output is pending).
    pub write_interest: bool,
    /// Open, closing or draining.
    pub phase: Phase,
    /// When the connection started closing (ms; 0 while open): a peer that
    /// never reads cannot hold it, or its output buffer, for more than
    /// `DRAIN_MS` beyond that.
    pub closing_since: u64,
    /// The deadline the loop's timer heap holds for this connection, ms
    /// (`u64::MAX`: none).
    pub scheduled: u64,
    /// `conn` span for logs.
    pub span: tracing::Span,
    /// Its place in the per-address limits (freed when the connection is dropped).
    pub ticket: Ticket,
    /// Whether the first byte has been seen: `G` makes it a WebSocket.
    pub sniffed: bool,
    /// The WebSocket transport, for a connection that began with `GET`.
    pub ws: Option<Box<Ws>>,
    /// How much of the WebSocket's output the socket has taken.
    pub ws_pos: usize,
    /// Whether the WebSocket Close frame is queued.
    pub ws_closed: bool,
    /// TLS, when the listener is configured for it: the bytes above are
    /// plaintext, and this turns them into records for the socket.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// Whether TLS close_notify is queued.
    pub tls_closed: bool,
    /// Whether the loop is to settle it at the end of this turn.
    pub due: bool,
}

impl Conn {
    /// Open, and not logged in yet.
    pub fn waiting_to_log_in(&self) -> bool {
        self.phase == Phase::Open && !self.session.is_authenticated()
    }

    /// Unsent output, bytes.
    pub fn pending_out(&self) -> usize {
        let ws = match &self.ws {
            Some(ws) => ws.output_len() - self.ws_pos,
            None => 0,
        };
        let tls = self.tls.as_ref().is_some_and(|t| t.wants_write());
        self.out.len() - self.out_pos + ws + usize::from(tls)
    }

    /// Writes pending output until done or `WouldBlock`. Returns bytes written.
    /// Over a WebSocket, the frames written since the last flush go out as
    /// one binary message (and, once closing, a Close frame after them),
    /// once the socket has taken the message before: until then they stay
    /// in `out`, which the session's pump stops filling at `conn_buffer`,
    /// so a peer that stops reading holds at most that much, as over TCP.
    pub fn flush(&mut self) -> io::Result<usize> {
        if self.ws.is_none() && self.tls.is_none() {
            return self.flush_plain();
        }
        // Until the socket blocks or all is out: a layer may take only part
        // of what waits (rustls up to its limit, a WebSocket one message at
        // a time), and a socket that never blocked sends no new event.
        let mut written = 0;
        loop {
            let (n, blocked) = self.flush_layers()?;
            written += n;
            if blocked || n == 0 || self.pending_out() == 0 {
                return Ok(written);
            }
        }
    }

    /// One pass of [`Conn::flush`] through the WebSocket and TLS layers:
    /// bytes written, and whether the socket would block.
    fn flush_layers(&mut self) -> io::Result<(usize, bool)> {
        if let Some(ws) = &mut self.ws {
            if !ws.is_open() {
                // Nothing of the protocol goes out before the upgrade.
                self.out.clear();
                self.out_pos = 0;
            } else if self.ws_pos == ws.output_len() {
                if self.out_pos < self.out.len() {
                    ws.send(&self.out[self.out_pos..]);
                }
                self.out.clear();
                self.out_pos = 0;
            }
            if self.phase != Phase::Open && !self.ws_closed && self.out.is_empty() {
                ws.close(false);
                self.ws_closed = true;
            }
            if self.tls.is_none() {
                let n = write_all_or_block(&mut self.stream, ws.output(), &mut self.ws_pos)?;
                return Ok((n, self.ws_pos < ws.output_len()));
            }
        }
        // Over a WebSocket, the TLS close follows its Close frame, and with
        // it every frame before (queued only once `out` is in a message).
        let ws_done = self.ws.is_none() || self.ws_closed;
        let Some(tls) = &mut self.tls else {
            return Ok((0, false));
        };
        let (buf, pos) = match &mut self.ws {
            Some(ws) => (ws.output(), &mut self.ws_pos),
            None => (&mut self.out, &mut self.out_pos),
        };
        // Plaintext into rustls, as far as its buffer limit allows...
        while *pos < buf.len() {
            match tls.writer().write(&buf[*pos..]) {
                Ok(0) => break,
                Ok(n) => *pos += n,
                Err(e) => return Err(e),
            }
        }
        if *pos == buf.len() {
            buf.clear();
            *pos = 0;
        }
        if self.phase != Phase::Open && *pos == 0 && ws_done && !self.tls_closed {
            tls.send_close_notify();
            self.tls_closed = true;
        }
        // ...and its records to the socket.
        let mut written = 0;
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((written, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok((written, false))
    }

    /// [`Conn::flush`] of a plain socket.
    fn flush_plain(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 64 * 1024 {
                // An idle connection keeps no large buffer.
                self.out = Vec::new();
            }
        } else if self.out_pos > 64 * 1024 && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(written)
    }

    /// Starts closing at `now`: flush what is written, then shut down.
    /// (Over a WebSocket, the next flush adds the Close frame.)
    pub fn start_closing(&mut self, now: u64) {
        if self.phase == Phase::Open {
            self.phase = Phase::Closing;
            self.closing_since = now;
        }
    }

    /// When the loop must look at this connection next, ms.
    pub fn deadline(&self, drain_ms: u64) -> u64 {
        match self.phase {
            Phase::Open => self.session.poll_timeout(),
            Phase::Closing => self.closing_since + drain_ms,
            Phase::Draining { until } => until,
        }
    }

    /// Shuts the write side after the last frame.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// Writes `buf[*pos..]` until done or `WouldBlock`; a buffer written to its
/// end is emptied (and released, if it had grown past 64 KiB). Returns bytes
/// written.
fn write_all_or_block(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    pos: &mut usize,
) -> io::Result<usize> {
    let mut written = 0;
    while *pos < buf.len() {
        match stream.write(&buf[*pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                *pos += n;
                written += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if *pos == buf.len() {
        buf.clear();
        *pos = 0;
        if buf.capacity() > 64 * 1024 {
            *buf = Vec::new();
        }
    }
    Ok(written)
}
