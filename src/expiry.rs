//! The expiry sweeper: a thread that reads the expiry index up to "now" and
//! hands what is due to the commit thread, which deletes the items and stores
//! EXPIRED statuses for their senders (or forgets the dedup record and
//! member receipts of a group send with READ_RECEIPT; other dedup records
//! are dropped by compaction).
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
/// minute; rewinding once a second still lost 40 s a minute on a busy
/// machine). An entry written behind the cursor (due when written: a short
/// expiry after a slow commit, or the clock stepped back) is found through
/// [`Store::take_expiry_floor`] at the next sweep; this interval is only a
/// safety net for keys a failed sweep left behind.
const REWIND_INTERVAL: Duration = Duration::from_secs(60);

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
    // Entries written since the last sweep, due no later than the cursor:
    // start from the earliest of them instead.
    let mut start = cursor.from.as_deref();
    let floor = store.take_expiry_floor().map(u64::to_be_bytes);
    if let (Some(floor), Some(from)) = (&floor, start) {
        if floor[..] <= from[..from.len().min(8)] {
            start = Some(&floor[..]);
        }
    }
    let keys = store.due_expiries_from(start, now_ms(), SWEEP_BATCH)?;
    store.note_swept(keys.first().map(|k| &k[..]));
    let n = keys.len();
    let Some(last) = keys.last().cloned() else {
        // Nothing due from there on: the cursor stays.
        return Ok(0);
    };
    let (done, wait) = channel::bounded(1);
    if !commit.submit(Request::Expire { keys, done }) || wait.recv() != Ok(true) {
        // Not committed (the store failed a write): the next sweep starts
        // where this one did.
        cursor.from = start.map(Box::from);
        return Err(crate::store::StoreError::Unavailable);
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
        committer_refusing(store, 0, 0)
    }

    /// The same, refusing `refused` requests after the first `accepted` (as
    /// the commit thread refuses a batch whose write failed: nothing
    /// deleted).
    fn committer_refusing(
        store: Arc<Store>,
        mut accepted: usize,
        mut refused: usize,
    ) -> (Commit, channel::Receiver<Vec<Box<[u8]>>>) {
        let (commit, queue) = crate::commit::queue();
        let (seen, handed) = channel::unbounded();
        thread::spawn(move || {
            for req in queue.into_receiver() {
                if let Request::Expire { keys, done } = req {
                    if accepted > 0 {
                        accepted -= 1;
                    } else if refused > 0 {
                        refused -= 1;
                        let _ = seen.send(keys);
                        let _ = done.send(false);
                        continue;
                    }
                    let mut batch = store.batch();
                    for k in &keys {
                        batch.delete(CF_EXPIRY, k).unwrap();
                    }
                    batch.seal();
                    batch.commit(false).unwrap();
                    let _ = seen.send(keys);
                    let _ = done.send(true);
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

    /// Sweeps until nothing is due; the keys handed over, in order.
    fn sweep_all(
        store: &Store,
        commit: &Commit,
        cursor: &mut Cursor,
        handed: &channel::Receiver<Vec<Box<[u8]>>>,
    ) -> Vec<Box<[u8]>> {
        while sweep_once(store, commit, cursor).unwrap() > 0 {}
        handed.try_iter().flatten().collect()
    }

    #[test]
    fn an_entry_written_behind_the_cursor_is_swept_by_the_next_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (commit, handed) = committer(store.clone());
        let mut cursor = Cursor::new();
        cursor.every = Duration::from_secs(3600);
        put(&store, 2_000, b"b");
        let swept = sweep_all(&store, &commit, &mut cursor, &handed);
        assert_eq!(swept, vec![expiry_key(2_000, 0, b"b").into()]);
        // Due already when written, and before the cursor: the sweeps resume
        // after "b", but the store says an entry was written behind it.
        put(&store, 1_000, b"a");
        put(&store, 3_000, b"c");
        let swept = sweep_all(&store, &commit, &mut cursor, &handed);
        assert_eq!(
            swept,
            vec![
                expiry_key(1_000, 0, b"a").into(),
                expiry_key(3_000, 0, b"c").into()
            ]
        );
        assert!(store.due_expiries(u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn the_lag_is_what_the_last_sweep_found_due() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (commit, handed) = committer_refusing(store.clone(), 0, 1);
        let mut cursor = Cursor::new();
        assert_eq!(store.expiry_lag(10_000), 0);
        put(&store, 1_000, b"a");
        put(&store, 4_000, b"b");
        // Refused: both still due, the earliest since 1,000.
        assert!(sweep_once(&store, &commit, &mut cursor).is_err());
        assert_eq!(store.expiry_lag(10_000), 9_000);
        assert_eq!(
            store.expiry_lag(11_000),
            10_000,
            "it grows while no sweep runs"
        );
        assert_eq!(
            sweep_all(&store, &commit, &mut cursor, &handed).len(),
            2 + 2
        );
        assert_eq!(store.expiry_lag(u64::MAX), 0, "nothing due any more");
    }

    #[test]
    fn keys_whose_expiry_was_refused_are_swept_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (commit, handed) = committer_refusing(store.clone(), 0, 1);
        let mut cursor = Cursor::new();
        cursor.every = Duration::from_secs(3600);
        put(&store, 1_000, b"a");
        put(&store, 1_500, b"a2");
        assert!(sweep_once(&store, &commit, &mut cursor).is_err());
        put(&store, 2_000, b"b");
        // The next sweep starts where the refused one did, not at its last
        // key ("a2").
        let swept = sweep_all(&store, &commit, &mut cursor, &handed);
        let [a, a2, b]: [Box<[u8]>; 3] = [
            expiry_key(1_000, 0, b"a").into(),
            expiry_key(1_500, 0, b"a2").into(),
            expiry_key(2_000, 0, b"b").into(),
        ];
        assert_eq!(swept, vec![a.clone(), a2.clone(), a, a2, b]);
        assert!(store.due_expiries(u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn an_entry_behind_the_cursor_whose_expiry_was_refused_is_swept_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (commit, handed) = committer_refusing(store.clone(), 1, 1);
        let mut cursor = Cursor::new();
        cursor.every = Duration::from_secs(3600);
        put(&store, 3_000, b"c");
        assert_eq!(sweep_once(&store, &commit, &mut cursor).unwrap(), 1);
        // Behind the cursor: the next sweep starts from the store's note of
        // it, which it takes. Refused, the one after must start there again.
        put(&store, 1_000, b"a");
        assert!(sweep_once(&store, &commit, &mut cursor).is_err());
        let swept = sweep_all(&store, &commit, &mut cursor, &handed);
        let [a, c]: [Box<[u8]>; 2] = [
            expiry_key(1_000, 0, b"a").into(),
            expiry_key(3_000, 0, b"c").into(),
        ];
        assert_eq!(swept, vec![c, a.clone(), a]);
        assert!(store.due_expiries(u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn an_entry_the_sweeps_missed_is_swept_after_a_rewind() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let (commit, handed) = committer(store.clone());
        let mut cursor = Cursor::new();
        cursor.every = Duration::from_secs(3600);
        put(&store, 2_000, b"b");
        sweep_all(&store, &commit, &mut cursor, &handed);
        // Behind the cursor, and the store's note of it lost (as if a sweep
        // had failed after taking it): the next sweeps do not see it...
        put(&store, 1_000, b"a");
        store.take_expiry_floor();
        assert!(sweep_all(&store, &commit, &mut cursor, &handed).is_empty());
        // ...until one starts from the beginning again.
        cursor.every = Duration::ZERO;
        let swept = sweep_all(&store, &commit, &mut cursor, &handed);
        assert_eq!(swept, vec![expiry_key(1_000, 0, b"a").into()]);
        assert!(store.due_expiries(u64::MAX, 10).unwrap().is_empty());
    }
}
