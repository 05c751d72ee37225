//! The server clock. Only the edges read it (event loops, the commit thread,
//! the sweeper, HTTP handlers, the dedup family's compaction filter); the
//! session is handed `now` instead.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds on a monotonic clock since the process first asked: for
/// the per-stage latency histograms (never 0, so 0 can mean "not timed").
pub fn mono_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    start.elapsed().as_micros() as u64 + 1
}
