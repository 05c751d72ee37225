//! The connection thread (`tern-sdk-conn`): connects, logs in, sends the
//! outbox and owed READ receipts, stores deliveries and statuses before it
//! ACKs them, pings when idle, and reconnects with backoff.
//!
//! ```text
//!             ┌──────── ctl (Wake, Reconnect, Shutdown) ◄── app threads
//!             ▼
//!  tern-sdk-conn ──► Store::apply (one transaction per batch) ──► ACK
//!     ▲      │
//!     │      └──► Writer (one output buffer; app threads append live sends)
//!     │
//!  frames (bounded) ◄── tern-sdk-read: tern::client::Client::recv_timeout
//! ```
//!
//! One reader thread per connection owns the `tern::client::Client` and
//! only reads; everything written goes through [`Writer`], a buffer that the
//! connection thread flushes without ever blocking for long. So the thread
//! that stores and ACKs never sits in a blocked `write` while the server,
//! unable to write to us, has stopped reading: the two directions cannot
//! deadlock each other.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use tern::client::{Client, ClientError, Event as WireEvent, Options};
use tern::wire::{self, ErrorCode, Frame, StatusCode};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::{ConnectionState, Emitter, Event};
use crate::store::Store;
use crate::types::{Message, Peer, Status};

/// Frames handled (and committed) in one store transaction, at most.
const BATCH: usize = 1024;
/// Capacity of the reader → connection thread channel, in frames. When it
/// is full the reader stops reading and TCP pushes back on the server.
const FRAMES_CAP: usize = 4096;
/// How long one `write` may block before the rest stays buffered.
const WRITE_SLICE: Duration = Duration::from_millis(10);
/// While this much output is buffered, no more SENDs are added.
const OUT_HIGH_WATER: usize = 1 << 20;
/// Owed READ receipts written per round.
const READS_PER_ROUND: usize = 256;
/// A logged-in connection that ends sooner than this counts as failed at
/// once, for the reconnect delays.
const HELD_SESSION: Duration = Duration::from_secs(2);

/// A command to the connection thread.
#[derive(Debug)]
pub(crate) enum Ctl {
    /// Something new to send (outbox, READ receipts, a live send).
    Wake,
    /// The message with this local id entered the outbox behind the
    /// send cursor (its upload finished after later messages were sent):
    /// send from it on.
    Ready(i64),
    /// Try to connect now (after AuthFailed/Replaced/WrongUser, or to cut a
    /// backoff).
    Reconnect,
    /// Stop.
    Shutdown,
}

/// What the reader thread hands over.
enum Input {
    /// A frame the server sent.
    Frame(WireEvent),
    /// The connection ended.
    Closed(ClientError),
}

/// The state the app threads and the SDK threads share.
pub(crate) struct Shared {
    /// The local store.
    pub store: Arc<Store>,
    /// The configuration the SDK was opened with.
    pub config: Config,
    /// Events to the app.
    pub emitter: Emitter,
    /// The current connection's output, or `None` while offline.
    pub writer: Mutex<Option<Writer>>,
    /// The last connection state announced.
    pub state: Mutex<ConnectionState>,
    /// Set by shutdown; long operations (uploads) check it.
    pub stopping: AtomicBool,
    /// A login showed that the token is this store's user's (or the store
    /// had none yet, and took it). Until then no file goes to or comes
    /// from the files API with the token: it may be another user's
    /// ([`ConnectionState::WrongUser`]).
    pub verified: AtomicBool,
    /// Wakes the upload thread (when `verified` is set).
    pub uploads: Sender<Ctl>,
}

impl Shared {
    /// Records and announces a connection state.
    pub fn set_state(&self, state: ConnectionState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state.clone();
        self.emitter.emit(Event::Connection(state));
    }

    /// The output of the live connection.
    pub fn writer(&self) -> MutexGuard<'_, Option<Writer>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's output: encoded frames waiting for the socket.
pub(crate) struct Writer {
    /// The write half (a clone of the reader's socket).
    stream: TcpStream,
    /// Encoded frames; `buf[pos..]` is not written yet.
    buf: Vec<u8>,
    /// How much of `buf` the socket took.
    pos: usize,
    /// When a write last made progress (or the buffer was last empty).
    progress: Instant,
}

impl Writer {
    fn new(stream: TcpStream) -> Writer {
        Writer {
            stream,
            buf: Vec::new(),
            pos: 0,
            progress: Instant::now(),
        }
    }

    /// Appends one encoded frame.
    pub fn push(&mut self, frame: &Frame<'_>) -> Result<()> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            self.progress = Instant::now();
        }
        wire::encode(frame, &mut self.buf)
            .map(drop)
            .map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Bytes not written yet.
    fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Writes what the socket takes now (each `write` blocks at most
    /// [`WRITE_SLICE`]). Errors only when the connection is broken.
    fn flush(&mut self) -> io::Result<()> {
        while self.pos < self.buf.len() {
            match self.stream.write(&self.buf[self.pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pos += n;
                    self.progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > (1 << 16) && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(())
    }
}

/// How a connection (or an attempt) ended.
enum End {
    /// Shutdown was asked for.
    Shutdown,
    /// Retry after a backoff.
    Retry(String),
    /// Do not retry until [`Ctl::Reconnect`].
    Final(ConnectionState),
}

impl End {
    fn from_client(e: &ClientError) -> End {
        match e {
            ClientError::Server { code, .. } if *code == ErrorCode::AUTH_FAILED => {
                End::Final(ConnectionState::AuthFailed)
            }
            ClientError::Server { code, .. } if *code == ErrorCode::REPLACED => {
                End::Final(ConnectionState::Replaced)
            }
            other => End::Retry(other.to_string()),
        }
    }
}

/// What ended a wait.
enum Woken {
    Shutdown,
    Reconnect,
    Elapsed,
}

/// Starts the connection thread.
pub(crate) fn spawn(shared: Arc<Shared>, ctl: Receiver<Ctl>) -> io::Result<JoinHandle<()>> {
    let (frames_tx, frames_rx) = crossbeam_channel::bounded(FRAMES_CAP);
    let backoff = Backoff::new(shared.config.reconnect_min, shared.config.reconnect_max);
    let driver = Driver {
        shared,
        ctl,
        frames_tx,
        frames_rx,
        generation: 0,
        backoff,
        after_short: false,
    };
    thread::Builder::new()
        .name("tern-sdk-conn".into())
        .spawn(move || driver.run())
}

/// The connection thread's state across connections.
struct Driver {
    /// Shared with the app.
    shared: Arc<Shared>,
    /// Commands from the app.
    ctl: Receiver<Ctl>,
    /// Given to each reader thread.
    frames_tx: Sender<(u64, Input)>,
    /// Frames from the reader threads, tagged with their connection's
    /// generation so that a late frame of an old connection is ignored.
    frames_rx: Receiver<(u64, Input)>,
    /// The current connection's generation.
    generation: u64,
    /// Reconnect delays; reset by a login, unless the last connection
    /// failed at once ([`HELD_SESSION`]), and by a connection that held.
    backoff: Backoff,
    /// Whether the last logged-in connection ended within [`HELD_SESSION`].
    after_short: bool,
}

/// Per-connection sending state.
struct Session {
    /// SENDs written and not answered: id → local id.
    inflight: HashMap<u64, i64>,
    /// The outbox is sent in local-id order; this is the last one written.
    cursor: i64,
    /// Whether the outbox may hold more than was read last time.
    outbox_more: bool,
    /// While set, no SENDs: the server answered OVERLOADED.
    paused_until: Option<Instant>,
    /// OVERLOADED delays; reset by an accepted SEND.
    overload: Backoff,
    /// Whether owed READ receipts may be waiting.
    reads_more: bool,
    /// READ receipts written, by the PING token that confirms them.
    confirms: HashMap<u64, Vec<i64>>,
    /// READ receipts written on this connection and not yet confirmed.
    reads_written: HashSet<i64>,
    /// Next PING token.
    token: u64,
    /// When we last wrote anything (for the keepalive PING).
    last_write: Instant,
}

impl Driver {
    fn run(mut self) {
        loop {
            if self.shared.stopping.load(Ordering::Acquire) {
                break;
            }
            self.shared.set_state(ConnectionState::Connecting);
            let end = match self.connect() {
                Ok(client) => {
                    // A login resets the delays, unless the connection
                    // before it ended at once: connections that all fail
                    // right after their login (a local store that fails
                    // every batch, a server or middlebox that cuts each one)
                    // back off like failed attempts instead of coming back
                    // every `reconnect_min`. One that fails at once after an
                    // outage still comes back quickly.
                    if !self.after_short {
                        self.backoff.reset();
                    }
                    let started = Instant::now();
                    let end = self.session(client);
                    self.after_short = started.elapsed() < HELD_SESSION;
                    if !self.after_short {
                        self.backoff.reset();
                    }
                    end
                }
                Err(e) => End::from_client(&e),
            };
            match end {
                End::Shutdown => break,
                End::Final(state @ ConnectionState::WrongUser { .. }) => {
                    // The token cannot change: `reconnect` would log in as
                    // the other user again (and push that user's own
                    // device out, again). Only shutdown ends this.
                    self.shared.set_state(state);
                    while !matches!(self.wait(None), Woken::Shutdown) {}
                    break;
                }
                End::Final(state) => {
                    self.shared.set_state(state);
                    if let Woken::Shutdown = self.wait(None) {
                        break;
                    }
                }
                End::Retry(reason) => {
                    let retry_in = self.backoff.next_delay();
                    tracing::debug!(%reason, ?retry_in, "offline");
                    self.shared
                        .set_state(ConnectionState::Offline { reason, retry_in });
                    if let Woken::Shutdown = self.wait(Some(retry_in)) {
                        break;
                    }
                }
            }
        }
        self.shared.set_state(ConnectionState::Stopped);
    }

    /// Waits for `timeout` (forever if `None`), a Reconnect or Shutdown.
    fn wait(&self, timeout: Option<Duration>) -> Woken {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let got = match deadline {
                Some(d) => self.ctl.recv_deadline(d),
                None => self
                    .ctl
                    .recv()
                    .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
            };
            match got {
                Ok(Ctl::Wake) | Ok(Ctl::Ready(_)) => {}
                Ok(Ctl::Reconnect) => return Woken::Reconnect,
                Ok(Ctl::Shutdown) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Woken::Shutdown
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Woken::Elapsed,
            }
        }
    }

    fn connect(&self) -> Result<Client, ClientError> {
        let config = &self.shared.config;
        let addr = config
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        let options = Options {
            keepalive: Some(config.keepalive),
            client: config.client_name.clone(),
            timeout: config.connect_timeout,
            ..Options::default()
        };
        Client::connect_with(addr, &config.token, options)
    }

    /// Runs one logged-in connection until it ends.
    fn session(&mut self, client: Client) -> End {
        self.generation += 1;
        let generation = self.generation;
        let stream = match client.stream().try_clone() {
            Ok(s) => s,
            Err(e) => return End::Retry(e.to_string()),
        };
        if let Err(e) = stream.set_write_timeout(Some(WRITE_SLICE)) {
            return End::Retry(e.to_string());
        }
        let keepalive = Duration::from_secs(u64::from(client.keepalive.max(1)));
        let max_frame = client.max_frame;
        let address = client.address.clone();
        match self.shared.store.address() {
            Ok(Some(stored)) if stored != address => {
                // Final for this instance: its token is fixed.
                return End::Final(ConnectionState::WrongUser {
                    stored,
                    token_for: address,
                });
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Err(e) = self.shared.store.set_state("address", &address) {
                    return End::Retry(format!("store: {e}"));
                }
            }
            Err(e) => return End::Retry(format!("store: {e}")),
        }
        if !self.shared.verified.swap(true, Ordering::AcqRel) {
            let _ = self.shared.uploads.send(Ctl::Wake);
        }
        *self.shared.writer() = Some(Writer::new(stream));
        let reader = self.spawn_reader(client, generation, keepalive * 2);
        self.shared.set_state(ConnectionState::Online { address });
        let mut session = Session {
            inflight: HashMap::new(),
            cursor: 0,
            outbox_more: true,
            paused_until: None,
            overload: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            reads_more: true,
            confirms: HashMap::new(),
            reads_written: HashSet::new(),
            token: 1,
            last_write: Instant::now(),
        };
        let end = match self.serve(&mut session, generation, keepalive, max_frame) {
            Ok(()) => End::Shutdown,
            Err(end) => end,
        };
        // Tear down: the reader sees its socket shut and ends; frames it
        // still hands over are drained (so it never blocks on a full
        // channel) and dropped: nothing un-ACKed is lost, the server
        // redelivers it.
        if let Some(w) = self.shared.writer().take() {
            let _ = w.stream.shutdown(Shutdown::Both);
        }
        if let Ok(reader) = reader {
            while !reader.is_finished() {
                let _ = self.frames_rx.recv_timeout(Duration::from_millis(10));
            }
            let _ = reader.join();
        }
        while self.frames_rx.try_recv().is_ok() {}
        end
    }

    fn spawn_reader(
        &self,
        mut client: Client,
        generation: u64,
        idle: Duration,
    ) -> io::Result<JoinHandle<()>> {
        let tx = self.frames_tx.clone();
        thread::Builder::new()
            .name("tern-sdk-read".into())
            .spawn(move || loop {
                let input = match client.recv_timeout(idle) {
                    Ok(Some(event)) => Input::Frame(event),
                    Ok(None) => Input::Closed(ClientError::Timeout),
                    Err(e) => Input::Closed(e),
                };
                let closed = matches!(input, Input::Closed(_));
                if tx.send((generation, input)).is_err() || closed {
                    return;
                }
            })
    }

    /// The loop of one connection. `Ok` means shutdown.
    fn serve(
        &mut self,
        s: &mut Session,
        generation: u64,
        keepalive: Duration,
        max_frame: u32,
    ) -> Result<(), End> {
        let ping_every = keepalive / 3;
        loop {
            let now = Instant::now();
            if s.paused_until.is_some_and(|t| now >= t) {
                s.paused_until = None;
                s.outbox_more = true;
            }
            if s.paused_until.is_none() && s.outbox_more {
                self.fill(s, max_frame)?;
            }
            if s.reads_more {
                self.send_reads(s)?;
            }
            if s.last_write.elapsed() >= ping_every {
                self.push(s, &Frame::Ping(wire::Ping { time: None }))?;
            }
            let pending = self.flush()?;
            let mut timeout = (s.last_write + ping_every).saturating_duration_since(Instant::now());
            if let Some(t) = s.paused_until {
                timeout = timeout.min(t.saturating_duration_since(Instant::now()));
            }
            if pending {
                // Output is waiting for the socket: come back soon to write
                // more, while still taking frames (see the module doc).
                timeout = timeout.min(WRITE_SLICE);
            }
            select! {
                recv(self.ctl) -> ctl => match ctl {
                    Ok(Ctl::Wake) | Ok(Ctl::Reconnect) => {
                        s.outbox_more = true;
                        s.reads_more = true;
                    }
                    Ok(Ctl::Ready(lid)) => {
                        s.cursor = s.cursor.min(lid - 1);
                        s.outbox_more = true;
                    }
                    Ok(Ctl::Shutdown) | Err(_) => {
                        let _ = self.push(s, &Frame::Bye);
                        let _ = self.flush();
                        return Ok(());
                    }
                },
                recv(self.frames_rx) -> input => {
                    let Ok(first) = input else { return Err(End::Retry("reader gone".into())) };
                    self.take_frames(s, generation, first)?;
                }
                default(timeout) => {}
            }
        }
    }

    /// Handles `first` and every frame already waiting (up to [`BATCH`]):
    /// one store transaction, then one ACK.
    fn take_frames(
        &mut self,
        s: &mut Session,
        generation: u64,
        first: (u64, Input),
    ) -> Result<(), End> {
        let mut batch = Vec::new();
        let mut closed = None;
        let mut next = Some(first);
        while let Some((g, input)) = next.take() {
            if g == generation {
                match input {
                    Input::Frame(f) => batch.push(f),
                    Input::Closed(e) => {
                        closed = Some(e);
                        break;
                    }
                }
            }
            if batch.len() < BATCH {
                next = self.frames_rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            self.commit_batch(s, batch)?;
        }
        match closed {
            Some(e) => Err(End::from_client(&e)),
            None => Ok(()),
        }
    }

    /// The durability point of the inbox: commit, then ACK, then tell the app.
    fn commit_batch(&mut self, s: &mut Session, batch: Vec<WireEvent>) -> Result<(), End> {
        let shared = Arc::clone(&self.shared);
        let applied = shared
            .store
            .apply(batch, &shared.config.ephemeral_types)
            .map_err(|e| End::Retry(format!("store: {e}")))?;
        if !applied.acks.is_empty() {
            self.push(
                s,
                &Frame::Ack(wire::Ack {
                    seqs: wire::Seqs::List(&applied.acks),
                }),
            )?;
        }
        for id in &applied.answered {
            s.inflight.remove(id);
        }
        if applied.overloaded.is_empty() {
            if !applied.answered.is_empty() {
                s.overload.reset();
                s.outbox_more = true;
            }
        } else {
            // Back off, then resend the outbox from its oldest message
            // (what the server already took is answered as a duplicate).
            let delay = s.overload.next_delay();
            tracing::debug!(?delay, "OVERLOADED; backing off");
            s.paused_until = Some(Instant::now() + delay);
            s.cursor = 0;
            s.inflight.clear();
        }
        for token in applied.pongs.into_iter().flatten() {
            if let Some(lids) = s.confirms.remove(&token) {
                for lid in &lids {
                    s.reads_written.remove(lid);
                }
                shared
                    .store
                    .clear_reads(&lids)
                    .map_err(|e| End::Retry(format!("store: {e}")))?;
            }
        }
        for event in applied.events {
            shared.emitter.emit(event);
        }
        Ok(())
    }

    /// Writes outbox messages until the window or the output buffer is full.
    fn fill(&mut self, s: &mut Session, max_frame: u32) -> Result<(), End> {
        let window = self.shared.config.window;
        let room = window.saturating_sub(s.inflight.len());
        if room == 0 || self.pending() > OUT_HIGH_WATER {
            return Ok(());
        }
        let store = Arc::clone(&self.shared.store);
        // Room for the rows written and not yet answered that a rewound
        // cursor meets again (`Ctl::Ready`), skipped below.
        let limit = room + s.inflight.len();
        let rows = store
            .outbox_after(s.cursor, limit)
            .map_err(|e| End::Retry(format!("store: {e}")))?;
        s.outbox_more = rows.len() == limit;
        let max_payload = max_frame.saturating_sub(wire::MAX_ENVELOPE) as usize;
        let mut sent = 0;
        for m in rows {
            if sent == room {
                s.outbox_more = true;
                break;
            }
            s.cursor = m.lid;
            if s.inflight.contains_key(&m.id) {
                // Written and not yet answered (the cursor went back for an
                // upload that finished: `Ctl::Ready`).
                continue;
            }
            if m.payload.len() > max_payload {
                // It can never fit a frame: the server would close the
                // connection on it, again and again.
                let event = store
                    .fail(m.lid, Status::Failed(StatusCode::TOO_LARGE))
                    .map_err(|e| End::Retry(format!("store: {e}")))?;
                if let Some(e) = event {
                    self.shared.emitter.emit(e);
                }
                continue;
            }
            self.push(s, &Frame::Send(send_frame(&m)))?;
            s.inflight.insert(m.id, m.lid);
            sent += 1;
        }
        Ok(())
    }

    /// Writes owed READ receipts, then a PING whose PONG confirms them.
    fn send_reads(&mut self, s: &mut Session) -> Result<(), End> {
        let owed = self
            .shared
            .store
            .owed_reads(READS_PER_ROUND + s.reads_written.len())
            .map_err(|e| End::Retry(format!("store: {e}")))?;
        s.reads_more = owed.len() == READS_PER_ROUND + s.reads_written.len();
        let mut lids = Vec::new();
        for r in owed {
            if s.reads_written.contains(&r.lid) {
                continue;
            }
            self.push(
                s,
                &Frame::Read(wire::Read {
                    from: Some(&r.from),
                    id: Some(r.id),
                    group: r.group.as_deref(),
                }),
            )?;
            s.reads_written.insert(r.lid);
            lids.push(r.lid);
        }
        if !lids.is_empty() {
            let token = s.token;
            s.token += 1;
            self.push(s, &Frame::Ping(wire::Ping { time: Some(token) }))?;
            s.confirms.insert(token, lids);
        }
        Ok(())
    }

    fn push(&self, s: &mut Session, frame: &Frame<'_>) -> Result<(), End> {
        let mut w = self.shared.writer();
        let w = w
            .as_mut()
            .ok_or_else(|| End::Retry("not connected".into()))?;
        w.push(frame).map_err(|e| End::Retry(e.to_string()))?;
        s.last_write = Instant::now();
        Ok(())
    }

    fn pending(&self) -> usize {
        self.shared.writer().as_ref().map_or(0, Writer::pending)
    }

    /// Writes what the socket takes; whether output is still waiting.
    fn flush(&self) -> Result<bool, End> {
        let mut w = self.shared.writer();
        let w = w
            .as_mut()
            .ok_or_else(|| End::Retry("not connected".into()))?;
        w.flush().map_err(|e| End::Retry(e.to_string()))?;
        if w.pending() > 0 && w.progress.elapsed() > self.shared.config.connect_timeout * 3 {
            return Err(End::Retry("the server takes no output".into()));
        }
        Ok(w.pending() > 0)
    }
}

/// The SEND frame of a stored outgoing message.
fn send_frame(m: &Message) -> wire::Send<'_> {
    let (to, group) = match &m.peer {
        Peer::User(u) => (Some(u.as_str()), None),
        Peer::Group(g) => (None, Some(g.as_str())),
    };
    wire::Send {
        id: Some(m.id),
        to,
        group,
        expiry: m.expiry,
        msg_type: Some(m.msg_type),
        priority: Some(m.priority),
        flags: Some(m.flags),
        payload: Some(&m.payload),
    }
}
