//! Start-up and shutdown: the order in which the parts come up and go down.
//!
//! Up: data directory and admin token → listeners bound (so a bad address
//! fails before anything else) → RocksDB opened, boot counter bumped → users
//! loaded → commit thread → event loops and acceptor → HTTP → expiry sweeper
//! → ready.
//!
//! Down: not ready (`/readyz` 503) → acceptor stops → every connection gets
//! ERROR SHUTDOWN and is closed → sweeper stops → commit queue drained
//! (barrier) → memtables and WAL flushed → HTTP stops.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::admin::{new_token, Admin};
use crate::admission::{Conns, Logins};
use crate::commit::{self, Commit, Committer};
use crate::config::Config;
use crate::directory::Directory;
use crate::http::{Backend, Phase};
use crate::metrics::Metrics;
use crate::net::Glue;
use crate::store::{self, Store, StoreError};
use crate::{expiry, http, net, tls};

/// File descriptors kept for everything but protocol connections: HTTP
/// requests (512 at once), RocksDB's files, listeners, wake-up pipes.
const FD_RESERVE: u64 = 4096;

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data_dir {path}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} ({key})")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The database could not be opened (or its boot counter written) on a
    /// nearly full disk.
    #[error(
        "store: {error}; {free} bytes free on {}: free at least \
         min_free_space ({needed} bytes) and start again",
        path.display()
    )]
    NoSpace {
        path: PathBuf,
        free: u64,
        needed: u64,
        error: StoreError,
    },
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("tls_cert and tls_key must be set together")]
    TlsPair,
    #[error("starting threads: {0}")]
    Thread(#[from] std::io::Error),
}

/// `min_free_space` when unset: 1% of the disk holding `dir`, at least 64 MiB.
fn default_min_free_space(dir: &Path) -> u64 {
    let one_percent = store::disk_size(dir).unwrap_or(0) / 100;
    one_percent.max(64 << 20)
}

/// A running server.
pub struct Server {
    /// What the HTTP API reaches (admin operations, metrics, phase).
    pub backend: Arc<Backend>,
    /// The database.
    pub store: Arc<Store>,
    /// The commit queue.
    pub commit: Commit,
    /// Bound protocol address.
    pub listen: SocketAddr,
    /// Bound HTTP address.
    pub http_listen: SocketAddr,
    /// Where the admin token was written, if it was generated.
    pub admin_token_file: Option<PathBuf>,
    net: net::Net,
    http: http::Http,
    sweeper: expiry::Sweeper,
    /// The certificate of both listeners, when TLS is on.
    tls: Option<Arc<tls::Certs>>,
    _commit: JoinHandle<()>,
}

impl Server {
    /// Starts every part; returns once the server is ready.
    pub fn start(mut config: Config) -> Result<Server, StartError> {
        fit_connections(&mut config);
        let dir = config.data_dir.clone();
        http::files::create_dir_durable(&dir).map_err(|source| StartError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let (admin_token, admin_token_file) = match &config.admin_token {
            Some(t) => (t.clone(), None),
            None => {
                let path = dir.join("admin.token");
                let token = admin_token_file(&path).map_err(|source| StartError::DataDir {
                    path: path.clone(),
                    source,
                })?;
                (token, Some(path))
            }
        };
        let bind = |key, addr| {
            TcpListener::bind(addr).map_err(|source| StartError::Bind { key, addr, source })
        };
        let listener = bind("listen", config.listen)?;
        let http_listener = bind("http_listen", config.http_listen)?;
        let listen = listener.local_addr()?;
        let http_listen = http_listener.local_addr()?;

        let db_dir = dir.join("db");
        let min_free_space = config
            .min_free_space
            .map(|b| b.0)
            .unwrap_or_else(|| default_min_free_space(&dir));
        let no_space = |error: StoreError| {
            let free = store::free_space(&dir).unwrap_or(0);
            if free < min_free_space {
                StartError::NoSpace {
                    path: dir.clone(),
                    free,
                    needed: min_free_space,
                    error,
                }
            } else {
                StartError::Store(error)
            }
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(tls::Certs::load(cert, key)?)),
            (None, None) => None,
            _ => return Err(StartError::TlsPair),
        };
        let store = Arc::new(Store::open(&db_dir).map_err(no_space)?);
        let boot = store.next_boot().map_err(no_space)?;
        store.set_min_free_space(min_free_space);
        if store.check_space() {
            if let Err(why) = store.health() {
                tracing::warn!(%why, "starting with too little free space: new messages are refused until there is more");
            }
        }
        let stored = store.store_held_shares().map_err(no_space)?;
        if stored > 0 {
            tracing::info!(
                shares = stored,
                "group shares held in memory at the last stop stored as REFs"
            );
        }
        let directory = Arc::new(Directory::load(&store, boot)?);
        let metrics = Arc::new(Metrics::default());
        let (commit, queue) = commit::queue();
        let (loops, polls) = net::loops(config.workers)?;
        let commit_thread = commit::spawn(
            Committer {
                dir: directory.clone(),
                store: store.clone(),
                notify: loops.clone(),
                metrics: metrics.clone(),
                retain_delivered: config.retain_delivered,
                max_expiry: config.max_expiry,
            },
            queue,
        )?;
        let glue = Arc::new(Glue {
            config: config.clone(),
            dir: directory.clone(),
            store: store.clone(),
            commit: commit.clone(),
            metrics: metrics.clone(),
            notify: loops.clone(),
            conns: Conns::new(
                config.max_connections_per_ip,
                config.max_unauthenticated_per_ip,
                "protocol connections refused: over max_connections_per_ip or max_unauthenticated_per_ip",
            ),
            logins: Arc::new(Logins::default()),
            tls: tls.clone(),
        });
        let net = net::start(glue.clone(), loops, polls, listener)?;
        let admin = Admin::new(
            directory.clone(),
            store.clone(),
            commit.clone(),
            config.max_group_size,
        );
        let backend = Arc::new(Backend::new(
            config,
            admin,
            commit.clone(),
            metrics.clone(),
            glue,
        ));
        let http = http::start(backend.clone(), http_listener, admin_token, tls.clone())?;
        let sweeper = expiry::start(store.clone(), commit.clone())?;
        backend.set_phase(Phase::Ready);
        tracing::info!(%listen, %http_listen, boot, data_dir = %dir.display(), tls = tls.is_some(), "tern ready");
        if let Some(path) = &admin_token_file {
            tracing::info!(path = %path.display(), "admin token file");
        }
        Ok(Server {
            backend,
            store,
            commit,
            listen,
            http_listen,
            admin_token_file,
            net,
            http,
            sweeper,
            tls,
            _commit: commit_thread,
        })
    }

    /// Reads `tls_cert` and `tls_key` again; the connections that come next
    /// on both listeners use them, the open ones keep theirs. `Ok(false)`:
    /// TLS is off. On an error the certificate in use stays.
    pub fn reload_tls(&self) -> Result<bool, tls::TlsError> {
        match &self.tls {
            None => Ok(false),
            Some(certs) => certs.reload().map(|()| true),
        }
    }

    /// Shuts down in order (see the module doc). An error means the final
    /// flush failed: everything acknowledged is still in the WAL, but the
    /// exit must not look clean.
    pub fn shutdown(self) -> Result<(), StoreError> {
        self.backend.set_phase(Phase::ShuttingDown);
        tracing::info!("shutting down");
        self.net.shutdown();
        self.sweeper.stop();
        self.commit.barrier();
        let flushed = self.store.flush();
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "final flush failed");
        }
        // The database stays open until the process ends. Closing it here
        // would happen on whichever thread drops the last reference (the
        // commit thread once its queue disconnects, a detached HTTP request
        // thread), racing RocksDB's exit-time destructors: a crash at exit
        // 1 time in 6. Everything is flushed, and an unclosed database is
        // what a SIGKILL leaves too, which is safe.
        std::mem::forget(self.store.clone());
        self.http.shutdown();
        tracing::info!("stopped");
        flushed
    }
}

/// Raises the soft RLIMIT_NOFILE to what `max_connections` needs (up to the
/// hard limit). If the hard limit is lower, `max_connections` is clamped to
/// it, with a warning: a server that runs out of descriptors refuses its
/// admin API and health checks too, so the cap must bite first.
fn fit_connections(config: &mut Config) {
    let want = config.max_connections as u64 + FD_RESERVE;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got >= want => {}
        Ok(got) => {
            let max = usize::try_from(got.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX);
            tracing::warn!(
                max_connections = config.max_connections,
                nofile = got,
                clamped_to = max,
                "the file-descriptor limit is too low for max_connections: clamped \
                 (raise LimitNOFILE, or lower max_connections)"
            );
            config.max_connections = max;
        }
        Err(e) => tracing::warn!(error = %e, "RLIMIT_NOFILE could not be raised"),
    }
}

/// Reads the admin token file, or creates it (mode 0600) with a new token.
fn admin_token_file(path: &Path) -> std::io::Result<String> {
    match fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = new_token();
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(token.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    // And its name: the operator's scripts hold the token.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        http::files::sync_dir(dir)?;
    }
    Ok(token)
}
