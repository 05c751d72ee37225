//! Counters and latency histograms, shared by every thread and exported by
//! `GET /metrics`. A leaf: it imports nothing from the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters exported by the metrics endpoint.
#[derive(Default)]
pub struct Metrics {
    /// Open protocol connections.
    pub connections: AtomicU64,
    /// Frames and bytes read from clients.
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Frames and bytes written to clients.
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Messages accepted (stored or handed to a live recipient).
    pub accepted: AtomicU64,
    /// Messages ACKed by their recipient.
    pub delivered: AtomicU64,
    /// Items expired by the sweeper.
    pub expired: AtomicU64,
    /// SENDs answered from the duplicate-detection record.
    pub deduplicated: AtomicU64,
    /// Requests rolled back by a store error (their senders got OVERLOADED).
    pub failed_requests: AtomicU64,
    /// New messages refused because free disk space was below `min_free_space`.
    pub refused_space: AtomicU64,
    /// Times the store was reopened after a failed write.
    pub store_recoveries: AtomicU64,
    /// Synced batches written and requests in them.
    pub commits: AtomicU64,
    pub committed_requests: AtomicU64,
    /// Batches written without an fsync (settlements that owe no one a
    /// status: `commit::needs_sync`) and requests in them.
    pub unsynced_commits: AtomicU64,
    pub unsynced_requests: AtomicU64,
    /// Latency of synced batch writes, microseconds.
    pub commit_latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// From a message's TIME to its MSG being written, microseconds.
    pub delivery_latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// Per-stage latency of durable messages, microseconds ([`Stage`]).
    pub stages: [Mutex<Option<hdrhistogram::Histogram<u64>>>; Stage::ALL.len()],
    /// Files uploaded.
    pub files_stored: AtomicU64,
    /// Uploads streaming now (proxied through tern), a gauge.
    pub files_uploading: AtomicU64,
    /// Uploads to the object store past 1 MiB, buffering now, a gauge
    /// (`files::s3::MAX_LARGE_UPLOADS` at most; more wait for a place).
    pub files_large_uploads: AtomicU64,
    /// Files deleted by `files_max_age`.
    pub files_expired: AtomicU64,
    /// Uploads started and never completed, removed by the sweep (direct
    /// uploads past their URL's expiry, stale partial files and objects).
    pub files_abandoned: AtomicU64,
    /// Thumbnails made.
    pub thumbnails: AtomicU64,
    /// Images stored without a thumbnail (malformed, mislabelled, too large).
    pub thumbnails_refused: AtomicU64,
    /// File requests answered 503 because the object store failed.
    pub files_store_errors: AtomicU64,
}

impl Metrics {
    /// Records one batch of `requests` requests written, synced or not
    /// (only synced writes are in the latency summary).
    pub fn record_commit(&self, took: std::time::Duration, requests: u64, synced: bool) {
        if !synced {
            self.unsynced_commits.fetch_add(1, Ordering::Relaxed);
            self.unsynced_requests
                .fetch_add(requests, Ordering::Relaxed);
            return;
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.committed_requests
            .fetch_add(requests, Ordering::Relaxed);
        record(&self.commit_latency, &[took.as_micros() as u64]);
    }

    /// Records samples of one stage, microseconds.
    pub fn record_stage(&self, stage: Stage, micros: &[u64]) {
        if !micros.is_empty() {
            record(&self.stages[stage as usize], micros);
        }
    }

    /// Records end-to-end delivery latencies, microseconds.
    pub fn record_deliveries(&self, micros: &[u64]) {
        if !micros.is_empty() {
            record(&self.delivery_latency, micros);
        }
    }
}

fn record(h: &Mutex<Option<hdrhistogram::Histogram<u64>>>, values: &[u64]) {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    let h = h.get_or_insert_with(|| {
        // 1 µs .. 1 h, 3 significant digits.
        hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("static histogram bounds are valid")
    });
    for &v in values {
        h.saturating_record(v.max(1));
    }
}

/// The stages a durable message goes through on the server, each timed
/// from the end of the one before (monotonic clock, µs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// SEND read by its event loop → its commit batch starts (waiting
    /// behind the batch in progress and the requests before it).
    Queue = 0,
    /// Batch start → the batch's write starts (building the batch).
    Batch,
    /// The synced write: WAL append, fsync, memtable inserts.
    Sync,
    /// Write done → the item is in the recipient's mailbox (the batch's
    /// completions before it).
    Push,
    /// In the mailbox → its MSG is written to the recipient's connection
    /// (event-loop wake-up, window, output buffer).
    Write,
    /// SEND read → MSG written: the server's whole share of the latency.
    Total,
    /// MSG written → the recipient's ACK of it is committed (network round
    /// trip, the client's processing, the ACK's own commit).
    Ack,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 7] = [
        Stage::Queue,
        Stage::Batch,
        Stage::Sync,
        Stage::Push,
        Stage::Write,
        Stage::Total,
        Stage::Ack,
    ];

    /// Its label in /metrics.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Batch => "batch",
            Stage::Sync => "sync",
            Stage::Push => "push",
            Stage::Write => "write",
            Stage::Total => "total",
            Stage::Ack => "ack",
        }
    }
}
