//! The expiry sweeper: a thread that reads the expiry index up to "now" and
//! hands what is due to the commit thread, which deletes the items and stores
//! EXPIRED statuses for their senders (or forgets old dedup records).
//!
//! Real-time (EXPIRY = 0) messages are never in the store, so they never
//! reach here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

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
    let mut cursor = Cursor::new();
    while !stop.load(Ordering::Acquire) {
        match sweep_once(store, commit, &mut cursor) {
            Ok(n) if n == SWEEP_BATCH => continue, // more may be due
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
        thread::park_timeout(SWEEP_INTERVAL);
    }
}

/// How often a sweep starts from the beginning of the expiry index again.
/// In between, each sweep starts at the last key the one before handed
/// over: every key before it was deleted, and stepping over their
/// tombstones again on every sweep cost more than the deletes themselves
/// (at 20,000 msgs/s the sweep fell behind the dedup records by 37 s a
/// minute). An entry written behind the cursor (due already when written,
/// after the clock stepped back) or left by a failed sweep waits at most
/// this long.
const REWIND_INTERVAL: Duration = Duration::from_secs(1);

/// Where the next sweep starts.
pub struct Cursor {
    /// The last key handed over (`None`: the beginning of the index).
    from: Option<Box<[u8]>>,
    /// When a sweep last started from the beginning.
    rewound: Instant,
    /// How often it does ([`REWIND_INTERVAL`]).
    every: Duration,
}

impl Cursor {
    pub fn new() -> Cursor {
        Cursor {
            from: None,
            rewound: Instant::now(),
            every: REWIND_INTERVAL,
        }
    }
}

impl Default for Cursor {
    fn default() -> Cursor {
        Cursor::new()
    }
}

/// One pass: hands up to [`SWEEP_BATCH`] due keys to the commit thread and
/// waits until they are committed (so they are not handed over twice).
pub fn sweep_once(
    store: &Store,
    commit: &Commit,
    cursor: &mut Cursor,
) -> crate::store::Result<usize> {
    if cursor.rewound.elapsed() >= cursor.every {
        cursor.from = None;
        cursor.rewound = Instant::now();
    }
    let keys = store.due_expiries_from(cursor.from.as_deref(), now_ms(), SWEEP_BATCH)?;
    let n = keys.len();
    let Some(last) = keys.last().cloned() else {
        return Ok(0);
    };
    let (done, wait) = channel::bounded(1);
    if commit.submit(Request::Expire { keys, done }) {
        let _ = wait.recv();
    }
    cursor.from = Some(last);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::{expiry_key, CF_EXPIRY};

    /// A commit queue that deletes the expiry keys handed to it, and says
    /// which it was handed.
    fn committer(store: Arc<Store>) -> (Commit, channel::Receiver<Vec<Box<[u8]>>>) {
        let (commit, queue) = crate::commit::queue();
        let (seen, handed) = channel::unbounded();
        thread::spawn(move || {
            for req in queue.into_receiver() {
                if let Request::Expire { keys, done } = req {
                    let mut batch = store.batch();
                    for k in &keys {
                        batch.delete(CF_EXPIRY, k).unwrap();
                    }
                    batch.seal();
                    batch.commit(false).unwrap();
                    let _ = seen.send(keys);
                    let _ = done.send(());
                }
            }
        });
        (commit, handed)
    }

    fn put(store: &Store, at_ms: u64, key: &[u8]) {
        let mut batch = store.batch();
        batch
            .put(CF_EXPIRY, &expiry_key(at_ms, 0, key), b"")
            .unwrap();
        batch.seal();
        batch.commit(false).unwrap();
    }

    #[test]
    fn an_entry_written_behind_the_cursor_is_swept_after_a_rewind() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (commit, handed) = committer(store.clone());
        let mut cursor = Cursor::new();
        cursor.every = Duration::from_secs(3600);
        put(&store, 2_000, b"b");
        assert_eq!(sweep_once(&store, &commit, &mut cursor).unwrap(), 1);
        assert_eq!(handed.try_recv().unwrap().len(), 1);
        // Due already when written, and before the cursor: the next sweeps
        // resume after "b" and do not see it...
        put(&store, 1_000, b"a");
        put(&store, 3_000, b"c");
        assert_eq!(sweep_once(&store, &commit, &mut cursor).unwrap(), 1);
        assert_eq!(
            handed.try_recv().unwrap()[0][..],
            expiry_key(3_000, 0, b"c")[..]
        );
        // ...until one starts from the beginning again.
        cursor.every = Duration::ZERO;
        assert_eq!(sweep_once(&store, &commit, &mut cursor).unwrap(), 1);
        assert_eq!(
            handed.try_recv().unwrap()[0][..],
            expiry_key(1_000, 0, b"a")[..]
        );
        assert!(store.due_expiries(u64::MAX, 10).unwrap().is_empty());
    }
}
