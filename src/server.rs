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

use crate::config::Config;
use crate::core::{new_token, Core, Phase};
use crate::store::{self, Store, StoreError};
use crate::{expiry, http, net};

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
    #[error("store")]
    Store(#[from] StoreError),
    #[error("starting threads")]
    Thread(#[from] std::io::Error),
}

/// A running server.
pub struct Server {
    /// Shared state.
    pub core: Arc<Core>,
    /// Bound protocol address.
    pub listen: SocketAddr,
    /// Bound HTTP address.
    pub http_listen: SocketAddr,
    /// Where the admin token was written, if it was generated.
    pub admin_token_file: Option<PathBuf>,
    net: net::Net,
    http: http::Http,
    sweeper: expiry::Sweeper,
    _commit: JoinHandle<()>,
}

impl Server {
    /// Starts every part; returns once the server is ready.
    pub fn start(config: Config) -> Result<Server, StartError> {
        let dir = config.data_dir.clone();
        fs::create_dir_all(&dir).map_err(|source| StartError::DataDir {
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

        let store = Store::open(&dir.join("db"))?;
        let boot = store.next_boot()?;
        let (commit, queue) = store::commit::queue();
        let core = Arc::new(Core::new(config, store, commit, boot)?);
        let commit_thread = store::commit::spawn(core.clone(), queue)?;
        let net = net::start(core.clone(), listener)?;
        let http = http::start(core.clone(), http_listener, admin_token)?;
        let sweeper = expiry::start(core.clone())?;
        core.set_phase(Phase::Ready);
        tracing::info!(%listen, %http_listen, boot, data_dir = %dir.display(), "tern ready");
        if let Some(path) = &admin_token_file {
            tracing::info!(path = %path.display(), "admin token file");
        }
        Ok(Server {
            core,
            listen,
            http_listen,
            admin_token_file,
            net,
            http,
            sweeper,
            _commit: commit_thread,
        })
    }

    /// Shuts down in order (see the module doc).
    pub fn shutdown(self) {
        let core = self.core;
        core.set_phase(Phase::ShuttingDown);
        tracing::info!("shutting down");
        self.net.shutdown(&core);
        self.sweeper.stop();
        core.commit.barrier();
        if let Err(e) = core.store.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
        self.http.shutdown();
        tracing::info!("stopped");
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
    Ok(token)
}
