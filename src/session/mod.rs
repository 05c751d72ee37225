//! The per-connection protocol state machine, sans I/O: the event loop hands
//! it decoded frames, notices and the time; it appends the frames to send to
//! an output buffer and says when it next needs to be called
//! ([`Session::poll_timeout`]). It owns no socket, reads no clock and never
//! blocks. Everything else it needs — token look-ups, inbox scans, the commit
//! queue, the directory, counters — comes through the [`Env`] port, which
//! `net` implements over RocksDB and the commit thread, and the unit tests
//! implement in memory.
//!
//! - [`accept`]: the SEND rules (shared with the HTTP API's backend send).
//! - `deliver`: merging the mailbox with inbox scans; writing deliveries.
//! - `receipts`: ACK and READ.
//!
//! # Delivery: merging the mailbox with the store
//!
//! A connected user's stored items reach the session two ways: pushed by the
//! commit thread into the mailbox right after they are written, or read from
//! the store. The session keeps, per priority, a cursor: the highest SEQ it
//! has taken. The commit thread assigns a user's stored SEQs in commit order
//! and pushes them in that order, so:
//!
//! - **Catch-up** (after login, or after the mailbox overflowed): scan the
//!   store past the cursors. Items found in the mailbox meanwhile are dropped:
//!   the store has them. When a scan comes back short, every item committed
//!   before it began has been taken, and every later one is in the mailbox
//!   (the mailbox is published before the first scan): switch to live.
//! - **Live**: take items from the mailbox; one at or below its priority's
//!   cursor was already taken by a scan and is skipped. If the mailbox
//!   overflowed, it holds a gap-free prefix; drop the rest and catch up.
//!
//! Taken items are staged in (priority, SEQ) order and written while the
//! connection's output is under `conn_buffer` and the user has fewer than
//! `max_inflight` un-ACKed items.

pub mod accept;
mod deliver;
mod receipts;

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use foldhash::{HashMap, HashSet};

pub use accept::{Dest, Outcome};

use crate::admission::Logins;
use crate::commit::{Full, Request};
use crate::config::Config;
use crate::directory::{Directory, User};
use crate::mailbox::{Answer, ConnRef, Mailbox, Notify};
use crate::metrics::{Metrics, Stage};
use crate::store::keys::PRIORITIES;
use crate::store::{Item, StoreError};
use crate::wire::{self, ErrorCode, Frame, StatusCode};

/// SENDs of one connection waiting for the commit thread before the
/// connection stops being read.
pub const MAX_PENDING_SENDS: usize = 4096;
/// Items staged for writing at most.
const STAGE_MAX: usize = 512;
/// Longest CLIENT and REASON strings.
const MAX_TEXT: usize = 1024;
/// How soon ACKs refused by a full commit queue are offered again, ms.
const RETRY_MS: u64 = 10;

/// The port through which a session reaches the rest of the server.
pub trait Env {
    /// The validated configuration.
    fn config(&self) -> &Config;
    /// Users and groups.
    fn directory(&self) -> &Directory;
    /// Counters.
    fn metrics(&self) -> &Metrics;
    /// How mailboxes wake their event loops.
    fn notify(&self) -> &Arc<dyn Notify>;
    /// Failed logins per client address (the back-off).
    fn logins(&self) -> &Logins;
    /// The user a token authenticates (a store read).
    fn authenticate(&self, token: &str, now: u64) -> Result<Option<Arc<User>>, StoreError>;
    /// Up to `budget` stored items of `user` past `cursors`, in (priority,
    /// SEQ) order, and whether the scan reached the end (a store read).
    fn scan_inbox(
        &self,
        user: &str,
        cursors: &[u64; PRIORITIES],
        budget: usize,
    ) -> Result<(Vec<Arc<Item>>, bool), StoreError>;
    /// Queues a request at the commit thread without blocking; a full queue
    /// gives the request back.
    fn submit(&self, req: Request) -> Result<(), Full>;
}

/// What the event loop should do after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep the connection.
    Continue,
    /// Flush what was written, then close.
    Close,
}

/// What a session call may touch: the environment, the connection's output
/// buffer, the time, and its own name (for its mailbox and SEND answers).
pub struct Ctx<'a> {
    /// The rest of the server.
    pub env: &'a dyn Env,
    /// Encoded frames to write to the peer are appended here.
    pub out: &'a mut Vec<u8>,
    /// The time of this call, ms since the epoch.
    pub now: u64,
    /// The same instant on the monotonic clock, µs (`clock::mono_us`; 0 in
    /// tests): for the stage histograms only.
    pub now_us: u64,
    /// This connection.
    pub me: ConnRef,
}

impl Ctx<'_> {
    fn write(&mut self, frame: &Frame<'_>) {
        // Frames built here are bounded by max_frame; encoding cannot fail.
        match wire::encode(frame, self.out) {
            Ok(_) => {
                let m = self.env.metrics();
                m.frames_out
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "frame could not be encoded"),
        }
    }

    fn status(&mut self, id: u64, dest: Dest<'_>, status: StatusCode) {
        if id == 0 {
            return; // fire-and-forget: no statuses at all
        }
        let (to, group) = match dest {
            Dest::To(to) => (Some(to), None),
            Dest::Group(group) => (None, Some(group)),
        };
        self.write(&Frame::Status(wire::Status {
            id: Some(id),
            to,
            group,
            status: Some(status),
            time: Some(self.now),
            ..Default::default()
        }));
    }

    /// Writes ERROR `code` and asks for the connection to be closed.
    pub fn fatal(&mut self, code: ErrorCode, reason: &str) -> Flow {
        match code {
            ErrorCode::AUTH_FAILED
            | ErrorCode::UNSUPPORTED_VERSION
            | ErrorCode::NOT_AUTHENTICATED => {
                tracing::debug!(?code, reason, "login refused")
            }
            _ => tracing::debug!(?code, reason, "closing with error"),
        }
        self.write(&Frame::Error(wire::Error {
            code: Some(code),
            reason: Some(reason),
        }));
        Flow::Close
    }
}

/// A connection's protocol state.
pub struct Session {
    /// Authenticated state; `None` until a good HELLO.
    active: Option<Box<Active>>,
    /// When the last byte was read, ms.
    last_read: u64,
    /// HELLO must arrive before this, ms.
    hello_deadline: u64,
    /// Negotiated keepalive, seconds.
    keepalive: u32,
    /// SENDs at the commit thread, not yet answered.
    pending_sends: usize,
    /// The client's address, for the failed-login back-off (`None`: not
    /// known, e.g. a test).
    peer: Option<IpAddr>,
}

/// The state of an authenticated session (boxed: an idle unauthenticated
/// connection stays small).
struct Active {
    /// Who is logged in.
    user: Arc<User>,
    /// Where items for this connection arrive.
    mailbox: Arc<Mailbox>,
    /// Per priority, the highest stored SEQ taken so far.
    cursors: [u64; PRIORITIES],
    /// Whether the mailbox holds every stored item past the cursors.
    live: bool,
    /// Taken items not yet written, in delivery order: (priority, SEQ, and
    /// for the items without a SEQ, live statuses, the order they came in).
    staged: BTreeMap<(u8, u64, u64), Arc<Item>>,
    /// How many of `staged` are real-time items: at most `LIVE_CAPACITY`,
    /// so that a client that reads and does not ACK them leaves the rest in
    /// the mailbox's ring, whose senders are told OVERLOADED once it is full.
    staged_live: usize,
    /// The last number given to an item without a SEQ in `staged`.
    unsequenced: u64,
    /// Real-time items written and not yet ACKed (memory only, bounded).
    ephemeral: HashMap<u64, Arc<Item>>,
    /// (sender, ID) of real-time messages written with READ_RECEIPT, so a
    /// READ for one is answered live (bounded; forgotten on reconnect).
    ephemeral_reads: HashSet<(Arc<str>, u64)>,
    /// When the user's ACKs the commit queue refused (it was full) are
    /// offered again, ms (`User::take_unsent_acks`; 0 at login: at once).
    retry_at: u64,
    /// Stored items earlier connections wrote and got no ACK for, in
    /// (priority, SEQ) order, taken at login: written again first
    /// (`Active::pump`). At most `max_inflight`, the user's window.
    owed: VecDeque<Arc<Item>>,
    /// The SEQs of `owed`: their copies from the store or the mailbox are
    /// dropped (each one once: the cursors never stage an item twice), so
    /// none goes out a second time, even after its ACK.
    owed_seqs: HashSet<u64>,
}

impl Active {
    /// When the user's kept ACKs are offered again, ms: after this
    /// connection's retry time (a full commit queue) and the user's (a
    /// failed write, `User::ack_failed`). One rule for the timer and for
    /// the timeout, so that neither fires before the other would act.
    fn unsent_acks_at(&self) -> u64 {
        self.retry_at.max(self.user.ack_retry_at())
    }
}

impl Session {
    /// A fresh connection at time `now`.
    pub fn new(now: u64, config: &Config, peer: Option<IpAddr>) -> Session {
        Session {
            peer,
            active: None,
            last_read: now,
            hello_deadline: now + u64::from(config.hello_timeout) * 1000,
            keepalive: config.keepalive,
            pending_sends: 0,
        }
    }

    /// Whether HELLO has been accepted.
    pub fn is_authenticated(&self) -> bool {
        self.active.is_some()
    }

    /// Bytes arrived at `now`.
    pub fn on_read(&mut self, now: u64) {
        self.last_read = now;
    }

    /// Whether the event loop should read more from the socket.
    pub fn wants_read(&self, out_len: usize, conn_buffer: usize) -> bool {
        self.pending_sends < MAX_PENDING_SENDS && out_len < conn_buffer
    }

    /// When [`Session::handle_timeout`] must be called next, ms.
    pub fn poll_timeout(&self) -> u64 {
        match &self.active {
            None => self.hello_deadline,
            Some(a) => {
                let idle = self.last_read + u64::from(self.keepalive) * 1500;
                match a.user.has_unsent_acks() {
                    false => idle,
                    true => idle.min(a.unsent_acks_at()),
                }
            }
        }
    }

    /// Handles one decoded frame.
    pub fn handle_frame(&mut self, ctx: &mut Ctx<'_>, frame: Frame<'_>) -> Flow {
        let Some(active) = self.active.as_deref_mut() else {
            return match frame {
                Frame::Hello(hello) => self.hello(ctx, hello),
                _ => ctx.fatal(
                    ErrorCode::NOT_AUTHENTICATED,
                    "the first frame must be HELLO",
                ),
            };
        };
        match frame {
            Frame::Send(send) => {
                self.send(ctx, send);
                self.pump(ctx);
                Flow::Continue
            }
            Frame::Ack(ack) => {
                receipts::ack(ctx, active, ack.seqs.iter());
                self.pump(ctx);
                Flow::Continue
            }
            Frame::Read(read) => {
                if let (Some(from), Some(id)) = (read.from, read.id) {
                    receipts::read(ctx, active, from, id, read.group);
                }
                Flow::Continue
            }
            Frame::Ping(ping) => {
                ctx.write(&Frame::Pong(wire::Pong { time: ping.time }));
                Flow::Continue
            }
            Frame::Bye => Flow::Close,
            Frame::Hello(_) => ctx.fatal(ErrorCode::PROTOCOL_ERROR, "HELLO sent twice"),
            other => ctx.fatal(
                ErrorCode::PROTOCOL_ERROR,
                &format!("{:?} is a server-to-client frame", other.kind()),
            ),
        }
    }

    fn hello(&mut self, ctx: &mut Ctx<'_>, hello: wire::Hello<'_>) -> Flow {
        if hello.version != Some(wire::VERSION) {
            return ctx.fatal(
                ErrorCode::UNSUPPORTED_VERSION,
                "this server speaks version 1",
            );
        }
        if hello.client.is_some_and(|c| c.len() > MAX_TEXT) {
            return ctx.fatal(ErrorCode::PROTOCOL_ERROR, "CLIENT longer than 1024 bytes");
        }
        if let Some(Err(wait)) = self.peer.map(|ip| ctx.env.logins().check(ip, ctx.now)) {
            // Refused unchecked: a guess made now tells nothing.
            let reason = format!(
                "too many failed logins from this address: retry in {} s",
                wait.div_ceil(1000)
            );
            return ctx.fatal(ErrorCode::AUTH_FAILED, &reason);
        }
        let user = match hello.token.map(|t| ctx.env.authenticate(t, ctx.now)) {
            Some(Ok(Some(user))) => user,
            Some(Err(e)) => {
                tracing::error!(error = %e, "token look-up failed");
                return ctx.fatal(ErrorCode::AUTH_FAILED, "token could not be checked");
            }
            _ => {
                if let Some(ip) = self.peer {
                    ctx.env.logins().failed(ip, ctx.now);
                }
                return ctx.fatal(ErrorCode::AUTH_FAILED, "unknown, expired or revoked token");
            }
        };
        let max = ctx.env.config().keepalive;
        self.keepalive = match hello.keepalive {
            None | Some(0) => max,
            Some(k) => k.min(max),
        };
        let mailbox = Arc::new(Mailbox::new(ctx.me, ctx.env.notify().clone()));
        if let Some(old) = user.attached.swap(Some(mailbox.clone())) {
            old.close(ErrorCode::REPLACED);
            old.wake();
        }
        if user.deleted.load(Ordering::SeqCst) {
            // Deleted since the token was checked: the delete sets the flag
            // and then closes whatever session is attached (both SeqCst, as
            // this swap and load), so it saw this one or this sees the flag.
            user.attached.compare_and_swap(&Some(mailbox), None);
            return ctx.fatal(ErrorCode::AUTH_FAILED, "unknown, expired or revoked token");
        }
        // After the close: the old session writes nothing once it sees it,
        // under the same lock (`Active::pump`), so this is all it wrote.
        let mut owed: Vec<Arc<Item>> = {
            let inflight = user.inflight();
            inflight.values().filter_map(|e| e.item.clone()).collect()
        };
        owed.sort_unstable_by_key(|item| (item.priority, item.seq));
        let owed_seqs = owed.iter().map(|item| item.seq).collect();
        tracing::info!(user = %user.address, client = hello.client.unwrap_or(""), "logged in");
        ctx.write(&Frame::Welcome(wire::Welcome {
            version: Some(wire::VERSION),
            address: Some(&user.address),
            time: Some(ctx.now),
            max_frame: Some(ctx.env.config().max_frame),
            keepalive: Some(self.keepalive),
        }));
        self.active = Some(Box::new(Active {
            user,
            mailbox,
            cursors: [0; PRIORITIES],
            live: false,
            staged: BTreeMap::new(),
            staged_live: 0,
            unsequenced: 0,
            ephemeral: HashMap::default(),
            ephemeral_reads: HashSet::default(),
            retry_at: 0,
            owed: owed.into(),
            owed_seqs,
        }));
        self.pump(ctx);
        Flow::Continue
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, send: wire::Send<'_>) {
        let Some(active) = self.active.as_deref() else {
            return;
        };
        let reply = crate::commit::ReplyTo::Conn(ctx.me);
        let (dest, outcome) = accept::send(
            ctx.env,
            &active.user,
            &send,
            ctx.now,
            ctx.now_us,
            reply,
            true,
        );
        match outcome {
            Outcome::Now(status) => ctx.status(send.id.unwrap_or(0), dest, status),
            Outcome::Queued => self.pending_sends += 1,
        }
    }

    /// The commit thread answered a SEND of this connection.
    pub fn handle_answer(&mut self, ctx: &mut Ctx<'_>, answer: &Answer) {
        self.pending_sends = self.pending_sends.saturating_sub(1);
        if let Some(status) = answer.status {
            let dest = match answer.group {
                true => Dest::Group(&answer.to),
                false => Dest::To(&answer.to),
            };
            ctx.status(answer.id, dest, status);
        }
    }

    /// The mailbox was woken: close if asked to, else deliver.
    pub fn handle_mailbox(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        let Some(active) = self.active.as_deref() else {
            return Flow::Continue;
        };
        active.mailbox.clear_wake();
        if let Some(code) = active.mailbox.closed() {
            let reason = match code {
                ErrorCode::REPLACED => "logged in on another connection",
                _ => "closed by the server",
            };
            return ctx.fatal(code, reason);
        }
        self.pump(ctx);
        Flow::Continue
    }

    /// The time from [`Session::poll_timeout`] has come (or passed): the
    /// HELLO deadline, the keepalive, a retry of refused ACKs.
    pub fn handle_timeout(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        match self.active.as_deref_mut() {
            None if ctx.now >= self.hello_deadline => {
                ctx.fatal(ErrorCode::NOT_AUTHENTICATED, "no HELLO in time")
            }
            Some(_)
                if ctx.now.saturating_sub(self.last_read) >= u64::from(self.keepalive) * 1500 =>
            {
                ctx.fatal(
                    ErrorCode::IDLE_TIMEOUT,
                    "nothing received within 1.5 x KEEPALIVE",
                )
            }
            Some(active) => {
                if active.user.has_unsent_acks() && ctx.now >= active.unsent_acks_at() {
                    receipts::ack(ctx, active, std::iter::empty());
                    self.pump(ctx);
                }
                Flow::Continue
            }
            None => Flow::Continue,
        }
    }

    /// The connection is going away: leave the user's `attached` slot if it is
    /// still ours.
    pub fn on_close(&mut self) {
        if let Some(active) = self.active.take() {
            let ours = Some(active.mailbox.clone());
            active.user.attached.compare_and_swap(&ours, None);
            active.mailbox.close(ErrorCode::SHUTDOWN);
            tracing::info!(user = %active.user.address, "logged out");
        }
    }

    /// Writes as many deliveries as the output buffer and the window allow.
    pub fn pump(&mut self, ctx: &mut Ctx<'_>) {
        let Some(a) = self.active.as_deref_mut() else {
            return;
        };
        // A sample of this call's latencies, recorded under one lock each.
        let mut samples = deliver::Samples::default();
        a.pump(ctx, &mut samples);
        let m = ctx.env.metrics();
        m.record_deliveries(&samples.delivery);
        m.record_stage(Stage::Write, &samples.write);
        m.record_stage(Stage::Total, &samples.total);
    }
}

#[cfg(test)]
mod tests;
