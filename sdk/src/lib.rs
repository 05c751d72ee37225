//! # tern-sdk: tern's exactly-once promise, carried to the application
//!
//! The server keeps its guarantees as far as the wire. This crate keeps
//! them on the device: a local SQLite store, a durable outbox, an inbox
//! that stores before it ACKs, automatic reconnect, and attachments.
//!
//! ```no_run
//! use tern_sdk::{Config, Draft, Event, Peer, Tern};
//!
//! let config = Config::new("127.0.0.1:7700", "token-of-alice", "alice.db")
//!     .http("http://127.0.0.1:7780");
//! let (tern, events) = Tern::open(config)?;
//! // Committed to the outbox before any network I/O; returns at once,
//! // online or not. The SDK sends it, resends it across reconnects and
//! // restarts under the same id, and records SENT → DELIVERED → READ.
//! tern.send(Draft::text(Peer::user("bob"), "hello"))?;
//! for event in events {
//!     match event {
//!         Event::Received(m) => {
//!             println!("{}: {}", m.peer, m.text().unwrap_or("<binary>"));
//!             tern.mark_read(&m.peer)?; // READ locally; receipt queued
//!         }
//!         Event::Status { id, status, .. } => println!("{id:016x} is {status:?}"),
//!         Event::Connection(state) => println!("{state:?}"),
//!         _ => {}
//!     }
//! }
//! # Ok::<(), tern_sdk::Error>(())
//! ```
//!
//! ## Guarantees
//!
//! - **Outbox.** [`Tern::send`] commits the message with status OUTBOX and
//!   a fresh random 64-bit id before it returns; only then does the
//!   connection thread see it. It is sent in local order, and resent under
//!   the same id after a reconnect or an app restart until the server
//!   answers SENT or a final error (the server's duplicate detection makes
//!   resending safe). OVERLOADED is retried with backoff.
//! - **Inbox.** A MSG is committed to the store (unique on sender and id,
//!   and on SEQ) before its SEQ is ACKed. A crash before the commit means
//!   no ACK, so the server redelivers; a crash after the commit and before
//!   the ACK means a redelivery that inserts nothing. The app reads the
//!   store and gets one [`Event::Received`] per message, never two.
//! - **Statuses** from the server (stored STATUS frames) are committed
//!   before their ACK too, and only move forward.
//! - Real-time (EXPIRY 0) and fire-and-forget (id 0) messages never enter
//!   the outbox: [`Tern::send_live`], [`Tern::send_fire_and_forget`].
//!
//! ## API shape, and why
//!
//! A **blocking API, background threads, and a bounded event channel**
//! (crossbeam), like rumqttc's `Client` + `Connection` pair, and unlike
//! async-nats: every call the app makes is a short SQLite transaction
//! (microseconds to a disk flush), so there is nothing to `.await`, and the
//! SDK does not impose an async runtime on a GUI or CLI app. An async app
//! calls it from `spawn_blocking`, or reads [`Events::receiver`] from a
//! thread that forwards to its own channel. The store, not the event
//! channel, is the source of truth: when the app falls behind, events are
//! dropped and [`Event::Lagged`] says "re-read the store", so a slow app
//! never makes the SDK buffer without bound.
//!
//! Threads: `tern-sdk-conn` (connects, sends, stores, ACKs, reconnects),
//! `tern-sdk-read` (one per connection: reads frames), `tern-sdk-upload`
//! (attachment uploads). Downloads run on the caller's thread.
//!
//! ## Modules
//!
//! - [`store`]: the SQLite store, its schema and migrations; the only user
//!   of `rusqlite`. Usable alone (reading from another process, a CLI).
//! - `conn`: the connection thread: outbox, inbox, keepalive, reconnect.
//! - `attachment`: the payload convention, uploads, verified downloads;
//!   the only user of `ureq`.
//! - `event`, `config`, `types`, `error`, `backoff`: the vocabulary.
//!
//! docs/sdk.md in the repository is the guide: the store schema, the
//! status state diagram, the attachment convention and reconnect behaviour.

mod attachment;
mod backoff;
mod config;
mod conn;
mod error;
mod event;
pub mod store;
mod types;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use tern::wire::{self, Frame};

pub use attachment::{guess_mime, Attachment};
pub use config::Config;
pub use error::{Error, Result};
pub use event::{ConnectionState, Event, Events};
pub use store::Store;
pub use types::{
    Conversation, Direction, Draft, MemberStatus, Message, Page, Peer, Status, TYPE_ATTACHMENT,
    TYPE_TEXT,
};

use conn::{Ctl, Shared};

/// The SDK: a local store plus a connection that keeps it in step with the
/// server. Open one per user and store file (a second [`Tern::open`] of a
/// file already open fails with [`Error::InUse`]); share it by reference
/// (all methods take `&self`).
pub struct Tern {
    /// State shared with the SDK's threads.
    shared: Arc<Shared>,
    /// Commands to the connection thread.
    conn: Sender<Ctl>,
    /// Commands to the upload thread.
    uploads: Sender<Ctl>,
    /// The SDK's threads, joined by [`Tern::shutdown`] (or drop).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// `<db>.lock`, locked while this instance lives (after its threads
    /// end: fields drop after [`Drop::drop`]).
    _lock: std::fs::File,
}

impl Tern {
    /// Opens the store named by `config.db` (creating or migrating it),
    /// starts the connection and upload threads, and returns the SDK and
    /// its event stream. Returns at once: connecting happens in the
    /// background, and everything works offline.
    pub fn open(config: Config) -> Result<(Tern, Events)> {
        // Opened first: a path SQLite refuses leaves no lock file behind.
        let store = Arc::new(Store::open(&config.db)?);
        let lock = lock_store(&config.db)?;
        let (emitter, events) = event::Emitter::new(config.events_capacity);
        let (conn_tx, conn_rx) = crossbeam_channel::unbounded();
        let (up_tx, up_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            store,
            config,
            emitter,
            writer: Mutex::new(None),
            state: Mutex::new(ConnectionState::Connecting),
            stopping: Default::default(),
            verified: Default::default(),
            uploads: up_tx.clone(),
        });
        let in_thread = |source| Error::File {
            path: PathBuf::from("<thread>"),
            source,
        };
        let conn = conn::spawn(Arc::clone(&shared), conn_rx).map_err(in_thread)?;
        let tern = Tern {
            shared,
            conn: conn_tx,
            uploads: up_tx,
            threads: Mutex::new(vec![conn]),
            _lock: lock,
        };
        // If it cannot start, `tern` drops: `stop` joins the connection
        // thread before the lock is let go.
        let up = attachment::spawn_uploader(Arc::clone(&tern.shared), up_rx, tern.conn.clone())
            .map_err(in_thread)?;
        tern.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(up);
        Ok((tern, events))
    }

    /// The local store, for reading: conversations, pages of messages,
    /// unread counts, per-member statuses.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The configuration in effect.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The connection state last announced.
    pub fn state(&self) -> ConnectionState {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues `draft`: commits it with status OUTBOX and a fresh id, and
    /// returns the stored message at once (online or not). Progress comes
    /// as [`Event::Status`]. EXPIRY 0 is refused: real-time messages never
    /// enter the outbox ([`Tern::send_live`]).
    pub fn send(&self, draft: Draft) -> Result<Message> {
        validate(&draft)?;
        if draft.expiry == Some(0) {
            return Err(Error::Invalid(
                "EXPIRY 0 is real-time and never queued: use send_live".into(),
            ));
        }
        let m = self.shared.store.queue(&draft, Status::Outbox, None)?;
        let _ = self.conn.send(Ctl::Wake);
        Ok(m)
    }

    /// Sends `draft` now, if connected, without storing it anywhere:
    /// EXPIRY defaults to 0 (real-time: delivered only if the recipient is
    /// online; typing indicators, presence). Returns the random id; the
    /// server's answer (SENT, OFFLINE…) comes as [`Event::LiveStatus`].
    /// [`Error::Offline`] when not connected.
    pub fn send_live(&self, draft: &Draft) -> Result<u64> {
        validate(draft)?;
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        self.write_now(draft, id, Some(draft.expiry.unwrap_or(0)))?;
        Ok(id)
    }

    /// Sends `draft` with id 0 now, if connected: the server stores and
    /// forwards it per EXPIRY but answers nothing and does not deduplicate,
    /// so it is never queued or resent. [`Error::Offline`] when not
    /// connected.
    pub fn send_fire_and_forget(&self, draft: &Draft) -> Result<()> {
        validate(draft)?;
        self.write_now(draft, 0, draft.expiry)
    }

    fn write_now(&self, draft: &Draft, id: u64, expiry: Option<u32>) -> Result<()> {
        let (to, group) = match &draft.peer {
            Peer::User(u) => (Some(u.as_str()), None),
            Peer::Group(g) => (None, Some(g.as_str())),
        };
        let frame = Frame::Send(wire::Send {
            id: (id != 0).then_some(id),
            to,
            group,
            expiry,
            msg_type: Some(draft.msg_type),
            priority: Some(draft.priority),
            flags: Some(draft.flags),
            payload: Some(&draft.payload),
        });
        {
            let mut writer = self.shared.writer();
            writer.as_mut().ok_or(Error::Offline)?.push(&frame)?;
        }
        let _ = self.conn.send(Ctl::Wake);
        Ok(())
    }

    /// Sends a file: commits an attachment message (status UPLOADING, a
    /// fresh id) and returns it at once. The upload thread streams the file
    /// to the files API, then the message (TYPE 1, the JSON payload of
    /// [`Attachment`]) enters the outbox. Needs [`Config::http`]. The file
    /// must stay in place until the status leaves UPLOADING.
    pub fn send_file(&self, peer: Peer, path: &Path, caption: Option<&str>) -> Result<Message> {
        if self.shared.config.http.is_none() {
            return Err(Error::NoHttp);
        }
        let draft = Draft::new(peer, Vec::new()).msg_type(TYPE_ATTACHMENT);
        validate(&draft)?;
        let upload = attachment::prepare(path, caption)?;
        let m = self
            .shared
            .store
            .queue(&draft, Status::Uploading, Some(&upload))?;
        let _ = self.uploads.send(Ctl::Wake);
        Ok(m)
    }

    /// Downloads the attachment of `m` into the cache (or finds it there),
    /// verifies its sha256 and size, and returns its path. A mismatch is
    /// [`Error::Corrupt`] and keeps nothing. Blocks the calling thread.
    pub fn download(&self, m: &Message) -> Result<PathBuf> {
        attachment::download(&self.shared, m)
    }

    /// Marks the conversation with `peer` read: its incoming messages
    /// become READ and its unread count 0, in one transaction, and a READ
    /// receipt is owed for each message whose sender asked for one. The
    /// receipts are sent when online, and kept (across restarts) until the
    /// server has taken them. Returns how many messages were marked.
    pub fn mark_read(&self, peer: &Peer) -> Result<usize> {
        let n = self.shared.store.mark_read(peer)?;
        if n > 0 {
            let _ = self.conn.send(Ctl::Wake);
        }
        Ok(n)
    }

    /// Connects now: after [`ConnectionState::AuthFailed`] or
    /// [`ConnectionState::Replaced`] (which are not retried on their own;
    /// [`ConnectionState::WrongUser`] is final for this instance),
    /// or to cut a reconnect delay short.
    pub fn reconnect(&self) {
        let _ = self.conn.send(Ctl::Reconnect);
    }

    /// Stops: says BYE to the server, stops the threads and waits for them.
    /// An upload in progress is abandoned (it starts again at the next
    /// open). Everything committed stays in the store.
    pub fn shutdown(self) {
        self.stop();
    }

    fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.conn.send(Ctl::Shutdown);
        let _ = self.uploads.send(Ctl::Shutdown);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Locks `<db>.lock` for one instance. A second instance on the same store
/// would run a second connection as the same user (each pushing the other
/// out with REPLACED), send the same outbox, and race the first login's
/// claim of the store for its user. The name is the path as given: two
/// paths to one file (a link) get two locks. Where the file system has no
/// locks, the instance runs unlocked (a warning).
fn lock_store(db: &Path) -> Result<std::fs::File> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse(db.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => {
            // A file system without locks (ENOLCK on NFS without a lock
            // daemon, or none at all): run unlocked, as before locks.
            tracing::warn!(path = %path.display(), error = %e, "cannot lock the store: running without the lock");
            Ok(file)
        }
    }
}

/// The rules a SEND must follow that the SDK can check before queuing: a
/// valid address or group name, PRIORITY 0–15.
fn validate(draft: &Draft) -> Result<()> {
    if !wire::is_valid_address(draft.peer.name()) {
        return Err(Error::Invalid(format!(
            "{:?} is not a valid address or group name",
            draft.peer.name()
        )));
    }
    if draft.priority > 15 {
        return Err(Error::Invalid(format!(
            "priority {} is above 15",
            draft.priority
        )));
    }
    Ok(())
}
