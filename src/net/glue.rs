//! The session's and the commit thread's ports, implemented over the real
//! parts: [`Glue`] is the session's [`Env`] (directory, RocksDB reads, the
//! commit queue), [`Loops`] is the [`Notify`] port of the event loops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam::queue::SegQueue;
use mio::Waker;

use super::Notice;
use crate::admission::{Conns, Logins};
use crate::commit::{Commit, Full, Request};
use crate::config::Config;
use crate::directory::{Directory, User};
use crate::mailbox::{Answer, ConnRef, Notify};
use crate::metrics::Metrics;
use crate::session::Env;
use crate::store::keys::PRIORITIES;
use crate::store::{Item, Store, StoreError};

/// The way into one event loop from other threads.
pub struct WorkerHandle {
    /// Wakes the loop's `poll`.
    pub(super) waker: Waker,
    /// Notices waiting for the loop.
    pub(super) queue: SegQueue<Notice>,
    /// Whether a wake-up is already on its way (one `wake` per burst).
    pub(super) pending: AtomicBool,
}

impl WorkerHandle {
    /// Queues a notice and wakes the loop if it is not already awake.
    pub fn post(&self, notice: Notice) {
        self.queue.push(notice);
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "waking an event loop failed");
            }
        }
    }
}

/// Every event loop's handle, by index.
pub struct Loops {
    /// One per event loop.
    pub(super) handles: Vec<WorkerHandle>,
}

impl Loops {
    /// Posts a notice to loop `worker` (ignored if there is no such loop).
    pub fn post(&self, worker: usize, notice: Notice) {
        if let Some(w) = self.handles.get(worker) {
            w.post(notice);
        }
    }

    /// How many loops there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Notify for Loops {
    fn mailbox(&self, conn: ConnRef) {
        self.post(conn.worker, Notice::Mailbox(conn));
    }

    fn answer(&self, conn: ConnRef, answer: Answer) {
        self.post(conn.worker, Notice::Answer(conn, answer));
    }
}

/// The session's environment over the real server.
pub struct Glue {
    /// The validated configuration.
    pub config: Config,
    /// Users and groups.
    pub dir: Arc<Directory>,
    /// Token look-ups and inbox scans.
    pub store: Arc<Store>,
    /// The commit queue.
    pub commit: Commit,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The event loops, as mailboxes see them.
    pub notify: Arc<dyn Notify>,
    /// Per-address limits of the protocol listener.
    pub conns: Arc<Conns>,
    /// Failed logins per address (shared with the HTTP listener).
    pub logins: Arc<Logins>,
    /// TLS for the protocol listener, when `tls_cert` and `tls_key` are set.
    pub tls: Option<Arc<crate::tls::Certs>>,
}

impl Env for Glue {
    fn config(&self) -> &Config {
        &self.config
    }

    fn logins(&self) -> &Logins {
        &self.logins
    }

    fn directory(&self) -> &Directory {
        &self.dir
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn notify(&self) -> &Arc<dyn Notify> {
        &self.notify
    }

    fn authenticate(&self, token: &str, now: u64) -> Result<Option<Arc<User>>, StoreError> {
        self.dir.authenticate(&self.store, token, now)
    }

    fn scan_inbox(
        &self,
        user: &str,
        cursors: &[u64; PRIORITIES],
        budget: usize,
    ) -> Result<(Vec<Arc<Item>>, bool), StoreError> {
        match self.dir.user(user) {
            Some(u) => crate::directory::scan_inbox(&self.store, &u, cursors, budget),
            None => self.store.scan_inbox(user, cursors, budget),
        }
    }

    fn submit(&self, req: Request) -> Result<(), Full> {
        self.commit.try_submit(req)
    }
}
