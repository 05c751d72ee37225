//! `GET /metrics`: counters, gauges and latency quantiles in the Prometheus
//! text format (version 0.0.4).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use super::Backend;
use super::Reply;
use crate::metrics::{Metrics, Stage};

/// Renders every metric.
pub fn render(core: &Backend) -> Reply {
    let m = &core.metrics;
    let mut out = String::with_capacity(4096);
    let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
        metric(out, name, "counter", help, v.load(Ordering::Relaxed));
    };
    metric(
        &mut out,
        "tern_connections",
        "gauge",
        "Open protocol connections.",
        m.connections.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "tern_frames_in_total",
        "Frames read from clients.",
        &m.frames_in,
    );
    counter(
        &mut out,
        "tern_frames_out_total",
        "Frames written to clients.",
        &m.frames_out,
    );
    counter(
        &mut out,
        "tern_bytes_in_total",
        "Bytes read from clients.",
        &m.bytes_in,
    );
    counter(
        &mut out,
        "tern_bytes_out_total",
        "Bytes written to clients.",
        &m.bytes_out,
    );
    counter(
        &mut out,
        "tern_requests_failed_total",
        "Commit requests rolled back by a store error (senders got OVERLOADED).",
        &m.failed_requests,
    );
    counter(
        &mut out,
        "tern_sends_refused_disk_total",
        "New messages refused (OVERLOADED) while free disk space was below min_free_space.",
        &m.refused_space,
    );
    counter(
        &mut out,
        "tern_store_recoveries_total",
        "Times the store was reopened after a failed write.",
        &m.store_recoveries,
    );
    metric(
        &mut out,
        "tern_store_healthy",
        "gauge",
        "1 while the store takes writes and free space is above min_free_space, else 0.",
        u64::from(core.store().health().is_ok()),
    );
    counter(
        &mut out,
        "tern_messages_accepted_total",
        "Messages accepted (stored, or handed to a connected recipient).",
        &m.accepted,
    );
    counter(
        &mut out,
        "tern_messages_delivered_total",
        "Deliveries ACKed by their recipient.",
        &m.delivered,
    );
    counter(
        &mut out,
        "tern_messages_expired_total",
        "Queued items expired.",
        &m.expired,
    );
    counter(
        &mut out,
        "tern_messages_deduplicated_total",
        "SENDs answered from duplicate detection.",
        &m.deduplicated,
    );
    counter(
        &mut out,
        "tern_files_stored_total",
        "Files uploaded.",
        &m.files_stored,
    );
    metric(
        &mut out,
        "tern_files_uploading",
        "gauge",
        "Uploads streaming through tern now.",
        m.files_uploading.load(Ordering::Relaxed),
    );
    metric(
        &mut out,
        "tern_files_large_uploads",
        "gauge",
        "Uploads to the object store past 1 MiB buffering in memory now; at most 32 at once, more wait for a place.",
        m.files_large_uploads.load(Ordering::Relaxed),
    );
    for (name, help, value) in [
        (
            "tern_files_expired_total",
            "Files deleted by files_max_age.",
            &m.files_expired,
        ),
        (
            "tern_files_abandoned_total",
            "Uploads never completed, removed by the sweep.",
            &m.files_abandoned,
        ),
        (
            "tern_files_thumbnails_total",
            "Thumbnails made.",
            &m.thumbnails,
        ),
        (
            "tern_files_thumbnails_refused_total",
            "Images stored without a thumbnail (malformed, mislabelled or too large).",
            &m.thumbnails_refused,
        ),
        (
            "tern_files_store_errors_total",
            "File requests answered 503 because the object store failed.",
            &m.files_store_errors,
        ),
    ] {
        counter(&mut out, name, help, value);
    }
    counter(
        &mut out,
        "tern_store_commits_total",
        "Synced batches written.",
        &m.commits,
    );
    counter(
        &mut out,
        "tern_store_committed_requests_total",
        "Requests applied in synced batches.",
        &m.committed_requests,
    );
    counter(
        &mut out,
        "tern_store_unsynced_commits_total",
        "Batches written without an fsync: settlements that owe no one a status, synced by the next synced write, normally within 100 ms.",
        &m.unsynced_commits,
    );
    counter(
        &mut out,
        "tern_store_unsynced_requests_total",
        "Requests applied in batches written without an fsync.",
        &m.unsynced_requests,
    );
    let depth = core.admin.dir.queued_total();
    metric(
        &mut out,
        "tern_queue_depth",
        "gauge",
        "Items queued in the store, all users.",
        depth,
    );
    metric(
        &mut out,
        "tern_group_shares_held",
        "gauge",
        "Members' shares of group sends held in memory (no REF item stored; counted in tern_queue_depth).",
        core.admin.dir.held.load(std::sync::atomic::Ordering::Relaxed) as u64,
    );
    summary(
        &mut out,
        "tern_store_commit_seconds",
        "Latency of a synced batch write.",
        &m.commit_latency,
    );
    summary(
        &mut out,
        "tern_delivery_latency_seconds",
        "From acceptance (TIME) to the MSG being written to the recipient.",
        &m.delivery_latency,
    );
    store_stats(&mut out, core);
    stages(&mut out, m);
    Reply {
        status: 200,
        body: out.into_bytes(),
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        headers: Vec::new(),
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// `tern_stage_seconds{stage=…}`: one summary per stage of a durable
/// message.
fn stages(out: &mut String, m: &Metrics) {
    let name = "tern_stage_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Latency of each stage of a durable message (docs/benchmarks.md).\n\
         # TYPE {name} summary"
    );
    for stage in Stage::ALL {
        let label = format!("stage=\"{}\"", stage.name());
        quantiles(out, name, &label, &m.stages[stage as usize]);
    }
}

/// A summary with p50/p90/p99/p999 from a histogram of microseconds.
fn summary(out: &mut String, name: &str, help: &str, h: &Mutex<Option<Histogram<u64>>>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    quantiles(out, name, "", h);
}

/// A summary's samples (quantiles, `_sum`, `_count`), with `labels` (a
/// `k="v"` list, or empty) on each.
fn quantiles(out: &mut String, name: &str, labels: &str, h: &Mutex<Option<Histogram<u64>>>) {
    let sep = if labels.is_empty() { "" } else { "," };
    let h = h.lock().unwrap_or_else(|e| e.into_inner());
    let (count, sum) = match h.as_ref() {
        Some(h) => {
            for q in [0.5, 0.9, 0.99, 0.999] {
                let secs = h.value_at_quantile(q) as f64 / 1e6;
                let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{q}\"}} {secs}");
            }
            (h.len(), h.mean() * h.len() as f64 / 1e6)
        }
        None => (0, 0.0),
    };
    let braced = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braced} {sum}\n{name}_count{braced} {count}"
    );
}

/// The expiry sweep's lag, and RocksDB's figures per column family
/// (`tern_store_*{cf=…}`): whether compaction keeps up with the deletes.
/// The figures are left out while the store is down.
fn store_stats(out: &mut String, core: &Backend) {
    metric(
        out,
        "tern_expiry_lag_ms",
        "gauge",
        "How long the earliest expiry-index entry (item or dedup record) the expiry sweep last found has been due, ms: 0 while the sweeper keeps up.",
        core.store().expiry_lag(crate::clock::now_ms()),
    );
    let Ok(stats) = core.store().cf_stats() else {
        return;
    };
    type Field = fn(&crate::store::CfStats) -> u64;
    let gauges: [(&str, &str, Field); 6] = [
        (
            "tern_store_sst_bytes",
            "Bytes in the column family's SST files.",
            |s| s.sst_bytes,
        ),
        (
            "tern_store_live_bytes",
            "RocksDB's estimate of the live data in those files (the rest awaits compaction).",
            |s| s.live_bytes,
        ),
        (
            "tern_store_pending_compaction_bytes",
            "Bytes compaction estimates it must still rewrite.",
            |s| s.pending_compaction_bytes,
        ),
        ("tern_store_l0_files", "Files in level 0.", |s| s.l0_files),
        ("tern_store_memtable_bytes", "Bytes in memtables.", |s| {
            s.memtable_bytes
        }),
        (
            "tern_store_keys",
            "Estimated keys, tombstones not yet compacted away included.",
            |s| s.keys,
        ),
    ];
    for (name, help, field) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &stats {
            let _ = writeln!(out, "{name}{{cf=\"{}\"}} {}", s.name, field(s));
        }
    }
}
