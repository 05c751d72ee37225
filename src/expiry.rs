//! The expiry sweeper: a thread that reads the expiry index up to "now" and
//! hands what is due to the commit thread, which deletes the items and stores
//! EXPIRED statuses for their senders (or forgets old dedup records).
//!
//! Real-time (EXPIRY = 0) messages are never in the store, so they never
//! reach here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam::channel;

use crate::clock::now_ms;
use crate::commit::{Commit, Request};
use crate::store::Store;

/// Due keys handed to the commit thread per request.
const SWEEP_BATCH: usize = 1024;
/// Pause between sweeps when nothing is due.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// A running sweeper.
pub struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

/// Starts the sweeper thread.
pub fn start(store: Arc<Store>, commit: Commit) -> std::io::Result<Sweeper> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = thread::Builder::new()
        .name("tern-expiry".into())
        .spawn(move || run(&store, &commit, &flag))?;
    Ok(Sweeper { stop, thread })
}

impl Sweeper {
    /// Stops the sweeper after its current pass.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

fn run(store: &Store, commit: &Commit, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match sweep_once(store, commit) {
            Ok(n) if n == SWEEP_BATCH => continue, // more may be due
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
        thread::park_timeout(SWEEP_INTERVAL);
    }
}

/// One pass: hands up to [`SWEEP_BATCH`] due keys to the commit thread and
/// waits until they are committed (so they are not handed over twice).
pub fn sweep_once(store: &Store, commit: &Commit) -> crate::store::Result<usize> {
    let keys = store.due_expiries(now_ms(), SWEEP_BATCH)?;
    let n = keys.len();
    if n == 0 {
        return Ok(0);
    }
    let (done, wait) = channel::bounded(1);
    if commit.submit(Request::Expire { keys, done }) {
        let _ = wait.recv();
    }
    Ok(n)
}
