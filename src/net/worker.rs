//! One event loop: a mio `Poll` over the connections it owns.
//!
//! mio's readiness contract, literally: after a readable event, read until
//! `WouldBlock` (or until backpressure pauses reading, remembered in
//! `read_paused` so the loop resumes by itself); write until `WouldBlock` and
//! keep WRITABLE interest only while output is pending; retry `Interrupted`;
//! ignore events and notices for stale tokens or generations.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::conn::{Conn, Phase};
use super::{Notice, WAKER};
use crate::core::{now_ms, ConnRef, Core};
use crate::session::{Ctx, Dest, Flow, Session};
use crate::wire::{self, CheckError, ErrorCode, Frame, Kind, HEADER_LEN};

/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// How often timeouts are checked, ms.
const TICK_MS: u64 = 250;
/// How long a closing connection may drain the peer's input, ms.
const DRAIN_MS: u64 = 2_000;

/// Connection generations, unique for the life of the process.
static GENERATION: AtomicU64 = AtomicU64::new(1);

struct Worker {
    core: Arc<Core>,
    index: usize,
    poll: Poll,
    conns: Slab<Conn>,
    /// Read buffer shared by all connections of this loop: complete frames are
    /// decoded straight from it; only a partial frame is copied to the
    /// connection's own `inbuf`.
    scratch: Box<[u8]>,
}

/// Runs an event loop until it receives [`Notice::Shutdown`].
pub fn run(core: Arc<Core>, index: usize, poll: Poll) {
    let mut worker = Worker {
        core,
        index,
        poll,
        conns: Slab::new(),
        scratch: vec![0; READ_CHUNK].into_boxed_slice(),
    };
    let mut events = Events::with_capacity(1024);
    let mut next_tick = now_ms() + TICK_MS;
    loop {
        let timeout = next_tick.saturating_sub(now_ms());
        if let Err(e) = worker
            .poll
            .poll(&mut events, Some(Duration::from_millis(timeout)))
        {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll failed; event loop stops");
                return;
            }
        }
        for event in events.iter() {
            match event.token() {
                WAKER => {}
                Token(t) => worker.on_event(t, event.is_readable(), event.is_writable()),
            }
        }
        if !worker.drain_notices() {
            worker.shutdown();
            return;
        }
        let now = now_ms();
        if now >= next_tick {
            worker.tick(now);
            next_tick = now + TICK_MS;
        }
    }
}

impl Worker {
    /// Handles queued notices; `false` means shut down.
    fn drain_notices(&mut self) -> bool {
        let core = self.core.clone();
        let Some(handle) = core.workers.get().and_then(|w| w.get(self.index)) else {
            return true;
        };
        handle.pending.store(false, Ordering::Release);
        while let Some(notice) = handle.queue.pop() {
            match notice {
                Notice::Accepted(stream) => self.accept(stream),
                Notice::Mailbox(conn) => {
                    if let Some(t) = self.live(conn) {
                        self.with_session(t, |s, ctx| s.on_mailbox(ctx));
                        self.after(t);
                    }
                }
                Notice::SendDone {
                    conn,
                    id,
                    to,
                    group,
                    status,
                } => {
                    if let Some(t) = self.live(conn) {
                        self.with_session(t, |s, ctx| {
                            let dest = if group {
                                Dest::Group(&to)
                            } else {
                                Dest::To(&to)
                            };
                            s.on_send_done(ctx, id, dest, status);
                            Flow::Continue
                        });
                        self.after(t);
                    }
                }
                Notice::Shutdown => return false,
            }
        }
        true
    }

    /// The slab slot of a connection, if it is still the one referred to.
    fn live(&self, conn: ConnRef) -> Option<usize> {
        self.conns
            .get(conn.token)
            .filter(|c| c.generation == conn.generation)
            .map(|_| conn.token)
    }

    fn accept(&mut self, mut stream: mio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let entry = self.conns.vacant_entry();
        let token = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(token), Interest::READABLE)
        {
            tracing::warn!(error = %e, "register failed");
            self.core
                .metrics
                .connections
                .fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id = generation, peer = ?peer);
        span.in_scope(|| tracing::debug!("accepted"));
        entry.insert(Conn {
            stream,
            generation,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            session: Session::new(now_ms(), &self.core),
            read_paused: false,
            write_interest: false,
            phase: Phase::Open,
            closing_since: 0,
            span,
        });
    }

    /// Runs a session call with a fresh context; a `Close` starts closing.
    fn with_session(&mut self, t: usize, f: impl FnOnce(&mut Session, &mut Ctx<'_>) -> Flow) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        if conn.phase != Phase::Open {
            return;
        }
        let _span = conn.span.clone().entered();
        let me = ConnRef {
            worker: self.index,
            token: t,
            generation: conn.generation,
        };
        let mut ctx = Ctx {
            core: &self.core,
            out: &mut conn.out,
            now: now_ms(),
            me,
        };
        if f(&mut conn.session, &mut ctx) == Flow::Close {
            conn.phase = Phase::Closing;
        }
    }

    fn on_event(&mut self, t: usize, readable: bool, writable: bool) {
        if !self.conns.contains(t) {
            return; // stale event for a closed connection
        }
        if writable {
            self.flush(t);
        }
        if readable {
            self.read(t);
        }
        self.after(t);
    }

    /// Reads until `WouldBlock`, EOF, or backpressure.
    fn read(&mut self, t: usize) {
        let conn_buffer = self.core.config.conn_buffer;
        loop {
            let Some(conn) = self.conns.get_mut(t) else {
                return;
            };
            if let Phase::Draining { .. } = conn.phase {
                // Discard input until EOF; nothing is buffered.
                match conn.stream.read(&mut self.scratch) {
                    Ok(0) => return self.close(t),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => return self.close(t),
                }
            }
            if conn.phase != Phase::Open {
                return;
            }
            if !conn.session.wants_read(conn.pending_out(), conn_buffer) {
                conn.read_paused = true;
                return;
            }
            conn.read_paused = false;
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    conn.phase = Phase::Closing;
                    return;
                }
                Ok(n) => {
                    let m = &self.core.metrics;
                    m.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    conn.session.on_read(now_ms());
                    self.frames(t, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    conn.span
                        .in_scope(|| tracing::debug!(error = %e, "read failed"));
                    return self.close(t);
                }
            }
        }
    }

    /// Splits and handles the frames in `scratch[..n]` (after any partial
    /// frame left in the connection's `inbuf`).
    fn frames(&mut self, t: usize, n: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let max_frame = self.core.config.max_frame;
        let from_inbuf = !conn.inbuf.is_empty();
        if from_inbuf {
            conn.inbuf.extend_from_slice(&self.scratch[..n]);
        }
        let mut inbuf = std::mem::take(&mut conn.inbuf);
        let buf: &[u8] = if from_inbuf {
            &inbuf
        } else {
            &self.scratch[..n]
        };
        let mut pos = 0;
        let mut frames = 0u64;
        let me = ConnRef {
            worker: self.index,
            token: t,
            generation: conn.generation,
        };
        let _span = conn.span.clone().entered();
        while conn.phase == Phase::Open {
            let mut ctx = Ctx {
                core: &self.core,
                out: &mut conn.out,
                now: now_ms(),
                me,
            };
            let flow = match wire::check(&buf[pos..], max_frame) {
                Ok(total) => {
                    frames += 1;
                    let kind = Kind(buf[pos]);
                    let body = &buf[pos + HEADER_LEN..pos + total];
                    pos += total;
                    match wire::decode(kind, body) {
                        Ok(frame) => {
                            if let Frame::Send(_) | Frame::Ack(_) = frame {
                                tracing::trace!(?kind, len = total, "frame");
                            }
                            conn.session.handle_frame(&mut ctx, frame)
                        }
                        Err(e) => ctx_fatal(&mut ctx, ErrorCode::PROTOCOL_ERROR, &e.to_string()),
                    }
                }
                Err(CheckError::Incomplete { .. }) => break,
                Err(CheckError::TooLarge { len }) => ctx_fatal(
                    &mut ctx,
                    ErrorCode::FRAME_TOO_LARGE,
                    &format!("frame body of {len} bytes exceeds max_frame {max_frame}"),
                ),
                Err(CheckError::UnknownKind(k)) => ctx_fatal(
                    &mut ctx,
                    ErrorCode::PROTOCOL_ERROR,
                    &format!("unknown frame kind {k:#04x}"),
                ),
            };
            if flow == Flow::Close {
                conn.phase = Phase::Closing;
            }
        }
        self.core
            .metrics
            .frames_in
            .fetch_add(frames, Ordering::Relaxed);
        let len = buf.len();
        if conn.phase == Phase::Open && pos < len {
            if from_inbuf {
                inbuf.drain(..pos);
            } else {
                inbuf.clear();
                inbuf.extend_from_slice(&self.scratch[pos..n]);
            }
            conn.inbuf = inbuf;
        } else if from_inbuf && inbuf.capacity() <= 2 * READ_CHUNK {
            inbuf.clear();
            conn.inbuf = inbuf;
        }
    }

    fn flush(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        match conn.flush() {
            Ok(n) => {
                self.core
                    .metrics
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                conn.span
                    .in_scope(|| tracing::debug!(error = %e, "write failed"));
                self.close(t);
            }
        }
    }

    /// After anything happened to a connection: deliver, flush, fix interest,
    /// resume paused reading, finish closing.
    fn after(&mut self, t: usize) {
        for _ in 0..8 {
            let Some(conn) = self.conns.get(t) else {
                return;
            };
            if conn.phase == Phase::Open {
                self.with_session(t, |s, ctx| {
                    s.pump(ctx);
                    Flow::Continue
                });
            }
            self.flush(t);
            let Some(conn) = self.conns.get_mut(t) else {
                return;
            };
            let pending = conn.pending_out() > 0;
            match conn.phase {
                Phase::Closing if !pending => {
                    conn.shutdown_write();
                    conn.phase = Phase::Draining {
                        until: now_ms() + DRAIN_MS,
                    };
                    self.read(t);
                    return self.set_interest(t);
                }
                Phase::Open
                    if conn.read_paused
                        && conn
                            .session
                            .wants_read(conn.pending_out(), self.core.config.conn_buffer) =>
                {
                    self.read(t);
                    continue;
                }
                _ => return self.set_interest(t),
            }
        }
        self.set_interest(t);
    }

    fn set_interest(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let want_write = conn.pending_out() > 0;
        if want_write == conn.write_interest {
            return;
        }
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if let Err(e) = self
            .poll
            .registry()
            .reregister(&mut conn.stream, Token(t), interest)
        {
            tracing::warn!(error = %e, "reregister failed");
            return self.close(t);
        }
        conn.write_interest = want_write;
    }

    fn close(&mut self, t: usize) {
        if !self.conns.contains(t) {
            return;
        }
        let mut conn = self.conns.remove(t);
        conn.session.on_close();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.core
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        conn.span.in_scope(|| tracing::debug!("closed"));
    }

    fn tick(&mut self, now: u64) {
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for t in tokens {
            let Some(conn) = self.conns.get(t) else {
                continue;
            };
            match conn.phase {
                Phase::Draining { until } if now >= until => self.close(t),
                Phase::Closing if conn.closing_since == 0 => {
                    if let Some(c) = self.conns.get_mut(t) {
                        c.closing_since = now;
                    }
                }
                Phase::Closing if now.saturating_sub(conn.closing_since) >= DRAIN_MS => {
                    conn.span
                        .in_scope(|| tracing::debug!("peer does not read: closed"));
                    self.close(t);
                }
                Phase::Open => {
                    self.with_session(t, |s, ctx| s.on_tick(ctx));
                    if self.conns.get(t).is_some_and(|c| c.phase != Phase::Open) {
                        self.after(t);
                    }
                }
                _ => {}
            }
        }
    }

    /// Closes every connection with ERROR SHUTDOWN (best effort flush).
    fn shutdown(&mut self) {
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for t in tokens {
            self.with_session(t, |_, ctx| {
                ctx_fatal(ctx, ErrorCode::SHUTDOWN, "the server is shutting down")
            });
            if let Some(conn) = self.conns.get_mut(t) {
                let _ = conn.stream.set_nodelay(true);
                let _ = conn.flush();
                conn.shutdown_write();
            }
            self.close(t);
        }
    }
}

fn ctx_fatal(ctx: &mut Ctx<'_>, code: ErrorCode, reason: &str) -> Flow {
    let frame = Frame::Error(wire::Error {
        code: Some(code),
        reason: Some(reason),
    });
    let _ = wire::encode(&frame, ctx.out);
    tracing::debug!(?code, reason, "closing with error");
    Flow::Close
}
