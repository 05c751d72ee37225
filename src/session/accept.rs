//! Accepting a SEND: the rules of protocol §2–3 for one message, shared by
//! the protocol session and the HTTP API's backend send (admin is just another
//! client). Checks the SEND, resolves its destination (a user, or a group's
//! members with `recv` at the time of sending, less the sender), then either
//! hands a real-time message to connected recipients' live rings or queues a
//! request at the commit thread, which answers through [`ReplyTo`] once the
//! message is durable. Everything it reaches goes through [`Env`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Env;
use crate::commit::{Accept, GroupSendRequest, ReplyTo, Request, SendRequest};
use crate::directory::{Group, User};
use crate::store::keys::PRIORITIES;
use crate::store::record::encode_msg;
use crate::store::{Item, MsgView};
use crate::wire::{self, flags, StatusCode};

/// Where a SEND went: a user or a group (echoed in its STATUS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest<'a> {
    /// A user's address.
    To(&'a str),
    /// A group's name.
    Group(&'a str),
}

/// Who a SEND reaches.
enum Recipients {
    /// One user.
    One(Arc<User>),
    /// A group; its members with `recv`, less the sender, get it
    /// ([`GroupSendRequest::recipients`]).
    Group(Arc<Group>),
}

/// What became of a SEND right away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered now (an error, OFFLINE, or SENT for a real-time message).
    Now(StatusCode),
    /// At the commit thread; the answer goes to the `ReplyTo` after commit.
    Queued,
}

/// Applies the SEND rules to `send` from `sender` at time `now` (read at
/// `read_us` on the monotonic clock, 0 if not timed). With `limit_reach`,
/// a real-time group send draws on the sender's reach budget
/// ([`User::realtime_reach`]; the HTTP API's sends, one per request, are
/// not counted).
pub fn send<'s>(
    env: &dyn Env,
    sender: &Arc<User>,
    send: &wire::Send<'s>,
    now: u64,
    read_us: u64,
    reply: ReplyTo,
    limit_reach: bool,
) -> (Dest<'s>, Outcome) {
    let id = send.id.unwrap_or(0);
    let dest = match (send.to, send.group) {
        (Some(to), None) => Dest::To(to),
        (None, Some(group)) => Dest::Group(group),
        (to, group) => {
            let echo = to.map(Dest::To).or(group.map(Dest::Group));
            return (
                echo.unwrap_or(Dest::To("")),
                Outcome::Now(StatusCode::BAD_REQUEST),
            );
        }
    };
    let priority = send.priority.unwrap_or(0);
    if usize::from(priority) >= PRIORITIES {
        return (dest, Outcome::Now(StatusCode::BAD_REQUEST));
    }
    let payload = send.payload.unwrap_or(&[]);
    let config = env.config();
    let dir = env.directory();
    if payload.len() > config.max_payload as usize {
        return (dest, Outcome::Now(StatusCode::TOO_LARGE));
    }
    let expiry = send
        .expiry
        .unwrap_or(config.default_expiry)
        .min(config.max_expiry);
    let msg_flags = send.flags.unwrap_or(flags::SEND_DEFAULT) & !flags::REDELIVERY;
    let mut msg = MsgView {
        time: now,
        expire_at: 0,
        id,
        msg_type: send.msg_type.unwrap_or(0),
        flags: msg_flags,
        from: &sender.address,
        group: None,
        payload,
    };
    let recipients = match dest {
        Dest::To(to) => match dir.user(to) {
            Some(user) => Recipients::One(user),
            None => {
                return (dest, Outcome::Now(StatusCode::INVALID_DEST));
            }
        },
        Dest::Group(name) => {
            let Some(group) = dir.group(name) else {
                return (dest, Outcome::Now(StatusCode::INVALID_DEST));
            };
            if !group.member(&sender.address).is_some_and(|m| m.send) {
                return (dest, Outcome::Now(StatusCode::NOT_MEMBER));
            }
            msg.group = Some(name);
            Recipients::Group(group)
        }
    };
    if expiry == 0 {
        // Real time: memory only, now or never, to whoever is connected.
        if let Recipients::Group(group) = &recipients {
            if limit_reach && !sender.realtime_reach(group.members.len() as u64, now) {
                return (dest, Outcome::Now(StatusCode::OVERLOADED));
            }
        }
        let record = encode_msg(&msg);
        let (mut online, mut full) = (0, 0);
        let (one, group) = match &recipients {
            Recipients::One(user) => (Some(user), None),
            Recipients::Group(group) => (None, Some(group)),
        };
        let members = group.into_iter().flat_map(|g| g.recipients(sender));
        for recipient in one.into_iter().chain(members) {
            let Some(mb) = recipient.mailbox() else {
                continue;
            };
            let item = Arc::new(Item {
                seq: recipient.next_seq(),
                priority,
                ephemeral: true,
                record: record.clone(),
                born_us: 0,
                pushed_us: Default::default(),
                group_ref: None,
                settle_hint: Default::default(),
            });
            if mb.push_live(item) {
                mb.wake();
                online += 1;
            } else {
                full += 1;
            }
        }
        let status = if online > 0 {
            env.metrics().accepted.fetch_add(1, Ordering::Relaxed);
            StatusCode::SENT
        } else if full > 0 {
            StatusCode::OVERLOADED
        } else {
            StatusCode::OFFLINE
        };
        return (dest, Outcome::Now(status));
    }
    msg.expire_at = now + u64::from(expiry) * 1000;
    let dedup_until = now + u64::from(config.dedup_window.max(expiry)) * 1000;
    if let Recipients::One(recipient) = &recipients {
        if recipient.queued.load(Ordering::Relaxed) >= config.max_queue {
            return (dest, Outcome::Now(StatusCode::OVERLOADED));
        }
    }
    let accept = Accept {
        conn: reply,
        sender: sender.clone(),
        id,
        priority,
        flags: msg_flags,
        time: now,
        expire_at: msg.expire_at,
        dedup_until,
        record: encode_msg(&msg),
        read_us,
    };
    let req = match recipients {
        Recipients::One(recipient) => Request::Send(SendRequest { accept, recipient }),
        Recipients::Group(group) => Request::GroupSend(GroupSendRequest { accept, group }),
    };
    match env.submit(req) {
        Ok(()) => (dest, Outcome::Queued),
        Err(_) => (dest, Outcome::Now(StatusCode::OVERLOADED)),
    }
}
