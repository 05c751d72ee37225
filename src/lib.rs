//! tern: a self-hosted messaging server with exactly-once delivery.
//!
//! The data path, in the order a message travels:
//!
//! ```text
//! socket → net (mio loop, conn buffers) → wire (check, decode) → session (state
//! machine) → store (group commit, fsync) → mailbox (per-user rings, wake-up)
//! → session → net (encode, write until WouldBlock) → socket
//! ```
//!
//! - [`wire`]: protocol v1 frames and codec; no I/O (builds without `server`).
//! - [`client`]: a blocking client library (used by the CLI, tests, benches).
//! - `cli`: the `tern user/group/send/listen/upload/download` commands.
//! - `config`: configuration keys, sources and validation.
//! - `net`: the only user of mio: acceptor, event loops, connection buffers.
//! - `session`: the per-connection protocol state machine.
//! - `router`: the SEND rules, shared by the session and the HTTP API.
//! - `mailbox`: per-user lock-free delivery rings and worker wake-ups.
//! - `store`: the only user of RocksDB: keys, records and the commit thread.
//! - `core`: the shared state the parts meet in (user directory, metrics).
//! - `expiry`: the sweeper that expires queued items.
//! - `http`: the only user of tiny_http: admin API and health.
//! - `server`: wires the parts together, start-up and shutdown order.

pub mod client;
pub mod wire;

#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod core;
#[cfg(feature = "server")]
pub mod expiry;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod mailbox;
#[cfg(feature = "server")]
pub mod net;
#[cfg(feature = "server")]
pub mod router;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod store;
