//! The per-connection protocol state machine. It owns no socket and reads no
//! clock: the event loop hands it decoded frames, the time and notices, and it
//! appends the frames to send to the connection's output buffer (through
//! [`Ctx`]). It answers with a [`Flow`]: keep going, or flush and close.
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

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::core::{ConnRef, Core, Inflight, User, SEQ_BOOT_SHIFT};
use crate::mailbox::Mailbox;
pub use crate::router::Dest;
use crate::router::{self, Outcome};
use crate::store::commit::ReplyTo;
use crate::store::keys::PRIORITIES;
use crate::store::record::encode_status;
use crate::store::{Item, ItemView, Request, StatusView};
use crate::wire::{self, flags, ErrorCode, Frame, StatusCode};

/// SENDs of one connection waiting for the commit thread before the
/// connection stops being read.
pub const MAX_PENDING_SENDS: usize = 4096;
/// Items staged for writing at most.
const STAGE_MAX: usize = 512;
/// Longest CLIENT and REASON strings.
const MAX_TEXT: usize = 1024;

/// What the event loop should do after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep the connection.
    Continue,
    /// Flush what was written, then close.
    Close,
}

/// What a session call may touch: the shared core, the connection's output
/// buffer, the time, and its own name (for wake-ups and answers).
pub struct Ctx<'a> {
    pub core: &'a Core,
    pub out: &'a mut Vec<u8>,
    pub now: u64,
    pub me: ConnRef,
}

impl Ctx<'_> {
    fn write(&mut self, frame: &Frame<'_>) {
        // Frames built here are bounded by max_frame; encoding cannot fail.
        match wire::encode(frame, self.out) {
            Ok(_) => {
                let m = &self.core.metrics;
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

    fn fatal(&mut self, code: ErrorCode, reason: &str) -> Flow {
        match code {
            ErrorCode::AUTH_FAILED
            | ErrorCode::UNSUPPORTED_VERSION
            | ErrorCode::NOT_AUTHENTICATED => {
                tracing::info!(?code, reason, "login refused")
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
    /// Taken items not yet written, in delivery order.
    staged: BTreeMap<(u8, u64), Arc<Item>>,
    /// Real-time items written and not yet ACKed (memory only, bounded).
    ephemeral: HashMap<u64, Arc<Item>>,
    /// (sender, ID) of real-time messages written with READ_RECEIPT, so a
    /// READ for one is answered live (bounded; forgotten on reconnect).
    ephemeral_reads: HashSet<(Arc<str>, u64)>,
}

impl Session {
    /// A fresh connection at time `now`.
    pub fn new(now: u64, core: &Core) -> Session {
        Session {
            active: None,
            last_read: now,
            hello_deadline: now + u64::from(core.config.hello_timeout) * 1000,
            keepalive: core.config.keepalive,
            pending_sends: 0,
        }
    }

    /// The authenticated address, for logs.
    pub fn address(&self) -> Option<&str> {
        self.active.as_ref().map(|a| &*a.user.address)
    }

    /// Bytes arrived at `now`.
    pub fn on_read(&mut self, now: u64) {
        self.last_read = now;
    }

    /// Whether the event loop should read more from the socket.
    pub fn wants_read(&self, out_len: usize, conn_buffer: usize) -> bool {
        self.pending_sends < MAX_PENDING_SENDS && out_len < conn_buffer
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
                let flow = self.send(ctx, send);
                if flow == Flow::Continue {
                    self.pump(ctx);
                }
                flow
            }
            Frame::Ack(ack) => {
                ack_items(ctx, active, ack.seqs.iter());
                self.pump(ctx);
                Flow::Continue
            }
            Frame::Read(read) => {
                if let (Some(from), Some(id)) = (read.from, read.id) {
                    read_receipt(ctx, active, from, id, read.group);
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
        let user = match hello.token.map(|t| ctx.core.authenticate(t, ctx.now)) {
            Some(Ok(Some(user))) => user,
            Some(Err(e)) => {
                tracing::error!(error = %e, "token look-up failed");
                return ctx.fatal(ErrorCode::AUTH_FAILED, "token could not be checked");
            }
            _ => return ctx.fatal(ErrorCode::AUTH_FAILED, "unknown, expired or revoked token"),
        };
        let max = ctx.core.config.keepalive;
        self.keepalive = match hello.keepalive {
            None | Some(0) => max,
            Some(k) => k.min(max),
        };
        let mailbox = Arc::new(Mailbox::new(ctx.me));
        if let Some(old) = user.attached.swap(Some(mailbox.clone())) {
            old.close(ErrorCode::REPLACED);
            ctx.core.wake(&old);
        }
        tracing::info!(user = %user.address, client = hello.client.unwrap_or(""), "logged in");
        ctx.write(&Frame::Welcome(wire::Welcome {
            version: Some(wire::VERSION),
            address: Some(&user.address),
            time: Some(ctx.now),
            max_frame: Some(ctx.core.config.max_frame),
            keepalive: Some(self.keepalive),
        }));
        self.active = Some(Box::new(Active {
            user,
            mailbox,
            cursors: [0; PRIORITIES],
            live: false,
            staged: BTreeMap::new(),
            ephemeral: HashMap::new(),
            ephemeral_reads: HashSet::new(),
        }));
        self.pump(ctx);
        Flow::Continue
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, send: wire::Send<'_>) -> Flow {
        let Some(active) = self.active.as_deref() else {
            return Flow::Continue;
        };
        let reply = ReplyTo::Conn(ctx.me);
        let (dest, outcome) = router::send(ctx.core, &active.user, &send, ctx.now, reply);
        match outcome {
            Outcome::Now(status) => ctx.status(send.id.unwrap_or(0), dest, status),
            Outcome::Queued => self.pending_sends += 1,
        }
        Flow::Continue
    }

    /// The commit thread answered a SEND of this connection.
    pub fn on_send_done(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: u64,
        dest: Dest<'_>,
        status: Option<StatusCode>,
    ) {
        self.pending_sends = self.pending_sends.saturating_sub(1);
        if let Some(status) = status {
            ctx.status(id, dest, status);
        }
    }

    /// The mailbox was woken: close if asked to, else deliver.
    pub fn on_mailbox(&mut self, ctx: &mut Ctx<'_>) -> Flow {
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

    /// Periodic check of the HELLO deadline and the keepalive.
    pub fn on_tick(&mut self, ctx: &mut Ctx<'_>) -> Flow {
        match self.active {
            None if ctx.now >= self.hello_deadline => {
                ctx.fatal(ErrorCode::NOT_AUTHENTICATED, "no HELLO in time")
            }
            Some(_)
                if ctx.now.saturating_sub(self.last_read) > u64::from(self.keepalive) * 1500 =>
            {
                ctx.fatal(
                    ErrorCode::IDLE_TIMEOUT,
                    "nothing received within 1.5 x KEEPALIVE",
                )
            }
            _ => Flow::Continue,
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
        // A sample of this call's end-to-end latencies, recorded under one lock.
        let mut latencies = Vec::new();
        self.pump_into(ctx, &mut latencies);
        ctx.core.metrics.record_deliveries(&latencies);
    }

    fn pump_into(&mut self, ctx: &mut Ctx<'_>, latencies: &mut Vec<u64>) {
        let Some(a) = self.active.as_deref_mut() else {
            return;
        };
        let conn_buffer = ctx.core.config.conn_buffer;
        let window = ctx.core.config.max_inflight as usize;
        loop {
            if ctx.out.len() >= conn_buffer {
                return;
            }
            let more = a.take(ctx);
            let mut inflight = a.user.inflight();
            let mut wrote = false;
            while ctx.out.len() < conn_buffer {
                let Some(entry) = a.staged.first_entry() else {
                    break;
                };
                let item = entry.get().clone();
                if item.ephemeral {
                    if a.ephemeral.len() >= window.min(crate::mailbox::LIVE_CAPACITY) {
                        break;
                    }
                    entry.remove();
                    write_item(ctx, &item, false);
                    if let Some(ItemView::Msg(m)) = item.view() {
                        if m.id != 0 && m.flags & flags::READ_RECEIPT != 0 {
                            if a.ephemeral_reads.len() >= crate::mailbox::LIVE_CAPACITY {
                                a.ephemeral_reads.clear();
                            }
                            a.ephemeral_reads.insert((m.from.into(), m.id));
                        }
                    }
                    if item.seq != 0 {
                        a.ephemeral.insert(item.seq, item);
                    }
                    wrote = true;
                    continue;
                }
                if inflight.len() >= window {
                    break;
                }
                entry.remove();
                let Some(view) = item.view() else { continue };
                if view.expire_at() <= ctx.now {
                    continue; // the sweeper settles it
                }
                let written_before = match inflight.entry(item.seq) {
                    Entry::Occupied(_) => true,
                    Entry::Vacant(v) => {
                        v.insert(Inflight {
                            priority: item.priority,
                            acking: false,
                        });
                        false
                    }
                };
                let seen = written_before || item.seq >> SEQ_BOOT_SHIFT < ctx.core.boot;
                if let ItemView::Msg(m) = view {
                    if latencies.len() < 256 {
                        latencies.push(ctx.now.saturating_sub(m.time) * 1000);
                    }
                }
                write_item(ctx, &item, seen);
                wrote = true;
            }
            drop(inflight);
            if !wrote || !more && a.staged.is_empty() {
                return;
            }
        }
    }
}

impl Active {
    /// Moves items from the mailbox (and, when catching up, the store) into
    /// the staging area. Returns whether more may be available right away.
    fn take(&mut self, ctx: &mut Ctx<'_>) -> bool {
        while let Some(item) = self.mailbox.pop_live() {
            self.staged.insert((item.priority, item.seq), item);
        }
        if self.live && self.mailbox.overflowed() {
            self.live = false;
        }
        if !self.live {
            self.mailbox.reset_durable();
        }
        if self.live {
            while self.staged.len() < STAGE_MAX {
                let Some(item) = self.mailbox.pop_durable() else {
                    break;
                };
                let cursor = &mut self.cursors[usize::from(item.priority) % PRIORITIES];
                if item.seq > *cursor {
                    *cursor = item.seq;
                    self.staged.insert((item.priority, item.seq), item);
                }
            }
            return self.staged.len() >= STAGE_MAX;
        }
        let budget = STAGE_MAX.saturating_sub(self.staged.len());
        if budget == 0 {
            return true;
        }
        match ctx
            .core
            .store
            .scan_inbox(&self.user.address, &self.cursors, budget)
        {
            Ok((items, exhausted)) => {
                for item in items {
                    let cursor = &mut self.cursors[usize::from(item.priority) % PRIORITIES];
                    *cursor = (*cursor).max(item.seq);
                    self.staged.insert((item.priority, item.seq), item);
                }
                self.live = exhausted;
                !exhausted
            }
            Err(e) => {
                tracing::error!(user = %self.user.address, error = %e, "inbox scan failed");
                false
            }
        }
    }
}

/// Handles an ACK: stored items go to the commit thread; real-time ones are
/// settled here, with a live DELIVERED for a connected sender that asked.
fn ack_items(ctx: &mut Ctx<'_>, a: &mut Active, seqs: impl Iterator<Item = u64>) {
    let mut stored = Vec::new();
    {
        let mut inflight = a.user.inflight();
        for seq in seqs {
            if let Some(entry) = inflight.get_mut(&seq) {
                // A repeated ACK while the first is at the commit thread is
                // not sent again: a flood of ACKs costs no commit work.
                if !entry.acking {
                    entry.acking = true;
                    stored.push((seq, entry.priority));
                }
            } else if let Some(item) = a.ephemeral.remove(&seq) {
                if let Some(ItemView::Msg(m)) = item.view() {
                    if m.flags & flags::DELIVERY_RECEIPT != 0 {
                        live_receipt(ctx, &a.user, m.from, m.id, m.group, StatusCode::DELIVERED);
                    }
                }
            }
        }
    }
    if !stored.is_empty() {
        ctx.core.commit.submit(Request::Ack {
            user: a.user.clone(),
            items: stored,
        });
    }
}

/// Handles a READ: live for a real-time message delivered on this
/// connection, else through the commit thread (dropped if it is full: a READ
/// receipt is best effort, and the server never blocks a loop for one).
fn read_receipt(ctx: &mut Ctx<'_>, a: &mut Active, from: &str, id: u64, group: Option<&str>) {
    if a.ephemeral_reads.remove(&(Arc::from(from), id)) {
        live_receipt(ctx, &a.user, from, id, group, StatusCode::READ);
        return;
    }
    let req = Request::Read {
        reader: a.user.clone(),
        from: from.to_owned(),
        id,
        group: group.map(str::to_owned),
    };
    if ctx.core.commit.try_submit(req).is_err() {
        tracing::warn!(user = %a.user.address, "commit queue full: READ receipt dropped");
    }
}

/// Sends a memory-only STATUS (no SEQ) about message `id` (to `group`, if
/// set) to its sender, if the sender is connected.
fn live_receipt(
    ctx: &mut Ctx<'_>,
    recipient: &User,
    sender: &str,
    id: u64,
    group: Option<&str>,
    status: StatusCode,
) {
    if id == 0 {
        return;
    }
    let Some(sender) = ctx.core.user(sender) else {
        return;
    };
    let Some(mb) = sender.mailbox() else { return };
    let status = Arc::new(Item {
        seq: 0,
        priority: 0,
        ephemeral: true,
        record: encode_status(&StatusView {
            time: ctx.now,
            expire_at: 0,
            id,
            status,
            to: if group.is_some() {
                ""
            } else {
                &recipient.address
            },
            group,
            member: group.map(|_| &*recipient.address),
        }),
    });
    if mb.push_live(status) {
        ctx.core.wake(&mb);
    }
}

/// Encodes one delivery into the output buffer.
fn write_item(ctx: &mut Ctx<'_>, item: &Item, redelivery: bool) {
    let Some(view) = item.view() else {
        tracing::error!(seq = item.seq, "corrupt item not delivered");
        return;
    };
    let frame = match view {
        ItemView::Ref(_) => {
            // Scans and the commit thread resolve REFs to the shared MSG record.
            tracing::error!(seq = item.seq, "unresolved group item not delivered");
            return;
        }
        ItemView::Msg(m) => Frame::Msg(wire::Msg {
            seq: Some(item.seq),
            from: Some(m.from),
            group: m.group,
            id: Some(m.id),
            time: Some(m.time),
            msg_type: Some(m.msg_type),
            priority: Some(item.priority),
            flags: Some(if redelivery {
                m.flags | flags::REDELIVERY
            } else {
                m.flags
            }),
            payload: Some(m.payload),
        }),
        ItemView::Status(s) => Frame::Status(wire::Status {
            seq: (item.seq != 0).then_some(item.seq),
            id: Some(s.id),
            to: if s.group.is_some() { None } else { Some(s.to) },
            group: s.group,
            member: s.member,
            status: Some(s.status),
            time: Some(s.time),
        }),
    };
    ctx.write(&frame);
}
