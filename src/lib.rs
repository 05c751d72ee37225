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
//! - [`wire`]: protocol v1 frames, codec and deframer; no I/O (builds without `server`).
//! - [`client`]: a blocking client library (used by the CLI, tests, benches).
//! - `cli`: the `tern user/group/send/listen/upload/download` commands.
//! - `config`: configuration keys, sources and validation.
//! - `clock`, `metrics`: the server clock; counters and histograms (leaves).
//! - `admission`: per-address connection limits and the back-off after
//!   failed logins, for both listeners (a leaf).
//! - `tls`: the certificate of both listeners (loaded, reloaded on SIGHUP)
//!   and `tern gen-cert`'s CA (a leaf).
//! - `store`: the only user of RocksDB: keys, records, reads, the batch.
//! - `mailbox`: per-connection lock-free delivery rings, and the `Notify`
//!   port through which other threads wake an event loop.
//! - `directory`: users and groups in memory; per-user SEQs and inflight items.
//! - `commit`: the group-commit thread; every change to queued state.
//! - `session`: the sans-IO protocol state machine and its `Env` port; the
//!   SEND rules (`session::accept`).
//! - `net`: the only user of mio: acceptor, event loops, connection buffers,
//!   and the glue that implements the session's and the commit thread's ports.
//! - `admin`: users, tokens and groups (written, then published).
//! - `expiry`: the sweeper that expires queued items.
//! - `http`: the only user of tiny_http: admin API, files, health, metrics.
//! - `server`: wires the parts together, start-up and shutdown order.
//!
//! Which module may import which: each only from the layers below it, so
//! there is no import cycle (`python3 ../shared/tools/modgraph.py src`
//! prints none, and the `layers` unit test below fails on a new arrow
//! upwards):
//!
//! ```text
//! server
//! http                      (the only user of tiny_http)
//! net, admin, expiry        (net: the only user of mio)
//! session                   (reaches the rest through its Env port)
//! commit                    (reaches event loops through mailbox::Notify)
//! directory
//! mailbox
//! store                     (the only user of RocksDB)
//! wire, clock, metrics, config, admission, tls
//! ```
//!
//! `client` imports only `wire`, and `cli` only `client` and `tls`.

pub mod client;
pub mod wire;

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod clock;
#[cfg(feature = "server")]
pub mod commit;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod directory;
#[cfg(feature = "server")]
pub mod expiry;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod mailbox;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod net;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod session;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tls;

/// The import layers of the module doc, checked over the source files.
#[cfg(all(test, feature = "server"))]
mod layers {
    use std::collections::BTreeSet;

    /// Each module and the crate modules it may import.
    const ALLOWED: &[(&str, &[&str])] = &[
        ("wire", &[]),
        ("clock", &[]),
        ("metrics", &[]),
        ("admission", &[]),
        ("tls", &[]),
        ("config", &["wire"]),
        ("store", &["clock", "wire"]),
        ("mailbox", &["store", "wire"]),
        ("directory", &["clock", "mailbox", "store", "wire"]),
        (
            "commit",
            &["clock", "directory", "mailbox", "metrics", "store", "wire"],
        ),
        (
            "session",
            &[
                "admission",
                "commit",
                "config",
                "directory",
                "mailbox",
                "metrics",
                "store",
                "wire",
            ],
        ),
        (
            "net",
            &[
                "admission",
                "clock",
                "commit",
                "config",
                "directory",
                "mailbox",
                "metrics",
                "session",
                "store",
                "tls",
                "wire",
            ],
        ),
        ("admin", &["clock", "commit", "directory", "store", "wire"]),
        ("expiry", &["clock", "commit", "store"]),
        (
            "http",
            &[
                "admission",
                "admin",
                "clock",
                "commit",
                "config",
                "directory",
                "metrics",
                "session",
                "store",
                "tls",
                "wire",
            ],
        ),
        (
            "server",
            &[
                "admission",
                "admin",
                "clock",
                "commit",
                "config",
                "directory",
                "expiry",
                "http",
                "metrics",
                "net",
                "session",
                "store",
                "tls",
                "wire",
            ],
        ),
        ("client", &["wire"]),
        ("cli", &["client", "tls"]),
    ];

    /// The `crate::x` names a file mentions (unit tests aside).
    fn imports(text: &str) -> BTreeSet<String> {
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
        text.match_indices("crate::")
            .map(|(i, m)| {
                text[i + m.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect::<String>()
            })
            .filter(|m| !m.is_empty())
            .collect()
    }

    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_import_points_down() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut all = Vec::new();
        files(&src, &mut all);
        let mut seen = BTreeSet::new();
        for path in all {
            let rel = path.strip_prefix(&src).expect("under src");
            let top = rel.components().next().expect("a component");
            let top = top.as_os_str().to_string_lossy();
            let module = top.trim_end_matches(".rs");
            if module == "lib" || module == "main" {
                continue;
            }
            seen.insert(module.to_owned());
            let allowed = ALLOWED
                .iter()
                .find(|(m, _)| *m == module)
                .map(|(_, a)| *a)
                .unwrap_or_else(|| panic!("module {module} is not in the layer table"));
            let text = std::fs::read_to_string(&path).expect("readable");
            for dep in imports(&text) {
                if dep != module {
                    assert!(
                        allowed.contains(&dep.as_str()),
                        "{} imports crate::{dep}, which {module} may not",
                        rel.display()
                    );
                }
            }
        }
        assert!(seen.len() >= 15, "the walk found the modules: {seen:?}");
    }
}
