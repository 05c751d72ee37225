//! Events for the app, and the bounded channel that carries them.
//!
//! The store is the source of truth; events say what changed in it. The
//! channel is bounded: an app that stops reading does not make the SDK
//! grow without limit. When it is full, events are dropped and the next one
//! the app gets is [`Event::Lagged`], which means "re-read the store".

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tern::wire::StatusCode;

use crate::types::{Message, Peer, Status};

/// The connection as the app sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting (TCP, then HELLO).
    Connecting,
    /// Logged in as `address`.
    Online {
        /// This user's address (from WELCOME).
        address: String,
    },
    /// Not connected; the SDK tries again in `retry_in`.
    Offline {
        /// Why the last attempt or connection ended.
        reason: String,
        /// When the next attempt starts.
        retry_in: Duration,
    },
    /// The server refused the token. The SDK does not retry until
    /// [`crate::Tern::reconnect`].
    AuthFailed,
    /// The same user logged in elsewhere (ERROR REPLACED). The SDK does not
    /// retry until [`crate::Tern::reconnect`], so that two devices do not
    /// take the connection from each other forever.
    Replaced,
    /// The token logged in as another user than the one whose messages
    /// this store holds: nothing is exchanged (their SEQs would collide,
    /// and that user's outbox would go out under this one's name), and no
    /// file is uploaded or downloaded. Final for this instance (its token
    /// cannot change; the login pushed the other user's own connection
    /// out, with REPLACED, once): open another database for that user.
    WrongUser {
        /// The user this store belongs to.
        stored: String,
        /// The user the token logged in as.
        token_for: String,
    },
    /// [`crate::Tern::shutdown`] was called.
    Stopped,
}

/// Something that changed. Every message event is sent only after the
/// change is committed to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The connection state changed.
    Connection(ConnectionState),
    /// A new incoming message was stored (never raised twice for one
    /// message, whatever is redelivered).
    Received(Message),
    /// An outgoing message's status moved forward; for a group send,
    /// `member` names the member whose status this is.
    Status {
        /// The message's local id.
        lid: i64,
        /// Its id.
        id: u64,
        /// Its conversation.
        peer: Peer,
        /// The group member concerned, for a per-member status.
        member: Option<String>,
        /// The new status.
        status: Status,
    },
    /// A message of an ephemeral TYPE ([`crate::Config::ephemeral_types`]):
    /// ACKed and not stored; lost if the channel is full.
    Live(Message),
    /// The server's answer to a [`crate::Tern::send_live`] with an id.
    LiveStatus {
        /// The id given to the live send.
        id: u64,
        /// SENT, OFFLINE, …
        status: StatusCode,
    },
    /// Upload progress of an attachment message.
    Upload {
        /// The message's local id.
        lid: i64,
        /// Bytes sent so far.
        sent: u64,
        /// The file's size.
        total: u64,
    },
    /// Events were dropped because the channel was full: re-read the store.
    Lagged,
}

/// The app's end of the event channel.
pub struct Events {
    /// Events in the order they happened.
    rx: Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the SDK has shut down.
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event before `deadline`.
    pub fn recv_deadline(&self, deadline: Instant) -> Option<Event> {
        self.rx.recv_deadline(deadline).ok()
    }

    /// An event if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// The underlying receiver, for `crossbeam_channel::select!`.
    pub fn receiver(&self) -> &Receiver<Event> {
        &self.rx
    }
}

impl Iterator for Events {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

/// The SDK's end: never blocks.
pub(crate) struct Emitter {
    /// Bounded sender.
    tx: Sender<Event>,
    /// Set when an event was dropped; cleared once [`Event::Lagged`] got in.
    lagged: AtomicBool,
}

impl Emitter {
    /// A channel of `capacity` events.
    pub fn new(capacity: usize) -> (Emitter, Events) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(2));
        let emitter = Emitter {
            tx,
            lagged: AtomicBool::new(false),
        };
        (emitter, Events { rx })
    }

    /// Offers `event` to the app; drops it (and owes a Lagged) if full.
    pub fn emit(&self, event: Event) {
        if self.lagged.load(Ordering::Acquire) {
            match self.tx.try_send(Event::Lagged) {
                Ok(()) => self.lagged.store(false, Ordering::Release),
                Err(TrySendError::Full(_)) => return,
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(event) {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_drops_and_then_says_lagged() {
        let (em, ev) = Emitter::new(2);
        for _ in 0..5 {
            em.emit(Event::Connection(ConnectionState::Connecting));
        }
        assert!(ev.try_recv().is_some());
        assert!(ev.try_recv().is_some());
        assert!(ev.try_recv().is_none());
        em.emit(Event::Connection(ConnectionState::Stopped));
        assert_eq!(ev.try_recv(), Some(Event::Lagged));
        assert_eq!(
            ev.try_recv(),
            Some(Event::Connection(ConnectionState::Stopped))
        );
    }
}
