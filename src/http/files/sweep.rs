//! The retention sweep: one thread, `tern-files-sweep`, that every
//! [`interval`] deletes files older than `files_max_age` and removes
//! uploads started but never completed (direct uploads past their URL's
//! expiry; hourly, stale partial files and objects no metadata names).
//!
//! Each deletion is logged (info) and counted in `/metrics`
//! (`tern_files_expired_total`, `tern_files_abandoned_total`). A store that
//! is down makes a pass fail (logged); the next pass tries again. The
//! thread holds the files weakly and ends once they are dropped.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::Files;
use crate::clock::now_ms;
use crate::config::Config;

/// How often stale partial files and orphan objects are looked for.
const ORPHANS_EVERY: Duration = Duration::from_secs(3600);
/// The sweep's longest wait between passes.
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Time between passes: a quarter of the shortest age that matters,
/// between 250 ms and a minute (so a `files_max_age` of "2s" is honoured
/// within half a second, and a day's within a minute).
pub fn interval(config: &Config) -> Duration {
    let mut shortest = Duration::from_secs(u64::from(config.files_direct_ttl));
    if config.files_max_age.0 > 0 {
        shortest = shortest.min(config.files_max_age.duration());
    }
    (shortest / 4).clamp(Duration::from_millis(250), MAX_INTERVAL)
}

/// Starts the sweep thread.
pub fn start(files: Weak<Files>, config: &Config) -> io::Result<()> {
    let every = interval(config);
    let max_age_ms = config.files_max_age.0.saturating_mul(1000);
    // A URL that expired a moment ago may have carried a whole upload: its
    // client gets this long to complete it.
    let grace_ms = (u64::from(config.files_direct_ttl) * 1000).min(60_000);
    std::thread::Builder::new()
        .name("tern-files-sweep".into())
        .spawn(move || {
            let mut orphans_due = Instant::now();
            loop {
                std::thread::sleep(every);
                let Some(files) = files.upgrade() else { return };
                let orphans = Instant::now() >= orphans_due;
                if orphans {
                    orphans_due = Instant::now() + ORPHANS_EVERY;
                }
                match files.disk.sweep(now_ms(), max_age_ms, grace_ms, orphans) {
                    Ok(swept) => {
                        let m = &files.metrics;
                        m.files_expired.fetch_add(swept.expired, Ordering::Relaxed);
                        m.files_abandoned
                            .fetch_add(swept.abandoned, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "file retention sweep failed"),
                }
            }
        })?;
    Ok(())
}
