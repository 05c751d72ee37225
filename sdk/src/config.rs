//! What [`crate::Tern::open`] needs: where the server is, who the user is,
//! where the store lives, and the few knobs of the connection.

use std::path::PathBuf;
use std::time::Duration;

/// SDK configuration. [`Config::new`] gives the required parts and sane
/// defaults; the builder methods change the rest.
#[derive(Clone, Debug)]
pub struct Config {
    /// The protocol listener, `host:port`; resolved again at every connect.
    pub addr: String,
    /// The user's access token (HELLO, and `Bearer` for the files API).
    pub token: String,
    /// The SQLite file of the local store (created if missing).
    pub db: PathBuf,
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:7780`; needed for
    /// attachments only.
    pub http: Option<String>,
    /// Where downloaded attachments go; default: `<db>.files/`.
    pub cache_dir: Option<PathBuf>,
    /// KEEPALIVE proposed to the server, seconds (it may lower it). A PING
    /// goes out after a third of it without writing; a connection silent
    /// for twice of it is taken as dead.
    pub keepalive: u32,
    /// Timeout of the TCP connect and the HELLO/WELCOME exchange.
    pub connect_timeout: Duration,
    /// Longest wait for the files API to take or give the next bytes of an
    /// upload or download (or its answer): past it the transfer fails (an
    /// upload is retried), rather than hang on a stalled server or a
    /// half-open connection, and hold up [`crate::Tern::shutdown`].
    pub http_timeout: Duration,
    /// First reconnect delay (before jitter).
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// SENDs written and not yet answered, at most.
    pub window: usize,
    /// Message TYPEs that are never stored (typing indicators, presence):
    /// delivered as [`crate::Event::Live`] and ACKed at once.
    pub ephemeral_types: Vec<u32>,
    /// Capacity of the event channel (see [`crate::Events`]).
    pub events_capacity: usize,
    /// CLIENT string sent in HELLO.
    pub client_name: String,
}

impl Config {
    /// A configuration for `token` on the server at `addr`, storing in `db`.
    pub fn new(
        addr: impl Into<String>,
        token: impl Into<String>,
        db: impl Into<PathBuf>,
    ) -> Config {
        Config {
            addr: addr.into(),
            token: token.into(),
            db: db.into(),
            http: None,
            cache_dir: None,
            keepalive: 60,
            connect_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(60),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            window: 256,
            ephemeral_types: Vec::new(),
            events_capacity: 4096,
            client_name: concat!("tern-sdk/", env!("CARGO_PKG_VERSION")).into(),
        }
    }

    /// Sets the HTTP base URL (attachments).
    pub fn http(mut self, base: impl Into<String>) -> Config {
        self.http = Some(base.into().trim_end_matches('/').to_owned());
        self
    }

    /// Sets the attachment cache directory.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Config {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Sets the KEEPALIVE proposal, seconds (at least 1).
    pub fn keepalive(mut self, secs: u32) -> Config {
        self.keepalive = secs.max(1);
        self
    }

    /// Sets the reconnect delays.
    pub fn reconnect(mut self, min: Duration, max: Duration) -> Config {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// Sets the connect/HELLO timeout.
    pub fn connect_timeout(mut self, t: Duration) -> Config {
        self.connect_timeout = t;
        self
    }

    /// Sets the files API's read and write timeout.
    pub fn http_timeout(mut self, t: Duration) -> Config {
        self.http_timeout = t;
        self
    }

    /// Sets the send window (at least 1).
    pub fn window(mut self, n: usize) -> Config {
        self.window = n.max(1);
        self
    }

    /// Declares message TYPEs as ephemeral (never stored).
    pub fn ephemeral_types(mut self, types: impl IntoIterator<Item = u32>) -> Config {
        self.ephemeral_types = types.into_iter().collect();
        self
    }

    /// Sets the event channel's capacity.
    pub fn events_capacity(mut self, n: usize) -> Config {
        self.events_capacity = n;
        self
    }

    /// The attachment cache directory in effect.
    pub fn cache_dir_or_default(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            let mut name = self.db.file_name().unwrap_or_default().to_os_string();
            name.push(".files");
            self.db.with_file_name(name)
        })
    }
}
