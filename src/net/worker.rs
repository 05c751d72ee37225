//! One event loop: a mio `Poll` over the connections it owns.
//!
//! mio's readiness contract: after a readable event, read until
//! `WouldBlock` (or until backpressure pauses reading, remembered in
//! `read_paused` so the loop resumes by itself); write until `WouldBlock` and
//! keep WRITABLE interest only while output is pending; retry `Interrupted`;
//! ignore events and notices for stale tokens or generations. One shortcut,
//! tokio's, on Linux only ([`SHORT_READ_DRAINS`]): a read that fills less
//! than the buffer drained the socket, so the `read` that would only return
//! `WouldBlock` is skipped (epoll, which mio drives edge-triggered, reports
//! every later arrival as a new event). Not when the event also says the
//! peer closed: that end of the stream has no later event, so the loop
//! reads on to it.
//!
//! Output is written per turn, not per event: every event, notice and timer
//! of a connection marks it due ([`Worker::after`]), and at the end of the
//! turn each due connection is settled once ([`Worker::settle`]: pumped and
//! flushed, in more rounds only if its output buffer filled), so a turn's
//! answers, deliveries and pongs to one peer usually share one `send`. The
//! price is that an answer waits for the rest of its turn (at most
//! [`NOTICE_BATCH`] notices and timers, and [`READ_BUDGET`] reads per ready
//! socket); a connection whose output buffer fills is settled at once
//! instead.
//!
//! Every drain is bounded: notices ([`NOTICE_BATCH`] per turn), delivery
//! rounds per connection ([`ROUNDS`]), reads per event ([`READ_BUDGET`]);
//! work left over is picked up on the next turn without blocking.
//! Timeouts come from a heap fed by each connection's deadline (the
//! session's `poll_timeout`, or its closing deadline), so the loop never
//! walks every connection.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::conn::{Conn, Phase};
use super::ws::Incoming;
use super::{Glue, Loops, Notice, WAKER};
use crate::admission::{Summary, Ticket};
use crate::clock::now_ms;
use crate::mailbox::ConnRef;
use crate::session::{Ctx, Flow, Session};
use crate::wire::{Deframer, ErrorCode};

/// Bytes read from a socket per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// How long a closing connection may drain the peer's input, ms.
const DRAIN_MS: u64 = 2_000;
/// Notices handled per turn of the loop before sockets get their turn.
const NOTICE_BATCH: usize = 1024;
/// Whether a read shorter than its buffer means the socket is empty, with
/// any later arrival reported as a new event (epoll's edge-triggered mode;
/// elsewhere the loop reads until `WouldBlock`).
const SHORT_READ_DRAINS: bool = cfg!(any(target_os = "linux", target_os = "android"));
/// Deliver-flush rounds for one connection before others get their turn
/// (a peer that reads as fast as we write would otherwise hold the loop).
const ROUNDS: usize = 8;
/// Reads of one socket (of up to [`READ_CHUNK`] each) per event, before the
/// loop's other connections, timers and notices get their turn: a peer that
/// keeps its socket full (with frames that cost the server more than they
/// cost the peer, or none at all before HELLO) would otherwise hold the
/// loop, and its own HELLO deadline would never be checked.
const READ_BUDGET: usize = 4;

/// Connections closed to make room for newer ones waiting to log in.
static EVICTED: Summary =
    Summary::new("connections closed before HELLO: max_unauthenticated reached");

/// Connection generations, unique for the life of the process.
static GENERATION: AtomicU64 = AtomicU64::new(1);

struct Worker {
    glue: Arc<Glue>,
    loops: Arc<Loops>,
    index: usize,
    poll: Poll,
    conns: Slab<Conn>,
    /// Read buffer shared by all connections of this loop: complete frames are
    /// decoded straight from it; only a partial frame is copied into the
    /// connection's deframer.
    scratch: Box<[u8]>,
    /// (deadline ms, slot, generation): when each connection needs a call.
    /// An entry whose deadline is not the connection's `scheduled` is stale.
    timers: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// Connections with deliveries left after their [`ROUNDS`].
    ready: VecDeque<(usize, u64)>,
    /// Connections in accept order, to find the oldest one that has not
    /// logged in (entries for others are skipped, and pruned now and then).
    waiting: VecDeque<(usize, u64)>,
    /// This loop's open connections that have not logged in.
    unauthenticated: usize,
    /// `ws_allowed_origins`, split.
    origins: Vec<String>,
    /// Plaintext out of TLS records, before it is handled.
    plain: Box<[u8]>,
    /// (slot, generation) of the connections to settle at the end of this
    /// turn, each once (`Conn::due`).
    due: Vec<(usize, u64)>,
}

/// Runs an event loop until it receives [`Notice::Shutdown`].
pub fn run(glue: Arc<Glue>, loops: Arc<Loops>, index: usize, poll: Poll) {
    let mut worker = Worker {
        glue,
        loops,
        index,
        poll,
        conns: Slab::new(),
        scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        timers: BinaryHeap::new(),
        ready: VecDeque::new(),
        waiting: VecDeque::new(),
        unauthenticated: 0,
        origins: Vec::new(),
        plain: vec![0; READ_CHUNK].into_boxed_slice(),
        due: Vec::new(),
    };
    worker.origins = worker
        .glue
        .config
        .ws_allowed_origins
        .split(',')
        .map(|o| o.trim().to_owned())
        .filter(|o| !o.is_empty())
        .collect();
    let mut events = Events::with_capacity(1024);
    let mut busy = false;
    loop {
        let timeout = match busy || !worker.ready.is_empty() {
            true => Some(Duration::ZERO),
            false => worker
                .timers
                .peek()
                .map(|Reverse((at, _, _))| Duration::from_millis(at.saturating_sub(now_ms()))),
        };
        if let Err(e) = worker.poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll failed; event loop stops");
                return;
            }
        }
        for event in events.iter() {
            match event.token() {
                WAKER => {}
                Token(t) => {
                    // The peer's end of the stream (or an error) is reported
                    // once: read on to it, past a short read.
                    let drain = event.is_read_closed() || event.is_error();
                    worker.on_event(t, event.is_readable(), event.is_writable(), drain)
                }
            }
        }
        let more_notices = match worker.drain_notices() {
            Some(more) => more,
            None => return worker.shutdown(),
        };
        worker.run_ready();
        busy = worker.run_timers(now_ms()) || more_notices;
        worker.settle_due();
    }
}

impl Worker {
    /// Handles up to [`NOTICE_BATCH`] queued notices. `None` means shut
    /// down; `Some(true)` that notices are left for the next turn.
    fn drain_notices(&mut self) -> Option<bool> {
        let loops = self.loops.clone();
        let handle = &loops.handles[self.index];
        handle.pending.store(false, Ordering::Release);
        for _ in 0..NOTICE_BATCH {
            let Some(notice) = handle.queue.pop() else {
                return Some(false);
            };
            match notice {
                Notice::Accepted(stream, ticket) => self.accept(stream, ticket),
                Notice::Mailbox(conn) => {
                    if let Some(t) = self.live(conn) {
                        self.with_session(t, |s, ctx| s.handle_mailbox(ctx));
                        self.after(t);
                    }
                }
                Notice::Answer(conn, answer) => {
                    if let Some(t) = self.live(conn) {
                        self.with_session(t, |s, ctx| {
                            s.handle_answer(ctx, &answer);
                            Flow::Continue
                        });
                        self.after(t);
                    }
                }
                Notice::Shutdown => return None,
            }
        }
        Some(!handle.queue.is_empty())
    }

    /// The slab slot of a connection, if it is still the one referred to.
    fn live(&self, conn: ConnRef) -> Option<usize> {
        self.conns
            .get(conn.token)
            .filter(|c| c.generation == conn.generation)
            .map(|_| conn.token)
    }

    fn accept(&mut self, mut stream: mio::net::TcpStream, ticket: Ticket) {
        let _ = stream.set_nodelay(true);
        let tls = match &self.glue.tls {
            None => None,
            Some(certs) => match rustls::ServerConnection::new(certs.current()) {
                Ok(mut conn) => {
                    conn.set_buffer_limit(Some(crate::tls::BUFFER_LIMIT));
                    Some(Box::new(conn))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tls session could not start");
                    self.glue
                        .metrics
                        .connections
                        .fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            },
        };
        let peer = stream.peer_addr().ok();
        self.make_room_to_log_in();
        let entry = self.conns.vacant_entry();
        let token = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(token), Interest::READABLE)
        {
            tracing::warn!(error = %e, "register failed");
            self.glue
                .metrics
                .connections
                .fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id = generation, peer = ?peer);
        span.in_scope(|| tracing::debug!("accepted"));
        let config = &self.glue.config;
        entry.insert(Conn {
            stream,
            generation,
            deframer: Deframer::new(config.max_frame),
            out: Vec::new(),
            out_pos: 0,
            session: Session::new(now_ms(), config, peer.map(|p| p.ip())),
            ticket,
            sniffed: false,
            ws: None,
            ws_pos: 0,
            ws_closed: false,
            tls,
            tls_closed: false,
            due: false,
            read_paused: false,
            read_yielded: false,
            write_interest: false,
            phase: Phase::Open,
            closing_since: 0,
            scheduled: u64::MAX,
            span,
        });
        self.waiting.push_back((token, generation));
        self.unauthenticated += 1;
        self.schedule(token);
    }

    /// Keeps this loop's connections that have not logged in below its share
    /// of `max_unauthenticated`, by closing the oldest of them: silent
    /// sockets then never keep a new client from logging in, it only has to
    /// send HELLO before newer sockets push it out.
    fn make_room_to_log_in(&mut self) {
        let share = (self.glue.config.max_unauthenticated / self.loops.len().max(1)).max(1);
        while self.unauthenticated >= share {
            let Some((t, generation)) = self.waiting.pop_front() else {
                break;
            };
            let waiting = self
                .conns
                .get(t)
                .is_some_and(|c| c.generation == generation && c.waiting_to_log_in());
            if waiting {
                EVICTED.note(now_ms());
                self.with_session(t, |_, ctx| {
                    ctx.fatal(
                        ErrorCode::NOT_AUTHENTICATED,
                        "too many connections waiting to log in: send HELLO at once",
                    )
                });
                self.logged_in_or_gone(t);
                self.after(t);
            }
        }
    }

    /// Takes connection `t` out of the count of those waiting to log in, if
    /// it was in it (it logged in, or it is closing or gone).
    fn logged_in_or_gone(&mut self, t: usize) {
        if let Some(conn) = self.conns.get_mut(t) {
            if conn.ticket.is_unauthenticated() {
                conn.ticket.authenticated();
                self.unauthenticated -= 1;
            }
        }
        // `waiting` keeps the stale entry; drop such entries before they pile up.
        if self.waiting.len() > 2 * self.unauthenticated + 64 {
            let conns = &self.conns;
            self.waiting.retain(|&(t, g)| {
                conns
                    .get(t)
                    .is_some_and(|c| c.generation == g && c.waiting_to_log_in())
            });
        }
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
        let now = now_ms();
        let mut ctx = Ctx {
            env: &*self.glue,
            out: &mut conn.out,
            now,
            now_us: crate::clock::mono_us(),
            me,
        };
        let flow = f(&mut conn.session, &mut ctx);
        if flow == Flow::Close {
            conn.start_closing(now);
        }
        if conn.ticket.is_unauthenticated() && !conn.waiting_to_log_in() {
            self.logged_in_or_gone(t);
        }
    }

    fn on_event(&mut self, t: usize, readable: bool, writable: bool, drain: bool) {
        if !self.conns.contains(t) {
            return; // stale event for a closed connection
        }
        if writable {
            self.flush(t);
        }
        if readable {
            self.read(t, drain);
        }
        self.after(t);
    }

    /// Reads until `WouldBlock`, EOF, or backpressure; with `drain` false,
    /// also stops after a read that did not fill the buffer (the socket is
    /// empty, and epoll reports anything that arrives later). After
    /// [`READ_BUDGET`] reads it yields: the connection goes to `ready`, and
    /// the next turn reads on.
    fn read(&mut self, t: usize, drain: bool) {
        let conn_buffer = self.glue.config.conn_buffer;
        for _ in 0..READ_BUDGET {
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
                    conn.start_closing(now_ms());
                    return;
                }
                Ok(n) => {
                    let m = &self.glue.metrics;
                    m.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    conn.session.on_read(now_ms());
                    let scratch = std::mem::take(&mut self.scratch);
                    if conn.tls.is_some() {
                        self.tls_input(t, &scratch[..n]);
                    } else {
                        self.input(t, &scratch[..n]);
                    }
                    self.scratch = scratch;
                    if SHORT_READ_DRAINS && !drain && n < self.scratch.len() {
                        return;
                    }
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
        // The budget is spent, input perhaps left (edge-triggered: no new
        // event comes for it).
        if let Some(conn) = self.conns.get_mut(t) {
            if !conn.read_yielded {
                conn.read_yielded = true;
                self.ready.push_back((t, conn.generation));
            }
        }
    }

    /// Plaintext from the peer: the first byte decides the transport (`G`:
    /// a WebSocket upgrade), then frames or WebSocket bytes go their way.
    fn input(&mut self, t: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        if !conn.sniffed && !bytes.is_empty() {
            conn.sniffed = true;
            if bytes[0] == b'G' {
                conn.ws = Some(Box::default());
            }
        }
        if conn.ws.is_some() {
            self.ws_input(t, bytes);
        } else {
            feed(&self.glue, self.index, t, conn, bytes);
        }
    }

    /// TLS records from the socket: through rustls, and the plaintext they
    /// carry on to [`Worker::input`]. A TLS error (a plaintext client on a
    /// TLS port, a bad handshake) sends rustls's alert, then closes.
    fn tls_input(&mut self, t: usize, mut records: &[u8]) {
        let mut plain = std::mem::take(&mut self.plain);
        while let Some(conn) = self.conns.get_mut(t) {
            let Some(tls) = conn.tls.as_mut() else {
                break;
            };
            let mut took = 0;
            if !records.is_empty() {
                match tls.read_tls(&mut records) {
                    Ok(n) => took = n,
                    Err(_) => {
                        self.close(t);
                        break;
                    }
                }
                if let Err(e) = tls.process_new_packets() {
                    conn.span
                        .in_scope(|| tracing::debug!(error = %e, "tls error: closed"));
                    let _ = tls.write_tls(&mut conn.stream);
                    self.close(t);
                    break;
                }
            }
            let got = match tls.reader().read(&mut plain) {
                Ok(0) => {
                    conn.start_closing(now_ms());
                    break;
                }
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => {
                    self.close(t);
                    break;
                }
            };
            if got > 0 {
                self.input(t, &plain[..got]);
                if self.conns.get(t).is_none_or(|c| c.phase != Phase::Open) {
                    break;
                }
            } else if records.is_empty() || took == 0 {
                break;
            }
        }
        self.plain = plain;
    }

    /// Runs the WebSocket bytes in `bytes` through the connection's
    /// WebSocket: each binary message's frames through the deframer and the
    /// session, as over TCP. A message must end on a frame boundary.
    fn ws_input(&mut self, t: usize, bytes: &[u8]) {
        let mut incoming = Vec::new();
        {
            let Some(conn) = self.conns.get_mut(t) else {
                return;
            };
            let Some(ws) = conn.ws.as_mut() else {
                return;
            };
            let config = &self.glue.config;
            ws.receive(bytes, &self.origins, config.max_frame, &mut incoming);
        }
        for item in incoming {
            match item {
                Incoming::Frames(data) => {
                    self.feed(t, &data);
                    let partial = self
                        .conns
                        .get(t)
                        .is_some_and(|c| c.phase == Phase::Open && c.deframer.buffered() > 0);
                    if partial {
                        self.with_session(t, |_, ctx| {
                            ctx.fatal(
                                ErrorCode::PROTOCOL_ERROR,
                                "a WebSocket message ended inside a frame",
                            )
                        });
                    }
                }
                Incoming::Closed => {
                    if let Some(conn) = self.conns.get_mut(t) {
                        conn.start_closing(now_ms());
                    }
                }
                Incoming::Violation(code, reason) => {
                    self.with_session(t, |_, ctx| ctx.fatal(code, &reason));
                }
            }
            if self.conns.get(t).is_none_or(|c| c.phase != Phase::Open) {
                return;
            }
        }
    }

    /// Runs the frames in `bytes` (a WebSocket message) through the
    /// connection's deframer and session.
    fn feed(&mut self, t: usize, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        feed(&self.glue, self.index, t, conn, bytes);
    }

    fn flush(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        match conn.flush() {
            Ok(n) => {
                let m = &self.glue.metrics;
                m.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                conn.span
                    .in_scope(|| tracing::debug!(error = %e, "write failed"));
                self.close(t);
            }
        }
    }

    /// After anything happened to a connection: it is settled at the end of
    /// the turn, once however many events, notices and timers it had; at
    /// once if its output buffer is full (a pump would write nothing more).
    fn after(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        if conn.out.len() >= self.glue.config.conn_buffer {
            return self.settle(t);
        }
        if !conn.due {
            conn.due = true;
            self.due.push((t, conn.generation));
        }
    }

    /// Settles every connection marked due this turn that is still the one
    /// marked (a slot closed and reused meanwhile is skipped).
    fn settle_due(&mut self) {
        let mut i = 0;
        while let Some(&(t, generation)) = self.due.get(i) {
            i += 1;
            match self.conns.get_mut(t) {
                Some(conn) if conn.generation == generation => conn.due = false,
                _ => continue,
            }
            self.settle(t);
        }
        self.due.clear();
    }

    /// Delivers, flushes, fixes interest, resumes paused reading, finishes
    /// closing. Delivery is driven by what the socket accepts: when a flush
    /// empties the output, deliveries continue at once, without waiting for
    /// the peer to send anything.
    fn settle(&mut self, t: usize) {
        let conn_buffer = self.glue.config.conn_buffer;
        for _ in 0..ROUNDS {
            let Some(conn) = self.conns.get(t) else {
                return;
            };
            let before = conn.out.len();
            if conn.phase == Phase::Open {
                self.with_session(t, |s, ctx| {
                    s.pump(ctx);
                    Flow::Continue
                });
            }
            // Another round if this one wrote (more may have come in), or
            // if the output buffer reached `conn_buffer`, whoever filled it
            // (this pump, or the frames just read: a login's first
            // deliveries), since that is the pump's only early stop.
            let (wrote, full) = self.conns.get(t).map_or((false, false), |c| {
                (c.out.len() > before, c.out.len() >= conn_buffer)
            });
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
                    self.read(t, true);
                    self.schedule(t);
                    return self.set_interest(t);
                }
                Phase::Open
                    if conn.read_paused
                        && conn.session.wants_read(conn.pending_out(), conn_buffer) =>
                {
                    self.read(t, true);
                }
                Phase::Open if (wrote || full) && !pending => {}
                _ => {
                    self.schedule(t);
                    return self.set_interest(t);
                }
            }
        }
        if let Some(conn) = self.conns.get(t) {
            self.ready.push_back((t, conn.generation));
        }
        self.schedule(t);
        self.set_interest(t);
    }

    /// Continues connections that used up their rounds, or their read
    /// budget, on the last turn.
    fn run_ready(&mut self) {
        for _ in 0..self.ready.len() {
            let Some((t, generation)) = self.ready.pop_front() else {
                break;
            };
            let conn = ConnRef {
                worker: self.index,
                token: t,
                generation,
            };
            if self.live(conn).is_some() {
                if std::mem::take(&mut self.conns[t].read_yielded) {
                    // Reads on where its budget stopped it (to EOF, if the
                    // peer closed: that has no event of its own again).
                    self.read(t, true);
                }
                self.after(t);
            }
        }
    }

    /// Makes sure the timer heap wakes the loop by the connection's deadline.
    fn schedule(&mut self, t: usize) {
        let Some(conn) = self.conns.get_mut(t) else {
            return;
        };
        let at = conn.deadline(DRAIN_MS);
        if at < conn.scheduled {
            conn.scheduled = at;
            self.timers.push(Reverse((at, t, conn.generation)));
        }
    }

    /// Handles the connections whose deadline has come, at most
    /// [`NOTICE_BATCH`] of them; `true` if more are due.
    fn run_timers(&mut self, now: u64) -> bool {
        for _ in 0..NOTICE_BATCH {
            let Some(&Reverse((at, t, generation))) = self.timers.peek() else {
                return false;
            };
            if at > now {
                return false;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(t) else {
                continue;
            };
            if conn.generation != generation || conn.scheduled != at {
                continue; // stale entry
            }
            conn.scheduled = u64::MAX;
            if conn.deadline(DRAIN_MS) > now {
                // The deadline moved later (input arrived): sleep again.
                self.schedule(t);
                continue;
            }
            match conn.phase {
                Phase::Draining { .. } => self.close(t),
                // Its last output went out this turn (a writable event),
                // and it is settled at the end of it: shut down and drained.
                Phase::Closing if conn.pending_out() == 0 => self.after(t),
                Phase::Closing => {
                    conn.span
                        .in_scope(|| tracing::debug!("peer does not read: closed"));
                    self.close(t);
                }
                Phase::Open => {
                    self.with_session(t, |s, ctx| s.handle_timeout(ctx));
                    self.after(t);
                }
            }
        }
        true
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
        self.logged_in_or_gone(t);
        let mut conn = self.conns.remove(t);
        conn.session.on_close();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.glue
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        conn.span.in_scope(|| tracing::debug!("closed"));
    }

    /// Closes every connection with ERROR SHUTDOWN (best effort flush).
    fn shutdown(&mut self) {
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for t in tokens {
            self.with_session(t, |_, ctx| {
                ctx.fatal(ErrorCode::SHUTDOWN, "the server is shutting down")
            });
            if let Some(conn) = self.conns.get_mut(t) {
                let _ = conn.flush();
                conn.shutdown_write();
            }
            self.close(t);
        }
    }
}

/// Runs `bytes` through a connection's deframer and session.
fn feed(glue: &Arc<Glue>, index: usize, t: usize, conn: &mut Conn, bytes: &[u8]) {
    let me = ConnRef {
        worker: index,
        token: t,
        generation: conn.generation,
    };
    let _span = conn.span.clone().entered();
    let Conn {
        deframer,
        session,
        out,
        ..
    } = conn;
    let now = now_ms();
    let mut ctx = Ctx {
        env: &**glue,
        out,
        now,
        now_us: crate::clock::mono_us(),
        me,
    };
    let mut flow = Flow::Continue;
    let mut frames = 0u64;
    let fed = deframer.feed(bytes, |frame| {
        frames += 1;
        flow = session.handle_frame(&mut ctx, frame);
        match flow {
            Flow::Continue => ControlFlow::Continue(()),
            Flow::Close => ControlFlow::Break(()),
        }
    });
    if let Err(e) = fed {
        flow = ctx.fatal(e.code(), &e.to_string());
    }
    let m = &glue.metrics;
    m.frames_in.fetch_add(frames, Ordering::Relaxed);
    if flow == Flow::Close {
        conn.start_closing(now);
    }
}
