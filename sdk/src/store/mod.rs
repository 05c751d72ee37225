//! The local store: one SQLite file (WAL, `synchronous = FULL`) that holds
//! every message either way, conversations, per-member statuses, pending
//! uploads and the SDK's own state.
//!
//! It is the only user of `rusqlite` and the durability point of the SDK:
//! - an outgoing message is committed with status OUTBOX (and a fresh id)
//!   before any byte of it reaches the network ([`Store::queue`]);
//! - a batch of deliveries and stored statuses is committed in one
//!   transaction ([`Store::apply`]) before the SEQs are ACKed. Incoming
//!   messages are unique on `(sender, id)` and on SEQ, so a redelivery
//!   inserts nothing and raises no event;
//! - statuses only move forward ([`Status::rank`]), so a repeated or late
//!   STATUS changes nothing.
//!
//! [`Store`] is usable on its own (no connection): an app, a CLI or a test
//! can open the same file to read it, from this or another process.

pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use tern::client::{Event as WireEvent, Message as WireMessage, StatusEvent};
use tern::wire::flags;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::types::{
    now_ms, Conversation, Direction, Draft, MemberStatus, Message, Page, Peer, Status,
};

/// The message columns, in the order [`message_row`] reads them.
const COLS: &str = "lid, dir, peer_kind, peer, sender, id, seq, type, priority, expiry, \
                    flags, time, payload, status, status_time";

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The local message store. Cheap to share (`Arc`); every call takes the
/// one connection's lock for the length of one statement or transaction,
/// never across network I/O.
pub struct Store {
    /// The SQLite connection. One connection, so writers never meet
    /// `SQLITE_BUSY` inside the process; other processes reading the file
    /// (a test, a CLI) wait through the busy timeout.
    conn: Mutex<Connection>,
    /// The file, for messages and for [`Store::path`].
    path: PathBuf,
}

/// An outgoing message waiting for its attachment upload.
#[derive(Clone, Debug)]
pub(crate) struct Upload {
    /// The message's local id.
    pub lid: i64,
    /// The file to upload.
    pub path: PathBuf,
    /// The file name to announce.
    pub name: String,
    /// The MIME type to announce.
    pub mime: String,
    /// Optional caption.
    pub caption: Option<String>,
}

/// What one committed batch of server frames produced.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Events for the app, in frame order; only for real changes.
    pub events: Vec<Event>,
    /// SEQs to ACK now that the batch is committed (stored MSGs and
    /// STATUSes, duplicates included: ACKs are idempotent).
    pub acks: Vec<u64>,
    /// Ids whose SEND the server answered OVERLOADED.
    pub overloaded: Vec<u64>,
    /// Ids whose SEND got its immediate answer (any code).
    pub answered: Vec<u64>,
    /// TIME fields of PONGs, in order.
    pub pongs: Vec<Option<u64>>,
}

/// A READ receipt that is owed: frame fields plus the row to clear.
#[derive(Clone, Debug)]
pub(crate) struct OwedRead {
    /// The message's local id.
    pub lid: i64,
    /// Its sender.
    pub from: String,
    /// Its id.
    pub id: u64,
    /// The group, for a group message.
    pub group: Option<String>,
}

impl Store {
    /// Opens (creating) the store at `path`: WAL mode, `synchronous = FULL`
    /// (a commit survives a power cut, not just a crash), foreign keys on,
    /// schema migrated to this SDK's version.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Invalid(format!(
                "{}: SQLite refused WAL mode ({mode})",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the file (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction open
        // (rusqlite rolls back on drop), so the connection is still sound.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    // -----------------------------------------------------------------
    // Reading
    // -----------------------------------------------------------------

    /// The message with local id `lid`.
    pub fn message(&self, lid: i64) -> Result<Option<Message>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {COLS} FROM messages WHERE lid = ?1"),
                [lid],
                message_row,
            )
            .optional()?)
    }

    /// The outgoing message with id `id`.
    pub fn outgoing(&self, id: u64) -> Result<Option<Message>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {COLS} FROM messages WHERE dir = 0 AND id = ?1"),
                [id as i64],
                message_row,
            )
            .optional()?)
    }

    /// A page of the conversation with `peer`, newest first.
    pub fn messages(&self, peer: &Peer, page: Page) -> Result<Vec<Message>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLS} FROM messages WHERE peer_kind = ?1 AND peer = ?2 AND lid < ?3 \
             ORDER BY lid DESC LIMIT ?4"
        ))?;
        let rows = stmt.query_map(
            params![
                peer.kind(),
                peer.name(),
                page.before.unwrap_or(i64::MAX),
                page.limit
            ],
            message_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every message of the conversation with `peer`, oldest first.
    pub fn all_messages(&self, peer: &Peer) -> Result<Vec<Message>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLS} FROM messages WHERE peer_kind = ?1 AND peer = ?2 ORDER BY lid"
        ))?;
        let rows = stmt.query_map(params![peer.kind(), peer.name()], message_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Conversations, the most recently active first, with their last
    /// message and unread count.
    pub fn conversations(&self) -> Result<Vec<Conversation>> {
        let conn = self.lock();
        let cols = COLS
            .split(", ")
            .map(|c| format!("m.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {cols}, c.unread FROM conversations c JOIN messages m ON m.lid = c.last_lid \
             ORDER BY c.last_lid DESC"
        ))?;
        let rows = stmt.query_map([], |r| {
            let last = message_row(r)?;
            Ok(Conversation {
                peer: last.peer.clone(),
                last,
                unread: r.get::<_, i64>(15)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The unread count of one conversation.
    pub fn unread(&self, peer: &Peer) -> Result<u64> {
        let conn = self.lock();
        let n: Option<i64> = conn
            .query_row(
                "SELECT unread FROM conversations WHERE peer_kind = ?1 AND peer = ?2",
                params![peer.kind(), peer.name()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// Per-member statuses of a group message this user sent.
    pub fn member_statuses(&self, lid: i64) -> Result<Vec<MemberStatus>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT member, status, time FROM member_status WHERE lid = ?1 ORDER BY member",
        )?;
        let rows = stmt.query_map([lid], |r| {
            Ok(MemberStatus {
                member: r.get(0)?,
                status: Status::from_code(r.get(1)?),
                time: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Outgoing messages not yet accepted by the server (OUTBOX, or
    /// waiting for their upload), oldest first.
    pub fn outbox(&self) -> Result<Vec<Message>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLS} FROM messages WHERE dir = 0 AND status IN (0, 17) ORDER BY lid"
        ))?;
        let rows = stmt.query_map([], message_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many messages go `direction`, with `status` if given.
    pub fn count(&self, direction: Direction, status: Option<Status>) -> Result<u64> {
        let conn = self.lock();
        let dir = direction_code(direction);
        let n: i64 = match status {
            Some(s) => conn.query_row(
                "SELECT count(*) FROM messages WHERE dir = ?1 AND status = ?2",
                params![dir, s.code()],
                |r| r.get(0),
            )?,
            None => conn.query_row("SELECT count(*) FROM messages WHERE dir = ?1", [dir], |r| {
                r.get(0)
            })?,
        };
        Ok(n as u64)
    }

    /// This user's address, as the server last announced it (WELCOME);
    /// `None` before the first login.
    pub fn address(&self) -> Result<Option<String>> {
        self.state("address")
    }

    fn state(&self, key: &str) -> Result<Option<String>> {
        let conn = self.lock();
        Ok(conn
            .query_row("SELECT value FROM state WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub(crate) fn set_state(&self, key: &str, value: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO state(key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )?;
            Ok(())
        })
    }

    // -----------------------------------------------------------------
    // Outgoing
    // -----------------------------------------------------------------

    /// Commits `draft` as an outgoing message with a fresh random id and
    /// `status` (OUTBOX, or UPLOADING with `upload`'s row), and returns it.
    pub(crate) fn queue(
        &self,
        draft: &Draft,
        status: Status,
        upload: Option<&Upload>,
    ) -> Result<Message> {
        let now = now_ms();
        self.write(|tx| {
            // A random 64-bit id; a collision with an earlier one (about
            // 2^-64 a message) violates the unique index: draw again.
            let mut attempt = 0;
            let lid = loop {
                let id = loop {
                    let id: u64 = rand::random();
                    if id != 0 {
                        break id;
                    }
                };
                let inserted = tx.execute(
                    "INSERT OR IGNORE INTO messages(dir, peer_kind, peer, sender, id, seq, type, \
                     priority, expiry, flags, time, payload, status, status_time) \
                     VALUES (0, ?1, ?2, NULL, ?3, NULL, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?8)",
                    params![
                        draft.peer.kind(),
                        draft.peer.name(),
                        id as i64,
                        draft.msg_type,
                        draft.priority,
                        draft.expiry,
                        draft.flags,
                        now as i64,
                        draft.payload,
                        status.code(),
                    ],
                )?;
                if inserted == 1 {
                    break tx.last_insert_rowid();
                }
                attempt += 1;
                if attempt > 8 {
                    return Err(Error::Invalid("could not draw a fresh message id".into()));
                }
            };
            if let Some(u) = upload {
                tx.execute(
                    "INSERT INTO uploads(lid, path, name, mime, caption) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![lid, u.path.to_string_lossy(), u.name, u.mime, u.caption],
                )?;
            }
            touch_conversation(tx, &draft.peer, lid, now, 0)?;
            Ok(tx.query_row(
                &format!("SELECT {COLS} FROM messages WHERE lid = ?1"),
                [lid],
                message_row,
            )?)
        })
    }

    /// Up to `limit` OUTBOX messages after local id `cursor`, oldest first:
    /// what the connection sends next.
    pub(crate) fn outbox_after(&self, cursor: i64, limit: usize) -> Result<Vec<Message>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            // `status IN (0, 17)` matches the partial index `messages_outbox`
            // (SQLite uses it only for the very terms it was made with):
            // without it, a scan of the whole history after the cursor.
            "SELECT {COLS} FROM messages WHERE dir = 0 AND status IN (0, 17) AND status = 0 \
             AND lid > ?1 \
             ORDER BY lid LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![cursor, limit as i64], message_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Sets a final local status (e.g. TOO_LARGE for a payload that cannot
    /// fit a frame); returns the event if the status changed.
    pub(crate) fn fail(&self, lid: i64, status: Status) -> Result<Option<Event>> {
        self.write(|tx| set_status(tx, lid, status, now_ms()))
    }

    // -----------------------------------------------------------------
    // Incoming: one transaction per batch, committed before the ACK
    // -----------------------------------------------------------------

    /// Commits what a batch of server frames says, in one transaction:
    /// new MSGs (a redelivery is ignored by the unique indexes), statuses
    /// (forward only, per member for groups). `ephemeral` TYPEs are not
    /// stored: they become [`Event::Live`]. Returns the events and the SEQs
    /// that may be ACKed now.
    pub(crate) fn apply(&self, batch: Vec<WireEvent>, ephemeral: &[u32]) -> Result<Applied> {
        let mut out = Applied::default();
        self.write(|tx| {
            for event in batch {
                match event {
                    WireEvent::Msg(m) => {
                        out.acks.push(m.seq);
                        if ephemeral.contains(&m.msg_type) {
                            // In the frames' order (emitted, like the rest,
                            // once the batch is committed).
                            let live = incoming_message(0, m, Status::Received);
                            out.events.push(Event::Live(live));
                        } else if let Some(e) = insert_incoming(tx, m)? {
                            out.events.push(e);
                        }
                    }
                    WireEvent::Status(s) => {
                        if let Some(seq) = s.seq {
                            out.acks.push(seq);
                        } else {
                            out.answered.push(s.id);
                            if s.status == tern::wire::StatusCode::OVERLOADED {
                                out.overloaded.push(s.id);
                            }
                        }
                        match apply_status(tx, &s)? {
                            Some(e) => out.events.push(e),
                            None if s.seq.is_none() && !is_stored_answer(tx, s.id)? => {
                                // The answer to a send_live (never stored).
                                out.events.push(Event::LiveStatus {
                                    id: s.id,
                                    status: s.status,
                                })
                            }
                            None => {}
                        }
                    }
                    WireEvent::Pong(t) => out.pongs.push(t),
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    // -----------------------------------------------------------------
    // Read receipts
    // -----------------------------------------------------------------

    /// Marks every unread incoming message of the conversation with `peer`
    /// READ, zeroes its unread count, and owes a READ receipt for each one
    /// whose sender asked for it. Returns how many were marked.
    pub(crate) fn mark_read(&self, peer: &Peer) -> Result<usize> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE messages SET status = ?3, status_time = ?4, \
                 read_receipt = CASE WHEN (flags & ?5) <> 0 AND id <> 0 THEN 1 ELSE 0 END \
                 WHERE dir = 1 AND peer_kind = ?1 AND peer = ?2 AND status = ?6",
                params![
                    peer.kind(),
                    peer.name(),
                    Status::Read.code(),
                    now_ms() as i64,
                    flags::READ_RECEIPT,
                    Status::Received.code(),
                ],
            )?;
            tx.execute(
                "UPDATE conversations SET unread = 0 WHERE peer_kind = ?1 AND peer = ?2",
                params![peer.kind(), peer.name()],
            )?;
            Ok(n)
        })
    }

    /// Up to `limit` owed READ receipts, oldest first.
    pub(crate) fn owed_reads(&self, limit: usize) -> Result<Vec<OwedRead>> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT lid, sender, id, peer_kind, peer FROM messages \
             WHERE read_receipt = 1 ORDER BY lid LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            let kind: i64 = r.get(3)?;
            Ok(OwedRead {
                lid: r.get(0)?,
                from: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                id: r.get::<_, i64>(2)? as u64,
                group: (kind == 1).then(|| r.get(4)).transpose()?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The server has taken these READ receipts.
    pub(crate) fn clear_reads(&self, lids: &[i64]) -> Result<()> {
        self.write(|tx| {
            let mut stmt =
                tx.prepare_cached("UPDATE messages SET read_receipt = 0 WHERE lid = ?1")?;
            for lid in lids {
                stmt.execute([lid])?;
            }
            Ok(())
        })
    }

    // -----------------------------------------------------------------
    // Uploads
    // -----------------------------------------------------------------

    /// The oldest message waiting for its upload, with a local id above
    /// `after`.
    pub(crate) fn next_upload(&self, after: i64) -> Result<Option<Upload>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "SELECT u.lid, u.path, u.name, u.mime, u.caption FROM uploads u \
                 JOIN messages m ON m.lid = u.lid \
                 WHERE m.status = ?1 AND u.lid > ?2 ORDER BY u.lid LIMIT 1",
                params![Status::Uploading.code(), after],
                |r| {
                    Ok(Upload {
                        lid: r.get(0)?,
                        path: PathBuf::from(r.get::<_, String>(1)?),
                        name: r.get(2)?,
                        mime: r.get(3)?,
                        caption: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// The upload is done: the message gets its payload and enters the
    /// outbox, in one transaction.
    pub(crate) fn finish_upload(&self, lid: i64, payload: &[u8]) -> Result<Option<Event>> {
        self.write(|tx| {
            tx.execute(
                "UPDATE messages SET payload = ?2 WHERE lid = ?1 AND status = ?3",
                params![lid, payload, Status::Uploading.code()],
            )?;
            tx.execute("DELETE FROM uploads WHERE lid = ?1", [lid])?;
            set_status(tx, lid, Status::Outbox, now_ms())
        })
    }

    /// The upload failed for good: the message ends in `status`
    /// (UPLOAD_FAILED, or TOO_LARGE when the server refused the size).
    pub(crate) fn fail_upload(&self, lid: i64, status: Status) -> Result<Option<Event>> {
        self.write(|tx| {
            tx.execute("DELETE FROM uploads WHERE lid = ?1", [lid])?;
            set_status(tx, lid, status, now_ms())
        })
    }
}

fn direction_code(d: Direction) -> i64 {
    match d {
        Direction::Outgoing => 0,
        Direction::Incoming => 1,
    }
}

/// Reads the [`COLS`] of a row.
fn message_row(r: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        lid: r.get(0)?,
        direction: if r.get::<_, i64>(1)? == 0 {
            Direction::Outgoing
        } else {
            Direction::Incoming
        },
        peer: Peer::from_columns(r.get(2)?, r.get(3)?),
        sender: r.get(4)?,
        id: r.get::<_, i64>(5)? as u64,
        seq: r.get::<_, Option<i64>>(6)?.map(|s| s as u64),
        msg_type: r.get::<_, i64>(7)? as u32,
        priority: r.get::<_, i64>(8)? as u8,
        expiry: r.get::<_, Option<i64>>(9)?.map(|e| e as u32),
        flags: r.get::<_, i64>(10)? as u32,
        time: r.get::<_, i64>(11)? as u64,
        payload: r.get(12)?,
        status: Status::from_code(r.get(13)?),
        status_time: r.get::<_, i64>(14)? as u64,
    })
}

/// A delivery as an incoming [`Message`] with local id `lid`.
fn incoming_message(lid: i64, m: WireMessage, status: Status) -> Message {
    let peer = match m.group {
        Some(g) => Peer::Group(g),
        None => Peer::User(m.from.clone()),
    };
    Message {
        lid,
        direction: Direction::Incoming,
        peer,
        sender: Some(m.from),
        id: m.id,
        seq: Some(m.seq),
        msg_type: m.msg_type,
        priority: m.priority,
        expiry: None,
        flags: m.flags & !flags::REDELIVERY,
        time: m.time,
        payload: m.payload,
        status,
        status_time: m.time,
    }
}

/// Stores a delivery unless it is already stored; the event if it is new.
fn insert_incoming(tx: &Transaction<'_>, m: WireMessage) -> Result<Option<Event>> {
    let msg = incoming_message(0, m, Status::Received);
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO messages(dir, peer_kind, peer, sender, id, seq, type, priority, \
         expiry, flags, time, payload, status, status_time) \
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9, ?10, ?11, ?9)",
        params![
            msg.peer.kind(),
            msg.peer.name(),
            msg.sender,
            msg.id as i64,
            msg.seq.map(|s| s as i64),
            msg.msg_type,
            msg.priority,
            msg.flags,
            msg.time as i64,
            msg.payload,
            Status::Received.code(),
        ],
    )?;
    if inserted == 0 {
        return Ok(None); // a redelivery of a stored message
    }
    let lid = tx.last_insert_rowid();
    touch_conversation(tx, &msg.peer, lid, msg.time, 1)?;
    Ok(Some(Event::Received(Message { lid, ..msg })))
}

/// Makes `lid` the last message of `peer`'s conversation and adds `unread`.
fn touch_conversation(
    tx: &Transaction<'_>,
    peer: &Peer,
    lid: i64,
    time: u64,
    unread: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO conversations(peer_kind, peer, last_lid, last_time, unread) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT(peer_kind, peer) DO UPDATE SET last_lid = excluded.last_lid, \
         last_time = excluded.last_time, unread = unread + excluded.unread",
        params![peer.kind(), peer.name(), lid, time as i64, unread],
    )?;
    Ok(())
}

/// Whether an outgoing message with `id` is in the store.
fn is_stored_answer(tx: &Transaction<'_>, id: u64) -> Result<bool> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM messages WHERE dir = 0 AND id = ?1",
            [id as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Moves an outgoing message's status forward; the event if it moved.
fn set_status(tx: &Transaction<'_>, lid: i64, new: Status, time: u64) -> Result<Option<Event>> {
    let row: Option<(i64, i64, i64, String)> = tx
        .query_row(
            "SELECT status, id, peer_kind, peer FROM messages WHERE lid = ?1 AND dir = 0",
            [lid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((old, id, kind, peer)) = row else {
        return Ok(None);
    };
    let old = Status::from_code(old);
    // Forward only; OUTBOX may follow UPLOADING (same rank).
    let forward = new.rank() > old.rank() || (old == Status::Uploading && new == Status::Outbox);
    if !forward {
        return Ok(None);
    }
    tx.execute(
        "UPDATE messages SET status = ?2, status_time = ?3 WHERE lid = ?1",
        params![lid, new.code(), time as i64],
    )?;
    Ok(Some(Event::Status {
        lid,
        id: id as u64,
        peer: Peer::from_columns(kind, peer),
        member: None,
        status: new,
    }))
}

/// Applies a STATUS about an outgoing message. With MEMBER (a group
/// send), the member's own status moves forward; the message's status
/// follows members only for DELIVERED and READ (it is "the furthest any
/// member got"), while a member's EXPIRED or DELETED stays per member.
fn apply_status(tx: &Transaction<'_>, s: &StatusEvent) -> Result<Option<Event>> {
    let Some(new) = Status::from_wire(s.status) else {
        return Ok(None);
    };
    let row: Option<i64> = tx
        .query_row(
            "SELECT lid FROM messages WHERE dir = 0 AND id = ?1",
            [s.id as i64],
            |r| r.get(0),
        )
        .optional()?;
    let Some(lid) = row else {
        return Ok(None);
    };
    let Some(member) = &s.member else {
        return set_status(tx, lid, new, s.time);
    };
    let old: Option<i64> = tx
        .query_row(
            "SELECT status FROM member_status WHERE lid = ?1 AND member = ?2",
            params![lid, member],
            |r| r.get(0),
        )
        .optional()?;
    let member_moved = old.is_none_or(|o| new.rank() > Status::from_code(o).rank());
    if member_moved {
        tx.execute(
            "INSERT INTO member_status(lid, member, status, time) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(lid, member) DO UPDATE SET status = excluded.status, time = excluded.time",
            params![lid, member, new.code(), s.time as i64],
        )?;
    }
    let mut event = if matches!(new, Status::Delivered | Status::Read) {
        set_status(tx, lid, new, s.time)?
    } else {
        None
    };
    if member_moved {
        let (id, peer) = tx.query_row(
            "SELECT id, peer_kind, peer FROM messages WHERE lid = ?1",
            [lid],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    Peer::from_columns(r.get(1)?, r.get(2)?),
                ))
            },
        )?;
        event = Some(Event::Status {
            lid,
            id,
            peer,
            member: Some(member.clone()),
            status: new,
        });
    }
    Ok(event)
}

#[cfg(test)]
mod tests;
