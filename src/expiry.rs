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

use crate::core::{now_ms, Core};
use crate::store::Request;

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
pub fn start(core: Arc<Core>) -> std::io::Result<Sweeper> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = thread::Builder::new()
        .name("tern-expiry".into())
        .spawn(move || run(&core, &flag))?;
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

fn run(core: &Core, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match sweep_once(core) {
            Ok(n) if n == SWEEP_BATCH => continue, // more may be due
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
        thread::park_timeout(SWEEP_INTERVAL);
    }
}

/// One pass: hands up to [`SWEEP_BATCH`] due keys to the commit thread and
/// waits until they are committed (so they are not handed over twice).
pub fn sweep_once(core: &Core) -> crate::store::Result<usize> {
    let keys = core.store.due_expiries(now_ms(), SWEEP_BATCH)?;
    let n = keys.len();
    if n == 0 {
        return Ok(0);
    }
    let (done, wait) = channel::bounded(1);
    if core.commit.submit(Request::Expire { keys, done }) {
        let _ = wait.recv();
    }
    Ok(n)
}
