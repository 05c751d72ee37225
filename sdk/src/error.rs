//! The SDK's error type: one enum, with the layer each failure comes from.

use std::io;
use std::path::PathBuf;

/// What went wrong in an SDK call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local store (SQLite) failed.
    #[error("local store: {0}")]
    Store(#[from] rusqlite::Error),
    /// The store file was written by a newer SDK (schema `found`, this SDK
    /// knows up to `known`).
    #[error("store schema version {found} is newer than this SDK's {known}")]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The newest version this SDK can migrate to.
        known: i64,
    },
    /// The store is open in another [`crate::Tern`] instance (of this
    /// process or another): one instance per store file.
    #[error("{}: the store is open in another instance", .0.display())]
    InUse(PathBuf),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    File {
        /// The file concerned.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The files API (HTTP) failed.
    #[error("files API: {0}")]
    Http(String),
    /// The call needs the HTTP API, and the config names none.
    #[error("no HTTP URL configured (Config::http)")]
    NoHttp,
    /// A real-time send needs a connection, and there is none; or a
    /// download before any login has shown the token to be the store's
    /// user's.
    #[error("not connected")]
    Offline,
    /// The protocol connection failed.
    #[error("connection: {0}")]
    Client(#[from] tern::client::ClientError),
    /// An argument breaks a rule (an invalid address, EXPIRY 0 to the outbox…).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The message is not an attachment.
    #[error("not an attachment message")]
    NotAttachment,
    /// A downloaded file does not match the attachment's sha256 or size;
    /// nothing was kept.
    #[error(
        "download corrupt: expected sha256 {expected} ({size} bytes), got {got} ({got_size} bytes)"
    )]
    Corrupt {
        /// The sha256 the message announced.
        expected: String,
        /// The size the message announced.
        size: u64,
        /// The sha256 of the bytes received.
        got: String,
        /// How many bytes were received.
        got_size: u64,
    },
    /// The SDK is shut down.
    #[error("the SDK is shut down")]
    Closed,
}

/// Result of an SDK call.
pub type Result<T, E = Error> = std::result::Result<T, E>;
