//! The store's schema, as an ordered list of migrations.
//!
//! `PRAGMA user_version` holds the number of migrations applied. Opening a
//! store applies the missing ones, each in its own transaction together with
//! the version bump, so a crash mid-migration leaves the previous version.
//! A file whose version is above [`MIGRATIONS`]`.len()` was written by a
//! newer SDK and is refused rather than misread. Add a migration at the end;
//! never edit one that has shipped. docs/sdk.md describes the tables.
//!
//! Integers: 64-bit message ids and SEQs are stored as the `i64` with the
//! same bits (`id as i64`), so uniqueness and equality are exact.

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Migration `i` takes the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: messages both ways, per-member statuses of group sends,
    // conversations, pending uploads, the SDK's own state.
    r#"
    CREATE TABLE messages (
        lid          INTEGER PRIMARY KEY,    -- local id, insertion order
        dir          INTEGER NOT NULL,       -- 0 outgoing, 1 incoming
        peer_kind    INTEGER NOT NULL,       -- 0 user, 1 group
        peer         TEXT    NOT NULL,       -- the other user, or the group
        sender       TEXT,                   -- FROM (incoming); NULL = this user
        id           INTEGER NOT NULL,       -- the sender's message id
        seq          INTEGER,                -- delivery SEQ (incoming)
        type         INTEGER NOT NULL,
        priority     INTEGER NOT NULL,
        expiry       INTEGER,                -- EXPIRY asked for (outgoing)
        flags        INTEGER NOT NULL,
        time         INTEGER NOT NULL,       -- ms: queued (out), server TIME (in)
        payload      BLOB    NOT NULL,
        status       INTEGER NOT NULL,       -- see types::Status::code
        status_time  INTEGER NOT NULL,
        read_receipt INTEGER NOT NULL DEFAULT 0  -- 1: a READ frame is owed
    );
    -- Exactly once: an outgoing id is used once; an incoming message is
    -- unique on (sender, id) and on its SEQ, so a redelivery inserts nothing.
    CREATE UNIQUE INDEX messages_out_id ON messages(id) WHERE dir = 0;
    CREATE UNIQUE INDEX messages_in_sender_id ON messages(sender, id) WHERE dir = 1 AND id <> 0;
    CREATE UNIQUE INDEX messages_in_seq ON messages(seq) WHERE dir = 1;
    CREATE INDEX messages_conversation ON messages(peer_kind, peer, lid);
    CREATE INDEX messages_outbox ON messages(lid) WHERE dir = 0 AND status IN (0, 17);
    CREATE INDEX messages_unread ON messages(peer_kind, peer) WHERE dir = 1 AND status = 16;
    CREATE INDEX messages_read_receipts ON messages(lid) WHERE read_receipt = 1;

    CREATE TABLE member_status (
        lid     INTEGER NOT NULL REFERENCES messages(lid) ON DELETE CASCADE,
        member  TEXT    NOT NULL,
        status  INTEGER NOT NULL,
        time    INTEGER NOT NULL,
        PRIMARY KEY (lid, member)
    ) WITHOUT ROWID;

    CREATE TABLE conversations (
        peer_kind INTEGER NOT NULL,
        peer      TEXT    NOT NULL,
        last_lid  INTEGER NOT NULL,
        last_time INTEGER NOT NULL,
        unread    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (peer_kind, peer)
    ) WITHOUT ROWID;
    CREATE INDEX conversations_recent ON conversations(last_lid);

    CREATE TABLE uploads (
        lid      INTEGER PRIMARY KEY REFERENCES messages(lid) ON DELETE CASCADE,
        path     TEXT    NOT NULL,
        name     TEXT    NOT NULL,
        mime     TEXT    NOT NULL,
        caption  TEXT
    );

    CREATE TABLE state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this SDK writes.
pub fn version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings `conn` up to [`version`], one transaction per migration.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > version() {
        return Err(Error::SchemaTooNew {
            found,
            known: version(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
